"""Which app a ``flwr run`` runs: the federation or federated LoRA.

A Flower app (FAB) registers one ServerApp and one ClientApp (``[tool.flwr.app.components]``),
so the repository's two apps share them: the run-config key ``app`` names the one to run
(``flwr run . --run-config 'app="fedlora"'``) and both registered apps dispatch on it, the
ServerApp in ``server/app.py`` and the ClientApp in ``clients/app.py`` (a ClientApp sees the
run config too).  Why one key rather than a second app directory: a FAB is built from one
directory, and the LoRA apps import the same packages (``fed_iotlm``, ``server``,
``clients``) as the federation, which a sub-directory's FAB would not carry.

The key is not a Hydra override: :func:`fed_iotlm.settings.run_config_overrides` leaves it out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

APP_KEY = "app"
FEDERATION = "federation"  # server/app.py, clients/app.py: the modality-aware federation
FEDLORA = "fedlora"  # server/lora_app.py, clients/lora_app.py: federated LoRA of the LM stage
APPS = (FEDERATION, FEDLORA)


def chosen_app(run_config: Mapping[str, Any]) -> str:
    """The app the run config names (absent or ``""``: the federation); anything else
    is refused with the choices, before any message is sent."""
    name = run_config.get(APP_KEY, "") or FEDERATION
    if name not in APPS:
        raise ValueError(f"run config {APP_KEY}={name!r}: choose {' or '.join(APPS)}")
    return str(name)

"""Flower ServerApp: runs the configured strategy and writes the run's outputs.

The registered ServerApp (``app``, what ``flwr run .`` loads) runs the app the run config's
``app`` key names (:mod:`fed_iotlm.flwr_apps`): the federation below (the default) or
federated LoRA (:mod:`server.lora_app`, imported only then: it needs the ``llm`` extra).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fed_iotlm.flwr_apps import FEDERATION, FEDLORA, chosen_app
from fed_iotlm.logs import configure as configure_logging
from fed_iotlm.settings import from_run_config
from fed_iotlm.tracking import fail_open_runs

from .federated_run import default_out_dir, run_federated


def make_server_app(
    cfg: dict | None = None,
    out_dir: Path | None = None,
    grid_hook: Callable[[Grid], Grid] | None = None,
) -> ServerApp:
    """A ServerApp bound to ``cfg`` (Python entry point) or, if None, to the run config;
    ``grid_hook`` wraps the Grid (tests observe what the server receives)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        configure_logging()  # a ServerApp started by Flower runs in an unconfigured process
        grid = grid_hook(grid) if grid_hook is not None else grid
        settings = cfg if cfg is not None else from_run_config(dict(context.run_config))
        try:
            path = run_federated(grid, settings, out_dir or default_out_dir(settings))
        except BaseException as err:
            fail_open_runs(err)  # MLflow shows the run FAILED, not FINISHED
            raise
        if cfg is None:  # `flwr run`: nobody else is told where results.json is
            print(path, flush=True)
        # given ``cfg`` (``fed-iotlm run``, ``python -m simulations.run``), the caller
        # prints the path as its last line: printing here too showed it twice

    return app


def _lora_server_app() -> ServerApp:
    from server.lora_app import app as lora_app  # transformers, peft: the llm extra

    return lora_app


def make_registered_server_app(
    apps: Mapping[str, Callable[[], ServerApp]] | None = None,
) -> ServerApp:
    """The ServerApp ``pyproject.toml`` registers: the run config's ``app`` picks the
    federation (:func:`make_server_app`, unchanged) or the federated-LoRA ServerApp, which
    then reads its own settings from the same run config.  The sites' registered ClientApp
    (``clients/app.py``) dispatches on the same key.  ``apps``: app name -> the ServerApp
    (tests stand in their own)."""
    federation = make_server_app()
    choices = apps or {FEDERATION: lambda: federation, FEDLORA: _lora_server_app}
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        choices[chosen_app(context.run_config)]()(grid, context)

    return app


# `flwr run .` loads this object; it reads its settings from the Flower run config.
app = make_registered_server_app()

"""The registered apps dispatch on the run config's ``app`` key (fed_iotlm/flwr_apps.py).

``pyproject.toml`` registers one ServerApp and one ClientApp; ``app="fedlora"`` must
reach the federated-LoRA ones and the default the federation's, unchanged.  The real
``flwr run`` of the documented LoRA command is in tests/test_flwr_run.py.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fed_iotlm.flwr_apps import APP_KEY, APPS, FEDERATION, FEDLORA, chosen_app
from fed_iotlm.settings import run_config_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def task_identity(monkeypatch):
    """Flower's Message() needs a run id outside a running app."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def _context(app: str | None) -> Context:
    run_config = {} if app is None else {APP_KEY: app}
    return Context(1, 7, {"partition-id": 0, "num-partitions": 1}, RecordDict(), run_config)


def test_pyproject_declares_the_key_with_the_federation_as_default():
    with (ROOT / "pyproject.toml").open("rb") as f:
        app = tomllib.load(f)["tool"]["flwr"]["app"]
    assert app["config"][APP_KEY] == FEDERATION
    assert app["components"] == {"serverapp": "server.app:app", "clientapp": "clients.app:app"}


def test_flower_accepts_the_key_as_the_docs_pass_it():
    from flwr.common.config import get_fused_config_from_dir, parse_config_args

    fused = get_fused_config_from_dir(ROOT, parse_config_args(['app="fedlora" rounds=2']))
    assert chosen_app(fused) == FEDLORA
    assert chosen_app(get_fused_config_from_dir(ROOT, {})) == FEDERATION


def test_the_key_is_no_hydra_override_and_an_unknown_app_is_refused():
    assert run_config_overrides({APP_KEY: FEDLORA, "overrides": "rounds=2"}) == ["rounds=2"]
    assert chosen_app({}) == chosen_app({APP_KEY: ""}) == FEDERATION
    with pytest.raises(ValueError, match="app='lora': choose federation or fedlora"):
        chosen_app({APP_KEY: "lora"})


def test_the_registered_client_app_lists_every_message_type_of_both_apps():
    from clients.app import DISPATCHED, make_client_app
    from clients.lora_app import make_lora_client_app

    handled = {*make_client_app()._registered_funcs, *make_lora_client_app()._registered_funcs}
    listed = {t if "." in t else f"{t}.default" for t in DISPATCHED}
    assert listed == handled


def _echo_app(name: str, seen: list[str]) -> ClientApp:
    """A ClientApp that answers any message of DISPATCHED, saying it was ``name``."""
    from clients.app import DISPATCHED

    app = ClientApp()

    def handle(msg: Message, context: Context) -> Message:
        seen.append(f"{name}:{msg.metadata.message_type}")
        return Message(RecordDict({"who": ConfigRecord({"app": name})}), reply_to=msg)

    for message_type in DISPATCHED:
        category, _, action = message_type.partition(".")
        register = {"train": app.train, "evaluate": app.evaluate, "query": app.query}[category]
        (register(action) if action else register())(handle)
    return app


@pytest.mark.parametrize("chosen", [None, *APPS])
def test_the_registered_client_app_hands_every_message_to_the_chosen_app(chosen, task_identity):
    from clients.app import DISPATCHED, make_registered_client_app

    seen: list[str] = []
    stand_ins = {name: _echo_app(name, seen) for name in APPS}
    app = make_registered_client_app({name: lambda n=name: stand_ins[n] for name in APPS})
    expected = chosen or FEDERATION
    for message_type in DISPATCHED:
        msg = Message(RecordDict(), dst_node_id=7, message_type=message_type)
        reply = app(msg, _context(chosen))
        assert reply.content["who"]["app"] == expected
    assert seen == [f"{expected}:{t}" for t in DISPATCHED]


@pytest.mark.parametrize("chosen", [None, *APPS])
def test_the_registered_server_app_runs_the_chosen_app(chosen):
    from server.app import make_registered_server_app

    ran: list[str] = []

    def stand_in(name: str) -> ServerApp:
        app = ServerApp()

        @app.main()
        def main(grid, context) -> None:
            ran.append(name)

        return app

    stand_ins = {name: stand_in(name) for name in APPS}
    app = make_registered_server_app({name: lambda n=name: stand_ins[n] for name in APPS})
    app(None, _context(chosen))
    assert ran == [chosen or FEDERATION]


def test_an_unknown_app_fails_before_any_app_runs():
    from server.app import make_registered_server_app

    def never() -> ServerApp:
        raise AssertionError("no app may be picked")

    app = make_registered_server_app({name: never for name in APPS})
    with pytest.raises(ValueError, match="choose federation or fedlora"):
        app(None, _context("nope"))


def test_the_registered_apps_reach_the_real_lora_apps():
    """Without stand-ins, ``fedlora`` resolves to the modules' own LoRA app objects."""
    import clients.app
    import clients.lora_app
    import server.app
    import server.lora_app

    assert clients.app._lora_client_app() is clients.lora_app.app
    assert server.app._lora_server_app() is server.lora_app.app

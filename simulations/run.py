"""Run one experiment: ``python -m simulations.run [experiment=NAME] [key=value ...]``.

``method=federated`` (default) and ``method=fedavg`` run a real Flower federation under
the simulation engine (``flwr.simulation.run_simulation``); ``method=local`` and
``method=centralized`` are the reference points, trained in-process.  Every method
writes the same outputs; the last line printed is the path of results.json.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from fed_iotlm.config_schema import block, register
from fed_iotlm.experiment import check_method
from fed_iotlm.logs import RUN_LOG, run_log
from fed_iotlm.models.device import check_devices
from fed_iotlm.settings import config_dir
from simulations.ray_cluster import (
    attached,
    backend_config,
    backend_hint,
    for_cluster,
    ray_settings,
)

CONFIG_DIR = str(config_dir())  # the checkout's configs/, or the wheel's fed_iotlm/configs


def run_experiment(
    cfg: dict,
    out_dir: Path,
    client_mods: list | None = None,
    grid_hook: Callable | None = None,
) -> Path:
    """Run ``cfg`` and return the path of its results.json (``client_mods`` wrap every
    node's ClientApp as Flower client mods; ``grid_hook`` wraps the ServerApp's Grid, so
    a test can see everything the server receives)."""
    method = check_method(cfg)
    check_devices(cfg)  # train.device / binding.device: one clear line before any work
    cfg = {**cfg, "output_dir": str(out_dir)}
    with run_log(Path(out_dir) / RUN_LOG):  # the run's folder keeps its own log
        return _run_method(method, cfg, out_dir, client_mods, grid_hook)


def _run_method(
    method: str, cfg: dict, out_dir: Path, client_mods: list | None, grid_hook: Callable | None
) -> Path:
    """Dispatch to the method's runner; an in-process run's MLflow run ends FAILED if it
    raises."""
    try:
        if method == "local":
            from fed_iotlm.baselines import run_local_only

            return run_local_only(cfg, out_dir)
        if method == "centralized":
            from fed_iotlm.baselines import run_centralized

            return run_centralized(cfg, out_dir)
        if method == "centralized_mmbind":
            from fed_iotlm.baselines import run_centralized_mmbind

            return run_centralized_mmbind(cfg, out_dir)
        return run_flower_simulation(cfg, out_dir, client_mods, grid_hook)
    except BaseException as err:
        from fed_iotlm.tracking import fail_open_runs

        fail_open_runs(err)  # an in-process run's MLflow run ends FAILED
        raise


def run_flower_simulation(
    cfg: dict, out_dir: Path, client_mods: list | None = None, grid_hook: Callable | None = None
) -> Path:
    """The federation under Flower's simulation engine, one virtual SuperNode per node:
    on a private local Ray instance, or on the cluster at ``simulation.ray_address``."""
    from clients.app import make_client_app
    from fed_iotlm.data.federation import build_layout
    from fed_iotlm.federation.privacy import check_dp_run
    from fed_iotlm.federation.secure import check_composable
    from server.app import make_server_app
    from simulations.runtime_watch import run_watched

    num_nodes = build_layout(cfg).num_nodes  # fail fast on a bad plan or dataset
    check_dp_run(cfg)  # ... and on DP settings the run cannot honour
    check_composable(cfg)  # ... and on secure aggregation with a rule that needs plaintext
    sim = block(cfg, "simulation")
    ray_cfg = ray_settings(sim)
    backend_name = sim["backend"]
    if ray_cfg.attach and backend_name != "ray":
        raise ValueError(
            f"simulation.ray_address={ray_cfg.address!r} needs simulation.backend=ray, "
            f"not {backend_name!r}"
        )
    if ray_cfg.attach:
        cfg = for_cluster(cfg)
    results = out_dir / "results.json"
    results.unlink(missing_ok=True)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    with attached(ray_cfg) if ray_cfg.attach else nullcontext():
        # a backend that fails to start stops the ServerApp too, instead of leaving it
        # in its roll call for 900 s: simulations/runtime_watch.py
        run_watched(
            make_server_app(cfg, out_dir, grid_hook),
            backend_hint(ray_cfg),
            client_app=make_client_app(cfg, client_mods),
            num_supernodes=num_nodes,
            backend_name=backend_name,
            backend_config=backend_config(ray_cfg),
            verbose_logging=bool(sim["verbose"]),
        )
    if not results.is_file():
        raise RuntimeError(f"the federation ended without writing {results}; see the log above")
    return results


def hydra_command(run: Callable[[dict, Path], Path]) -> Callable[[], None]:
    """A Hydra entry point: compose ``configs/config.yaml`` with the command line, call
    ``run(cfg, out_dir)`` and print the returned results.json path as the last line."""

    @hydra.main(config_path=CONFIG_DIR, config_name="config", version_base=None)
    def main(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        from fed_iotlm.logs import configure

        configure()
        container = OmegaConf.to_container(cfg, resolve=True)
        out_dir = Path(container.get("output_dir") or HydraConfig.get().runtime.output_dir)
        path = run(container, out_dir)
        sys.stdout.flush()
        print(path.resolve())

    def entry() -> None:
        register()  # the schemas config.yaml's defaults list names
        check_command_line(sys.argv[1:])
        main()

    return entry


def check_command_line(argv: list[str]) -> None:
    """Compose the command line's overrides against the schema before Hydra runs, so a
    wrong key or type ends with one line naming it and exit status 2, not Hydra's
    multi-line report.  Hydra's own flags (``--multirun``, ``--cfg``, ...) and ``hydra.*``
    overrides are left to Hydra: with a flag present nothing is checked here."""
    from fed_iotlm.settings import ConfigError, compose

    if any(arg.startswith("-") for arg in argv):
        return
    overrides = [a for a in argv if not a.lstrip("+~").startswith(("hydra.", "hydra/"))]
    try:
        compose(overrides)
    except ConfigError as err:
        prog = ".".join(Path(sys.argv[0]).with_suffix("").parts[-2:])  # simulations.run
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)


main = hydra_command(run_experiment)

if __name__ == "__main__":
    main()

"""Where the simulated nodes run: a private local Ray instance, or an existing Ray
cluster (``simulation.ray_address``) that may span several machines and GPUs.

Flower's Ray backend calls ``ray.init(**init_args)`` only when Ray is not initialised
yet. To attach, we call ``ray.init`` ourselves before the simulation starts, because
passing the address through Flower's ``init_args`` would

* hang: ``ray.init`` retries an address nobody listens on for minutes, so we check
  that something listens first and fail with the address and how to start a head;
* break on ``num_cpus``: ``ray.init`` refuses it (and ``num_gpus``, ``resources``,
  ...) for an existing cluster, whose size each ``ray start`` sets;
* strand the code: Flower only puts this driver's ``sys.path`` in the job's
  ``PYTHONPATH``, which names directories that need not exist where the workers run
  (another machine, or a head started from another directory). We ship the repo
  with the job instead (``runtime_env.working_dir``).

The private instance is started with ``address="local"``: without it, ``ray.init``
silently joins a cluster named by ``RAY_ADDRESS`` or by the last ``ray start`` on this
machine, and then either fails on ``num_cpus`` or runs somewhere nobody asked for.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fed_iotlm.config_schema import section

REPO = Path(__file__).resolve().parents[1]
# never uploaded with a job (Ray also skips what .gitignore lists)
NOT_SHIPPED = (
    ".git",
    ".venv",
    "outputs",
    "runs",
    "mlruns",
    "mlflow.db",
    "multirun",
    "__pycache__",
    "*.pyc",
)
HOW_TO_START = (
    "start a head with `ray start --head --port=6379` (same venv as this driver) and "
    "add machines with `ray start --address=HEAD:6379`; see docs/cluster.md"
)


@dataclass(frozen=True)
class RaySettings:
    """The ``simulation:`` block, checked once so every later step can trust it."""

    address: str | None  # None: a private local instance; "auto" or "host:port": attach
    cpus_per_node: float  # Ray resources one simulated node holds while it runs
    gpus_per_node: float
    num_cpus: int | None  # size of the private instance (None: every core)
    ship_code: bool  # attach: upload the project's packages with the job
    connect_timeout_s: float

    @property
    def attach(self) -> bool:
        return self.address is not None


def ray_settings(sim: Mapping[str, Any]) -> RaySettings:
    """Validate ``cfg['simulation']`` (keys a caller leaves out: the schema's defaults);
    every error names the key and the bad value."""
    sim = section("simulation", sim)
    address = sim["ray_address"]
    if address is not None:
        address = str(address).strip()
        if address.startswith("ray://"):
            raise ValueError(
                f"simulation.ray_address={address!r}: Ray Client addresses (ray://) are not "
                "supported; give the head's GCS address host:port (default port 6379), "
                "reachable from this machine"
            )
        if address != "auto":
            parse_address(address)
    cpus = _number(sim, "cpus_per_node")
    if cpus <= 0:
        raise ValueError(f"simulation.cpus_per_node={cpus}: must be > 0")
    gpus = _number(sim, "gpus_per_node")
    if gpus < 0:
        raise ValueError(f"simulation.gpus_per_node={gpus}: must be >= 0 (0.25 = a quarter GPU)")
    num_cpus = sim["num_cpus"]
    if num_cpus is not None:
        if address is not None:
            raise ValueError(
                f"simulation.num_cpus={num_cpus} sizes a private Ray instance, but "
                f"simulation.ray_address={address!r} attaches to a cluster whose size each "
                "`ray start --num-cpus N --num-gpus G` sets; leave simulation.num_cpus=null"
            )
        if isinstance(num_cpus, bool) or not isinstance(num_cpus, int) or num_cpus < 1:
            raise ValueError(f"simulation.num_cpus={num_cpus!r}: expected null or an integer >= 1")
    if address is None:  # a private instance: its size is known before Ray starts
        _check_one_node_fits(cpus, num_cpus)
    timeout = _number(sim, "ray_connect_timeout_s")
    if timeout <= 0:
        raise ValueError(f"simulation.ray_connect_timeout_s={timeout}: must be > 0")
    return RaySettings(
        address=address,
        cpus_per_node=cpus,
        gpus_per_node=gpus,
        num_cpus=num_cpus,
        ship_code=bool(sim["ray_ship_code"]),
        connect_timeout_s=timeout,
    )


def _check_one_node_fits(cpus_per_node: float, num_cpus: int | None) -> None:
    """Refuse a private instance too small for one simulated node before Ray starts:
    Flower would otherwise start Ray (30-70 s on a loaded machine) only to find that no
    node fits."""
    size = num_cpus if num_cpus is not None else os.cpu_count() or 1
    if cpus_per_node > size:
        named = (
            f"simulation.num_cpus={num_cpus}"
            if num_cpus is not None
            else f"simulation.num_cpus=null (every core: {size} here)"
        )
        raise ValueError(
            f"simulation.cpus_per_node={cpus_per_node:g} does not fit the private Ray "
            f"instance of {named}: not one simulated node could run; lower "
            "simulation.cpus_per_node or raise simulation.num_cpus"
        )


def _number(sim: Mapping[str, Any], key: str) -> float:
    value = sim[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"simulation.{key}={value!r}: expected a number")
    return float(value)


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) -> (host, port), or a ValueError naming it."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"simulation.ray_address={address!r}: expected null (private local Ray), "
            "'auto' (RAY_ADDRESS, else the cluster the last `ray start` here recorded) "
            "or HOST:PORT of a Ray head's GCS, e.g. 10.0.0.5:6379"
        )
    return host, int(port)


def backend_config(s: RaySettings) -> dict[str, Any]:
    """Flower's ``backend_config``: resources per simulated node, and how to start Ray.

    Flower fits ``floor(node CPUs / cpus_per_node)`` nodes on each Ray node (fewer where
    ``gpus_per_node`` > 0: also ``floor(node GPUs / gpus_per_node)``, none on a node
    without GPUs), so the same settings spread over every machine of a cluster.
    """
    client_resources = {"num_cpus": s.cpus_per_node, "num_gpus": s.gpus_per_node}
    if s.attach:
        return {"client_resources": client_resources, "init_args": {}}  # Ray is up already
    init_args: dict[str, Any] = {
        "address": "local",
        "include_dashboard": False,
        "logging_level": logging.ERROR,
    }
    if s.num_cpus is not None:
        init_args["num_cpus"] = s.num_cpus
    return {"client_resources": client_resources, "init_args": init_args}


RAY_START_HINT = (
    "If Ray itself failed to start (e.g. its raylet aborted or timed out on a loaded "
    "machine), retry when the machine is quieter"
)


def backend_hint(s: RaySettings) -> str:
    """What to check when Flower's Ray backend fails to start: the ``simulation``
    settings that shaped the start, by name."""
    shares = (
        f"simulation.cpus_per_node={s.cpus_per_node:g} and "
        f"simulation.gpus_per_node={s.gpus_per_node:g} (one simulated node's share)"
    )
    if s.attach:
        return (
            f"Check simulation.ray_address={s.address!r} (is the head up?) and that {shares} "
            f"fit one machine of the cluster; {HOW_TO_START}"
        )
    size = "null: every core" if s.num_cpus is None else s.num_cpus
    return (
        f"Check that {shares} fit the private Ray instance (simulation.num_cpus={size}; "
        f"a GPU share needs a GPU). {RAY_START_HINT}, or start a head once and attach to "
        "it with simulation.ray_address (docs/cluster.md)"
    )


def resolve_address(address: str) -> str:
    """``host:port`` as given; ``auto``: ``RAY_ADDRESS``, else the cluster the last
    ``ray start`` on this machine recorded. Never Ray's own last resort for ``auto``
    (any Ray process found running here), which would join the private instance of
    some other run on this machine."""
    if address != "auto":
        return address
    from ray._private.services import canonicalize_bootstrap_address  # Ray's own rule

    found = canonicalize_bootstrap_address(None)  # None: env var and `ray start` record only
    if found is None:
        raise ConnectionError(
            "simulation.ray_address='auto': RAY_ADDRESS is not set and no `ray start` "
            f"cluster is recorded on this machine; {HOW_TO_START}"
        )
    return str(found)


def check_listening(address: str, timeout_s: float, setting: str | None = None) -> None:
    """Fail fast where ``ray.init`` would retry for minutes: nothing accepts TCP at
    ``address`` (``setting``: what the user wrote, when ``auto`` resolved to it)."""
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        named = f"{setting!r} (= {address})" if setting and setting != address else repr(address)
        raise ConnectionError(
            f"simulation.ray_address={named}: no Ray head is listening there ({e}); {HOW_TO_START}"
        ) from e


def runtime_env(ship_code: bool) -> dict[str, Any]:
    """What a worker of the cluster needs to import this project.

    ``ship_code``: the repo (code and ``configs/``; not ``.git``, the venv or run
    outputs) uploaded with the job as its ``working_dir``, unpacked on each machine, put
    on the workers' path and made their working directory, so they run this driver's
    code wherever they are. A ``working_dir`` also stops Ray from putting the driver's
    own working directory on the workers' path ahead of anything shipped (a stale
    checkout at the same path on another machine would otherwise win).
    Otherwise: the driver's ``sys.path`` as ``PYTHONPATH`` (Flower's way), which works
    only where the repo sits at the same path on every machine.
    """
    if ship_code:
        return {"working_dir": str(REPO), "excludes": list(NOT_SHIPPED)}
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}}


def check_capacity(s: RaySettings, nodes: list[dict[str, Any]], address: str) -> int:
    """How many simulated nodes the cluster runs at once (Flower's per-node rule), or a
    ValueError naming the cluster's resources when not even one fits."""
    fits = 0
    seen = []
    for node in nodes:
        res = node.get("Resources") or {}
        if not node.get("Alive", True) or not res:
            continue
        cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
        seen.append(f"CPU={cpus:g} GPU={gpus:g}")
        here = int(cpus // s.cpus_per_node)
        if s.gpus_per_node > 0:
            here = min(here, int(gpus // s.gpus_per_node))
        fits += here
    if fits == 0:
        raise ValueError(
            f"the Ray cluster at {address} cannot hold one simulated node with "
            f"simulation.cpus_per_node={s.cpus_per_node:g} and "
            f"simulation.gpus_per_node={s.gpus_per_node:g}; its nodes have "
            f"[{'; '.join(seen) or 'no resources'}] (add GPUs with `ray start --num-gpus G`, "
            "or lower the per-node shares)"
        )
    return fits


@contextmanager
def attached(s: RaySettings) -> Iterator[str]:
    """Connect this process to the cluster at ``s.address`` for the duration; yields the
    cluster's GCS address. Flower then finds Ray initialised and builds its actor pool
    on the cluster; leaving disconnects (the cluster keeps running)."""
    import ray

    if not s.attach:
        raise ValueError("attached() needs simulation.ray_address")
    if ray.is_initialized():
        raise RuntimeError(
            f"Ray is already initialised in this process, so simulation.ray_address="
            f"{s.address!r} cannot take effect; call ray.shutdown() first"
        )
    address = resolve_address(s.address)
    check_listening(address, s.connect_timeout_s, s.address)
    try:
        context = ray.init(
            address=address,
            runtime_env=runtime_env(s.ship_code),
            logging_level=logging.ERROR,
            log_to_driver=True,
        )
    except ConnectionError as e:
        raise ConnectionError(
            f"simulation.ray_address={s.address!r}: could not join the Ray cluster at "
            f"{address} ({e}); {HOW_TO_START}"
        ) from e
    try:
        gcs = str(context.address_info.get("gcs_address") or address)
        check_capacity(s, ray.nodes(), gcs)
        yield gcs
    finally:
        ray.shutdown()


def for_cluster(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with a relative ``data.path`` made absolute against this driver's working
    directory: the cluster's workers run from their own directories."""
    data = cfg.get("data") or {}
    path = data.get("path")
    if not path or Path(str(path)).expanduser().is_absolute():
        return cfg
    return {**cfg, "data": {**data, "path": str(Path(str(path)).expanduser().resolve())}}

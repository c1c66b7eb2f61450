"""The server process killed mid-round, restarted with ``resume=true``, ends where an
uninterrupted run ends: the same final parameters, bit for bit.

Real processes on loopback (tests/loopback_federation.py): one SuperLink, three
SuperNodes reading their own site directories.  Run A goes through uninterrupted.  Run B,
same config and another ``output_dir``, has its ServerApp process (``flwr-serverapp``)
killed with SIGKILL once round 2 is in flight on a site (the site's ``fault-marker``,
clients/fault_marker.py).  Run C, the same config with ``resume=true``, continues B from
its last checkpoint (after round 1).  C must end with A's final parameters, must not
re-run round 1 (no site marks a round-1 start during C), and results.json must hold
every round once.  The SuperLink and the sites stay up throughout: what is killed is the
server's process, as when its machine's job is preempted.
"""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest

from clients.fault_marker import marker_path
from fed_iotlm.federation.bundle import load_bundle
from fed_iotlm.federation.records import state_to_numpy
from tests.flower_procs import REAL_PROCESS_MARKS, send_signal
from tests.loopback_federation import LoopbackFederation, wait_for

# three whole runs against real processes (~30 min on 2 cores): `make test-long`
pytestmark = [*REAL_PROCESS_MARKS, pytest.mark.long]

ROUNDS = 2
KILL_ROUND = 2
ROUND_TIMEOUT_S = 90  # a generous deadline: no site is dropped on a loaded machine
RUN_TIMEOUT_S = 1500  # per run: 2 rounds took 8 min on 2 cores under a load of 20


def _config(out_dir, *extra: str) -> list[str]:
    return [
        f"rounds={ROUNDS}",
        "train.epochs=1",
        f"strategy.round_timeout_s={ROUND_TIMEOUT_S}",
        "mlflow.enabled=false",
        f"output_dir={out_dir}",
        *extra,
    ]


def _final(out_dir) -> dict[str, np.ndarray]:
    model, _ = load_bundle(out_dir / "bundle")
    return state_to_numpy(model)


def _clear(markers) -> None:
    for marker in markers.glob("train-*"):
        marker.unlink()


def test_server_killed_mid_round_resumes_to_the_uninterrupted_result(tmp_path):
    fed = LoopbackFederation(tmp_path, "fed-iotlm-restart")
    try:
        fed.start()
        markers = fed.sites.markers
        started = time.monotonic()

        straight = tmp_path / "uninterrupted"
        run_a = fed.run(*_config(straight))
        res_a = fed.wait_for_results(straight / "results.json", run_a, RUN_TIMEOUT_S)
        _clear(markers)

        resumed = tmp_path / "resumed"
        run_b = fed.run(*_config(resumed))
        in_flight = marker_path(markers, 0, KILL_ROUND)
        wait_for(in_flight.exists, RUN_TIMEOUT_S, in_flight.name, fed.context)
        _, servers = fed.tracker.scan("flwr-serverapp")
        assert len(servers) == 1, f"expected one ServerApp process, found {sorted(servers)}"
        send_signal(servers, signal.SIGKILL)
        wait_for(lambda: not fed.tracker.scan("flwr-serverapp")[1], 30, "the ServerApp to die")
        assert not (resumed / "results.json").exists()
        assert (resumed / "checkpoint").is_dir(), "no checkpoint after round 1"
        _clear(markers)

        run_c = fed.run(*_config(resumed, "resume=true"))
        res_c = fed.wait_for_results(resumed / "results.json", run_c, RUN_TIMEOUT_S)
        elapsed = time.monotonic() - started

        # the resumed run trained round 2 only: round 1 was not re-run on any site
        assert not list(markers.glob("train-p*-r1")), sorted(markers.iterdir())
        assert sorted(p.name for p in markers.glob("train-p*-r2")) == [
            f"train-p{p}-r2" for p in range(3)
        ]
        assert [h["round"] for h in res_c["history"]] == list(range(1, ROUNDS + 1))
        assert [h["accuracy"] for h in res_c["history"]] == [
            h["accuracy"] for h in res_a["history"]
        ]
        final_a, final_c = _final(straight), _final(resumed)
        assert list(final_a) == list(final_c)
        differ = [k for k in final_a if not np.array_equal(final_a[k], final_c[k])]
        assert not differ, f"resumed run differs from the uninterrupted one in {differ}"
        print(f"server restart: 2 runs + 1 resume in {elapsed:.1f} s ({run_a}, {run_b}, {run_c})")
    finally:
        fed.stop()

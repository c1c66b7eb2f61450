"""The round benchmarks compose configs their own ServerApps can run.

``benchmarks.round_overhead`` and ``benchmarks.scaling`` start the strategy directly and
time training rounds; they run no statistics round.  Under the default
``normalization=federated`` every node refuses to train without the pooled statistics
that round sends, so both benchmarks stopped at their first round (seen at 2b3d3ca)."""

from __future__ import annotations

from benchmarks.round_overhead import compose_cfg as overhead_cfg
from benchmarks.scaling import Point
from benchmarks.scaling import compose_cfg as scaling_cfg
from fed_iotlm.federation.normalization import normalization_mode


def test_round_overhead_needs_no_statistics_round():
    assert normalization_mode(overhead_cfg("quick", 4)) == "per_site"


def test_scaling_needs_no_statistics_round():
    cfg = scaling_cfg(Point(nodes=100, sampled=10), 10, 2)
    assert normalization_mode(cfg) == "per_site"

"""How close the statistics round under SecAgg+ comes to the plain round, per limb count.

Prints JSON: for 1, 2 and 3 fixed-point limbs (fed_iotlm/federation/secure_statistics.py
uses 3), the worst error over 5 seeded federations of the pooled mean and std per
modality, in units of the plain round's std.  Each node's vector goes through Flower's
own SecAgg+ quantiser (tests/test_secure_statistics.py builds the federations: imu
9.81 ± 0.05 over 20 steps, depth uniform 0..255, vec N(-3, 2); centre 0, bound 1000).

    PYTHONPATH=$PWD python benchmarks/secure_statistics_precision.py
"""

from __future__ import annotations

import json

import numpy as np

import fed_iotlm.federation.secure_statistics as secure_statistics
from fed_iotlm.data.preprocess import ChannelSums
from tests.test_secure_statistics import SETTINGS, _federation, _layout, _through_secagg


def worst_errors(limbs: int, seeds: int = 5) -> dict[str, float]:
    secure_statistics.LIMBS = limbs
    worst: dict[str, float] = {}
    for seed in range(seeds):
        splits = _federation(np.random.default_rng(seed))
        layout = _layout(splits)
        vectors = [layout.encode(s, SETTINGS, layout.modalities) for s in splits]
        found = layout.decode(_through_secagg(vectors, SETTINGS), SETTINGS).scaler
        plain = sum((ChannelSums.of(s) for s in splits), ChannelSums({}, {}, {})).standardizer()
        for m in plain.mean:
            scale = plain.std[m]
            err = max(
                float(np.abs((found.mean[m] - plain.mean[m]) / scale).max()),
                float(np.abs(found.std[m] / scale - 1.0).max()),
            )
            worst[m] = max(worst.get(m, 0.0), err)
    return worst


if __name__ == "__main__":
    default = secure_statistics.LIMBS
    try:
        print(json.dumps({f"limbs={k}": worst_errors(k) for k in (1, 2, 3)}, indent=1))
    finally:
        secure_statistics.LIMBS = default

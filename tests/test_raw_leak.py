"""The raw-data leak checker (tests/raw_leak.py) finds a sample in every disguise the
no-raw-data tests must catch, and stays quiet on what nodes legitimately send."""

from __future__ import annotations

import numpy as np
import pytest

from fed_iotlm.binding.privacy import quantize_int8
from fed_iotlm.data.synthetic import SyntheticConfig, make_synthetic
from tests.raw_leak import RawLeakChecker, numeric_values

# far from the seeds the synthetic generator draws from (seed 0 shares its noise stream)
OTHER = np.random.default_rng(20_261_130)


@pytest.fixture(scope="module")
def raw() -> dict[str, np.ndarray]:
    data = make_synthetic(SyntheticConfig(num_train=60, num_test=10, num_sites=2, seed=3))
    return {m: data.train.x[m] for m in ("imu", "audio")}


@pytest.fixture(scope="module")
def checker(raw) -> RawLeakChecker:
    return RawLeakChecker(raw, transposed=True)


def _noise(n: int) -> np.ndarray:
    return OTHER.normal(size=n).astype(np.float32)


def test_what_nodes_legitimately_send_is_clean(checker):
    int8, scale = quantize_int8(_noise(64 * 60).reshape(60, 64))
    sent = {
        "model": _noise(50_000),
        "embeddings.q": int8,
        "embeddings.scale": scale,
        "ids": np.arange(60),
        "metrics": numeric_values({"loss": 0.7, "partition-id": 1, "num-examples": 60.0}),
    }
    assert checker.leaks(sent) == []
    assert checker.searched > 1000  # blocks really compared (few skipped as flat or ramps)


def _hide(values: np.ndarray, at: int = 1234, size: int = 20_000) -> np.ndarray:
    out = _noise(size)
    out[at : at + values.size] = values.ravel()
    return out


@pytest.mark.parametrize(
    "disguise",
    [
        "flattened",
        "reshaped",
        "scaled_shifted_flipped",
        "partial",
        "int8",
        "metrics",
        "transposed",
    ],
)
def test_a_hidden_sample_is_found_and_named(raw, checker, disguise):
    sample = raw["audio"][17]  # a waveform of 2048 values
    if disguise == "flattened":
        sent = _hide(sample)
    elif disguise == "reshaped":  # rows of another width, between rows of noise
        rows = _noise(40 * 64).reshape(40, 64)
        rows[10:18] = sample.reshape(-1)[: 8 * 64].reshape(8, 64)
        sent = rows
    elif disguise == "scaled_shifted_flipped":
        sent = _hide(-0.003 * sample + 5.0)
    elif disguise == "partial":  # the shortest slice the checker promises to find
        sent = _hide(sample.ravel()[100 : 100 + checker.min_slice])
    elif disguise == "int8":
        q, _ = quantize_int8(sample.reshape(1, -1))
        sent = q
    elif disguise == "metrics":  # one value per metric key
        record = {"loss": 0.5, **{f"x{i}": float(v) for i, v in enumerate(sample.ravel())}}
        sent = numeric_values(record)
    else:
        sent = _hide(sample.T.copy())
    leak = checker.find(disguise, sent)
    assert leak is not None, f"a {disguise} sample went unnoticed"
    assert (leak.source, leak.sample) == ("audio", 17), str(leak)


def test_a_sample_of_the_other_modality_is_found_too(raw, checker):
    leak = checker.find("model", _hide(raw["imu"][3][10:30]))  # 20 time steps x 6 axes
    assert leak is not None and (leak.source, leak.sample) == ("imu", 3)


def test_assert_clean_names_the_leaking_value(raw, checker):
    with pytest.raises(AssertionError, match=r"tok\.audio\[\d+:\] matches raw audio sample 5"):
        checker.assert_clean({"ids": np.arange(9), "tok.audio": _hide(raw["audio"][5])}, "embed")

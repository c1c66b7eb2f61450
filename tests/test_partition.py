"""Sample partitions (iid / dirichlet / natural) and per-node modality plans."""

from __future__ import annotations

import numpy as np
import pytest

from fed_iotlm.data.partition import modality_plan, partition_indices

N = 400
NODES = 5
MODS = ["imu", "audio", "cam", "env"]


def labels(n: int = N, classes: int = 4) -> np.ndarray:
    y = np.arange(n) % classes
    y[::17] = -1  # some unlabelled samples must still be placed
    return y


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert allidx.dtype == np.int64
    assert np.array_equal(np.sort(allidx), np.arange(n))
    for p in parts:
        assert np.array_equal(p, np.sort(p))


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


# ----------------------------------------------------------------------------- partitions


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_cover_and_seeding(scheme: str) -> None:
    y = labels()
    first = partition_indices(NODES, scheme, seed=1, labels=y, alpha=0.5)
    assert len(first) == NODES
    assert_exact_cover(first, N)
    assert all(len(p) >= 5 for p in first)
    assert same(first, partition_indices(NODES, scheme, seed=1, labels=y, alpha=0.5))
    assert not same(first, partition_indices(NODES, scheme, seed=2, labels=y, alpha=0.5))


def test_iid_is_balanced_and_uses_natural_ids_for_n() -> None:
    parts = partition_indices(3, "iid", seed=0, natural_ids=np.zeros(10, dtype=int))
    assert_exact_cover(parts, 10)
    assert sorted(len(p) for p in parts) == [3, 3, 4]


def test_dirichlet_places_unlabelled_samples() -> None:
    y = labels()
    parts = partition_indices(NODES, "dirichlet", seed=0, labels=y)
    placed = np.concatenate(parts)
    assert set(np.flatnonzero(y == -1)) <= set(placed.tolist())


def _label_skew(parts: list[np.ndarray], y: np.ndarray) -> float:
    """Mean over nodes of the largest class share: 1/classes when balanced, 1 when pure."""
    shares = []
    for p in parts:
        hist = np.bincount(y[p] + 1, minlength=int(y.max()) + 2)
        shares.append(hist.max() / hist.sum())
    return float(np.mean(shares))


# flwr-datasets warns when it redraws a split that left a node under min_partition_size;
# with alpha=0.1 that redraw is expected, not a problem.
@pytest.mark.filterwarnings("ignore:The specified min_partition_size")
def test_dirichlet_small_alpha_skews_labels_more_than_iid() -> None:
    y = np.arange(N) % 4
    skew_iid = np.mean(
        [_label_skew(partition_indices(4, "iid", seed=s, labels=y), y) for s in range(3)]
    )
    skew_dir = np.mean(
        [
            _label_skew(partition_indices(4, "dirichlet", seed=s, labels=y, alpha=0.1), y)
            for s in range(3)
        ]
    )
    assert skew_iid < 0.35
    assert skew_dir > skew_iid + 0.2


def test_natural_one_node_per_site() -> None:
    rng = np.random.default_rng(0)
    site = rng.choice([10, 20, 30], size=90)
    parts = partition_indices(3, "natural", seed=0, natural_ids=site)
    assert_exact_cover(parts, 90)
    for part, sid in zip(parts, [10, 20, 30], strict=True):
        assert set(site[part].tolist()) == {sid}
    assert same(parts, partition_indices(3, "natural", seed=5, natural_ids=site))


def test_natural_count_mismatch() -> None:
    with pytest.raises(ValueError, match=r"3 distinct ids.*num_nodes is 4"):
        partition_indices(4, "natural", seed=0, natural_ids=np.arange(9) % 3)


@pytest.mark.parametrize(
    ("scheme", "kwargs", "needed"),
    [
        ("iid", {}, "labels or natural_ids"),
        ("dirichlet", {"natural_ids": np.zeros(20, dtype=int)}, "needs labels"),
        ("natural", {"labels": np.zeros(20, dtype=int)}, "needs natural_ids"),
        ("shards", {"labels": np.zeros(20, dtype=int)}, "unknown partition scheme"),
    ],
)
def test_partition_argument_errors(scheme: str, kwargs: dict, needed: str) -> None:
    with pytest.raises(ValueError, match=needed):
        partition_indices(2, scheme, seed=0, **kwargs)


def test_more_nodes_than_samples() -> None:
    with pytest.raises(ValueError, match="cannot split 3 samples over 4 nodes"):
        partition_indices(4, "iid", seed=0, labels=np.zeros(3, dtype=int))


# ----------------------------------------------------------------------------- modality plan


def test_explicit_plan_is_reordered_like_modalities() -> None:
    plan = modality_plan(MODS, 2, plan=[["env", "imu"], ["cam"]])
    assert plan == [["imu", "env"], ["cam"]]


@pytest.mark.parametrize(
    ("plan", "shared", "message"),
    [
        ([["imu"]], None, "plan has 1 node entries but num_nodes is 2"),
        ([["imu"], []], None, "plan node 1: holds no modality"),
        ([["imu"], ["cam", "lidar"]], None, "plan node 1: unknown modality 'lidar'"),
        ([["imu", "imu"], ["cam"]], None, "plan node 0: modality 'imu' listed more than once"),
        ([["imu", "cam"], ["cam"]], "imu", "plan node 1: lacks the shared modality 'imu'"),
        (["imu", "cam"], None, "plan node 0: expected a list"),
    ],
)
def test_explicit_plan_errors(plan: list, shared: str | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        modality_plan(MODS, 2, plan=plan, shared=shared)


def test_unknown_shared_modality() -> None:
    with pytest.raises(ValueError, match="shared modality 'lidar'"):
        modality_plan(MODS, 3, shared="lidar")


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_missing_rate_out_of_range(rate: float) -> None:
    with pytest.raises(ValueError, match="missing_rate"):
        modality_plan(MODS, 3, missing_rate=rate)


def test_zero_missing_rate_gives_everything_everywhere() -> None:
    assert modality_plan(MODS, 4, missing_rate=0.0) == [MODS] * 4


@pytest.mark.parametrize("seed", range(20))
def test_random_plan_invariants(seed: int) -> None:
    plan = modality_plan(MODS, 6, missing_rate=0.9, shared="imu", seed=seed)
    assert len(plan) == 6
    for node in plan:
        assert node and "imu" in node
        assert node == [m for m in MODS if m in node]  # ordered, no duplicates
    assert set().union(*plan) == set(MODS)  # every modality held by some node


@pytest.mark.parametrize("seed", range(20))
def test_random_plan_without_shared_never_leaves_a_node_empty(seed: int) -> None:
    plan = modality_plan(MODS, 8, missing_rate=0.95, seed=seed)
    assert all(plan)
    assert set().union(*plan) == set(MODS)


def test_random_plan_is_seeded() -> None:
    a = modality_plan(MODS, 10, missing_rate=0.5, seed=3)
    assert a == modality_plan(MODS, 10, missing_rate=0.5, seed=3)
    assert a != modality_plan(MODS, 10, missing_rate=0.5, seed=4)


def test_higher_missing_rate_drops_more() -> None:
    def mean_held(rate: float) -> float:
        sizes = [
            len(node)
            for seed in range(10)
            for node in modality_plan(MODS, 10, missing_rate=rate, seed=seed)
        ]
        return float(np.mean(sizes))

    low, mid, high = mean_held(0.1), mean_held(0.4), mean_held(0.7)
    assert len(MODS) > low > mid > high >= 1


@pytest.mark.parametrize(("n", "nodes", "seed"), [(10, 3, 0), (600, 3, 1), (1001, 8, 7), (5, 5, 2)])
def test_iid_is_flwr_datasets_iid_partitioner_split(n, nodes, seed) -> None:
    """The IID split is computed without flwr-datasets (each simulated node would import
    it): it must stay IidPartitioner's split of the same seeded permutation."""
    from datasets import Dataset
    from flwr_datasets.partitioner import IidPartitioner

    partitioner = IidPartitioner(num_partitions=nodes)
    order = np.random.default_rng(seed).permutation(n)
    partitioner.dataset = Dataset.from_dict({"idx": order.tolist()})
    want = [np.sort(np.asarray(partitioner.load_partition(i)["idx"])) for i in range(nodes)]
    got = partition_indices(nodes, "iid", seed=seed, labels=np.zeros(n, dtype=np.int64))
    assert [p.tolist() for p in got] == [w.tolist() for w in want]
    assert all(p.dtype == np.int64 for p in got)

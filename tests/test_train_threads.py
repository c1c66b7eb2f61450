"""``train.threads``: the in-process baselines train with the torch threads the config
names (as each federated node does), whatever the calling process had, and give the
caller's count back; a bad value is one error naming the key."""

from __future__ import annotations

import pytest
import torch

from fed_iotlm.config_schema import ConfigError

RUN = ("mlflow.enabled=false", "rounds=1", "train.steps=1")
MMBIND = ("partition.shared=imu", "partition.plan=[[imu,audio],[imu,depth],[imu]]")


@pytest.fixture
def caller_threads():
    """The test process runs with 2 torch threads (not 1, the default under test), and
    gets its own count back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(before)


def _observe(monkeypatch, module, name: str, seen: list[int]) -> None:
    """Replace ``module.name`` (a training call) by one that records in ``seen`` the
    torch threads it ran with."""
    real = getattr(module, name)

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)


@pytest.mark.parametrize(
    ("method", "runner", "extra", "threads"),
    [
        ("centralized", "run_centralized", (), 1),
        ("centralized", "run_centralized", (), 3),  # the key decides, not a fixed 1
        ("local", "run_local_only", (), 1),
        ("centralized_mmbind", "run_centralized_mmbind", MMBIND, 1),
    ],
)
def test_a_baseline_trains_with_train_threads_and_restores_the_callers(
    quick_cfg, tmp_path, monkeypatch, caller_threads, method, runner, extra, threads
):
    import fed_iotlm.baselines as baselines
    import fed_iotlm.binding.training as binding_training

    seen: list[int] = []
    _observe(monkeypatch, baselines, "train_local", seen)
    _observe(monkeypatch, binding_training, "train_bound", seen)  # centralized MMBind's
    cfg = quick_cfg(f"method={method}", *RUN, *extra, f"train.threads={threads}")
    getattr(baselines, runner)(cfg, tmp_path)
    assert seen and set(seen) == {threads}
    assert torch.get_num_threads() == caller_threads


def test_the_default_is_one_thread_as_a_federated_node(quick_cfg):
    from fed_iotlm.models.threads import train_threads

    assert train_threads(quick_cfg()) == 1
    assert train_threads({}) == 1  # a caller's partial dict: the schema's default


@pytest.mark.parametrize("bad", ["0", "-1", "x", "1.5"])
def test_a_bad_value_is_refused_at_composition_naming_the_key(quick_cfg, bad):
    with pytest.raises(ConfigError, match=r"train\.threads"):
        quick_cfg(f"train.threads={bad}")


@pytest.mark.parametrize("bad", [0, -1, "x", True])
def test_a_baseline_refuses_a_bad_value_before_any_work(tmp_path, caller_threads, bad):
    from fed_iotlm.baselines import run_centralized

    with pytest.raises(ConfigError, match=r"train\.threads") as err:
        run_centralized({"train": {"threads": bad}}, tmp_path)  # nothing else: fails first
    assert "\n" not in str(err.value)
    assert torch.get_num_threads() == caller_threads  # untouched
    assert not any(tmp_path.iterdir())


def test_a_federated_node_applies_the_same_key(monkeypatch):
    from fed_iotlm.models.threads import apply_threads

    before = torch.get_num_threads()
    try:
        assert apply_threads({"train": {"threads": 3}}) == 3
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)

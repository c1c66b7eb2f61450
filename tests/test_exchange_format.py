"""The exchange format loader/saver: exact round trips, and one test per malformed input.

Fixtures are written by hand (json + np.savez) so the loader is tested independently of
``save_dataset``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fed_iotlm.data.dataset import DatasetMeta, MultisensoryDataset, Split
from fed_iotlm.data.exchange import (
    DatasetFormatError,
    load_dataset,
    load_meta,
    load_split,
    save_dataset,
)
from fed_iotlm.data.modalities import UnknownKindError

N = 6


def base_meta() -> dict[str, Any]:
    return {
        "name": "toy",
        "modalities": {
            "imu": {"kind": "imu", "rate_hz": 50, "channels": ["ax", "ay", "az"]},
            "env": {"kind": "tabular", "channels": ["t", "h", "p", "l"]},
            "cam": {"kind": "image", "channels": ["gray"]},
        },
        "tasks": {"activity": {"type": "classification", "classes": ["sit", "walk", "run"]}},
    }


def base_arrays(n: int = N, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x.imu": rng.normal(size=(n, 8, 3)).astype(np.float32),
        "x.env": rng.normal(size=(n, 4)),
        "x.cam": rng.random((n, 1, 4, 4)).astype(np.float32),
        "y.activity": (np.arange(n) % 4 - 1).astype(np.int64),  # includes -1 (unlabelled)
        "site": (np.arange(n) % 2).astype(np.int64),
    }


def write_dataset(
    root: Path,
    meta: dict[str, Any] | str | None = None,
    train: dict[str, np.ndarray] | None = None,
    test: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write meta.json (a dict, or raw text) and the npz files by hand."""
    root.mkdir(parents=True, exist_ok=True)
    meta = base_meta() if meta is None else meta
    text = meta if isinstance(meta, str) else json.dumps(meta)
    (root / "meta.json").write_text(text)
    np.savez(root / "train.npz", **(base_arrays() if train is None else train))
    np.savez(root / "test.npz", **(base_arrays(seed=1) if test is None else test))
    return root


def meta_error(tmp_path: Path, meta: dict[str, Any] | str) -> str:
    root = write_dataset(tmp_path / "ds", meta=meta)
    with pytest.raises(DatasetFormatError) as info:
        load_meta(root)
    msg = str(info.value)
    assert "meta.json" in msg
    return msg


def split_error(
    tmp_path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any] | None = None
) -> str:
    root = write_dataset(tmp_path / "ds", meta=meta, train=arrays)
    with pytest.raises(DatasetFormatError) as info:
        load_split(root, load_meta(root), "train")
    msg = str(info.value)
    assert "train.npz" in msg
    return msg


def with_modality(**fields: Any) -> dict[str, Any]:
    meta = base_meta()
    meta["modalities"]["imu"].update(fields)
    return meta


def with_task(**fields: Any) -> dict[str, Any]:
    meta = base_meta()
    meta["tasks"]["activity"].update(fields)
    return meta


def assert_splits_equal(a: Split, b: Split) -> None:
    assert list(a.x) == list(b.x) and list(a.y) == list(b.y)
    for m in a.x:
        np.testing.assert_array_equal(a.x[m], b.x[m])
        np.testing.assert_array_equal(a.mask[m], b.mask[m])
        assert b.x[m].dtype == np.float32 and b.mask[m].dtype == np.bool_
    for t in a.y:
        np.testing.assert_array_equal(a.y[t], b.y[t])
        assert b.y[t].dtype == np.int64
    for key in ("site", "subject"):
        va, vb = getattr(a, key), getattr(b, key)
        assert (va is None) == (vb is None)
        if va is not None:
            np.testing.assert_array_equal(va, vb)


# ------------------------------------------------------------------------------ good input


def test_load_hand_written_dataset(tmp_path: Path) -> None:
    ds = load_dataset(write_dataset(tmp_path / "ds"))
    assert ds.meta.name == "toy"
    assert list(ds.meta.modalities) == ["imu", "env", "cam"]
    assert ds.meta.modalities["imu"].channels == ("ax", "ay", "az")
    assert ds.meta.modalities["imu"].rate_hz == 50.0
    assert ds.meta.tasks["activity"].classes == ("sit", "walk", "run")
    assert len(ds.train) == N and len(ds.test) == N
    assert ds.train.x["env"].dtype == np.float32  # float64 on disk
    assert ds.train.y["activity"].dtype == np.int64
    assert ds.train.site is not None and ds.train.subject is None
    assert all(m.all() for m in ds.train.mask.values())
    np.testing.assert_allclose(ds.train.x["env"], base_arrays()["x.env"].astype(np.float32))


def test_round_trip_is_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    meta = load_meta(write_dataset(tmp_path / "src"))
    mask_imu = np.array([True, False, True, True, False, True])
    mask_cam = np.array([False, True, True, False, True, True])

    def split(seed: int) -> Split:
        x = {
            "imu": rng.normal(size=(N, 8, 3)).astype(np.float32) * mask_imu[:, None, None],
            "env": rng.normal(size=(N, 4)).astype(np.float32),
            "cam": rng.random((N, 1, 4, 4)).astype(np.float32) * mask_cam[:, None, None, None],
        }
        mask = {"imu": mask_imu, "env": np.ones(N, dtype=bool), "cam": mask_cam}
        y = {"activity": np.array([0, 1, 2, -1, 1, 0], dtype=np.int64)}
        return Split(x=x, mask=mask, y=y, site=np.arange(N) % 3, subject=np.arange(N) + seed)

    ds = MultisensoryDataset(meta=meta, train=split(0), test=split(10))
    out = save_dataset(ds, tmp_path / "saved")
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.npz", "train.npz"]
    loaded = load_dataset(out)
    assert loaded.meta == ds.meta
    assert_splits_equal(ds.train, loaded.train)
    assert_splits_equal(ds.test, loaded.test)
    with np.load(out / "train.npz") as raw:  # missing samples are NaN on disk
        assert np.isnan(raw["x.imu"][~mask_imu]).all()
    # and a second round trip through the loader's own output is exact too
    again = load_dataset(save_dataset(loaded, tmp_path / "again"))
    assert_splits_equal(loaded.train, again.train)


def test_all_nan_sample_is_missing_and_zero_filled(tmp_path: Path) -> None:
    arrays = base_arrays()
    arrays["x.imu"][2] = np.nan
    root = write_dataset(tmp_path / "ds", train=arrays)
    split = load_split(root, load_meta(root), "train")
    assert split.mask["imu"].tolist() == [True, True, False, True, True, True]
    assert np.all(split.x["imu"][2] == 0.0)
    assert np.isfinite(split.x["imu"]).all()
    np.testing.assert_array_equal(split.x["imu"][3], arrays["x.imu"][3])


def test_masked_out_sample_is_zero_filled_even_with_partial_nan(tmp_path: Path) -> None:
    arrays = base_arrays()
    arrays["x.env"][1, 0] = np.nan  # a stray NaN is fine where the mask says "missing"
    arrays["mask.env"] = np.array([1, 0, 1, 1, 1, 1], dtype=np.int8)  # 0/1 ints accepted
    root = write_dataset(tmp_path / "ds", train=arrays)
    split = load_split(root, load_meta(root), "train")
    assert split.mask["env"].dtype == np.bool_
    assert split.mask["env"].tolist() == [True, False, True, True, True, True]
    assert np.all(split.x["env"][1] == 0.0)


def test_integer_values_are_cast_to_float32(tmp_path: Path) -> None:
    arrays = base_arrays()
    arrays["x.env"] = np.arange(N * 4, dtype=np.int32).reshape(N, 4)
    root = write_dataset(tmp_path / "ds", train=arrays)
    split = load_split(root, load_meta(root), "train")
    assert split.x["env"].dtype == np.float32
    np.testing.assert_array_equal(split.x["env"], arrays["x.env"])


# ---------------------------------------------------------------------------- bad meta.json


def test_meta_missing_file(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    with pytest.raises(DatasetFormatError, match=r"meta\.json.*not found"):
        load_meta(tmp_path / "ds")


def test_meta_invalid_json(tmp_path: Path) -> None:
    assert "invalid JSON" in meta_error(tmp_path, '{"name": "toy",')


def test_meta_missing_name(tmp_path: Path) -> None:
    meta = base_meta()
    del meta["name"]
    msg = meta_error(tmp_path, meta)
    assert "'name'" in msg and "missing" in msg


def test_meta_name_not_string(tmp_path: Path) -> None:
    msg = meta_error(tmp_path, {**base_meta(), "name": 3})
    assert "'name'" in msg and "string" in msg


def test_meta_missing_modalities(tmp_path: Path) -> None:
    meta = base_meta()
    del meta["modalities"]
    msg = meta_error(tmp_path, meta)
    assert "'modalities'" in msg and "missing" in msg


def test_meta_modalities_not_object(tmp_path: Path) -> None:
    msg = meta_error(tmp_path, {**base_meta(), "modalities": ["imu"]})
    assert "'modalities'" in msg and "expected" in msg and "list" in msg


def test_meta_missing_tasks(tmp_path: Path) -> None:
    meta = base_meta()
    del meta["tasks"]
    msg = meta_error(tmp_path, meta)
    assert "'tasks'" in msg and "missing" in msg


def test_meta_tasks_not_object(tmp_path: Path) -> None:
    msg = meta_error(tmp_path, {**base_meta(), "tasks": "activity"})
    assert "'tasks'" in msg and "expected" in msg


def test_meta_unknown_kind(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds", meta=with_modality(kind="lidar"))
    with pytest.raises(UnknownKindError) as info:  # also a DatasetFormatError
        load_meta(root)
    assert isinstance(info.value, DatasetFormatError)
    msg = str(info.value)
    assert "meta.json" in msg and "modalities.imu.kind" in msg and "unknown" in msg


def test_meta_unknown_modality_field(tmp_path: Path) -> None:
    msg = meta_error(tmp_path, with_modality(chanels=["ax"]))
    assert "modalities.imu" in msg and "chanels" in msg and "unknown" in msg


def test_meta_task_type_not_classification(tmp_path: Path) -> None:
    msg = meta_error(tmp_path, with_task(type="regression"))
    assert "tasks.activity.type" in msg and "regression" in msg


def test_meta_empty_classes(tmp_path: Path) -> None:
    msg = meta_error(tmp_path, with_task(classes=[]))
    assert "tasks.activity.classes" in msg and "empty" in msg


def test_meta_non_string_classes(tmp_path: Path) -> None:
    msg = meta_error(tmp_path, with_task(classes=["sit", 1]))
    assert "tasks.activity.classes" in msg and "string" in msg


def test_meta_duplicate_classes(tmp_path: Path) -> None:
    msg = meta_error(tmp_path, with_task(classes=["sit", "walk", "sit"]))
    assert "tasks.activity.classes" in msg and "duplicate" in msg and "sit" in msg


def test_a_task_title_is_read_and_written_back(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds", meta=with_task(title="  kind of movement "))
    meta = load_meta(root)
    assert meta.tasks["activity"].title == "kind of movement"  # what questions call it
    assert meta.to_json()["tasks"]["activity"]["title"] == "kind of movement"
    untitled = load_meta(write_dataset(tmp_path / "plain"))
    assert untitled.tasks["activity"].title == "activity"  # absent: the name in words
    assert "title" not in untitled.to_json()["tasks"]["activity"]


@pytest.mark.parametrize("title", ["", "   ", 3, None, ["a"]])
def test_meta_task_title_not_a_non_empty_string(tmp_path: Path, title: Any) -> None:
    meta = with_task()
    meta["tasks"]["activity"]["title"] = title  # None too: present, so it must be a string
    msg = meta_error(tmp_path, meta)
    assert "tasks.activity.title" in msg and "non-empty string" in msg


def test_meta_task_title_naming_a_class(tmp_path: Path) -> None:
    msg = meta_error(tmp_path, with_task(title="sit or walk"))
    assert "tasks.activity.title" in msg and "sit" in msg and "class" in msg


def test_meta_channels_not_list_of_strings(tmp_path: Path) -> None:
    msg = meta_error(tmp_path, with_modality(channels=["ax", 2, "az"]))
    assert "modalities.imu.channels" in msg and "list of non-empty strings" in msg


@pytest.mark.parametrize("rate", [0, -50, "50", True, None])
def test_meta_rate_not_positive_number(tmp_path: Path, rate: Any) -> None:
    if rate is None:  # null is "unknown rate": allowed
        root = write_dataset(tmp_path / "ds", meta=with_modality(rate_hz=None))
        assert load_meta(root).modalities["imu"].rate_hz is None
        return
    msg = meta_error(tmp_path, with_modality(rate_hz=rate))
    assert "modalities.imu.rate_hz" in msg and "positive number" in msg


# ---------------------------------------------------------------------------- bad <split>.npz


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DatasetFormatError, match=r"nowhere.*directory not found"):
        load_dataset(tmp_path / "nowhere")


def test_missing_split_file(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds")
    (root / "test.npz").unlink()
    with pytest.raises(DatasetFormatError, match=r"test\.npz.*not found"):
        load_dataset(root)


def test_missing_x_key(tmp_path: Path) -> None:
    arrays = base_arrays()
    del arrays["x.cam"]
    msg = split_error(tmp_path, arrays)
    assert "'x.cam'" in msg and "missing" in msg


def test_missing_y_key(tmp_path: Path) -> None:
    arrays = base_arrays()
    del arrays["y.activity"]
    msg = split_error(tmp_path, arrays)
    assert "'y.activity'" in msg and "missing" in msg


def test_unknown_key(tmp_path: Path) -> None:
    msg = split_error(tmp_path, {**base_arrays(), "x.gyro": np.zeros((N, 8, 3))})
    assert "'x.gyro'" in msg and "unexpected" in msg


@pytest.mark.parametrize(
    "values",
    [
        np.ones((N, 4), dtype=bool),
        np.full((N, 4), "a"),
        np.ones((N, 4), dtype=np.complex64),
    ],
    ids=["bool", "str", "complex"],
)
def test_x_non_numeric_dtype(tmp_path: Path, values: np.ndarray) -> None:
    msg = split_error(tmp_path, {**base_arrays(), "x.env": values})
    assert "'x.env'" in msg and "numeric" in msg and str(values.dtype) in msg


def test_x_object_dtype(tmp_path: Path) -> None:
    values = np.empty((N, 4), dtype=object)
    values[:] = 1.0
    msg = split_error(tmp_path, {**base_arrays(), "x.env": values})
    assert "'x.env'" in msg and "object" in msg


def test_x_wrong_rank(tmp_path: Path) -> None:
    msg = split_error(tmp_path, {**base_arrays(), "x.imu": np.zeros((N, 50))})
    assert "'x.imu'" in msg
    assert "expected rank 3 [N, T, C] for kind 'imu', got shape (6, 50)" in msg


@pytest.mark.parametrize(
    ("key", "values"),
    [
        ("x.imu", np.zeros((N, 8, 2))),
        ("x.env", np.zeros((N, 5))),
        ("x.cam", np.zeros((N, 3, 4, 4))),
    ],
    ids=["sequence", "tabular", "image"],
)
def test_x_channel_count_mismatch(tmp_path: Path, key: str, values: np.ndarray) -> None:
    msg = split_error(tmp_path, {**base_arrays(), key: values})
    assert f"'{key}'" in msg and "channels" in msg


def test_n_mismatch(tmp_path: Path) -> None:
    msg = split_error(tmp_path, {**base_arrays(), "y.activity": np.zeros(N + 3, dtype=np.int64)})
    assert "'y.activity'" in msg and "N=9" in msg and "N=6" in msg


def test_nan_inside_present_sample(tmp_path: Path) -> None:
    arrays = base_arrays()
    arrays["x.imu"][4, 3, 1] = np.nan
    msg = split_error(tmp_path, arrays)
    assert "'x.imu'" in msg and "NaN" in msg and "sample 4" in msg


def test_inf_inside_present_sample(tmp_path: Path) -> None:
    arrays = base_arrays()
    arrays["x.env"][3, 0] = -np.inf
    arrays["x.env"][5, 0] = np.inf
    msg = split_error(tmp_path, arrays)
    assert "'x.env'" in msg and "Inf" in msg and "sample 3" in msg


def test_mask_wrong_dtype(tmp_path: Path) -> None:
    msg = split_error(tmp_path, {**base_arrays(), "mask.imu": np.ones(N, dtype=np.float32)})
    assert "'mask.imu'" in msg and "bool" in msg


def test_mask_integer_not_zero_one(tmp_path: Path) -> None:
    msg = split_error(tmp_path, {**base_arrays(), "mask.imu": np.array([1, 1, 2, 0, 1, 1])})
    assert "'mask.imu'" in msg and "0/1" in msg and "sample 2" in msg


def test_mask_wrong_shape(tmp_path: Path) -> None:
    msg = split_error(tmp_path, {**base_arrays(), "mask.imu": np.ones((N, 1), dtype=bool)})
    assert "'mask.imu'" in msg and "shape" in msg


def test_mask_true_but_all_nan(tmp_path: Path) -> None:
    arrays = {**base_arrays(), "mask.imu": np.ones(N, dtype=bool)}
    arrays["x.imu"][1] = np.nan
    msg = split_error(tmp_path, arrays)
    assert "'x.imu'" in msg and "all NaN" in msg and "sample 1" in msg


def test_labels_not_integer(tmp_path: Path) -> None:
    msg = split_error(tmp_path, {**base_arrays(), "y.activity": np.zeros(N, dtype=np.float32)})
    assert "'y.activity'" in msg and "integer" in msg


def test_labels_wrong_shape(tmp_path: Path) -> None:
    msg = split_error(tmp_path, {**base_arrays(), "y.activity": np.zeros((N, 2), dtype=int)})
    assert "'y.activity'" in msg and "shape" in msg


@pytest.mark.parametrize(("bad", "index"), [(3, 2), (-2, 4)])
def test_labels_out_of_range(tmp_path: Path, bad: int, index: int) -> None:
    labels = np.zeros(N, dtype=np.int64)
    labels[index] = bad
    msg = split_error(tmp_path, {**base_arrays(), "y.activity": labels})
    assert "'y.activity'" in msg and "out of range" in msg
    assert f"label {bad} at sample {index}" in msg


def test_site_not_integer(tmp_path: Path) -> None:
    msg = split_error(tmp_path, {**base_arrays(), "site": np.zeros(N, dtype=np.float64)})
    assert "'site'" in msg and "integer" in msg


def test_subject_wrong_shape(tmp_path: Path) -> None:
    msg = split_error(tmp_path, {**base_arrays(), "subject": np.zeros((N, 2), dtype=int)})
    assert "'subject'" in msg and "shape" in msg


def test_sample_with_no_present_modality(tmp_path: Path) -> None:
    arrays = base_arrays()
    arrays["x.imu"][[1, 4]] = np.nan
    arrays["x.env"][[1, 4]] = np.nan
    arrays["mask.cam"] = np.array([True, False, True, True, False, True])
    msg = split_error(tmp_path, arrays)
    assert "2 sample(s) have no present modality" in msg and "sample 1" in msg


# ------------------------------------------------------------------------------- atomic save


def _fail_on_second_savez(monkeypatch: pytest.MonkeyPatch) -> None:
    """np.savez writes train.npz, then 'the disk fills up' on test.npz."""
    real = np.savez
    calls = {"n": 0}

    def flaky(file: Any, *args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("No space left on device")
        real(file, *args, **kwargs)

    monkeypatch.setattr(np, "savez", flaky)


def test_failed_save_leaves_no_partial_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = load_dataset(write_dataset(tmp_path / "src"))
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    _fail_on_second_savez(monkeypatch)
    with pytest.raises(OSError, match="No space"):
        save_dataset(ds, out_parent / "saved")
    assert list(out_parent.iterdir()) == []


def test_failed_save_keeps_existing_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = load_dataset(write_dataset(tmp_path / "src"))
    target = save_dataset(original, tmp_path / "out" / "saved")
    other = load_dataset(write_dataset(tmp_path / "other", train=base_arrays(seed=7)))
    _fail_on_second_savez(monkeypatch)
    with pytest.raises(OSError):
        save_dataset(other, target)
    assert [p.name for p in target.parent.iterdir()] == ["saved"]
    assert_splits_equal(original.train, load_dataset(target).train)


def test_save_replaces_existing_dataset(tmp_path: Path) -> None:
    first = load_dataset(write_dataset(tmp_path / "a"))
    second = load_dataset(write_dataset(tmp_path / "b", train=base_arrays(seed=9)))
    target = save_dataset(first, tmp_path / "out" / "saved")
    save_dataset(second, target)
    assert [p.name for p in target.parent.iterdir()] == ["saved"]
    assert_splits_equal(second.train, load_dataset(target).train)


def test_save_refuses_to_replace_foreign_directory(tmp_path: Path) -> None:
    ds = load_dataset(write_dataset(tmp_path / "src"))
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="notes.txt"):
        save_dataset(ds, target)
    assert (target / "notes.txt").read_text() == "keep me"


def test_save_refuses_to_drop_extra_arrays(tmp_path: Path) -> None:
    ds = load_dataset(write_dataset(tmp_path / "src"))
    ds.train.extra["weights"] = np.ones(N)
    with pytest.raises(ValueError, match="weights"):
        save_dataset(ds, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_meta_json_round_trip(tmp_path: Path) -> None:
    meta = load_meta(write_dataset(tmp_path / "ds"))
    assert isinstance(meta, DatasetMeta)
    root = write_dataset(tmp_path / "again", meta=meta.to_json())
    assert load_meta(root) == meta

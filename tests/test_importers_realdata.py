"""ExtraSensory and UCI HAPT importers on small fixtures the tests write in each
release layout (the real folders under shared/data are never read here)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from fed_iotlm.cli import main
from fed_iotlm.data.exchange import load_dataset, load_split
from fed_iotlm.data.importers.common import SourceFormatError
from fed_iotlm.data.importers.extrasensory import BLOCKS, TASKS, import_extrasensory
from fed_iotlm.data.importers.hapt import UCI_HAR_TEST_VOLUNTEERS, import_hapt
from fed_iotlm.data.importers.splits import by_group, chronological

# ---------------------------------------------------------------------------- ExtraSensory

LABEL_COLUMNS = sorted({col for pairs in TASKS.values() for _, col in pairs} | {"SLEEPING"})
HEADER = (
    ["timestamp"]
    + [f"{b}:f{i}" for b in BLOCKS for i in range(2)]
    + [f"label:{c}" for c in LABEL_COLUMNS]
    + ["label_source"]
)
T0 = 1_444_000_000


def es_table(n: int, user: int) -> tuple[np.ndarray, np.ndarray]:
    """n minutes of one user: features = user*1000 + minute (so rows are traceable),
    one-hot labels cycling through the main activities, ``indoors`` always."""
    times = T0 + 60 * np.arange(n, dtype=np.int64)
    times[n // 2 :] += 3600  # the user took a break of an hour
    feats = np.repeat((user * 1000 + np.arange(n, dtype=np.float64))[:, None], 2 * len(BLOCKS), 1)
    labels = np.full((n, len(LABEL_COLUMNS)), np.nan)
    main = [col for _, col in TASKS["main_activity"]]
    for i in range(n):
        labels[i, LABEL_COLUMNS.index(main[i % len(main)])] = 1.0
    labels[:, LABEL_COLUMNS.index("OR_indoors")] = 1.0
    return times, np.concatenate([feats, labels], axis=1)


def write_es_user(path: Path, times: np.ndarray, values: np.ndarray) -> None:
    """One ``<UUID>.features_labels.csv.gz`` with NaN written as an empty field."""
    lines = [",".join(HEADER)]
    for t, row in zip(times, values, strict=True):
        fields = [str(int(t))] + ["" if np.isnan(v) else repr(float(v)) for v in row] + ["2"]
        lines.append(",".join(fields))
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(lines) + "\n")


def col(block: str, i: int = 0) -> int:
    """Column of ``block:f<i>`` in the values (timestamp excluded)."""
    return HEADER.index(f"{block}:f{i}") - 1


def write_es(root: Path, n: int = 60) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for user, uuid in enumerate(["0A-11", "1B-22"]):
        times, values = es_table(n, user)
        w0, w1 = col("watch_acceleration"), col("watch_acceleration", 1)
        values[::3, w0 : w1 + 1] = np.nan  # the watch is off every third minute
        values[5, col("location", 1)] = np.nan  # a location fix without one feature
        write_es_user(root / f"{uuid}.features_labels.csv.gz", times, values)


def test_extrasensory_blocks_masks_tasks_and_users(tmp_path):
    write_es(tmp_path / "es")
    result = import_extrasensory(tmp_path / "es", tmp_path / "out", gap_minutes=0)
    ds = load_dataset(tmp_path / "out")
    val = load_split(tmp_path / "out", ds.meta, "val")
    assert list(ds.meta.modalities) == list(BLOCKS)
    assert all(s.kind == "tabular" for s in ds.meta.modalities.values())
    assert ds.meta.modalities["raw_acc"].channels == ("f0", "f1")
    assert ds.meta.tasks["main_activity"].classes == (
        "lying",
        "sitting",
        "standing",
        "walking",
        "running",
        "bicycling",
    )
    train = ds.train
    minute = (train.x["raw_acc"][:, 0] % 1000).astype(int)
    user = (train.x["raw_acc"][:, 0] // 1000).astype(int)
    np.testing.assert_array_equal(train.site, user)
    np.testing.assert_array_equal(train.subject, user)
    # the watch block is missing exactly on the minutes where it was empty
    np.testing.assert_array_equal(train.mask["watch_acceleration"], minute % 3 != 0)
    assert train.mask["raw_acc"].all()
    # exactly one main activity reported -> its class
    np.testing.assert_array_equal(train.y["main_activity"], minute % 6)
    assert (train.y["indoors"] == 0).all() and (train.y["phone_position"] == -1).all()
    # a present block with one empty feature takes that feature's training mean
    loc = train.x["location"]
    hole = (minute == 5) & (user == 0)
    assert hole.sum() == 1
    others = train.mask["location"] & ~hole
    np.testing.assert_allclose(loc[hole, 1], loc[others, 1].mean(), rtol=1e-5)
    assert "location: 2 empty value(s)" in result.summary()  # one per user
    assert len(val) > 0 and "val" in result.summary()


def test_extrasensory_sitting_and_walking_at_once_is_unlabelled(tmp_path):
    root = tmp_path / "es"
    root.mkdir()
    times, values = es_table(20, 0)
    walking = HEADER.index("label:FIX_walking") - 1
    sitting = HEADER.index("label:SITTING") - 1
    values[3, walking] = 1.0
    values[3, sitting] = 1.0  # two main activities in one minute
    values[4, [HEADER.index(f"label:{c}") - 1 for _, c in TASKS["main_activity"]]] = 0.0
    write_es_user(root / "0A-11.features_labels.csv.gz", times, values)
    import_extrasensory(root, tmp_path / "out", val_fraction=0.0, test_fraction=0.1)
    ds = load_dataset(tmp_path / "out")
    minute = (ds.train.x["raw_acc"][:, 0] % 1000).astype(int)
    y = ds.train.y["main_activity"]
    assert y[minute == 3] == -1  # several
    assert y[minute == 4] == -1  # none (all reported 0)
    assert y[minute == 2] == 2


def test_extrasensory_split_in_time_order_with_a_gap(tmp_path):
    write_es(tmp_path / "es", n=120)
    import_extrasensory(tmp_path / "es", tmp_path / "out", gap_minutes=5)
    ds = load_dataset(tmp_path / "out")
    val = load_split(tmp_path / "out", ds.meta, "val")
    for user in (0, 1):
        parts = [s.x["raw_acc"][s.site == user, 0] % 1000 for s in (ds.train, val, ds.test)]
        assert all(p.size for p in parts), "every user is in every split"
        # in time order: train minutes before val minutes before test minutes
        assert parts[0].max() < parts[1].min() and parts[1].max() < parts[2].min()
        # no val or test minute within 5 minutes after the block before it
        times = T0 + 60 * np.arange(120) + np.where(np.arange(120) >= 60, 3600, 0)
        for before, after in ((parts[0], parts[1]), (parts[1], parts[2])):
            gap = times[after.astype(int)].min() - times[before.astype(int)].max()
            assert gap >= 5 * 60


def test_chronological_drops_neighbours_of_the_previous_block():
    times = np.arange(10) * 60.0
    side = chronological(times, (0.6, 0.2, 0.2), gap=120.0)
    # train 0-5; val 6,7 with 6 (60 s after 5) dropped; test 8,9 with 8 dropped
    np.testing.assert_array_equal(side, [0, 0, 0, 0, 0, 0, -1, 1, -1, 2])


def test_by_group_reaches_the_shares_with_whole_groups():
    sizes = np.full(20, 10)
    side = by_group(sizes, (0.6, 0.2, 0.2), seed=0)
    np.testing.assert_array_equal(np.bincount(side, minlength=3), [12, 4, 4])
    assert (by_group(sizes, (0.8, 0.2, 0.0), seed=1) != 2).all()


def test_extrasensory_bad_sources_name_file_and_problem(tmp_path):
    with pytest.raises(SourceFormatError, match="source directory not found"):
        import_extrasensory(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceFormatError, match="no <UUID>.features_labels.csv.gz"):
        import_extrasensory(tmp_path / "empty", tmp_path / "out")

    root = tmp_path / "es"
    root.mkdir()
    times, values = es_table(12, 0)
    path = root / "0A-11.features_labels.csv.gz"

    bad = values.copy()
    bad[4, HEADER.index("label:OR_outside") - 1] = 2.0
    write_es_user(path, times, bad)
    with pytest.raises(SourceFormatError, match=r"0A-11.*line 6: label:OR_outside is 2"):
        import_extrasensory(root, tmp_path / "out")

    write_es_user(path, times, values)
    with gzip.open(path, "rt") as fh:
        text = fh.read().splitlines()
    text[3] = text[3].replace(",", ",abc,", 1)  # a word where a number belongs
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(text) + "\n")
    with pytest.raises(SourceFormatError, match=r"0A-11.*malformed row.*file line 4"):
        import_extrasensory(root, tmp_path / "out")

    text[3] = ",".join(text[3].split(",")[:-3])  # a short row
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(text) + "\n")
    with pytest.raises(SourceFormatError, match=r"0A-11.*malformed row"):
        import_extrasensory(root, tmp_path / "out")

    with gzip.open(path, "wt") as fh:  # a block missing from the header
        fh.write(",".join(h for h in HEADER if not h.startswith("audio_naive")) + "\n1,2\n")
    with pytest.raises(
        SourceFormatError, match=r"no columns for sensor block\(s\) \['audio_naive'\]"
    ):
        import_extrasensory(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


# ----------------------------------------------------------------------------------- HAPT

ROWS = 1280
# (activity, start, end) per experiment: walking, a transition, sitting, walking again,
# standing; rows 1100.. are unlabelled
SEGMENTS = [(1, 0, 383), (7, 384, 575), (4, 576, 831), (1, 832, 959), (5, 960, 1099)]


def write_hapt(root: Path, users: tuple[int, ...] = (1, 2, 3)) -> Path:
    """RawData/ with one experiment per user; acc x = experiment*10000 + row so a
    window's rows can be read off its values."""
    raw = root / "RawData"
    raw.mkdir(parents=True)
    lines = []
    for exp, user in enumerate(users, start=1):
        rows = np.arange(ROWS, dtype=np.float64)
        acc = np.stack([exp * 10000 + rows, np.zeros(ROWS), np.ones(ROWS)], axis=1)
        gyro = np.stack([rows, -rows, np.zeros(ROWS)], axis=1) * 1e-3
        np.savetxt(raw / f"acc_exp{exp:02d}_user{user:02d}.txt", acc, fmt="%.8f")
        np.savetxt(raw / f"gyro_exp{exp:02d}_user{user:02d}.txt", gyro, fmt="%.8f")
        lines += [f"{exp} {user} {a} {s} {e}" for a, s, e in SEGMENTS]
    (raw / "labels.txt").write_text("\n".join(lines) + "\n")
    return raw


def window_rows(split) -> tuple[np.ndarray, np.ndarray]:
    """(experiment, first row) of every window of a split."""
    first = split.x["acc"][:, 0, 0].astype(np.int64)
    return first // 10000, first % 10000


def test_hapt_windows_labels_and_volunteer_split(tmp_path):
    write_hapt(tmp_path / "hapt")
    result = import_hapt(tmp_path / "hapt", tmp_path / "out")
    ds = load_dataset(tmp_path / "out")
    val = load_split(tmp_path / "out", ds.meta, "val")
    assert ds.meta.tasks["activity"].classes[:2] == ("walking", "walking_upstairs")
    assert ds.meta.tasks["activity"].num_classes == 6
    assert ds.train.x["acc"].shape[1:] == (128, 3) and ds.train.x["gyro"].shape[1:] == (128, 3)
    # UCI-HAR's volunteer 2 is test only; 1 and 3 train and val
    assert set(ds.test.site) == {2} and set(ds.train.site) == {1, 3} == set(val.site)
    # test: every window of the experiment, stride 64, 128 rows each
    exp, start = window_rows(ds.test)
    np.testing.assert_array_equal(np.sort(start), np.arange(0, ROWS - 127, 64))
    np.testing.assert_array_equal(
        ds.test.x["acc"][0, :, 0] - ds.test.x["acc"][0, 0, 0], np.arange(128)
    )
    # a window takes the activity covering it; no single segment or a transition -> -1
    y = ds.test.y["activity"]
    for s, label in zip(start, y, strict=True):
        covering = [a for a, lo, hi in SEGMENTS if lo <= s and s + 127 <= hi]
        want = covering[0] - 1 if covering and covering[0] <= 6 else -1
        assert label == want, (s, label, want)
    assert "window(s) of a transition" in result.summary()


def test_hapt_val_windows_never_overlap_training_windows(tmp_path):
    write_hapt(tmp_path / "hapt", users=(1, 3, 5, 6))
    import_hapt(tmp_path / "hapt", tmp_path / "out", val_fraction=0.3)
    ds = load_dataset(tmp_path / "out")
    val = load_split(tmp_path / "out", ds.meta, "val")
    assert len(val) > 0
    tr_exp, tr_start = window_rows(ds.train)
    va_exp, va_start = window_rows(val)
    for e, s in zip(va_exp, va_start, strict=True):
        same = tr_start[tr_exp == e]
        assert (np.abs(same - s) >= 128).all(), f"val window {e}:{s} shares rows with train"
    assert (val.y["activity"] >= 0).all()  # val holds whole labelled segments only


def test_hapt_within_split_and_all_activities(tmp_path):
    write_hapt(tmp_path / "hapt", users=(2, 4, 7))
    import_hapt(
        tmp_path / "hapt",
        tmp_path / "out",
        split="within",
        all_activities=True,
        val_fraction=0.2,
        test_fraction=0.2,
        drop_unlabelled=True,
    )
    ds = load_dataset(tmp_path / "out")
    val = load_split(tmp_path / "out", ds.meta, "val")
    assert ds.meta.tasks["activity"].num_classes == 12
    for part in (ds.train, val, ds.test):
        assert set(part.site) == {2, 4, 7}  # every volunteer everywhere
        assert (part.y["activity"] >= 0).all()  # --drop-unlabelled
    labels = np.concatenate([p.y["activity"] for p in (ds.train, val, ds.test)])
    assert 6 in labels  # stand-to-sit is a class of its own now


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda raw: (raw / "gyro_exp02_user02.txt").unlink(), r"gyro_exp02_user02.txt: file not"),
        (lambda raw: (raw / "labels.txt").unlink(), r"labels.txt not found"),
        (
            lambda raw: _append(raw / "labels.txt", "1 1 x 0 10"),
            r"labels.txt: line 16: expected 5 whole numbers",
        ),
        (
            lambda raw: _append(raw / "labels.txt", "1 1 13 1200 1210"),
            r"labels.txt: line 16: activity 13 is out of range 1..12",
        ),
        (
            lambda raw: _append(raw / "labels.txt", "9 9 1 0 10"),
            r"line 16: experiment 9 of user 9 has no recording",
        ),
        (
            lambda raw: _append(raw / "labels.txt", "1 1 1 1200 1300"),
            r"line 16: segment ends at row 1300 but acc_exp01_user01.txt has 1280 rows",
        ),
        (
            lambda raw: _append(raw / "acc_exp03_user03.txt", "0.1 0.2"),
            r"acc_exp03_user03.txt: malformed row",
        ),
        (
            lambda raw: _append(raw / "acc_exp03_user03.txt", "0.1 0.2 nan"),
            r"acc_exp03_user03.txt: line 1281: value is not a finite number",
        ),
    ],
)
def test_hapt_bad_sources_name_file_and_problem(tmp_path, mutate, message):
    raw = write_hapt(tmp_path / "hapt")
    mutate(raw)
    with pytest.raises(SourceFormatError, match=message):
        import_hapt(tmp_path / "hapt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _append(path: Path, line: str) -> None:
    with open(path, "a") as fh:
        fh.write(line + "\n")


def test_cli_imports_both_layouts_and_reports_errors(tmp_path, capsys):
    write_hapt(tmp_path / "hapt")
    write_es(tmp_path / "es")
    assert main(["import", "hapt", str(tmp_path / "hapt"), str(tmp_path / "h")]) == 0
    assert main(["import", "extrasensory", str(tmp_path / "es"), str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert "imported 'hapt'" in out and "imported 'extrasensory'" in out and "val " in out
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == [
        "meta.json",
        "test.npz",
        "train.npz",
        "val.npz",
    ]
    # importing again replaces the dataset (val.npz included) in place
    assert main(["import", "hapt", str(tmp_path / "hapt"), str(tmp_path / "h"), "--seed", "1"]) == 0
    assert main(["import", "hapt", str(tmp_path / "nowhere"), str(tmp_path / "h2")]) == 2
    assert "fed-iotlm import hapt: error:" in capsys.readouterr().err
    assert set(UCI_HAR_TEST_VOLUNTEERS) == {2, 4, 9, 10, 12, 13, 18, 20, 24}

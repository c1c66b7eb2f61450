"""Importers (fed_iotlm/data/importers): small fixture files in each release layout,
written here with numpy, go through ``import_*`` / ``fed-iotlm import`` into a
directory that the validated loader accepts; bad sources name the file and problem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fed_iotlm.cli import main
from fed_iotlm.data.exchange import load_dataset
from fed_iotlm.data.importers.common import SourceFormatError
from fed_iotlm.data.importers.multiiot import import_multiiot
from fed_iotlm.data.importers.pamap2 import ACTIVITIES, WindowConfig, import_pamap2
from fed_iotlm.data.importers.uea import import_uea

# ------------------------------------------------------------------------------ MultiIoT


def write_samosa(root: Path, n_train: int = 30, n_test: int = 10, t: int = 16) -> None:
    """SAMoSA-like: imu [N, T, 6] and audio [N, L, 1]; labels 1..3 at the root, the two
    splits spelt differently (both spellings occur in releases)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        (root / "imu").mkdir(parents=True, exist_ok=True)
        (root / "audio").mkdir(exist_ok=True)
        np.save(root / "imu" / f"{split}_data.npy", rng.normal(size=(n, t, 6)))
        audio = rng.normal(size=(n, 64, 1)).astype(np.float32)
        audio[0] = np.nan  # one lost recording: missing, not an error
        np.save(root / "audio" / f"{split}_data.npy", audio)
    np.save(root / "train_label.npy", np.arange(n_train) % 3 + 1)
    np.save(root / "test_labels.npy", np.arange(n_test) % 3 + 1)


def test_multiiot_samosa_layout(tmp_path):
    write_samosa(tmp_path / "samosa")
    result = import_multiiot(tmp_path / "samosa", tmp_path / "out")
    ds = load_dataset(tmp_path / "out")
    assert ds.meta.name == "samosa"
    assert {m: s.kind for m, s in ds.meta.modalities.items()} == {"audio": "audio", "imu": "imu"}
    assert ds.train.x["imu"].shape == (30, 16, 6) and ds.test.x["audio"].shape == (10, 64)
    assert ds.meta.tasks["label"].classes == ("1", "2", "3")
    np.testing.assert_array_equal(ds.train.y["label"], np.arange(30) % 3)
    assert not ds.train.mask["audio"][0] and ds.train.mask["audio"][1:].all()
    assert "train 30, test 10" in result.summary()


def test_multiiot_touchpose_layout_labels_in_modality_folders(tmp_path):
    root = tmp_path / "touchpose"
    rng = np.random.default_rng(1)
    for m in ("capacitance", "depth"):
        (root / m).mkdir(parents=True)
        for split, n in (("train", 12), ("test", 6)):
            np.save(root / m / f"{split}_data.npy", rng.normal(size=(n, 8, 10)))
            np.save(root / m / f"{split}_labels.npy", np.eye(4, dtype=np.int64)[np.arange(n) % 4])
    import_multiiot(root, tmp_path / "out", task="pose")
    ds = load_dataset(tmp_path / "out")
    assert ds.meta.modalities["capacitance"].kind == "image"
    assert ds.train.x["depth"].shape == (12, 1, 8, 10)
    np.testing.assert_array_equal(ds.test.y["pose"], np.arange(6) % 4)  # one-hot -> index

    np.save(root / "depth" / "test_labels.npy", np.eye(4, dtype=np.int64)[np.zeros(6, int)])
    with pytest.raises(SourceFormatError, match=r"depth/test_labels.npy: labels differ"):
        import_multiiot(root, tmp_path / "out2")


def test_multiiot_kind_option_and_channels_first(tmp_path):
    root = tmp_path / "custom"
    rng = np.random.default_rng(2)
    (root / "wristband").mkdir(parents=True)
    for split, n in (("train", 8), ("test", 4)):
        np.save(root / "wristband" / f"{split}_data.npy", rng.normal(size=(n, 3, 20)))  # [N, C, T]
        np.save(root / f"{split}_label.npy", np.arange(n) % 2)
    with pytest.raises(SourceFormatError, match=r"wristband.*--kind wristband=KIND"):
        import_multiiot(root, tmp_path / "out")
    import_multiiot(
        root, tmp_path / "out", kinds={"wristband": "imu"}, channels_first=["wristband"]
    )
    assert load_dataset(tmp_path / "out").train.x["wristband"].shape == (8, 20, 3)


def test_multiiot_bad_sources_name_file_and_problem(tmp_path):
    root = tmp_path / "s"
    write_samosa(root)
    (root / "train_label.npy").rename(root / "elsewhere.npy")
    with pytest.raises(SourceFormatError, match=r"no train labels: expected train_label.npy or "):
        import_multiiot(root, tmp_path / "out")

    np.save(root / "train_label.npy", np.arange(29) % 3)  # one short
    with pytest.raises(SourceFormatError, match=r"audio/train_data.npy: has N=30 samples but"):
        import_multiiot(root, tmp_path / "out")

    np.save(root / "train_labels.npy", np.arange(30) % 3)
    with pytest.raises(SourceFormatError, match="holds both train_label.npy and train_labels.npy"):
        import_multiiot(root, tmp_path / "out")
    (root / "train_label.npy").unlink()

    (root / "imu" / "test_data.npy").unlink()
    with pytest.raises(SourceFormatError, match=r"imu/test_data.npy: file not found"):
        import_multiiot(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


# -------------------------------------------------------------------------------- PAMAP2


def pamap2_rows(subject: int, seed: int) -> np.ndarray:
    """One subject: transient, 150 rows lying, transient, 200 rows walking, transient."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate(
        [np.zeros(20), np.full(150, 1), np.zeros(30), np.full(200, 4), np.zeros(10)]
    )
    n = labels.size
    data = rng.normal(size=(n, 54))
    data[:, 0] = np.arange(n) * 0.01 + 5.0
    data[:, 1] = labels
    hr = np.full(n, np.nan)
    hr[3::10] = 80 + subject % 10
    data[:, 2] = hr
    if subject == 102:
        data[60:63, 3 + 1] = np.nan  # short hand gap: interpolated
        data[200 + 50 : 200 + 80, 37 + 7] = np.nan  # 30-row ankle gyro gap: ankle missing
    return data


def write_pamap2(root: Path) -> Path:
    proto = root / "PAMAP2_Dataset" / "Protocol"
    proto.mkdir(parents=True)
    for subject, seed in ((101, 0), (102, 1)):
        text = "\n".join(
            " ".join("NaN" if np.isnan(v) else f"{v:.6f}" for v in row)
            for row in pamap2_rows(subject, seed)
        )
        (proto / f"subject{subject}.dat").write_text(text + "\n")
    return root / "PAMAP2_Dataset"


def test_pamap2_windows_labels_sites_and_missing_sensor(tmp_path):
    src = write_pamap2(tmp_path)
    result = import_pamap2(
        src, tmp_path / "out", windows=WindowConfig(window=64, overlap=0.5), test_subjects=[102]
    )
    ds = load_dataset(tmp_path / "out")
    assert set(ds.meta.modalities) == {"imu_hand", "imu_chest", "imu_ankle", "heart_rate"}
    assert ds.meta.modalities["imu_hand"].kind == "imu"
    assert ds.meta.tasks["activity"].classes == tuple(ACTIVITIES.values())
    # 150 rows -> 3 windows, 200 rows -> 5 windows (stride 32); transients never windowed
    lying, walking = list(ACTIVITIES).index(1), list(ACTIVITIES).index(4)
    expected = [lying] * 3 + [walking] * 5
    np.testing.assert_array_equal(ds.train.y["activity"], expected)
    np.testing.assert_array_equal(ds.test.y["activity"], expected)
    assert ds.train.x["imu_ankle"].shape == (8, 64, 9)
    assert ds.train.x["heart_rate"].shape == (8, 64, 1)
    assert set(ds.train.site) == {101} and set(ds.test.site) == {102}
    np.testing.assert_array_equal(ds.test.subject, ds.test.site)
    # forward-filled heart rate: constant within the subject, no NaN
    assert np.allclose(ds.train.x["heart_rate"], 81.0)
    # subject 102's 30-row ankle gap hits walking windows 0-2; the 3-row hand gap is filled
    np.testing.assert_array_equal(ds.test.mask["imu_ankle"], [True] * 3 + [False] * 3 + [True] * 2)
    assert ds.test.mask["imu_hand"].all() and ds.train.mask["imu_ankle"].all()
    summary = result.summary()
    assert "dropped 120 transient row(s) (activityID 0)" in summary
    assert "test subjects [102]" in summary


def test_pamap2_random_split_keeps_every_subject_in_both(tmp_path):
    src = write_pamap2(tmp_path)
    import_pamap2(
        src, tmp_path / "out", windows=WindowConfig(64, 0.5), split="random", test_fraction=0.25
    )
    ds = load_dataset(tmp_path / "out")
    assert len(ds.train) == 12 and len(ds.test) == 4
    assert set(ds.train.site) == set(ds.test.site) == {101, 102}


def test_pamap2_seeded_subject_choice_is_reproducible(tmp_path):
    src = write_pamap2(tmp_path)
    sites = []
    for i in range(2):
        import_pamap2(src, tmp_path / f"o{i}", windows=WindowConfig(64, 0.5), seed=3)
        sites.append(set(load_dataset(tmp_path / f"o{i}").test.site.tolist()))
    assert sites[0] == sites[1] and len(sites[0]) == 1


def test_pamap2_bad_files_name_file_and_problem(tmp_path):
    src = write_pamap2(tmp_path)
    path = src / "Protocol" / "subject102.dat"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(" ".join(line.split()[:53]) for line in lines) + "\n")
    with pytest.raises(SourceFormatError, match=r"subject102.dat: expected 54 .*got 53"):
        import_pamap2(src, tmp_path / "out", windows=WindowConfig(64, 0.5))
    lines[5] = " ".join(lines[5].split()[:40])
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SourceFormatError, match=r"subject102.dat: not a table of numbers"):
        import_pamap2(src, tmp_path / "out", windows=WindowConfig(64, 0.5))
    lines = [line.split() for line in path.read_text().splitlines()]
    lines = [row if len(row) == 54 else lines[0] for row in lines]
    lines[40][1] = "8.000000"  # activityID 8 does not exist
    path.write_text("\n".join(" ".join(r) for r in lines) + "\n")
    with pytest.raises(SourceFormatError, match=r"subject102.dat: row 41: unknown activityID 8"):
        import_pamap2(src, tmp_path / "out", windows=WindowConfig(64, 0.5))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceFormatError, match="no subjectXXX.dat files"):
        import_pamap2(tmp_path / "empty", tmp_path / "out")


# ----------------------------------------------------------------------------------- UEA


def ts_text(n: int, seed: int, length: int = 20, dims: int = 6) -> str:
    rng = np.random.default_rng(seed)
    head = [
        "# a tiny BasicMotions-like problem",
        "@problemName TinyMotions",
        "@timeStamps false",
        "@missing false",
        "@univariate false",
        f"@dimensions {dims}",
        "@equalLength true",
        f"@seriesLength {length}",
        "@classLabel true Standing Walking",
        "@data",
    ]
    rows = []
    for i in range(n):
        dims_txt = [",".join(f"{v:.4f}" for v in rng.normal(size=length)) for _ in range(dims)]
        rows.append(":".join(dims_txt) + ":" + ("Walking" if i % 2 else "Standing"))
    return "\n".join(head + rows) + "\n"


def write_uea(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "TinyMotions_TRAIN.ts").write_text(ts_text(8, 0))
    (root / "TinyMotions_TEST.ts").write_text(ts_text(4, 1))
    return root


def test_uea_channels_become_modalities(tmp_path):
    src = write_uea(tmp_path / "uea")
    result = import_uea(src, tmp_path / "out", channels={"acc": [0, 1, 2], "gyro": [3, 4]})
    ds = load_dataset(tmp_path / "out")
    assert ds.meta.name == "TinyMotions"
    assert {m: s.kind for m, s in ds.meta.modalities.items()} == {"acc": "imu", "gyro": "imu"}
    assert ds.train.x["acc"].shape == (8, 20, 3) and ds.test.x["gyro"].shape == (4, 20, 2)
    assert ds.meta.tasks["label"].classes == ("Standing", "Walking")
    np.testing.assert_array_equal(ds.train.y["label"], np.arange(8) % 2)
    assert "dimensions [5] are in no --channels group" in result.summary()
    # values land in [N, T, C] order: case 0, dimension 1, time step 0 of the file
    first_row = (src / "TinyMotions_TRAIN.ts").read_text().splitlines()[10]
    assert ds.train.x["acc"][0, 0, 1] == pytest.approx(float(first_row.split(":")[1].split(",")[0]))


def test_uea_defaults_to_one_timeseries_modality(tmp_path):
    src = write_uea(tmp_path / "uea")
    import_uea(src / "TinyMotions_TRAIN.ts", tmp_path / "out")
    ds = load_dataset(tmp_path / "out")
    assert ds.meta.modalities["series"].kind == "timeseries"
    assert ds.train.x["series"].shape == (8, 20, 6)


def _first_value_missing(text: str) -> str:
    """The first data value becomes '?' (missing) while the rest of its series is not."""
    head, data = text.split("@data\n")
    return head + "@data\n?" + data[data.index(",") :]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.replace(":Walking", ",1.0:Walking", 1), r"line 12: ragged case"),
        (lambda t: _first_value_missing(t), r"partly NaN"),
        (lambda t: t + ":".join(["1,2,3"] * 6) + ":Standing\n", r"line 19: series length 3"),
        (lambda t: t.replace(":Walking", ":Running", 1), r"labels \['Running'\]"),
        (lambda t: t.replace("@classLabel true Standing Walking\n", ""), "no @classLabel"),
    ],
)
def test_uea_bad_files_name_file_and_problem(tmp_path, mutate, message):
    src = write_uea(tmp_path / "uea")
    path = src / "TinyMotions_TRAIN.ts"
    path.write_text(mutate(path.read_text()))
    with pytest.raises(SourceFormatError, match=rf"TinyMotions_TRAIN.ts: .*{message}"):
        import_uea(src, tmp_path / "out")


def test_uea_missing_test_half(tmp_path):
    src = write_uea(tmp_path / "uea")
    (src / "TinyMotions_TEST.ts").unlink()
    with pytest.raises(SourceFormatError, match=r"TinyMotions_TEST.ts: file not found"):
        import_uea(src, tmp_path / "out")


# ----------------------------------------------------------------------------------- CLI


def test_cli_import_prints_summary_and_reports_errors(tmp_path, capsys):
    src = write_uea(tmp_path / "uea")
    dst = tmp_path / "out"
    argv = ["import", "uea", str(src), str(dst), "--channels", "acc=0,1,2", "--kind", "acc=imu"]
    assert main(argv) == 0
    assert "imported 'TinyMotions'" in capsys.readouterr().out
    assert load_dataset(dst).meta.modalities["acc"].kind == "imu"

    assert main(["import", "multiiot", str(tmp_path / "missing"), str(dst)]) == 2
    err = capsys.readouterr().err
    assert "missing: source directory not found" in err

    pamap = write_pamap2(tmp_path / "p")
    argv = ["import", "pamap2", str(pamap), str(tmp_path / "p_out"), "--window", "64"]
    assert main([*argv, "--test-subjects", "101"]) == 0
    assert "transient row(s)" in capsys.readouterr().out

"""``fed-iotlm report``: real runs in a real sqlite MLflow store, through the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from fed_iotlm.cli import main
from fed_iotlm.report.params import distinguishing, expand_params, varying_params

EXPERIMENT = "report-test"


def _store(root: Path) -> str:
    """A sqlite store whose experiment keeps its artifacts under ``root`` (not the cwd)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root}/mlflow.db"
    MlflowClient(tracking_uri=uri).create_experiment(
        EXPERIMENT, artifact_location=(root / "artifacts").as_uri()
    )
    return uri


def _table(md: str, caption: str) -> list[list[str]]:
    """The body rows of the Markdown table right after ``caption``."""
    after = md.split(caption, 1)[1].split("\n", 1)[1]  # the rest of the caption's line
    block = after.strip().split("\n\n", 1)[0].splitlines()
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in block[2:]]


@pytest.fixture(scope="module")
def real_store(tmp_path_factory) -> tuple[str, dict[str, float]]:
    """Three quick real runs (two centralized seeds, one local) logged by the harness."""
    from fed_iotlm.settings import compose
    from simulations.run import run_experiment

    root = tmp_path_factory.mktemp("mlflow")
    uri = _store(root)
    accuracies = {}
    for method, seed in (("centralized", 0), ("centralized", 1), ("local", 0)):
        cfg = compose(["experiment=quick", f"method={method}", f"seed={seed}", "train.epochs=1",
                       f"mlflow.tracking_uri={uri}", f"mlflow.experiment={EXPERIMENT}"])  # fmt: skip
        out = root / f"{method}-{seed}"
        import json

        res = json.loads(run_experiment(cfg, out).read_text())
        accuracies[f"{method}-synthetic-multisensory-seed{seed}"] = res["test"]["accuracy"]
    return uri, accuracies


@pytest.mark.integration
def test_report_lists_every_run_with_its_plots(real_store, tmp_path):
    uri, accuracies = real_store
    out = tmp_path / "report"
    assert main(["report", EXPERIMENT, "--tracking-uri", uri, "--out", str(out)]) == 0

    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    rows = _table(md, "Every run, grouped as above, best first within a group.")
    header = md.split("Every run, grouped as above")[1].split("\n")[2]  # caption, blank, header
    acc_col = [c.strip() for c in header.strip("|").split("|")].index("accuracy")
    assert {r[0]: r[acc_col] for r in rows} == {n: f"{a:.3f}" for n, a in accuracies.items()}
    # the summary names the best run; groups: centralized (2 seeds) and local
    best = max(accuracies, key=accuracies.get)
    assert f"Best run: `{best}`" in md
    assert "**3 runs** in 2 groups" in md
    groups = _table(md, "Groups, best mean first.")
    assert [g[0] for g in groups][0] == "centralized" and {g[0] for g in groups} == {
        "centralized",
        "local",
    }
    cen = [accuracies[n] for n in accuracies if n.startswith("centralized")]
    assert groups[0][2] == f"{np.mean(cen):.3f} ± {np.std(cen):.3f}"

    # every figure the page shows exists as a non-empty PNG, and the HTML shows the same
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert {"accuracy_per_round.png", "accuracy_by_modality.png", "accuracy_by_node.png"} <= set(
        figures
    )
    for name in figures:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'src="{name}"' in html
    for name in accuracies:
        assert name in html
    # no sweep, no diagnostics, no robustness: omitted with a note, not crashed
    notes = md.split("## Not in this report", 1)[1]
    assert "Accuracy per site:" in notes and "Privacy and robustness:" in notes
    assert "Shift curves:" in notes


@pytest.mark.integration
def test_unknown_experiment_lists_the_existing_ones(real_store, tmp_path, capsys):
    uri, _ = real_store
    rc = main(["report", "no-such-study", "--tracking-uri", uri, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "no MLflow experiment named 'no-such-study'" in err and EXPERIMENT in err
    assert not (tmp_path / "r").exists()


def test_missing_store_is_an_error_not_a_new_empty_store(tmp_path, capsys):
    db = tmp_path / "nowhere" / "mlflow.db"
    rc = main(["report", "x", "--tracking-uri", f"sqlite:///{db}", "--out", str(tmp_path / "r")])
    assert rc == 2
    assert f"no MLflow store at {db}" in capsys.readouterr().err
    assert not db.exists()


def _log_shift_run(uri: str, root: Path, method: str, severity: float, seed: int) -> float:
    """One run logged by RunRecorder itself, with a per-site diagnostics block."""
    from fed_iotlm.tracking import RunRecorder

    acc = round(0.9 - 0.3 * severity * (method == "federated") - 0.01 * seed, 4)
    cfg = {
        "method": method, "seed": seed, "rounds": 2,
        "shift": [{"name": "rotation", "modalities": ["imu"], "severity": severity, "sites": [0]}],
        "mlflow": {"tracking_uri": uri, "experiment": EXPERIMENT},
    }  # fmt: skip
    rec = RunRecorder(cfg, root / f"{method}-{severity}-{seed}", dataset="toy",
                      plan={"0": ["imu"], "1": ["imu", "audio"]})  # fmt: skip
    rec.extra["diagnostics"] = {
        "shifted_sites": [0],
        "accuracy_by_site": {"0": {"accuracy": acc - 0.1}, "1": {"accuracy": acc}},
    }
    rec.start()
    for rnd in (1, 2):
        rec.log_round(rnd, acc * rnd / 2, 1.0 / rnd)
    test = {"accuracy": acc, "accuracy_by_modality": {"imu": acc - 0.2, "audio": acc - 0.3},
            "by_task": {"activity": {"accuracy": acc,
                                     "accuracy_by_modality": {"imu": acc - 0.2, "audio": acc - 0.3}}}}  # fmt: skip
    comm = {"bytes_up_per_node_round": 1000 * (method == "federated"),
            "bytes_down_per_node_round": 2000 * (method == "federated"), "model_bytes": 2000}  # fmt: skip
    rec.finish(test, {"0": acc - 0.1, "1": acc}, comm)
    return acc


def test_shift_sweep_gives_curves_per_method_with_mean_and_std(tmp_path):
    uri = _store(tmp_path)
    accs: dict[tuple[str, float], list[float]] = {}
    for method in ("federated", "local"):
        for severity in (0.0, 0.5, 1.0):
            for seed in (0, 1):
                accs.setdefault((method, severity), []).append(
                    _log_shift_run(uri, tmp_path, method, severity, seed)
                )
    out = tmp_path / "report"
    assert main(["report", EXPERIMENT, "--tracking-uri", uri, "--out", str(out),
                 "--format", "md"]) == 0  # fmt: skip
    md = (out / "report.md").read_text()
    assert not (out / "report.html").exists()
    assert (out / "sweeps.png").stat().st_size > 0
    # the shift param, logged as one string, is swept as shift.0.severity: one line per method
    rows = _table(md, "Accuracy against `shift.0.severity`")
    assert [r[0] for r in rows] == ["federated", "local"]
    for row, method in zip(rows, ("federated", "local"), strict=True):
        for cell, sev in zip(row[1:], (0.0, 0.5, 1.0), strict=True):
            xs = accs[(method, sev)]
            assert cell == f"{np.mean(xs):.3f} ± {np.std(xs):.3f}"
    # per-site accuracy from results.json, shifted sites starred
    site_rows = _table(md.split("## Accuracy per site", 1)[1], "Mean ± std over seeds.")
    assert len(site_rows) == 6  # 2 methods x 3 severities
    assert "| group | 0* | 1 |" in md
    assert (out / "accuracy_by_site.png").stat().st_size > 0
    # communication: the method that sends nothing is in the table, not in the plot
    comm = _table(md, "Means over seeds; most traffic first.")
    assert comm[0][1:3] == ["1.0", "2.0"] and comm[-1][1] == "0.0"


def test_params_expand_shift_entries_and_ignore_later_added_keys():
    logged = {"shift": "[{'name': 'rotation', 'severity': 0.5, 'sites': [0, 1]}]", "seed": "0"}
    assert expand_params(logged) == {
        "shift.0.name": "rotation", "shift.0.severity": "0.5", "shift.0.sites": "[0, 1]", "seed": "0"
    }  # fmt: skip
    runs = [
        {"method": "a", "seed": "0", "output_dir": "x"},
        {"method": "a", "seed": "1", "output_dir": "y", "attack.kind": "none"},
        {"method": "b", "seed": "0", "output_dir": "z", "attack.kind": "none"},
    ]
    # output_dir is not a knob; attack.kind exists only in later runs, with one value
    assert varying_params(runs) == ["method", "seed"]
    fused = [{"method": m, "fusion": f, "p": p} for m, f, p in
             [("a", "late", "1"), ("a", "late", "2"), ("b", "attn", "1")]]  # fmt: skip
    assert distinguishing(["method", "fusion", "p"], fused) == ["method", "p"]


def _log_study_run(
    uri: str, root: Path, method: str, seed: int, commit: str, fusion: str | None = None
) -> dict:
    """A study run as RunRecorder logs it: val and test, budget, code version, binding
    (and ``model.fusion`` as configured, when given)."""
    from fed_iotlm.tracking import RunRecorder

    acc = round(0.8 + 0.05 * (method == "mmbind") + 0.01 * seed, 4)
    cfg = {"method": method, "seed": seed, "rounds": 1,
           "mlflow": {"tracking_uri": uri, "experiment": EXPERIMENT}}  # fmt: skip
    if fusion is not None:
        cfg["model"] = {"fusion": fusion}
    name = f"{method}-{seed}-{commit}-{fusion}"
    rec = RunRecorder(cfg, root / name, dataset="toy", plan={"0": ["imu"]})
    rec.extra["code_version"] = {"commit": commit, "dirty": False}
    rec.extra["budget"] = {"steps_per_node_round": 20.0, "examples_per_node_round": 640.0}
    if method == "mmbind":
        rec.extra["binding"] = {"pair_accuracy_by_binding": {
            "5": {"activity": 0.9}, "1": {"activity": 0.5 + 0.1 * seed}}}  # fmt: skip
    rec.start()
    rec.log_round(1, acc, 1.0)
    test = {"accuracy": acc, "accuracy_by_modality": {"imu": acc}}
    rec.finish(test, {"0": acc}, {}, val={"accuracy": acc - 0.01})
    return {"test": acc, "val": acc - 0.01}


def test_study_table_puts_val_beside_test_and_never_mixes_code_versions(tmp_path):
    uri = _store(tmp_path)
    logged = {
        (m, s): _log_study_run(uri, tmp_path, m, s, "c0ffee")
        for m in ("mmbind", "harmony")
        for s in (0, 1, 2)
    }
    _log_study_run(uri, tmp_path, "harmony", 3, "beef00")  # a run of other code
    out = tmp_path / "report"
    assert main(["report", EXPERIMENT, "--tracking-uri", uri, "--out", str(out),
                 "--format", "md"]) == 0  # fmt: skip
    md = (out / "report.md").read_text()
    assert "Runs of 2 code versions, one table each" in md
    rows = {r[0]: r for r in _table(md, "Code version `c0ffee`: 6 runs.")}
    assert set(rows) == {"mmbind", "harmony"}
    mm = [logged[("mmbind", s)] for s in range(3)]
    assert rows["mmbind"][1] == "3"
    val = [x["val"] for x in mm]
    assert rows["mmbind"][2] == f"{np.mean(val):.3f} ± {np.std(val):.3f}"
    assert rows["mmbind"][3].startswith(f"{np.mean([x['test'] for x in mm]):.3f} ± ")
    assert rows["mmbind"][4:6] == ["20", "640"]
    first = [0.5, 0.6, 0.7]  # binding 1, not the later binding 5
    assert rows["mmbind"][6] == f"{np.mean(first):.3f} ± {np.std(first):.3f}"
    other = _table(md, "Code version `beef00`: 1 runs.")
    assert [r[0] for r in other] == ["harmony"] and other[0][1] == "1"


def test_groups_are_labelled_by_the_fusion_the_method_built(tmp_path):
    """method=harmony builds late fusion whatever model.fusion says: its runs are labelled
    ``fusion=late`` (as the late-fusion MMBind runs beside them), not ``attention``."""
    uri = _store(tmp_path)
    for method, fusion in (("federated", "attention"), ("harmony", "attention"),
                           ("mmbind", "late")):  # fmt: skip
        for seed in (0, 1):
            _log_study_run(uri, tmp_path, method, seed, "c0ffee", fusion)
    out = tmp_path / "report"
    assert main(["report", EXPERIMENT, "--tracking-uri", uri, "--out", str(out),
                 "--format", "md"]) == 0  # fmt: skip
    md = (out / "report.md").read_text()
    labels = {r[0] for r in _table(md, "Code version `c0ffee`: 6 runs.")}
    assert labels == {
        "federated · fusion=attention",
        "harmony · fusion=late",
        "mmbind · fusion=late",
    }
    assert "harmony · fusion=attention" not in md


def test_effective_params_override_only_what_the_method_decides():
    from fed_iotlm.config_schema import effective
    from fed_iotlm.report.params import effective_params

    assert effective("harmony", "model.fusion", "attention") == "late"  # what the model uses

    harmony = {"method": "harmony", "model.fusion": "attention", "seed": "0"}
    assert effective_params(harmony) == {**harmony, "model.fusion": "late"}
    assert effective_params({"method": "harmony"}) == {"method": "harmony"}  # not logged: absent
    federated = {"method": "federated", "model.fusion": "attention"}
    assert effective_params(federated) == federated


def test_the_whole_config_is_an_artifact_though_params_are_cut(tmp_path):
    from mlflow.tracking import MlflowClient

    from fed_iotlm.tracking import RunRecorder

    uri = _store(tmp_path)
    long_value = "x" * 2000  # past MLflow's param limit
    cfg = {"method": "local", "seed": 0, "rounds": 5, "note": long_value,
           "mlflow": {"tracking_uri": uri, "experiment": EXPERIMENT}}  # fmt: skip
    rec = RunRecorder(cfg, tmp_path / "run", dataset="toy", plan={"0": ["imu"]})
    rec.start()
    rec.t0, rec._round_ends = 100.0, [130.0, 132.0, 134.0]  # round 1 carries the set-up
    assert rec.eta_s(3) == 4.0  # 2 rounds left at the 2 s the later rounds took
    assert rec.eta_s(5) is None
    rec.finish({"accuracy": 0.5, "accuracy_by_modality": {}}, {}, {})
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert len(run.data.params["note"]) == 500
    import json

    path = client.download_artifacts(run.info.run_id, "config.json", str(tmp_path))
    logged = json.loads(Path(path).read_text())
    assert logged["note"] == long_value and logged["plan"] == {"0": ["imu"]}


def test_a_one_round_group_is_drawn_as_a_point(tmp_path, monkeypatch):
    """Local-only runs are one long round: a line through one point draws nothing, so the
    group must carry a marker to be seen in the accuracy-per-round panel."""
    from fed_iotlm.report import plots

    drawn = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.setdefault("fig", fig))
    plots.rounds_plot(
        {
            "local": {"steps=600": [[(1, 0.4)], [(1, 0.5)]]},
            "federated": {"x": [[(1, 0.3), (2, 0.6)]]},
        },
        tmp_path / "p.png",
    )
    means = {ax.get_title(): ax.get_lines()[-1] for ax in drawn["fig"].axes if ax.get_visible()}
    assert means["local"].get_marker() == "o"
    assert means["local"].get_ydata()[0] == pytest.approx(0.45)
    assert means["federated"].get_marker() in (None, "None", "")

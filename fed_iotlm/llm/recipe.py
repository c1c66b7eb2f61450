"""The LM stage's one data recipe: where its rows come from, how they split, what is asked.

Used by the central stage (stage.py) and by federated LoRA (lora_task.py), so the two
cannot drift.  Three named sources (``llm.data``), said in results.json:

* ``nodes`` (default): every node uploads frozen-encoder tokens and the labels it holds
  (uploads.py); the centre never receives a raw window.  Training rows are the nodes'
  training samples (their label fraction), test rows the nodes' test samples.
* ``central``: a designated central dataset (``llm.central_data``: a ``data`` config or a
  directory in the exchange format) that the centre owns outright.
* ``pooled_raw``: every node's raw training windows and all labels pooled at the centre
  (what the first version did); an explicit, named alternative, never the default.

Selection happens on a validation share carved from the training rows
(:func:`split_validation`, seeded; labelled rows only, since validation questions need
answers), asked with held-out templates drawn with their own seed; test rows are only
ever reported.  When the data layer's own validation split lands, only
:func:`split_validation` changes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from fed_iotlm.config_schema import block, section
from fed_iotlm.data.dataset import DatasetMeta, Split
from fed_iotlm.models.multisensory import MultisensoryModel

from .features import SensorFeatures, sensor_features
from .instructions import Example, build_instructions, load_jsonl, phrasing_of, task_examples
from .questions import EXTRA_TYPES, check_types, type_examples
from .upload_store import load_uploads
from .uploads import (
    PARTS,
    features_from_rows,
    merge_rows,
    node_uploads,
    token_split,
    unpack_upload,
    upload_bytes,
    upload_privacy,
)

log = logging.getLogger(__name__)

DATA_SOURCES = ("nodes", "central", "pooled_raw")
DEFAULT_KINDS = ("task", "dialog")  # presence questions are answered by the prompt itself


@dataclass
class StageData:
    """Feature rows (training part, then test part) and what each row is labelled."""

    meta: DatasetMeta
    feats: SensorFeatures
    train: Split  # masks and labels of the training part (no inputs)
    test: Split
    source: dict  # provenance, written to results.json
    uploads: list = field(default_factory=list)  # the records the centre received (nodes)
    # llm.data=nodes: the node each training / test row was uploaded by (None otherwise);
    # federated LoRA's node sites train on their own node's rows only (llm/sites.py)
    train_nodes: np.ndarray | None = None
    test_nodes: np.ndarray | None = None

    @property
    def test_offset(self) -> int:
        return len(self.train)


@dataclass
class StageQuestions:
    """Training instructions; validation and test questions per task (rows in ``feats``)."""

    train: list[Example]
    val: dict[str, list[Example]]
    test: dict[str, list[Example]]  # held-out templates
    test_train_templates: dict[str, list[Example]]  # the same rows, training templates
    rows: dict[str, int]  # how many samples each part uses
    fit_rows: np.ndarray  # training-part rows the instructions come from
    test_rows: np.ndarray  # feature rows of the asked test samples
    # llm.question_types beyond classification: type -> {"train", "val", "test",
    # "test_train_templates"} (the training ones are also in ``train``)
    types: dict[str, dict[str, list[Example]]] = field(default_factory=dict)


def data_source(lc: dict) -> str:
    source = str(section("llm", lc)["data"])
    if source not in DATA_SOURCES:
        raise ValueError(f"llm.data={source!r}: choose one of {', '.join(DATA_SOURCES)}")
    return source


def stage_data(cfg: dict, encoder: MultisensoryModel, scaler=None) -> StageData:
    """The rows the central stage learns and is evaluated on, from ``llm.data``.
    ``scaler``: the pooled input statistics the bundle carries (what its encoders were
    trained on); without it each data source falls back to its own statistics."""
    lc, seed = cfg["llm"], int(cfg["seed"])
    source = data_source(lc)
    fused = bool(lc["use_fused"])
    if source != "nodes" and block(cfg, "llm.upload").get("dir"):
        raise ValueError(
            f"llm.upload.dir is set but llm.data={source}: the uploads are the nodes' rows; "
            "use llm.data=nodes, or drop llm.upload.dir"
        )
    if source == "nodes":
        return _from_nodes(cfg, encoder, fused, scaler)
    from fed_iotlm.data.federation import build_layout, load_experiment_dataset
    from fed_iotlm.data.preprocess import standardize_own

    if source == "pooled_raw":
        ds = build_layout(cfg).dataset
        note = "every node's raw windows and all their labels pooled at the centre"
    else:
        central = lc.get("central_data")
        if not central:
            raise ValueError(
                "llm.data=central needs llm.central_data: a data config or a dataset directory"
            )
        dc = {"name": "npz", "path": str(central)} if isinstance(central, str | Path) else central
        ds = load_experiment_dataset(dict(dc), seed)
        note = f"a designated central dataset ({dc.get('path', dc.get('name'))})"
    missing = [t for t in encoder.head if t not in ds.meta.tasks]
    if missing:
        raise ValueError(f"llm.data={source}: the data lacks the bundle's tasks {missing}")
    if scaler is not None:
        train, test = scaler.transform(ds.train), scaler.transform(ds.test)
    else:  # a bundle without statistics: the data's own (transductive for test)
        train, test = standardize_own(ds.train), standardize_own(ds.test)
    a = sensor_features(encoder, train, use_fused=fused)
    b = sensor_features(encoder, test, use_fused=fused)
    info = {"data": source, "note": note, "raw_samples_at_centre": len(train) + len(test)}
    return StageData(ds.meta, _concat(a, b), _labels_only(train), _labels_only(test), info)


def _from_nodes(cfg: dict, encoder: MultisensoryModel, fused: bool, scaler=None) -> StageData:
    """The rows of ``llm.data=nodes``: the uploads a federated run collected over Flower
    (``llm.upload.dir``), else computed in-process from the federation layout."""
    up = block(cfg, "llm.upload")
    if up.get("dir"):
        stored = load_uploads(up["dir"])
        check_same_bundle(stored.manifest, cfg["llm"].get("bundle"), up["dir"])
        meta, records, partitions = stored.meta, stored.records, stored.partitions
        m = stored.manifest
        info = {
            "collected": "over Flower: query.llm_upload after the federation's last round",
            "upload_dir": str(up["dir"]),
            # the federation's node count (federated LoRA's node sites are its nodes)
            "nodes": int(m.get("nodes_expected", len(partitions))),
            "nodes_uploaded": len(partitions),
            "missing_partitions": m.get("missing_partitions", []),
            "plan": {pid: n["modalities"] for pid, n in m.get("nodes", {}).items()},
            "upload": {pid: {k: n[k] for k in ("noise_sigma", "quantize")}
                       for pid, n in m.get("nodes", {}).items()},
        }  # fmt: skip
        if info["missing_partitions"]:
            log.warning(
                "llm.upload.dir: no upload from partition(s) %s; their rows are absent",
                info["missing_partitions"],
            )
    else:
        from fed_iotlm.data.federation import build_layout

        privacy = upload_privacy(cfg)
        layout = build_layout(cfg)
        meta, partitions = layout.dataset.meta, list(range(layout.num_nodes))
        records = {part: node_uploads(layout, encoder, privacy, part, scaler) for part in PARTS}
        info = {
            "collected": "in-process from the federation layout (simulation)",
            "nodes": layout.num_nodes,
            "plan": layout.plan,
            "label_fraction": layout.label_fraction,
            "upload": {"noise_sigma": privacy.noise_sigma, "quantize": privacy.quantize},
        }
    missing = [t for t in encoder.head if t not in meta.tasks]
    if missing:
        raise ValueError(f"llm.data=nodes: the uploads' dataset lacks the bundle's tasks {missing}")
    mods, dim = list(encoder.modality_names), int(encoder.spec.dim)
    parts = {}
    owner = {}
    for part in PARTS:
        received = [unpack_upload(r) for r in records[part]]
        rows = merge_rows(received, mods, dim)
        parts[part] = (features_from_rows(encoder, rows, use_fused=fused), token_split(rows))
        # merge_rows keeps the uploads' order (partition order): each row's node id
        owner[part] = np.repeat(np.asarray(partitions, np.int64), [len(r) for r in received])
    info = {
        "data": "nodes",
        "note": "frozen-encoder tokens and the labels each node holds, uploaded by the nodes",
        "raw_samples_at_centre": 0,
        **info,
        "upload_bytes": {p: [upload_bytes(r) for r in rs] for p, rs in records.items()},
        "rows": {p: len(s) for p, (_, s) in parts.items()},
        "labelled_train_rows": int(labelled_rows(parts["train"][1]).sum()),
    }
    feats = _concat(parts["train"][0], parts["test"][0])
    uploads = [*records["train"], *records["test"]]
    return StageData(
        meta, feats, parts["train"][1], parts["test"][1], info, uploads,
        owner["train"], owner["test"],
    )  # fmt: skip


def check_same_bundle(manifest: dict, bundle: str | None, upload_dir: str) -> None:
    """The uploaded tokens were made by the encoders of ``bundle``, or the stage refuses:
    tokens of another run's encoders read by this bundle's fusion and heads are noise."""
    from fed_iotlm.federation.bundle import bundle_digest

    if not bundle:
        return  # no bundle to compare (tests that pass an encoder directly)
    made_by, have = manifest.get("bundle_sha256"), bundle_digest(Path(bundle))
    if made_by != have:
        raise ValueError(
            f"llm.upload.dir={upload_dir}: its tokens were made by a bundle with weights "
            f"sha256 {made_by}, but llm.bundle={bundle} has {have}: use the bundle of the "
            "run that collected them (<run>/bundle beside <run>/uploads)"
        )


def _labels_only(split: Split) -> Split:
    return Split(x={}, mask=dict(split.mask), y=dict(split.y))


def labelled_rows(split: Split) -> np.ndarray:
    """Whether each row has at least one label (-1 everywhere: none)."""
    return np.logical_or.reduce([np.asarray(v) >= 0 for v in split.y.values()])


def _concat(a: SensorFeatures, b: SensorFeatures) -> SensorFeatures:
    """One feature table for training rows then test rows."""
    import torch

    return SensorFeatures(
        a.names,
        {m: torch.cat([a.feats[m], b.feats[m]]) for m in a.names},
        torch.cat([a.present, b.present]),
        {t: torch.cat([a.head_pred[t], b.head_pred[t]]) for t in a.head_pred},
    )


def split_validation(train: Split, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows) of the training part: a seeded ``fraction`` of the
    labelled rows is held out for every choice the stage makes."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"llm.val_fraction must be in (0, 1), got {fraction}")
    labelled = np.nonzero(labelled_rows(train))[0]
    perm = np.random.default_rng(seed + 7919).permutation(labelled)
    n_val = int(round(fraction * len(labelled)))
    if n_val < 1 or n_val >= len(labelled):
        raise ValueError(
            f"llm.val_fraction={fraction} of {len(labelled)} labelled training rows leaves "
            "no validation or no training rows"
        )
    val = np.sort(perm[:n_val])
    fit = np.setdiff1d(np.arange(len(train)), val)
    return fit, val


def _cap(rows: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.permutation(rows)[:n]) if len(rows) > n else np.sort(rows)


def stage_questions(data: StageData, lc: dict, seed: int, tasks: list[str]) -> StageQuestions:
    """Instructions from fit rows; validation and test questions (held-out templates)."""
    rng, lc = np.random.default_rng(seed), section("llm", lc)
    fit, val = split_validation(data.train, float(lc["val_fraction"]), seed)
    fit = _cap(fit, int(lc["train_samples"]), rng)
    val = _cap(val, int(lc["val_samples"]), rng)
    test = _cap(np.arange(len(data.test)), int(lc["eval_samples"]), rng)
    kinds = tuple(lc["kinds"] or DEFAULT_KINDS)
    phrasing = phrasing_of(lc["fewshot"])  # the wording knobs (all off by default)
    train = build_instructions(
        data.meta, data.train, templates="train", tasks=tasks, kinds=kinds,
        per_sample=int(lc["per_sample"]), seed=seed, indices=fit, presence_turns="presence" in kinds,
        phrasing=phrasing,
    )  # fmt: skip
    if lc["instructions_jsonl"]:
        train += load_jsonl(Path(lc["instructions_jsonl"]), len(data.train))
    off = data.test_offset
    all_tasks = list(data.meta.tasks)

    def asked(split: Split, rows, templates: str, s: int, shift: int) -> dict:
        return {
            t: [replace(ex, index=ex.index + shift) for ex in task_examples(data.meta, split, t, templates=templates, seed=s, indices=rows, phrasing=phrasing)]
            for t in all_tasks
        }  # fmt: skip

    types = extra_questions(data, lc, seed, tasks, fit, val, test, len(train))
    for qs in types.values():
        train += qs["train"]
    return StageQuestions(
        train,
        asked(data.train, val, "heldout", seed + 1, 0),
        asked(data.test, test, "heldout", seed, off),
        asked(data.test, test, "train", seed, off),
        {"fit": len(fit), "val": len(val), "test": len(test)},
        fit,
        test + off,
        types,
    )


def extra_questions(
    data: StageData,
    lc: dict,
    seed: int,
    tasks: list[str],
    fit: np.ndarray,
    val: np.ndarray,
    test: np.ndarray,
    n_train: int,
) -> dict[str, dict[str, list[Example]]]:
    """The ``llm.question_types`` beyond classification, each from the rows of one part:
    training questions from fit rows (as many as the classification instructions, so
    every type gets an equal share of the steps), validation questions from validation
    rows (held-out templates, own seed), test questions from test rows with held-out and
    with training templates (the same groups of rows)."""
    types = check_types(lc["question_types"])
    recordings, off = int(lc["count_recordings"]), data.test_offset
    out = {}
    for qtype in (t for t in types if t in EXTRA_TYPES):

        def make(split: Split, rows, n: int, templates: str, s: int, shift: int = 0, qt=qtype):
            return type_examples(
                qt, data.meta, split, rows, tasks, n, recordings=recordings,
                templates=templates, seed=s, offset=shift,
            )  # fmt: skip

        out[qtype] = {
            "train": make(data.train, fit, n_train, "train", seed),
            "val": make(data.train, val, len(val), "heldout", seed + 1),
            "test": make(data.test, test, len(test), "heldout", seed, off),
            "test_train_templates": make(data.test, test, len(test), "train", seed, off),
        }
    return out

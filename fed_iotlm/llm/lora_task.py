"""What every party of a federated LoRA run rebuilds identically: LM, conditioning, data.

The server and each site (a separate Ray actor or machine) must agree bit for bit on the
frozen base weights, the adapted layer names and the feature table, otherwise factors
sent down do not mean the same thing on the other side.  A :class:`LoraTask` holds only
plain values, so it pickles to actors, keys a per-process cache, and every party derives
the same base model (seeded, or loaded from the same local file) and the same data.

Data sources:

* ``toy``: a few classes carried only by random sensor features (like the unit tests),
  asked with the training question templates and evaluated on the held-out ones, so a
  study runs anywhere without a federated bundle;
* ``bundle``: the central stage's data (a model bundle + the configured dataset), built
  from the composed config the task carries as JSON.

Which instructions each site holds is ``site_split`` (:mod:`.sites`): by default, on
the nodes' uploaded rows (``llm.data=nodes``), site k is node k and trains on its own rows
only; ``iid`` (the toy data's only split) deals the instructions out at random.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fed_iotlm.config_schema import section
from fed_iotlm.data.dataset import DatasetMeta
from fed_iotlm.data.modalities import TaskSpec

from .features import FUSED, SensorFeatures
from .instructions import TASK_QUESTIONS, Example, Turn
from .loading import TINY_MODEL, LoadedLM, load_lm
from .sensor_lm import ConditioningSettings, LoraSettings, SensorLM
from .sequences import SequenceBuilder
from .sites import AUTO, SiteSplit, resolve_split, split_sites
from .tuning import TuneSettings

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOY_CLASSES = ("calm", "busy", "idle", "away")
# what a site can federate besides LoRA: the conditioning's own weights (sensor_state)
FEDERATED_CONDITIONINGS = ("prefix", "adapter", "seed_adapter")


@dataclass(frozen=True)
class LoraTask:
    """The LM, LoRA, conditioning, local optimiser and data every party agrees on."""

    model: str = TINY_MODEL
    lora_r: int = 8  # rank of the global model (and of every site unless flexlora ranks)
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ALL_LINEAR
    lora_top_layers: int | None = None  # as llm.lora.top_layers (None: every layer)
    # prefix | adapter | seed_adapter (text has no sensor state to federate)
    conditioning: str = "prefix"
    tokens_per_modality: int = 2
    adapter_layers: int = 8
    queries_per_task: int = 4
    seed_fusion: str = "add"  # seed_adapter (llm.seed_adapter): fusion, depth, rank
    seed_layers: int = 8
    seed_rank: int = 8
    seed_center: bool = True  # as llm.seed_adapter.center
    tune: TuneSettings = field(default_factory=lambda: TuneSettings(lr=3e-3, sensor_lr=3e-3))
    max_new_tokens: int = 6
    eval_batch: int = 32
    seed: int = 0
    data: str = "toy"  # toy | bundle
    cfg_json: str = ""  # the composed config (bundle data only)
    toy_train: int = 192
    toy_eval: int = 64
    toy_classes: int = 4
    toy_noise: float = 1.0  # per-dimension; class means are 2·N(0, I) in 8 dimensions
    # nodes | iid | auto (nodes when the data has nodes): resolved on construction, so
    # results.json and a resume's identity check name the split that runs
    site_split: str = AUTO

    def __post_init__(self) -> None:
        if self.conditioning not in FEDERATED_CONDITIONINGS:
            raise ValueError(
                f"federated LoRA conditioning {self.conditioning!r}: choose one of "
                f"{', '.join(FEDERATED_CONDITIONINGS)}"
            )
        if self.data not in ("toy", "bundle"):
            raise ValueError(f"data={self.data!r}: choose toy or bundle")
        if self.data == "bundle" and not self.cfg_json:
            raise ValueError("bundle data needs the composed config (cfg_json)")
        object.__setattr__(self, "site_split", resolve_split(self.site_split, self.has_nodes))

    @property
    def has_nodes(self) -> bool:
        """Whether the rows come from the federation's nodes (bundle with llm.data=nodes)."""
        if self.data != "bundle":
            return False
        return json.loads(self.cfg_json)["llm"].get("data", "nodes") == "nodes"

    @classmethod
    def from_cfg(cls, cfg: dict) -> LoraTask:
        """The central stage's settings (``llm.*``): same LoRA, first conditioning, and the
        stage's data when ``llm.bundle`` is set (else the toy set)."""
        lc = cfg["llm"]
        keys = TuneSettings.__dataclass_fields__
        ad = section("llm.adapter", lc.get("adapter"))
        sa = section("llm.seed_adapter", lc.get("seed_adapter"))
        given = {k: lc[k] for k in keys if k in lc and k not in ("seed", "gate_lr")}
        tune = TuneSettings(**given, gate_lr=float(ad["gate_lr"]))
        fed = section("llm.federated", lc.get("federated"))
        kind = next((k for k in lc["conditioning"] if k != "text"), "prefix")
        return cls(
            model=str(lc["model"]),
            lora_r=int(lc["lora"]["r"]),
            lora_alpha=int(lc["lora"]["alpha"]),
            lora_dropout=float(lc["lora"]["dropout"]),
            target_modules=tuple(lc["lora"]["target_modules"]),
            lora_top_layers=section("llm.lora", lc["lora"])["top_layers"],
            conditioning=kind,
            tokens_per_modality=int(lc["tokens_per_modality"]),
            adapter_layers=int(ad["layers"]),
            queries_per_task=int(ad["queries_per_task"]),
            seed_fusion=str(sa["fusion"]),
            seed_layers=int(sa["layers"]),
            seed_rank=int(sa["rank"]),
            seed_center=bool(sa["center"]),
            tune=tune,
            max_new_tokens=int(lc["max_new_tokens"]),
            eval_batch=int(lc["eval_batch"]),
            seed=int(cfg["seed"]),
            data="bundle" if lc.get("bundle") else "toy",
            cfg_json=json.dumps(cfg, sort_keys=True) if lc.get("bundle") else "",
            site_split=str(fed["site_split"]),
        )


@dataclass
class TaskData:
    """One feature table for training rows then evaluation rows, and the instructions."""

    feats: SensorFeatures
    train: list[Example]
    evals: list[Example]
    meta: DatasetMeta
    tasks: list[str]
    reference: dict = field(default_factory=dict)  # {"name", "accuracy"}: a non-LM yardstick
    # rows uploaded by nodes: the node of each training row, whether it has any label,
    # and the plan's node count (None: data without nodes)
    train_nodes: np.ndarray | None = None
    train_labelled: np.ndarray | None = None
    num_nodes: int | None = None


@lru_cache(maxsize=2)
def load_task_data(task: LoraTask) -> TaskData:
    """Built once per process (each Ray actor serves many rounds and methods)."""
    return _toy_data(task) if task.data == "toy" else _bundle_data(task)


def _toy_data(task: LoraTask) -> TaskData:
    """Class c has a random mean in feature space; the LM only sees it through the sensors."""
    classes = TOY_CLASSES[: task.toy_classes]
    n = task.toy_train + task.toy_eval
    g = torch.Generator().manual_seed(task.seed)
    y = torch.arange(n) % len(classes)
    means = 2.0 * torch.randn(len(classes), 8, generator=g)
    f = means[y] + task.toy_noise * torch.randn(n, 8, generator=g)
    names = ["imu", FUSED]
    feats = SensorFeatures(names, {m: f for m in names}, torch.ones(n, 2, dtype=torch.bool), {})
    meta = DatasetMeta("toy", {}, {"state": TaskSpec("state", classes)})
    fill = {"task": "state", "sensors": "imu", "options": ", ".join(classes)}

    def example(i: int, templates: str) -> Example:
        questions = TASK_QUESTIONS[templates]
        q = questions[i % len(questions)].format(**fill)
        turn = Turn(q, classes[int(y[i])])
        return Example(i, ("imu",), (turn,), "task", "state", int(y[i]), templates)

    train = [example(i, "train") for i in range(task.toy_train)]
    evals = [example(i, "heldout") for i in range(task.toy_train, n)]
    # the Bayes-style ceiling: nearest true class mean, on the evaluated rows
    nearest = torch.cdist(f[task.toy_train :], means).argmin(1) == y[task.toy_train :]
    reference = {"name": "nearest true class mean", "accuracy": float(nearest.float().mean())}
    return TaskData(feats, train, evals, meta, ["state"], reference)


def _bundle_data(task: LoraTask) -> TaskData:
    """The central stage's recipe (recipe.py, the same function stage.py calls): rows from
    ``llm.data`` (by default tokens uploaded by the nodes), training instructions from the
    fit rows, the held-out-template test questions."""
    from fed_iotlm.federation.bundle import bundle_standardizer, load_bundle

    from .evaluation import head_accuracy
    from .recipe import labelled_rows, stage_data, stage_questions

    cfg = json.loads(task.cfg_json)
    encoder, bundle_meta = load_bundle(Path(cfg["llm"]["bundle"]))
    data = stage_data(cfg, encoder, bundle_standardizer(bundle_meta))
    tasks = list(data.meta.tasks)
    qs = stage_questions(data, cfg["llm"], task.seed, tasks)
    evals = [ex for t in tasks for ex in qs.test[t]]
    head = head_accuracy(data.feats, evals)["accuracy"]
    reference = {"name": "federated classifier head", "accuracy": head}
    nodes = data.source.get("nodes") if data.train_nodes is not None else None
    return TaskData(
        data.feats, qs.train, evals, data.meta, tasks, reference,
        data.train_nodes, labelled_rows(data.train), nodes,
    )  # fmt: skip


@lru_cache(maxsize=4)
def task_sites(task: LoraTask, sites: int | str) -> SiteSplit:
    """The task's training instructions split over ``sites`` (``auto`` or a number) by
    ``task.site_split``; the server and every site compute the same split."""
    data = load_task_data(task)
    return split_sites(
        data.train, task.site_split, sites, task.seed, data.train_nodes, data.train_labelled,
        data.num_nodes,
    )  # fmt: skip


def site_examples(task: LoraTask, site: int, sites: int | str) -> list[Example]:
    """Site ``site``'s training instructions (empty: the site is idle, see :mod:`.sites`)."""
    split = task_sites(task, sites)
    if not 0 <= site < split.num_sites:
        raise ValueError(f"site {site} is outside a federation of {split.num_sites} sites")
    return list(split.examples[site])


@lru_cache(maxsize=1)
def _base_lm(source: str) -> LoadedLM:
    """The pristine base LM, loaded once per process; every model is built on a copy."""
    return load_lm(source)


def build_model(task: LoraTask, data: TaskData, rank: int) -> tuple[SensorLM, SequenceBuilder]:
    """A fresh SensorLM on a copy of the pristine base, with LoRA of ``rank``.

    Sites rebuild it every round instead of keeping it, so that the only state that
    crosses rounds is what the server sends (a restarted site cannot drift)."""
    base = _base_lm(task.model)
    cond = ConditioningSettings(
        kind=task.conditioning,
        tokens_per_modality=task.tokens_per_modality,
        adapter_layers=task.adapter_layers,
        queries_per_task=task.queries_per_task,
        names=data.feats.names,
        tasks=data.tasks,
        feature_dim=data.feats.dim,
        seed_fusion=task.seed_fusion,
        seed_layers=task.seed_layers,
        seed_rank=task.seed_rank,
        seed_center=task.seed_center,
    )
    lora = LoraSettings(
        rank, task.lora_alpha, task.lora_dropout, task.target_modules, task.lora_top_layers
    )
    torch.manual_seed(task.seed)
    model = SensorLM(replace(base, model=copy.deepcopy(base.model)), lora, cond)
    classes = {t: list(data.meta.tasks[t].classes) for t in data.tasks}
    builder = SequenceBuilder(
        base.tokenizer, data.feats.names, data.tasks, task.tokens_per_modality,
        task.conditioning, classes=classes,
        titles={t: data.meta.tasks[t].title for t in data.tasks},
    )  # fmt: skip
    return model, builder

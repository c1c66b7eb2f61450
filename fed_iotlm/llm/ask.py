"""Answer a question about one sample with a tuned stage run (``fed-iotlm ask``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fed_iotlm.data.dataset import Split
from fed_iotlm.data.modalities import TaskSpec
from fed_iotlm.data.preprocess import standardize_own
from fed_iotlm.federation.bundle import bundle_standardizer, load_bundle

from .features import FUSED, SensorFeatures, sensor_features
from .instructions import Example, Turn, answer_to_class
from .loading import load_lm
from .sensor_lm import SensorLM
from .sequences import Batch, SequenceBuilder
from .tuning import load_weights


@dataclass
class Answer:
    text: str
    sensors: list[str]  # the modalities present in the sample, i.e. what the LM was given
    conditioning: str
    task: str  # the task the question was routed to (the adapter's query set)
    # the class of ``task`` the text names (its identifier, e.g. ``walking_upstairs`` for
    # "walking upstairs"), None if it names none or the run did not record class names
    label: str | None = None
    # modalities the bundle encodes that this sample lacks: masked, so the LM got no
    # token for them (not a token made from the zeros standing in for the missing values)
    missing: tuple[str, ...] = ()


class Assistant:
    """A tuned LM ready to answer: loaded once, asked many times."""

    def __init__(self, run_dir: Path, conditioning: str | None = None):
        run_dir = Path(run_dir)
        results = run_dir / "results.json"
        if not results.is_file():
            raise FileNotFoundError(
                f"{run_dir}: no results.json of an IoT-LM stage run (fed-iotlm tune)"
            )
        doc = json.loads(results.read_text())
        if "llm" not in doc:
            raise ValueError(f"{results}: not an IoT-LM stage run (no 'llm' section)")
        lc = doc["config"]["llm"]
        self.kind = conditioning or doc["llm"]["best"]
        self.encoder, bundle_doc = load_bundle(Path(lc["bundle"]))
        # the federation's pooled training statistics, if the bundle carries them
        self.scaler = bundle_standardizer(bundle_doc)
        self.use_fused = bool(lc["use_fused"])
        names = [m for m in self.encoder.modality_names] + ([FUSED] if self.use_fused else [])
        tasks = [t for t in self.encoder.head if t != (lc.get("fewshot") or {}).get("task")]
        from .stage import conditioning_settings, lora_settings

        cond = conditioning_settings(lc, self.kind, names, tasks, self.encoder.spec.dim)
        lm = load_lm(lc["model"])
        self.model = SensorLM(lm, lora_settings(lc), cond)
        load_weights(self.model, run_dir / f"checkpoint-{self.kind}")
        self.model.eval()
        # the stage's class names route a question to its task's adapter queries (a run
        # written before they were recorded routes by task names alone)
        # and their titles (what the stage's questions called each task; older runs: none)
        classes = doc["llm"].get("task_classes")
        titles = doc["llm"].get("task_titles") or {}
        self.specs = {t: TaskSpec(t, tuple(c)) for t, c in (classes or {}).items()}
        self.builder = SequenceBuilder(
            lm.tokenizer, names, tasks, cond.tokens_per_modality, self.kind, classes=classes,
            titles=titles,
        )  # fmt: skip

    def prompt(
        self, split: Split, index: int, question: str, standardized: bool = False
    ) -> tuple[Batch, SensorFeatures, tuple[str, ...], str]:
        """What the LM is given for ``question`` about row ``index`` of ``split``
        (featurised, not yet standardised unless ``standardized``): the prompt batch, the
        row's sensor features (only that row is encoded), the modalities present in it
        and the task the question is routed to."""
        if not 0 <= index < len(split):
            raise IndexError(f"--index {index}: the split has {len(split)} samples")
        if standardized:
            data = split.subset([index])
        elif self.scaler is not None:  # what the encoders were trained on (per feature)
            data = self.scaler.transform(split.subset([index]))
        else:  # an older bundle without statistics: the data's own (said in the docs)
            data = standardize_own(split).subset([index])
        known = self.encoder.modality_names
        present = tuple(m for m in known if m in data.mask and data.mask[m][0])
        if not present:
            raise ValueError(f"sample {index} has no modality the model bundle knows ({known})")
        feats = sensor_features(self.encoder, data, use_fused=self.use_fused)
        ex = Example(0, present, (Turn(question, ""),), "external", None, None, "ask")
        enc = self.builder.encode(ex, prompt_only=True)
        batch = self.builder.collate([enc], left_pad=True)
        return batch, feats, present, self.builder.tasks[enc.task_id]

    def ask(self, split: Split, index: int, question: str, standardized: bool = False) -> Answer:
        """Answer ``question`` about row ``index`` of ``split`` by greedy generation."""
        batch, feats, present, task = self.prompt(split, index, question, standardized)
        ids = self.model.generate(batch, feats, self.builder.eos_id, max_new_tokens=40)[0]
        text = self.builder.tok.decode(ids, skip_special_tokens=True).strip()
        spec = self.specs.get(task)
        named = answer_to_class(text, spec) if spec is not None else None
        label = None if named is None else spec.classes[named]
        missing = tuple(m for m in self.encoder.modality_names if m not in present)
        return Answer(text, list(present), self.kind, task, label, missing)

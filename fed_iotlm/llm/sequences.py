"""Instruction examples → token ids, answer-only labels and sensor-slot positions.

A sequence is chat turns.  The first user turn carries a *sensor block* whose form
depends on the conditioning:

* ``prefix``: ``Sensors: <imu>■■■■</imu> <audio>■■■■</audio>`` where each ■ is a slot
  position later overwritten by a projected soft token (slot = sample, modality, j);
* ``adapter``, ``seed_adapter``: ``Sensors: imu and audio.`` (the readings enter
  through the adapter);
* ``text``: a text-only description of the readings (the no-sensor-token baseline);
* ``names``: the adapter's sensor list in words and no readings at all (the LoRA-tuned
  text-only control: the same prompt the adapter sees, minus the sensors);
* ``none``: no sensor block (the plain-text reference of the step benchmark).

Labels are -100 everywhere except answer tokens and the end-of-turn marker after them,
so the loss is on answers only.  With ``task_weights`` (``llm.task_weights``) each
example carries its task's loss weight into the batch (:attr:`Batch.weight`).  Text pieces
repeat endlessly across examples, so their token ids are cached per string.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .features import FUSED
from .instructions import Example, describe_present
from .phases import check_task_weights
from .routing import TaskRouter

CONDITIONINGS = ("prefix", "adapter", "seed_adapter", "text", "names", "none")
WORDS_ONLY = ("adapter", "seed_adapter", "names")  # the sensor block names the sensors in words
IGNORE = -100


@dataclass
class Encoded:
    """One tokenised sequence; slot lists are aligned with ``ids`` (-1 = not a slot)."""

    ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    slot_sample: list[int] = field(default_factory=list)
    slot_mod: list[int] = field(default_factory=list)
    slot_j: list[int] = field(default_factory=list)
    sample: int = -1
    task_id: int = 0
    samples: list[int] = field(default_factory=list)  # every recording of the question
    weight: float = 1.0  # the loss weight of the example's task (llm.task_weights)
    # per token: the task its turn's question asks about, and its segment (in-context
    # example i, then the question itself); per recording in ``samples``: its segment
    token_task: list[int] = field(default_factory=list)
    token_segment: list[int] = field(default_factory=list)
    sample_segment: list[int] = field(default_factory=list)

    def segmented(self) -> bool:
        """Does the adapter need per-token routing: turns about different tasks, or
        in-context examples whose readings must stay with their own turns?"""
        return len(set(self.token_task)) > 1 or len(set(self.token_segment)) > 1


@dataclass
class Batch:
    ids: torch.Tensor  # [B, T]
    attn: torch.Tensor  # [B, T] 1 = token, 0 = padding
    labels: torch.Tensor  # [B, T]
    slot_sample: torch.Tensor  # [B, T] sample row of a soft token, -1 elsewhere
    slot_mod: torch.Tensor  # [B, T] index into the feature names
    slot_j: torch.Tensor  # [B, T] which of the k tokens
    sample: torch.Tensor  # [B] the sample the (last) question is about
    task_id: torch.Tensor  # [B] adapter query set: the task the last question asks about
    # [B, S] every recording a question is about (-1 pads); None: ``sample`` alone
    samples: torch.Tensor | None = None
    # [B] per-example loss weight (llm.task_weights); None: unweighted mean
    weight: torch.Tensor | None = None
    # per-token adapter routing, only where a sequence needs it (Encoded.segmented):
    # [B, T] each token's task and segment (padding: its row's last), [B, S] each
    # recording's segment (-1 pads); None: one task and one segment per sequence
    token_task: torch.Tensor | None = None
    token_segment: torch.Tensor | None = None
    sample_segment: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{k: None if v is None else v.to(device) for k, v in vars(self).items()})

    def recordings(self) -> torch.Tensor:
        """[B, S] the sample rows whose readings each sequence carries (-1 pads)."""
        return self.sample[:, None] if self.samples is None else self.samples


_SENTINEL = "\x01{}\x01"


def chat_markers(tokenizer) -> tuple[str, str, str, str]:
    """(user turn opening, user turn closing + assistant opening, end of turn, text after
    the end of turn), read from the tokenizer's own chat template (``apply_chat_template``
    on sentinel messages), so any chat model's format is used as it was trained; the
    template's default system prompt is left out.  Tokenizers without a template get a
    plain ``### User:`` / ``### Assistant:`` layout ending in the EOS token."""
    if not getattr(tokenizer, "chat_template", None):
        return "### User:\n", "\n### Assistant:\n", tokenizer.eos_token, "\n"
    u1, a1, u2, a2 = (_SENTINEL.format(n) for n in ("u1", "a1", "u2", "a2"))
    msgs = [
        {"role": r, "content": c}
        for r, c in zip(("user", "assistant") * 2, (u1, a1, u2, a2), strict=True)
    ]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    tail = text[text.index(a2) + len(a2) :]
    eos = tail.strip()
    between = text[text.index(a1) + len(a1) : text.index(u2)]
    one_token = bool(eos) and len(tokenizer(eos, add_special_tokens=False)["input_ids"]) == 1
    if not one_token or not between.startswith(tail):
        raise ValueError(
            f"{type(tokenizer).__name__}: cannot read the turn markers from its chat template "
            f"(an assistant turn ends with {tail!r}, expected one special token)"
        )
    gap = tail[tail.index(eos) + len(eos) :]
    user_close = text[text.index(u2) + len(u2) : text.index(a2)]
    return between[len(tail) :], user_close, eos, gap


class SequenceBuilder:
    """Tokenises examples for one LM, one conditioning and one feature layout."""

    def __init__(
        self,
        tokenizer,
        names: list[str],
        tasks: list[str],
        k: int,
        conditioning: str,
        describe: Callable[[int], str] | None = None,
        classes: Mapping[str, Sequence[str]] | None = None,
        task_weights: Mapping[str, float] | None = None,
        titles: Mapping[str, str] | None = None,
    ):
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"llm.conditioning={conditioning!r}; choose one of {CONDITIONINGS}")
        if conditioning == "text" and describe is None:
            raise ValueError("text conditioning needs a describe(sample) function")
        self.tok, self.names, self.tasks, self.k = tokenizer, list(names), list(tasks), k
        # the adapter's query set per sequence: the task its last question asks about
        self.router = TaskRouter(self.tasks, classes, titles) if self.tasks else None
        self.conditioning, self.describe = conditioning, describe
        # None: batches carry no weights (the unweighted loss, exactly as before)
        self.task_weights = (
            None if task_weights is None else check_task_weights(task_weights, tasks)
        )
        markers = chat_markers(tokenizer)
        self.user_open, self.user_close, self.eos_text, self.turn_gap = markers
        self.eos_id = tokenizer.convert_tokens_to_ids(self.eos_text)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self._cache: dict[str, list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def _text(self, enc: Encoded, text: str, supervised: bool = False) -> None:
        ids = self._ids(text)
        enc.ids += ids
        enc.labels += ids if supervised else [IGNORE] * len(ids)
        enc.slot_sample += [-1] * len(ids)
        enc.slot_mod += [-1] * len(ids)
        enc.slot_j += [-1] * len(ids)

    def _sensor_block(self, enc: Encoded, ex: Example) -> None:
        """One block per recording; a question about several recordings (comparison,
        count) numbers them, ``Recording 1: ...``, in the order of ``ex.rows``."""
        if self.conditioning == "none":
            return
        rows, presents = ex.rows, ex.row_presents
        many = len(rows) > 1
        label = (lambda r: f"recording {r + 1}: ") if many else (lambda r: "")  # noqa: E731
        if self.conditioning in WORDS_ONLY:
            parts = [f"{label(r)}{describe_present(p)}" for r, p in enumerate(presents)]
            self._text(enc, f"Sensors: {'; '.join(parts)}.\n")
            return
        if self.conditioning == "text":
            parts = [f"{label(r)}{self.describe(i)}" for r, i in enumerate(rows)]
            self._text(enc, f"Sensors: {' '.join(parts)}\n")
            return
        self._text(enc, "Sensors:")
        for r, (row, real) in enumerate(zip(rows, presents, strict=True)):
            if many:
                self._text(enc, f"\nRecording {r + 1}:")
            self._slots(enc, row, real)
        self._text(enc, "\n")

    def _slots(self, enc: Encoded, row: int, real: Sequence[str]) -> None:
        """``<m>`` + k slot positions + ``</m>`` for each present modality of ``row``."""
        shown = [m for m in self.names if m in real or (m == FUSED and real)]
        for m in shown:
            self._text(enc, f" <{m}>")
            mi = self.names.index(m)
            enc.ids += [self.pad_id] * self.k
            enc.labels += [IGNORE] * self.k
            enc.slot_sample += [row] * self.k
            enc.slot_mod += [mi] * self.k
            enc.slot_j += list(range(self.k))
            self._text(enc, f"</{m}>")

    def _example(self, enc: Encoded, ex: Example, answer_last: bool, segment: int) -> None:
        """``ex``'s turns; every token of a turn is routed by that turn's question (its
        answer is trained with the queries of the task it answers) and marked with the
        example's ``segment``, whose recordings are ``ex.rows``."""
        enc.samples += list(ex.rows)
        enc.sample_segment += [segment] * len(ex.rows)
        for t, turn in enumerate(ex.turns):
            start = len(enc.ids)
            self._text(enc, self.user_open)
            if t == 0:
                self._sensor_block(enc, ex)
            self._text(enc, turn.question + self.user_close)
            if answer_last or t < len(ex.turns) - 1:
                self._text(enc, turn.answer + self.eos_text, supervised=True)
                self._text(enc, self.turn_gap)
            grown = len(enc.ids) - start
            enc.token_task += [self._route(turn.question, ex.task)] * grown
            enc.token_segment += [segment] * grown

    def encode(
        self, ex: Example, shots: Sequence[Example] = (), prompt_only: bool = False
    ) -> Encoded:
        """``shots`` (answered in-context examples) come first; ``prompt_only`` stops
        where the assistant's last answer would start (generation).  ``samples`` lists
        the shots' recordings, then the question's (the adapter reads each segment's own
        beside its own turns; prefix conditioning has them in its slots)."""
        enc = Encoded(sample=ex.index, task_id=self.task_id(ex))
        if self.task_weights is not None:  # by the example's own task (1 for none)
            enc.weight = float(self.task_weights.get(ex.task, 1.0)) if ex.task else 1.0
        for i, shot in enumerate(shots):
            self._example(enc, shot, answer_last=True, segment=i)
        self._example(enc, ex, answer_last=not prompt_only, segment=len(shots))
        return enc

    def answer_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` as a supervised answer (tokenised together with the end
        of turn, exactly as in training)."""
        return list(self._ids(text + self.eos_text))

    def task_id(self, ex: Example) -> int:
        """The adapter query set of ``ex``: the task its last question asks about
        (:mod:`fed_iotlm.llm.routing`), so a dialog's follow-up and ``ask`` reach theirs."""
        return self._route(ex.turns[-1].question, ex.task)

    def _route(self, question: str, task: str | None) -> int:
        return 0 if self.router is None else self.router.route(question, default=task)

    def collate(self, encs: Sequence[Encoded], left_pad: bool = False) -> Batch:
        """Pad to the longest sequence: right for training, left for generation."""
        width = max(len(e.ids) for e in encs)

        def pad(values: list[int], fill: int) -> list[int]:
            gap = [fill] * (width - len(values))
            return gap + values if left_pad else values + gap

        def stack(attr: str, fill: int) -> torch.Tensor:
            return torch.tensor([pad(getattr(e, attr), fill) for e in encs], dtype=torch.long)

        def own_last(attr: str) -> torch.Tensor:  # padding takes its row's last value
            return torch.tensor([pad(v, v[-1]) for v in (getattr(e, attr) for e in encs)])

        attn = torch.tensor([pad([1] * len(e.ids), 0) for e in encs], dtype=torch.long)
        recs = [e.samples or [e.sample] for e in encs]
        most = max(len(r) for r in recs)
        segmented = any(e.segmented() for e in encs)
        samples = sample_segment = None
        if most > 1 or segmented:  # only these batches carry the [B, S] table
            samples = torch.tensor([r + [-1] * (most - len(r)) for r in recs], dtype=torch.long)
        if segmented:
            sample_segment = torch.tensor(
                [e.sample_segment + [-1] * (most - len(e.sample_segment)) for e in encs]
            )
        return Batch(
            ids=stack("ids", self.pad_id),
            attn=attn,
            labels=stack("labels", IGNORE),
            slot_sample=stack("slot_sample", -1),
            slot_mod=stack("slot_mod", -1),
            slot_j=stack("slot_j", -1),
            sample=torch.tensor([e.sample for e in encs], dtype=torch.long),
            task_id=torch.tensor([e.task_id for e in encs], dtype=torch.long),
            samples=samples,
            weight=None
            if self.task_weights is None
            else torch.tensor([e.weight for e in encs], dtype=torch.float32),
            token_task=own_last("token_task") if segmented else None,
            token_segment=own_last("token_segment") if segmented else None,
            sample_segment=sample_segment,
        )

"""Modality and task descriptions, and the registry of modality kinds.

A *kind* fixes how one sample of a modality is laid out in the exchange format and
which encoder family reads it.  Everything downstream (validation, preprocessing,
encoders) dispatches on the kind, never on the modality's name, so a user can call a
modality ``"wrist"`` or ``"ceiling_cam"`` and still get the right treatment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# kind -> rank of ONE raw sample in the exchange format (the [N] axis excluded)
RAW_SAMPLE_RANK: dict[str, int] = {
    "imu": 2,  # [T, C]
    "timeseries": 2,  # [T, C]
    "audio": 1,  # [L] waveform
    "image": 3,  # [C, H, W]
    "depth": 3,  # [C, H, W]
    "thermal": 3,  # [C, H, W]
    "tabular": 1,  # [D]
    "gps": 1,  # [D]  (lat, lon, alt, speed, ... as the user chooses)
}

# kind -> layout of the *features* the encoders read, after preprocessing:
#   sequence [T, C]  (audio becomes a log-mel sequence [frames, mels])
#   grid     [C, H, W]
#   vector   [D]
FEATURE_LAYOUT: dict[str, str] = {
    "imu": "sequence",
    "timeseries": "sequence",
    "audio": "sequence",
    "image": "grid",
    "depth": "grid",
    "thermal": "grid",
    "tabular": "vector",
    "gps": "vector",
}

KINDS: tuple[str, ...] = tuple(RAW_SAMPLE_RANK)


def in_words(name: str) -> str:
    """An identifier as the words the LM reads and writes: ``walking_upstairs`` ->
    ``walking upstairs``, ``main_activity`` -> ``main activity``.

    Importers keep class and task names as identifiers (they are keys in meta.json and
    results.json); the LM stage never shows it ``in_pocket``, which a tokenizer splits
    oddly and no instruction-tuned LM would write.  This is the one mapping: training
    answers, option lists, option scoring and captions use it, and :func:`name_key`
    compares text with names under it, so an answer "walking upstairs" is the class
    ``walking_upstairs``."""
    return " ".join(name.replace("_", " ").split())


def name_key(text: str) -> str:
    """How text and names are compared: lower case, ``_``/``-`` as spaces, single
    spaces; ``name_key(in_words(c)) == name_key(c)`` for every name ``c``."""
    return " ".join(re.sub(r"[_\-]", " ", text.lower()).split())


def names_read_alike(names: tuple[str, ...] | list[str]) -> list[str]:
    """The first two names that differ only in case, ``_`` or ``-`` ([] if none): under
    :func:`name_key` they are one name, so the LM stage could not tell them apart."""
    seen: dict[str, str] = {}
    for n in names:
        other = seen.setdefault(name_key(n), n)
        if other != n:
            return [other, n]
    return []


def find_name(norm_text: str, name: str) -> re.Match | None:
    """Where ``name`` occurs in ``norm_text`` (already :func:`name_key`-ed) as whole words,
    or None: the one rule by which answers are read back into classes, questions routed
    to tasks and titles checked against classes."""
    key = name_key(name)
    return re.search(rf"(?<!\w){re.escape(key)}(?!\w)", norm_text) if key else None


def names_mentioned(text: str, names: tuple[str, ...] | list[str]) -> list[str]:
    """The ``names`` that ``text`` mentions as whole words under :func:`name_key` (how an
    answer is read back into a class)."""
    norm = name_key(text)
    return [n for n in names if find_name(norm, n)]


def title_problem(title: object, classes: tuple[str, ...] | list[str]) -> str | None:
    """Why ``title`` cannot be a task's title, or None.  It must be a non-empty string
    and name none of the task's classes: an answer "The <title> is <class>" is read back
    by the first class it names, so a title naming one would turn every answer into it
    (ExtraSensory's ``indoors``: "The indoors or outdoors is outdoors" reads indoors)."""
    if not isinstance(title, str) or not title.strip():
        return f"expected a non-empty string, got {title!r}"
    named = names_mentioned(title, classes)
    if named:
        return (
            f"{title!r} names the class(es) {named}; an answer 'The {title.strip()} is ...' "
            "would read as that class, so choose words without a class name"
        )
    return None


class UnknownKindError(ValueError):
    """A modality declared a kind that the registry does not know."""


def check_kind(kind: str, where: str) -> str:
    """Return ``kind`` if the registry knows it, else raise an error naming ``where``."""
    if kind not in RAW_SAMPLE_RANK:
        raise UnknownKindError(
            f"{where}: unknown modality kind {kind!r}; known kinds: {', '.join(KINDS)}"
        )
    return kind


@dataclass(frozen=True)
class ModalitySpec:
    """One modality of a dataset: its name, kind and (optional) sensor details."""

    name: str
    kind: str
    rate_hz: float | None = None
    channels: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        check_kind(self.kind, f"modality {self.name!r}")

    @property
    def raw_rank(self) -> int:
        """Rank of one raw sample ([N] excluded) in the exchange format."""
        return RAW_SAMPLE_RANK[self.kind]

    @property
    def layout(self) -> str:
        """Feature layout after preprocessing: ``sequence``, ``grid`` or ``vector``."""
        return FEATURE_LAYOUT[self.kind]

    def to_json(self) -> dict:
        out: dict = {"kind": self.kind}
        if self.rate_hz is not None:
            out["rate_hz"] = self.rate_hz
        if self.channels:
            out["channels"] = list(self.channels)
        return out


@dataclass(frozen=True)
class TaskSpec:
    """One classification task: its name and ordered class names (label i = classes[i])."""

    name: str
    classes: tuple[str, ...]
    type: str = "classification"
    # optional words per class, aligned with ``classes`` ("" = none given): what the LM
    # stage shows beside a class name when it lists the options (meta.json
    # ``tasks.<t>.descriptions``); empty: no descriptions at all
    descriptions: tuple[str, ...] = ()
    # what questions call the task (meta.json ``tasks.<t>.title``, e.g. "indoor or outdoor
    # setting" for a task named ``indoors``); "" = the name in words (:attr:`title`)
    given_title: str = ""

    def __post_init__(self) -> None:
        alike = names_read_alike(self.classes)
        if alike:
            raise ValueError(
                f"task {self.name!r}: classes {alike[0]!r} and {alike[1]!r} read the same in "
                f"words ({in_words(alike[1])!r}), so an answer naming one could not be told apart"
            )
        problem = title_problem(self.given_title, self.classes) if self.given_title else None
        if problem:
            raise ValueError(f"task {self.name!r}: title {problem}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def title(self) -> str:
        """What questions call the task: its given title, else its name in words
        (``main activity``).  A name is an identifier and may be one of its classes
        (``indoors``), which asks "What is the indoors?"; a title says it in words."""
        return self.given_title.strip() or in_words(self.name)

    def words(self, label: int) -> str:
        """Class ``label`` as the LM reads and writes it (:func:`in_words`)."""
        return in_words(self.classes[label])

    @property
    def class_words(self) -> tuple[str, ...]:
        """Every class in words, in label order."""
        return tuple(in_words(c) for c in self.classes)

    def description(self, label: int) -> str:
        """Class ``label`` in words: its description if the data gives one, else its
        name in words with the task's ("in pocket (phone position)"), so every class has one."""
        given = self.descriptions[label] if label < len(self.descriptions) else ""
        return given or f"{self.words(label)} ({self.title})"

    def to_json(self) -> dict:
        out: dict = {"type": self.type, "classes": list(self.classes)}
        if self.given_title:
            out["title"] = self.given_title
        if any(self.descriptions):
            out["descriptions"] = {
                c: d for c, d in zip(self.classes, self.descriptions, strict=True) if d
            }
        return out

"""The ``flwr run`` command lines the docs show, read from the docs themselves.

Tests take the commands from the Markdown rather than restating them, so a doc that
drifts from what runs (a missing ``num-supernodes``, an override the config refuses)
fails a test instead of a reader.  A command is a line of a fenced ``bash`` block that
starts with ``flwr run`` (backslash continuations joined, ``# comments`` dropped), or
an inline code span starting with ``flwr run`` that passes a ``--run-config``.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^```bash\n(.*?)^```", re.M | re.S)
_INLINE = re.compile(r"`(flwr run [^\s`-][^`]*--run-config[^`]*)`")
_VALUED = {"--run-config", "-c", "--federation-config", "--format", "--federation"}
_FLAGS = {"--stream"}
_SHELL = {">", ">>", "|", "&&", ";", "&"}
FLOWER_DEFAULT_SUPERNODES = 2  # a managed local SuperLink's simulation size unless told


@dataclass
class FlwrRun:
    """One documented ``flwr run``: where it was found and its parsed arguments."""

    doc: Path
    text: str  # the command as the doc shows it (continuations joined)
    app: str = "."
    connection: str | None = None  # None: the default connection (the managed local one)
    run_config: list[str] = field(default_factory=list)
    federation_config: list[str] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}: {self.text}"


def parse(doc: Path, text: str, env: dict[str, str] | None = None) -> FlwrRun:
    """``text`` (``$NAME`` taken from ``env``) as a :class:`FlwrRun`; ValueError if it
    is not a ``flwr run`` line this parser knows."""
    for name, value in (env or {}).items():
        text = text.replace(f"${name}", value)
    tokens = shlex.split(text, comments=True)
    if tokens[:2] != ["flwr", "run"]:
        raise ValueError(f"not a flwr run command: {text!r}")
    run = FlwrRun(doc=doc, text=text)
    positional: list[str] = []
    rest = iter(tokens[2:])
    for token in rest:
        if token in _SHELL:  # a redirection or the next command: not flwr's
            break
        if token in _FLAGS:
            run.options[token] = ""
        elif token in _VALUED:
            value = next(rest, None)
            if value is None:
                raise ValueError(f"{token} without a value in {text!r}")
            if token in ("--run-config", "-c"):
                run.run_config.append(value)
            elif token == "--federation-config":
                run.federation_config.append(value)
            else:
                run.options[token] = value
        elif token.startswith("-"):
            raise ValueError(f"unknown option {token} in {text!r}")
        else:
            positional.append(token)
    if not 1 <= len(positional) <= 2:
        raise ValueError(f"expected APP [CONNECTION], got {positional} in {text!r}")
    run.app = positional[0]
    run.connection = positional[1] if len(positional) == 2 else None
    return run


def _fenced(markdown: str) -> list[str]:
    lines: list[str] = []
    for block in _FENCE.findall(markdown):
        joined = re.sub(r"\\\n\s*", " ", block)
        lines += [" ".join(line.split()) for line in joined.splitlines() if line.strip()]
    return [line for line in lines if line.startswith("flwr run ")]


def documented(env: dict[str, str] | None = None) -> list[FlwrRun]:
    """Every ``flwr run`` the docs show, in document order."""
    found: list[FlwrRun] = []
    for doc in DOCS:
        markdown = doc.read_text()
        inline = [" ".join(span.split()) for span in _INLINE.findall(markdown)]
        found += [parse(doc, text, env) for text in [*_fenced(markdown), *inline]]
    return found

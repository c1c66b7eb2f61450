"""Parameter groups on the wire as one contiguous buffer each.

Why: the default model is 69 small arrays (2 k values on average).  Sent one Flower
``Array`` per key, every array cost the server Python work three times over (decode its
``.npy`` header, a subtraction and a dot to screen it, a ``saxpy`` to aggregate it), and
the server's real path ran at 8–15× a plain numpy sum (``benchmarks/aggregation.py``).
A node now sends each group it holds as one flat buffer (its keys concatenated in the
model's order) plus one small *manifest* naming the keys and shapes inside every buffer,
so the server works per group (a handful of calls per node, not 69) and screening can
still name the key at fault (unknown keys, missing keys, shapes: the manifest is checked
once per distinct manifest, not per node).

The packed record is self-describing: :func:`fed_iotlm.federation.records.record_to_numpy`
unpacks it to ``{key: array}``, so code that reads a reply by key reads either form.  A
state whose group mixes dtypes cannot be one buffer; it travels per key as before.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

from .groups import group_of

# the ArrayRecord entry holding the manifest (no model key starts with "__")
LAYOUT_KEY = "__layout__"


class PackingError(ValueError):
    """A state or buffer that cannot be packed or unpacked by a layout."""


@dataclass(frozen=True)
class GroupLayout:
    """Where each key of one group lies in the group's flat buffer."""

    group: str
    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]  # start of each key, then the buffer's size
    dtype: np.dtype

    @property
    def size(self) -> int:
        return self.offsets[-1]

    def key_at(self, index: int) -> str:
        """The key whose values hold flat position ``index``."""
        return self.keys[int(np.searchsorted(self.offsets, index, side="right")) - 1]

    def span(self, key: str) -> slice:
        i = self.keys.index(key)
        return slice(self.offsets[i], self.offsets[i + 1])

    def pack(self, state: Mapping[str, np.ndarray]) -> np.ndarray:
        """The group's keys of ``state`` as one fresh flat buffer."""
        out = aligned_empty(self.size, self.dtype)
        for key, start, end in zip(self.keys, self.offsets, self.offsets[1:], strict=False):
            out[start:end] = np.asarray(state[key]).reshape(-1)
        return out

    def unpack(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Views of ``flat`` shaped as the group's keys (no copy)."""
        return {
            key: flat[start:end].reshape(shape)
            for key, shape, start, end in zip(
                self.keys, self.shapes, self.offsets, self.offsets[1:], strict=False
            )
        }


@dataclass(frozen=True, eq=False)
class ModelLayout:
    """A model's groups in state order (one :class:`GroupLayout` each)."""

    groups: dict[str, GroupLayout]

    @classmethod
    def of(cls, state: Mapping[str, np.ndarray]) -> ModelLayout:
        """The layout of ``state``; :class:`PackingError` if a group mixes dtypes."""
        return cls.from_spec((k, np.shape(v), np.asarray(v).dtype) for k, v in state.items())

    @classmethod
    def from_spec(cls, spec: Iterable[tuple[str, tuple[int, ...], np.dtype]]) -> ModelLayout:
        """The layout of keys with these shapes and dtypes, in this order."""
        members: dict[str, list[tuple[str, tuple[int, ...], np.dtype]]] = {}
        for key, shape, dtype in spec:
            members.setdefault(group_of(key), []).append((key, tuple(shape), np.dtype(dtype)))
        groups = {}
        for group, entries in members.items():
            dtypes = {dt for _, _, dt in entries}
            if len(dtypes) != 1:
                raise PackingError(f"group {group!r} mixes dtypes {sorted(map(str, dtypes))}")
            shapes = tuple(s for _, s, _ in entries)
            groups[group] = GroupLayout(
                group, tuple(k for k, _, _ in entries), shapes, _offsets(shapes), dtypes.pop()
            )
        return cls(groups)

    @cached_property
    def manifest(self) -> bytes:
        """``[[group, [[key, shape], ...]], ...]`` as compact UTF-8 JSON."""
        body = [
            [g.group, [[k, list(s)] for k, s in zip(g.keys, g.shapes, strict=True)]]
            for g in self.groups.values()
        ]
        return json.dumps(body, separators=(",", ":")).encode()

    def pack(self, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One flat buffer per group of this layout."""
        return {g: layout.pack(state) for g, layout in self.groups.items()}

    def pack_groups(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One flat buffer per group that ``arrays`` holds (all of its keys)."""
        sent = {group_of(k) for k in arrays}
        return {g: layout.pack(arrays) for g, layout in self.groups.items() if g in sent}

    @cached_property
    def keys(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """``{key: (shape, dtype)}`` of every key."""
        return {
            k: (s, g.dtype)
            for g in self.groups.values()
            for k, s in zip(g.keys, g.shapes, strict=True)
        }

    def unpack(self, buffers: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``{key: view}`` for every group in ``buffers``, in the layout's order."""
        out: dict[str, np.ndarray] = {}
        for group, layout in self.groups.items():
            flat = buffers.get(group)
            if flat is not None:
                out.update(layout.unpack(flat))
        return out


def parse_manifest(data: bytes) -> ModelLayout:
    """The layout a manifest describes (dtypes filled in by the buffers)."""
    return _parse_manifest(bytes(data))


@lru_cache(maxsize=256)
def _parse_manifest(data: bytes) -> ModelLayout:
    try:
        body = json.loads(data.decode())
        groups = {}
        for group, entries in body:
            keys = tuple(str(k) for k, _ in entries)
            shapes = tuple(tuple(int(d) for d in s) for _, s in entries)
            groups[str(group)] = GroupLayout(str(group), keys, shapes, _offsets(shapes), _NO_DTYPE)
    except (ValueError, TypeError, UnicodeDecodeError) as err:
        raise PackingError(f"unreadable packed-update manifest: {err}") from err
    return ModelLayout(groups)


@dataclass(frozen=True)
class Problem:
    """A structural problem of an update: the rejection kind, the key, what is wrong."""

    kind: str
    key: str | None
    text: str


@dataclass
class PackedUpdate:
    """One node's update as flat group buffers laid out like the server's model.

    ``problem`` is a structural fault found while decoding (unknown or missing key,
    shape, dtype); screening reports it after the count check, as for a per-key update.
    ``arrays`` gives the per-key views where a rule needs them (robust rules, DP)."""

    node: str
    buffers: dict[str, np.ndarray]
    counts: Mapping[str, float]
    layout: ModelLayout
    problem: Problem | None = None
    nbytes: int = 0  # payload bytes of the reply it was decoded from (the round's bytes up)

    @cached_property
    def arrays(self) -> dict[str, np.ndarray]:
        return self.layout.unpack(self.buffers)


def structure_problem(
    sent: ModelLayout, server: ModelLayout
) -> tuple[Problem | None, tuple[str, ...]]:
    """The first structural problem of a node's manifest against the server's layout, in
    the screen's order (unknown key, missing key, shape), and the groups whose keys came
    in another order (still acceptable: the server reorders them)."""
    return _structure_problem(sent, server)


@lru_cache(maxsize=256)
def _structure_problem(
    sent: ModelLayout, server: ModelLayout
) -> tuple[Problem | None, tuple[str, ...]]:
    known = {
        k: (g, s) for g in server.groups.values() for k, s in zip(g.keys, g.shapes, strict=True)
    }
    for group in sent.groups.values():
        for key in group.keys:
            if key not in known:
                return Problem("unknown_key", key, "not a parameter of the server's model"), ()
            if known[key][0].group != group.group:
                return Problem(
                    "unknown_key", key, f"sent in group {group.group!r}, belongs to another"
                ), ()
    for name in sorted(sent.groups):
        have = set(sent.groups[name].keys)
        if name not in server.groups:  # a group with no keys cannot be sent
            return Problem("unknown_key", name, "not a group of the server's model"), ()
        missing = [k for k in server.groups[name].keys if k not in have]
        if missing:
            return Problem(
                "missing_key", missing[0], f"group {name} sent without {len(missing)} of its keys"
            ), ()
    for group in sent.groups.values():
        for key, shape in zip(group.keys, group.shapes, strict=True):
            expected = known[key][1]
            if shape != expected:
                return Problem("shape", key, f"shape {shape}, expected {expected}"), ()
    reordered = tuple(name for name, g in sent.groups.items() if g.keys != server.groups[name].keys)
    return None, reordered


def decode_buffers(
    sent: ModelLayout,
    flats: Mapping[str, np.ndarray],
    server: ModelLayout,
) -> tuple[dict[str, np.ndarray], Problem | None]:
    """Group buffers in the server's layout from a node's manifest and its flat buffers
    (views where the order already matches, a copy for a reordered group)."""
    problem, reordered = structure_problem(sent, server)
    if problem is not None:
        return {}, problem
    out: dict[str, np.ndarray] = {}
    for name, group in sent.groups.items():
        flat = flats.get(name)
        if flat is None:
            return {}, Problem("missing_key", group.keys[0], f"no buffer for group {name}")
        flat = flat.reshape(-1)
        if flat.size != group.size:
            return {}, Problem(
                "shape",
                group.keys[0],
                f"group {name}'s buffer holds {flat.size} values, its keys {group.size}",
            )
        expected = server.groups[name].dtype
        if flat.dtype != expected:
            return {}, Problem("dtype", group.keys[0], f"dtype {flat.dtype}, expected {expected}")
        if name in reordered:
            flat = server.groups[name].pack(group.unpack(flat))
        out[name] = flat
    return out, None


def pack_state(state: Mapping[str, np.ndarray]) -> tuple[ModelLayout, dict[str, np.ndarray]]:
    """``state``'s layout and its group buffers (raises :class:`PackingError`)."""
    layout = layout_of(state)
    return layout, layout.pack(state)


def layout_of(state: Mapping[str, np.ndarray]) -> ModelLayout:
    """:meth:`ModelLayout.of`, cached by keys, shapes and dtypes (the same model's
    layout is computed once, not once per node and round)."""
    signature = tuple((k, np.shape(v), np.asarray(v).dtype) for k, v in state.items())
    return _layout_by_signature(signature)


@lru_cache(maxsize=64)
def _layout_by_signature(signature: tuple) -> ModelLayout:
    return ModelLayout.from_spec(signature)


# bytes: a cache line and one AVX-512 vector.  numpy's SIMD loops store whole vectors
# without aligning first, and stores that straddle two cache lines made a float32
# subtraction into a buffer twice as slow as into an aligned one (measured)
ALIGN = 64


def aligned_empty(size: int, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """An uninitialised flat buffer of ``size`` values starting on a cache line."""
    dtype = np.dtype(dtype)
    pad = -(-ALIGN // dtype.itemsize) if dtype.itemsize else 0
    raw = np.empty(size + pad, dtype)
    if dtype.itemsize == 0 or ALIGN % dtype.itemsize:
        return raw[:size]
    start = (-raw.ctypes.data % ALIGN) // dtype.itemsize
    return raw[start : start + size]


def _offsets(shapes: Iterable[tuple[int, ...]]) -> tuple[int, ...]:
    out, end = [0], 0
    for shape in shapes:
        end += int(np.prod(shape, dtype=np.int64))
        out.append(end)
    return tuple(out)


# a manifest names keys and shapes; the dtype is the buffer's own
_NO_DTYPE = np.dtype("V1")

"""Conversions between model state and Flower records (what crosses the wire)."""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Mapping
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord
from flwr.common.constant import SType

from .groups import group_of
from .packing import (
    LAYOUT_KEY,
    ModelLayout,
    PackedUpdate,
    PackingError,
    Problem,
    decode_buffers,
    pack_state,
    parse_manifest,
    structure_problem,
)

_group = lru_cache(maxsize=1 << 16)(group_of)

COUNT_PREFIX = "count."


def state_to_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Float32 numpy copy of a model's state dict."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def numpy_to_record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """One Flower ``Array`` per key, as ``Array(ndarray)`` builds it (``.npy`` bytes).

    Filled item by item: ``ArrayRecord(dict)`` rebuilds every ``Array`` it is given
    (``from_array_dict``), which for the default model's 69 arrays was a third of
    encoding the server's new global model each round."""
    record = ArrayRecord()
    for key, value in state.items():
        record[key] = to_array(value)
    return record


def to_array(value: np.ndarray) -> Array:
    """``Array(value)``, byte for byte, with the ``.npy`` header formatted once per
    (dtype, shape): ``np.save`` formats it in Python for every array, which for the
    default model's 69 small arrays cost the server as much per round as summing 50
    nodes' updates."""
    value = np.asarray(value)
    if not value.flags.c_contiguous:
        value = np.ascontiguousarray(value)
    if value.dtype.hasobject:  # Array refuses these; let it say so
        return Array(value)
    header = _npy_header_bytes(value.dtype.str, value.shape)
    if value.dtype.kind in _BUFFER_KINDS:  # header and values joined in one copy
        data = b"".join((header, value))
    else:  # e.g. datetimes, which the buffer protocol does not export
        data = header + value.tobytes()
    return _array(_dtype_text(value.dtype), value.shape, data)


@lru_cache(maxsize=256)
def _dtype_text(dtype: np.dtype) -> str:
    """``str(dtype)`` (what ``Array(ndarray)`` records), computed in Python by numpy:
    once per dtype, not per array."""
    return str(dtype)


def _array(dtype: str, shape: tuple[int, ...], data: bytes) -> Array:
    """``Array(dtype=, shape=, stype=NUMPY, data=)`` for arguments known to be of the
    right types: the four attributes set as ``Array.__init__`` sets them, without its
    argument dispatch (half of its ~13 µs; 69 arrays per new global model)."""
    array = Array.__new__(Array)
    # Array.__setattr__ marks the object dirty and drops its cached id and chunks on
    # every set; a new Array has neither, so the fields go straight into its __dict__,
    # dirty (flwr 1.41 keeps them there; tests/test_packing.py holds the result equal to
    # Array(ndarray), object id included)
    array.__dict__.update(dtype=dtype, shape=shape, stype=SType.NUMPY, data=data, _is_dirty=True)
    return array


# dtype kinds whose C-contiguous arrays export their bytes through the buffer protocol
_BUFFER_KINDS = frozenset("biufc")


@lru_cache(maxsize=4096)
def _npy_header_bytes(dtype: str, shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": dtype, "fortran_order": False, "shape": shape}
    ) if _fits_v1(dtype, shape) else np.lib.format.write_array_header_2_0(
        buffer, {"descr": dtype, "fortran_order": False, "shape": shape}
    )
    return buffer.getvalue()


def _fits_v1(dtype: str, shape: tuple[int, ...]) -> bool:
    # np.save writes format 1.0 unless the header is too long for it
    return len(repr({"descr": dtype, "fortran_order": False, "shape": shape})) < 65000


def packed_record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """``state`` as one flat buffer per parameter group plus the manifest naming what
    each buffer holds (:mod:`~fed_iotlm.federation.packing`): what a node uploads.
    A state whose group mixes dtypes goes per key (:func:`numpy_to_record`)."""
    try:
        layout, buffers = pack_state(state)
    except PackingError:
        return numpy_to_record(state)
    record = ArrayRecord({g: Array(flat) for g, flat in buffers.items()})
    record[LAYOUT_KEY] = Array(np.frombuffer(layout.manifest, dtype=np.uint8))
    return record


def is_packed(record: ArrayRecord) -> bool:
    return LAYOUT_KEY in record


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """``{key: array}`` (writable copies) of a per-key or a packed record."""
    if not is_packed(record):
        return {k: arr.numpy() for k, arr in record.items()}
    manifest = parse_manifest(record[LAYOUT_KEY].numpy().tobytes())
    buffers = {g: record[g].numpy().reshape(-1) for g in manifest.groups if g in record}
    missing = [g for g in manifest.groups if g not in buffers]
    if missing:
        raise PackingError(f"packed record without the buffer(s) of {missing}")
    for name, group in manifest.groups.items():
        if buffers[name].size != group.size:
            raise PackingError(
                f"packed record: group {name}'s buffer holds {buffers[name].size} values, "
                f"its keys {group.size}"
            )
    return manifest.unpack(buffers)


def like_record(template: ArrayRecord, state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """``state`` in the same form as ``template`` (packed or per key): a client mod that
    rewrites a reply's arrays keeps the form the handler chose."""
    return packed_record(state) if is_packed(template) else numpy_to_record(state)


def record_views(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Read-only numpy views onto an ArrayRecord's bytes: no copy, for the server.

    ``Array.numpy`` runs ``np.load`` per array: a copy of the data plus a parse of the
    ``.npy`` header with ``ast.literal_eval``, which was 70 % of the server's
    aggregation time for the default model (``benchmarks/aggregation.py``).  Headers
    repeat for every node and round, so each distinct one is parsed once by numpy's
    own parser; the data is then wrapped in place.  Only for code that never writes
    into an update (screening, aggregation)."""
    return {k: _npy_view(arr.data) for k, arr in record.items()}


def decode_update(
    node: str, record: ArrayRecord, counts: Mapping[str, float], layout: ModelLayout
) -> PackedUpdate:
    """A node's reply as group buffers in the server's ``layout``, without copying the
    data where the reply was packed in that layout (the usual case); a per-key reply is
    packed here.  A structural fault (unknown or missing key, shape, dtype, an array
    the manifest does not name) is kept in ``problem`` for screening to report."""
    if not is_packed(record):
        arrays = record_views(record)
        problem = structural_problem(arrays, layout)
        buffers = {} if problem else layout.pack_groups(arrays)
        return PackedUpdate(node, buffers, counts, layout, problem, record_nbytes(record))
    manifest = record[LAYOUT_KEY].data
    try:
        sent = _manifest(manifest)
    except (PackingError, ValueError) as err:
        problem = Problem("unknown_key", LAYOUT_KEY, str(err))
        return PackedUpdate(node, {}, counts, layout, problem, record_nbytes(record))
    if len(record) != len(sent.groups) + 1:
        extra = next(k for k in record if k != LAYOUT_KEY and k not in sent.groups)
        problem = Problem("unknown_key", extra, "an array the packed manifest does not name")
        return PackedUpdate(node, {}, counts, layout, problem, record_nbytes(record))
    arrays = dict(record.items())  # one copy of the typed dict, then plain lookups
    expected = _expected_buffers(sent, layout)
    buffers = _views_as_expected(arrays, expected)
    if buffers is not None:  # each buffer's length was checked: the sizes are known
        return PackedUpdate(node, buffers, counts, layout, None, expected[1] + len(manifest))
    flats = {g: _flat_view(arrays[g]) for g in sent.groups if g in arrays}
    buffers, problem = decode_buffers(sent, flats, layout)
    return PackedUpdate(node, buffers, counts, layout, problem, record_nbytes(record))


# per group of the usual reply: (name, the .npy header np.save writes for the server's
# group buffer, the Array's byte length, dtype, number of values); and their total length
_Expected = tuple[tuple[tuple[str, bytes, int, np.dtype, int], ...], int]


@lru_cache(maxsize=256)
def _expected_buffers(sent: ModelLayout, server: ModelLayout) -> _Expected | None:
    """What each buffer of a reply with manifest ``sent`` holds when nothing is wrong
    and no group needs reordering (once per distinct manifest); None otherwise."""
    problem, reordered = structure_problem(sent, server)
    if problem is not None or reordered:
        return None
    out = []
    for name, group in sent.groups.items():
        dtype = server.groups[name].dtype
        header = _npy_header_bytes(dtype.str, (group.size,))
        out.append((name, header, len(header) + group.size * dtype.itemsize, dtype, group.size))
    return tuple(out), sum(entry[2] for entry in out)


def _views_as_expected(
    arrays: Mapping[str, Array], expected: _Expected | None
) -> dict[str, np.ndarray] | None:
    """Read-only views of the group buffers if every one is exactly as ``expected``
    (its header byte for byte, its length); None sends the reply through
    :func:`~fed_iotlm.federation.packing.decode_buffers`, which names what differs."""
    if expected is None:
        return None
    buffers = {}
    for name, header, nbytes, dtype, count in expected[0]:
        arr = arrays.get(name)
        if arr is None:
            return None
        data = arr.data
        if len(data) != nbytes or not data.startswith(header):
            return None
        buffers[name] = np.frombuffer(data, dtype, count, len(header))
    return buffers


@lru_cache(maxsize=256)
def _manifest(data: bytes) -> ModelLayout:
    return parse_manifest(_npy_view(data).tobytes())


def structural_problem(arrays: Mapping[str, np.ndarray], layout: ModelLayout) -> Problem | None:
    """The first of: a key the model lacks, a group sent without all its keys, a wrong
    shape, a wrong dtype (the screen's order; one problem per update)."""
    known = layout.keys
    for key in arrays:
        if key not in known:
            return Problem("unknown_key", key, "not a parameter of the server's model")
    for group in sorted({_group(k) for k in arrays}):
        missing = [k for k in layout.groups[group].keys if k not in arrays]
        if missing:
            return Problem(
                "missing_key", missing[0], f"group {group} sent without {len(missing)} of its keys"
            )
    for key, value in arrays.items():
        shape, dtype = known[key]
        if value.shape != shape:
            return Problem("shape", key, f"shape {value.shape}, expected {shape}")
        if value.dtype != dtype:
            return Problem("dtype", key, f"dtype {value.dtype}, expected {dtype}")
    return None


def _flat_view(arr: Array) -> np.ndarray:
    """A read-only view of a 1-D ``Array``'s data; its header is checked against the
    one ``np.save`` writes for the dtype and shape the Array declares (one cached
    comparison), anything else goes through :func:`_npy_view`."""
    data = arr.data
    if len(arr.shape) == 1:
        known = _flat_header(arr.dtype, arr.shape[0])
        if known is not None:
            header, dtype = known
            if len(data) == len(header) + arr.shape[0] * dtype.itemsize and data.startswith(header):
                return np.frombuffer(data, dtype=dtype, offset=len(header))
    return _npy_view(data)


@lru_cache(maxsize=4096)
def _flat_header(dtype_name: str, size: int) -> tuple[bytes, np.dtype] | None:
    try:
        dtype = np.dtype(dtype_name)
    except TypeError:
        return None
    if dtype.hasobject:
        return None
    return _npy_header_bytes(dtype.str, (size,)), dtype


def _npy_view(data: bytes) -> np.ndarray:
    major = data[6] if len(data) > 8 else 0
    if major == 1:
        end = 10 + struct.unpack_from("<H", data, 8)[0]
    elif major == 2:
        end = 12 + struct.unpack_from("<I", data, 8)[0]
    else:  # format 3.0 (utf-8 field names) or not .npy at all: numpy decides
        return np.load(io.BytesIO(data), allow_pickle=False)
    shape, fortran, dtype = _npy_header(bytes(data[:end]))
    count = math.prod(shape)
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=end)
    return flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)


@lru_cache(maxsize=4096)
def _npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of an ``.npy`` header, as ``np.load`` reads it."""
    f = io.BytesIO(header)
    fmt = np.lib.format
    read = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if dtype.hasobject:  # np.load(allow_pickle=False) refuses these too
        raise ValueError("object arrays are not accepted in an update")
    return tuple(shape), bool(fortran), dtype


def load_into(model: torch.nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Load a (possibly partial) state into ``model``; unknown keys are an error."""
    own = model.state_dict()
    unknown = [k for k in state if k not in own]
    if unknown:
        raise KeyError(f"parameters not in the model: {unknown[:5]}")
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}
    model.load_state_dict(tensors, strict=False)


def counts_to_metrics(counts: Mapping[str, float], extra: Mapping[str, float]) -> MetricRecord:
    """Per-group sample counts as ``count.<group>`` entries next to other metrics."""
    out: dict[str, float] = {f"{COUNT_PREFIX}{g}": float(n) for g, n in counts.items()}
    out.update({k: float(v) for k, v in extra.items()})
    return MetricRecord(out)


def metrics_to_counts(metrics: MetricRecord) -> dict[str, float]:
    return {
        k[len(COUNT_PREFIX) :]: float(v) for k, v in metrics.items() if k.startswith(COUNT_PREFIX)
    }


def record_nbytes(record: ArrayRecord) -> int:
    """Payload bytes of an ArrayRecord (array data only)."""
    return int(sum(len(arr.data) for arr in record.values()))


def node_reply(node: int, arrays: Mapping[str, np.ndarray], counts: Mapping[str, float]):
    """A ``train`` reply as a node's ClientApp builds it (its arrays, ``count.<group>``
    metrics), addressed from node ``node`` to the server, standing alone: for exercising
    server-side code without a Grid (tests, ``benchmarks/aggregation.py``)."""
    from flwr.app import Message, Metadata, RecordDict

    content = RecordDict(
        {
            "arrays": packed_record(arrays),
            "metrics": counts_to_metrics(counts, {"num-examples": 10.0, "partition-id": node}),
        }
    )
    metadata = Metadata(
        run_id=1,
        message_id="",
        src_node_id=node + 1,
        dst_node_id=0,
        reply_to_message_id="m",
        group_id="1",
        created_at=0.0,
        ttl=60.0,
        message_type="train",
    )
    return Message(metadata=metadata, content=content)

"""Conversions between model state and Flower records (what crosses the wire)."""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord

COUNT_PREFIX = "count."


def state_to_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Float32 numpy copy of a model's state dict."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def numpy_to_record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: arr.numpy() for k, arr in record.items()}


def record_views(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Read-only numpy views onto an ArrayRecord's bytes: no copy, for the server.

    ``Array.numpy`` runs ``np.load`` per array: a copy of the data plus a parse of the
    ``.npy`` header with ``ast.literal_eval``, which was 70 % of the server's
    aggregation time for the default model (``benchmarks/aggregation.py``).  Headers
    repeat for every node and round, so each distinct one is parsed once by numpy's
    own parser; the data is then wrapped in place.  Only for code that never writes
    into an update (screening, aggregation)."""
    return {k: _npy_view(arr.data) for k, arr in record.items()}


def _npy_view(data: bytes) -> np.ndarray:
    major = data[6] if len(data) > 8 else 0
    if major == 1:
        end = 10 + struct.unpack_from("<H", data, 8)[0]
    elif major == 2:
        end = 12 + struct.unpack_from("<I", data, 8)[0]
    else:  # format 3.0 (utf-8 field names) or not .npy at all: numpy decides
        return np.load(io.BytesIO(data), allow_pickle=False)
    shape, fortran, dtype = _npy_header(bytes(data[:end]))
    count = int(np.prod(shape, dtype=np.int64))
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
            "arrays": numpy_to_record(arrays),
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

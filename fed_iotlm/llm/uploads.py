"""What the nodes send to the central LM stage: sensor tokens and the labels they hold.

The product's promise is that raw windows never leave a node.  So, by default
(``llm.data=nodes``), every node runs the federation's frozen encoders on its own
standardised windows and uploads, per sample, one token per modality it holds (optionally
noised, then int8: the knobs binding already has, ``fed_iotlm/binding/privacy.py``), a
presence flag per modality and its labels (-1 where it has none, i.e. beyond its
``partition.label_fraction``).  The upload is a Flower ``ArrayRecord``, the form a query
message carries.  Two ways it reaches the centre, with identical records (same rows, same
noise seeds, :func:`upload_seed`):

* over Flower: with ``llm.upload.collect`` the federation's server sends a
  ``query.llm_upload`` message with the final model to every node after the last round
  (``clients/llm_upload.py``, ``server/llm_uploads.py``), and writes the replies to
  ``<run>/uploads`` (:mod:`.upload_store`); the stage reads them with ``llm.upload.dir``;
* in-process (simulation, ``llm.upload.dir`` unset): the nodes' data come from the
  federation layout (``build_layout(cfg).node_data(node)``) and the records are computed
  here.  Either way the central stage only ever sees the records.

The centre rebuilds the fused embedding and the federated head's prediction from the
uploaded tokens with the same bundle, so nothing else needs to travel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fed_iotlm.binding.messages import PrivacyConfig
from fed_iotlm.binding.privacy import add_noise, dequantize_int8, quantize_int8
from fed_iotlm.data.dataset import Split
from fed_iotlm.models.multisensory import MultisensoryModel
from fed_iotlm.models.training import SplitTensors

from .features import FUSED, SensorFeatures

TOKEN, PRESENT, LABEL = "tok.", "present.", "label."


@dataclass
class TokenRows:
    """Uploaded rows as the centre holds them: tokens [N, D] and presence per modality,
    labels per task (-1 = the node has no label for that sample)."""

    tokens: dict[str, np.ndarray]
    present: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]

    def __len__(self) -> int:
        return int(next(iter(self.present.values())).shape[0])


PARTS = ("train", "test")
UPLOAD_QUERY = "llm_upload"  # the Flower message type "query.llm_upload" carries an upload


def upload_privacy(cfg: dict) -> PrivacyConfig:
    """``llm.upload``'s knobs (Gaussian noise, then per-row int8) of a run config: the
    node's own, when it encodes; the config's, when simulated in-process."""
    from fed_iotlm.config_schema import block

    up = block(cfg, "llm.upload")
    return PrivacyConfig(float(up["noise_sigma"]), bool(up["quantize"]))


def upload_seed(seed: int, node: int, part: str) -> int:
    """The noise seed of node ``node``'s upload of ``part``: one formula for the in-process
    and the Flower path, so both give the same records."""
    if part not in PARTS:
        raise ValueError(f"part={part!r}: choose train or test")
    return seed * 1000 + node + (0 if part == "train" else 500)


def encode_split(encoder: MultisensoryModel, split: Split, batch_size: int = 512) -> TokenRows:
    """Run on a node: its frozen-encoder tokens for the modalities it holds."""
    return encode_tensors(encoder, SplitTensors.from_split(split), batch_size)


@torch.no_grad()
def encode_tensors(
    encoder: MultisensoryModel, data: SplitTensors, batch_size: int = 512
) -> TokenRows:
    """:func:`encode_split` on a split already held as tensors (a node's runtime)."""
    encoder.eval()
    mods = [m for m in encoder.modality_names if m in data.x]
    if not mods:
        raise ValueError(
            f"the model bundle encodes {encoder.modality_names}; the node holds {list(data.x)}"
        )
    chunks: dict[str, list[np.ndarray]] = {m: [] for m in mods}
    n = len(data)
    for i in range(0, n, batch_size):
        x, _, _ = data.batch(torch.arange(i, min(i + batch_size, n)), mods)
        for m, tok in encoder.encode(x).items():
            chunks[m].append(tok.float().cpu().numpy())
    empty = np.zeros((0, int(encoder.spec.dim)), np.float32)  # a node without samples
    return TokenRows(
        {m: np.concatenate(v) if v else empty for m, v in chunks.items()},
        {m: data.mask[m].cpu().numpy().astype(bool) for m in mods},
        {t: v.cpu().numpy().astype(np.int64) for t, v in data.y.items()},
    )


def pack_upload(rows: TokenRows, privacy: PrivacyConfig, seed: int) -> ArrayRecord:
    """The record a node sends: noised/quantised tokens, presence flags, its labels."""
    arrays: dict[str, np.ndarray] = {}
    for i, (m, tok) in enumerate(rows.tokens.items()):
        x = add_noise(np.asarray(tok, np.float32), privacy.noise_sigma, seed + i)
        if privacy.quantize:
            arrays[f"{TOKEN}{m}.q"], arrays[f"{TOKEN}{m}.scale"] = quantize_int8(x)
        else:
            arrays[f"{TOKEN}{m}"] = np.asarray(x, np.float32)
        arrays[f"{PRESENT}{m}"] = np.asarray(rows.present[m], np.uint8)
    for t, y in rows.labels.items():
        arrays[f"{LABEL}{t}"] = np.asarray(y, np.int64)
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def unpack_upload(record: ArrayRecord) -> TokenRows:
    """What the centre reads back (int8 tokens de-quantised)."""
    mods = [k[len(PRESENT) :] for k in record if k.startswith(PRESENT)]
    tokens = {}
    for m in mods:
        if f"{TOKEN}{m}.q" in record:
            q, scale = record[f"{TOKEN}{m}.q"].numpy(), record[f"{TOKEN}{m}.scale"].numpy()
            tokens[m] = dequantize_int8(q, scale)
        else:
            tokens[m] = record[f"{TOKEN}{m}"].numpy()
    return TokenRows(
        tokens,
        {m: record[f"{PRESENT}{m}"].numpy().astype(bool) for m in mods},
        {k[len(LABEL) :]: record[k].numpy() for k in record if k.startswith(LABEL)},
    )


def upload_bytes(record: ArrayRecord) -> int:
    return int(sum(len(arr.data) for arr in record.values()))


def node_uploads(
    layout, encoder: MultisensoryModel, privacy: PrivacyConfig, part: str, scaler=None
) -> list:
    """Every node's upload of its ``part`` ("train" or "test"), computed in-process from
    the federation layout (simulation).  Noise seeds: :func:`upload_seed`.
    ``scaler``: the federation's pooled input statistics the bundle's encoders were
    trained with (None: each node's own training statistics)."""
    upload_seed(layout.seed, 0, part)  # a bad part fails before any node is encoded
    out = []
    for node in range(layout.num_nodes):
        train, test = layout.node_data(node, scaler)
        rows = encode_split(encoder, train if part == "train" else test)
        out.append(pack_upload(rows, privacy, upload_seed(layout.seed, node, part)))
    return out


def merge_rows(parts: list[TokenRows], modalities: list[str], dim: int) -> TokenRows:
    """Concatenate uploads; a modality a node does not hold is absent (zeros, not present)."""
    if not parts:
        raise ValueError("no uploads to merge")
    tasks = sorted({t for p in parts for t in p.labels})
    tokens: dict[str, list[np.ndarray]] = {m: [] for m in modalities}
    present: dict[str, list[np.ndarray]] = {m: [] for m in modalities}
    labels: dict[str, list[np.ndarray]] = {t: [] for t in tasks}
    for p in parts:
        n = len(p)
        unknown = set(p.tokens) - set(modalities)
        if unknown:
            raise ValueError(f"an upload carries modalities {sorted(unknown)} the bundle lacks")
        for m in modalities:
            tokens[m].append(p.tokens.get(m, np.zeros((n, dim), np.float32)))
            present[m].append(p.present.get(m, np.zeros(n, bool)))
        for t in tasks:
            labels[t].append(p.labels.get(t, np.full(n, -1, np.int64)))
    return TokenRows(
        {m: np.concatenate(v).astype(np.float32) for m, v in tokens.items()},
        {m: np.concatenate(v) for m, v in present.items()},
        {t: np.concatenate(v) for t, v in labels.items()},
    )


@torch.no_grad()
def features_from_rows(
    encoder: MultisensoryModel, rows: TokenRows, use_fused: bool = True
) -> SensorFeatures:
    """The centre's feature table from tokens alone: fused embedding and the federated
    head's prediction recomputed with the same bundle."""
    encoder.eval()
    mods = [m for m in encoder.modality_names if m in rows.tokens]
    tokens = {m: torch.from_numpy(rows.tokens[m]) for m in mods}
    present = {m: torch.from_numpy(rows.present[m]) for m in mods}
    names = mods + ([FUSED] if use_fused else [])
    feats = dict(tokens)
    if use_fused:
        feats[FUSED] = encoder.fuse(tokens, present)
    preds = {t: v.argmax(-1) for t, v in encoder.logits_from_tokens(tokens, present).items()}
    mask = torch.stack([present[m] for m in mods], 1)
    if use_fused:
        mask = torch.cat([mask, mask.any(1, keepdim=True)], 1)
    return SensorFeatures(names, feats, mask, preds)


def token_split(rows: TokenRows) -> Split:
    """A split with masks and labels but no inputs: all instruction building needs."""
    return Split(x={}, mask=dict(rows.present), y=dict(rows.labels))

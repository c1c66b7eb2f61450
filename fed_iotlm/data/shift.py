"""Per-site domain shift on any dataset in the exchange format.

Real federations differ from site to site in *how* they sense, not only in *what*
they see: an IMU strapped on differently, a cheaper microphone, a noisier room.  This
module composes such shifts from a Hydra list (``configs/shift/*.yaml``) and applies
them to a :class:`Split`, so a study can ask "does the method survive hardware
shift?" on any dataset, not only the synthetic one.

Config: a list of entries (or a mapping with the list under ``transforms``)::

    shift:
      - {name: rotation, modalities: [imu], severity: 0.5, sites: [0, 3]}
      - {name: noise, modalities: null, snr_db: 10}

======================  =====================================================
key                     meaning
======================  =====================================================
``name``                a transform in :data:`TRANSFORMS`
``modalities``          modalities to shift; null = every modality whose kind
                        the transform applies to (others skipped silently)
``severity``            strength >= 0 (default 0.5); its meaning per transform
                        is in that function's docstring
``sites``               site ids to shift; null = every site
``site_severity``       ``{site: severity}``: overrides ``severity`` per site
``spread``              in [0, 1]: each site's severity is scaled by a seeded
                        U(1 - spread, 1), so sites differ in strength
any other key           an option of the transform (``snr_db``, ``mode``, ...)
======================  =====================================================

Transforms (raw exchange-format layouts: sequence [N, T, C] for imu/timeseries,
waveform [N, L] for audio, grid [N, C, H, W] for image/depth/thermal, vector [N, D]
for tabular/gps):

- ``rotation`` (imu): IMU placement; one random 3-D rotation of the xyz triplets.
- ``gain_bias`` (sequence, waveform, vector): per-channel gain, offset, optional drift.
- ``noise`` (all): white noise at a given SNR.
- ``resample`` (sequence, waveform): sampling-rate mismatch.
- ``time_warp`` (sequence, waveform): smooth random re-timing.
- ``dropout``: ``mode: span`` zeroes time spans (sequence, waveform), ``channel`` kills
  channels per site (sequence, grid, vector), ``modality`` drops whole samples (all);
  a fully dropped sample gets mask False (never a present sample of zeros).
- ``background``, ``channel_response`` (audio): room noise, microphone EQ (FIR).
- ``brightness``, ``blur``, ``occlusion`` (image/depth/thermal).

Label shift is not here: Dirichlet label skew and natural per-site/subject splits are
partition schemes (:func:`fed_iotlm.data.partition.partition_indices`, ``partition=
dirichlet`` / ``partition=natural``); combine them with these input shifts freely.

Determinism: each (entry, modality, site) has its own generator seeded from
``(seed, entry index, transform name, modality, site)``; site parameters (the rotation,
gains, EQ, dead channels, occluder) are drawn from it first, so a site always gets the
same hardware whether it is shifted alone, per node or within the whole dataset.
Per-sample draws (noise values, dropout spans) follow, and are reproducible for the
same samples in the same order.

Where to call it: per node, on RAW arrays, after the partition and before
featurisation and standardisation.  In ``fed_iotlm/data/federation.py`` that means
shifting the raw dataset between ``load_dataset``/``make_synthetic`` and
``featurize_dataset``, with ``site_ids`` = each sample's node
(:func:`site_ids_from_parts` on the train/test partitions) or its natural site
(``split.site``), and ``specs=ds.meta.modalities``; the node's own
:class:`~fed_iotlm.data.preprocess.Standardizer` then sees the shifted data, as a real
node would.  Audio transforms need the waveform, so a featurised split (audio as a
log-mel sequence) is refused with an error saying so.
"""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from . import shift_audio, shift_image, shift_sensor
from .dataset import Split
from .modalities import FEATURE_LAYOUT, RAW_SAMPLE_RANK, ModalitySpec

ALL_LAYOUTS = frozenset({"sequence", "waveform", "grid", "vector"})
TIME_LAYOUTS = frozenset({"sequence", "waveform"})

# raw layout -> the array layout as a user would picture it, for error messages
LAYOUT_SHAPES: dict[str, str] = {
    "sequence": "[N, T, C]",
    "waveform": "[N, L]",
    "grid": "[N, C, H, W]",
    "vector": "[N, D]",
}

_ENTRY_KEYS = frozenset({"name", "modalities", "severity", "sites", "site_severity", "spread"})


@dataclass(frozen=True)
class ShiftTransform:
    """A registered transform: its function and the raw layouts (and, narrower, the
    kinds) it makes sense for.  ``drops`` marks the one that can drop whole samples."""

    fn: Callable[..., Any]
    layouts: frozenset[str]
    kinds: frozenset[str] | None = None
    drops: bool = False
    by_mode: Mapping[str, frozenset[str]] | None = None  # layouts per value of ``mode``

    def options(self) -> dict[str, inspect.Parameter]:
        """The transform's own options: its keyword-only parameters except ``layout``."""
        params = inspect.signature(self.fn).parameters.values()
        return {p.name: p for p in params if p.kind is p.KEYWORD_ONLY and p.name != "layout"}

    def layouts_for(self, params: Mapping[str, Any]) -> frozenset[str]:
        """Layouts it applies to with these options (dropout's depend on its ``mode``)."""
        if self.by_mode is None:
            return self.layouts
        mode = params.get("mode", self.options()["mode"].default)
        return self.by_mode.get(mode, self.layouts)

    def applies_to(self, kind: str, params: Mapping[str, Any]) -> bool:
        if self.kinds is not None and kind not in self.kinds:
            return False
        return raw_layout(kind) in self.layouts_for(params)


TRANSFORMS: dict[str, ShiftTransform] = {
    "rotation": ShiftTransform(shift_sensor.rotation, frozenset({"sequence"}), frozenset({"imu"})),
    "gain_bias": ShiftTransform(
        shift_sensor.gain_bias, frozenset({"sequence", "waveform", "vector"})
    ),
    "noise": ShiftTransform(shift_sensor.noise, ALL_LAYOUTS),
    "resample": ShiftTransform(shift_sensor.resample, TIME_LAYOUTS),
    "time_warp": ShiftTransform(shift_sensor.time_warp, TIME_LAYOUTS),
    "dropout": ShiftTransform(
        shift_sensor.dropout,
        ALL_LAYOUTS,
        drops=True,
        by_mode={
            "span": TIME_LAYOUTS,
            "channel": frozenset({"sequence", "grid", "vector"}),
            "modality": ALL_LAYOUTS,
        },
    ),
    "background": ShiftTransform(shift_audio.background, frozenset({"waveform"})),
    "channel_response": ShiftTransform(shift_audio.channel_response, frozenset({"waveform"})),
    "brightness": ShiftTransform(shift_image.brightness, frozenset({"grid"})),
    "blur": ShiftTransform(shift_image.blur, frozenset({"grid"})),
    "occlusion": ShiftTransform(shift_image.occlusion, frozenset({"grid"})),
}


def raw_layout(kind: str) -> str:
    """How one raw sample of ``kind`` is laid out: sequence, waveform, grid or vector."""
    rank = RAW_SAMPLE_RANK[kind]
    if rank == 1:
        return "waveform" if FEATURE_LAYOUT[kind] == "sequence" else "vector"
    return {2: "sequence", 3: "grid"}[rank]


# ------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class ShiftEntry:
    """One validated entry of the ``shift`` list."""

    index: int
    name: str
    modalities: tuple[str, ...] | None
    severity: float = 0.5
    sites: frozenset[int] | None = None
    site_severity: dict[int, float] = field(default_factory=dict)
    spread: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"shift[{self.index}] ({self.name})"

    @property
    def transform(self) -> ShiftTransform:
        return TRANSFORMS[self.name]


def parse_shift_config(cfg: Any) -> list[ShiftEntry]:
    """Validate a ``shift`` config: None / [] (no shift), a list of entries, or a
    mapping holding the list under ``transforms``.  Errors name the entry and key."""
    cfg = _plain(cfg)
    if cfg is None:
        return []
    if isinstance(cfg, Mapping):
        unknown = sorted(set(cfg) - {"transforms"})
        if unknown:
            raise ValueError(f"shift: unknown key(s) {unknown}; expected a list or {{transforms}}")
        cfg = cfg.get("transforms") or []
    if not isinstance(cfg, Sequence) or isinstance(cfg, str):
        raise ValueError(f"shift: expected a list of transforms, got {type(cfg).__name__}")
    return [_parse_entry(i, raw) for i, raw in enumerate(cfg)]


def _plain(cfg: Any) -> Any:
    """OmegaConf containers -> plain Python (Hydra hands us DictConfig/ListConfig)."""
    try:
        from omegaconf import OmegaConf
    except ImportError:  # pragma: no cover - hydra is a dependency
        return cfg
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg


def _parse_entry(index: int, raw: Any) -> ShiftEntry:
    where = f"shift[{index}]"
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected a mapping with a 'name', got {type(raw).__name__}")
    name = raw.get("name")
    if name not in TRANSFORMS:
        raise ValueError(f"{where}: unknown transform {name!r}; known: {sorted(TRANSFORMS)}")
    where = f"{where} ({name})"
    options = TRANSFORMS[name].options()
    params = {k: v for k, v in raw.items() if k not in _ENTRY_KEYS}
    unknown = sorted(set(params) - set(options))
    if unknown:
        raise ValueError(
            f"{where}: unknown option(s) {unknown}; entry keys: {sorted(_ENTRY_KEYS)}, "
            f"options of {name}: {sorted(options)}"
        )
    modes = TRANSFORMS[name].by_mode
    if modes is not None and "mode" in params and params["mode"] not in modes:
        raise ValueError(f"{where}: unknown mode {params['mode']!r}; choose one of {list(modes)}")
    mods = raw.get("modalities")
    if isinstance(mods, str):
        mods = [mods]
    # a shift entry's keys are the user's (config_schema types `shift` as a list of maps);
    # each transform's own defaults live here, with the transforms
    severity = _non_negative(where, "severity", raw.get("severity", 0.5))
    spread = _non_negative(where, "spread", raw.get("spread", 0.0))
    if spread > 1:
        raise ValueError(f"{where}: spread must be in [0, 1], got {spread}")
    sites = raw.get("sites")
    site_sev = raw.get("site_severity") or {}
    if not isinstance(site_sev, Mapping):
        raise ValueError(f"{where}: site_severity must be a mapping {{site: severity}}")
    return ShiftEntry(
        index=index,
        name=name,
        modalities=None if mods is None else tuple(str(m) for m in mods),
        severity=severity,
        sites=None if sites is None else frozenset(int(s) for s in sites),
        site_severity={
            int(s): _non_negative(where, "site_severity", v) for s, v in site_sev.items()
        },
        spread=spread,
        params=params,
    )


def _non_negative(where: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{where}: {key} must be a number >= 0, got {value!r}")
    return float(value)


# ------------------------------------------------------------------------------- apply


def apply_shifts(
    split: Split,
    site_ids: np.ndarray | int,
    shift_cfg: Any,
    seed: int,
    *,
    specs: Mapping[str, ModalitySpec] | None = None,
) -> Split:
    """``split`` with the configured shifts applied per site; new arrays, same samples.

    ``site_ids`` gives each sample's site ([N] ints, or one int for a whole node).
    ``specs`` (``meta.modalities``) gives each modality's kind; without it a modality
    must be named after its kind (``imu``, ``audio``, ...).  Only present samples are
    touched; a sample that ``dropout`` removes entirely gets mask False and zeros.
    Entries run in list order, so later ones see earlier ones' output.
    """
    entries = parse_shift_config(shift_cfg)
    if not entries:
        return split
    n = len(split)
    if site_ids is None:
        raise ValueError("site_ids is None: pass each sample's site/node id (or one int)")
    sites = np.asarray(site_ids)
    if sites.ndim == 0:
        sites = np.full(n, int(sites), dtype=np.int64)
    if sites.shape != (n,) or (n and sites.dtype.kind not in "iu"):
        raise ValueError(
            f"site_ids must be an int or an int array of shape ({n},), got {sites.shape}"
        )
    x, mask = dict(split.x), dict(split.mask)
    copied: set[str] = set()
    for entry in entries:
        for m in _target_modalities(entry, split, specs):
            kind = _kind_of(m, specs)
            _check_raw_shape(entry, m, kind, x[m])
            if m not in copied:
                x[m], mask[m] = x[m].copy(), np.asarray(mask[m], dtype=bool).copy()
                copied.add(m)
            _apply_one(entry, m, kind, x[m], mask[m], sites, seed)
    return replace(split, x=x, mask=mask)


def site_ids_from_parts(parts: Sequence[np.ndarray], n: int) -> np.ndarray:
    """Each sample's node index [n] from a partition (``partition_indices``' output),
    so node ``k`` is shifted as site ``k``.  Every sample must belong to one node."""
    out = np.full(n, -1, dtype=np.int64)
    for node, idx in enumerate(parts):
        out[np.asarray(idx, dtype=np.int64)] = node
    if (out < 0).any():
        raise ValueError(f"{int((out < 0).sum())} of {n} samples belong to no node")
    return out


def _target_modalities(
    entry: ShiftEntry, split: Split, specs: Mapping[str, ModalitySpec] | None
) -> list[str]:
    """The modalities ``entry`` shifts in this split.  A named modality the dataset
    does not have is an error (a typo); one the dataset has but this node lacks is
    skipped (a node holds only some modalities)."""
    if entry.modalities is None:
        return [m for m in split.x if entry.transform.applies_to(_kind_of(m, specs), entry.params)]
    out = []
    for m in entry.modalities:
        known = specs if specs is not None else split.x
        if m not in known:
            raise ValueError(
                f"{entry.label}: modality {m!r} is not in the dataset ({sorted(known)})"
            )
        kind = _kind_of(m, specs)
        if not entry.transform.applies_to(kind, entry.params):
            allowed = [k for k in RAW_SAMPLE_RANK if entry.transform.applies_to(k, entry.params)]
            raise ValueError(
                f"{entry.label}: transform {entry.name!r}{_mode_note(entry)} does not apply to "
                f"modality {m!r} of kind {kind!r}; it applies to kinds {allowed}"
            )
        if m in split.x:
            out.append(m)
    return out


def _mode_note(entry: ShiftEntry) -> str:
    return f" (mode {entry.params['mode']!r})" if "mode" in entry.params else ""


def _kind_of(m: str, specs: Mapping[str, ModalitySpec] | None) -> str:
    if specs is not None and m in specs:
        return specs[m].kind
    if m in RAW_SAMPLE_RANK:
        return m
    raise ValueError(
        f"modality {m!r}: its kind is unknown; pass specs=meta.modalities to apply_shifts"
    )


def _check_raw_shape(entry: ShiftEntry, m: str, kind: str, arr: np.ndarray) -> None:
    """Shifts model sensors, so they act on raw arrays; a featurised one is refused."""
    layout = raw_layout(kind)
    if arr.ndim != RAW_SAMPLE_RANK[kind] + 1:
        raise ValueError(
            f"{entry.label}: modality {m!r} (kind {kind!r}) has shape {arr.shape}, but shifts "
            f"act on raw exchange-format arrays {LAYOUT_SHAPES[layout]}; apply them before "
            "featurisation (audio must still be a waveform)"
        )


def _site_generators(
    seed: int, entry: ShiftEntry, m: str, site: int
) -> tuple[np.random.Generator, np.random.Generator]:
    """(transform generator, severity-spread generator) for one (entry, modality, site)."""
    key = [
        int(seed) % 2**32,
        entry.index,
        zlib.crc32(entry.name.encode()),
        zlib.crc32(m.encode()),
        int(site) % 2**32,
    ]
    main, scale = np.random.SeedSequence(key).spawn(2)
    return np.random.default_rng(main), np.random.default_rng(scale)


def _apply_one(
    entry: ShiftEntry,
    m: str,
    kind: str,
    x: np.ndarray,
    mask: np.ndarray,
    sites: np.ndarray,
    seed: int,
) -> None:
    """Shift modality ``m`` in place (``x``/``mask`` are already this call's copies)."""
    layout = raw_layout(kind)
    for site in np.unique(sites[mask]):
        site = int(site)
        if entry.sites is not None and site not in entry.sites:
            continue
        rng, scale_rng = _site_generators(seed, entry, m, site)
        severity = entry.site_severity.get(site, entry.severity)
        if entry.spread:
            severity *= 1.0 - entry.spread * float(scale_rng.uniform())
        if severity == 0 and not entry.params:
            continue
        idx = np.flatnonzero(mask & (sites == site))
        try:
            out = entry.transform.fn(x[idx], rng, severity, layout=layout, **entry.params)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{entry.label} on modality {m!r} (kind {kind!r}): {exc}") from exc
        if entry.transform.drops:
            out, dropped = out
            mask[idx[dropped]] = False
            out[dropped] = 0.0
        x[idx] = out

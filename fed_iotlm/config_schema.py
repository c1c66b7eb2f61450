"""Every configuration key of fed-iotlm, declared once: its type, its default, its meaning.

The dataclasses below are Hydra structured configs, registered in Hydra's ConfigStore
(:func:`register`).  ``configs/config.yaml`` names the top-level schema first in its
defaults list and each group option (``configs/data/npz.yaml``, ...) names its own
schema, so the yaml files only choose and override; a key the schema does not declare,
or a value of the wrong type, fails at composition, naming the key.  Consumers read a
section through :func:`section`, which fills the schema's defaults into a partial block
(a test's ``{"dp": {"enabled": True}}``) and checks it the same way, so no parser
restates a default.  Where the keys are the user's (task weights, shift entries), the
type is an open map or list.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from omegaconf import MISSING


class ConfigError(ValueError):
    """A key or value the schema refuses; the message is one line naming the key."""


# ---------------------------------------------------------------------------- groups


@dataclass
class DataConfig:
    """The dataset (``data=synthetic|npz``).  One schema for both options: an experiment
    sizes the generator (``experiment=quick`` sets ``num_train``) and still combines with
    ``data=npz``, which ignores the generator's keys; composing ``data=npz`` without
    ``data.path=DIR`` fails naming the key (:data:`REQUIRED`)."""

    name: str = "synthetic"  # synthetic | npz
    modalities: list[str] | None = None  # keep only these modalities, e.g. [imu, audio, depth]
    # npz: a dataset in the exchange format (docs/architecture.md): data=npz data.path=DIR
    path: str | None = None
    # synthetic: the built-in seeded generator (fed_iotlm/data/synthetic.py): imu, audio,
    # depth, thermal; tasks activity (8 classes) and location (4). Each modality alone
    # separates only some classes.
    num_train: int = 4000
    num_test: int = 1000
    num_sites: int = 8
    site_shift: float = 0.3  # 0 = identical sites; 1 = strong placement/gain/noise shift
    noise: float = 1.0
    imu_cues: float = 0.0  # > 0: IMU also carries weak cues of b2 and location (a binding modality)


@dataclass
class PartitionConfig:
    """How the training data is split over nodes (``partition=iid|dirichlet|natural`` set
    ``scheme``; every option has the same keys)."""

    # iid | dirichlet (label skew, alpha) | natural (one node per natural_key value)
    scheme: str = "iid"
    # null: the plan's length, or DEFAULT_NUM_NODES (8) without a plan; with a plan it
    # may only restate the plan's length (node_count refuses another number)
    num_nodes: int | None = None
    # explicit per-node modalities, e.g. [[imu,audio],[imu,depth],[imu]]
    plan: list[list[str]] | None = None
    # groups of modalities taken away by turns: node i lacks group i % len(groups), e.g.
    # [[audio_naive],[watch_acceleration]] (the two never meet on a node); not with plan
    withhold: list[list[str]] | None = None
    missing_rate: float = 0.4  # random plan: chance a node lacks each (non-shared) modality
    shared: str | None = None  # a modality every node holds (MMBind's binding modality)
    label_fraction: float = 1.0  # share of each node's training samples that keep labels
    # each node holds back this stratified share of its training data for validation
    # (choices are made on it; a dataset's own val.npz replaces it)
    val_fraction: float = 0.1
    alpha: float = 0.5  # Dirichlet concentration (scheme=dirichlet)
    label_task: str | None = None  # task whose labels drive Dirichlet skew (default: first task)
    natural_key: str = "site"  # scheme=natural: site | subject
    min_partition_size: int = 5  # dirichlet: fewest training samples a node may get
    # dirichlet: draw the label skew on train only and give each node its val/test samples
    # by class in its training proportions (fed_iotlm/data/follow_train.py); false: a
    # separate Dirichlet draw per split (the behaviour before this key existed)
    eval_follows_train: bool = True


@dataclass
class ModelConfig:
    dim: int = 64  # shared embedding width of every modality encoder
    fusion_layers: int = 1  # self-attention layers over present modality tokens
    fusion_heads: int = 4
    # attention (masked, over present tokens) | late (mean of per-modality logits)
    fusion: str = "attention"


@dataclass
class UpdateChecksConfig:
    """Each update is screened before aggregation; bad ones are dropped."""

    max_update_norm: float | None = None  # bound on ||update - current||₂ per node; null = off


@dataclass
class StrategyConfig:
    """The server's strategy (``strategy=fedavg``); fedprox and fedadam add their keys."""

    name: str = "fedavg"
    fraction_train: float = 1.0
    min_nodes: int | None = None  # fewest replies a round aggregates (null = every node)
    # fail if the SuperNodes that connect differ from the plan's node count
    wait_for_nodes_s: float = 120
    # a round aggregates what answered by then (if >= min_nodes), else is skipped
    round_timeout_s: float = 600
    # per-group rule: mean (count-weighted) | median | trimmed_mean | krum
    aggregation: str = "mean"
    trim_fraction: float = 0.2  # trimmed_mean: share of holders dropped at each end, per coordinate
    krum_f: int = 1  # krum: Byzantine nodes tolerated (score = n - f - 2 nearest)
    krum_select: int = 1  # krum: updates averaged (1 = Krum, > 1 = multi-Krum)
    checks: UpdateChecksConfig = field(default_factory=UpdateChecksConfig)


@dataclass
class FedProxConfig(StrategyConfig):
    name: str = "fedprox"
    proximal_mu: float = 0.01  # clients add (mu/2)·||w - w_global||² to their loss


@dataclass
class FedAdamConfig(StrategyConfig):
    name: str = "fedadam"
    eta: float = 0.01  # server learning rate on the pseudo-gradient
    eta_l: float = 0.01
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 0.001


@dataclass
class LlmUploadConfig:
    """llm.data=nodes: noise, then int8 on the uploaded tokens; where the uploads come
    from (docs/llm.md, "Where the stage's data comes from")."""

    noise_sigma: float = 0.0
    quantize: bool = False
    # the federation's server asks every node for its upload after the last round
    # (query.llm_upload) and writes them to <run>/uploads
    collect: bool = False
    # the stage reads the uploads a federated run collected (<run>/uploads); null: the
    # uploads are computed in-process from the federation layout (simulation)
    dir: str | None = None


@dataclass
class LlmLoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # LoRA in the last N decoder layers (an int) or in all (null); one coverage for every
    # conditioning of a stage, so prefix and adapter are compared at equal LoRA
    top_layers: Any = None


@dataclass
class LlmAdapterConfig:
    """The gated multisensory adapter (docs/llm.md, "Gated multisensory multitask adapter")."""

    layers: int = 8  # the last N decoder layers get adapter keys/values (at most the LM's depth)
    queries_per_task: int = 4  # adapter queries per task per layer
    # the per-head gates' own learning rate (they start at 0; at the projector's 3e-3 they
    # stayed below |tanh g| = 0.12 in 80 steps); not tuned, choose it on validation
    gate_lr: float = 0.02


@dataclass
class LlmSeedAdapterConfig:
    """The seed's adapter y = W x + A_τ(E1 ⊕ … ⊕ Em) (llm.conditioning=[seed_adapter];
    docs/llm.md, "The seed's formulation")."""

    fusion: str = "add"  # add: sum of present modalities | concat: blocks + presence bits
    layers: int = 8  # the last N decoder layers' feed-forward outputs get A_τ(z)
    rank: int = 8  # A_τ = V U, U: rank × |z|, V: hidden × rank (zero-initialised)
    # z minus its mean over recordings (batch in training, running in evaluation): without
    # it A(z) is mostly one vector per task (fed_iotlm/llm/seed_adapter.py, "Centring");
    # on by default, chosen on validation (docs/llm.md, "The seed's adapter at equal budget")
    center: bool = True


@dataclass
class LlmFewshotConfig:
    """A task held out from tuning, asked with k in-context examples, and the wording
    knobs that may help transfer to it (docs/llm.md "Transfer to a held-out task"; each
    off by default, and each changes the training questions too)."""

    task: str | None = None
    # in-context examples before each question of the held-out task (0: zero-shot only);
    # prefix and gated-adapter conditioning (the seed adapter and text-only: zero-shot)
    k: int = 4
    # every classification question ends "Answer with one of: a, b, c."
    options: bool = False
    # ... with each class in words: meta.json tasks.<t>.descriptions, else "<class> (<task>)"
    descriptions: bool = False
    # training questions from a larger pool of phrasings (held-out templates stay held out)
    diversity: bool = False


@dataclass
class LlmFederatedConfig:
    """Federated LoRA on GPU sites (server/lora_app.py, clients/lora_app.py)."""

    method: str = "fedit"  # fedit | ffa | fedex | flexlora
    rounds: int = 3
    local_steps: int = 50  # optimiser steps per site per round
    # per-site LoRA ranks by partition id (flexlora), e.g. [4, 8, 16]; null: lora.r
    ranks: list[int] | None = None
    # SuperNodes the server waits for: auto = the plan's node count (node sites; 3 on
    # the toy data); a number must restate it for node sites
    sites: Any = "auto"
    # nodes (site k trains on node k's uploaded rows only) | iid (the instructions dealt
    # out at random; a named baseline) | auto: nodes when llm.data=nodes, else iid
    site_split: str = "auto"
    # fewest site replies a round aggregates (null = every site); fewer: the round is skipped
    min_sites: int | None = None
    # a round aggregates the sites that answered by then (if >= min_sites), else is skipped
    round_timeout_s: float = 3600
    # also measure aggregation errors on dense [out, in] matrices (memory: the adapted weights in fp32)
    dense_diagnostics: bool = False


@dataclass
class LlmConfig:
    """IoT-LM stage (fed-iotlm tune / make demo): a causal LM conditioned on the
    federation's frozen sensor encoders, LoRA-tuned on instructions generated from the
    dataset."""

    # | a local HF model directory | a .gguf file | tiny-random-llama
    model: str = "smollm2-135m-instruct"
    bundle: str | None = None  # model bundle of a federated run: <output_dir>/bundle
    # nodes: nodes upload frozen-encoder tokens + their labels (no raw data)
    # | central: llm.central_data (a dataset the centre owns) | pooled_raw: all nodes' raw data
    data: str = "nodes"
    # llm.data=central: a data config or a dataset directory (exchange format)
    central_data: Any = None
    upload: LlmUploadConfig = field(default_factory=LlmUploadConfig)
    # labelled training rows held out: conditioning and scoring are chosen on them
    val_fraction: float = 0.2
    val_samples: int = 50  # validation samples asked about (held-out templates, own seed)
    # instruction kinds (presence questions are answered by the prompt: off)
    kinds: list[str] = field(default_factory=lambda: ["task", "dialog"])
    # question types (docs/llm.md "Question types"): classification (always; chosen on)
    # | two_tasks | comparison | count; the default asks classification only
    question_types: list[str] = field(default_factory=lambda: ["classification"])
    count_recordings: int = 3  # recordings per count question (answers 0..n)
    # by generation and by option log-likelihood; the better on validation is reported
    scoring: list[str] = field(default_factory=lambda: ["generation", "loglik"])
    controls: list[str] = field(
        default_factory=lambda: [
            "text_lora",
            "shuffled_sensors",
            "majority",
            "head",
            "train_templates",
        ]
    )
    # prefix: soft tokens; adapter: gated multisensory multitask adapter (LLaMA-Adapter
    # style); seed_adapter: the seed's y = W x + A(E1 ⊕ … ⊕ Em) (opt-in)
    conditioning: list[str] = field(default_factory=lambda: ["prefix", "adapter"])
    use_fused: bool = True  # also give the fused multisensory embedding (what the heads read)
    # k soft tokens per modality (prefix) / per modality in the adapter
    tokens_per_modality: int = 2
    adapter: LlmAdapterConfig = field(default_factory=LlmAdapterConfig)
    seed_adapter: LlmSeedAdapterConfig = field(default_factory=LlmSeedAdapterConfig)
    # training phases in order: [instruct] (one phase, the default) or [align, instruct]
    # (sensor conditioning alone on captions, LoRA frozen; then LoRA + conditioning on the
    # instructions); the encoders phase is the federation itself (fed_iotlm/llm/phases.py)
    phases: list[str] = field(default_factory=lambda: ["instruct"])
    # steps per phase, adding up to llm.steps (null with one phase)
    phase_steps: list[int] | None = None
    # loss weight per task, e.g. {activity: 1.0, location: 0.5}; unlisted tasks: 1
    task_weights: dict[str, float] = field(default_factory=dict)
    lora: LlmLoraConfig = field(default_factory=LlmLoraConfig)
    steps: int = 80  # optimiser steps (80 x 16 examples: ~0.95 on held-out templates)
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 0.001  # LoRA
    sensor_lr: float = 0.003  # projector / adapter queries (gates: llm.adapter.gate_lr)
    warmup: int = 10
    weight_decay: float = 0.0
    grad_checkpointing: bool = False
    checkpoint_every: int = 40
    log_every: int = 10
    resume: bool = False  # continue from <output_dir>/checkpoint-<conditioning>
    train_samples: int = 2000  # training samples turned into instructions
    per_sample: int = 1  # instructions per sample (tasks, sensor questions, dialogs mixed)
    instructions_jsonl: str | None = None  # optional extra instructions (one JSON object per line)
    eval_samples: int = 100  # test samples asked about (held-out templates)
    eval_batch: int = 32
    device: str = "auto"  # auto: this rank's GPU if any (bf16 autocast), else CPU (fp32)
    # frozen base weights: auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16;
    # LoRA, projector, gates stay fp32
    dtype: str = "auto"
    max_new_tokens: int = 10
    fewshot: LlmFewshotConfig = field(default_factory=LlmFewshotConfig)
    federated: LlmFederatedConfig = field(default_factory=LlmFederatedConfig)


# -------------------------------------------------------------------- top-level blocks


@dataclass
class TrainConfig:
    """Local optimisation at each node, per round."""

    epochs: int = 2
    # optimiser steps per node per round (equal budgets); null = `epochs` passes
    steps: int | None = None
    batch_size: int = 32
    lr: float = 0.002
    weight_decay: float = 0.0
    # e.g. {activity: 1.0, location: 0.5}
    task_weights: dict[str, float] = field(default_factory=dict)
    # none | balanced: per task, class c's cross-entropy weight is n / (K · n_c) over the
    # labelled training samples (fed_iotlm/models/class_weights.py); the counts are the
    # federation's global ones (summed by the statistics round), the centralized
    # baseline's pooled ones, the local-only baseline's own; results.json records them
    class_weighting: str = "none"
    # auto (a GPU share from Ray / a visible GPU, else CPU) | cpu | cuda (fed_iotlm/models/device.py)
    device: str = "auto"
    # torch CPU threads per training process: each simulated node and each in-process
    # baseline (centralized, local-only, centralized MMBind) alike, so every method gets
    # the same threads per process (fed_iotlm/models/threads.py)
    threads: int = 1


@dataclass
class AttackConfig:
    """Byzantine nodes, for robustness studies (clients/app.py)."""

    fraction: float = 0.0  # the first round(fraction · num_nodes) partition ids attack
    kind: str = "none"  # none | scale | sign_flip: send current + factor·(trained - current)
    scale: float = 10.0  # factor = scale (scale) or -scale (sign_flip)


@dataclass
class SecAggConfig:
    """Secure aggregation with Flower's SecAgg+ (server/secure_rounds.py, clients/secure.py)."""

    # nodes submit masked Σ-ready vectors; the server learns only group-wise sums
    enabled: bool = False
    num_shares: Any = 1.0  # < 1 or 1.0: fraction of the sampled nodes; an integer >= 3: a count
    # shares needed to unmask a dropped node (fraction or count)
    reconstruction_threshold: Any = 0.67
    # |count share x update| must stay below it (a node refuses otherwise)
    clipping_range: float = 2.0
    quantization_range: int = 4194304  # 2**22 levels over [-clipping_range, clipping_range]
    modulus_range: int = 4294967296  # 2**32; at most modulus/quantization - 1 nodes per sum
    # public bound on a node's samples per group (shares = count / max_count)
    max_count: float = 10000
    timeout_s: float = 600  # per protocol stage
    min_holders: int = 2  # a group's sum is released only over at least this many nodes
    # statistics round: public centre c of every input value (or {modality: c})
    stats_centre: Any = 0.0
    # ... and bound B: |x - c| > B is refused on the node (or {modality: B})
    stats_bound: Any = 1000.0


@dataclass
class DPConfig:
    """Node-level differential privacy, DP-FedAvg (fed_iotlm/federation/privacy.py)."""

    enabled: bool = False  # method=federated|harmony, strategy=fedavg|fedprox, aggregation=mean
    # central: nodes clip, server adds noise per group | local: each node noises its own
    # update | distributed: under secagg, each holder adds its share of the central noise
    mode: str = "central"
    clipping_norm: float = 1.0  # C: bound on ||sent - received||_2 over all groups a node sends
    # sigma: noise std sigma*C on each group's sum (sigma*C/holders on its average)
    noise_multiplier: float = 1.0
    delta: float = 1.0e-5  # epsilon is reported at this delta (opacus RDP accountant, per round)
    seed: int | None = None  # server noise seed, for tests only: a known seed voids the guarantee


@dataclass
class SimulationConfig:
    """Where the simulated nodes run (simulations/ray_cluster.py, docs/cluster.md)."""

    backend: str = "ray"
    # null = a private local Ray; HOST:PORT | auto (RAY_ADDRESS, else the last `ray start` here) = attach
    ray_address: str | None = None
    cpus_per_node: float = 1  # Ray resources per simulated node (2 cores -> 2 nodes at a time)
    gpus_per_node: float = 0  # GPU share per simulated node, e.g. 0.25 = four nodes per GPU
    # the private Ray's CPU pool; null = all cores (must stay null when attaching)
    num_cpus: int | None = None
    # attaching: upload the repo (code + configs, no outputs) as the job's working_dir
    ray_ship_code: bool = True
    # attaching: how long to wait for the head's port before failing
    ray_connect_timeout_s: float = 10
    verbose: bool = False


@dataclass
class MlflowConfig:
    enabled: bool = True
    tracking_uri: str = "sqlite:///mlflow.db"  # `mlflow ui --backend-store-uri sqlite:///mlflow.db`
    experiment: str = "fed-iotlm"


@dataclass
class BindingConfig:
    """MMBind (method=mmbind): bind nodes through a shared modality."""

    shared: str | None = None  # null = partition.shared
    # false: SSL rounds + the spine, no binding (the baseline that isolates binding)
    bind: bool = True
    pretrain_rounds: int = 3  # self-supervised rounds on the shared modality
    # contrastive (views, NT-Xent) | supcon_semi (+ own labels, local) | autoencoder (MMBind's code)
    ssl: str = "contrastive"
    pretrain_epochs: int = 2
    # optimiser steps per SSL round (null: train.steps if set, else pretrain_epochs passes)
    pretrain_steps: int | None = None
    ssl_batch_size: int = 128  # contrastive SSL batch (more negatives than train.batch_size)
    ssl_temperature: float = 0.2
    # views rotate xyz channel triplets (ax/ay/az, gx/gy/gz) jointly, up to this angle
    ssl_rotation_deg: float = 30.0
    ssl_gain: float = 0.2  # std of a view's log gain
    k: int = 1  # partners per sample and lacking modality
    floor: float = 0.0  # pairs with cosine similarity below it are refused (weight 0)
    # pair weight w(s) = ((clip(s, floor, 1) - floor) / (1 - floor)) ** power
    weight_power: float = 1.0
    use_labels: bool = False  # upload labels and match same-class samples only
    label_task: str | None = None  # task whose classes label-aware matching uses (default: first)
    temperature: float = 0.1  # InfoNCE temperature
    contrastive_weight: float = 0.5
    # contrastive between a node's own paired modalities (MMBind's reference: 0.1)
    own_pair_weight: float = 0.1
    pseudo_weight: float = 1.0  # supervised loss on pseudo-complete samples
    rebind_every: int = 4  # re-bind every K multimodal rounds as encoders improve
    noise_sigma: float = 0.0  # Gaussian noise on embeddings before upload
    quantize: bool = False  # int8 embeddings on the wire
    exact_limit: int = 200000  # faiss exact search up to this many candidates, HNSW beyond
    device: str = "auto"  # top-k search: cpu (faiss) | cuda (exact chunked torch top-k) | auto


@dataclass
class DiagnosticsConfig:
    """Domain-shift diagnostics in results.json["diagnostics"] (fed_iotlm/diagnostics/)."""

    enabled: bool = False  # off by default: nothing slows down
    # raw test samples re-shifted as every site (embedding shift: CKA, MMD)
    probe_samples: int = 256


@dataclass
class SyncConfig:
    """What nodes federate (fed_iotlm/federation/adapter_sync.py)."""

    # full (every group a node holds) | adapters (encoders frozen; low-rank adapters federated)
    mode: str = "full"
    # adapters mode: adapter (input map + token bottleneck per encoder) | lora
    kind: str = "adapter"
    rank: int = 4  # adapter bottleneck width / LoRA rank
    alpha: float = 1.0  # lora: scaling alpha / rank
    # adapters mode: start from this model bundle (frozen encoders = its encoders)
    bundle: str | None = None


@dataclass
class PersonalConfig:
    """Personalised site adapters (FedRep/FedPer style), kept on the node."""

    enabled: bool = False
    # adapter (low-rank residual on each encoder's input channels and token) | lora
    kind: str = "adapter"
    rank: int = 4  # bottleneck width / LoRA rank
    alpha: float = 1.0  # lora: scaling alpha / rank
    # also keep these groups on the node, e.g. [head] (FedPer); never uploaded
    keep_local: list[str] = field(default_factory=list)
    epochs: int = 1  # FedRep phase: adapter-only epochs before each round's local training
    # ... at train.lr x lr_scale (an adapter starts at identity, may move far)
    lr_scale: float = 10.0


@dataclass
class Config:
    """The whole tree (``configs/config.yaml``).  ``strategy`` is typed by the schema its
    group option names (fedprox and fedadam add keys)."""

    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: Any = MISSING
    llm: LlmConfig = field(default_factory=LlmConfig)
    # per-site input shift, entries of fed_iotlm/data/shift.py (presets: configs/shift/)
    shift: list[Any] = field(default_factory=list)

    # federated (modality-aware, ours) | fedavg (naive, zero-filled) | local | centralized | ...
    method: str = "federated"
    seed: int = 0
    rounds: int = 12
    output_dir: str | None = None  # default: Hydra's run directory (outputs/<date>/<time>)
    # continue from output_dir/checkpoint/ (saved after every round); same config, rounds may grow
    resume: bool = False
    # where each round is scored: auto (nodes if a site reads its own data, else server) |
    # server (its copy of the test split) | nodes (each node's own test split, weighted by its count)
    evaluation: str = "auto"
    # which round's model the run reports (test, val, per node, the bundle): last (the model
    # after the last round) | best_val (the round with the best validation macro-F1, chosen
    # on validation only; fed_iotlm/selection.py)
    select_round: str = "last"
    # what a shift entry's "site" is: node (partition id) | site (data's split.site)
    shift_unit: str = "node"
    # federated: every node and reference set uses the nodes' pooled training statistics
    # (a statistics round) | per_site: each node its own, each test site its own
    # (test-time adaptation, transductive; off by default)
    normalization: str = "federated"

    train: TrainConfig = field(default_factory=TrainConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    binding: BindingConfig = field(default_factory=BindingConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    personal: PersonalConfig = field(default_factory=PersonalConfig)


# (block, its name) -> keys that option cannot do without; checked after composition
# (an OmegaConf merge cannot make a defaulted key mandatory again)
REQUIRED: dict[tuple[str, str], tuple[str, ...]] = {("data", "npz"): ("path",)}


def check_required(cfg: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` for a key :data:`REQUIRED` that is unset (null)."""
    for (path, name), keys in REQUIRED.items():
        node = cfg.get(path) or {}
        for key in keys:
            if node.get("name") == name and node.get(key) is None:
                raise ConfigError(
                    f"config: '{path}.{key}' has no value: {path}={name} needs it "
                    f"(e.g. {path}.{key}=...)"
                )


def check_declared(cfg: Mapping[str, Any], schema: type | None = None, path: str = "") -> None:
    """Raise :class:`ConfigError` for a key of the composed ``cfg`` that no schema
    declares.  Composition refuses ``nokey=1``, but Hydra adds a ``+key=value`` override
    with the struct flag lifted, so without this check a mistyped ``+`` key would be
    carried along unread.  Open maps and lists (``Any``, ``dict``) are not walked."""
    import dataclasses

    if schema is None:
        schema = Config
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in cfg.items():
        where = f"{path}.{key}" if path else key
        if key not in fields:
            raise ConfigError(
                f"config: unknown key '{where}' (fed_iotlm/config_schema.py declares every key)"
            )
        if not isinstance(value, Mapping):
            continue
        inner: Any = fields[key].default_factory
        if not path and key in GROUP_SCHEMAS:
            inner = GROUP_SCHEMAS[key].get(str(value.get("name")))
        if isinstance(inner, type) and dataclasses.is_dataclass(inner):
            check_declared(value, inner, where)


# ---------------------------------------------------------------------- value ranges


@dataclass(frozen=True)
class Range:
    """The values a numeric key accepts: finite, between ``low`` and ``high`` (None: no
    bound), each bound included unless ``*_open``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None:
            return value < self.high if self.high_open else value <= self.high
        return True

    def text(self) -> str:
        """``>= 1``, ``> 0``, ``in (0, 1]``: what the one-line error says is allowed."""
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{_number(self.low)}, {_number(self.high)}{right}"


def _number(value: float | None) -> str:
    return f"{value:g}"


AT_LEAST_1 = Range(1)
AT_LEAST_0 = Range(0)
POSITIVE = Range(0, low_open=True)
FRACTION = Range(0, 1)  # [0, 1]
HOLD_OUT = Range(0, 1, high_open=True)  # [0, 1): a share held back, some must remain
SHARE_KEPT = Range(0, 1, low_open=True)  # (0, 1]: a share kept, some must be

# dotted key -> its range, for the keys where an out-of-range value would not fail but
# silently misbehave (no rounds, no nodes, no training, a negative learning rate, a
# share above 1); checked once the config is composed (null stays allowed where the
# schema allows it)
RANGES: dict[str, Range] = {
    "rounds": AT_LEAST_1,
    "data.num_train": AT_LEAST_1,
    "data.num_test": AT_LEAST_1,
    "data.num_sites": AT_LEAST_1,
    "data.site_shift": AT_LEAST_0,
    "data.noise": AT_LEAST_0,
    "partition.num_nodes": AT_LEAST_1,
    "partition.missing_rate": HOLD_OUT,
    "partition.label_fraction": SHARE_KEPT,
    "partition.val_fraction": HOLD_OUT,
    "partition.alpha": POSITIVE,
    "partition.min_partition_size": AT_LEAST_0,
    "model.dim": AT_LEAST_1,
    "model.fusion_layers": AT_LEAST_0,
    "model.fusion_heads": AT_LEAST_1,
    "train.epochs": AT_LEAST_0,
    "train.steps": AT_LEAST_0,
    "train.batch_size": AT_LEAST_1,
    "train.lr": POSITIVE,
    "train.weight_decay": AT_LEAST_0,
    "train.threads": AT_LEAST_1,
    "strategy.fraction_train": FRACTION,
    "strategy.wait_for_nodes_s": POSITIVE,
    "strategy.round_timeout_s": POSITIVE,
    "strategy.trim_fraction": Range(0, 0.5, high_open=True),
    "strategy.krum_f": AT_LEAST_0,
    "strategy.krum_select": AT_LEAST_1,
    "strategy.checks.max_update_norm": POSITIVE,
    "strategy.proximal_mu": AT_LEAST_0,
    "strategy.eta": POSITIVE,
    "strategy.eta_l": POSITIVE,
    "strategy.beta_1": HOLD_OUT,
    "strategy.beta_2": HOLD_OUT,
    "strategy.tau": POSITIVE,
    "attack.fraction": FRACTION,
    "dp.clipping_norm": POSITIVE,
    "dp.noise_multiplier": AT_LEAST_0,
    "dp.delta": Range(0, 1, low_open=True, high_open=True),
    "secagg.clipping_range": POSITIVE,
    "secagg.max_count": POSITIVE,
    "secagg.timeout_s": POSITIVE,
    "secagg.min_holders": AT_LEAST_1,
    "simulation.cpus_per_node": POSITIVE,
    "simulation.gpus_per_node": AT_LEAST_0,
    "simulation.num_cpus": AT_LEAST_1,
    "binding.pretrain_rounds": AT_LEAST_0,
    "binding.pretrain_epochs": AT_LEAST_0,
    "binding.pretrain_steps": AT_LEAST_0,
    "binding.ssl_batch_size": AT_LEAST_1,
    "binding.ssl_temperature": POSITIVE,
    "binding.k": AT_LEAST_1,
    "binding.floor": HOLD_OUT,
    "binding.temperature": POSITIVE,
    "binding.rebind_every": AT_LEAST_1,
    "binding.noise_sigma": AT_LEAST_0,
    "diagnostics.probe_samples": AT_LEAST_1,
    "sync.rank": AT_LEAST_1,
    "personal.rank": AT_LEAST_1,
    "personal.epochs": AT_LEAST_0,
    "personal.lr_scale": POSITIVE,
    "llm.val_fraction": HOLD_OUT,
    "llm.steps": AT_LEAST_0,
    "llm.batch_size": AT_LEAST_1,
    "llm.grad_accum": AT_LEAST_1,
    "llm.eval_batch": AT_LEAST_1,
    "llm.lr": POSITIVE,
    "llm.sensor_lr": POSITIVE,
    "llm.warmup": AT_LEAST_0,
    "llm.weight_decay": AT_LEAST_0,
    "llm.adapter.gate_lr": POSITIVE,
    "llm.seed_adapter.layers": AT_LEAST_1,
    "llm.seed_adapter.rank": AT_LEAST_1,
    "llm.lora.r": AT_LEAST_1,
    "llm.count_recordings": Range(2, 9),
    "llm.fewshot.k": AT_LEAST_0,
    "llm.federated.rounds": AT_LEAST_1,
    "llm.federated.local_steps": AT_LEAST_1,
    "llm.federated.sites": AT_LEAST_1,
}

# keys whose value is one of a few words, checked once the config is composed
CHOICES: dict[str, tuple[str, ...]] = {"select_round": ("last", "best_val")}


def check_choices(cfg: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` for a value of :data:`CHOICES` that is not one of its
    words, naming the key and the words it accepts."""
    for path, allowed in CHOICES.items():
        value = _at(cfg, path)
        if value is not None and value not in allowed:
            raise ConfigError(f"config: {path}={value!r}: expected one of {', '.join(allowed)}")


# methods whose federation runs on a Flower Grid (server/federated_run.py), nodes and all;
# the others (local, centralized, centralized_mmbind) are in-process baselines
GRID_METHODS = ("federated", "fedavg", "harmony", "mmbind")

# keys a method decides whatever the config says: ``method=harmony`` builds a late-fusion
# model (modality-wise FedAvg averages per-modality logits) even under model.fusion=attention.
# fed_iotlm/experiment.py builds the model from it; the report labels runs by it.
METHOD_FORCES: dict[str, dict[str, str]] = {"harmony": {"model.fusion": "late"}}


def effective(method: str, key: str, configured: Any) -> Any:
    """What ``key`` is in a run of ``method``: the method's forced value, if any, else
    ``configured``."""
    return METHOD_FORCES.get(method, {}).get(key, configured)


# (steps key, epochs key) of each local-training budget: steps when set, else epochs
# passes; both at 0 (or steps at 0) would send rounds in which no node trains
BUDGETS = (("train.steps", "train.epochs"),)


def check_range(path: str, value: float) -> None:
    """Raise :class:`ConfigError` for ``value`` outside the range :data:`RANGES` gives
    ``path`` (for a reader of a caller's dict, which composition never checked)."""
    allowed = RANGES[path]
    if not allowed.holds(value):
        raise ConfigError(f"config: {path}={value!r} is out of range: expected {allowed.text()}")


def check_ranges(cfg: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` for a value of :data:`RANGES` outside its range, or a
    local-training budget of zero steps, naming the key and what it accepts."""
    for path in RANGES:
        value = _at(cfg, path)
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue  # absent, null where allowed, or not a number (the schema checks types)
        check_range(path, value)
    for steps_key, epochs_key in BUDGETS:
        steps, epochs = _at(cfg, steps_key), _at(cfg, epochs_key)
        if steps == 0 or (steps is None and epochs == 0):
            raise ConfigError(
                f"config: {steps_key}={_yaml(steps)} with {epochs_key}={_yaml(epochs)}: no node would "
                f"train; expected {steps_key} >= 1, or null with {epochs_key} >= 1"
            )


def check_data_source(cfg: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` for ``data.path`` given with ``data=synthetic``: the
    generator reads no files, so the path would be ignored and the run would train on
    synthetic data while the user believes it trains on theirs."""
    data = cfg.get("data") or {}
    if data.get("name") == "synthetic" and data.get("path") is not None:
        raise ConfigError(
            f"config: data.path={data['path']!r} is set but data=synthetic reads no files "
            "(the built-in generator); for a dataset directory choose data=npz"
        )


# ------------------------------------------------------------------ number of nodes

DEFAULT_NUM_NODES = 8  # partition.num_nodes=null without a plan


def parse_plan(plan: Any) -> list[list[str]] | None:
    """A plan (or ``partition.withhold``'s groups) from Hydra (list of lists) or from a
    Flower run config ("imu,audio;imu")."""
    if plan is None or plan == "" or plan == []:
        return None
    if isinstance(plan, str):
        return [[m.strip() for m in node.split(",") if m.strip()] for node in plan.split(";")]
    return [list(node) for node in plan]


def node_count(part: Mapping[str, Any]) -> int:
    """The number of nodes the ``partition`` block describes: the plan's length where a
    plan is given, else ``num_nodes`` (null: :data:`DEFAULT_NUM_NODES`).

    Why a refusal rather than a winner: a plan (the default experiment has an 8-node
    one) used to override ``partition.num_nodes`` without a word, so a user who asked
    for 10 nodes got 8.  A ``num_nodes`` that only restates the plan's length passes."""
    plan = parse_plan(part.get("plan"))
    given = part.get("num_nodes")
    if plan is None:
        return DEFAULT_NUM_NODES if given is None else int(given)
    if given is not None and int(given) != len(plan):
        raise ConfigError(
            f"config: partition.num_nodes={given} but partition.plan lists {len(plan)} nodes "
            "(a plan fixes the node count): drop partition.num_nodes (or set it to "
            f"{len(plan)}), or choose an experiment without a plan for {given} nodes, e.g. "
            f"experiment=random_plan partition.num_nodes={given}"
        )
    return len(plan)


def check_node_count(cfg: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` for a ``partition.num_nodes`` a plan contradicts
    (:func:`node_count`), at composition, before any data is generated."""
    node_count(cfg.get("partition") or {})


def _yaml(value: Any) -> str:
    """A value as the user would write it in an override (None is ``null``)."""
    return "null" if value is None else repr(value)


def _at(cfg: Mapping[str, Any], path: str) -> Any:
    node: Any = cfg
    for part in path.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


# group option -> its schema, stored as ``<group>/schema_<option>``; the option's yaml
# names it first in its defaults list
GROUP_SCHEMAS: dict[str, dict[str, type]] = {
    "strategy": {"fedavg": StrategyConfig, "fedprox": FedProxConfig, "fedadam": FedAdamConfig},
}
TOP_SCHEMA = "schema"  # the name config.yaml's defaults list gives the top-level schema


def register() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent: a store overwrites)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name=TOP_SCHEMA, node=Config)
    for group, options in GROUP_SCHEMAS.items():
        for option, schema in options.items():
            store.store(group=group, name=f"schema_{option}", node=schema)


# ---------------------------------------------------------------------- reading a block


def section_schema(path: str, block: Mapping[str, Any] | None = None) -> type:
    """The dataclass declaring the block at dotted ``path`` (``"dp"``, ``"llm.federated"``,
    ``"strategy"``: by the block's ``name``)."""
    head, _, rest = path.partition(".")
    if head in GROUP_SCHEMAS:
        options = GROUP_SCHEMAS[head]
        name = (block or {}).get("name") if not rest else None  # a partial block may omit it
        schema = options.get(str(name)) if name is not None else next(iter(options.values()))
        if schema is None:
            raise ConfigError(f"{head}.name={name!r}: expected one of {', '.join(options)}")
    else:
        schema = Config.__dataclass_fields__[head].default_factory  # type: ignore[assignment]
    for part in rest.split(".") if rest else ():
        schema = schema.__dataclass_fields__[part].default_factory  # type: ignore[union-attr]
    return schema  # type: ignore[return-value]


def block(cfg: Mapping[str, Any] | None, path: str) -> dict[str, Any]:
    """The block at dotted ``path`` of ``cfg`` through :func:`section`.  A composed config
    always has it; a caller's partial dict (a test's ``{"dp": {...}}``, a node's subset)
    may lack it, which means "the schema's defaults", hence the lookups without default."""
    node: Any = cfg
    for part in path.split("."):
        node = (node or {}).get(part)
    return section(path, node)


def setting(cfg: Mapping[str, Any], key: str) -> Any:
    """A top-level value of ``cfg`` (``method``, ``rounds``, ...); a caller's partial dict
    may lack it, which means the schema's default."""
    if key in cfg:
        return cfg[key]
    f = Config.__dataclass_fields__[key]
    return f.default if f.default is not MISSING else None


def section(path: str, block: Mapping[str, Any] | None) -> dict[str, Any]:
    """``block`` (the ``path`` block of a composed config, or a partial one a caller built)
    as a plain dict with the schema's defaults filled in and every key and type checked;
    a wrong one raises :class:`ConfigError` naming ``path.key``."""
    given = dict(block or {})
    try:
        key = json.dumps(given, sort_keys=True)
    except TypeError:  # not JSON (a caller's object): check it uncached
        return _section(path, given)
    return json.loads(_section_cached(path, key))


@lru_cache(maxsize=512)
def _section_cached(path: str, key: str) -> str:
    """Parsers run per round and per message; OmegaConf takes milliseconds a block."""
    return json.dumps(_section(path, json.loads(key)))


def _section(path: str, given: dict[str, Any]) -> dict[str, Any]:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    schema = section_schema(path, given)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), given)
        return OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ConfigError(describe(err, prefix=path)) from err


# OmegaConf's type names in its conversion errors -> what the one-line error says
TYPE_WORDS = {"integer": "an integer", "float": "a number", "bool": "true or false"}


def describe(err: BaseException, prefix: str = "") -> str:
    """One line naming the key an OmegaConf error is about, and what was expected."""
    from omegaconf.errors import (
        ConfigAttributeError,
        ConfigKeyError,
        MissingMandatoryValue,
        ValidationError,
    )

    key = getattr(err, "full_key", None) or getattr(err, "key", None) or ""
    key = f"{prefix}.{key}" if prefix and key else (key or prefix)
    msg = str(getattr(err, "msg", None) or err).splitlines()[0].strip()
    if isinstance(err, ConfigKeyError | ConfigAttributeError):
        return f"config: unknown key '{key}' (fed_iotlm/config_schema.py declares every key)"
    if isinstance(err, MissingMandatoryValue):
        return f"config: '{key}' has no value: give it (e.g. {key}=...)"
    if isinstance(err, ValidationError):
        wanted = re.search(r"(?:converted to|not a valid) (\w+)", msg)
        if wanted and hasattr(err, "value"):
            kind = TYPE_WORDS.get(wanted.group(1).lower(), wanted.group(1))
            return f"config: {key}={err.value!r}: expected {kind}"
        return f"config: bad value for '{key}': {msg}"
    return f"config: '{key}': {msg}" if key else f"config: {msg}"

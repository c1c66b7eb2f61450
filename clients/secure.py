"""The node's side of secure aggregation (``secagg.enabled``; server/secure_rounds.py).

Flower's ``secaggplus_mod`` runs the protocol around the node's ``train`` handler: it
receives the legacy ``fitins.*`` content that ``SecAggPlusWorkflow`` sends, and masks the
legacy ``fitres.*`` reply.  The handler therefore reads the model from either form
(:func:`received_state`, :func:`train_config`) and, under SecAgg+, replies with its
Σ-ready vector (:class:`fed_iotlm.federation.secure.SumLayout`) instead of its groups and
counts (:func:`secure_reply`).  Its metrics stay free of per-group counts and sample
sizes: those are part of the masked sum.  A ``census`` message (no model comes down)
gets the node's holder flags alone (:func:`census_reply`), so the server learns how many
nodes hold each group before any update is summed; the round's ``release`` then names
the groups with enough holders, and the node submits zeros for the others.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters, fitres_to_recorddict

from fed_iotlm.federation.privacy import dp_config
from fed_iotlm.federation.records import record_to_numpy
from fed_iotlm.federation.secure import PUBLIC_WEIGHT, SecureSettings, SumLayout
from fed_iotlm.federation.secure_dp import (
    KEY_CLIP,
    KEY_HOLDERS,
    KEY_SIGMA,
    noisy_vector,
    parse_holders,
)

LEGACY_PARAMS = "fitins.parameters"
LEGACY_CONFIG = "fitins.config"


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's SecAgg+ mod for the protocol's messages; every other message passes."""
    if (
        msg.metadata.message_type == MessageType.TRAIN
        and RECORD_KEY_CONFIGS in msg.content.config_records
    ):
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def is_secure(msg: Message) -> bool:
    """The train message came from the SecAgg+ workflow (legacy ``fitins``)."""
    return LEGACY_PARAMS in msg.content.array_records


def received_state(msg: Message, model_state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model the server sent, named by key whichever form it came in."""
    if not is_secure(msg):
        return record_to_numpy(msg.content["arrays"])
    params = arrayrecord_to_parameters(msg.content.array_records[LEGACY_PARAMS], keep_input=True)
    return SumLayout.of(model_state).arrays_in_order(
        parameters_to_ndarrays(params), "SecAgg+ train message"
    )


def train_config(msg: Message) -> ConfigRecord:
    """The round's config (server round, proximal mu) from either form."""
    if is_secure(msg):
        return msg.content.config_records[LEGACY_CONFIG]
    return msg.content["config"]


def phase(msg: Message) -> str:
    """What a SecAgg+ train message asks for: ``census``, ``train`` or ``pretrain``."""
    return str(train_config(msg).get("phase", "train"))


def census_of(msg: Message) -> str:
    """The phase whose holders a ``census`` message counts."""
    return str(train_config(msg).get("census-of", "train"))


def released(msg: Message) -> set[str] | None:
    """The groups the round sums (those the census found held by enough nodes)."""
    value = train_config(msg).get("release")
    return None if value is None else {g for g in str(value).split(",") if g}


def census_reply(msg: Message, model_state: Mapping[str, np.ndarray], counts) -> Message:
    """The node's holder flags, one per group of the model (masked by the mod)."""
    return _legacy_reply(msg, SumLayout.of(model_state).census(counts))


def secure_reply(
    msg: Message,
    trained: Mapping[str, np.ndarray],
    current: Mapping[str, np.ndarray],
    counts: Mapping[str, float],
    settings: dict,
    node: str,
) -> Message:
    """The legacy ``fitres`` reply carrying the Σ-ready vector (masked by the mod) of
    the groups the round releases."""
    layout = SumLayout.of(current)
    secure, config = SecureSettings.from_config(settings), train_config(msg)
    if KEY_SIGMA in config:  # dp.mode=distributed: clipped update + this node's noise share
        seed = dp_config(settings).seed  # tests only: a known seed voids the guarantee
        rnd = int(config.get("server-round", 0))
        rng = np.random.default_rng(None if seed is None else [seed, rnd, _digits(node)])
        vector = noisy_vector(
            layout, trained, current, counts, parse_holders(config[KEY_HOLDERS]),
            float(config[KEY_SIGMA]), float(config[KEY_CLIP]), secure, rng, node,
        )  # fmt: skip
    else:
        vector = layout.encode(trained, current, counts, secure, node, released(msg))
    return _legacy_reply(msg, vector)


def _digits(name: str) -> int:
    return int("".join(c for c in name if c.isdigit()) or 0)


def _legacy_reply(msg: Message, vector: list[np.ndarray]) -> Message:
    fitres = FitRes(
        status=Status(code=Code.OK, message="Success"),
        parameters=ndarrays_to_parameters(vector),
        num_examples=PUBLIC_WEIGHT,
        metrics={},
    )
    return Message(fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)

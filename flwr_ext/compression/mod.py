"""Client-side Flower mod that compresses train replies.

Use it like Flower's own mods::

    from flwr.clientapp import ClientApp
    from flwr_ext.compression import compression_mod

    app = ClientApp(mods=[compression_mod("fedzip")])

On a ``train`` message the mod keeps the arrays the server sent, lets the ClientApp train, and
replaces the reply's ArrayRecord by the encoded delta ``reply - received``: one
``Array(stype="flwr-ext/<codec>")`` per tensor. The error-feedback residual (and DGC velocity)
persist between rounds in ``context.state`` as ArrayRecords. ``evaluate`` and ``query``
messages, error replies, and replies it cannot pair with what was received (different keys,
shapes, or several ArrayRecords) pass through untouched, so the server always gets a usable
reply. Put it first in ``mods`` so that it sees the reply last (after clipping or noise mods).

Mods are fixed when the ClientApp is built, but the preset usually comes from the run config:
``compression_mod(None)`` (or ``compression_mod(run_config_key="compression")``) reads
``context.run_config["compression"]`` on every message, so one ClientApp serves any preset::

    app = ClientApp(mods=[compression_mod(None)])   # flwr run --run-config 'compression="dgc"'

Under Flower's client-side fixed clipping (``DifferentialPrivacyClientSideFixedClipping`` on the
server, ``fixedclipping_mod`` after this mod in ``mods``) the server adds noise sized for the
clipping norm C and does not clip again, so the mod clips what it *sends*: it reads C from the
``clipping_norm`` key the server puts in the train config (or takes ``max_norm``) and bounds the
decoded L2 norm of every reply by C whatever the preset, error feedback or rounds
(:func:`~flwr_ext.compression.feedback.bounded_encode`); the residual stays on the client.

The warm-up schedule (DGC) advances with this client's own number of compressed replies (kept
in ``context.state``), not with the server round: under asynchronous strategies the
``server-round`` a client sees is a model version that grows with every update of every client.

The mod compresses only for a server that says it decodes: ``Compressed`` and flwr-ext's
asynchronous engine put :data:`~flwr_ext.compression.hints.DECODER_KEY` in every train config.
A train message without it (a plain Flower ``FedAvg``, no wrapper) gets an error reply
(``ErrorCode.MOD_FAILED_PRECONDITION``) whose reason says to wrap the strategy in
``Compressed``; Flower's strategies log it on the server as "Received error in reply from
node ...", and the run goes on instead of failing inside Flower on an undecodable payload.

**Downlink** (``Compressed(..., downlink="fedzip")``, EF21-P, :mod:`flwr_ext.compression.downlink`):
a train message whose config carries ``flwr-ext.down-version`` holds either the model (dense) or
a compressed increment to this node's shadow ``w``. The mod applies it to the shadow it keeps
in ``context.state`` (``flwr-ext.downlink.*``), checks the server's checksum, and hands the
ClientApp ``w`` in place of the received arrays (so the uplink delta is ``reply - w``); the
reply gains a ConfigRecord ``flwr-ext.downlink`` with the version it holds. A node that cannot
apply the increment (lost state, checksum mismatch) answers with an error
(``MOD_FAILED_PRECONDITION``) before training, and the server sends it the dense model next
time. This works whatever the uplink preset (``"none"`` included); ``initial`` lets a node
build the first model itself so that the first message can be an increment too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from flwr_ext.arrays import numpy_to_record

from .codec import PipelineConfig
from .downlink import (
    DENSE,
    KEY_FROM,
    KEY_VERSION,
    REPLY_RECORD,
    is_downlink,
    load_copy,
    node_receive,
    save_copy,
)
from .feedback import CompressionState, compress
from .hints import HINT, server_decodes
from .presets import get_preset
from .wire import DTYPE_CODE

STATE_KEY = "flwr-ext.compression"


def _load(context: Context, key: str) -> dict[str, np.ndarray]:
    rec = context.state.array_records.get(key) if key in context.state else None
    if rec is None:
        return {}
    return {k: v.numpy() for k, v in rec.items()}


def _save(context: Context, key: str, arrays: dict[str, np.ndarray]) -> None:
    context.state[key] = numpy_to_record(arrays)  # 0-d tensors stay 0-d


def _server_round(msg: Message) -> int:
    for rec in msg.content.config_records.values():
        if "server-round" in rec:
            return int(rec["server-round"])
    return 0


def _downlink_config(msg: Message) -> ConfigRecord | None:
    """The train ConfigRecord carrying a downlink message, if any."""
    if not msg.has_content():
        return None
    for rec in msg.content.config_records.values():
        if is_downlink(rec):
            return rec
    return None


def _clipping_norm(msg: Message) -> float | None:
    """The ``clipping_norm`` Flower's client-side fixed-clipping wrapper sends, if any."""
    for rec in msg.content.config_records.values():
        if KEY_CLIPPING_NORM in rec:
            return float(rec[KEY_CLIPPING_NORM])  # type: ignore[arg-type]
    return None


def _next_step(context: Context, key: str) -> int:
    """1-based count of this client's compressed replies (advanced and persisted)."""
    rec = context.state.config_records.get(key) if key in context.state else None
    step = int(rec["step"]) + 1 if rec is not None and "step" in rec else 1
    context.state[key] = ConfigRecord({"step": step})
    return step


def compression_mod(
    preset: str | None = "fedzip",
    *,
    seed: int = 0,
    state_key: str = STATE_KEY,
    run_config_key: str = "compression",
    max_norm: float | None = None,
    initial: Callable[[Context], Mapping[str, np.ndarray]] | None = None,
    **overrides: Any,
) -> Mod:
    """Return a Flower mod that encodes train replies with ``preset``.

    Parameters
    ----------
    preset : str or None
        ``"fedzip"``, ``"dgc"``, ``"qsgd-8bit"``, ``"sparse-lora"`` or ``"none"``; ``None`` reads
        the preset name from ``context.run_config[run_config_key]`` on every message (missing
        or empty: ``"none"``). Either may carry options, ``"fedzip:density=0.01"``
        (:func:`~flwr_ext.compression.presets.parse_spec`).
    seed : int
        Base seed of the stochastic stages (random-k masks, QSGD); mixed with the round and the
        node id, so masks are reproducible and independent of the data.
    state_key : str
        Prefix of the ``context.state`` entries holding the residual and velocity.
    **overrides
        Fields of :class:`~flwr_ext.compression.codec.PipelineConfig` to change, e.g.
        ``density=0.005`` or ``momentum=0.9``.
    run_config_key : str
        Run-config key naming the preset when ``preset`` is ``None``.
    max_norm : float or None
        Bound on the decoded L2 norm of every compressed reply. ``None``: the ``clipping_norm``
        of the train config when the server sends one (client-side fixed clipping), else none.
    initial : callable or None
        ``initial(context) -> {name: array}``: the initial model ``x_0``, built on the node (e.g.
        the same seeded constructor as the server's). Used only for the first downlink
        increment of ``Compressed(..., downlink_initial="known")``, and only if its checksum
        equals the server's; otherwise the node asks for the dense model.

    Returns
    -------
    Mod
        ``(msg, context, call_next) -> Message``.
    """
    cache: dict[str, PipelineConfig | None] = {}
    if preset is not None:
        cache[preset] = get_preset(preset, **overrides)

    def _config(context: Context) -> PipelineConfig | None:
        name = preset
        if name is None:
            name = str(context.run_config.get(run_config_key, "none") or "none")
        if name not in cache:
            cache[name] = None if name == "none" else get_preset(name, **overrides)
        # a bad spec raises ConfigError here: the ClientApp fails loudly, as Flower reports it
        return cache[name]

    def _compression_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        down = _downlink_config(msg)
        if down is None:
            return _uplink(msg, context, call_next)
        # EF21-P downlink: rebuild this node's shadow w, train from it
        if len(msg.content.array_records) != 1:
            reason = "flwr-ext downlink: the train message must hold exactly one ArrayRecord"
            return Message(Error(ErrorCode.MOD_FAILED_PRECONDITION, reason), reply_to=msg)
        key = next(iter(msg.content.array_records))
        copy = load_copy(context.state)
        x0 = None
        if initial is not None and copy.version == DENSE and int(down[KEY_FROM]) == 0:
            x0 = initial(context)
        why = node_receive(copy, down, msg.content[key], initial=x0)
        save_copy(context.state, copy)
        if why is not None:
            reason = f"flwr-ext downlink: {why}; the server sends the dense model next time"
            log(WARNING, "compression_mod: %s", reason)
            return Message(Error(ErrorCode.MOD_FAILED_PRECONDITION, reason), reply_to=msg)
        msg.content[key] = ArrayRecord({k: Array(v) for k, v in copy.arrays.items()})
        out = _uplink(msg, context, call_next)
        if not out.has_error() and out.has_content():
            out.content[REPLY_RECORD] = ConfigRecord({KEY_VERSION: copy.version})
        return out

    def _uplink(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        config = _config(context)
        if config is None:
            return call_next(msg, context)
        if not server_decodes(msg):
            # before training: no local work is spent on a reply the server cannot read
            log(WARNING, "compression_mod: %s", HINT)
            return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=HINT), reply_to=msg)
        if not msg.has_content() or len(msg.content.array_records) != 1:
            return call_next(msg, context)
        received = next(iter(msg.content.array_records.values()))
        try:
            sent = {k: v.numpy() for k, v in received.items()}
        except (TypeError, ValueError):  # not plain numpy arrays: leave the exchange alone
            return call_next(msg, context)
        server_round = _server_round(msg)
        bound = max_norm if max_norm is not None else _clipping_norm(msg)

        out = call_next(msg, context)
        if out.has_error() or len(out.content.array_records) != 1:
            return out
        key, reply = next(iter(out.content.array_records.items()))
        try:
            new = {k: v.numpy() for k, v in reply.items()}
        except (TypeError, ValueError):
            return out
        if list(new) != list(sent) or any(
            new[k].shape != sent[k].shape or str(new[k].dtype) not in DTYPE_CODE for k in new
        ):
            log(WARNING, "compression_mod: reply arrays differ from received; sent uncompressed")
            return out
        delta = {k: new[k] - sent[k].astype(new[k].dtype) for k in new}

        state = CompressionState(
            config, _load(context, f"{state_key}.residual"), _load(context, f"{state_key}.velocity")
        )
        step = _next_step(context, f"{state_key}.step")
        node = int(context.node_id) & (2**63 - 1)
        mixed = int(
            np.random.SeedSequence([seed, server_round, node, step]).generate_state(1, np.uint64)[0]
        )
        payloads = compress(state, delta, server_round=step, seed=mixed, max_norm=bound)
        if config.error_feedback:
            _save(context, f"{state_key}.residual", state.residual)
            if config.momentum:
                _save(context, f"{state_key}.velocity", state.velocity)
        out.content[key] = ArrayRecord(
            {
                k: Array(
                    dtype=str(delta[k].dtype),
                    shape=tuple(int(d) for d in delta[k].shape),
                    stype=config.stype,
                    data=payloads[k],
                )
                for k in delta
            }
        )
        return out

    label = "from_run_config" if preset is None else preset.replace("-", "_")
    _compression_mod.__name__ = f"compression_mod_{label}"
    return _compression_mod

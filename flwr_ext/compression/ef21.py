"""EF21 error feedback: client state, server state, and the client mod.

Implementation based on Richtarik, Sokolov, Fatkhullin, "EF21: A New, Simpler, Theoretically
Better, and Practically Faster Error Feedback", NeurIPS 2021, https://arxiv.org/abs/2106.05203,
Algorithm 1, with the partial participation of Fatkhullin, Sokolov, Gorbunov, Li, Richtarik,
"EF21 with Bells & Whistles", 2021, https://arxiv.org/abs/2110.03294 (EF21-PP). Each client
``i`` keeps an estimate ``g_i`` of its update and sends only a compressed correction of it::

    c_i^t     = C(delta_i^t - g_i^t)                     (Alg. 1, line 5)
    g_i^{t+1} = g_i^t + c_i^t                            (line 6)
    g^{t+1}   = g^t + (1/n) sum_{i in S_t} c_i^t = (1/n) sum_i g_i^{t+1}   (line 8)
    x^{t+1}   = x^t + eta g^{t+1}                        (line 3, one round later)

with ``delta_i^t = y_i - x^t`` the client's model delta of round ``t`` (it plays
``-gamma grad f_i(x^t)``), ``C`` a contractive compressor (top-k by default; random-k
*unscaled*), ``n`` the number of nodes in the federation, and clients outside the sampled set
``S_t`` keeping their ``g_i`` (EF21-PP).

**Not the residual error feedback of the pipelines.** The ``error_feedback=True`` pipelines
(:mod:`flwr_ext.compression.feedback`) keep ``e_i``, the part of the update *not yet sent*;
only the client has it, and the server applies what it receives once. EF21's ``g_i`` is the
*running estimate* of the update that both sides hold (the server a mirror of each, their
mean ``g``); the server steps with ``g`` every round, including the parts of ``g_i`` that a
client sent rounds ago. They are different states (``context.state`` keys
``flwr-ext.ef21.*`` here, ``flwr-ext.compression.*`` there) and different wire contents: a
compressed-pipeline reply decodes to a model delta, an EF21 reply to a correction ``c_i``
that only :class:`flwr_ext.strategies.EF21` understands.

**Keeping ``g_i`` identical on both sides.** A client cannot know whether its reply arrived,
so it holds the new correction as *pending* and commits it (``g_i <- g_i + c_i``) only when
the server's next train config says that it applied it: the server sends ``ef21-accepted``,
the number of this node's corrections it has applied, and the reply carries ``ef21-base``,
the number the client's committed ``g_i`` contains. A lost reply is dropped by both sides; a
client that lost its state (or any other mismatch) restarts from ``g_i = 0`` with base 0, and
the server then resets its mirror to 0 before adding the correction (counted as a resync).
Both sides add bit-identical decoded arrays in the same order, so the server's mirror equals
the client's ``g_i`` bit for bit (tested).

**EF21-BC** (bidirectional; Fatkhullin et al. 2021, "EF21 with Bells & Whistles", Alg. EF21-BC,
and its reference code ``ef21_bc.py``): the server does not send the model. Server and every
node hold the model ``x`` and a broadcast estimator ``b``-accumulated ``g``; each round::

    w     = (1/n) sum_i g_i                  (the EF21 mean of the clients' estimates)
    b     = C_M(w - g),   g <- g + b         (server; only b is sent down)
    x     <- x + eta g                       (server and node, from the same g)

and the nodes train from their own copy of ``x``. A node receives ``b`` with the version it
must hold (``ef21-bc-from``); one that missed a round (not sampled, a lost message, a lost
state) gets ``x`` and ``g`` densely instead (counted as ``ef21-bc-dense``), and one that cannot
apply ``b`` answers with an error so that the server sends it the dense state next time. The
node's ``x`` and ``g`` equal the server's bit for bit (same decoded ``b``, same float ops).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode
from flwr.common.logger import log

from ..arrays import numpy_to_record
from .codec import PipelineConfig, decode_tensor, encode_update
from .errors import ConfigError, CorruptPayloadError
from .wire import DTYPE_CODE

STATE_KEY = "flwr-ext.ef21"
#: Train-config key: corrections of this node the server has applied.
KEY_ACCEPTED = "ef21-accepted"
#: Reply ConfigRecord (under :data:`REPLY_RECORD`) key: corrections in the client's ``g_i``.
KEY_BASE = "ef21-base"
REPLY_RECORD = "ef21"
#: EF21-BC train-config keys: the version the node holds after this message, the version the
#: increment applies to (-1: the message is the dense state), and the server step ``eta``.
KEY_BC_VERSION = "ef21-bc-version"
KEY_BC_FROM = "ef21-bc-from"
KEY_BC_LR = "ef21-bc-lr"
#: EF21-BC record holding the dense ``g`` (dense messages only).
BC_G_RECORD = "ef21-bc-g"

Arrays = dict[str, np.ndarray]


def default_compressor(density: float = 0.01) -> PipelineConfig:
    """Top-k at ``density`` with exact values (a contractive compressor, ``alpha = k/d``)."""
    return PipelineConfig(name="ef21", sparsify="topk", density=density, quantize="none")


def check_compressor(config: PipelineConfig) -> PipelineConfig:
    """EF21 *is* the error feedback: refuse a pipeline that keeps its own residual."""
    if config.error_feedback or config.momentum:
        raise ConfigError(
            "EF21 needs a compressor without residual error feedback or momentum "
            "(error_feedback=False); its g_i replaces the residual"
        )
    return config


def _add(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> Arrays:
    """``a + b`` by name; names missing from ``a`` count as zeros of ``b``'s shape."""
    out: Arrays = {}
    for name, x in b.items():
        old = a.get(name)
        if old is None or old.shape != x.shape or old.dtype != x.dtype:
            old = np.zeros_like(x)
        out[name] = old + x
    return out


# --------------------------------------------------------------------------- client
@dataclass
class EF21ClientState:
    """One client's EF21 state.

    Parameters
    ----------
    g : dict[str, np.ndarray]
        The committed estimate ``g_i`` (empty: zeros).
    count : int
        Corrections committed into ``g`` (the server's ``ef21-accepted`` when in sync).
    pending : dict[str, np.ndarray] or None
        The last correction sent, not yet acknowledged.
    """

    g: Arrays = field(default_factory=dict)
    count: int = 0
    pending: Arrays | None = None


def client_sync(state: EF21ClientState, accepted: int) -> bool:
    """Commit or drop the pending correction from the server's count; ``True`` if reset.

    ``accepted == count + 1``: the server applied it, ``g <- g + pending``. Otherwise the
    pending correction is dropped; if the counts still differ, ``g`` restarts at zero
    (count 0), and the server resets its mirror when it sees base 0.
    """
    if state.pending is not None:
        if accepted == state.count + 1:
            state.g = _add(state.g, state.pending)
            state.count += 1
        state.pending = None
    if accepted != state.count:
        state.g, state.count = {}, 0
        return True
    return False


def client_step(
    state: EF21ClientState,
    delta: Mapping[str, np.ndarray],
    config: PipelineConfig,
    *,
    seed: int = 0,
) -> tuple[dict[str, bytes], int]:
    """Encode ``c_i = C(delta - g_i)`` and hold its decoded value as pending.

    Returns ``(payloads, base)``: one payload per tensor and the count that ``g_i`` holds.
    """
    diff: Arrays = {}
    for name, x in delta.items():
        x = np.asarray(x)
        g = state.g.get(name)
        diff[name] = x if g is None or g.shape != x.shape or g.dtype != x.dtype else x - g
    payloads, recon = encode_update(diff, config, seed=seed)
    state.pending = recon
    # forget tensors that are no longer part of the update
    state.g = {n: v for n, v in state.g.items() if n in delta}
    return payloads, state.count


# --------------------------------------------------------------------------- server
class Receipt(StrEnum):
    """What the server did with one client's correction."""

    ACCEPTED = "accepted"
    RESYNCED = "resynced"  # base 0 from a node the server had state for: mirror reset first
    REJECTED = "rejected"  # base matches neither the server's count nor 0


@dataclass
class EF21ServerState:
    """The server's EF21 state: a mirror of every ``g_i`` and the count applied per node.

    ``g`` (:meth:`mean`) is recomputed from the mirrors, so ``g == mean_i g_i`` holds exactly
    instead of only up to the rounding of ``g <- g + mean c`` (the same value in exact
    arithmetic, Alg. 1 line 8).
    """

    mirrors: dict[int, Arrays] = field(default_factory=dict)
    accepted: dict[int, int] = field(default_factory=dict)

    def receive(self, node: int, base: int, correction: Mapping[str, np.ndarray]) -> Receipt:
        """Apply node ``node``'s correction ``c_i`` (its ``g_i`` held ``base`` corrections)."""
        have = self.accepted.get(node, 0)
        if base == have:
            receipt = Receipt.ACCEPTED
        elif base == 0:
            self.mirrors.pop(node, None)
            receipt = Receipt.RESYNCED
        else:
            return Receipt.REJECTED
        self.mirrors[node] = _add(self.mirrors.get(node, {}), correction)
        self.accepted[node] = base + 1
        return receipt

    def mean(self, num_nodes: int, like: Mapping[str, np.ndarray]) -> Arrays:
        """``g = (1/n) sum_i g_i`` over ``n = num_nodes`` (nodes without a mirror count 0).

        Summed in float64 in ascending node order, then cast to the dtype of ``like``.
        """
        n = max(int(num_nodes), len(self.mirrors), 1)
        out: Arrays = {}
        for name, ref in like.items():
            ref = np.asarray(ref)
            acc = np.zeros(ref.shape, dtype=np.float64)
            for node in sorted(self.mirrors):
                m = self.mirrors[node].get(name)
                if m is not None and m.shape == ref.shape:
                    acc += m
            out[name] = (acc / n).astype(ref.dtype)
        return out


# --------------------------------------------------------------------------- EF21-BC
def bc_step(
    x: Mapping[str, np.ndarray], g: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], lr: float
) -> tuple[Arrays, Arrays]:
    """One EF21-BC broadcast step on either side: ``g <- g + b``, ``x <- x + lr * g``.

    Only float tensors move; others keep ``x``'s value. Returns ``(x, g)`` (new arrays).
    """
    g_new = _add(g, b)
    x_new: Arrays = {}
    for name, v in x.items():
        v = np.asarray(v)
        if v.dtype.kind == "f" and name in g_new:
            x_new[name] = (v + lr * g_new[name]).astype(v.dtype)
        else:
            x_new[name] = v
    return x_new, g_new


@dataclass
class BCNodeState:
    """A node's EF21-BC copy of the model ``x`` and estimator ``g`` at ``version`` (-1: none)."""

    x: Arrays = field(default_factory=dict)
    g: Arrays = field(default_factory=dict)
    version: int = -1


def bc_receive(state: BCNodeState, msg: Message, arrays_key: str) -> bool:
    """Apply an EF21-BC train message to ``state``; ``False`` if it cannot be applied."""
    cfg = next(r for r in msg.content.config_records.values() if KEY_BC_VERSION in r)
    version, base = int(cfg[KEY_BC_VERSION]), int(cfg[KEY_BC_FROM])  # type: ignore[arg-type]
    rec = msg.content[arrays_key]
    if base < 0:  # dense state
        state.x = {k: v.numpy() for k, v in rec.items()}
        state.g = {k: v.numpy() for k, v in msg.content[BC_G_RECORD].items()}
    else:
        if base != state.version or not state.x:
            return False
        shapes = {k: v.shape for k, v in state.x.items()}
        if set(rec) != set(shapes):
            return False
        try:
            b = {
                k: decode_tensor(a.data, expected_shape=shapes[k], stype=a.stype)
                for k, a in rec.items()
            }
        except CorruptPayloadError:
            return False
        state.x, state.g = bc_step(state.x, state.g, b, float(cfg[KEY_BC_LR]))  # type: ignore[arg-type]
    state.version = version
    return True


def _load_bc(context: Context, key: str) -> BCNodeState:
    state = BCNodeState()
    if f"{key}.bc.meta" in context.state:
        state.version = int(context.state[f"{key}.bc.meta"]["version"])
        state.x = {k: v.numpy() for k, v in context.state[f"{key}.bc.x"].items()}
        state.g = {k: v.numpy() for k, v in context.state[f"{key}.bc.g"].items()}
    return state


def _save_bc(context: Context, key: str, state: BCNodeState) -> None:
    for part, arrays in (("x", state.x), ("g", state.g)):
        context.state[f"{key}.bc.{part}"] = numpy_to_record(arrays)
    context.state[f"{key}.bc.meta"] = ConfigRecord({"version": state.version})


def _is_bc(msg: Message) -> bool:
    return any(KEY_BC_VERSION in r for r in msg.content.config_records.values())


# --------------------------------------------------------------------------- client mod
def _load(context: Context, key: str) -> EF21ClientState:
    state = EF21ClientState()
    if f"{key}.meta" not in context.state:
        return state
    meta = context.state[f"{key}.meta"]
    state.count = int(meta["count"])
    state.g = {k: v.numpy() for k, v in context.state[f"{key}.g"].items()}
    if bool(meta["has-pending"]):
        state.pending = {k: v.numpy() for k, v in context.state[f"{key}.pending"].items()}
    return state


def _save(context: Context, key: str, state: EF21ClientState) -> None:
    context.state[f"{key}.g"] = numpy_to_record(state.g)
    context.state[f"{key}.pending"] = numpy_to_record(state.pending or {})
    context.state[f"{key}.meta"] = ConfigRecord(
        {"count": state.count, "has-pending": state.pending is not None}
    )


def _accepted(msg: Message) -> int | None:
    for rec in msg.content.config_records.values():
        if KEY_ACCEPTED in rec:
            return int(rec[KEY_ACCEPTED])  # type: ignore[arg-type]
    return None


def _server_round(msg: Message) -> int:
    for rec in msg.content.config_records.values():
        if "server-round" in rec:
            return int(rec["server-round"])  # type: ignore[arg-type]
    return 0


def ef21_mod(
    density: float = 0.01,
    *,
    config: PipelineConfig | None = None,
    seed: int = 0,
    state_key: str = STATE_KEY,
) -> Mod:
    """Return the client mod of EF21 (use with :class:`flwr_ext.strategies.EF21`).

    Parameters
    ----------
    density : float
        Top-k density of the default compressor (:func:`default_compressor`).
    config : PipelineConfig or None
        Any other compressor without residual error feedback (e.g. ``sparsify="randomk"``,
        unscaled, or ``quantize="kmeans"``); overrides ``density``.
    seed : int
        Base seed of stochastic stages, mixed with round, node and count.
    state_key : str
        Prefix of the ``context.state`` entries (``.g``, ``.pending``, ``.meta``).

    Returns
    -------
    Mod
        Train messages whose config carries ``ef21-accepted`` get their reply replaced by the
        encoded correction ``c_i`` plus a ConfigRecord ``"ef21"`` with ``ef21-base``; other
        messages pass through. Messages of :class:`flwr_ext.strategies.EF21BC` (config key
        ``ef21-bc-version``) first update the node's own ``x`` and ``g`` from ``b`` (or the
        dense state), and the ClientApp is called with that ``x``.
    """
    cfg = check_compressor(config if config is not None else default_compressor(density))

    def _ef21_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN or not msg.has_content():
            return call_next(msg, context)
        accepted = _accepted(msg)
        if accepted is None:
            return call_next(msg, context)
        if _is_bc(msg):
            arrays_key = next(k for k in msg.content.array_records if k != BC_G_RECORD)
            bc = _load_bc(context, state_key)
            if not bc_receive(bc, msg, arrays_key):
                reason = f"ef21-bc: node holds version {bc.version}; needs the dense state"
                return Message(Error(ErrorCode.MOD_FAILED_PRECONDITION, reason), reply_to=msg)
            _save_bc(context, state_key, bc)
            # the ClientApp trains from the node's own x, as if the server had sent it
            msg.content[arrays_key] = ArrayRecord({k: Array(v) for k, v in bc.x.items()})
            if BC_G_RECORD in msg.content:
                del msg.content[BC_G_RECORD]
        if len(msg.content.array_records) != 1:
            return call_next(msg, context)
        received = next(iter(msg.content.array_records.values()))
        sent = {k: v.numpy() for k, v in received.items()}
        out = call_next(msg, context)
        if out.has_error() or len(out.content.array_records) != 1:
            return out
        key, reply = next(iter(out.content.array_records.items()))
        new = {k: v.numpy() for k, v in reply.items()}
        if list(new) != list(sent) or any(
            new[k].shape != sent[k].shape or str(new[k].dtype) not in DTYPE_CODE for k in new
        ):
            log(WARNING, "ef21_mod: reply arrays differ from received; sent as they are")
            return out
        delta = {k: new[k] - sent[k].astype(new[k].dtype) for k in new}
        state = _load(context, state_key)
        client_sync(state, accepted)
        node = int(context.node_id) & (2**63 - 1)
        mixed = int(
            np.random.SeedSequence([seed, _server_round(msg), node, state.count]).generate_state(
                1, np.uint64
            )[0]
        )
        payloads, base = client_step(state, delta, cfg, seed=mixed)
        _save(context, state_key, state)
        out.content[key] = ArrayRecord(
            {
                k: Array(
                    dtype=str(delta[k].dtype),
                    shape=tuple(int(d) for d in delta[k].shape),
                    stype=cfg.stype,
                    data=payloads[k],
                )
                for k in delta
            }
        )
        reply_cfg = ConfigRecord({KEY_BASE: base})
        if _is_bc(msg):
            reply_cfg[KEY_BC_VERSION] = _load_bc(context, state_key).version
        out.content[REPLY_RECORD] = reply_cfg
        return out

    return _ef21_mod

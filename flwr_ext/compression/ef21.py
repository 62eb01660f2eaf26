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
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.logger import log

from .codec import PipelineConfig, encode_update
from .errors import ConfigError
from .wire import DTYPE_CODE

STATE_KEY = "flwr-ext.ef21"
#: Train-config key: corrections of this node the server has applied.
KEY_ACCEPTED = "ef21-accepted"
#: Reply ConfigRecord (under :data:`REPLY_RECORD`) key: corrections in the client's ``g_i``.
KEY_BASE = "ef21-base"
REPLY_RECORD = "ef21"

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
    def rec(arrays: Arrays) -> ArrayRecord:
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})

    context.state[f"{key}.g"] = rec(state.g)
    context.state[f"{key}.pending"] = rec(state.pending or {})
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
        messages pass through.
    """
    cfg = check_compressor(config if config is not None else default_compressor(density))

    def _ef21_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN or not msg.has_content():
            return call_next(msg, context)
        accepted = _accepted(msg)
        if accepted is None or len(msg.content.array_records) != 1:
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
        out.content[REPLY_RECORD] = ConfigRecord({KEY_BASE: base})
        return out

    return _ef21_mod

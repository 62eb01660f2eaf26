"""Downlink compression with a shadow model per node (EF21-P): state objects and pure functions.

Implementation based on Gruntkowska, Tyurin, Richtarik, "EF21-P and Friends: Improved
Theoretical Communication Complexity for Distributed Optimization with Bidirectional
Compression", ICML 2023, https://arxiv.org/abs/2209.15218 (EF21-P, the primal step). The server
wants node ``i`` to train the model ``x``; node ``i`` holds a *shadow* ``w_i``; the server sends
only a compressed difference and both sides apply it::

    d_i = C(x - w_i)             (server: encode, then decode its own payload)
    w_i <- w_i + d_i             (server and node, bit-identically: same decoder, same float op)

and the node trains from ``w_i``. What ``C`` drops this time stays in ``x - w_i`` and is sent
later: the shadow *is* the error feedback, so ``C`` is a plain compressor (a preset's residual
error feedback, momentum and warm-up are ignored, :func:`downlink_config`). The node's update
``delta_i = y_i - w_i`` (trained from ``w_i``) is applied to ``x``, not to ``w_i``: the
server rebuilds the reply as ``x + delta_i`` (EF21-P's ``x <- x - gamma grad f(w)``), so a
Flower strategy aggregates models as usual.

**Keeping ``w_i`` identical on both sides.** Each message carries the version the increment
applies to (:data:`KEY_FROM`; -1: a dense message, the model itself), the version the node
holds afterwards (:data:`KEY_VERSION`) and a checksum of the shadow after applying
(:data:`KEY_CHECKSUM`). The node applies an increment only when its version matches, checks
the checksum, and reports its version in the reply (ConfigRecord :data:`REPLY_RECORD`). The
server sends an increment only to a node whose *last reply confirmed* the version the server
holds for it; every other node (never seen: first contact or a late join; a lost reply; an error
reply, e.g. a node that lost its state or failed the checksum) gets the model densely, and the
dense sends are counted by reason (:class:`Send`). A node that cannot apply an increment
answers with an error (so the server sends it the dense model next time) and drops its state.

This module knows nothing of Flower's strategies: :class:`DownlinkState` (server: one
:class:`Shadow` per node) with :func:`server_send` / :func:`server_confirm` /
:func:`server_unconfirm`, and :class:`NodeCopy` with :func:`node_receive` (node). The
``Compressed`` wrapper (:mod:`flwr_ext.compression.server`) and the client mod
(:func:`~flwr_ext.compression.compression_mod`) are thin layers on top; an asynchronous engine
calls the same functions per dispatch and per reply (docs/compression.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from flwr_ext.arrays import numpy_to_record

from .codec import PipelineConfig, decode_tensor, encode_update
from .errors import ConfigError, CorruptPayloadError
from .presets import get_preset

Arrays = dict[str, np.ndarray]

#: Train-config keys of a downlink message.
KEY_VERSION = "flwr-ext.down-version"  # version the node holds after applying this message
KEY_FROM = "flwr-ext.down-from"  # version the increment applies to; -1: dense model
KEY_CHECKSUM = "flwr-ext.down-checksum"  # checksum of the shadow after applying
KEY_BASE_CHECKSUM = "flwr-ext.down-base-checksum"  # version-0 increments: checksum of x_0
#: Reply ConfigRecord added by the client mod; holds :data:`KEY_VERSION`.
REPLY_RECORD = "flwr-ext.downlink"
#: Prefix of the node's ``context.state`` entries (``.w``, ``.meta``).
STATE_KEY = "flwr-ext.downlink"
DENSE = -1


class Send(StrEnum):
    """What the server sent a node, and why (dense sends are the re-syncs that are counted)."""

    COMPRESSED = "compressed"  # C(x - w_i): the node confirmed holding w_i
    INITIAL = "initial"  # C(x - x_0) to a node that builds x_0 itself (``initial="known"``)
    NEW = "new"  # dense: first contact with this node (or a late join)
    UNCONFIRMED = "unconfirmed"  # dense: the last message's apply was not confirmed


def downlink_config(spec: str | PipelineConfig | None) -> PipelineConfig | None:
    """The downlink compressor ``C`` from a preset spec (``"fedzip"``, ``"dgc:density=0.01"``).

    Residual error feedback, momentum correction and warm-up are switched off: the shadow's
    difference ``x - w_i`` already carries what was not sent. ``None`` / ``"none"``: no
    downlink compression.
    """
    if spec is None:
        return None
    cfg = get_preset(spec) if isinstance(spec, str) else spec
    if cfg is None:
        return None
    if not isinstance(cfg, PipelineConfig):
        raise ConfigError(f"downlink compressor must be a preset or PipelineConfig, got {spec!r}")
    changes: dict = {"error_feedback": False, "momentum": 0.0, "warmup": ()}
    if hasattr(cfg, "clip_norm"):
        changes["clip_norm"] = 0.0  # DGC's clipping is for gradients, not for x - w
    return dataclasses.replace(cfg, **changes)


def checksum(arrays: Mapping[str, np.ndarray]) -> str:
    """A 64-bit BLAKE2b digest (hex) of names, dtypes, shapes and bytes, in name order."""
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    # numpy_to_record keeps 0-d tensors 0-d (np.ascontiguousarray would make them shape (1,))
    return numpy_to_record(dict(arrays))


def apply_increment(w: Mapping[str, np.ndarray], d: Mapping[str, np.ndarray]) -> Arrays:
    """``w + d`` per tensor in ``w``'s dtype (the one float op both sides run)."""
    return {k: (v + d[k].astype(v.dtype, copy=False)) if k in d else v for k, v in w.items()}


# --------------------------------------------------------------------------- server
@dataclass
class Shadow:
    """The server's copy of the shadow ``w_i`` one node holds.

    Parameters
    ----------
    arrays : dict[str, np.ndarray]
        ``w_i`` after the last message sent to the node.
    version : int
        Messages applied to ``w_i`` (the node reports it back).
    confirmed : bool
        Whether the node's last reply reported ``version``: only then is the next message an
        increment.
    """

    arrays: Arrays
    version: int
    confirmed: bool = False


@dataclass
class Downlink:
    """One downlink message as values: what to put in the train message to one node.

    ``record`` replaces the strategy's ArrayRecord (encoded increments, or the dense model);
    ``config`` holds the keys to add to the train config; ``shadow`` is ``w_i`` after the
    node applies it (the model the node will train from).
    """

    kind: Send
    record: ArrayRecord
    config: dict[str, int | str]
    shadow: Arrays


@dataclass
class DownlinkState:
    """Server side of EF21-P: the compressor and one :class:`Shadow` per node.

    Parameters
    ----------
    config : PipelineConfig
        The compressor ``C`` (:func:`downlink_config`).
    seed : int
        Base seed of stochastic stages (random-k masks, QSGD), mixed with node and version.
    initial : Arrays or None
        ``x_0`` when the nodes can build it themselves (``Compressed(..., downlink_initial=
        "known")``): nodes the server has not seen yet are assumed to hold it (version 0) and
        get an increment, checked against its checksum; ``None``: they get the model densely.
    """

    config: PipelineConfig
    seed: int = 0
    initial: Arrays | None = None
    nodes: dict[int, Shadow] = field(default_factory=dict)
    counts: dict[Send, int] = field(default_factory=lambda: {s: 0 for s in Send})


def _increment(
    state: DownlinkState, node: int, w: Arrays, x: Arrays, version: int
) -> tuple[ArrayRecord, Arrays]:
    diff = {k: x[k] - w[k].astype(x[k].dtype, copy=False) for k in x}
    mixed = int(
        np.random.SeedSequence([state.seed, int(node) & (2**63 - 1), version]).generate_state(
            1, np.uint64
        )[0]
    )
    payloads, _ = encode_update(diff, state.config, seed=mixed, reconstruct=False)
    # decode what was encoded, with the node's decoder: the server's w_i moves exactly as the
    # node's does
    d = {
        k: decode_tensor(payloads[k], expected_shape=diff[k].shape, stype=state.config.stype)
        for k in diff
    }
    record = ArrayRecord(
        {
            k: Array(
                dtype=str(diff[k].dtype),
                shape=tuple(int(s) for s in diff[k].shape),
                stype=state.config.stype,
                data=payloads[k],
            )
            for k in diff
        }
    )
    return record, apply_increment(w, d)


def server_send(state: DownlinkState, node: int, x: Mapping[str, np.ndarray]) -> Downlink:
    """Decide and build the downlink message for ``node`` to train ``x``; advance its shadow.

    A node whose last reply confirmed its shadow (same tensor names, shapes and dtypes as
    ``x``) gets ``C(x - w_i)``; with ``state.initial`` a node never seen gets
    ``C(x - x_0)``; every other node gets ``x`` densely. The shadow is advanced at once and
    marked unconfirmed until :func:`server_confirm`.
    """
    x = {k: np.asarray(v) for k, v in x.items()}
    old = state.nodes.get(node)
    same = old is not None and _same_layout(old.arrays, x)
    cfg: dict[str, int | str] = {}
    if old is not None and old.confirmed and same:
        kind, version = Send.COMPRESSED, old.version + 1
        record, w = _increment(state, node, old.arrays, x, version)
        cfg[KEY_FROM] = old.version
    elif old is None and state.initial is not None and _same_layout(state.initial, x):
        kind, version = Send.INITIAL, 1
        record, w = _increment(state, node, state.initial, x, version)
        cfg[KEY_FROM] = 0
        cfg[KEY_BASE_CHECKSUM] = checksum(state.initial)
    else:
        kind = Send.NEW if old is None else Send.UNCONFIRMED
        version = 1 if old is None else old.version + 1
        w = {k: v.copy() for k, v in x.items()}
        record = _record(w)
        cfg[KEY_FROM] = DENSE
    cfg[KEY_VERSION] = version
    cfg[KEY_CHECKSUM] = checksum(w)
    state.nodes[node] = Shadow(w, version, confirmed=False)
    state.counts[kind] += 1
    return Downlink(kind, record, cfg, w)


def _same_layout(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(
        a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a
    )


def server_confirm(state: DownlinkState, node: int, version: int) -> bool:
    """A reply of ``node`` reported holding ``version``; ``True`` if that is the server's."""
    shadow = state.nodes.get(node)
    ok = shadow is not None and shadow.version == version
    if shadow is not None:
        shadow.confirmed = ok
    return ok


def server_unconfirm(state: DownlinkState, node: int) -> None:
    """The node's reply was an error (or it is known lost): send it the dense model next."""
    shadow = state.nodes.get(node)
    if shadow is not None:
        shadow.confirmed = False


# --------------------------------------------------------------------------- node
@dataclass
class NodeCopy:
    """The node's shadow ``w_i`` and its version (``-1``: none, e.g. a fresh or lost state)."""

    arrays: Arrays = field(default_factory=dict)
    version: int = DENSE


class Refusal(StrEnum):
    """Why a node could not apply a downlink message (it answers with an error)."""

    NO_STATE = "no shadow at the version the increment applies to (lost or new state)"
    BAD_PAYLOAD = "increment does not decode against the shadow"
    CHECKSUM = "shadow checksum differs from the server's after applying"
    NOT_DOWNLINK = "message carries no downlink keys"


def node_receive(
    copy: NodeCopy,
    config: Mapping[str, object],
    record: ArrayRecord,
    *,
    initial: Mapping[str, np.ndarray] | None = None,
) -> Refusal | None:
    """Apply one downlink message to ``copy`` in place; ``None`` on success, else why not.

    ``config`` is the train config (:data:`KEY_FROM`, :data:`KEY_VERSION`,
    :data:`KEY_CHECKSUM`); ``record`` the message's ArrayRecord. ``initial`` is ``x_0`` when
    this node can build it (used for a version-0 increment when ``copy`` is empty). On a
    refusal ``copy`` is reset to empty: the server sends the dense model next time.
    """
    if KEY_FROM not in config or KEY_VERSION not in config or KEY_CHECKSUM not in config:
        return Refusal.NOT_DOWNLINK
    base, version = int(config[KEY_FROM]), int(config[KEY_VERSION])  # type: ignore[call-overload]
    if base == DENSE:
        try:
            new = {k: np.array(v.numpy()) for k, v in record.items()}
        except (TypeError, ValueError):
            return _refuse(copy, Refusal.BAD_PAYLOAD)
    else:
        w = copy.arrays
        if copy.version != base or not w:
            w = {}
            if base == 0 and initial is not None:
                init = {k: np.asarray(v) for k, v in initial.items()}
                if checksum(init) == config.get(KEY_BASE_CHECKSUM):
                    w = init
            if not w:
                return _refuse(copy, Refusal.NO_STATE)
        if list(record) != list(w):
            return _refuse(copy, Refusal.BAD_PAYLOAD)
        try:
            d = {
                k: decode_tensor(a.data, expected_shape=w[k].shape, stype=a.stype)
                for k, a in record.items()
            }
        except CorruptPayloadError:
            return _refuse(copy, Refusal.BAD_PAYLOAD)
        new = apply_increment(w, d)
    if checksum(new) != config[KEY_CHECKSUM]:
        return _refuse(copy, Refusal.CHECKSUM)
    copy.arrays, copy.version = new, version
    return None


def _refuse(copy: NodeCopy, why: Refusal) -> Refusal:
    copy.arrays, copy.version = {}, DENSE
    return why


def is_downlink(config: Mapping[str, object]) -> bool:
    """Whether a train config carries a downlink message."""
    return KEY_VERSION in config and KEY_FROM in config


def load_copy(state: object, key: str = STATE_KEY) -> NodeCopy:
    """The node's :class:`NodeCopy` from ``context.state`` (a RecordDict); empty if none."""
    if f"{key}.meta" not in state:  # type: ignore[operator]
        return NodeCopy()
    meta = state[f"{key}.meta"]  # type: ignore[index]
    arrays = {k: v.numpy() for k, v in state[f"{key}.w"].items()}  # type: ignore[index]
    return NodeCopy(arrays, int(meta["version"]))


def save_copy(state: object, copy: NodeCopy, key: str = STATE_KEY) -> None:
    """Store ``copy`` in ``context.state`` (a RecordDict)."""
    state[f"{key}.w"] = _record(copy.arrays)  # type: ignore[index]
    state[f"{key}.meta"] = ConfigRecord({"version": copy.version})  # type: ignore[index]

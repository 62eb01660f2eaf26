"""SCAFCOM / SCALLION: SCAFFOLD's control variates with one compressed uplink vector.

Implementation based on Huang, Li, Li, "Stochastic Controlled Averaging for Federated Learning
with Communication Compression", ICLR 2024, https://arxiv.org/abs/2308.08165. The paper first
rewrites SCAFFOLD (Karimireddy et al. 2020) so that a client sends *one* vector instead of
two (the model delta and the control-variate delta), then compresses that vector:

* **SCALLION** (unbiased compressors ``C``, e.g. random-k scaled by ``d/k``);
* **SCAFCOM** (biased, contractive compressors such as top-k) with *local momentum* ``v_i``.

One round ``r`` on a sampled client ``i`` (``x^r`` the model, ``c^r`` the server's and
``c_i^r`` the client's control variate, ``K`` local steps of size ``eta_l``)::

    y <- y - eta_l (grad f_i(y; xi) - c_i^r + c^r)               K times from y = x^r
    g_i   = (x^r - y_i^{r,K}) / (K eta_l) + c_i^r - c^r            (mean local gradient)
    v_i^{r+1} = (1 - beta) v_i^r + beta g_i                        (SCAFCOM; beta = 1: none)
    delta_i^r = C(v_i^{r+1} - c_i^r)                               (the only uplink vector)
    c_i^{r+1} = c_i^r + alpha delta_i^r                            (SCALLION's alpha; SCAFCOM 1)

and the server (:class:`flwr_ext.strategies.SCAFCOM`), with ``S`` the replies it applied and
``N`` the nodes in the federation::

    x^{r+1} = x^r - eta_g K eta_l (c^r + (1/|S|) sum_{i in S} delta_i^r)
    c^{r+1} = c^r + (alpha/N) sum_{i in S} delta_i^r  (= (1/N) sum_i c_i^{r+1}, kept exactly)

With ``beta = alpha = 1`` and ``C`` the identity, ``delta_i = g_i - c_i = (x - y)/(K eta_l)
- c`` is SCAFFOLD's ``c_i^+ - c_i`` and the server step is SCAFFOLD's ``x + eta_g mean(y_i -
x)``: this is SCAFFOLD, with half its uplink (tested against the two-vector form). SCAFCOM with
``beta = 1`` is EF21 applied to ``g_i`` (the control variate *is* EF21's estimate ``g_i``);
with ``beta < 1`` it is EF21 on the momentum ``v_i``. SCALLION is DIANA's shift update
(``alpha <= 1/(1 + omega)`` in theory) on SCAFFOLD's control variates.

**Where the equations come from.** The paper's own algorithm boxes could not be read here
(only its abstract and the reviews were in reach); the lines above follow (a) the paper's
stated design (one uplink variable; SCALLION: unbiased ``C`` and a scaling factor ``alpha``;
SCAFCOM: biased ``C`` and local momentum), (b) SCAFFOLD's equations rewritten as above, and
(c) a public third-party Flower implementation of both methods whose client lines agree with
them (``v <- (1-beta) v + beta((x - y)/(K eta_l) + c_i - c)``, ``delta = C(v - c_i)``,
``c_i <- c_i + delta``; server ``x <- x - eta_g (c + mean delta)``, ``c <- c + (|S|/N) mean
delta``). Two choices are ours and marked: the server step carries ``K eta_l`` so that ``eta_g =
1`` is SCAFFOLD's global step of 1, and SCALLION's ``alpha`` scales only the control-variate
updates (DIANA), not the model step, so that ``c + mean delta`` stays an unbiased estimate.

**Local steps.** The drift correction ``c^r - c_i^r`` enters every local step, so the
ClientApp must apply it: this mod puts it in the train message as the ArrayRecord
``"scafcom-correction"`` (add it to each parameter's gradient before a plain SGD step, e.g.
``flwr_ext.vision.train.train_local(..., grad_offset=...)``). ``K`` and ``eta_l`` come from the
train config (``scafcom-local-steps``, ``scafcom-local-lr``); a ClientApp that runs a different
number of steps (one epoch of an uneven partition) reports it as the reply metric
``scafcom-local-steps``, and ``g_i`` uses that count (the server step keeps the nominal ``K``:
each client's update is normalised to ``K`` steps, as FedNova does).

**State, and how it differs from the other two error feedbacks.** The pipelines'
``error_feedback=True`` keeps a residual ``e_i`` that only the client has. EF21 keeps an
estimate ``g_i`` of the *update* that client and server both hold. SCAFCOM keeps ``c_i``, an
estimate of the client's *mean gradient* that client and server both hold (the server as a
mirror; ``c`` is their mean and is *sent back* to every client, where it corrects each local
step), plus ``v_i``, a momentum that only the client holds. ``context.state`` keys:
``flwr-ext.scafcom.{c,v,pending-c,pending-v,meta}``.

**Keeping ``c_i`` identical on both sides** is EF21's acknowledgement scheme
(:mod:`flwr_ext.compression.ef21`): the new ``c_i`` and ``v_i`` are held as pending and
committed only when the next train config's ``scafcom-accepted`` says the server applied this
reply; a lost reply is dropped on both sides (the round then counts for that client as if it
had not been sampled: ``v_i`` is not moved either), a lost state or any mismatch restarts from
``c_i = v_i = 0`` and the server resets its mirror (a resync). The server mirror adds the same
decoded, ``alpha``-scaled array in the same float operation, so it equals the client's ``c_i``
bit for bit (tested).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.logger import log

from ..arrays import numpy_to_record
from .codec import PipelineConfig, encode_update
from .ef21 import _add, check_compressor
from .errors import ConfigError
from .feedback import randomk_unbiased
from .wire import DTYPE_CODE

STATE_KEY = "flwr-ext.scafcom"
#: Train-config keys (server -> client).
KEY_ACCEPTED = "scafcom-accepted"  # replies of this node the server has applied
KEY_ALPHA = "scafcom-alpha"  # SCALLION's control-variate step (1 for SCAFCOM)
KEY_BETA = "scafcom-beta"  # SCAFCOM's momentum weight (1: no momentum, SCALLION)
KEY_LOCAL_LR = "scafcom-local-lr"  # eta_l
KEY_LOCAL_STEPS = "scafcom-local-steps"  # K (also an optional reply metric: steps run)
#: ArrayRecord of the train message holding the server's control variate ``c^r``.
C_RECORD = "scafcom-c"
#: ArrayRecord the mod hands the ClientApp: ``c^r - c_i^r``, to add to every local gradient.
CORRECTION_RECORD = "scafcom-correction"
#: Reply ConfigRecord and its key: the replies contained in the client's committed ``c_i``.
REPLY_RECORD = "scafcom"
KEY_BASE = "scafcom-base"

Arrays = dict[str, np.ndarray]


def default_compressor(density: float = 0.01) -> PipelineConfig:
    """Top-k at ``density``, exact values: SCAFCOM's biased (contractive) compressor."""
    return PipelineConfig(name="scafcom", sparsify="topk", density=density, quantize="none")


def unbiased_compressor(density: float = 0.01) -> PipelineConfig:
    """Random-k at ``density`` (no index on the wire); the mod rescales it by ``d/k``."""
    return PipelineConfig(name="scallion", sparsify="randomk", density=density, quantize="none")


def scaled(arrays: Mapping[str, np.ndarray], alpha: float) -> Arrays:
    """``alpha * arrays`` in each array's own dtype: the one float op both sides run."""
    if alpha == 1.0:
        return {k: np.asarray(v) for k, v in arrays.items()}
    out: Arrays = {}
    for k, v in arrays.items():
        v = np.asarray(v)
        out[k] = np.multiply(v, v.dtype.type(alpha)) if v.dtype.kind == "f" else v
    return out


def _floats(arrays: Mapping[str, np.ndarray]) -> list[str]:
    return [k for k, v in arrays.items() if np.asarray(v).dtype.kind == "f"]


# --------------------------------------------------------------------------- client
@dataclass
class ScafcomClientState:
    """One client's SCAFCOM / SCALLION state.

    Parameters
    ----------
    c : dict[str, np.ndarray]
        The committed control variate ``c_i`` (empty: zeros). The server mirrors it.
    v : dict[str, np.ndarray]
        The committed momentum ``v_i`` (client only; empty: zeros).
    count : int
        Replies committed into ``c`` (the server's ``scafcom-accepted`` when in sync).
    pending_c, pending_v : dict or None
        ``alpha * C(v_i^{r+1} - c_i^r)`` and ``v_i^{r+1}`` of the last reply, not yet
        acknowledged.
    """

    c: Arrays = field(default_factory=dict)
    v: Arrays = field(default_factory=dict)
    count: int = 0
    pending_c: Arrays | None = None
    pending_v: Arrays | None = None


def client_sync(state: ScafcomClientState, accepted: int) -> bool:
    """Commit or drop the pending reply from the server's count; ``True`` if reset.

    ``accepted == count + 1``: the server applied it, ``c_i <- c_i + pending_c`` and
    ``v_i <- pending_v``. Otherwise it is dropped; if the counts still differ, ``c_i`` and
    ``v_i`` restart at zero (count 0) and the server resets its mirror when it sees base 0.
    """
    if state.pending_c is not None:
        if accepted == state.count + 1:
            state.c = _add(state.c, state.pending_c)
            state.v = dict(state.pending_v or {})
            state.count += 1
        state.pending_c = state.pending_v = None
    if accepted != state.count:
        state.c, state.v, state.count = {}, {}, 0
        return True
    return False


def correction(c_server: Mapping[str, np.ndarray], c_client: Mapping[str, np.ndarray]) -> Arrays:
    """``c^r - c_i^r`` for every float tensor of ``c_server``: the local-step drift term."""
    out: Arrays = {}
    for name, c in c_server.items():
        c = np.asarray(c)
        if c.dtype.kind != "f":
            continue
        ci = c_client.get(name)
        out[name] = c.copy() if ci is None or ci.shape != c.shape else c - ci
    return out


def mean_gradient(
    delta: Mapping[str, np.ndarray],
    c_server: Mapping[str, np.ndarray],
    c_client: Mapping[str, np.ndarray],
    steps: float,
    lr: float,
) -> Arrays:
    """``g_i = (x - y)/(K eta_l) + c_i - c`` from the model delta ``y - x`` (float tensors).

    Equal to the mean of the ``K`` stochastic gradients the client took when it corrected
    each of them by ``c - c_i`` (exactly so in exact arithmetic).
    """
    scale = 1.0 / (float(steps) * float(lr))
    out: Arrays = {}
    for name in _floats(delta):
        d = np.asarray(delta[name])
        g = np.multiply(d, d.dtype.type(-scale))
        ci, c = c_client.get(name), c_server.get(name)
        if ci is not None and ci.shape == d.shape:
            g = g + ci
        if c is not None and np.shape(c) == d.shape:
            g = g - np.asarray(c, dtype=d.dtype)
        out[name] = g
    return out


def client_step(
    state: ScafcomClientState,
    delta: Mapping[str, np.ndarray],
    c_server: Mapping[str, np.ndarray],
    *,
    steps: float,
    lr: float,
    beta: float,
    alpha: float,
    compressor: PipelineConfig,
    unbiased: bool = False,
    seed: int = 0,
) -> tuple[dict[str, bytes], int]:
    """Encode ``delta_i = C(v_i^{r+1} - c_i^r)``; hold ``alpha delta_i`` and ``v_i^{r+1}``.

    ``delta`` is the model delta ``y_i^{r,K} - x^r``; tensors that are not floating point are
    sent as zeros (they have no gradient). With ``unbiased=True`` random-k payloads are scaled
    by ``d/k`` before encoding (SCALLION's unbiased compressor). Returns ``(payloads, base)``.
    """
    g = mean_gradient(delta, c_server, state.c, steps, lr)
    v_new: Arrays = {}
    for name, gi in g.items():
        vi = state.v.get(name)
        if beta == 1.0 or vi is None or vi.shape != gi.shape:
            v_new[name] = gi if beta == 1.0 else np.multiply(gi, gi.dtype.type(beta))
        else:
            b = gi.dtype.type(beta)
            v_new[name] = np.multiply(vi, gi.dtype.type(1.0) - b) + np.multiply(gi, b)
    diff: Arrays = {}
    for name, d in delta.items():
        d = np.asarray(d)
        if name not in v_new:
            diff[name] = np.zeros_like(d)
            continue
        ci = state.c.get(name)
        diff[name] = v_new[name] if ci is None or ci.shape != d.shape else v_new[name] - ci
    if unbiased:
        diff = dict(randomk_unbiased(diff, compressor, compressor.density))
    payloads, recon = encode_update(diff, compressor, seed=seed)
    state.pending_c = scaled({k: recon[k] for k in v_new}, alpha)
    state.pending_v = v_new
    state.c = {n: v for n, v in state.c.items() if n in delta}
    state.v = {n: v for n, v in state.v.items() if n in delta}
    return payloads, state.count


# --------------------------------------------------------------------------- server
def server_step(
    x: Mapping[str, np.ndarray],
    c: Mapping[str, np.ndarray],
    mean_delta: Mapping[str, np.ndarray],
    step: float,
) -> Arrays:
    """``x - step * (c + mean_delta)`` on float tensors (``step = eta_g K eta_l``)."""
    out: Arrays = {}
    for name, v in x.items():
        v = np.asarray(v)
        if v.dtype.kind != "f" or name not in c:
            out[name] = v
            continue
        direction = np.asarray(c[name], dtype=np.float64)
        if name in mean_delta:
            direction = direction + mean_delta[name]
        out[name] = (v - step * direction).astype(v.dtype)
    return out


def mean_of(arrays: list[Mapping[str, np.ndarray]], like: Mapping[str, np.ndarray]) -> Arrays:
    """Float64 mean of ``arrays`` in the given order (float tensors of ``like``)."""
    out: Arrays = {}
    for name in _floats(like):
        acc = np.zeros(np.shape(like[name]), dtype=np.float64)
        for a in arrays:
            if name in a:
                acc += a[name]
        out[name] = acc / max(len(arrays), 1)
    return out


# --------------------------------------------------------------------------- client mod
def _rec(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return numpy_to_record(dict(arrays))


def _load(context: Context, key: str) -> ScafcomClientState:
    state = ScafcomClientState()
    if f"{key}.meta" not in context.state:
        return state
    meta = context.state[f"{key}.meta"]
    state.count = int(meta["count"])
    state.c = {k: v.numpy() for k, v in context.state[f"{key}.c"].items()}
    state.v = {k: v.numpy() for k, v in context.state[f"{key}.v"].items()}
    if bool(meta["has-pending"]):
        state.pending_c = {k: v.numpy() for k, v in context.state[f"{key}.pending-c"].items()}
        state.pending_v = {k: v.numpy() for k, v in context.state[f"{key}.pending-v"].items()}
    return state


def _save(context: Context, key: str, state: ScafcomClientState) -> None:
    context.state[f"{key}.c"] = _rec(state.c)
    context.state[f"{key}.v"] = _rec(state.v)
    context.state[f"{key}.pending-c"] = _rec(state.pending_c or {})
    context.state[f"{key}.pending-v"] = _rec(state.pending_v or {})
    context.state[f"{key}.meta"] = ConfigRecord(
        {"count": state.count, "has-pending": state.pending_c is not None}
    )


def _config(msg: Message) -> ConfigRecord | None:
    for rec in msg.content.config_records.values():
        if KEY_ACCEPTED in rec:
            return rec
    return None


def _steps_run(out: Message, default: float) -> float:
    for rec in out.content.metric_records.values():
        if KEY_LOCAL_STEPS in rec and float(rec[KEY_LOCAL_STEPS]) > 0:  # type: ignore[arg-type]
            return float(rec[KEY_LOCAL_STEPS])  # type: ignore[arg-type]
    return default


def scafcom_mod(
    density: float = 0.01,
    *,
    config: PipelineConfig | None = None,
    unbiased: bool = False,
    seed: int = 0,
    state_key: str = STATE_KEY,
) -> Mod:
    """Return the client mod of SCAFCOM and SCALLION (server: ``flwr_ext.strategies.SCAFCOM``).

    Parameters
    ----------
    density : float
        Density of the default compressor: top-k (:func:`default_compressor`), or random-k
        (:func:`unbiased_compressor`) with ``unbiased=True``.
    config : PipelineConfig or None
        Any other compressor without residual error feedback; overrides ``density``.
    unbiased : bool
        SCALLION: scale random-k by ``d/k`` so that ``E[C(v)] = v``. A compressor that is
        unbiased by itself (QSGD) needs no flag.
    seed : int
        Base seed of stochastic stages, mixed with round, node and count.
    state_key : str
        Prefix of the ``context.state`` entries.

    Returns
    -------
    Mod
        Train messages whose config carries ``scafcom-accepted``: the mod commits or drops the
        last reply, replaces the ``"scafcom-c"`` record by ``"scafcom-correction"`` (``c -
        c_i``, for the ClientApp's local steps), and replaces the reply's arrays by the encoded
        ``delta_i`` plus a ConfigRecord ``"scafcom"`` with ``scafcom-base``. The hyper-parameters
        ``alpha``, ``beta``, ``K``, ``eta_l`` come from the config (the strategy owns them).
        Other messages pass through.
    """
    if config is None:
        config = unbiased_compressor(density) if unbiased else default_compressor(density)
    cfg = check_compressor(config)
    if unbiased and cfg.sparsify not in ("randomk", "none"):
        raise ConfigError("unbiased=True rescales random-k; top-k cannot be made unbiased")

    def _scafcom_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN or not msg.has_content():
            return call_next(msg, context)
        rc = _config(msg)
        if rc is None or C_RECORD not in msg.content.array_records:
            return call_next(msg, context)
        keys = [k for k in msg.content.array_records if k != C_RECORD]
        if len(keys) != 1:
            return call_next(msg, context)
        accepted = int(rc[KEY_ACCEPTED])  # type: ignore[arg-type]
        alpha, beta = float(rc[KEY_ALPHA]), float(rc[KEY_BETA])  # type: ignore[arg-type]
        lr, steps = float(rc[KEY_LOCAL_LR]), float(rc[KEY_LOCAL_STEPS])  # type: ignore[arg-type]
        c_server = {k: v.numpy() for k, v in msg.content[C_RECORD].items()}
        del msg.content[C_RECORD]
        state = _load(context, state_key)
        client_sync(state, accepted)
        msg.content[CORRECTION_RECORD] = _rec(correction(c_server, state.c))
        sent = {k: v.numpy() for k, v in msg.content[keys[0]].items()}
        out = call_next(msg, context)
        if out.has_error() or len(out.content.array_records) != 1:
            return out
        key, reply = next(iter(out.content.array_records.items()))
        new = {k: v.numpy() for k, v in reply.items()}
        if list(new) != list(sent) or any(
            new[k].shape != sent[k].shape or str(new[k].dtype) not in DTYPE_CODE for k in new
        ):
            log(WARNING, "scafcom_mod: reply arrays differ from received; sent as they are")
            return out
        delta = {k: new[k] - sent[k].astype(new[k].dtype) for k in new}
        node = int(context.node_id) & (2**63 - 1)
        rnd = int(rc.get("server-round", 0))  # type: ignore[arg-type]
        mixed = int(
            np.random.SeedSequence([seed, rnd, node, state.count]).generate_state(1, np.uint64)[0]
        )
        payloads, base = client_step(
            state,
            delta,
            c_server,
            steps=_steps_run(out, steps),
            lr=lr,
            beta=beta,
            alpha=alpha,
            compressor=cfg,
            unbiased=unbiased,
            seed=mixed,
        )
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

    return _scafcom_mod

"""Server side: decode compressed replies, and the ``Compressed`` strategy wrapper.

:func:`decode_reply` is the one entry point the synchronous wrapper and the asynchronous engine
share: it turns a reply's encoded ArrayRecord back into full arrays, given the arrays that this
node was sent (``reference``). Async strategies send different model versions to different
nodes, so the reference is always explicit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from flwr_ext.wrappers import find_in_chain

from .accounting import ByteCounter, record_bytes
from .codec import DEFAULT_MAX_ELEMENTS, PipelineConfig, decode_tensor, is_sparse_payload
from .downlink import (
    KEY_VERSION,
    REPLY_RECORD,
    DownlinkState,
    Send,
    downlink_config,
    server_confirm,
    server_send,
    server_unconfirm,
)
from .errors import CompressionError, ConfigError, CorruptPayloadError
from .hints import announce

STYPE_PREFIX = "flwr-ext/"


def is_compressed(record: ArrayRecord) -> bool:
    """Whether any entry of ``record`` is a ``flwr-ext`` payload."""
    return any(arr.stype.startswith(STYPE_PREFIX) for arr in record.values())


def decode_deltas(
    record: ArrayRecord,
    reference: dict[str, tuple[tuple[int, ...], str]],
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    allow_nonfinite: bool = False,
) -> dict[str, np.ndarray]:
    """Decode the ``flwr-ext`` payloads of ``record`` into deltas: the one decoder of the server.

    The asynchronous engine keeps these deltas as they are (a compressed reply never becomes a
    full model there); the synchronous :class:`Compressed` wrapper adds them to the arrays it
    sent, because Flower's strategies aggregate full weights. Entries that are not payloads are
    skipped (they are plain arrays).

    Parameters
    ----------
    record : ArrayRecord
        The reply's arrays.
    reference : dict
        ``{name: (shape, dtype)}`` of the model sent: every payload must name one of these
        tensors and match its shape; no tensor can be larger than the one that was sent.
    max_elements, allow_nonfinite
        As :func:`~flwr_ext.compression.codec.decode_tensor`.

    Raises
    ------
    CorruptPayloadError
        If any payload is invalid or does not match the reference.
    """
    out: dict[str, np.ndarray] = {}
    # the whole reply can never decode to more than the model that was sent
    left = sum(
        int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for s, d in reference.values()
    )
    for name, arr in record.items():
        if not arr.stype.startswith(STYPE_PREFIX):
            continue
        if name not in reference:
            raise CorruptPayloadError(f"payload for unknown tensor {name!r}")
        shape, _ = reference[name]
        if tuple(arr.shape) != tuple(shape):
            raise CorruptPayloadError(f"{name!r}: Array shape {arr.shape} != sent {shape}")
        delta = decode_tensor(
            arr.data,
            expected_shape=tuple(shape),
            expected_dtype=arr.dtype,
            max_elements=min(max_elements, max(1, int(np.prod(shape, dtype=np.int64)))),
            allow_nonfinite=allow_nonfinite,
            stype=arr.stype,
            max_bytes=left,
        )
        left -= delta.nbytes
        out[name] = delta
    return out


def decode_arrays(
    record: ArrayRecord,
    reference: ArrayRecord,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    allow_nonfinite: bool = False,
) -> ArrayRecord:
    """Decode one ArrayRecord of deltas into full arrays ``reference + delta``.

    Entries that are not ``flwr-ext`` payloads are returned as they are. Every payload must
    name a tensor of ``reference`` and match its shape (:func:`decode_deltas`).

    Raises
    ------
    CorruptPayloadError
        If any payload is invalid or does not match the reference.
    """
    refs: dict[str, np.ndarray] = {}
    for name, arr in record.items():
        if arr.stype.startswith(STYPE_PREFIX) and name in reference:
            try:
                refs[name] = reference[name].numpy()
            except (TypeError, ValueError) as exc:
                raise CorruptPayloadError(
                    f"reference {name!r} is not a numpy array: {exc}"
                ) from None
    deltas = decode_deltas(
        record,
        {k: (v.shape, str(v.dtype)) for k, v in refs.items()},
        max_elements=max_elements,
        allow_nonfinite=allow_nonfinite,
    )
    out: dict[str, Array] = {}
    for name, arr in record.items():
        if name in deltas:
            delta = deltas[name]
            delta += refs[name].astype(delta.dtype, copy=False)  # in place: no third tensor
            out[name] = Array(delta)
        else:
            out[name] = arr
    return ArrayRecord(out)


def decode_reply(
    content: RecordDict,
    reference: ArrayRecord,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    allow_nonfinite: bool = False,
) -> RecordDict:
    """Return a copy of a train reply's content with every compressed ArrayRecord decoded.

    Parameters
    ----------
    content : RecordDict
        ``reply.content`` as received (``{"arrays": ..., "metrics": ...}``).
    reference : ArrayRecord
        The arrays this node was sent for this job (the model version it trained on).
    max_elements : int
        Largest tensor the decoder may allocate (the reference shapes bound it anyway).
    allow_nonfinite : bool
        Accept NaN/inf in decoded updates (rejected by default).

    Returns
    -------
    RecordDict
        Same records, compressed ArrayRecords replaced by full arrays; uncompressed replies come
        back with the same records (so mixed fleets work).

    Raises
    ------
    CorruptPayloadError
        The reply must be dropped (log it with the node id).
    """
    new = RecordDict()
    for key, rec in content.items():
        if isinstance(rec, ArrayRecord) and is_compressed(rec):
            new[key] = decode_arrays(
                rec, reference, max_elements=max_elements, allow_nonfinite=allow_nonfinite
            )
        else:
            new[key] = rec
    return new


def sparse_names(content: RecordDict) -> set[str]:
    """Names of the tensors of ``content`` sent as sparse selections (top-k, random-k)."""
    out: set[str] = set()
    for rec in content.array_records.values():
        for name, arr in rec.items():
            if arr.stype.startswith(STYPE_PREFIX) and is_sparse_payload(arr.data):
                out.add(name)
    return out


def support_mean(
    deltas: list[dict[str, np.ndarray]],
    sparse: list[set[str]],
    weights: list[float],
) -> list[dict[str, np.ndarray]]:
    """Rescale sparse deltas so that a weighted mean averages each coordinate over its senders.

    A weighted mean over all ``N`` replies divides a coordinate that only some replies sent by
    the weight of *all* replies. With error feedback each client has already removed the sent
    value from its residual, so that shrinkage is lost for good: a top-1% update that no other
    client happened to select is applied at ``w_i / W`` of its size. Rescaling reply ``i`` at
    coordinate ``j`` by ``W / W_j`` (``W_j``: total weight of the replies whose selection holds
    ``j``; dense tensors count everywhere) makes the weighted mean of the rescaled deltas equal
    the weighted mean over the senders of ``j`` only. This is the sparse averaging of
    Sparse Ternary Compression's server (Sattler et al. 2019) and of gTop-k (Shi et al. 2019).

    Parameters
    ----------
    deltas : list[dict[str, np.ndarray]]
        Decoded deltas by tensor name, one dict per reply.
    sparse : list[set[str]]
        Per reply, the tensors sent as sparse selections (their support is ``delta != 0``).
    weights : list[float]
        Aggregation weights (e.g. ``num-examples``), non-negative.

    Returns
    -------
    list[dict[str, np.ndarray]]
        Rescaled deltas (same dtypes); tensors no reply sent sparsely are returned unchanged.
    """
    w = np.asarray(weights, dtype=np.float64)
    total = float(w.sum())
    out = [dict(d) for d in deltas]
    names = set().union(*sparse) if sparse else set()
    if total <= 0:
        return out
    for name in names:
        support_w = None
        masks = []
        for i, d in enumerate(deltas):
            m = (d[name] != 0) if name in sparse[i] else np.ones(d[name].shape, dtype=bool)
            masks.append(m)
            support_w = w[i] * m if support_w is None else support_w + w[i] * m
        scale = total / np.where(support_w > 0, support_w, total)
        for i, d in enumerate(deltas):
            if name in sparse[i]:
                out[i][name] = (d[name] * scale).astype(d[name].dtype)
    return out


class MissingDownlinkModError(CompressionError, RuntimeError):
    """Downlink compression is on but a node's ClientApp does not apply it (no client mod)."""

    def __init__(self, node: int) -> None:
        super().__init__(
            f"downlink compression is on (Compressed(..., downlink=...) / run-config key "
            f"'compression-down') but node {node} replied without the "
            f"{REPLY_RECORD!r} record: its ClientApp has no flwr-ext compression_mod, which "
            "must apply the compressed model increments before training. Add "
            "`mods=[compression_mod(...)]` to the ClientApp, or turn downlink compression off "
            "(compression-down='none')"
        )


def _weight_key(strategy: Strategy) -> str:
    found = find_in_chain(strategy, lambda s: hasattr(s, "weighted_by_key"))
    return "num-examples" if found is None else str(found.weighted_by_key)


def _has_dp(strategy: Strategy) -> bool:
    return (
        find_in_chain(strategy, lambda s: type(s).__name__.startswith("DifferentialPrivacy"))
        is not None
    )


class Compressed(Strategy):
    """Decode compressed train replies before the wrapped strategy sees them.

    Wrap the *outermost* strategy, e.g.
    ``Compressed(DifferentialPrivacyServerSideFixedClipping(FedAdam(...), ...))``: replies are
    decoded to full arrays first, so clipping, noise and aggregation run unmodified. The arrays
    sent to each node in ``configure_train`` are kept as the decoding reference for that node.
    A reply that does not decode is logged with its node id and dropped; the round goes on.

    Byte accounting (``ArrayRecord.count_bytes()`` on what is sent and received) is added to
    the train MetricRecord of every round: ``uplink-bytes`` (all replies received, dropped ones
    included), ``uplink-bytes-per-update`` and ``compression-ratio`` (over decoded replies:
    decoded bytes / received bytes), ``uplink-raw-bytes`` (decoded size), ``downlink-bytes``,
    the cumulative ``uplink-bytes-cumulative`` / ``downlink-bytes-cumulative``, and
    ``dropped-replies``.

    With ``sparse_mean=True`` the decoded sparse deltas of a round are rescaled by
    :func:`support_mean` before the wrapped strategy averages them, so each coordinate is
    averaged over the replies that sent it instead of over all replies. It is off by default:
    it acts as a per-coordinate server learning rate of up to ``N`` and, measured on the digits
    CNN (``bench/compression.md``), it turns FedZip's -34 points after 15 rounds into -1 point
    with weak local training (plain SGD, batch 32) but makes training diverge with strong local
    training (momentum 0.9, batch 16: 0.23 accuracy against 0.96 with the plain mean). It
    couples the replies of a round, so it is refused around a differential-privacy wrapper.

    Around one of our asynchronous strategies (``Compressed(FedBuff(...))``) ``start`` runs that
    strategy's engine, which decodes compressed replies with the same decoder.

    **Downlink** (``downlink="fedzip"``, any preset spec or PipelineConfig): EF21-P
    (Gruntkowska, Tyurin, Richtarik, ICML 2023; :mod:`flwr_ext.compression.downlink`). The
    wrapper keeps a shadow ``w_i`` of the model each node holds and sends ``C(x - w_i)``
    instead of the strategy's ``x``; both sides apply ``w_i <- w_i + C(x - w_i)``
    bit-identically and the node trains from ``w_i``. Its reply is rebuilt as ``x + (y_i -
    w_i)`` before the wrapped strategy sees it (EF21-P's step at ``x`` with the update computed
    at ``w_i``). The clients must run :func:`~flwr_ext.compression.compression_mod` (any uplink
    preset, ``"none"`` included): a reply without its downlink record raises
    :class:`MissingDownlinkModError`. Nodes seen for the first time, and nodes whose last reply
    did not confirm their shadow (lost reply, error reply: lost state, checksum mismatch), get
    the model densely; the train metrics count them (``downlink-new``, ``downlink-resynced``)
    next to ``downlink-compressed``. With ``downlink_initial="known"`` the nodes build the
    initial model themselves (``compression_mod(initial=...)``), so the first round is
    compressed too (checked by checksum; a node whose ``x_0`` differs asks for the dense
    model). ``configure_evaluate`` still sends the dense model. Around an asynchronous
    strategy the wrapper hands the setting to its engine (``start(downlink=...)``), which keeps
    one shadow per node, sends each job ``C(x_v - w_i)`` and counts the sends in its counters
    under the same names (docs/asyncfl.md, "Downlink compression"); ``downlink_initial`` must
    then be ``"dense"``.

    Parameters
    ----------
    strategy : Strategy or AsyncStrategy
        Any Flower message-API strategy (FedAvg, FedAdam, the DP wrappers, ...), or an
        asynchronous strategy of :mod:`flwr_ext.strategies`.
    csv_path : str or Path, optional
        If set, the per-transfer byte log is (re)written there after every round.
    max_elements : int
        Per-tensor allocation cap of the decoder.
    allow_nonfinite : bool
        Accept NaN/inf in updates (rejected, i.e. the reply dropped, by default).
    sparse_mean : bool
        Average sparse coordinates over their senders (:func:`support_mean`); not allowed
        around a Flower ``DifferentialPrivacy*`` wrapper.
    downlink : str, PipelineConfig or None
        Downlink compressor (a preset spec such as ``"fedzip"`` or ``"dgc:density=0.01"``;
        residual feedback, momentum and warm-up are ignored); ``None`` / ``"none"``: the
        strategy's messages are sent as they are.
    downlink_initial : str
        ``"dense"`` (default): a node's first message is the dense model; ``"known"``: nodes
        of the first round are assumed to hold the initial arrays (verified by checksum).
    downlink_seed : int
        Seed of the downlink compressor's stochastic stages (random-k, QSGD).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        csv_path: str | Path | None = None,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
        allow_nonfinite: bool = False,
        sparse_mean: bool = False,
        downlink: str | PipelineConfig | None = None,
        downlink_initial: str = "dense",
        downlink_seed: int = 0,
    ) -> None:
        if sparse_mean and _has_dp(strategy):
            raise ConfigError("sparse_mean rescales across clients: not allowed under DP")
        from flwr_ext.asyncfl.strategy import AsyncStrategy

        if sparse_mean and isinstance(strategy, AsyncStrategy):
            raise ConfigError("sparse_mean averages one round's replies: not for async strategies")
        if downlink_initial not in ("dense", "known"):
            raise ConfigError("downlink_initial must be 'dense' or 'known'")
        down = downlink_config(downlink)
        is_async = isinstance(strategy, AsyncStrategy)
        if down is not None and is_async and downlink_initial != "dense":
            raise ConfigError(
                "downlink_initial='known' is for Flower's synchronous strategies; the "
                "asynchronous engine sends each node's first model densely"
            )
        #: engine settings handed to an async strategy's ``start`` (its engine keeps the shadows)
        self.engine_options: dict[str, Any] = (
            {"downlink": down, "downlink_seed": int(downlink_seed)}
            if down is not None and is_async
            else {}
        )
        #: EF21-P shadows per node (``None``: downlink not compressed, or kept by the engine)
        self.downlink = (
            None if down is None or is_async else DownlinkState(down, seed=int(downlink_seed))
        )
        self.downlink_initial = downlink_initial
        self._shadow: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self._down_counts: dict[int, dict[Send, int]] = {}
        self.sparse_mean = bool(sparse_mean)
        self.strategy = strategy
        self.csv_path = None if csv_path is None else Path(csv_path)
        self.max_elements = max_elements
        self.allow_nonfinite = allow_nonfinite
        self.bytes = ByteCounter()
        self._sent: dict[tuple[int, int], ArrayRecord] = {}
        self._round_arrays: dict[int, ArrayRecord] = {}
        self._down_round: dict[int, int] = {}

    def __getattr__(self, name: str) -> Any:
        # forward e.g. `privacy_spent` of a DP wrapper; only called for missing attributes
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def summary(self) -> None:
        """Log the wrapper and the wrapped strategy."""
        log(INFO, "\t├── Compressed: decodes flwr-ext payloads before aggregation")
        if self.downlink is not None:
            log(INFO, "\t├── downlink: EF21-P shadows, C = %s", self.downlink.config)
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate, remembering the arrays sent to each node and counting downlink bytes."""
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._round_arrays[server_round] = arrays
        total = 0
        if self.downlink is not None:
            if self.downlink_initial == "known" and not self.downlink.nodes:
                self.downlink.initial = {k: v.numpy() for k, v in arrays.items()}
            counts = {s: 0 for s in Send}
            messages = [self._compress_down(server_round, msg, counts) for msg in messages]
            self._down_counts[server_round] = counts
            self.downlink.initial = None  # later newcomers get the dense model
        for msg in messages:
            announce(msg)
            node = msg.metadata.dst_node_id
            recs = list(msg.content.array_records.values())
            if (server_round, node) in self._shadow:
                pass  # _sent holds the strategy's x (set by _compress_down)
            elif len(recs) == 1:
                self._sent[(server_round, node)] = recs[0]
            nbytes = record_bytes(msg.content)
            total += nbytes
            self.bytes.add(server_round, node, "down", nbytes)
        self._down_round[server_round] = total
        return messages

    def _compress_down(self, server_round: int, msg: Message, counts: dict[Send, int]) -> Message:
        """Replace the strategy's ``x`` for one node by its EF21-P downlink message."""
        assert self.downlink is not None
        recs = list(msg.content.array_records.items())
        if len(recs) != 1:  # nothing this wrapper can pair with a shadow: sent as it is
            return msg
        key, x_rec = recs[0]
        try:
            x = {k: v.numpy() for k, v in x_rec.items()}
        except (TypeError, ValueError):
            return msg
        node = msg.metadata.dst_node_id
        down = server_send(self.downlink, node, x)
        counts[down.kind] += 1
        content = RecordDict()
        for name, rec in msg.content.items():
            if name == key:
                content[name] = down.record
            elif isinstance(rec, ConfigRecord):
                content[name] = ConfigRecord(dict(rec))  # per node: the keys differ
            else:
                content[name] = rec
        cfgs = list(content.config_records.values())
        if not cfgs:
            content["config"] = ConfigRecord()
            cfgs = [content["config"]]
        for k, v in down.config.items():
            cfgs[0][k] = v
        self._sent[(server_round, node)] = x_rec
        self._shadow[(server_round, node)] = down.shadow
        return Message(
            content=content,
            dst_node_id=node,
            message_type=msg.metadata.message_type,
            group_id=msg.metadata.group_id,
            ttl=msg.metadata.ttl,
        )

    def _receive_down(self, server_round: int, msg: Message) -> None:
        """Confirm the node's shadow and rebase its reply onto ``x`` (in place).

        Raises :class:`MissingDownlinkModError` for a reply without the mod's record and
        :class:`CorruptPayloadError` for a version that is not the one sent.
        """
        assert self.downlink is not None
        node = msg.metadata.src_node_id
        if REPLY_RECORD not in msg.content:
            raise MissingDownlinkModError(node)
        version = int(msg.content[REPLY_RECORD][KEY_VERSION])  # type: ignore[arg-type]
        del msg.content[REPLY_RECORD]
        if not server_confirm(self.downlink, node, version):
            raise CorruptPayloadError(f"node holds shadow version {version}, not the one sent")
        if is_compressed(next(iter(msg.content.array_records.values()), ArrayRecord())):
            return  # decoded against x below: x + delta
        shadow = self._shadow[(server_round, node)]
        x = self._sent[(server_round, node)]
        for key, rec in list(msg.content.array_records.items()):
            try:
                y = {k: v.numpy() for k, v in rec.items()}
            except (TypeError, ValueError):
                continue
            if set(y) != set(shadow) or any(y[k].shape != shadow[k].shape for k in y):
                raise CorruptPayloadError("reply arrays differ from the model sent")
            msg.content[key] = ArrayRecord(
                {
                    k: Array(x[k].numpy() + (y[k] - shadow[k].astype(y[k].dtype)))
                    if y[k].dtype.kind == "f"
                    else rec[k]
                    for k in y
                }
            )

    def decode(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Decode replies in place; returns the replies to aggregate (corrupt ones dropped)."""
        kept: list[Message] = []
        decoded: list[tuple[Message, ArrayRecord, set[str]]] = []
        for msg in replies:
            down = (server_round, msg.metadata.src_node_id) in self._shadow
            if msg.has_error():
                if down:  # e.g. the node could not apply the increment: dense next time
                    server_unconfirm(self.downlink, msg.metadata.src_node_id)  # type: ignore[arg-type]
                kept.append(msg)
                continue
            node = msg.metadata.src_node_id
            ref = self._sent.get((server_round, node), self._round_arrays.get(server_round))
            nbytes = record_bytes(msg.content)
            try:
                if down:
                    self._receive_down(server_round, msg)
                if ref is None:
                    raise CorruptPayloadError("no record of the arrays sent to this node")
                sparse = sparse_names(msg.content)
                msg.content = decode_reply(
                    msg.content,
                    ref,
                    max_elements=self.max_elements,
                    allow_nonfinite=self.allow_nonfinite,
                )
            except CorruptPayloadError as exc:
                log(
                    WARNING,
                    "Compressed: dropping reply of node %s (round %s): %s",
                    node,
                    server_round,
                    exc,
                )
                self.bytes.add(server_round, node, "up", nbytes, 0, status="dropped")
                continue
            self.bytes.add(server_round, node, "up", nbytes, record_bytes(msg.content))
            kept.append(msg)
            decoded.append((msg, ref, sparse))
        if self.sparse_mean and any(sp for *_, sp in decoded):
            self._rescale(decoded)
        return kept

    def _rescale(self, decoded: list[tuple[Message, ArrayRecord, set[str]]]) -> None:
        """Apply :func:`support_mean` to the decoded replies of one round, in place."""
        key = _weight_key(self.strategy)
        weights, deltas, targets = [], [], []
        names = set().union(*(sp for *_, sp in decoded))
        for msg, ref, _ in decoded:
            recs = list(msg.content.array_records.items())
            metrics = next(iter(msg.content.metric_records.values()), MetricRecord())
            val = metrics.get(key, 1.0)
            weights.append(float(val) if isinstance(val, int | float) and val >= 0 else 0.0)
            if len(recs) != 1:
                deltas.append({})
                targets.append(None)
                continue
            rkey, rec = recs[0]
            delta = {}
            for name in names:
                if name in rec and name in ref:
                    full = rec[name].numpy()
                    delta[name] = full - ref[name].numpy().astype(full.dtype)
            deltas.append(delta)
            targets.append((rkey, rec, ref))
        if any(t is None for t in targets) or any(set(d) != set(deltas[0]) for d in deltas):
            log(WARNING, "Compressed: replies differ in structure; sparse_mean skipped")
            return
        scaled = support_mean(deltas, [sp for *_, sp in decoded], weights)
        for (msg, _, _), target, new in zip(decoded, targets, scaled, strict=True):
            rkey, rec, ref = target
            arrays = {k: v for k, v in rec.items()}
            for name, d in new.items():
                arrays[name] = Array(np.asarray(ref[name].numpy().astype(d.dtype) + d))
            msg.content[rkey] = ArrayRecord(arrays)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode, delegate, and add byte-accounting metrics."""
        before = (self.bytes.uplink_total, self.bytes.uplink_raw_total, self.bytes.dropped)
        n_events = len(self.bytes.events)
        kept = self.decode(server_round, list(replies))
        ok = [e for e in self.bytes.events[n_events:] if e.direction == "up" and e.status == "ok"]
        arrays, metrics = self.strategy.aggregate_train(server_round, kept)
        up = self.bytes.uplink_total - before[0]
        raw = self.bytes.uplink_raw_total - before[1]
        up_ok = sum(e.bytes for e in ok)
        extra = {
            "uplink-bytes": up,
            "uplink-bytes-per-update": up_ok / len(ok) if ok else 0.0,
            "uplink-raw-bytes": raw,
            "compression-ratio": raw / up_ok if up_ok and raw else 0.0,
            "uplink-bytes-cumulative": self.bytes.uplink_total,
            "downlink-bytes": self._down_round.pop(server_round, 0),
            "downlink-bytes-cumulative": self.bytes.downlink_total,
            "dropped-replies": self.bytes.dropped - before[2],
        }
        counts = self._down_counts.pop(server_round, None)
        if counts is not None:
            sent = sum(counts.values())
            extra["downlink-bytes-per-node"] = extra["downlink-bytes"] / sent if sent else 0.0
            extra["downlink-compressed"] = counts[Send.COMPRESSED] + counts[Send.INITIAL]
            extra["downlink-new"] = counts[Send.NEW]
            extra["downlink-resynced"] = counts[Send.UNCONFIRMED]
        metrics = MetricRecord() if metrics is None else metrics
        for k, v in extra.items():
            metrics[k] = v
        for key in [k for k in self._sent if k[0] == server_round]:
            del self._sent[key]
        for key in [k for k in self._shadow if k[0] == server_round]:
            del self._shadow[key]
        self._round_arrays.pop(server_round, None)
        if self.csv_path is not None:
            self.bytes.to_csv(self.csv_path)
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegate."""
        return self.strategy.aggregate_evaluate(server_round, replies)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        **options: Any,
    ) -> Result:
        """Flower's synchronous loop with this wrapper's hooks (see ``Strategy.start``).

        Around an asynchronous strategy (FedAsync, FedBuff, FedCompass, ...) this hands the run
        to that strategy's own engine, which decodes compressed replies itself with the same
        decoder (into deltas, never rebuilt into full models unless the rule needs weights) and
        counts every byte per update; ``options`` are its engine settings.
        """
        from flwr_ext.asyncfl.strategy import AsyncStrategy

        if isinstance(self.strategy, AsyncStrategy):
            return self.strategy.start(
                grid,
                initial_arrays,
                num_rounds,
                timeout,
                train_config,
                evaluate_config,
                evaluate_fn,
                **{**self.engine_options, **options},
            )
        if options:
            raise TypeError(
                f"Compressed around {type(self.strategy).__name__} takes Flower's Strategy.start "
                f"arguments only, not {sorted(options)}"
            )
        return super().start(
            grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn
        )

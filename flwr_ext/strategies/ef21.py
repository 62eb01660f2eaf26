"""EF21: FedAvg's sampling and metrics, EF21's compressed estimates for the model step."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from flwr_ext.arrays import numpy_to_record
from flwr_ext.compression.accounting import record_bytes
from flwr_ext.compression.codec import PipelineConfig, encode_update
from flwr_ext.compression.ef21 import (
    BC_G_RECORD,
    KEY_ACCEPTED,
    KEY_BASE,
    KEY_BC_FROM,
    KEY_BC_LR,
    KEY_BC_VERSION,
    REPLY_RECORD,
    EF21ServerState,
    Receipt,
    bc_step,
    check_compressor,
)
from flwr_ext.compression.errors import CorruptPayloadError
from flwr_ext.compression.server import decode_deltas, is_compressed


class EF21(FedAvg):
    """EF21 error feedback (uplink) on top of Flower's FedAvg.

    Implementation based on Richtarik, Sokolov, Fatkhullin, "EF21: A New, Simpler,
    Theoretically Better, and Practically Faster Error Feedback", NeurIPS 2021,
    https://arxiv.org/abs/2106.05203, Algorithm 1, with EF21-PP's partial participation
    (Fatkhullin et al., "EF21 with Bells & Whistles", 2021, Alg. EF21-PP). Clients run
    :func:`flwr_ext.compression.ef21.ef21_mod` and send ``c_i = C(delta_i - g_i)``; the server
    keeps a mirror of every ``g_i`` (:class:`~flwr_ext.compression.ef21.EF21ServerState`) and::

        g_i  <- g_i + c_i                 for every reply              (Alg. 1, line 6)
        g     = (1/n) sum_i g_i           n: nodes in the federation    (line 8)
        x    <- x + server_lr * g                                       (line 3)

    Non-sampled clients keep their ``g_i`` in the mean (EF21-PP); with ``server_lr = 1``,
    the identity compressor and full participation this is FedAvg with uniform weights.
    Sampling, reply checks and metric aggregation are FedAvg's; the arrays are not averaged
    (weights ``weighted_by_key`` only weight the metrics: EF21's mean is uniform over nodes).
    This is not the residual error feedback of ``Compressed`` + ``compression_mod`` (see
    :mod:`flwr_ext.compression.ef21`); do not wrap it in ``Compressed``.

    Parameters
    ----------
    server_lr : float (default: 1.0)
        ``eta``, the server step on ``g``.
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes,
    min_available_nodes, weighted_by_key, arrayrecord_key, configrecord_key,
    train_metrics_aggr_fn, evaluate_metrics_aggr_fn
        As :class:`flwr.serverapp.strategy.FedAvg`.

    Notes
    -----
    Added to each round's train MetricRecord: ``ef21-accepted``, ``ef21-resynced`` (a node
    restarted from ``g_i = 0``), ``ef21-rejected`` (wrong base or a payload that does not
    decode), ``uplink-bytes``, ``uplink-bytes-per-update`` and ``ef21-g-norm``.
    """

    def __init__(
        self,
        server_lr: float = 1.0,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        if not np.isfinite(server_lr) or server_lr <= 0:
            raise ValueError("server_lr must be a positive finite number")
        self.server_lr = float(server_lr)
        self.state = EF21ServerState()
        self.nodes: set[int] = set()
        self._arrays: dict[int, ArrayRecord] = {}

    def summary(self) -> None:
        """Log the configuration."""
        log(INFO, "\t├──> EF21: server lr %s, g = mean of every node's g_i", self.server_lr)
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's messages, each with this node's ``ef21-accepted`` count in its config."""
        self.nodes.update(int(n) for n in grid.get_node_ids())
        self._arrays[server_round] = arrays
        out = []
        for msg in super().configure_train(server_round, arrays, config, grid):
            node = msg.metadata.dst_node_id
            cfg = ConfigRecord(dict(msg.content[self.configrecord_key]))
            cfg[KEY_ACCEPTED] = self.state.accepted.get(node, 0)
            content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: cfg})
            out.append(
                Message(content=content, message_type=msg.metadata.message_type, dst_node_id=node)
            )
        return out

    def _collect(
        self, server_round: int, valid: list[Message], x: dict[str, np.ndarray]
    ) -> tuple[list[RecordDict], dict[Receipt, int], list[int]]:
        """Apply each valid reply's correction to its node's mirror (Alg. 1, line 6)."""
        used, counts, up, _ = collect_receipts(self, self.state, server_round, valid, x)
        return used, counts, up

    def _metrics(
        self, used: list[RecordDict], counts: dict[Receipt, int], up: list[int], g: dict
    ) -> MetricRecord:
        metrics = receipt_metrics(self, "ef21", used, counts, up)
        metrics["ef21-g-norm"] = l2_norm(g)
        return metrics

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Apply every reply's correction to its mirror, then step with ``g``."""
        arrays = self._arrays.pop(server_round, None)
        valid, _ = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        if arrays is None or not valid:
            return None, None
        x = {k: v.numpy() for k, v in arrays.items()}
        used, counts, up = self._collect(server_round, valid, x)
        g = self.state.mean(len(self.nodes), x)
        new, _ = bc_step(x, {}, g, self.server_lr)
        return _record(new), self._metrics(used, counts, up, g)


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return numpy_to_record(arrays)


def collect_receipts(
    strategy: FedAvg,
    state: EF21ServerState,
    server_round: int,
    valid: list[Message],
    x: dict[str, np.ndarray],
    *,
    name: str = "EF21",
    what: str = "an EF21 correction",
    base_key: tuple[str, str] = (REPLY_RECORD, KEY_BASE),
    mirror: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
) -> tuple[list[RecordDict], dict[Receipt, int], list[int], list[dict[str, np.ndarray]]]:
    """Decode every valid reply and add it (``mirror(decoded)``) to its node's mirror.

    Shared by :class:`EF21` (the correction ``c_i``) and
    :class:`~flwr_ext.strategies.SCAFCOM` (``alpha delta_i``). A reply that is not compressed,
    does not decode, misses a tensor or has a wrong base is logged and counted as rejected.
    ``base_key``: the reply's ConfigRecord and key holding the count its state was built on.
    Returns the applied replies' contents, the receipts counted, every reply's bytes and the
    applied replies' decoded arrays, in the order of ``valid``.
    """
    reference = {k: (v.shape, str(v.dtype)) for k, v in x.items()}
    counts = {r: 0 for r in Receipt}
    used, up, applied = [], [], []
    for msg in valid:
        node = msg.metadata.src_node_id
        receipt = Receipt.REJECTED
        try:
            base = int(msg.content[base_key[0]][base_key[1]])  # type: ignore[arg-type]
            record = msg.content[strategy.arrayrecord_key]
            if not is_compressed(record):
                raise CorruptPayloadError(f"reply is not {what}")
            decoded = decode_deltas(record, reference)
            if set(decoded) != set(x):
                raise CorruptPayloadError(f"{what} does not cover every tensor")
            receipt = state.receive(node, base, decoded if mirror is None else mirror(decoded))
        except (KeyError, TypeError, ValueError) as exc:  # CorruptPayloadError included
            log(
                WARNING,
                "%s: reply of node %s rejected (round %s): %s",
                name,
                node,
                server_round,
                exc,
            )
        counts[receipt] += 1
        up.append(record_bytes(msg.content))
        if receipt != Receipt.REJECTED:
            used.append(msg.content)
            applied.append(decoded)
    return used, counts, up, applied


def receipt_metrics(
    strategy: FedAvg,
    prefix: str,
    used: list[RecordDict],
    counts: dict[Receipt, int],
    up: list[int],
) -> MetricRecord:
    """FedAvg's train metrics of the applied replies, the receipts and the uplink bytes."""
    metrics = strategy.train_metrics_aggr_fn(used, strategy.weighted_by_key) if used else None
    metrics = MetricRecord() if metrics is None else metrics
    metrics[f"{prefix}-accepted"] = counts[Receipt.ACCEPTED]
    metrics[f"{prefix}-resynced"] = counts[Receipt.RESYNCED]
    metrics[f"{prefix}-rejected"] = counts[Receipt.REJECTED]
    metrics["uplink-bytes"] = int(sum(up))
    metrics["uplink-bytes-per-update"] = float(np.mean(up)) if up else 0.0
    return metrics


def l2_norm(arrays: dict[str, np.ndarray]) -> float:
    """The L2 norm of all ``arrays`` together, summed in float64."""
    return float(
        np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in arrays.values()))
    )


class EF21BC(EF21):
    """EF21-BC: EF21 with a compressed downlink; the nodes hold the model themselves.

    Implementation based on Fatkhullin, Sokolov, Gorbunov, Li, Richtarik, "EF21 with Bells &
    Whistles: Practical Algorithmic Extensions of Modern Error Feedback", 2021,
    https://arxiv.org/abs/2110.03294, Algorithm EF21-BC (bidirectional compression), as in the
    authors' ``ef21_bc.py``. The uplink is :class:`EF21`'s; the server keeps its own estimator
    ``g`` and sends only its compressed change::

        w  = (1/n) sum_i g_i                         (EF21 mean of the mirrors)
        b  = C_M(w - g),   g <- g + b                 (server; b is broadcast)
        x <- x + server_lr * g                        (server and every node)

    A node that holds the previous version gets ``b`` (``ef21-bc-from`` = that version) and
    rebuilds ``x`` in :func:`~flwr_ext.compression.ef21.ef21_mod`; any other node (first round,
    not sampled last round, lost state, an error reply) gets ``x`` and ``g`` densely. With
    ``C_M`` the identity this is :class:`EF21` (``g = w``).

    Parameters
    ----------
    downlink_density : float (default: 0.01)
        Top-k density of ``C_M`` (exact values); ignored when ``downlink`` is given.
    downlink : PipelineConfig or None
        Any other downlink compressor without residual feedback.
    server_lr and the rest
        As :class:`EF21`.

    Notes
    -----
    Adds ``downlink-bytes`` (train messages of the round, ``count_bytes()``),
    ``downlink-bytes-per-node`` and ``ef21-bc-dense`` (nodes sent the dense state) to the
    train metrics. A dense state is the model plus ``g``: twice a plain FedAvg message.
    """

    def __init__(
        self,
        downlink_density: float = 0.01,
        downlink: PipelineConfig | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.downlink = check_compressor(
            downlink
            if downlink is not None
            else PipelineConfig(name="ef21-bc", sparsify="topk", density=downlink_density)
        )
        self.version = 0
        self.x: dict[str, np.ndarray] | None = None
        self.g: dict[str, np.ndarray] = {}
        self._b: ArrayRecord | None = None  # the b that moved version - 1 to version
        self.node_version: dict[int, int] = {}
        self._down: dict[int, tuple[int, int]] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send ``b`` to nodes at the previous version, the dense ``(x, g)`` to the others."""
        if self.x is None:
            self.x = {k: v.numpy() for k, v in arrays.items()}
        out, dense, total = [], 0, 0
        for msg in super().configure_train(server_round, arrays, config, grid):
            node = msg.metadata.dst_node_id
            cfg = msg.content[self.configrecord_key]
            cfg[KEY_BC_VERSION] = self.version
            cfg[KEY_BC_LR] = self.server_lr
            if self._b is not None and self.node_version.get(node) == self.version - 1:
                cfg[KEY_BC_FROM] = self.version - 1
                content = RecordDict({self.arrayrecord_key: self._b, self.configrecord_key: cfg})
            else:
                cfg[KEY_BC_FROM] = -1
                g = self.g or {k: np.zeros_like(v) for k, v in self.x.items()}
                content = RecordDict(
                    {
                        self.arrayrecord_key: _record(self.x),
                        BC_G_RECORD: _record(g),
                        self.configrecord_key: cfg,
                    }
                )
                dense += 1
            total += record_bytes(content)
            out.append(
                Message(content=content, message_type=msg.metadata.message_type, dst_node_id=node)
            )
        self._down[server_round] = (total, dense)
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """EF21's uplink, then ``b = C_M(w - g)``, ``g <- g + b``, ``x <- x + eta g``."""
        self._arrays.pop(server_round, None)
        down, dense = self._down.pop(server_round, (0, 0))
        valid, errors = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        for msg in errors:  # e.g. a node that could not apply b: dense state next time
            self.node_version.pop(msg.metadata.src_node_id, None)
        if self.x is None or not valid:
            return None, None
        used, counts, up = self._collect(server_round, valid, self.x)
        for msg in valid:  # the version each replying node now holds
            if REPLY_RECORD in msg.content and KEY_BC_VERSION in msg.content[REPLY_RECORD]:
                ver = int(msg.content[REPLY_RECORD][KEY_BC_VERSION])  # type: ignore[arg-type]
                self.node_version[msg.metadata.src_node_id] = ver
        w = self.state.mean(len(self.nodes), self.x)
        g = self.g or {k: np.zeros_like(v) for k, v in self.x.items()}
        diff = {k: w[k] - g[k] for k in w}
        payloads, b = encode_update(diff, self.downlink, seed=self.version)
        self._b = ArrayRecord(
            {
                k: Array(
                    dtype=str(diff[k].dtype),
                    shape=tuple(int(d) for d in diff[k].shape),
                    stype=self.downlink.stype,
                    data=payloads[k],
                )
                for k in diff
            }
        )
        self.x, self.g = bc_step(self.x, g, b, self.server_lr)
        self.version += 1
        metrics = self._metrics(used, counts, up, self.g)
        n_msgs = max(1, len(valid) + len(errors))
        metrics["downlink-bytes"] = int(down)
        metrics["downlink-bytes-per-node"] = down / n_msgs
        metrics["ef21-bc-dense"] = int(dense)
        return _record(self.x), metrics

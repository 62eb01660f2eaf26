"""SCAFCOM and SCALLION: FedAvg's sampling and metrics, SCAFFOLD's control variates, one
compressed uplink vector per client."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from flwr_ext.arrays import numpy_to_record
from flwr_ext.compression.accounting import record_bytes
from flwr_ext.compression.ef21 import EF21ServerState, Receipt
from flwr_ext.compression.scafcom import (
    C_RECORD,
    KEY_ACCEPTED,
    KEY_ALPHA,
    KEY_BASE,
    KEY_BETA,
    KEY_LOCAL_LR,
    KEY_LOCAL_STEPS,
    REPLY_RECORD,
    mean_of,
    scaled,
    server_step,
)
from flwr_ext.strategies.ef21 import collect_receipts, l2_norm, receipt_metrics


class SCAFCOM(FedAvg):
    """SCAFCOM: SCAFFOLD with a biased-compressed uplink and local momentum, on FedAvg.

    Implementation based on Huang, Li, Li, "Stochastic Controlled Averaging for Federated
    Learning with Communication Compression", ICLR 2024, https://arxiv.org/abs/2308.08165
    (algorithm SCAFCOM; see :mod:`flwr_ext.compression.scafcom` for the client lines and for
    which of them could be checked against the paper's text). Clients run
    :func:`~flwr_ext.compression.scafcom.scafcom_mod` and send one vector ``delta_i = C(v_i -
    c_i)``; the server keeps a mirror of every control variate ``c_i`` (EF21's
    :class:`~flwr_ext.compression.ef21.EF21ServerState`) and, each round ``r``::

        c^r  = (1/N) sum_i c_i                   sent with x^r (dense, as in SCAFFOLD)
        c_i <- c_i + alpha delta_i               for every applied reply
        x^{r+1} = x^r - server_lr K local_lr (c^r + (1/|S|) sum_{i in S} delta_i)

    ``N`` is the number of nodes in the federation and ``S`` the replies applied this round.
    With ``beta = 1``, ``alpha = 1`` and the identity compressor this is SCAFFOLD
    (Karimireddy et al. 2020) with global step ``server_lr``, sending one vector instead of two.
    The local steps must add ``c - c_i`` to each gradient: the mod hands the ClientApp that
    difference as the ArrayRecord ``"scafcom-correction"``; a ClientApp that ignores it still
    runs, but without SCAFFOLD's drift correction. Sampling, reply checks and metric
    aggregation are FedAvg's; the mean over ``S`` is uniform (``weighted_by_key`` only weights
    the metrics). Do not wrap it in ``Compressed``.

    Parameters
    ----------
    beta : float (default: 0.2)
        Momentum weight ``beta`` in ``v_i <- (1 - beta) v_i + beta g_i``, in ``(0, 1]``
        (1: no momentum). Not tuned for any task here.
    local_lr : float (default: 0.1)
        ``eta_l``, the step of the clients' local SGD (sent as ``scafcom-local-lr``); the
        ClientApp should train with it.
    local_steps : int (default: 10)
        ``K``, the local steps per round (sent as ``scafcom-local-steps``). A client that runs
        another number reports it as the reply metric ``scafcom-local-steps``; its ``g_i`` then
        uses its own count, and the server step keeps ``K``.
    server_lr : float (default: 1.0)
        ``eta_g``; the model moves by ``server_lr * K * local_lr`` times the estimate.
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes,
    min_available_nodes, weighted_by_key, arrayrecord_key, configrecord_key,
    train_metrics_aggr_fn, evaluate_metrics_aggr_fn
        As :class:`flwr.serverapp.strategy.FedAvg`.

    Notes
    -----
    Added to each round's train MetricRecord: ``scafcom-accepted``, ``scafcom-resynced`` (a node
    restarted from ``c_i = 0``), ``scafcom-rejected`` (wrong base or a payload that does not
    decode), ``uplink-bytes``, ``uplink-bytes-per-update``, ``downlink-bytes-per-node`` (model
    and ``c``: twice FedAvg's message) and ``scafcom-c-norm``.
    """

    alpha: float = 1.0

    def __init__(
        self,
        beta: float = 0.2,
        local_lr: float = 0.1,
        local_steps: int = 10,
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
        if not np.isfinite(beta) or not 0.0 < beta <= 1.0:
            raise ValueError("beta must be in (0, 1]")
        for name, value in (("local_lr", local_lr), ("server_lr", server_lr)):
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive finite number")
        if int(local_steps) != local_steps or local_steps < 1:
            raise ValueError("local_steps must be a positive integer")
        self.beta = float(beta)
        self.local_lr = float(local_lr)
        self.local_steps = int(local_steps)
        self.server_lr = float(server_lr)
        self.state = EF21ServerState()
        self.nodes: set[int] = set()
        self._sent: dict[int, tuple[ArrayRecord, dict[str, np.ndarray], int]] = {}

    def summary(self) -> None:
        """Log the configuration."""
        log(
            INFO,
            "\t├──> %s: alpha %s, beta %s, K %s, local lr %s, server lr %s",
            type(self).__name__,
            self.alpha,
            self.beta,
            self.local_steps,
            self.local_lr,
            self.server_lr,
        )
        super().summary()

    def control_variate(self, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``c = (1/N) sum_i c_i`` over the nodes seen so far (float tensors of ``like``)."""
        floats = {k: v for k, v in like.items() if np.asarray(v).dtype.kind == "f"}
        return self.state.mean(len(self.nodes), floats)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's messages plus ``c^r`` and the SCAFCOM keys in each config."""
        self.nodes.update(int(n) for n in grid.get_node_ids())
        x = {k: v.numpy() for k, v in arrays.items()}
        c = self.control_variate(x)
        c_rec = numpy_to_record(c)
        out, down = [], 0
        for msg in super().configure_train(server_round, arrays, config, grid):
            node = msg.metadata.dst_node_id
            cfg = ConfigRecord(dict(msg.content[self.configrecord_key]))
            cfg[KEY_ACCEPTED] = self.state.accepted.get(node, 0)
            cfg[KEY_ALPHA] = self.alpha
            cfg[KEY_BETA] = self.beta
            cfg[KEY_LOCAL_LR] = self.local_lr
            cfg[KEY_LOCAL_STEPS] = self.local_steps
            content = RecordDict(
                {self.arrayrecord_key: arrays, C_RECORD: c_rec, self.configrecord_key: cfg}
            )
            down += record_bytes(content)
            out.append(
                Message(content=content, message_type=msg.metadata.message_type, dst_node_id=node)
            )
        self._sent[server_round] = (arrays, c, down // max(len(out), 1))
        return out

    def _collect(
        self, server_round: int, valid: list[Message], x: dict[str, np.ndarray]
    ) -> tuple[list[RecordDict], dict[Receipt, int], list[int], list[dict[str, np.ndarray]]]:
        """Decode each reply's ``delta_i``, add ``alpha delta_i`` to its node's mirror."""

        def mirror(delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return scaled({k: v for k, v in delta.items() if v.dtype.kind == "f"}, self.alpha)

        return collect_receipts(
            self,
            self.state,
            server_round,
            sorted(valid, key=lambda m: m.metadata.src_node_id),
            x,
            name=type(self).__name__,
            what=f"a {type(self).__name__} vector",
            base_key=(REPLY_RECORD, KEY_BASE),
            mirror=mirror,
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Update the mirrors, then ``x <- x - eta_g K eta_l (c^r + mean delta_i)``."""
        sent = self._sent.pop(server_round, None)
        valid, _ = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        if sent is None or not valid:
            return None, None
        arrays, c, down = sent
        x = {k: v.numpy() for k, v in arrays.items()}
        used, counts, up, deltas = self._collect(server_round, valid, x)
        if not deltas:
            return None, None
        step = self.server_lr * self.local_steps * self.local_lr
        new = server_step(x, c, mean_of(deltas, x), step)
        metrics = receipt_metrics(self, "scafcom", used, counts, up)
        metrics["downlink-bytes-per-node"] = float(down)
        metrics["scafcom-c-norm"] = l2_norm(self.control_variate(x))
        return numpy_to_record(new), metrics


class SCALLION(SCAFCOM):
    """SCALLION: SCAFFOLD with an unbiased-compressed uplink (no momentum), on FedAvg.

    Implementation based on Huang, Li, Li, ICLR 2024, https://arxiv.org/abs/2308.08165
    (algorithm SCALLION). As :class:`SCAFCOM` with ``beta = 1`` and a control-variate step
    ``alpha``: clients send ``delta_i = C(g_i - c_i)`` with an unbiased ``C`` (run
    ``scafcom_mod(unbiased=True)``: random-k scaled by ``d/k``) and both sides move ``c_i <-
    c_i + alpha delta_i`` (DIANA's shift update; the analysis takes ``alpha`` of order
    ``1/(1 + omega)``). The model step ``c^r + mean delta_i`` is not scaled by ``alpha``:
    with full participation it is ``mean(c_i + delta_i)``, an unbiased estimate of the mean
    gradient.

    Parameters
    ----------
    alpha : float (default: 0.1)
        The control-variate step, in ``(0, 1]``. Not tuned for any task here.
    local_lr, local_steps, server_lr and the rest
        As :class:`SCAFCOM` (``beta`` is fixed at 1).
    """

    def __init__(self, alpha: float = 0.1, **kwargs: Any) -> None:
        if "beta" in kwargs:
            raise TypeError("SCALLION has no momentum (beta = 1); use SCAFCOM for beta < 1")
        super().__init__(beta=1.0, **kwargs)
        if not np.isfinite(alpha) or not 0.0 < alpha <= 1.0:
            raise ValueError("alpha must be in (0, 1]")
        self.alpha = float(alpha)

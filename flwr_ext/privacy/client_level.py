"""Client-level DP at the server: clip each client's update, add Gaussian noise, account rounds.

Built on Flower's :class:`~flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping`
(same constructor), with the sensitivity argument of McMahan et al. 2018 made explicit:

* every valid update ``delta_i`` (new arrays minus the arrays sent) is clipped to L2 norm C;
* weights are uniform and the sum is divided by the **configured** ``num_sampled_clients`` W, not
  by the number m of replies that arrived (their fixed-denominator estimator): the released
  update is ``sum_i clip(delta_i) / W + N(0, (sigma * C / W)^2)``. Adding or removing one client
  changes the sum by at most C, so this is the Gaussian mechanism with multiplier sigma whatever m
  is, and the noise std does not depend on m (which is exactly what differs between neighbouring
  datasets; a noise scale of ``sigma * C / m`` would leak m). When fewer than W clients reply
  (failures, errors) the update shrinks by m / W and the noise stays the same; more than W replies
  are refused (the configured count is then wrong);
* an RDP accountant over rounds (Mironov 2017, via Opacus' analysis), reported as
  ``dp-client-epsilon`` next to the clients' record-level ``dp-epsilon`` and, in Flower's own type,
  by :meth:`ClientLevelDP.privacy_spent` (:class:`flwr.serverapp.PrivacySpent`).

The two numbers are different guarantees: ``dp-client-epsilon`` protects a whole client's data
(add/remove one client) in the released global models; ``dp-epsilon`` protects one training record
of one client (add/remove one example) in everything that client sent.

References
----------
McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018.
Mironov, "Renyi Differential Privacy", CSF 2017.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import PrivacySpent
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

from .accounting import History, compute_epsilon

CLIENT_GUARANTEE = (
    "client-level (user-level) (epsilon, delta)-DP of the sequence of global models, "
    "add/remove-one-client adjacency, RDP accountant composed over aggregation rounds"
)


class ClientLevelDP(DifferentialPrivacyServerSideFixedClipping):
    """Server-side fixed clipping and Gaussian noise with an RDP accountant over rounds.

    Parameters
    ----------
    strategy : FedAvg
        Inner strategy; its ``aggregate_train`` averages the clipped updates (its metrics are
        kept). Weights are forced uniform (each reply's ``weighted_by_key`` metric is set to 1).
    noise_multiplier : float
        sigma; the released update has noise of std ``sigma * C / num_sampled_clients``.
    clipping_norm : float
        C, the L2 bound on each client's update (new arrays minus the arrays sent).
    num_sampled_clients : int
        W, the clients sampled per round: the fixed denominator of the update and the noise,
        whatever number of replies arrives (configure the sampler to draw exactly W).
    delta : float
        Delta at which ``dp-client-epsilon`` is reported.
    sample_rate : float
        Client sampling probability used by the accountant. The default 1.0 claims no
        amplification by sampling, which is the only sound choice unless clients are sampled by
        independent coin flips (Poisson): Flower's samplers draw a fixed-size sample.
    seed : int or None
        INSECURE, tests only: seeds the noise generator, so anyone who knows it can subtract the
        noise (a warning is logged). ``None`` (default) draws the noise from OS entropy.
    """

    def __init__(
        self,
        strategy: FedAvg,
        noise_multiplier: float,
        clipping_norm: float,
        num_sampled_clients: int,
        *,
        delta: float = 1e-5,
        sample_rate: float = 1.0,
        seed: int | None = None,
    ) -> None:
        if not isinstance(strategy, FedAvg) or (
            type(strategy).aggregate_train is not FedAvg.aggregate_train
        ):
            # a server optimiser (FedAdam) or a stacking rule (FLoRA) between the clipped sum
            # and the noise breaks the sensitivity argument (as in Flower's own accounting)
            raise TypeError(
                "ClientLevelDP needs an inner strategy that aggregates with "
                f"FedAvg.aggregate_train (the mean), got {type(strategy).__name__}"
            )
        if noise_multiplier <= 0:
            raise ValueError("noise_multiplier must be positive for a finite epsilon")
        if not 0 < sample_rate <= 1:
            raise ValueError("sample_rate must be in (0, 1]")
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients)
        self.delta = delta
        self.sample_rate = sample_rate
        self.history: History = []
        if seed is not None:
            log(WARNING, "ClientLevelDP: seeded noise (INSECURE, tests only): no privacy claim")
        self._rng = np.random.default_rng(seed)  # None: OS entropy

    def __repr__(self) -> str:
        return "ClientLevelDP(server-side fixed clipping + Gaussian noise, RDP accountant)"

    @property
    def epsilon(self) -> float:
        """Client-level epsilon at ``delta`` of all rounds released so far."""
        return compute_epsilon(self.history, self.delta, "rdp")

    def privacy_spent(self, delta: float | None = None) -> PrivacySpent:
        """The client-level privacy spent so far, in Flower's own type (RDP, Opacus analysis).

        Flower's ``RdpAccountant`` (``dp-accounting``) gives the same epsilon to within the
        difference of their RDP order grids (tests/privacy/test_client_level_dp.py).
        """
        delta = self.delta if delta is None else delta
        return PrivacySpent(
            epsilon=compute_epsilon(self.history, delta, "rdp"),
            delta=delta,
            num_releases=sum(n for _, _, n in self.history),
            accounting_method="rdp",
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip each valid update, sum, divide by W, add noise, compose one RDP event."""
        valid = [r for r in replies if not r.has_error()]
        if not valid:
            return None, None
        m, w = len(valid), self.num_sampled_clients
        if m > w:
            raise ValueError(
                f"{m} replies but num_sampled_clients={w}: the fixed denominator must be the "
                "number of clients sampled per round"
            )
        current = self.current_arrays.to_numpy_ndarrays()
        weight_key = self.strategy.weighted_by_key  # type: ignore[attr-defined]
        record_eps: list[float] = []
        for reply in valid:
            for name, record in list(reply.content.array_records.items()):
                arrays = clip_update(record.to_numpy_ndarrays(), current, self.clipping_norm)
                reply.content[name] = ArrayRecord(
                    {k: Array(v) for k, v in zip(record.keys(), arrays, strict=True)}
                )
            for name, metrics in list(reply.content.metric_records.items()):
                if "dp-epsilon" in metrics:
                    record_eps.append(float(metrics["dp-epsilon"]))
                updated = MetricRecord(dict(metrics))
                updated[weight_key] = 1
                reply.content[name] = updated

        arrays, metrics = self.strategy.aggregate_train(server_round, valid)
        if arrays is None:
            return None, metrics
        std = self.noise_multiplier * self.clipping_norm / w
        released = {}
        for k, c, mean in zip(arrays.keys(), current, arrays.to_numpy_ndarrays(), strict=True):
            # the inner mean is current + sum(clipped) / m; release current + sum(clipped) / W
            update = (mean.astype(np.float64) - c) * (m / w)
            noise = self._rng.normal(0.0, std, size=mean.shape)
            released[k] = Array((c + update + noise).astype(mean.dtype))
        self.history.append((self.noise_multiplier, self.sample_rate, 1))
        eps = self.epsilon
        log(
            INFO,
            "ClientLevelDP round %d: %d of %d updates clipped to %.3g, noise std %.3g; "
            "client-level epsilon %.3f at delta %g (RDP)",
            server_round,
            m,
            w,
            self.clipping_norm,
            std,
            eps,
            self.delta,
        )
        metrics = MetricRecord(dict(metrics)) if metrics is not None else MetricRecord()
        metrics["dp-client-epsilon"] = eps
        metrics["dp-client-delta"] = self.delta
        metrics["dp-client-noise-std"] = std
        metrics["dp-client-replies"] = m
        if record_eps:
            metrics["dp-epsilon-max"] = max(record_eps)
        return ArrayRecord(released), metrics


def clip_update(
    arrays: list[np.ndarray], reference: list[np.ndarray], clipping_norm: float
) -> list[np.ndarray]:
    """``reference + delta * min(1, C / ||delta||)`` with ``delta = arrays - reference``.

    The L2 norm is over all arrays together; a zero update is returned unchanged (Flower's
    ``compute_clip_model_update`` divides by it).
    """
    deltas = [
        np.asarray(a, np.float64) - np.asarray(r, np.float64)
        for a, r in zip(arrays, reference, strict=True)
    ]
    norm = float(np.sqrt(sum(float(np.sum(d * d)) for d in deltas)))
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    return [
        (np.asarray(r, np.float64) + d * scale).astype(np.asarray(a).dtype)
        for a, r, d in zip(arrays, reference, deltas, strict=True)
    ]

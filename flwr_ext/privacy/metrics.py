"""Server-side reporting of the clients' record-level privacy loss."""

from __future__ import annotations

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords


def aggregate_train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Flower's weighted mean of the clients' metrics, plus ``dp-epsilon-max``.

    A ``train_metrics_aggr_fn`` for Flower strategies. The mean of record-level epsilons is not a
    guarantee; the maximum over the round's clients is what a reviewer reads. ``dp-privacy-claim``
    is the minimum over the clients: 0 as soon as one client seeded its sampling or noise
    (``dp.insecure-reproducible``), so the round's epsilon is then not a privacy claim.
    """
    out = aggregate_metricrecords(records, weight_key)
    eps = [
        float(m["dp-epsilon"])
        for rec in records
        for m in rec.metric_records.values()
        if "dp-epsilon" in m
    ]
    if eps:
        out["dp-epsilon-max"] = max(eps)
    claims = [
        float(m["dp-privacy-claim"])
        for rec in records
        for m in rec.metric_records.values()
        if "dp-privacy-claim" in m
    ]
    if claims:
        out["dp-privacy-claim"] = min(claims)
    return out

"""Build a strategy and its ``start`` keyword arguments from a Flower run config.

Apps stay thin wiring: ``build_strategy(cfg).start(..., **build_start_kwargs(cfg))``.
Every key is documented in ``apps/async-vision/README.md``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from flwr.serverapp.strategy import FedAvg, Strategy

from flwr_ext.asyncfl.clock import RealClock, VirtualClock
from flwr_ext.asyncfl.profiles import DeviceProfile
from flwr_ext.asyncfl.server_opt import ServerOptimizer, make_server_opt
from flwr_ext.asyncfl.strategy import AsyncStrategy
from flwr_ext.staleness import from_run_config as build_staleness
from flwr_ext.strategies.fedast import FedAST
from flwr_ext.strategies.fedasync import FedAsync
from flwr_ext.strategies.fedavg_timed import FedAvgTimed
from flwr_ext.strategies.fedbuff import FedBuff
from flwr_ext.strategies.fedcompass import FedCompass
from flwr_ext.strategies.fedfix import FedFix

NAMES = ("fedavg", "fedavg-timed", "fedasync", "fedbuff", "fedcompass", "fedast", "fedfix")


def _get(cfg: dict[str, Any], key: str, default: Any) -> Any:
    value = cfg.get(key, default)
    return type(default)(value) if default is not None else value


def build_profile(cfg: dict[str, Any]) -> DeviceProfile:
    """The device profile named by ``profile`` and its ``profile-*`` / link keys."""
    min_step = _get(cfg, "profile-min-step-time", -1.0)
    return DeviceProfile(
        kind=_get(cfg, "profile", "homogeneous"),
        mean_step_time=_get(cfg, "profile-mean-step-time", 0.1),
        std=_get(cfg, "profile-std", 0.05),
        min_step_time=min_step if min_step > 0 else None,
        jitter=_get(cfg, "profile-jitter", 0.0),
        trace=_get(cfg, "profile-trace", "") or None,
        up_mbps=_get(cfg, "up-mbps", 20.0),
        down_mbps=_get(cfg, "down-mbps", 50.0),
        latency=_get(cfg, "latency", 0.05),
        default_steps=_get(cfg, "profile-default-steps", 10),
        slow_nodes=_get(cfg, "intertwined-slow-nodes", 2),
        slow_factor=_get(cfg, "intertwined-slow-factor", 10.0),
    )


def build_server_opt(cfg: dict[str, Any]) -> ServerOptimizer | None:
    """``server-opt`` (``none``: the strategy's own step) with ``server-lr``,
    ``server-opt-beta`` and ``server-opt-rho`` (see :mod:`flwr_ext.asyncfl.server_opt`)."""
    name = _get(cfg, "server-opt", "none").lower()
    if name == "none":
        return None
    return make_server_opt(
        name,
        lr=_get(cfg, "server-lr", 1.0),
        beta=_get(cfg, "server-opt-beta", 0.9),
        rho=_get(cfg, "server-opt-rho", 2.0),
    )


def build_clock(cfg: dict[str, Any]) -> VirtualClock | RealClock:
    """``clock`` = ``virtual`` (default; seeded by ``seed``) or ``real``."""
    kind = _get(cfg, "clock", "virtual")
    if kind == "real":
        return RealClock()
    if kind != "virtual":
        raise ValueError(f"unknown clock {kind!r}")
    return VirtualClock(build_profile(cfg), seed=_get(cfg, "seed", 0))


def build_start_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """Extra ``start`` keyword arguments of the async strategies (empty for ``fedavg``)."""
    if _get(cfg, "strategy", "fedavg").lower() == "fedavg":
        return {}
    max_time = _get(cfg, "max-time", 0.0)
    wall = _get(cfg, "wall-timeout", 0.0)
    return {
        "clock": build_clock(cfg),
        "max_time": max_time if max_time > 0 else math.inf,
        "eval_every": _get(cfg, "eval-every", 1),
        "eval_period": _get(cfg, "eval-period", 0.0),
        "max_failures": _get(cfg, "max-failures", 3),
        "min_nodes": _get(cfg, "min-train-nodes", 2),
        "wall_timeout": wall if wall > 0 else None,
        "max_reply_bytes": _get(cfg, "max-reply-bytes", 0),
        "max_concurrency": _get(cfg, "max-concurrency", 0),
        "sampler_seed": _get(cfg, "seed", 0),
        "warmup": bool(cfg.get("warmup", False)),
        "max_count_ratio": _get(cfg, "max-count-ratio", 10.0),
        "readmit_after": _get(cfg, "readmit-after", 0.0) or None,
        # only when set, so callers that pass them themselves keep working
        **{kw: float(cfg[key]) for key, kw in _OPTIONAL_KEYS.items() if key in cfg},
        **build_checkpoint_kwargs(cfg),
    }


#: Run-config keys passed to ``start`` only when present: ``poll-interval`` (seconds between two
#: pulls when nothing arrived) and ``drain-timeout`` (wait for jobs in flight after the end).
_OPTIONAL_KEYS = {"poll-interval": "poll_interval", "drain-timeout": "drain_timeout"}


def build_checkpoint_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """``checkpoint_dir`` / ``checkpoint_every`` / ``resume_from`` / ``ledger_path``.

    Keys: ``checkpoint-dir`` (checkpoints go to ``<checkpoint-dir>/<strategy>/``),
    ``checkpoint-every`` (server model versions between checkpoints; 0: none), ``resume``
    (``""``: start fresh; ``latest``: the newest checkpoint in ``<checkpoint-dir>/<strategy>/``;
    else a checkpoint file or directory). With ``output-dir`` set, the ledger of accepted updates
    goes to ``<output-dir>/<strategy>-ledger.csv``.
    """
    name = _get(cfg, "strategy", "fedavg").lower()
    ckpt_dir = str(cfg.get("checkpoint-dir", "") or "")
    out: dict[str, Any] = {}
    if ckpt_dir:
        out["checkpoint_dir"] = str(Path(ckpt_dir) / name)
        out["checkpoint_every"] = _get(cfg, "checkpoint-every", 0)
    resume = str(cfg.get("resume", "") or "")
    if resume.lower() in ("latest", "true", "auto"):
        if not ckpt_dir:
            raise ValueError(f"resume={resume!r} needs checkpoint-dir")
        out["resume_from"] = str(Path(ckpt_dir) / name)
    elif resume:
        sub = Path(resume) / name
        out["resume_from"] = str(sub if sub.is_dir() else Path(resume))
    if cfg.get("output-dir"):
        out["ledger_path"] = str(Path(str(cfg["output-dir"])) / f"{name}-ledger.csv")
    return out


def build_strategy(run_config: dict[str, Any]) -> Strategy | AsyncStrategy:
    """Return the strategy named by ``run_config["strategy"]``.

    Parameters
    ----------
    run_config : dict
        A Flower run config. ``strategy`` is one of ``fedavg`` (Flower's own, no clock),
        ``fedavg-timed``, ``fedasync``, ``fedbuff``, ``fedcompass``, ``fedast``, ``fedfix``.
        Keys read: see ``apps/async-vision/README.md``.

    Raises
    ------
    ValueError
        For an unknown strategy name.
    """
    cfg = run_config
    name = _get(cfg, "strategy", "fedavg").lower()
    fraction_train = _get(cfg, "fraction-train", 1.0)
    min_nodes = _get(cfg, "min-train-nodes", 2)
    if name == "fedavg":
        return FedAvg(
            fraction_train=fraction_train,
            fraction_evaluate=0.0,
            min_train_nodes=min_nodes,
            min_available_nodes=min_nodes,
        )
    if name == "fedavg-timed":
        return FedAvgTimed(
            fraction_train=fraction_train,
            min_train_nodes=min_nodes,
            seed=_get(cfg, "seed", 0),
            over_selection=_get(cfg, "over-selection", 1.0),
        )
    if name in ("fedasync", "fedbuff") and cfg.get("stale-conversion", False):
        # Wang, Gao et al.: convert updates staler than stale-conversion-threshold first
        from flwr_ext.strategies.stale_conversion import StaleConversion

        inner = build_strategy({**cfg, "stale-conversion": False})
        assert isinstance(inner, AsyncStrategy)
        return StaleConversion.from_run_config(inner, cfg)
    if name in ("fedasync", "fedbuff") and _get(cfg, "dc-asgd-lambda", 0.0) > 0:
        # DC-ASGD delay compensation of stale updates (Zheng et al. 2017, eq. 6)
        from flwr_ext.strategies.delay_compensation import DelayCompensation

        inner = build_strategy({**cfg, "dc-asgd-lambda": 0.0})
        assert isinstance(inner, AsyncStrategy)
        return DelayCompensation(inner, lam=_get(cfg, "dc-asgd-lambda", 0.0))
    if name == "fedasync":
        return FedAsync(
            alpha=_get(cfg, "alpha", 0.6),
            staleness=build_staleness(cfg),
            server_opt=build_server_opt(cfg),
        )
    if name == "fedbuff":
        opt = build_server_opt(cfg)
        return FedBuff(
            buffer_size=_get(cfg, "buffer-size", 10),
            server_lr=_get(cfg, "server-lr", 1.0) if opt is None else 1.0,
            staleness=build_staleness(cfg),
            server_momentum=_get(cfg, "server-momentum", 0.0),
            weighted_by_key="num-examples" if _get(cfg, "fedbuff-weighted", False) else None,
            server_opt=opt,
        )
    if name == "fedfix":
        opt = build_server_opt(cfg)
        importance = _get(cfg, "fedfix-importance", "num-examples")
        return FedFix(
            dt=_get(cfg, "fedfix-dt", 1.0),
            server_lr=_get(cfg, "server-lr", 1.0) if opt is None else 1.0,
            weights=_get(cfg, "fedfix-weights", "fedfix"),
            tau_momentum=_get(cfg, "fedfix-tau-momentum", 0.5),
            weighted_by_key=None if importance == "uniform" else importance,
            server_opt=opt,
        )
    if name == "fedcompass":
        return FedCompass.from_run_config(cfg)
    if name == "fedast":
        return FedAST.from_run_config(cfg)
    raise ValueError(f"Unknown strategy {name!r}; available: {', '.join(NAMES)}")

"""Validated run-config settings: one rule per key, checked before the first message.

The defaults of an app live in its ``pyproject.toml`` (``[tool.flwr.app.config]``); the rules
live here, next to the code that reads the keys, as frozen :class:`Setting` values (like PEFT's
validated config dataclasses). An app lists its settings once and calls :func:`validate` at the
top of its ServerApp *and* of each ClientApp handler::

    from flwr_ext.settings import ASYNC_ENGINE, integer, number, validate

    SETTINGS = (integer("num-server-rounds", low=1), number("learning-rate", low=0, low_open=True),
                *ASYNC_ENGINE)
    cfg = validate(context.run_config, SETTINGS)

Every failure is a :class:`SettingError` (a ``ValueError``) that names the key, the value and
what is allowed, e.g. ``run config: num-server-rounds = -1 is not allowed; expected an integer
>= 1``. Values come back converted (``int`` keys as ``int``: ``2.5`` is refused, not truncated;
choices in their canonical spelling). Keys that no rule names are kept as they are and reported
in one warning with the closest known key (a typo such as ``lerning-rate`` would otherwise be
ignored silently).

:data:`ASYNC_ENGINE` holds the keys of flwr-ext's asynchronous strategies and engine (read by
:mod:`flwr_ext.strategies.factory`), shared by every app that offers them.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

from flwr.common.logger import log

#: ``check(value) -> None`` raises ``ValueError(reason)`` for a value the kind accepts but the key
#: does not (the reason ends the error message).
Check = Callable[[Any], None]
#: ``rule(cfg) -> None`` raises :class:`SettingError` for keys that are only wrong together.
Rule = Callable[[dict[str, Any]], None]

_KINDS = ("int", "float", "bool", "str", "choice", "choices", "any")
_WARNED: set[tuple[str, tuple[str, ...]]] = set()


class SettingError(ValueError):
    """A run-config value that is not allowed: names the key, the value and what is allowed.

    ``allowed`` completes "expected ..."; ``reason`` replaces that phrase (a check's own words).
    """

    def __init__(self, key: str, value: Any, allowed: str = "", *, reason: str = "") -> None:
        self.key, self.value, self.allowed = key, value, allowed or reason
        why = reason or f"expected {allowed}"
        super().__init__(f"run config: {key} = {value!r} is not allowed; {why}")


@dataclass(frozen=True)
class Setting:
    """The rule of one run-config key.

    Parameters
    ----------
    key : str
        The run-config key (``"num-server-rounds"``).
    kind : {"int", "float", "bool", "str", "choice", "choices", "any"}
        ``choices`` is a comma-separated, non-empty list of choices (``"fedavg,fedbuff"``);
        ``any`` keeps the value as it is (a key that another validator checks).
    low, high : float, optional
        Bounds of a number (inclusive unless ``low_open`` / ``high_open``).
    choices : tuple of str, or a callable returning one
        Allowed values of a choice (matched case-insensitively). A callable is called when
        the key is checked (lets a rule name constants of modules that are slow to import).
    nonempty : bool
        A ``str`` key must not be empty.
    check : callable, optional
        Extra check of the converted value; raises ``ValueError(why)``.
    renamed_to : str
        A deprecated key: :func:`validate` moves its value to ``renamed_to`` with a warning
        (see :func:`renamed`).
    """

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | Callable[[], Iterable[str]] = field(default=())
    nonempty: bool = False
    check: Check | None = None
    renamed_to: str = ""

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"Setting {self.key!r}: kind must be one of {_KINDS}")

    def _choices(self) -> tuple[str, ...]:
        c = self.choices
        return tuple(c() if callable(c) else c)

    def allowed(self) -> str:
        """What the key accepts, in words (the end of every error message)."""
        if self.kind in ("choice", "choices"):
            names = ", ".join(repr(c) for c in self._choices())
            if self.kind == "choice":
                return f"one of {names}"
            return f"one or more (comma-separated) of {names}"
        if self.kind == "bool":
            return "true or false"
        if self.kind == "str":
            return "a non-empty string" if self.nonempty else "a string"
        if self.kind == "any":
            return "any value"
        noun = "an integer" if self.kind == "int" else "a number"
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            return f"{noun} in {'(' if self.low_open else '['}{_num(lo)}, {_num(hi)}" + (
                ")" if self.high_open else "]"
            )
        if lo is not None:
            return f"{noun} {'>' if self.low_open else '>='} {_num(lo)}"
        if hi is not None:
            return f"{noun} {'<' if self.high_open else '<='} {_num(hi)}"
        return noun

    def parse(self, value: Any) -> Any:
        """Return ``value`` converted to this key's type; raise :class:`SettingError` if wrong."""
        out = self._convert(value)
        if self.check is not None:
            try:
                self.check(out)
            except ValueError as exc:
                raise SettingError(self.key, value, reason=str(exc)) from None
        return out

    def _convert(self, value: Any) -> Any:
        bad = SettingError(self.key, value, self.allowed())
        if self.kind == "any":
            return value
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("true", "false"):
                return value.strip().lower() == "true"
            raise bad
        if self.kind == "str":
            if isinstance(value, bool | dict | list | tuple):
                raise bad
            text = str(value)
            if self.nonempty and not text.strip():
                raise bad
            return text
        if self.kind in ("choice", "choices"):
            if not isinstance(value, str):
                raise bad
            canon = {c.lower(): c for c in self._choices()}
            names = (
                [n.strip().lower() for n in value.split(",")]
                if self.kind == "choices"
                else [value.strip().lower()]
            )
            if not names or any(n not in canon for n in names):
                raise bad
            return ",".join(canon[n] for n in names)
        # numbers
        if isinstance(value, bool):
            raise bad
        if isinstance(value, str):
            try:
                value_num: float = float(value.strip())
            except ValueError:
                raise bad from None
        elif isinstance(value, int | float):
            value_num = value
        else:
            raise bad
        if not math.isfinite(value_num):
            raise bad
        if self.kind == "int":
            if isinstance(value_num, float) and not value_num.is_integer():
                raise bad
            num: float = int(value_num)
        else:
            num = float(value_num)
        lo, hi = self.low, self.high
        if lo is not None and (num < lo or (self.low_open and num == lo)):
            raise bad
        if hi is not None and (num > hi or (self.high_open and num == hi)):
            raise bad
        return num


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def integer(key: str, low: float | None = None, high: float | None = None, **kw: Any) -> Setting:
    """An integer key (``2.5`` is refused, ``5.0`` and ``"5"`` read as 5)."""
    return Setting(key, "int", low=low, high=high, **kw)


def number(key: str, low: float | None = None, high: float | None = None, **kw: Any) -> Setting:
    """A finite number."""
    return Setting(key, "float", low=low, high=high, **kw)


def boolean(key: str) -> Setting:
    """``true`` / ``false`` (TOML booleans, or those two words)."""
    return Setting(key, "bool")


def text(key: str, nonempty: bool = False, check: Check | None = None) -> Setting:
    """A string (a path, a name, a spec checked by ``check``)."""
    return Setting(key, "str", nonempty=nonempty, check=check)


def choice(key: str, choices: tuple[str, ...] | Callable[[], Iterable[str]]) -> Setting:
    """One of ``choices``."""
    return Setting(key, "choice", choices=choices)


def choices(key: str, choices: tuple[str, ...] | Callable[[], Iterable[str]]) -> Setting:
    """A comma-separated, non-empty list of ``choices`` (returned joined by commas)."""
    return Setting(key, "choices", choices=choices)


def renamed(old: str, new: str) -> Setting:
    """A deprecated spelling of ``new``: its value moves to ``new``, with a warning.

    An empty value (an app's ``pyproject.toml`` keeps the old key, empty, so that
    ``--run-config old=...`` still reaches the app) is dropped silently; the old key and a
    different non-empty ``new`` together are refused.
    """
    return Setting(old, "any", renamed_to=new)


def _rename(cfg: dict[str, Any], setting: Setting, app: str) -> None:
    old, new = setting.key, setting.renamed_to
    value = cfg.pop(old)
    if value is None or (isinstance(value, str) and not value.strip()):
        return
    current = cfg.get(new)
    if current is not None and str(current).strip() and current != value:
        raise SettingError(
            old, value, reason=f"it is the deprecated name of {new}, which is set to {current!r}"
        )
    cfg[new] = value
    if (app, (old,)) not in _WARNED:
        _WARNED.add((app, (old,)))
        where = f"{app}: " if app else ""
        log(WARNING, "%srun-config key %s is deprecated: use %s", where, old, new)


def passthrough(key: str) -> Setting:
    """A known key that another validator checks (kept as it is, never reported as unknown)."""
    return Setting(key, "any")


def validate(
    run_config: Mapping[str, Any],
    settings: Iterable[Setting],
    rules: Iterable[Rule] = (),
    *,
    app: str = "",
    required: Iterable[str] = (),
) -> dict[str, Any]:
    """Check ``run_config`` against ``settings`` and ``rules``; return it converted.

    Parameters
    ----------
    run_config : Mapping
        ``context.run_config`` (or any mapping of keys to values).
    settings : iterable of Setting
        One rule per key. Keys absent from ``run_config`` are not checked unless ``required``.
    rules : iterable of callables
        Checks of several keys together, run after every key converted (``cfg`` is the
        converted dict).
    app : str
        Name used in the unknown-keys warning.
    required : iterable of str
        Keys that must be present.

    Returns
    -------
    dict
        Every key of ``run_config``, the known ones converted.

    Raises
    ------
    SettingError
        The first key whose value is not allowed (its message names key, value and rule).
    """
    table = {s.key: s for s in settings}
    cfg = dict(run_config)
    missing = [k for k in required if k not in cfg]
    if missing:
        raise SettingError(missing[0], None, f"a value (the run config lacks {missing})")
    for key, setting in table.items():
        if setting.renamed_to and key in cfg:
            _rename(cfg, setting, app)
    for key, setting in table.items():
        if key in cfg:
            cfg[key] = setting.parse(cfg[key])
    for rule in rules:
        rule(cfg)
    unknown = sorted(k for k in cfg if k not in table)
    if unknown and (app, tuple(unknown)) not in _WARNED:  # once per process, not per message
        _WARNED.add((app, tuple(unknown)))
        hints = []
        for k in unknown:
            near = difflib.get_close_matches(k, list(table), n=1, cutoff=0.8)
            hints.append(f"{k} (did you mean {near[0]}?)" if near else k)
        log(WARNING, "%srun-config keys no rule knows: %s", f"{app}: " if app else "", hints)
    return cfg


def check_compression(spec: str) -> None:
    """A :mod:`flwr_ext.compression` preset spec (``"none"``, ``"fedzip:density=0.01"``)."""
    from flwr_ext.compression import get_preset

    if not str(spec or "none").strip():
        return
    try:
        get_preset(str(spec or "none"))
    except ValueError as exc:
        raise ValueError(f"expected a compression preset ({exc})") from None


def compression_setting(key: str = "compression") -> Setting:
    """The ``compression`` key: a preset name with optional options."""
    return text(key, check=check_compression)


def _staleness_kinds() -> tuple[str, ...]:
    from flwr_ext.staleness import KINDS

    return KINDS


def _profile_kinds() -> tuple[str, ...]:
    from flwr_ext.asyncfl.profiles import KINDS

    return KINDS


def _server_opts() -> tuple[str, ...]:
    from flwr_ext.asyncfl.server_opt import SERVER_OPTS

    return ("none", *SERVER_OPTS)


def _compass_q(cfg: dict[str, Any]) -> None:
    lo, hi = cfg.get("compass-q-min"), cfg.get("compass-q-max")
    if lo is not None and hi is not None and hi < lo:
        raise SettingError("compass-q-max", hi, f"an integer >= compass-q-min ({lo})")


def _trace_profile(cfg: dict[str, Any]) -> None:
    if cfg.get("profile") == "trace" and not str(cfg.get("profile-trace", "") or "").strip():
        raise SettingError("profile-trace", cfg.get("profile-trace"), "a trace file path with "
                           "profile = 'trace'")  # fmt: skip


def _resume(cfg: dict[str, Any]) -> None:
    resume = str(cfg.get("resume", "") or "").lower()
    if resume in ("latest", "true", "auto") and not str(cfg.get("checkpoint-dir", "") or ""):
        raise SettingError("resume", cfg.get("resume"), "a checkpoint path, or a checkpoint-dir "
                           "to resume the latest checkpoint from")  # fmt: skip


#: Keys of the asynchronous engine and strategies (:mod:`flwr_ext.strategies.factory`,
#: ``FedCompass.from_run_config``); documented in ``apps/async-vision/README.md``.
ASYNC_ENGINE: tuple[Setting, ...] = (
    choice("clock", ("virtual", "real")),
    choice("profile", _profile_kinds),
    number("profile-mean-step-time", low=0, low_open=True),
    number("profile-std", low=0),
    number("profile-min-step-time"),  # <= 0: no floor
    number("profile-jitter", low=0, high=1, high_open=True),
    text("profile-trace"),
    integer("profile-default-steps", low=1),
    number("up-mbps", low=0, low_open=True),
    number("down-mbps", low=0, low_open=True),
    number("latency", low=0),
    integer("min-train-nodes", low=1),
    number("max-time", low=0),  # 0: no limit
    number("wall-timeout", low=0),  # 0: none
    integer("eval-every", low=1),
    number("eval-period", low=0),
    integer("max-failures", low=1),
    choice("staleness", _staleness_kinds),
    number("staleness-a", low=0),
    integer("staleness-b", low=0),
    integer("max-staleness", low=-1),  # -1: no cut-off
    number("alpha", low=0, high=1, low_open=True),
    integer("buffer-size", low=1),
    number("server-lr", low=0, low_open=True),
    number("server-momentum", low=0, high=1, high_open=True),
    boolean("fedbuff-weighted"),
    integer("compass-q-min", low=1),
    integer("compass-q-max", low=1),
    number("compass-lambda", low=1),
    number("compass-speed-momentum", low=0, high=1, low_open=True),
    choice("compass-weighting", ("num-examples", "uniform")),
    integer("fedast-tasks", low=1),
    integer("fedast-active", low=1),
    integer("fedast-buffer-size", low=1),
    boolean("fedast-dynamic"),
    integer("fedast-window", low=2),
    integer("fedast-realloc-every", low=0),  # 0: the reference's period
    integer("fedast-task-rounds", low=0),  # 0: no per-task limit
    choice("server-opt", _server_opts),  # none: the strategy's own server step
    number("server-opt-beta", low=0, high=1, high_open=True),
    number("server-opt-rho", low=0),
    number("fedfix-dt", low=0, low_open=True),
    choice("fedfix-weights", ("fedfix", "asynchronous")),
    choice("fedfix-importance", ("num-examples", "uniform")),
    number("fedfix-tau-momentum", low=0, high=1, low_open=True),
    integer("intertwined-slow-nodes", low=1),
    integer("intertwined-slow-classes", low=1),
    number("intertwined-slow-factor", low=0, low_open=True),
    text("checkpoint-dir"),
    integer("checkpoint-every", low=0),
    text("resume"),  # "" | latest | a checkpoint path
    renamed("resume-from", "resume"),  # fedit-llm's former name
    integer("max-reply-bytes", low=0),  # 0: no limit
    number("poll-interval", low=0, low_open=True),
    number("drain-timeout", low=0),
    integer("max-concurrency", low=0),  # 0: every idle node gets a job
    number("over-selection", low=1),
    boolean("warmup"),
    number("readmit-after", low=0),  # 0: never
    number("max-count-ratio", low=0),  # 0: sample counts not bounded
    boolean("stale-conversion"),  # fedasync / fedbuff: convert stale updates (Wang, Gao et al.)
    integer("stale-conversion-threshold", low=0),  # convert staleness > this
    integer("stale-conversion-samples", low=1),
    integer("stale-conversion-iterations", low=1),
    number("stale-conversion-lr", low=0, low_open=True),
    number("stale-conversion-max-residual", low=0, low_open=True),
    integer("stale-conversion-input-side", low=1),
    number("dc-asgd-lambda", low=0),  # fedasync / fedbuff: DC-ASGD compensation (0: off)
)

#: Checks of several :data:`ASYNC_ENGINE` keys together.
ASYNC_ENGINE_RULES: tuple[Rule, ...] = (_compass_q, _trace_profile, _resume)


def _llm(module: str, name: str) -> Callable[[], tuple[str, ...]]:
    def get() -> tuple[str, ...]:
        import importlib

        return tuple(getattr(importlib.import_module(f"flwr_ext.llm.{module}"), name))

    return get


def _int_list(what: str, low: int = 0) -> Check:
    def check(text: str) -> None:
        try:
            vals = [int(v) for v in str(text).split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"expected comma-separated integers >= {low} ({what})") from None
        if any(v < low for v in vals):
            raise ValueError(f"expected comma-separated integers >= {low} ({what})")

    return check


def _categories(text: str) -> None:
    names = [c.strip() for c in str(text).split(",") if c.strip()]
    known = _llm("synthetic", "CATEGORIES")()
    if any(c not in known for c in names):
        raise ValueError(f"expected '' (all) or comma-separated names from {', '.join(known)}")


def _min_lr(cfg: dict[str, Any]) -> None:
    lr, lo = cfg.get("learning-rate"), cfg.get("min-learning-rate")
    if cfg.get("lr-schedule") == "constant":
        return
    if lr is not None and lo is not None and lo > lr:
        raise SettingError("min-learning-rate", lo, f"a number <= learning-rate ({lr})")


#: The data, tokenization, learning-rate and evaluation keys that fedit-llm and sfprompt-llm
#: share (read by :mod:`flwr_ext.llm.tasks`).
LLM_TASK: tuple[Setting, ...] = (
    text("model", nonempty=True),  # "tiny" | "smollm2" | local dir | .gguf file | hub id
    integer("model-seed", low=0),
    text("dataset", nonempty=True),
    choice("dataset-layout", _llm("data", "LAYOUTS")),
    integer("num-train-examples", low=1),
    integer("num-eval-examples", low=1),
    text("categories", check=_categories),
    number("eval-fraction", low=0, high=1, low_open=True, high_open=True),
    choice("template", _llm("templates", "TEMPLATES")),
    integer("max-length", low=8),
    choice("partitioner", _llm("partition", "PARTITIONERS")),
    integer("categories-per-partition", low=1),
    number("dirichlet-alpha", low=0, low_open=True),
    integer("min-partition-size", low=0),
    integer("data-partitions", low=0),
    text("data-partition-ids", check=_int_list("data partition ids")),
    integer("num-server-rounds", low=1),
    integer("batch-size", low=1),
    number("learning-rate", low=0, low_open=True),
    choice("lr-schedule", _llm("train", "SCHEDULES")),
    number("min-learning-rate", low=0),
    boolean("eval-generate"),
    integer("eval-generate-every", low=0),
    integer("eval-max-new-tokens", low=1),
    integer("eval-batch-size", low=1),
    integer("eval-num-samples", low=0),
    text("output-dir"),
    integer("torch-threads", low=1),
    integer("seed", low=0),
)

#: Checks of several :data:`LLM_TASK` keys together.
LLM_TASK_RULES: tuple[Rule, ...] = (_min_lr,)

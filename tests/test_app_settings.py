"""Every run-config key of every packaged app is checked before the first message (issue 15.7).

The ServerApp and each ClientApp handler validate first: a bad value raises a ``ValueError`` that
names the key, the value and what is allowed, before the grid is touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, RecordDict

from flwr_ext.settings import Setting, SettingError
from flwr_ext.sim import fused_run_config

ROOT = Path(__file__).resolve().parents[1]
APPS = {
    "async-vision": ROOT / "apps" / "async-vision",
    "fedit-llm": ROOT / "apps" / "fedit-llm",
    "sfprompt-llm": ROOT / "apps" / "sfprompt-llm",
}


class NoGrid:
    """A Grid that fails the test if the ServerApp sends or asks anything."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"ServerApp used the grid ({name}) before validating its run config")


def _context(run_config: dict[str, Any]) -> Context:
    node_config = {"partition-id": 0, "num-partitions": 2}
    return Context(1, 1, node_config, RecordDict(), run_config)


def _settings(app: str) -> tuple[Setting, ...]:
    if app == "async-vision":
        from async_vision.settings import SETTINGS
    elif app == "fedit-llm":
        from fedit_llm.config import SETTINGS
    else:
        from sfprompt_llm.config import SETTINGS
    return SETTINGS


def _entry_points(app: str) -> dict[str, Any]:
    """The ServerApp main and every ClientApp handler, as ``name -> fn(context)``."""
    if app == "async-vision":
        from async_vision import client_app, server_app

        return {
            "server": lambda ctx: server_app.main(NoGrid(), ctx),
            "client.train": lambda ctx: client_app.train(None, ctx),
            "client.evaluate": lambda ctx: client_app.evaluate_fn(None, ctx),
        }
    if app == "fedit-llm":
        from fedit_llm import client_app, server_app

        return {
            "server": lambda ctx: server_app.main(NoGrid(), ctx),
            "client.train": lambda ctx: client_app.train(None, ctx),
        }
    from sfprompt_llm import client_app, server_app

    out = {"server": lambda ctx: server_app.main(NoGrid(), ctx)}
    for action in ("start", "forward", "tail", "backward", "finish"):
        out[f"client.{action}"] = lambda ctx, a=action: client_app._route(a)(None, ctx)
    return out


# the values of the issue, where the app has the key
LISTED = [
    ("num-server-rounds", -1),
    ("num-server-rounds", 2.5),
    ("timeout", -5),
    ("exchange-timeout", -5),
    ("strategy", "fedbuff,nope"),
    ("fraction-train", 2.0),
    ("learning-rate", "abc"),
    ("dirichlet-alpha", -1),
]
CASES = [
    (app, key, value)
    for app, path in APPS.items()
    for key, value in LISTED
    if key in fused_run_config(path)
]


@pytest.mark.parametrize(("app", "key", "value"), CASES)
def test_listed_bad_values_fail_before_the_first_message(app: str, key: str, value: Any) -> None:
    cfg = {**fused_run_config(APPS[app]), key: value}
    for where, call in _entry_points(app).items():
        with pytest.raises(ValueError) as info:
            call(_context(cfg))
        assert f"{key} = {value!r} is not allowed; expected" in str(info.value), where


def _bad_value(setting: Setting) -> Any:
    """A value this key's rule must refuse (``None``: its rule accepts anything)."""
    if setting.kind == "int":
        return setting.low - 1 if setting.low is not None else 0.5
    if setting.kind == "float":
        if setting.low is not None:
            return setting.low if setting.low_open else setting.low - 1
        return "not-a-number"
    if setting.kind == "bool":
        return "maybe"
    if setting.kind in ("choice", "choices"):
        return "no-such-choice"
    if setting.kind == "str":
        if setting.nonempty:
            return ""
        return "nope:nope" if setting.check is not None else None
    return None


@pytest.mark.parametrize("app", list(APPS))
def test_every_pyproject_key_has_a_rule_and_the_defaults_pass(app: str) -> None:
    keys = {s.key for s in _settings(app)}
    defaults = fused_run_config(APPS[app])
    assert sorted(set(defaults) - keys) == [], "keys of pyproject.toml that no rule checks"
    from flwr_ext.settings import validate

    validate(defaults, _settings(app))  # every default is allowed


@pytest.mark.parametrize("app", list(APPS))
def test_every_rule_refuses_a_bad_value_naming_its_key(app: str) -> None:
    defaults = fused_run_config(APPS[app])
    checked = 0
    for setting in _settings(app):
        bad = _bad_value(setting)
        if bad is None or setting.key not in defaults:
            continue
        with pytest.raises(SettingError) as info:
            setting.parse(bad)
        assert f"{setting.key} = {bad!r} is not allowed" in str(info.value)
        checked += 1
    assert checked >= 20


def test_async_vision_builds_every_listed_strategy_first() -> None:
    """A bad setting of the second strategy fails before the first one runs (FedCompass q)."""
    cfg = {
        **fused_run_config(APPS["async-vision"]),
        "strategy": "fedbuff,fedcompass",
        "compass-q-min": 50,
        "compass-q-max": 10,
    }
    with pytest.raises(SettingError, match="compass-q-max = 10"):
        _entry_points("async-vision")["server"](_context(cfg))


@pytest.mark.parametrize("app", ["async-vision", "fedit-llm"])
def test_async_defaults_fit_the_default_local_connection(app: str) -> None:
    """Flower's built-in ``local`` connection simulates 2 SuperNodes (since flwr 1.32)."""
    cfg = fused_run_config(APPS[app])
    assert cfg["buffer-size"] <= 2, "FedBuff would wait for a buffer two nodes fill slowly"
    assert cfg["min-train-nodes"] <= 2


@pytest.mark.parametrize("app", ["async-vision", "fedit-llm"])
def test_resume_is_the_checkpoint_key_of_every_app(app: str) -> None:
    """``resume`` names the checkpoint to continue from; ``resume-from`` is read as it."""
    defaults = fused_run_config(APPS[app])
    assert "resume" in defaults
    keys = {s.key for s in _settings(app)}
    assert {"resume", "resume-from"} <= keys
    from flwr_ext.settings import validate

    cfg = validate({**defaults, "resume-from": "/some/checkpoint"}, _settings(app))
    assert cfg["resume"] == "/some/checkpoint"
    assert "resume-from" not in cfg

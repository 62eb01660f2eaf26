"""flwr_ext.settings: one rule per run-config key, errors that name key, value and rule."""

from __future__ import annotations

import logging

import pytest

from flwr_ext.settings import (
    ASYNC_ENGINE,
    ASYNC_ENGINE_RULES,
    SettingError,
    boolean,
    choice,
    choices,
    compression_setting,
    integer,
    number,
    text,
    validate,
)


@pytest.mark.parametrize(
    ("setting", "value", "expected"),
    [
        (integer("n", low=1), 3, 3),
        (integer("n", low=1), 5.0, 5),
        (integer("n", low=1), "7", 7),
        (number("lr", low=0, low_open=True), 1, 1.0),
        (number("lr", low=0, low_open=True), "0.5", 0.5),
        (number("f", low=0, high=1, low_open=True), 1.0, 1.0),
        (boolean("b"), True, True),
        (boolean("b"), "false", False),
        (text("t"), "", ""),
        (choice("c", ("fedavg", "fedbuff")), "FedBuff", "fedbuff"),
        (choices("s", ("fedavg", "fedbuff")), "fedbuff, fedavg", "fedbuff,fedavg"),
        (compression_setting(), "fedzip:density=0.01", "fedzip:density=0.01"),
    ],
)
def test_values_are_converted(setting, value, expected) -> None:
    out = setting.parse(value)
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize(
    ("setting", "value", "allowed"),
    [
        (integer("num-server-rounds", low=1), -1, "an integer >= 1"),
        (integer("num-server-rounds", low=1), 2.5, "an integer >= 1"),
        (integer("num-server-rounds", low=1), True, "an integer >= 1"),
        (number("timeout", low=0, low_open=True), -5, "a number > 0"),
        (number("timeout", low=0, low_open=True), float("nan"), "a number > 0"),
        (number("fraction-train", low=0, high=1, low_open=True), 2.0, "a number in (0, 1]"),
        (number("fraction-train", low=0, high=1, low_open=True), 0, "a number in (0, 1]"),
        (number("learning-rate", low=0, low_open=True), "abc", "a number > 0"),
        (number("dirichlet-alpha", low=0, low_open=True), -1, "a number > 0"),
        (number("momentum", low=0, high=1, high_open=True), 1.0, "a number in [0, 1)"),
        (choices("strategy", ("fedavg", "fedbuff")), "fedbuff,nope", "one or more"),
        (choices("strategy", ("fedavg", "fedbuff")), "", "one or more"),
        (choice("clock", ("virtual", "real")), 3, "one of 'virtual', 'real'"),
        (boolean("fedbuff-weighted"), "sometimes", "true or false"),
        (text("dataset", nonempty=True), " ", "a non-empty string"),
        (compression_setting(), "zip", "compression preset"),
    ],
)
def test_errors_name_key_value_and_rule(setting, value, allowed) -> None:
    with pytest.raises(SettingError) as info:
        setting.parse(value)
    msg = str(info.value)
    assert f"{setting.key} = {value!r}" in msg
    assert allowed in msg
    assert isinstance(info.value, ValueError)
    assert info.value.key == setting.key


def test_validate_converts_keeps_unknown_and_warns_with_a_hint(caplog) -> None:
    rules = (integer("num-server-rounds", low=1), number("learning-rate", low=0, low_open=True))
    with caplog.at_level(logging.WARNING, logger="flwr"):
        cfg = validate({"num-server-rounds": 3.0, "lerning-rate": 0.1}, rules, app="test-warn")
    assert cfg == {"num-server-rounds": 3, "lerning-rate": 0.1}
    assert "lerning-rate (did you mean learning-rate?)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        validate({"num-server-rounds": 3, "lerning-rate": 0.1}, rules, app="test-warn")
    assert "lerning-rate" not in caplog.text  # once per process, not once per message


def test_validate_required_and_rules() -> None:
    with pytest.raises(SettingError, match="lacks"):
        validate({}, (integer("n"),), required=("n",))
    cfg = {"compass-q-min": 10, "compass-q-max": 5}
    with pytest.raises(SettingError, match="compass-q-max = 5 .*compass-q-min"):
        validate(cfg, ASYNC_ENGINE, ASYNC_ENGINE_RULES)
    with pytest.raises(SettingError, match="profile-trace"):
        validate({"profile": "trace", "profile-trace": ""}, ASYNC_ENGINE, ASYNC_ENGINE_RULES)
    with pytest.raises(SettingError, match="resume = 'latest'"):
        validate({"resume": "latest"}, ASYNC_ENGINE, ASYNC_ENGINE_RULES)


def test_resume_from_is_a_deprecated_name_of_resume(caplog) -> None:
    """One checkpoint key for every app: ``resume``; fedit-llm's ``resume-from`` still works."""
    with caplog.at_level(logging.WARNING, logger="flwr"):
        cfg = validate({"resume-from": "/ckpt/run"}, ASYNC_ENGINE, app="test-rename")
    assert cfg == {"resume": "/ckpt/run"}
    assert "resume-from is deprecated: use resume" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flwr"):  # the empty placeholder: no warning
        assert validate({"resume-from": "", "resume": ""}, ASYNC_ENGINE, app="x") == {"resume": ""}
    assert "deprecated" not in caplog.text
    # the same value under both names is fine; two different ones are refused
    cfg = validate({"resume-from": "/a", "resume": "/a"}, ASYNC_ENGINE)
    assert cfg == {"resume": "/a"}
    with pytest.raises(SettingError, match="resume-from = '/a' .*deprecated name of resume"):
        validate({"resume-from": "/a", "resume": "/b"}, ASYNC_ENGINE)
    # the alias goes through the rules of the new name
    with pytest.raises(SettingError, match="resume = 'latest'"):
        validate({"resume-from": "latest"}, ASYNC_ENGINE, ASYNC_ENGINE_RULES)

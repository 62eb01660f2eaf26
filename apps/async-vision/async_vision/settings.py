"""The rule of every run-config key of async-vision (defaults: ``pyproject.toml``).

:func:`validate` runs at the top of the ServerApp and of each ClientApp handler, so a bad value
fails before the first message, naming the key, the value and what is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr_ext.data.partition import PARTITIONERS
from flwr_ext.settings import (
    ASYNC_ENGINE,
    ASYNC_ENGINE_RULES,
    SettingError,
    choice,
    choices,
    compression_setting,
    integer,
    number,
    text,
)
from flwr_ext.settings import validate as _validate
from flwr_ext.strategies.factory import NAMES

SETTINGS = (
    choices("strategy", NAMES),  # several run one after the other (the demo)
    integer("num-server-rounds", low=1),
    number("fraction-train", low=0, high=1, low_open=True),
    integer("local-epochs", low=0),
    integer("local-steps", low=0),
    integer("batch-size", low=1),
    number("learning-rate", low=0, low_open=True),
    number("momentum", low=0, high=1, high_open=True),
    text("dataset", nonempty=True),  # "digits" or a flwr-datasets id / local dataset directory
    choice("partitioner", PARTITIONERS),
    number("dirichlet-alpha", low=0, low_open=True),
    integer("seed", low=0),
    integer("torch-threads", low=1),
    compression_setting(),
    compression_setting("compression-down"),  # EF21-P downlink (every strategy)
    number("timeout", low=0, low_open=True),
    text("output-dir"),
    text("run-name"),
    *ASYNC_ENGINE,
)


def _some_local_work(cfg: dict[str, Any]) -> None:
    if cfg.get("local-epochs", 1) == 0 and cfg.get("local-steps", 0) == 0:
        raise SettingError("local-epochs", 0, "an integer >= 1 when local-steps is 0")


RULES = (*ASYNC_ENGINE_RULES, _some_local_work)


def validate(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """``run_config`` checked and converted (see :func:`flwr_ext.settings.validate`)."""
    return _validate(run_config, SETTINGS, RULES, app="async-vision")

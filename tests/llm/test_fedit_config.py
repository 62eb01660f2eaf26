"""fedit-llm run-config validation and strategy wiring (no simulation)."""

from __future__ import annotations

import pytest
from fedit_llm.config import client_rank, validate
from fedit_llm.server_app import build_strategy

from flwr_ext.wrappers import innermost

from .fedit_helpers import config


def _names(strategy):
    names = [type(strategy).__name__]
    while "strategy" in vars(strategy):
        strategy = vars(strategy)["strategy"]
        names.append(type(strategy).__name__)
    return names


def test_strategy_choices(tmp_path):
    got = {
        s: _names(build_strategy(validate(config(tmp_path, strategy=s))))
        for s in ("fedavg", "fedadam", "fedbuff", "fedcompass")
    }
    assert got == {
        "fedavg": ["Compressed", "FedAvg"],
        "fedadam": ["Compressed", "FedAdam"],
        "fedbuff": ["FedBuff"],  # the async engine decodes compressed replies itself
        "fedcompass": ["FedCompass"],
    }
    cdp = {"dp.client-noise-multiplier": 1.0, "dp.client-clipping-norm": 0.5}
    s = build_strategy(validate(config(tmp_path, **cdp)))
    assert _names(s) == ["Compressed", "ClientLevelDP", "FedAvg"]
    assert type(innermost(s)).__name__ == "FedAvg"
    flora = build_strategy(validate(config(tmp_path, aggregation="flora")))
    assert _names(flora) == ["Compressed", "FLoRA"]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            {"aggregation": "mean-of-products"},
            "aggregation = 'mean-of-products' is not allowed; expected one",
        ),
        ({"strategy": "fedprox"}, "strategy = 'fedprox' is not allowed; expected one of"),
        ({"compression": "zip"}, "compression = 'zip' is not allowed; expected a compression"),
        ({"local-steps": 0}, "local-steps = 0 is not allowed; expected an integer >= 1"),
        ({"batch-size": "four"}, "batch-size = 'four' is not allowed; expected an integer"),
        ({"learning-rate": -1.0}, "learning-rate = -1.0 is not allowed; expected a number > 0"),
        ({"lr-schedule": "step"}, "lr-schedule = 'step' is not allowed; expected one of"),
        ({"fraction-train": 1.5}, "fraction-train"),
        (
            {"dp.target-epsilon": 3.0, "dp.delta": 2.0},
            "dp.delta = 2.0 is not allowed; expected a number in",
        ),
        ({"dp.target-epsilon": 3.0, "dp.max-grad-norm": 0.0}, "dp.max-grad-norm = 0.0"),
        ({"aggregation": "flora", "flora-ranks": "4,x"}, "flora-ranks"),
        ({"aggregation": "flora", "strategy": "fedbuff"}, "with aggregation flora"),
        ({"aggregation": "flora", "compression": "sparse-lora"}, "without compression"),
        (
            {"dp.client-noise-multiplier": 1.0, "strategy": "fedbuff"},
            "with dp.client-noise-multiplier",
        ),
        ({"lora-layers": "top4"}, "lora-layers = 'top4' is not allowed; lora layers must"),
        ({"lora-layers": "last:0"}, "lora-layers"),
    ],
)
def test_bad_values_raise_clear_value_errors(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        validate(config(tmp_path, **overrides))


def test_missing_key_is_named(tmp_path):
    cfg = config(tmp_path)
    del cfg["local-steps"]
    with pytest.raises(ValueError, match="local-steps"):
        validate(cfg)


def test_dp_compression_allowed_with_server_side_clipping(tmp_path):
    # central client-level DP: the trusted server decodes, clips each update to C, then noises
    # (Compressed outermost), so every preset keeps the sensitivity bound (docs/privacy.md)
    cdp = {"dp.client-noise-multiplier": 1.0, "compression": "sparse-lora"}
    s = build_strategy(validate(config(tmp_path, **cdp)))
    assert _names(s) == ["Compressed", "ClientLevelDP", "FedAvg"]
    validate(config(tmp_path, **cdp, **{"dp.target-epsilon": 8.0}))
    validate(config(tmp_path, **{"dp.client-noise-multiplier": 1.0, "compression": "qsgd-8bit"}))


def test_flora_ranks_per_partition(tmp_path):
    cfg = validate(config(tmp_path, aggregation="flora", **{"flora-ranks": "2,4,8"}))
    assert [client_rank(cfg, i) for i in range(4)] == [2, 4, 8, 2]
    plain = validate(config(tmp_path, **{"flora-ranks": "2,4"}))
    assert client_rank(plain, 1) == plain["lora-r"]  # ranks only apply under flora


def test_categories_and_local_only_data_partition(tmp_path):
    from collections import Counter

    from flwr_ext.llm.tasks import client_records, data_partition, train_eval_records

    cfg = validate(config(tmp_path, categories="extract,convert,uppercase", partitioner="category"))
    train, held, _ = train_eval_records(cfg)
    assert set(Counter(r["category"] for r in train)) == {"extract", "convert", "uppercase"}
    assert set(Counter(r["category"] for r in held)) == {"extract", "convert", "uppercase"}
    # node 0 of a 1-node run on data partition 2 of 3 == node 2 of a 3-node run
    local = dict(cfg, **{"data-partitions": 3, "data-partition-ids": "2"})
    assert data_partition(local, 0, 1) == (2, 3)
    assert data_partition(cfg, 1, 3) == (1, 3)
    assert client_records(local, 0, 1) == client_records(cfg, 2, 3)
    with pytest.raises(ValueError, match="not in"):
        data_partition(dict(local, **{"data-partition-ids": "3"}), 0, 1)
    with pytest.raises(ValueError, match="needs data-partitions"):
        data_partition(dict(cfg, **{"data-partition-ids": "1"}), 0, 1)

"""Strategies: every class importable from ``flwr_ext.strategies``."""

from flwr_ext.compression.server import Compressed
from flwr_ext.strategies.ef21 import EF21, EF21BC
from flwr_ext.strategies.factory import build_strategy
from flwr_ext.strategies.fedasync import FedAsync
from flwr_ext.strategies.fedavg_timed import FedAvgTimed
from flwr_ext.strategies.fedbuff import FedBuff
from flwr_ext.strategies.fedcompass import FedCompass
from flwr_ext.strategies.fedfix import FedFix
from flwr_ext.strategies.flora import FLoRA
from flwr_ext.strategies.scafcom import SCAFCOM, SCALLION

__all__ = [
    "Compressed",
    "EF21",
    "EF21BC",
    "FedAsync",
    "FedAvgTimed",
    "FedBuff",
    "FedCompass",
    "FedFix",
    "FLoRA",
    "SCAFCOM",
    "SCALLION",
    "build_strategy",
]

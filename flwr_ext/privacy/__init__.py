"""Differential privacy for federated adapter fine-tuning.

Record-level DP-SGD on LoRA adapters with an accountant that lives in ``context.state``
(:class:`DPLoRAEngine`), client-level DP at the server with an RDP accountant over rounds
(:class:`ClientLevelDP`), and the ordering rule with compression (:func:`check_dp_compression`).

References
----------
Abadi et al. 2016 (DP-SGD); Liu et al. 2023 (DP-LoRA); McMahan et al. 2018 (client-level DP);
Mironov 2017 (RDP); Papernot et al. 2021 (tempered activations).
"""

from .accounting import (
    STATE_KEY,
    AccountantState,
    PrivacyBudgetExhausted,
    calibrate_noise,
    compute_epsilon,
)
from .activations import replace_activations
from .client_level import CLIENT_GUARANTEE, ClientLevelDP
from .compression import DPCompressionError, check_dp_compression
from .engine import GUARANTEE, DPConfig, DPLoRAEngine, check_adapter_only
from .losses import causal_lm_loss, causal_lm_per_example
from .metrics import aggregate_train_metrics

__all__ = [
    "CLIENT_GUARANTEE",
    "GUARANTEE",
    "STATE_KEY",
    "AccountantState",
    "ClientLevelDP",
    "DPCompressionError",
    "DPConfig",
    "DPLoRAEngine",
    "PrivacyBudgetExhausted",
    "aggregate_train_metrics",
    "calibrate_noise",
    "causal_lm_loss",
    "causal_lm_per_example",
    "check_adapter_only",
    "check_dp_compression",
    "compute_epsilon",
    "replace_activations",
]

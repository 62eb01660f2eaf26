"""Record-level DP-SGD on LoRA adapters: one call makes model, optimizer and loader private.

:class:`DPLoRAEngine` reads like Opacus' ``PrivacyEngine`` but is built for federated rounds:

* the noise multiplier is calibrated once, from the client's (epsilon, delta) budget over all
  DP-SGD steps of all rounds it expects to join, and stored with the accountant;
* the accountant's history is restored from ``context.state`` before training and written back
  after, so the reported epsilon covers the whole run even when Flower starts a fresh ClientApp
  process for every message;
* a client whose next round would exceed its budget raises :class:`PrivacyBudgetExhausted`.

Only the adapter is trainable (LoRA A/B and ``modules_to_save``); the frozen base never gets
per-sample gradients, which is what keeps the DP step cheap (DP-LoRA, Liu et al. 2023).

References
----------
Abadi et al., "Deep Learning with Differential Privacy", CCS 2016.
Liu et al., "Differentially Private Low-Rank Adaptation of Large Language Model Using Federated
Learning", arXiv:2312.17493, 2023.
Mironov, "Renyi Differential Privacy", CSF 2017.
"""

from __future__ import annotations

import contextlib
import math
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from logging import WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context
from flwr.common import log
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader

from .accounting import (
    OPACUS_ACCOUNTANTS,
    AccountantState,
    PrivacyBudgetExhausted,
    calibrate_noise,
)

ADAPTER_MARKERS = ("lora_", "modules_to_save")
"""Substrings of parameter names that count as adapter parameters."""

GUARANTEE = (
    "record-level (example-level) (epsilon, delta)-DP of this client's training data, "
    "add/remove-one adjacency, composed over every DP-SGD step of every round this client trained"
)

NOT_A_CLAIM = (
    "not a privacy claim: Poisson sampling and noise were seeded from the run config "
    "(dp.insecure-reproducible), so anyone who knows it can recompute the batches and the noise"
)
"""The ``guarantee`` reported instead of :data:`GUARANTEE` under ``insecure_reproducible``."""


def secret_generator() -> torch.Generator:
    """A torch generator seeded with 63 bits of OS entropy (``secrets``), never a config seed.

    Neither the server nor anyone who knows the run config can recompute the draws. This is not
    Opacus' ``secure_mode`` (a CSPRNG for every draw plus noise robust to floating-point attacks,
    Mironov 2012), which needs ``torchcsprng``; see docs/privacy.md.
    """
    return torch.Generator().manual_seed(secrets.randbits(63))


def seeded_generators(seed: int | Sequence[int]) -> tuple[torch.Generator, torch.Generator]:
    """(sampling, noise) generators derived from ``seed`` by ``np.random.SeedSequence``.

    Only for ``insecure_reproducible``: these draws are public to anyone who knows ``seed``.
    """
    entropy = [int(seed)] if isinstance(seed, int) else [int(s) for s in seed]
    a, b = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint64)
    return (
        torch.Generator().manual_seed(int(a) >> 1),
        torch.Generator().manual_seed(int(b) >> 1),
    )


@dataclass(frozen=True)
class DPConfig:
    """Record-level DP settings of one client.

    Parameters
    ----------
    target_epsilon : float
        Budget for the whole run (all rounds), at ``delta``.
    delta : float
        Target delta; keep it below ``1 / num_examples``.
    max_grad_norm : float
        Per-sample clipping norm C.
    accountant : {"rdp", "prv", "pld"}
        Accountant that calibrates and reports. ``"rdp"`` (default here) is the loosest upper
        bound; ``"prv"`` (Opacus' own default) and ``"pld"`` (Google's dp-accounting) are
        tighter, so the same budget buys less noise (see :mod:`flwr_ext.privacy.accounting`).
    max_physical_batch_size : int or None
        Split each Poisson-sampled logical batch into physical batches of at most this size
        (Opacus ``BatchMemoryManager``); ``None`` keeps whole logical batches.
    noise_multiplier : float or None
        Skip calibration and use this sigma (benchmarks, tests). The budget check still applies.
    insecure_reproducible : bool
        Draw Poisson batches and noise from generators seeded by the ``seed`` passed to
        :meth:`DPLoRAEngine.make_private` (reproducible runs, debugging). INSECURE: whoever knows
        the seed (the server knows the run config) can recompute batch membership and the noise,
        which voids the guarantee; a warning is logged and the reported epsilon is marked as not
        a privacy claim (``dp-privacy-claim`` 0). Default ``False``: both come from OS entropy.
    """

    target_epsilon: float
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    max_physical_batch_size: int | None = None
    noise_multiplier: float | None = None
    insecure_reproducible: bool = False

    def __post_init__(self) -> None:
        if not self.target_epsilon > 0:
            raise ValueError("target_epsilon must be positive")
        if not 0 < self.delta < 1:
            raise ValueError("delta must be in (0, 1)")
        if not self.max_grad_norm > 0:
            raise ValueError("max_grad_norm must be positive")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], prefix: str = "dp.") -> DPConfig | None:
        """Read ``dp.*`` run-config keys; ``None`` when DP is off.

        Keys: ``dp.target-epsilon`` (required; missing, ``0`` or negative means DP off),
        ``dp.delta`` (1e-5), ``dp.max-grad-norm`` (1.0), ``dp.accountant`` ("rdp"),
        ``dp.max-physical-batch-size`` (0 = no split), ``dp.noise-multiplier`` (0 = calibrate),
        ``dp.insecure-reproducible`` (false; true seeds sampling and noise from the run config).
        """
        eps = float(run_config.get(f"{prefix}target-epsilon", 0) or 0)
        if eps <= 0:
            return None
        physical = int(run_config.get(f"{prefix}max-physical-batch-size", 0) or 0)
        sigma = float(run_config.get(f"{prefix}noise-multiplier", 0) or 0)
        return cls(
            target_epsilon=eps,
            delta=float(run_config.get(f"{prefix}delta", 1e-5)),
            max_grad_norm=float(run_config.get(f"{prefix}max-grad-norm", 1.0)),
            accountant=str(run_config.get(f"{prefix}accountant", "rdp")),
            max_physical_batch_size=physical or None,
            noise_multiplier=sigma or None,
            insecure_reproducible=_as_bool(run_config.get(f"{prefix}insecure-reproducible", False)),
        )


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", ""):
            raise ValueError(f"expected a boolean, got {value!r}")
        return value.lower() in ("true", "1")
    return bool(value)


def check_adapter_only(module: nn.Module) -> list[str]:
    """Check that only adapter parameters are trainable; return their names.

    Raises
    ------
    ValueError
        If a trainable parameter is not a LoRA / ``modules_to_save`` parameter, or none is.
    """
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    stray = [n for n in trainable if not any(m in n for m in ADAPTER_MARKERS)]
    if stray:
        raise ValueError(
            "DP-LoRA trains the adapter only, but these base parameters are trainable: "
            f"{stray[:5]}{' ...' if len(stray) > 5 else ''}. Use peft.get_peft_model."
        )
    if not trainable:
        raise ValueError("no trainable adapter parameters")
    return trainable


def _single_device(module: nn.Module) -> torch.device:
    devices = {p.device for p in module.parameters()}
    if len(devices) != 1:
        raise ValueError(f"model spans several devices {devices}; DP-LoRA needs one")
    return devices.pop()


class DPLoRAEngine:
    """Opacus ``PrivacyEngine`` for PEFT adapters, with an accountant that outlives the process.

    Call order (Opacus issue 820: moving the model after wrapping silently freezes LoRA)::

        model = base.to(device)                 # 1. device first
        model = get_peft_model(model, lora)     # 2. then the adapter
        optimizer = torch.optim.SGD(p for p in model.parameters() if p.requires_grad)
        engine = DPLoRAEngine.from_context(context, dp_config)          # 3. restore accountant
        dp_model, optimizer, loader = engine.make_private(              # raises if budget spent
            module=model, optimizer=optimizer, data_loader=loader,
            steps_per_round=steps, expected_rounds=num_rounds)
        for batch in engine.batches(loader, optimizer):  # stops after `steps` logical steps
            optimizer.zero_grad(); loss = ...(dp_model, batch); loss.backward(); optimizer.step()
        engine.save(context)                     # 4. persist; then report engine.metrics()

    Parameters
    ----------
    config : DPConfig
        The client's budget and clipping norm.
    state : AccountantState or None
        Restored accountant (see :meth:`from_context`); a fresh one when ``None``.
    """

    def __init__(self, config: DPConfig, state: AccountantState | None = None) -> None:
        self.config = config
        self.state = state or AccountantState(
            accountant=config.accountant, target_epsilon=config.target_epsilon, delta=config.delta
        )
        self.privacy_engine: PrivacyEngine | None = None
        self.optimizer: DPOptimizer | None = None
        self.sample_rate: float | None = None
        self.steps_per_round = 0
        self.device: torch.device | None = None
        self.seeded = config.insecure_reproducible
        """True when sampling or noise came from a seed: epsilon is then not a privacy claim."""

    @classmethod
    def from_context(cls, context: Context, config: DPConfig) -> DPLoRAEngine:
        """Restore the accountant saved by earlier rounds in ``context.state``."""
        state = AccountantState.load(
            context, config.target_epsilon, config.delta, accountant=config.accountant
        )
        return cls(config, state)

    @property
    def noise_multiplier(self) -> float:
        """Sigma used by every round (``nan`` before the first :meth:`make_private`)."""
        return self.state.noise_multiplier

    def _noise(self, sample_rate: float, steps_per_round: int, expected_rounds: int) -> float:
        if not math.isnan(self.state.noise_multiplier):
            return self.state.noise_multiplier
        if self.config.noise_multiplier is not None:
            return float(self.config.noise_multiplier)
        # Calibrate over everything still planned; later rounds reuse the stored value.
        total = steps_per_round * max(1, expected_rounds) + self.state.steps
        cfg = self.config
        return calibrate_noise(cfg.target_epsilon, cfg.delta, sample_rate, total, cfg.accountant)

    def check_budget(self, sample_rate: float, steps: int) -> float:
        """Raise :class:`PrivacyBudgetExhausted` if ``steps`` more steps exceed the budget.

        Returns
        -------
        float
            The cumulative epsilon after those steps.
        """
        after = self.state.epsilon_after(self.state.noise_multiplier, sample_rate, steps)
        if after > self.config.target_epsilon * (1 + 1e-9):
            raise PrivacyBudgetExhausted(
                f"privacy budget exhausted: this client has spent epsilon="
                f"{self.state.epsilon():.4f} (delta={self.config.delta:g}, "
                f"{self.state.accountant}) over {self.state.steps} DP-SGD steps; another round of "
                f"{steps} steps would reach {after:.4f} > target {self.config.target_epsilon:g}. "
                "Refusing to train."
            )
        return after

    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        steps_per_round: int,
        expected_rounds: int = 1,
        noise_generator: torch.Generator | None = None,
        adapter_only: bool = True,
        seed: int | Sequence[int] | None = None,
    ) -> tuple[nn.Module, DPOptimizer, DataLoader]:
        """Wrap model, optimizer and loader for one round of DP-SGD on the adapter.

        Parameters
        ----------
        module : nn.Module
            A PEFT model already on its device; only adapter parameters may be trainable.
        optimizer : torch.optim.Optimizer
            Over the trainable parameters.
        data_loader : DataLoader
            Its ``batch_size`` is the expected logical batch size; it is replaced by a Poisson
            sampler with rate ``q = 1 / len(data_loader)``. Its ``generator`` is ignored: the
            sampler draws from :func:`secret_generator` (or, under ``insecure_reproducible``,
            from ``seed``).
        steps_per_round : int
            DP-SGD (logical) steps this round; :meth:`batches` stops after that many.
        expected_rounds : int
            Rounds this client expects to train in the whole run; with ``steps_per_round`` they
            fix the noise multiplier in the first round.
        noise_generator : torch.Generator or None
            Overrides the noise source (tests only); the result is marked as not a privacy
            claim like ``insecure_reproducible``.
        adapter_only : bool
            Refuse models whose trainable parameters are not all adapter parameters. Set
            ``False`` for plain DP-SGD on a small full model (the digits baseline).
        seed : int, sequence of int or None
            Entropy for ``np.random.SeedSequence`` (e.g. ``(run seed, round, partition)``); used
            only under ``insecure_reproducible`` (required there), ignored otherwise.

        Returns
        -------
        tuple
            ``(GradSampleModule, DPOptimizer, DPDataLoader)``.

        Raises
        ------
        PrivacyBudgetExhausted
            When this round would take the client over its budget.
        """
        if steps_per_round <= 0:
            raise ValueError("steps_per_round must be positive")
        if adapter_only:
            check_adapter_only(module)
        self.device = _single_device(module)
        sample_rate = 1.0 / len(data_loader)
        self.state.noise_multiplier = self._noise(sample_rate, steps_per_round, expected_rounds)
        self.check_budget(sample_rate, steps_per_round)

        if self.config.insecure_reproducible:
            if seed is None:
                raise ValueError("insecure_reproducible needs a seed")
            sampling, noise = seeded_generators(seed)
            log(
                WARNING,
                "DP-SGD with INSECURE reproducible sampling and noise (dp.insecure-reproducible):"
                " the reported epsilon is not a privacy claim",
            )
        else:
            sampling, noise = secret_generator(), secret_generator()
        if noise_generator is not None:
            noise, self.seeded = noise_generator, True
        # Opacus' DPDataLoader samples with the loader's generator when secure_mode is off
        data_loader.generator = sampling
        # Opacus keeps the history (the same triples for every accountant); the epsilon itself
        # is always computed by compute_epsilon with the configured accountant
        bookkeeping = (
            self.state.accountant if self.state.accountant in OPACUS_ACCOUNTANTS else "rdp"
        )
        engine = PrivacyEngine(accountant=bookkeeping)
        engine.accountant.history = list(self.state.history)
        dp_module, dp_optimizer, dp_loader = engine.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=self.state.noise_multiplier,
            max_grad_norm=self.config.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode="hooks",
            noise_generator=noise,
        )
        self.privacy_engine = engine
        self.optimizer = dp_optimizer
        self.sample_rate = sample_rate
        self.steps_per_round = steps_per_round
        return dp_module, dp_optimizer, dp_loader

    @property
    def steps_taken(self) -> int:
        """Logical DP-SGD steps composed by the wrapped optimizer in this process."""
        if self.privacy_engine is None:
            return 0
        total = sum(n for _, _, n in self.privacy_engine.accountant.history)
        return total - self.state.steps

    def batches(
        self, data_loader: DataLoader, optimizer: DPOptimizer | None = None
    ) -> Iterator[Any]:
        """Physical batches until ``steps_per_round`` logical DP-SGD steps have been taken.

        Cycles over the Poisson loader as needed. With ``max_physical_batch_size`` it goes
        through Opacus' ``BatchMemoryManager`` (Poisson sampling forbids plain gradient
        accumulation). Call ``optimizer.step()`` after every physical batch; the optimizer
        itself skips the intermediate ones.
        """
        optimizer = optimizer or self.optimizer
        if optimizer is None:
            raise RuntimeError("call make_private first")
        physical = self.config.max_physical_batch_size
        while self.steps_taken < self.steps_per_round:
            loader_ctx = (
                BatchMemoryManager(
                    data_loader=data_loader,
                    max_physical_batch_size=physical,
                    optimizer=optimizer,
                )
                if physical
                else contextlib.nullcontext(data_loader)
            )
            with loader_ctx as loader:
                for batch in loader:
                    if _is_empty(batch):
                        _noise_only_step(optimizer)
                    else:
                        yield batch
                    if self.steps_taken >= self.steps_per_round:
                        return

    def get_epsilon(self, delta: float | None = None) -> float:
        """Cumulative epsilon over all rounds, including this one's steps so far."""
        self._sync()
        return self.state.epsilon(delta)

    def _sync(self) -> None:
        if self.privacy_engine is not None:
            self.state.history = [
                (float(s), float(q), int(n)) for s, q, n in self.privacy_engine.accountant.history
            ]

    def save(self, context: Context) -> None:
        """Persist the accountant (with this round's steps) into ``context.state``."""
        self._sync()
        self.state.save(context)

    def metrics(self) -> dict[str, float]:
        """Scalars for the train reply's MetricRecord.

        ``dp-epsilon`` is the cumulative record-level epsilon at ``dp-delta``;
        ``dp-epsilon-budget`` the target; ``dp-steps`` the DP-SGD steps composed so far;
        ``dp-privacy-claim`` 1, or 0 when sampling or noise were seeded (not a privacy claim).
        The accountant's name (a string) is in :meth:`info_record`.
        """
        eps = self.get_epsilon()
        return {
            "dp-epsilon": eps,
            "dp-delta": float(self.config.delta),
            "dp-epsilon-budget": float(self.config.target_epsilon),
            "dp-noise-multiplier": float(self.state.noise_multiplier),
            "dp-steps": int(self.state.steps),
            "dp-max-grad-norm": float(self.config.max_grad_norm),
            "dp-privacy-claim": 0.0 if self.seeded else 1.0,
        }

    def info_record(self) -> ConfigRecord:
        """Which guarantee ``dp-epsilon`` is and how it was computed (add under key ``"dp"``)."""
        return ConfigRecord(
            {
                "accountant": self.state.accountant,
                "guarantee": NOT_A_CLAIM if self.seeded else GUARANTEE,
                "level": "record",
            }
        )


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(values, list | tuple) or isinstance(batch, Mapping):
        for v in values:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


def _is_empty(batch: Any) -> bool:
    t = _first_tensor(batch)
    return t is not None and t.dim() > 0 and t.shape[0] == 0


def _noise_only_step(optimizer: DPOptimizer) -> None:
    """DP-SGD step of an empty Poisson batch: clipped sum is zero, noise is added and accounted."""
    optimizer.zero_grad()
    for p in optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()
    optimizer.zero_grad()

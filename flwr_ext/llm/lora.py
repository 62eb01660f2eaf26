"""PEFT LoRA adapters: attach, freeze for FFA-LoRA, and move only the adapter state.

LoRA (Hu et al. 2022) adds ``ΔW = (alpha / r) · B A`` to each targeted linear layer. In FedIT
(Zhang et al. 2023, "Towards Building the Federated GPT") only these adapters are trained and
exchanged; the frozen base model never leaves the device. FFA-LoRA (Sun et al., ICLR 2024,
"Improving LoRA in Privacy-preserving Federated Learning") freezes the randomly initialised ``A``
(identical on every client, from a shared seed) and trains ``B`` only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft import set_peft_model_state_dict as _set_state
from transformers import PreTrainedModel

from flwr_ext.llm.aggregation import FLORA_A, FLORA_B, lora_modules, stack_modules

DEFAULT_TARGETS = ("q_proj", "v_proj")


def parse_targets(targets: str | Sequence[str]) -> list[str]:
    """``"q_proj,v_proj"`` -> ``["q_proj", "v_proj"]`` (run configs hold strings)."""
    if isinstance(targets, str):
        return [t.strip() for t in targets.split(",") if t.strip()]
    return list(targets)


def parse_layers(layers: str | Sequence[int] | None, num_layers: int) -> list[int] | None:
    """Decoder layers to adapt: ``""`` / ``None`` = all; ``"26-29"``, ``"0,5"``; ``"last:4"``.

    Raises
    ------
    ValueError
        A malformed spec or a layer index outside ``[0, num_layers)``.
    """
    if layers is None or (isinstance(layers, str) and not layers.strip()):
        return None
    if isinstance(layers, str):
        text = layers.strip()
        out: list[int] = []
        try:
            if text.startswith("last:"):
                k = int(text[5:])
                if not 0 < k <= num_layers:
                    raise ValueError
                out = list(range(num_layers - k, num_layers))
            else:
                for part in text.split(","):
                    lo, _, hi = part.strip().partition("-")
                    out.extend(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise ValueError(
                f"lora layers must look like 'last:4', '26-29' or '0,5' "
                f"(model has {num_layers} layers), got {layers!r}"
            ) from None
    else:
        out = [int(i) for i in layers]
    bad = [i for i in out if not 0 <= i < num_layers]
    if bad or not out:
        raise ValueError(f"lora layers {bad or out} outside the model's {num_layers} layers")
    return sorted(set(out))


def apply_lora(
    model: PreTrainedModel,
    r: int = 8,
    alpha: float = 16.0,
    targets: str | Sequence[str] = DEFAULT_TARGETS,
    dropout: float = 0.0,
    ffa: bool = False,
    seed: int = 0,
    layers: str | Sequence[int] | None = None,
) -> PeftModel:
    """Wrap ``model`` with a LoRA adapter; the base weights are frozen.

    Put the base on its device first (``load_model_and_tokenizer(..., placement=...)``): PEFT
    creates the adapter on the CPU from the seeded RNG and moves it next to each base layer, so
    the initial adapter is the same on every device, and the optimizer and Opacus later see the
    tensors that actually train (moving the model after wrapping is Opacus issue 820).

    Parameters
    ----------
    r, alpha, targets, dropout
        ``LoraConfig`` rank, scaling numerator, target module names, dropout.
    ffa : bool
        FFA-LoRA: freeze ``lora_A`` so only ``lora_B`` is trained (and sent).
    seed : int
        Seed of the adapter initialisation. With the same seed every process builds the same
        ``A`` (needed by FFA-LoRA, which never transmits ``A``). The global RNG is not disturbed.
    layers : str or sequence of int, optional
        Adapt only these decoder layers (:func:`parse_layers`; PEFT ``layers_to_transform``).
        Adapting only the top layers also stops backpropagation below them, and shrinks the
        adapter, which is what DP-SGD's noise scales with (``sqrt`` of the dimension).
    """
    num_layers = int(getattr(model.config, "num_hidden_layers", 0) or 0)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=parse_targets(targets),
        lora_dropout=dropout,
        bias="none",
        task_type="CAUSAL_LM",
        layers_to_transform=parse_layers(layers, num_layers),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    if ffa:
        for name, p in peft_model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    return peft_model


def _to_state_key(param_name: str, adapter_name: str = "default") -> str:
    return param_name.replace(f".{adapter_name}.", ".")


def trainable_keys(model: PeftModel) -> set[str]:
    """Adapter state keys (PEFT naming) of the parameters that require grad."""
    return {_to_state_key(n) for n, p in model.named_parameters() if p.requires_grad}


def adapter_state(model: PeftModel, trainable_only: bool = False) -> dict[str, np.ndarray]:
    """The adapter weights as float32 NumPy arrays, keyed like ``get_peft_model_state_dict``.

    ``trainable_only=True`` keeps just what the client trained (``lora_B`` under FFA-LoRA).
    """
    state = get_peft_model_state_dict(model)
    keep = trainable_keys(model) if trainable_only else set(state)
    return {
        k: v.detach().to(torch.float32).cpu().numpy().copy() for k, v in state.items() if k in keep
    }


def load_adapter_state(model: PeftModel, state: dict[str, np.ndarray]) -> None:
    """Load (a subset of) the adapter state; unknown keys raise ``KeyError``."""
    known = set(get_peft_model_state_dict(model))
    unknown = sorted(set(state) - known)
    if unknown:
        raise KeyError(f"adapter state has keys the model does not: {unknown[:3]}...")
    ref = next(model.parameters())
    tensors = {k: torch.as_tensor(np.asarray(v)).to(ref.device) for k, v in state.items()}
    _set_state(model, tensors)


def count_params(state: dict[str, np.ndarray]) -> int:
    """Total number of scalars in a state dict."""
    return int(sum(np.asarray(v).size for v in state.values()))


def base_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    """Copies of the frozen base weights ``W0`` of every LoRA-wrapped module."""
    mods = lora_modules(adapter_state(model))
    return {m: model.get_submodule(m).base_layer.weight.detach().clone() for m in mods}


def empty_stack(model: PeftModel) -> dict[str, np.ndarray]:
    """FLoRA's round-0 stack (:mod:`flwr_ext.strategies.flora`): rank 0 for every module."""
    out = {}
    for m, w in base_weights(model).items():
        out[m + FLORA_A] = np.zeros((0, w.shape[1]), dtype=np.float32)
        out[m + FLORA_B] = np.zeros((w.shape[0], 0), dtype=np.float32)
    return out


@torch.no_grad()
def merge_stack(
    model: PeftModel, w0: Mapping[str, torch.Tensor], stack: Mapping[str, np.ndarray]
) -> None:
    """Set each wrapped module's base weight to ``W0 + flora_B @ flora_A`` (a FLoRA stack)."""
    for m in stack_modules(stack):
        if m not in w0:
            raise KeyError(f"FLoRA stack names a module the model does not wrap: {m}")
        dev = w0[m].device
        a = torch.as_tensor(np.asarray(stack[m + FLORA_A]), dtype=torch.float32, device=dev)
        b = torch.as_tensor(np.asarray(stack[m + FLORA_B]), dtype=torch.float32, device=dev)
        layer = model.get_submodule(m).base_layer
        if not torch.is_floating_point(layer.weight):
            raise TypeError(
                f"FLoRA merges the stack into the base weights, but {m} is quantized "
                f"({type(layer.weight).__name__}); use aggregation 'fedit' or 'ffa' with 4/8-bit"
            )
        delta = (b @ a).to(layer.weight.dtype) if a.shape[0] else 0.0
        layer.weight.copy_(w0[m] + delta)

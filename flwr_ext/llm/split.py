"""Split a Hugging Face causal LM into client head, server body and client tail (SFPrompt).

SFPrompt (Cao et al. 2024, "SFPrompt: Communication-Efficient Split Federated Fine-Tuning for
Large Pre-Trained Models over Resource-Limited Devices") cuts a pre-trained model in three:

- **head** (client): token embeddings, a learnable soft prompt of ``P`` virtual tokens prepended to
  the input (prompt tuning, Lester et al. 2021), and the first ``k`` decoder layers;
- **body** (server, frozen): the middle decoder layers;
- **tail** (client): the last ``m`` decoder layers, the final norm and the LM head; trainable or
  frozen by configuration.

Every segment rebuilds, from the same 2-D attention mask, exactly what ``LlamaModel.forward``
(transformers 5.x) gives its decoder layers: the causal mask from
``transformers.masking_utils.create_causal_mask`` and the rotary ``position_embeddings`` from the
model's own ``rotary_emb``. Only the hidden states and the 2-D mask cross a cut, so
``tail(body(head(x)))`` equals the monolithic model run on ``[prompt; embed(x)]``.

Position ids are ``cumsum(mask) - 1`` (clamped at 0): ``0 .. P-1`` for the virtual tokens and
``P ..`` for the real ones, for right and for left padding alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.masking_utils import create_causal_mask

from flwr_ext.llm.data import IGNORE_INDEX

TAIL_MODES = ("full", "lora", "norm", "none")
PROMPT_KEY = "prompt"
TAIL_PREFIX = "tail."


def full_attention_mask(attention_mask: torch.Tensor, num_virtual_tokens: int) -> torch.Tensor:
    """Prepend ``num_virtual_tokens`` ones (the soft prompt is always attended) to a 2-D mask."""
    ones = attention_mask.new_ones(attention_mask.shape[0], num_virtual_tokens)
    return torch.cat([ones, attention_mask], dim=1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``cumsum(mask) - 1`` clamped at 0: consecutive positions over the attended tokens."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class DecoderStack(nn.Module):
    """A contiguous run of decoder layers, fed as ``LlamaModel.forward`` feeds them.

    Parameters
    ----------
    config
        The model config (selects the attention implementation of the causal mask).
    layers : sequence of nn.Module
        The decoder layers (shared with the source model, not copied).
    rotary_emb : nn.Module
        The model's rotary embedding (parameter-free; shared by all segments).
    """

    def __init__(self, config: Any, layers: Sequence[nn.Module], rotary_emb: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(layers)
        self.rotary_emb = rotary_emb

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if len(self.layers) == 0:
            return hidden
        position_ids = position_ids_from_mask(attention_mask)
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            past_key_values=None,
            position_ids=position_ids,
        )
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.layers:
            hidden = layer(
                hidden,
                attention_mask=causal_mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                use_cache=False,
            )
        return hidden


class SoftPrompt(nn.Module):
    """``P`` learnable virtual-token embeddings, initialised from sampled vocabulary embeddings.

    Initialising from real token embeddings follows Lester et al. 2021 ("The Power of Scale for
    Parameter-Efficient Prompt Tuning"); the draw is seeded and leaves the global RNG untouched,
    so every process builds the same initial prompt.
    """

    def __init__(self, embed_tokens: nn.Embedding, num_virtual_tokens: int, seed: int = 0) -> None:
        super().__init__()
        if num_virtual_tokens < 1:
            raise ValueError("num_virtual_tokens must be >= 1")
        gen = torch.Generator().manual_seed(seed)
        vocab = embed_tokens.weight.shape[0]
        ids = torch.randint(0, vocab, (num_virtual_tokens,), generator=gen)  # CPU: same everywhere
        weight = embed_tokens.weight.detach()
        init = weight[ids.to(weight.device)].clone().float()  # on the embeddings' device
        self.weight = nn.Parameter(init)

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1)


class SplitHead(nn.Module):
    """Client head: embeddings, soft prompt, first ``k`` decoder layers."""

    def __init__(self, embed_tokens: nn.Module, prompt: SoftPrompt, stack: DecoderStack) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        self.prompt = prompt
        self.stack = stack

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.prompt.weight.shape[0])

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[prompt; embed(input_ids)]`` of shape ``(B, P + L, H)``."""
        tokens = self.embed_tokens(input_ids)
        prompt = self.prompt(input_ids.shape[0]).to(tokens.dtype)
        return torch.cat([prompt, tokens], dim=1)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the cut activations ``(B, P + L, H)`` and the full 2-D mask ``(B, P + L)``."""
        mask = full_attention_mask(attention_mask, self.num_virtual_tokens)
        return self.stack(self.embed(input_ids), mask), mask


class SplitTail(nn.Module):
    """Client tail: last ``m`` decoder layers, final norm, LM head."""

    def __init__(
        self, stack: DecoderStack, norm: nn.Module, lm_head: nn.Module, num_virtual_tokens: int
    ) -> None:
        super().__init__()
        self.stack = stack
        self.norm = norm
        self.lm_head = lm_head
        self.num_virtual_tokens = num_virtual_tokens

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits at the real-token positions ``(B, L, V)`` (virtual positions dropped)."""
        hidden = self.norm(self.stack(hidden, attention_mask))
        return self.lm_head(hidden[:, self.num_virtual_tokens :])

    def loss(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """``causal_lm_loss(self(hidden, attention_mask), labels)`` with a cheaper LM head.

        The LM head (the vocabulary projection, 28.3M of SmolLM2's weights) runs only at the
        positions whose next-token label is not ``-100`` (the short responses), instead of at
        every position; the loss is the same token-mean cross-entropy.
        """
        hidden = self.norm(self.stack(hidden, attention_mask))[:, self.num_virtual_tokens :]
        target = labels[:, 1:]
        keep = target != IGNORE_INDEX
        logits = self.lm_head(hidden[:, :-1][keep]).float()
        return nn.functional.cross_entropy(logits, target[keep])


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean next-token cross-entropy over labels ``!= -100`` (HF's shift convention)."""
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


@dataclass(frozen=True)
class SplitSizes:
    """Parameter and layer counts of a split (what the client holds, runs and trains)."""

    total_params: int
    client_params: int
    trained_params: int
    num_layers: int
    client_layers: int
    client_linear_params: int
    server_linear_params: int

    @property
    def client_layer_share(self) -> float:
        return self.client_layers / self.num_layers

    @property
    def trained_share(self) -> float:
        return self.trained_params / self.total_params

    @property
    def client_flop_share(self) -> float:
        """Share of the per-token matmul FLOPs (``2 x`` weights touched) run on the client.

        Attention-score FLOPs (quadratic in length) are left out; the LM head counts for the
        client, which is why this share exceeds the layer share on large-vocabulary models.
        """
        total = self.client_linear_params + self.server_linear_params
        return self.client_linear_params / total


class SplitModel(nn.Module):
    """A causal LM split into :class:`SplitHead`, body :class:`DecoderStack` and :class:`SplitTail`.

    Built by :func:`split_causal_lm`; the segments share their weights with the source model.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        head: SplitHead,
        body: DecoderStack,
        tail: SplitTail,
        tail_mode: str,
    ) -> None:
        super().__init__()
        self.model = model
        self.head = head
        self.body = body
        self.tail = tail
        self.tail_mode = tail_mode

    @property
    def num_virtual_tokens(self) -> int:
        return self.head.num_virtual_tokens

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Head, body, tail: logits ``(B, L, V)`` at the real-token positions."""
        hidden, mask = self.head(input_ids, attention_mask)
        return self.tail(self.body(hidden, mask), mask)

    def local_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Head then tail, skipping the body: SFPrompt's local-loss path (no server)."""
        hidden, mask = self.head(input_ids, attention_mask)
        return self.tail(hidden, mask)

    def local_loss(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """The loss of :meth:`local_forward` (:meth:`SplitTail.loss`: LM head on labelled rows)."""
        hidden, mask = self.head(input_ids, attention_mask)
        return self.tail.loss(hidden, mask, labels)

    # -- the client's trainable state (what is trained, averaged and exchanged) ----------------
    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``("prompt", ...)`` then ``("tail.<name>", ...)`` for every trainable tail parameter."""
        out = [(PROMPT_KEY, self.head.prompt.weight)]
        for name, p in self.tail.named_parameters():
            if p.requires_grad:
                out.append((TAIL_PREFIX + name, p))
        return out

    def prompt_parameters(self) -> list[nn.Parameter]:
        return [self.head.prompt.weight]

    def tail_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.trainable_named_parameters() if n != PROMPT_KEY]

    def trainable_state(self) -> dict[str, np.ndarray]:
        """The soft prompt and the trainable tail as float32 NumPy arrays."""
        return {
            n: p.detach().float().cpu().numpy().copy() for n, p in self.trainable_named_parameters()
        }

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, np.ndarray]) -> None:
        """Load the prompt and tail; keys must match :meth:`trainable_state` exactly."""
        params = dict(self.trainable_named_parameters())
        if set(state) != set(params):
            missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
            raise KeyError(f"trainable state mismatch: missing {missing[:3]}, extra {extra[:3]}")
        for name, value in state.items():
            params[name].copy_(torch.as_tensor(np.asarray(value)).to(params[name]))

    def sizes(self) -> SplitSizes:
        """Counts for the accounting table (embedding lookups count as held, not as FLOPs)."""
        unique = {id(p): p for p in self.model.parameters()}
        total = sum(p.numel() for p in unique.values()) + self.head.prompt.weight.numel()
        client_mods: list[nn.Module] = [self.head, self.tail]
        client = {id(p): p for m in client_mods for p in m.parameters()}
        trained = sum(p.numel() for _, p in self.trainable_named_parameters())

        def linear(mods: Iterable[nn.Module]) -> int:
            seen: dict[int, nn.Parameter] = {}
            for m in mods:
                for sub in m.modules():
                    if isinstance(sub, nn.Linear):
                        seen[id(sub.weight)] = sub.weight
            return sum(p.numel() for p in seen.values())

        n_layers = len(self.head.stack.layers) + len(self.body.layers) + len(self.tail.stack.layers)
        return SplitSizes(
            total_params=total,
            client_params=sum(p.numel() for p in client.values()),
            trained_params=trained,
            num_layers=n_layers,
            client_layers=len(self.head.stack.layers) + len(self.tail.stack.layers),
            client_linear_params=linear([self.head.stack, self.tail]),
            server_linear_params=linear([self.body]),
        )


def _decoder(model: PreTrainedModel) -> nn.Module:
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, a) for a in needed):
        raise TypeError(
            f"{type(model).__name__} is not a Llama-family causal LM (needs model.model with "
            f"{', '.join(needed)} and lm_head)"
        )
    return inner


def split_causal_lm(
    model: PreTrainedModel,
    head_layers: int = 1,
    tail_layers: int = 1,
    num_virtual_tokens: int = 8,
    tail_mode: str = "full",
    lora_r: int = 4,
    lora_alpha: float = 8.0,
    lora_targets: Sequence[str] = ("q_proj", "v_proj"),
    seed: int = 0,
) -> SplitModel:
    """Split a Llama-family causal LM for SFPrompt (Cao et al. 2024).

    Parameters
    ----------
    model : PreTrainedModel
        ``LlamaForCausalLM`` or a model with the same layout (SmolLM2, Mistral, Qwen2...). All its
        weights are frozen; the segments share them (nothing is copied).
    head_layers, tail_layers : int
        ``k`` decoder layers in the head and ``m`` in the tail (``k >= 0``, ``m >= 0``, at least
        one layer left for the body).
    num_virtual_tokens : int
        ``P``, the length of the soft prompt.
    tail_mode : {"full", "lora", "norm", "none"}
        What the client trains in the tail besides the prompt: every tail-layer weight and the
        final norm (``"full"``), LoRA adapters on ``lora_targets`` of the tail layers (``"lora"``,
        Hu et al. 2022, injected with PEFT), the RMSNorm gains of the tail (``"norm"``), or
        nothing (``"none"``). The LM head is never trained: it is the vocabulary projection (21% of
        SmolLM2's weights) and is tied to the input embeddings in SmolLM2.
    seed : int
        Seed of the soft-prompt (and LoRA) initialisation.
    """
    if tail_mode not in TAIL_MODES:
        raise ValueError(f"tail_mode must be one of {TAIL_MODES}, got {tail_mode!r}")
    dec = _decoder(model)
    layers = list(dec.layers[: model.config.num_hidden_layers])
    n = len(layers)
    if head_layers < 0 or tail_layers < 0 or head_layers + tail_layers >= n:
        raise ValueError(
            f"head_layers={head_layers} + tail_layers={tail_layers} must leave the body at least "
            f"one of the model's {n} layers"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    rope = dec.rotary_emb
    head = SplitHead(
        dec.embed_tokens,
        SoftPrompt(dec.embed_tokens, num_virtual_tokens, seed),
        DecoderStack(model.config, layers[:head_layers], rope),
    )
    body = DecoderStack(model.config, layers[head_layers : n - tail_layers], rope)
    tail_stack = DecoderStack(model.config, layers[n - tail_layers :], rope)
    if tail_mode == "lora" and tail_layers > 0:
        from peft import LoraConfig, inject_adapter_in_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            cfg = LoraConfig(r=lora_r, lora_alpha=lora_alpha, target_modules=list(lora_targets))
            inject_adapter_in_model(cfg, tail_stack)
    tail = SplitTail(tail_stack, dec.norm, model.lm_head, num_virtual_tokens)
    if tail_mode == "full":
        for p in [*tail_stack.parameters(), *dec.norm.parameters()]:
            p.requires_grad_(True)
    elif tail_mode == "norm":
        for mod in [*tail_stack.modules(), dec.norm]:
            if "RMSNorm" in type(mod).__name__ or isinstance(mod, nn.LayerNorm):
                for p in mod.parameters(recurse=False):
                    p.requires_grad_(True)
    elif tail_mode == "lora":
        for name, p in tail_stack.named_parameters():
            p.requires_grad_("lora_" in name)
    if getattr(model.config, "tie_word_embeddings", False):
        model.lm_head.weight.requires_grad_(False)
    return SplitModel(model, head, body, tail, tail_mode)


class PromptedLM(nn.Module):
    """The split model as a monolithic LM for :func:`flwr_ext.llm.evaluate.evaluate_model`.

    ``forward(input_ids, attention_mask).logits`` runs head, body and tail. ``generate`` is greedy
    decoding of the source model on ``[prompt; embed(input_ids)]`` with a KV cache and the LM
    head on the last position only; positions are ``cumsum(mask) - 1`` as in the split, so each
    new token is the argmax of the split model on the prefix.
    """

    def __init__(self, split: SplitModel) -> None:
        super().__init__()
        self.split = split

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any
    ) -> SimpleNamespace:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return SimpleNamespace(logits=self.split(input_ids, attention_mask))

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 16,
        pad_token_id: int | None = None,
        eos_token_id: int | None = None,
        do_sample: bool = False,
        **_: Any,
    ) -> torch.Tensor:
        """``input_ids`` followed by up to ``max_new_tokens`` greedy tokens (``pad`` once done)."""
        if do_sample:
            raise NotImplementedError("PromptedLM.generate is greedy only")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pad = pad_token_id if pad_token_id is not None else (eos_token_id or 0)
        model = self.split.model
        mask = full_attention_mask(attention_mask, self.split.num_virtual_tokens)
        pos = position_ids_from_mask(mask)
        out = model(
            inputs_embeds=self.split.head.embed(input_ids),
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=1,
        )
        ids = input_ids
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for step in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if eos_token_id is not None:
                done |= nxt == eos_token_id
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            pos = pos[:, -1:] + 1
            out = model(
                input_ids=nxt[:, None],
                attention_mask=mask,
                position_ids=pos,
                past_key_values=out.past_key_values,
                use_cache=True,
                logits_to_keep=1,
            )
        return ids


def layer_budget(num_layers: int, share: float = 0.1) -> int:
    """How many decoder layers fit in ``share`` of ``num_layers`` (floor, at least 0)."""
    return max(0, math.floor(share * num_layers + 1e-9))

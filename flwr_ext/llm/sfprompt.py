"""SFPrompt over Flower messages: the client side of the split-learning protocol.

SFPrompt (Cao et al. 2024, "SFPrompt: Communication-Efficient Split Federated Fine-Tuning for
Large Pre-Trained Models over Resource-Limited Devices") trains a soft prompt (and the tail) of a
model split by :func:`~flwr_ext.llm.split.split_causal_lm`. One round for one client:

1. ``train.start`` (server -> client: global prompt and tail): the client loads them, prunes its
   data with EL2N once its warm-up is over (:mod:`flwr_ext.llm.sfprompt_prune`), and runs the
   **local-loss** phase: steps on the head -> tail path alone, no server.
2. Per split step:

   - ``train.forward``: the client runs the head on a batch and sends the cut activations and the
     2-D attention mask (``acts`` record). Labels and inputs stay on the client.
   - ``train.tail`` (server -> client: the body's output): the client runs the tail and the loss,
     updates the tail, and sends the gradient at the body output (``grad`` record). The loss is
     kept in ``context.state``, never sent.
   - ``train.backward`` (server -> client: the gradient at the cut): the client back-propagates
     it through the head and updates the prompt.
3. ``train.finish``: the client sends its prompt and tail and ``num-examples`` (kept after
   pruning) for sample-weighted averaging.

Everything the client must remember between messages (weights, Adam moments, the pending batch,
the kept indices, its own loss history) lives in ``context.state``, so a deployment that starts a
fresh ClientApp process per message works; the model itself is cached per process. The client
computes on its split model's device (put the model there before ``split_causal_lm``); what it
stores and sends is float32 NumPy, so CPU and GPU clients interoperate.
The server side is :mod:`flwr_ext.llm.sfprompt_server`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from flwr_ext.llm.data import ResponseOnlyCollator
from flwr_ext.llm.sfprompt_prune import el2n_scores, top_gamma
from flwr_ext.llm.split import TAIL_PREFIX, SplitModel, full_attention_mask
from flwr_ext.llm.train import model_device, to_device

# message types (``@app.train("forward")`` receives ``train.forward``)
START, FORWARD, TAIL, BACKWARD, FINISH = (
    "train.start",
    "train.forward",
    "train.tail",
    "train.backward",
    "train.finish",
)
# record names
PARAMS, CONFIG, METRICS, ACTS, BODY, GRAD = "arrays", "config", "metrics", "acts", "body", "grad"
# context.state record names
_S_PARAMS, _S_OPT, _S_META = "sfp.params", "sfp.opt", "sfp.meta"


@dataclass
class Adam:
    """Adam (Kingma & Ba 2015) whose moments live in NumPy arrays (``context.state``-friendly).

    ``tail_lr`` (if set) is the step size of the tail's parameters (``tail.*``) and ``lr`` that of
    the prompt: a soft prompt wants a far larger step than LoRA adapters (Lester et al. 2021 use
    0.3; LoRA is typically trained at 1e-4..3e-3).
    """

    lr: float
    tail_lr: float | None = None
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    @torch.no_grad()
    def step(
        self,
        named: Sequence[tuple[str, torch.nn.Parameter]],
        moments: dict[str, np.ndarray],
        steps: dict[str, int],
    ) -> None:
        """Update every parameter that has a gradient; ``moments`` and ``steps`` in place."""
        for name, p in named:
            if p.grad is None:
                continue
            g = p.grad.detach().float()
            t = steps.get(name, 0) + 1
            zeros = np.zeros(p.shape, np.float32)
            m = torch.as_tensor(moments.get(f"m.{name}", zeros)).to(g.device)
            v = torch.as_tensor(moments.get(f"v.{name}", zeros)).to(g.device)
            m = self.beta1 * m + (1 - self.beta1) * g
            v = self.beta2 * v + (1 - self.beta2) * g * g
            m_hat = m / (1 - self.beta1**t)
            v_hat = v / (1 - self.beta2**t)
            lr = (
                self.lr
                if self.tail_lr is None or not name.startswith(TAIL_PREFIX)
                else self.tail_lr
            )
            p.add_((-lr * m_hat / (v_hat.sqrt() + self.eps)).to(p.dtype))
            moments[f"m.{name}"], moments[f"v.{name}"] = m.cpu().numpy(), v.cpu().numpy()
            steps[name] = t
            p.grad = None


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


class SFPromptClient:
    """The client's handlers for one split model and one local dataset.

    Parameters
    ----------
    split : SplitModel
        The client's split model (its body is never run here).
    examples
        The client's tokenized training examples (with response-only labels).
    pad_token_id : int
        Padding id for the collator.
    batch_size : int
        Batch size of split and local-loss steps.
    seed : int
        Seed of batch sampling (combined with round, step and ``partition_id``).
    partition_id : int
        This client's partition, for the batch-sampling seed.
    """

    def __init__(
        self,
        split: SplitModel,
        examples: Sequence[dict[str, list[int]]],
        pad_token_id: int,
        batch_size: int,
        seed: int = 0,
        partition_id: int = 0,
    ) -> None:
        if not examples:
            raise ValueError("client has no training examples")
        self.split = split
        self.examples = list(examples)
        self.collate = ResponseOnlyCollator(pad_token_id)
        self.pad_token_id = pad_token_id
        self.batch_size = batch_size
        self.seed = seed
        self.partition_id = partition_id

    # -- state ---------------------------------------------------------------------------------
    def _meta(self, context: Context) -> ConfigRecord:
        if _S_META not in context.state:
            context.state[_S_META] = ConfigRecord()
        return context.state[_S_META]

    def _load(self, context: Context) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        self.split.load_trainable_state(from_record(context.state[_S_PARAMS]))
        opt = context.state.get(_S_OPT, ArrayRecord())
        moments = from_record(opt) if len(opt) else {}
        meta = self._meta(context)
        steps = dict(zip(meta.get("opt-names", []), meta.get("opt-steps", []), strict=True))
        return moments, steps

    def _save(
        self, context: Context, moments: dict[str, np.ndarray], steps: dict[str, int]
    ) -> None:
        context.state[_S_PARAMS] = to_record(self.split.trainable_state())
        context.state[_S_OPT] = to_record(moments)
        meta = self._meta(context)
        meta["opt-names"] = list(steps)
        meta["opt-steps"] = [int(v) for v in steps.values()]

    @staticmethod
    def _adam(meta: ConfigRecord) -> Adam:
        return Adam(float(meta["lr"]), float(meta.get("tail-lr", 0.0)) or None)

    def _kept(self, context: Context) -> list[int]:
        meta = self._meta(context)
        kept = meta.get("kept", None)
        return list(kept) if kept is not None else list(range(len(self.examples)))

    def _sample(self, kept: Sequence[int], rnd: int, step: int, salt: int = 0) -> list[int]:
        """Batch ``step`` of a seeded epoch-wise shuffle of ``kept`` (a new shuffle per pass)."""
        per_epoch = max(1, -(-len(kept) // self.batch_size))
        epoch, pos = divmod(step, per_epoch)
        seed = (self.seed * 1_000_003 + rnd * 10_007 + epoch * 101 + salt) * 31
        order = np.random.default_rng(seed + self.partition_id).permutation(np.asarray(kept))
        return [int(i) for i in order[pos * self.batch_size : (pos + 1) * self.batch_size]]

    @property
    def device(self) -> torch.device:
        return model_device(self.split)

    def _batch(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        """The examples ``idx`` collated and moved to the split model's device."""
        return to_device(self.collate([self.examples[i] for i in idx]), self.device)

    def _local_logits(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``local_forward`` on the model's device, logits back on the CPU (EL2N scoring)."""
        dev = self.device
        return self.split.local_forward(input_ids.to(dev), mask.to(dev)).float().cpu()

    # -- handlers ------------------------------------------------------------------------------
    def start(self, msg: Message, context: Context) -> Message:
        """Load the global prompt/tail, prune once after warm-up, run the local-loss phase."""
        t0 = time.process_time()
        cfg = msg.content[CONFIG]
        rnd = int(cfg["server-round"])
        self.split.load_trainable_state(from_record(msg.content[PARAMS]))
        meta = self._meta(context)
        pruned_now = 0
        gamma = float(cfg.get("prune-gamma", 1.0))
        if gamma < 1.0 and bool(cfg.get("prune", False)) and "kept" not in meta:
            scores = el2n_scores(self._local_logits, self.examples, self.pad_token_id)
            meta["kept"] = [int(i) for i in top_gamma(scores, gamma)]
            meta["pruned-round"] = rnd
            pruned_now = 1
        moments: dict[str, np.ndarray] = {}
        steps: dict[str, int] = {}
        tail_lr = float(cfg.get("tail-lr", 0.0)) or None
        adam = Adam(float(cfg["lr"]), tail_lr)
        kept = self._kept(context)
        losses = list(meta.get("local-losses", []))
        named = self.split.trainable_named_parameters()
        for s in range(int(cfg.get("local-steps", 0))):
            batch = self._batch(self._sample(kept, rnd, s, salt=7))
            loss = self.split.local_loss(
                batch["input_ids"], batch["attention_mask"], batch["labels"]
            )
            loss.backward()
            adam.step(named, moments, steps)
            losses.append(float(loss.detach()))
        if losses:
            meta["local-losses"] = losses
        meta["round"] = rnd
        meta["lr"] = float(cfg["lr"])
        meta["tail-lr"] = tail_lr or 0.0
        meta["compute-s"] = time.process_time() - t0
        self._save(context, moments, steps)
        metrics = {
            "num-examples": len(kept),
            "batch-size": self.batch_size,
            "pruned-now": pruned_now,
        }
        return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)

    @torch.no_grad()
    def forward(self, msg: Message, context: Context) -> Message:
        """Run the head on a fresh batch; send the cut activations and the attention mask."""
        t0 = time.process_time()
        cfg = msg.content[CONFIG]
        rnd, step = int(cfg["server-round"]), int(cfg["step"])
        self._load(context)
        meta = self._meta(context)
        idx = self._sample(self._kept(context), rnd, step)
        meta["batch"] = idx
        batch = self._batch(idx)
        hidden, mask = self.split.head(batch["input_ids"], batch["attention_mask"])
        acts = to_record(
            {"hidden": hidden.float().cpu().numpy(), "mask": mask.cpu().numpy().astype(np.int8)}
        )
        meta["compute-s"] = float(meta.get("compute-s", 0.0)) + time.process_time() - t0
        return Message(RecordDict({ACTS: acts}), reply_to=msg)

    def tail(self, msg: Message, context: Context) -> Message:
        """Tail + loss on the body output; update the tail; send the gradient at the body output."""
        t0 = time.process_time()
        moments, steps = self._load(context)
        meta = self._meta(context)
        batch = self._batch(list(meta["batch"]))
        dtype = self.split.head.embed_tokens.weight.dtype
        body_out = torch.tensor(
            msg.content[BODY]["hidden"].numpy(), dtype=dtype, device=self.device, requires_grad=True
        )
        mask = full_attention_mask(batch["attention_mask"], self.split.num_virtual_tokens)
        loss = self.split.tail.loss(body_out, mask, batch["labels"])
        loss.backward()
        self._adam(meta).step(self.split.trainable_named_parameters(), moments, steps)
        meta["losses"] = [*meta.get("losses", []), float(loss.detach())]
        self._save(context, moments, steps)
        grad = to_record({"grad": body_out.grad.float().cpu().numpy()})
        meta["compute-s"] = float(meta.get("compute-s", 0.0)) + time.process_time() - t0
        return Message(RecordDict({GRAD: grad}), reply_to=msg)

    def backward(self, msg: Message, context: Context) -> Message:
        """Back-propagate the gradient at the cut through the head; update the prompt."""
        t0 = time.process_time()
        moments, steps = self._load(context)
        meta = self._meta(context)
        batch = self._batch(list(meta["batch"]))
        hidden, _ = self.split.head(batch["input_ids"], batch["attention_mask"])
        cut_grad = torch.as_tensor(msg.content[GRAD]["grad"].numpy())
        hidden.backward(cut_grad.to(hidden.device, hidden.dtype))
        self._adam(meta).step(self.split.trainable_named_parameters(), moments, steps)
        self._save(context, moments, steps)
        meta["compute-s"] = float(meta.get("compute-s", 0.0)) + time.process_time() - t0
        metrics = MetricRecord({"step": int(msg.content[CONFIG]["step"])})
        return Message(RecordDict({METRICS: metrics}), reply_to=msg)

    def finish(self, msg: Message, context: Context) -> Message:
        """Send the prompt and tail with ``num-examples`` and the client's compute seconds."""
        meta = self._meta(context)
        metrics = {
            "num-examples": len(self._kept(context)),
            "client-compute-s": float(meta.get("compute-s", 0.0)),
        }
        content = RecordDict({PARAMS: context.state[_S_PARAMS], METRICS: MetricRecord(metrics)})
        return Message(content, reply_to=msg)

    def local_losses(self, context: Context) -> tuple[list[float], list[float]]:
        """The client's own loss history: ``(split-step losses, local-loss-phase losses)``."""
        meta = self._meta(context)
        return list(meta.get("losses", [])), list(meta.get("local-losses", []))

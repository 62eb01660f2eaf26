"""SFPrompt over Flower messages: the server side (body, timeouts, averaging, accounting).

The server of SFPrompt (Cao et al. 2024, "SFPrompt: Communication-Efficient Split Federated
Fine-Tuning for Large Pre-Trained Models over Resource-Limited Devices") holds the frozen body. It
drives each round on Flower's :class:`~flwr.serverapp.Grid` with ``push_messages`` /
``pull_messages``; every exchange has its own timeout. A client that fails or does not answer in
time (for example one that drops between the forward and the backward exchange) is logged and
leaves the round, whose other clients go on; only the clients that finish are averaged
(sample-weighted by their kept examples, FedAvg of McMahan et al. 2017). The message sequence
is described in :mod:`flwr_ext.llm.sfprompt`.

Every array payload is counted with ``ArrayRecord.count_bytes()`` on what is actually sent, per
direction and kind (parameters, activations, gradients).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from flwr_ext.llm.aggregation import fedavg_states
from flwr_ext.llm.sfprompt import (
    ACTS,
    BACKWARD,
    BODY,
    CONFIG,
    FINISH,
    FORWARD,
    GRAD,
    METRICS,
    PARAMS,
    START,
    TAIL,
    from_record,
    to_record,
)
from flwr_ext.llm.split import SplitModel

BYTE_KEYS = (
    "params-down",
    "params-up",
    "acts-up",
    "acts-down",
    "grads-up",
    "grads-down",
)


def exchange(
    grid: Grid,
    messages: dict[int, Message],
    timeout: float,
    poll_interval: float = 0.01,
) -> tuple[dict[int, Message], dict[int, str], dict[int, str]]:
    """Push one message per node and pull the replies until all arrive or ``timeout`` passes.

    Returns
    -------
    replies : dict
        ``node_id -> reply`` for the nodes that answered without error.
    failures : dict
        ``node_id -> reason`` (``"timeout"`` or the error reason) for the others.
    unanswered : dict
        ``node_id -> message_id`` of the messages still without a reply (timed out).
    """
    if not messages:
        return {}, {}, {}
    ids = list(grid.push_messages(list(messages.values())))
    node_of = dict(zip(ids, messages, strict=True))
    pending = set(ids)
    got: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending:
        res = list(grid.pull_messages(list(pending)))
        got.extend(res)
        pending -= {m.metadata.reply_to_message_id for m in res}
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll_interval)
    replies: dict[int, Message] = {}
    failures: dict[int, str] = {}
    for m in got:
        node = int(m.metadata.src_node_id)
        if m.has_error():
            failures[node] = f"error {m.error.code}: {m.error.reason}"
        else:
            replies[node] = m
    unanswered = {node_of[mid]: mid for mid in pending}
    for node in messages:
        if node not in replies and node not in failures:
            failures[node] = "timeout"
    return replies, failures, unanswered


@dataclass
class RoundReport:
    """What one round did: nodes, drops, bytes per kind, compute time on each side."""

    server_round: int
    nodes: list[int]
    finished: list[int] = field(default_factory=list)
    dropped: dict[int, str] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BYTE_KEYS, 0))
    server_body_s: float = 0.0
    client_compute_s: float = 0.0
    num_examples: int = 0
    seconds: float = 0.0

    def as_metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "round": self.server_round,
            "nodes": len(self.nodes),
            "finished": len(self.finished),
            "dropped": len(self.dropped),
            "num-examples": self.num_examples,
            "server-body-s": self.server_body_s,
            "client-compute-s": self.client_compute_s,
            "round-s": self.seconds,
        }
        out.update({f"bytes-{k}": v for k, v in self.bytes.items()})
        out["bytes-total"] = sum(self.bytes.values())
        out["bytes-up"] = sum(v for k, v in self.bytes.items() if k.endswith("-up"))
        out["bytes-down"] = sum(v for k, v in self.bytes.items() if k.endswith("-down"))
        if self.nodes:
            out["bytes-per-client"] = out["bytes-total"] / len(self.nodes)
        total_s = self.server_body_s + self.client_compute_s
        out["client-compute-share"] = self.client_compute_s / total_s if total_s > 0 else 0.0
        return out


class SFPromptServer:
    """Run SFPrompt rounds on a Grid with the frozen body of ``split``.

    Parameters
    ----------
    split : SplitModel
        The server's split model; only its body is run during training.
    split_steps : int
        Split (head -> body -> tail) steps per client per round.
    split_epochs : float
        If > 0, overrides ``split_steps``: each client does ``ceil(split_epochs * kept / batch)``
        split steps, so EL2N pruning cuts the traffic of a round (SFPrompt trains by epochs).
    local_steps : int
        Local-loss steps (head -> tail, no server) per client per round; 0 disables the phase.
    lr : float or callable
        Client learning rate, or ``f(server_round) -> lr``.
    tail_lr : float or callable, optional
        Learning rate of the tail's trainable parameters if it differs from the prompt's
        (``None``: ``lr`` for both).
    timeout : float
        Seconds to wait for the replies of one exchange.
    start_timeout : float, optional
        Timeout of the ``train.start`` exchange, which includes the clients' model loading on
        their first message and the local-loss phase (default: ``timeout``).
    prune_gamma : float
        Fraction of its data each client keeps after EL2N pruning (1.0: no pruning).
    prune_warmup_rounds : int
        Rounds trained on all data before the clients prune (at the start of the next round).
    min_nodes : int
        Nodes to wait for before a round starts.
    evaluate_fn : callable, optional
        ``f(server_round, trainable_state) -> dict`` run on the averaged state (round 0: initial).
    """

    def __init__(
        self,
        split: SplitModel,
        split_steps: int,
        split_epochs: float = 0.0,
        local_steps: int = 0,
        lr: float | Callable[[int], float] = 1e-2,
        tail_lr: float | Callable[[int], float] | None = None,
        timeout: float = 60.0,
        start_timeout: float | None = None,
        prune_gamma: float = 1.0,
        prune_warmup_rounds: int = 1,
        min_nodes: int = 2,
        evaluate_fn: Callable[[int, dict[str, np.ndarray]], dict[str, Any]] | None = None,
        poll_interval: float = 0.01,
        node_wait: float = 120.0,
    ) -> None:
        self.split = split
        self.split_steps = split_steps
        self.split_epochs = split_epochs
        self.local_steps = local_steps
        self.lr = lr
        self.tail_lr = tail_lr
        self.timeout = timeout
        self.start_timeout = timeout if start_timeout is None else start_timeout
        self.prune_gamma = prune_gamma
        self.prune_warmup_rounds = prune_warmup_rounds
        self.min_nodes = min_nodes
        self.evaluate_fn = evaluate_fn
        self.poll_interval = poll_interval
        self.node_wait = node_wait
        self.state = split.trainable_state()
        self._stale: dict[int, str] = {}

    @staticmethod
    def _at(rate: float | Callable[[int], float], rnd: int) -> float:
        """A learning rate given as a constant or as ``f(server_round)``, in round ``rnd``."""
        return float(rate(rnd)) if callable(rate) else float(rate)

    def _lr(self, rnd: int) -> float:
        return self._at(self.lr, rnd)

    def _tail_lr(self, rnd: int) -> float:
        """The tail's learning rate in ``rnd`` (0.0: the prompt's)."""
        return 0.0 if self.tail_lr is None else self._at(self.tail_lr, rnd)

    def _num_steps(self, start_metrics: Any) -> int:
        """Split steps of one client this round: fixed, or epochs over its kept examples."""
        if self.split_epochs <= 0:
            return self.split_steps
        n, b = int(start_metrics["num-examples"]), int(start_metrics["batch-size"])
        return max(1, math.ceil(self.split_epochs * n / b))

    def _nodes(self, grid: Grid) -> list[int]:
        deadline = time.monotonic() + self.node_wait
        while True:
            nodes = sorted(int(n) for n in grid.get_node_ids())
            if len(nodes) >= self.min_nodes or time.monotonic() > deadline:
                return nodes
            time.sleep(0.1)

    def _settle_stale(self, grid: Grid, nodes: list[int], server_round: int) -> list[int]:
        """Wait up to ``timeout`` for the late replies of timed-out messages; skip busy nodes.

        A node still working on a timed-out message must not get the next round's messages: its
        late handler would write its (stale) ``context.state`` back after the new round's
        handlers ran (the Simulation Engine runs a node's messages in parallel). The late
        replies are discarded.
        """
        waiting = {n: mid for n, mid in self._stale.items() if n in nodes}
        deadline = time.monotonic() + self.timeout
        while waiting:
            for m in grid.pull_messages(list(waiting.values())):
                node = int(m.metadata.src_node_id)
                waiting.pop(node, None)
                self._stale.pop(node, None)
            if not waiting or time.monotonic() >= deadline:
                break
            time.sleep(self.poll_interval)
        for node in waiting:
            log(
                WARNING,
                "SFPrompt round %d: node %d is still busy with a timed-out message; skipped",
                server_round,
                node,
            )
        return [n for n in nodes if n not in waiting]

    def _send(
        self,
        grid: Grid,
        rep: RoundReport,
        name: str,
        contents: dict[int, RecordDict],
        down_key: str | None = None,
        down_record: str | None = None,
        timeout: float | None = None,
    ) -> dict[int, Message]:
        msgs = {
            n: Message(c, dst_node_id=n, message_type=name, group_id=str(rep.server_round))
            for n, c in contents.items()
        }
        if down_key is not None and down_record is not None:
            rep.bytes[down_key] += sum(c[down_record].count_bytes() for c in contents.values())
        timeout = self.timeout if timeout is None else timeout
        replies, failures, unanswered = exchange(grid, msgs, timeout, self.poll_interval)
        self._stale.update(unanswered)
        for node, why in failures.items():
            rep.dropped[node] = f"{name}: {why}"
            log(
                WARNING,
                "SFPrompt round %d: node %d dropped at %s (%s); the round goes on without it",
                rep.server_round,
                node,
                name,
                why,
            )
        return replies

    def run_round(self, grid: Grid, server_round: int) -> RoundReport:
        """One SFPrompt round over all available nodes; updates ``self.state``."""
        t0 = time.monotonic()
        nodes = self._settle_stale(grid, self._nodes(grid), server_round)
        rep = RoundReport(server_round, nodes)
        params = to_record(self.state)
        prune = self.prune_gamma < 1.0 and server_round > self.prune_warmup_rounds
        cfg = ConfigRecord(
            {
                "server-round": server_round,
                "lr": self._lr(server_round),
                "tail-lr": self._tail_lr(server_round),
                "local-steps": self.local_steps,
                "prune": prune,
                "prune-gamma": float(self.prune_gamma),
            }
        )
        start = {n: RecordDict({PARAMS: params, CONFIG: cfg}) for n in nodes}
        started = self._send(
            grid, rep, START, start, "params-down", PARAMS, timeout=self.start_timeout
        )
        active = sorted(started)
        steps = {n: self._num_steps(r.content[METRICS]) for n, r in started.items()}
        step = 0
        while stepping := [n for n in active if steps[n] > step]:
            step_cfg = ConfigRecord({"server-round": server_round, "step": step})
            requests = {n: RecordDict({CONFIG: step_cfg}) for n in stepping}
            fwd = self._send(grid, rep, FORWARD, requests)
            graphs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            body_out: dict[int, RecordDict] = {}
            tb = time.process_time()
            for node, reply in fwd.items():
                acts = reply.content[ACTS]
                rep.bytes["acts-up"] += acts.count_bytes()
                cut = torch.tensor(acts["hidden"].numpy(), requires_grad=True)
                mask = torch.as_tensor(acts["mask"].numpy()).long()
                out = self.split.body(cut, mask)
                graphs[node] = (cut, out)
                body_out[node] = RecordDict(
                    {BODY: to_record({"hidden": out.detach().numpy()}), CONFIG: step_cfg}
                )
            rep.server_body_s += time.process_time() - tb
            grads = self._send(grid, rep, TAIL, body_out, "acts-down", BODY)
            tb = time.process_time()
            cut_grads: dict[int, RecordDict] = {}
            for node, reply in grads.items():
                g = reply.content[GRAD]
                rep.bytes["grads-up"] += g.count_bytes()
                cut, out = graphs.pop(node)
                out.backward(torch.as_tensor(g["grad"].numpy()))
                cut_grads[node] = RecordDict(
                    {GRAD: to_record({"grad": cut.grad.numpy()}), CONFIG: step_cfg}
                )
            graphs.clear()
            rep.server_body_s += time.process_time() - tb
            acks = self._send(grid, rep, BACKWARD, cut_grads, "grads-down", GRAD)
            active = [n for n in active if n not in stepping or n in acks]
            step += 1
        fin_cfg = ConfigRecord({"server-round": server_round})
        done = self._send(grid, rep, FINISH, {n: RecordDict({CONFIG: fin_cfg}) for n in active})
        states, weights = [], []
        for node, reply in sorted(done.items()):
            rep.bytes["params-up"] += reply.content[PARAMS].count_bytes()
            m = reply.content[METRICS]
            states.append(from_record(reply.content[PARAMS]))
            weights.append(float(m["num-examples"]))
            rep.client_compute_s += float(m.get("client-compute-s", 0.0))
            rep.finished.append(node)
        rep.num_examples = int(sum(weights))
        if states:
            self.state = fedavg_states(states, weights)
        else:
            log(WARNING, "SFPrompt round %d: no client finished; state unchanged", server_round)
        rep.seconds = time.monotonic() - t0
        return rep

    def run(self, grid: Grid, num_rounds: int) -> list[dict[str, Any]]:
        """Evaluate the initial state, then ``num_rounds`` rounds; one metrics row per round."""
        history: list[dict[str, Any]] = []
        if self.evaluate_fn is not None:
            history.append({"round": 0, **self.evaluate_fn(0, self.state)})
        for rnd in range(1, num_rounds + 1):
            rep = self.run_round(grid, rnd)
            row = rep.as_metrics()
            row["dropped-nodes"] = {str(k): v for k, v in rep.dropped.items()}
            if self.evaluate_fn is not None:
                row.update(self.evaluate_fn(rnd, self.state))
            log(
                INFO,
                "SFPrompt round %d: %d/%d clients finished, %s bytes (%.0f per client), "
                "eval-loss %s",
                rnd,
                len(rep.finished),
                len(rep.nodes),
                row["bytes-total"],
                row.get("bytes-per-client", 0.0),
                f"{row['eval-loss']:.4f}" if "eval-loss" in row else "-",
            )
            history.append(row)
        return history

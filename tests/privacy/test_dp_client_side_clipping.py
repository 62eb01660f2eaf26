"""Defect 1 of issue 14: compression after Flower's client-side fixed clipping.

With ``DifferentialPrivacyClientSideFixedClipping`` the server adds noise sized for the clipping
norm C and does not clip again, so whatever it decodes must have L2 norm <= C. Error feedback
(top-k of clipped update + residual) and stochastic rounding (QSGD) send more than C unless the
compression mod clips what it actually sends.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.task_identity import TaskIdentity

from flwr_ext.compression import compression_mod
from flwr_ext.compression.codec import decode_tensor
from flwr_ext.compression.hints import DECODER_KEY
from flwr_ext.compression.server import decode_arrays
from flwr_ext.privacy import DPCompressionError, check_dp_compression

C = 1.0
ROUNDS = 20
SHAPES = {"lora_A.weight": (40, 64), "lora_B.weight": (64, 40), "bias": (64,)}


@pytest.fixture(autouse=True)
def _task_identity():
    """Messages built outside a Flower runtime need a task identity; restore it after."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _trainer(direction: dict[str, np.ndarray], rng: np.random.Generator):
    """A ClientApp whose update points the same way every round (norm ~3, clipped to C)."""

    def call_next(msg: Message, ctx: Context) -> Message:
        arrays = msg.content["arrays"]
        new = {
            k: (v.numpy() + 3.0 * direction[k] + 0.05 * rng.standard_normal(v.shape)).astype(
                np.float32
            )
            for k, v in arrays.items()
        }
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in new.items()})})
        return Message(content, reply_to=msg)

    return call_next


def _sent_norms(mod) -> list[float]:
    """Decoded L2 norm of what the server receives, each of ROUNDS rounds (mod -> clipping)."""
    rng = np.random.default_rng(0)
    direction = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    scale = np.sqrt(sum(float(np.sum(d * d)) for d in direction.values()))
    direction = {k: d / scale for k, d in direction.items()}
    weights = {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
    ctx = Context(run_id=1, node_id=3, node_config={}, state=RecordDict(), run_config={})
    trainer = _trainer(direction, rng)
    norms = []
    for rnd in range(1, ROUNDS + 1):
        sent = ArrayRecord({k: Array(v) for k, v in weights.items()})
        msg = Message(
            RecordDict(
                {
                    "arrays": sent,
                    "config": ConfigRecord(
                        {"server-round": rnd, "clipping_norm": C, DECODER_KEY: True}
                    ),
                }
            ),
            dst_node_id=3,
            message_type=MessageType.TRAIN,
        )
        reply = mod(msg, ctx, lambda m, c: fixedclipping_mod(m, c, trainer))
        record = reply.content["arrays"]
        deltas = [decode_tensor(a.data) for a in record.values()]  # exactly what is decoded
        norms.append(float(np.sqrt(sum(float(np.sum(d.astype(np.float64) ** 2)) for d in deltas))))
        full = decode_arrays(record, sent)  # the server's path: reference + delta
        weights = {k: full[k].numpy() for k in weights}  # the next round starts there
    return norms


PRESETS = [
    ("dgc", {}),
    ("fedzip", {}),
    ("fedzip", {"error_feedback": False}),
    ("qsgd-8bit", {}),
    ("sparse-lora", {}),
    ("fedzip", {"sparsify": "randomk", "density": 0.05}),
]


@pytest.mark.parametrize(("preset", "overrides"), PRESETS)
def test_what_the_server_receives_is_bounded_by_c_every_round(preset, overrides):
    norms = _sent_norms(compression_mod(preset, **overrides))
    assert max(norms) <= C * (1 + 1e-9), (preset, overrides, max(norms))
    assert min(norms) > 0.05  # something was sent


def test_check_dp_compression_covers_client_side_clipping():
    # compression_mod clips the decoded update to the clipping_norm the server sends
    check_dp_compression("dgc", record_level=False, client_side_clipping=True)
    # a compressor that does not clip after compressing is refused under client-side clipping
    with pytest.raises(DPCompressionError, match="client-side"):
        check_dp_compression(
            "dgc", record_level=False, client_side_clipping=True, clips_after_compression=False
        )

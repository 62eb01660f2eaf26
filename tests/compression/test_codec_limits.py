"""Bounded decoding (issue 15, item 12): in-place output, byte budgets, codec ids and stypes."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from flwr_ext.compression import CorruptPayloadError, PayloadLimitError, PipelineConfig, get_preset
from flwr_ext.compression import entropy as entropy_mod
from flwr_ext.compression.codec import (
    CODEC_IDS,
    codec_id_for_stype,
    decode_tensor,
    decode_update,
    encode_tensor,
    encode_update,
    reply_budget,
)

N = 1 << 23  # 8M float32 = 32 MiB: large enough that the decoder's own bookkeeping is noise


def _peak(payload: bytes, **kwargs) -> tuple[np.ndarray, int]:
    tracemalloc.start()
    try:
        out = decode_tensor(payload, max_elements=1 << 30, **kwargs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return out, peak


def test_zstd_payload_decodes_in_place() -> None:
    """A few KiB of zstd that expand to a 32 MiB tensor: the peak is the tensor (was 3x)."""
    payload, _ = encode_tensor(np.zeros(N, np.float32), PipelineConfig(), reconstruct=False)
    assert len(payload) < 32 << 10
    out, peak = _peak(payload)
    assert out.shape == (N,) and not out.any()
    assert peak < 1.05 * out.nbytes, f"peak {peak / out.nbytes:.2f}x the tensor"


@pytest.mark.parametrize(
    "config",
    [
        PipelineConfig(quantize="kmeans"),
        get_preset("qsgd-8bit"),
        PipelineConfig(quantize="uniform", bits=8),
    ],
    ids=["kmeans", "qsgd", "uniform"],
)
def test_quantised_payload_peak_near_tensor(config: PipelineConfig) -> None:
    x = np.zeros(N, np.float32)
    x[::7] = 1.0
    payload, _ = encode_tensor(x, config, reconstruct=False)
    del x
    out, peak = _peak(payload)
    # the tensor plus one byte per symbol and chunk-sized temporaries (was 2-3x)
    assert peak < 1.4 * out.nbytes, f"peak {peak / out.nbytes:.2f}x the tensor"


def test_sparse_payload_peak_bounded() -> None:
    """top-k at density 1: every position is sent as a gap (was 12x the tensor)."""
    x = np.ones(N, np.float32)
    payload, _ = encode_tensor(x, PipelineConfig(sparsify="topk", density=1.0), reconstruct=False)
    out, peak = _peak(payload)
    np.testing.assert_array_equal(out, x)
    # tensor + one byte per gap symbol + chunk-sized temporaries (positions are not kept)
    assert peak < 1.8 * out.nbytes, f"peak {peak / out.nbytes:.2f}x the tensor"


@pytest.mark.parametrize(
    "config",
    [
        PipelineConfig(),
        PipelineConfig(sparsify="topk", density=0.7),
        PipelineConfig(sparsify="topk", density=0.05),  # small selection: positions kept
        PipelineConfig(sparsify="randomk", density=0.3, quantize="qsgd", levels=5, bucket=37),
        PipelineConfig(sparsify="topk", density=0.5, quantize="kmeans", clusters=4),
        PipelineConfig(quantize="uniform", bits=3),
        PipelineConfig(quantize="qsgd", levels=127, bucket=300),
    ],
    ids=["raw", "topk", "topk-small", "randomk-qsgd", "topk-kmeans", "uniform", "qsgd"],
)
@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
def test_chunked_decoding_is_exact(
    monkeypatch: pytest.MonkeyPatch, config: PipelineConfig, dtype: str
) -> None:
    """Decoding in chunks returns exactly what the encoder reconstructs, across chunk edges."""
    monkeypatch.setattr(entropy_mod, "CHUNK", 1000)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((7, 1001)).astype(dtype)
    payload, recon = encode_tensor(x, config, seed=11)
    out = decode_tensor(payload, expected_shape=x.shape, expected_dtype=dtype)
    assert out.dtype == x.dtype
    np.testing.assert_array_equal(out, recon)


def test_unknown_codec_id_rejected() -> None:
    payload = encode_update({"w": np.ones(50, np.float32)}, get_preset("fedzip"))[0]["w"]
    assert payload[3] == CODEC_IDS["fedzip"]
    for bad in (6, 7, 99, 255):
        with pytest.raises(CorruptPayloadError, match="codec id"):
            decode_tensor(payload[:3] + bytes([bad]) + payload[4:])


def test_stype_must_match_payload() -> None:
    upd = {"w": np.linspace(-1, 1, 3000, dtype=np.float32)}
    fedzip = encode_update(upd, get_preset("fedzip"))[0]["w"]
    dgc = encode_update(upd, get_preset("dgc"))[0]["w"]
    custom = encode_update(upd, PipelineConfig(name="mine", quantize="uniform"))[0]["w"]
    decode_tensor(fedzip, stype="flwr-ext/fedzip")
    decode_tensor(dgc, stype="flwr-ext/dgc")
    decode_tensor(custom, stype="flwr-ext/mine")  # any other name is the custom id
    for payload, stype in ((fedzip, "flwr-ext/dgc"), (dgc, "flwr-ext/fedzip"),
                           (custom, "flwr-ext/qsgd-8bit"), (fedzip, "flwr-ext/mine")):  # fmt: skip
        with pytest.raises(CorruptPayloadError, match="stype"):
            decode_tensor(payload, stype=stype)
    for stype in ("numpy.ndarray", "", "flwr-ex/fedzip"):
        with pytest.raises(CorruptPayloadError, match="not a flwr-ext payload"):
            decode_tensor(fedzip, stype=stype)
    assert codec_id_for_stype(get_preset("qsgd-8bit").stype) == CODEC_IDS["qsgd-8bit"]


def test_max_bytes_limits_the_decoded_tensor() -> None:
    x = np.ones((10, 100), np.float32)
    payload, _ = encode_tensor(x, PipelineConfig())
    assert decode_tensor(payload, max_bytes=x.nbytes).shape == x.shape
    with pytest.raises(PayloadLimitError, match="4000 bytes|3999 bytes"):
        decode_tensor(payload, max_bytes=x.nbytes - 1)
    # float64 elements count double
    payload64, _ = encode_tensor(x.astype(np.float64), PipelineConfig())
    with pytest.raises(PayloadLimitError):
        decode_tensor(payload64, max_bytes=x.nbytes)
    big, _ = encode_tensor(np.zeros(1 << 22, np.float32), PipelineConfig(), reconstruct=False)
    tracemalloc.start()
    with pytest.raises(PayloadLimitError):
        decode_tensor(big, max_bytes=1 << 20)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 16  # refused from the header: nothing allocated


def test_decode_update_budget_follows_the_model_sent() -> None:
    sent = {"w": np.zeros((20, 30), np.float32), "b": np.zeros(30, np.float32)}
    upd = {k: np.ones_like(v) for k, v in sent.items()}
    payloads, recon = encode_update(upd, get_preset("fedzip"))
    stypes = dict.fromkeys(payloads, "flwr-ext/fedzip")
    budget = reply_budget(sent)
    assert budget == 20 * 30 * 4 + 30 * 4
    out = decode_update(payloads, stypes=stypes, max_bytes=budget)
    for k in upd:
        np.testing.assert_array_equal(out[k], recon[k])
    with pytest.raises(PayloadLimitError, match="'b'"):
        decode_update(payloads, stypes=stypes, max_bytes=budget - 1)
    with pytest.raises(CorruptPayloadError, match="unknown tensor"):
        decode_update(payloads, stypes={"w": "flwr-ext/fedzip"})
    # a reply that is larger than the model: a second copy of "w" under another name
    bigger = {**payloads, "w2": payloads["w"]}
    with pytest.raises(PayloadLimitError):
        decode_update(bigger, max_bytes=budget)


def test_fuzz_codec_ids_stypes_and_budgets() -> None:
    """Random codec-id bytes, stypes and budgets: decoded iff consistent, else only our error."""
    rng = np.random.default_rng(15)
    upd = {"a": rng.standard_normal((40, 25)).astype(np.float32)}
    names = ["fedzip", "dgc", "qsgd-8bit", "sparse-lora"]
    corpus = [(encode_update(upd, get_preset(n), seed=1)[0]["a"], n) for n in names]
    corpus.append((encode_update(upd, PipelineConfig(name="x", quantize="uniform"))[0]["a"], "x"))
    known = set(CODEC_IDS.values())
    outcome = {"ok": 0, "rejected": 0}
    for i in range(3000):
        payload, _ = corpus[i % len(corpus)]
        cid = int(rng.integers(0, 256)) if rng.random() < 0.5 else int(payload[3])
        data = payload[:3] + bytes([cid]) + payload[4:]
        stype = "flwr-ext/" + str(rng.choice([*names, "x", "custom", "raw"]))
        budget = int(rng.integers(0, 2 * 4000)) if rng.random() < 0.5 else None
        consistent = cid in known and cid == codec_id_for_stype(stype)
        fits = budget is None or budget >= 4000
        try:
            out = decode_tensor(data, stype=stype, max_bytes=budget, expected_shape=(40, 25))
        except CorruptPayloadError:
            outcome["rejected"] += 1
            assert not (consistent and fits), (cid, stype, budget)
        else:
            outcome["ok"] += 1
            assert consistent and fits and out.shape == (40, 25)
    assert outcome["ok"] > 100 and outcome["rejected"] > 1000

"""Behaviour of the loaders, and the SmolLM2 cache builder's lock and atomic publish.

The cache builder (``gguf_to_pretrained``) is tested without SmolLM2: the GGUF load and the
tokenizer load are replaced by a tiny Llama and the tiny tokenizer; the file lock, the temporary
sibling directory and the rename are the real code.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from flwr_ext.llm import models
from flwr_ext.llm.models import (
    gguf_to_pretrained,
    load_causal_lm,
    load_model_and_tokenizer,
    load_tokenizer,
    tiny_llama,
)

# ---------------------------------------------------------------- loaders: behaviour


def test_tiny_model_and_tokenizer_work_together():
    model, tok = load_model_and_tokenizer("tiny", seed=0)
    texts = ["### Instruction:\nReverse olleh\n\n### Response:\nhello", "short"]
    batch = tok(texts, padding=True, return_tensors="pt")
    assert tok.padding_side == "right"
    n_short = int(batch.attention_mask[1].sum())
    assert n_short < batch.input_ids.shape[1]
    assert (batch.input_ids[1, n_short:] == tok.pad_token_id).all()  # right-padded with pad
    with torch.no_grad():
        padded = model(**batch).logits
        alone = model(**tok(texts[1:], return_tensors="pt")).logits
    # the attention mask hides the padding: the short text's logits do not change
    torch.testing.assert_close(padded[1, :n_short], alone[0], rtol=1e-4, atol=1e-5)
    # a loss on real tokens, and the same model again for the same seed, another for another
    out = model(**batch, labels=batch.input_ids.masked_fill(batch.attention_mask == 0, -100))
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    again, _ = load_model_and_tokenizer("tiny", seed=0)
    other, _ = load_model_and_tokenizer("tiny", seed=1)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, padded)
        assert not torch.allclose(other(**batch).logits, padded)
    gen = model.generate(**tok(["hello"], return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == len(tok("hello").input_ids) + 4
    assert isinstance(tok.decode(gen[0]), str)


def test_local_dir_loads_the_same_function_and_gets_a_pad_token(tmp_path, tok):
    model = tiny_llama(len(tok), seed=3, eos_token_id=tok.eos_token_id)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded = load_causal_lm(str(tmp_path / "m"))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    # a tokenizer saved without a pad token gets EOS as pad and right padding
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    raw.pad_token = None
    raw.padding_side = "left"
    raw.save_pretrained(tmp_path / "nopad")
    assert AutoTokenizer.from_pretrained(str(tmp_path / "nopad")).pad_token is None
    t2 = load_tokenizer(str(tmp_path / "nopad"))
    assert t2.pad_token == t2.eos_token and t2.padding_side == "right"
    enc = t2(["a", "a much longer text"], padding=True).input_ids
    assert enc[0][-1] == t2.eos_token_id and len(enc[0]) == len(enc[1])
    text = "Reverse the letters: olleh"
    assert t2.decode(t2(text).input_ids) == text


# ---------------------------------------------------------------- SmolLM2 cache builder


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch, tok):
    """A GGUF path whose 'load' is a tiny Llama (slow on purpose) and whose tokenizer is tiny."""
    path = tmp_path / "src" / "fake.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF fake")
    calls = {"load": 0, "active": 0, "max_active": 0}
    lock = threading.Lock()

    def load_gguf(p, dtype=torch.float32):
        with lock:
            calls["load"] += 1
            calls["active"] += 1
            calls["max_active"] = max(calls["max_active"], calls["active"])
        time.sleep(0.3)  # long enough for a second builder to arrive meanwhile
        with lock:
            calls["active"] -= 1
        return tiny_llama(len(tok), seed=7)

    class _Tok:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            return tok

    monkeypatch.setattr(models, "load_gguf", load_gguf)
    monkeypatch.setattr(models, "AutoTokenizer", _Tok)
    return path, calls


def test_cache_is_built_once_and_published_complete(tmp_path, fake_gguf, tok):
    src, calls = fake_gguf
    out = tmp_path / "cache" / "smollm2"
    assert gguf_to_pretrained(src, out) == out
    assert calls["load"] == 1
    marker = (out / "flwr-ext-cache.txt").read_text()
    assert f"source={src}" in marker and "size=9" in marker
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    # the published directory is a working from_pretrained dir with the converted weights
    loaded = load_causal_lm(str(out))
    ref = tiny_llama(len(tok), seed=7).state_dict()
    assert all(torch.equal(ref[k], v) for k, v in loaded.state_dict().items())
    assert load_tokenizer(str(out)).get_vocab() == tok.get_vocab()
    # no temporary sibling left behind, and a finished cache is never rebuilt
    assert sorted(p.name for p in out.parent.iterdir()) == [".smollm2.lock", "smollm2"]
    gguf_to_pretrained(src, out)
    assert calls["load"] == 1


def test_concurrent_builders_are_serialised_by_the_lock(tmp_path, fake_gguf):
    src, calls = fake_gguf
    out = tmp_path / "cache" / "smollm2"
    seen_partial = []
    results, errors = [], []

    def watch():  # an observer never sees a directory without its marker
        end = time.monotonic() + 3.0
        while time.monotonic() < end and not results:
            if out.exists() and not (out / "flwr-ext-cache.txt").exists():
                seen_partial.append(True)
            time.sleep(0.005)

    def build():
        try:
            results.append(gguf_to_pretrained(src, out))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=watch)] + [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and results == [out] * 3
    assert calls["load"] == 1 and calls["max_active"] == 1  # one builder; the others waited
    assert not seen_partial


def test_failed_build_leaves_nothing_and_an_incomplete_dir_is_replaced(
    tmp_path, fake_gguf, monkeypatch, tok
):
    src, calls = fake_gguf
    out = tmp_path / "cache" / "smollm2"

    class _BrokenTok:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise OSError("disk full")

    monkeypatch.setattr(models, "AutoTokenizer", _BrokenTok)
    with pytest.raises(OSError, match="disk full"):
        gguf_to_pretrained(src, out)
    # the model files were written to a temporary sibling that is gone; nothing was published
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir()] == [".smollm2.lock"]

    class _Tok:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            return tok

    monkeypatch.setattr(models, "AutoTokenizer", _Tok)
    out.mkdir()
    (out / "half-written.bin").write_bytes(b"x")  # an old incomplete directory, no marker
    gguf_to_pretrained(src, out)
    assert not (out / "half-written.bin").exists() and (out / "flwr-ext-cache.txt").is_file()

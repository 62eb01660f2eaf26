"""The split model (SFPrompt head / body / tail) equals the monolithic model, values and grads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flwr_ext.llm.models import tiny_llama
from flwr_ext.llm.split import (
    PromptedLM,
    causal_lm_loss,
    full_attention_mask,
    position_ids_from_mask,
    split_causal_lm,
)

P = 5


def _model(tok, **kw):
    return tiny_llama(len(tok), seed=3, pad_token_id=tok.pad_token_id, **kw)


def _batch(vocab: int):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding, as in training
    mask[2, 4:] = 0
    labels = ids.clone()
    labels[:, :3] = -100
    labels[mask == 0] = -100
    return ids, mask, labels


def _monolithic_logits(split, model, ids, mask):
    emb = split.head.embed(ids)
    fmask = full_attention_mask(mask, P)
    out = model(inputs_embeds=emb, attention_mask=fmask, position_ids=position_ids_from_mask(fmask))
    return out.logits[:, P:]


@pytest.mark.parametrize(
    ("k", "m", "tied", "mode"),
    [(1, 1, False, "full"), (0, 2, False, "norm"), (2, 1, True, "lora"), (1, 0, False, "none")],
)
def test_split_forward_and_prompt_grad_equal_monolithic(tok, k, m, tied, mode):
    model = _model(tok, tie_word_embeddings=tied)
    split = split_causal_lm(model, k, m, num_virtual_tokens=P, tail_mode=mode, seed=1)
    if mode == "lora":  # lora_B starts at zero: make the adapter do something
        with torch.no_grad():
            for n, p in split.tail.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    ids, mask, labels = _batch(len(tok))

    # forward: split == monolithic on [prompt; tokens], and == HF's default positions where valid
    logits = split(ids, mask)
    ref = _monolithic_logits(split, model, ids, mask)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    emb = split.head.embed(ids)
    default = model(inputs_embeds=emb, attention_mask=full_attention_mask(mask, P)).logits[:, P:]
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], default[valid], rtol=1e-5, atol=1e-5)

    # gradients: the protocol's detached hand-offs (head | body | tail) == monolithic autograd
    named = split.trainable_named_parameters()
    loss_ref = causal_lm_loss(ref, labels)
    ref_grads = torch.autograd.grad(loss_ref, [p for _, p in named], allow_unused=True)

    hidden, fmask = split.head(ids, mask)  # client
    cut = hidden.detach().requires_grad_(True)  # server
    body_out = split.body(cut, fmask)
    recv = body_out.detach().requires_grad_(True)  # client
    loss = split.tail.loss(recv, fmask, labels)  # LM head on labelled rows only
    loss.backward()
    body_out.backward(recv.grad)  # server
    hidden.backward(cut.grad)  # client
    assert float(loss.detach()) == pytest.approx(float(loss_ref.detach()), rel=1e-6)
    for (name, p), g in zip(named, ref_grads, strict=True):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6, msg=name)
    assert float(split.head.prompt.weight.grad.abs().sum()) > 0
    # the frozen base got no gradient; only the prompt and the trained tail require one
    trained = {id(p) for _, p in named}
    assert all(p.grad is None for p in model.parameters() if id(p) not in trained)
    assert {id(p) for p in split.parameters() if p.requires_grad} == trained


def test_tail_modes_train_what_they_say(tok):
    counts = {}
    for mode in ("full", "lora", "norm", "none"):
        split = split_causal_lm(_model(tok), 1, 1, num_virtual_tokens=P, tail_mode=mode)
        names = [n for n, _ in split.trainable_named_parameters()]
        assert names[0] == "prompt"
        counts[mode] = split.sizes().trained_params
        if mode == "lora":
            assert all("lora_" in n for n in names[1:]) and len(names) == 5  # q, v x (A, B)
        if mode == "norm":
            assert all("norm" in n for n in names[1:]) and len(names) == 4
        if mode == "none":
            assert names == ["prompt"]
        assert not any("lm_head" in n or "embed" in n for n in names)
    assert counts["none"] == P * 64
    assert counts["none"] < counts["norm"] < counts["lora"] < counts["full"]


def test_split_sizes_and_validation(tok):
    split = split_causal_lm(_model(tok), 1, 1, num_virtual_tokens=P)
    s = split.sizes()
    assert (s.num_layers, s.client_layers) == (4, 2)
    assert s.client_layer_share == 0.5 and 0 < s.client_flop_share < 1
    with pytest.raises(ValueError, match="body"):
        split_causal_lm(_model(tok), 2, 2)
    with pytest.raises(ValueError, match="tail_mode"):
        split_causal_lm(_model(tok), 1, 1, tail_mode="everything")
    state = split.trainable_state()
    state["prompt"] = np.ones_like(state["prompt"])
    split.load_trainable_state(state)
    assert torch.equal(split.head.prompt.weight, torch.ones(P, 64))
    with pytest.raises(KeyError):
        split.load_trainable_state({"prompt": state["prompt"]})


def test_prompted_lm_generate_is_padding_invariant_greedy(tok):
    split = split_causal_lm(_model(tok), 1, 1, num_virtual_tokens=P)
    lm = PromptedLM(split)
    a = torch.tensor([[5, 9, 13, 20, 7]])
    b = torch.tensor([[0, 0, 8, 4, 6]])  # left-padded, as evaluate.generate_answers does
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    out = lm.generate(torch.cat([a, b]), mask, max_new_tokens=4, pad_token_id=0)
    alone = lm.generate(b[:, 2:], torch.ones(1, 3, dtype=torch.long), max_new_tokens=4)
    assert torch.equal(out[1, 5:], alone[0, 3:])
    # greedy: each new token is the argmax of the prompted model on the prefix
    first = split(a, torch.ones_like(a))[:, -1].argmax(-1)
    assert int(out[0, 5]) == int(first)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_tail_and_local_loss_equal_the_full_logits_loss(tok, mode):
    split = split_causal_lm(_model(tok), 1, 1, num_virtual_tokens=P, tail_mode=mode, seed=2)
    ids, mask, labels = _batch(len(tok))
    named = split.trainable_named_parameters()
    params = [p for _, p in named]
    ref = causal_lm_loss(split.local_forward(ids, mask), labels)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    loss = split.local_loss(ids, mask, labels)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    for (name, _), g, r in zip(named, grads, ref_grads, strict=True):
        if r is None:
            assert g is None, name
        else:
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7, msg=name)


def test_prompted_lm_kv_cached_generate_equals_recomputed_greedy(tok):
    split = split_causal_lm(_model(tok), 1, 1, num_virtual_tokens=P, tail_mode="full", seed=4)
    with torch.no_grad():  # a non-trivial tail, so the check covers the trained path
        for p in split.tail.stack.parameters():
            p.add_(0.05 * torch.randn_like(p))
    lm = PromptedLM(split)
    ids = torch.tensor([[5, 9, 13, 20, 7, 11], [0, 0, 0, 8, 4, 6]])
    mask = (ids != 0).long()
    out = lm.generate(ids, mask, max_new_tokens=6, pad_token_id=0)
    assert out.shape == (2, 12)
    ref_ids, ref_mask = ids, mask
    for _ in range(6):  # the definition: argmax of the whole split model on the prefix
        nxt = split(ref_ids, ref_mask)[:, -1].argmax(-1)
        ref_ids = torch.cat([ref_ids, nxt[:, None]], dim=1)
        ref_mask = torch.cat([ref_mask, torch.ones_like(nxt)[:, None]], dim=1)
    assert torch.equal(out, ref_ids)

"""Tests for baseq.eval.perplexity on a tiny random Llama."""

from __future__ import annotations

import math

import pytest
import torch

from baseq.eval.perplexity import nll_sum, perplexity
from baseq.testing import tiny_llama

N, SEQLEN, VOCAB = 5, 24, 258


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3)


@pytest.fixture(scope="module")
def windows():
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, VOCAB, (N, SEQLEN), generator=g)


def _by_hand(model, windows) -> tuple[float, int]:
    """Sum of -log p(token | prefix) over every predicted token, one window and one position at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(w[None], use_cache=False).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            for t in range(len(w) - 1):
                total -= logp[t].gather(0, w[t + 1: t + 2]).item()
                count += 1
    return total, count


def test_perplexity_is_exp_mean_nll(model, windows):
    total, count = _by_hand(model, windows)
    assert count == N * (SEQLEN - 1)
    expected = math.exp(total / count)
    got_total, got_count = nll_sum(model, windows, batch_size=2, progress=False)
    assert got_count == count
    assert got_total == pytest.approx(total, rel=1e-5)
    assert perplexity(model, windows, batch_size=2, progress=False) == pytest.approx(expected, rel=1e-5)
    # a random model over 258 tokens is close to uniform: sanity of the scale, not only of the formula
    assert 50 < expected < 2000


def test_batch_size_does_not_matter(model, windows):
    p1 = perplexity(model, windows, batch_size=1, progress=False)
    p3 = perplexity(model, windows, batch_size=3, progress=False)  # 5 windows: batches of 3 and 2
    p_all = perplexity(model, windows, batch_size=64, progress=False)
    assert p1 == pytest.approx(p3, rel=1e-6)
    assert p1 == pytest.approx(p_all, rel=1e-6)


def test_window_order_does_not_matter(model, windows):
    base = perplexity(model, windows, batch_size=2, progress=False)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(perm, torch.arange(N))
    assert perplexity(model, windows[perm], batch_size=2, progress=False) == pytest.approx(base, rel=1e-6)
    assert perplexity(model, windows.flip(0), batch_size=3, progress=False) == pytest.approx(base, rel=1e-6)


def test_perplexity_depends_on_model_and_data(model, windows):
    base = perplexity(model, windows, progress=False)
    other_model = tiny_llama(seed=4)
    assert perplexity(other_model, windows, progress=False) != pytest.approx(base, rel=1e-3)
    assert perplexity(model, windows[:2], progress=False) != pytest.approx(base, rel=1e-4)


def test_bfloat16_model_loss_in_fp32(windows):
    """A low-precision model still gets an fp32 loss: close to the fp32 model's perplexity."""
    fp32 = tiny_llama(seed=3)
    bf16 = tiny_llama(seed=3).to(torch.bfloat16)
    p32 = perplexity(fp32, windows, progress=False)
    p16 = perplexity(bf16, windows, progress=False)
    assert math.isfinite(p16)
    assert p16 == pytest.approx(p32, rel=0.05)


@pytest.mark.parametrize("chunk", [1, 5, 23, 1000])
def test_chunked_lm_head_matches_full_logits(model, windows, chunk):
    """The LM head applied a few positions at a time gives the same NLL as the model's full logits output."""
    total, count = _by_hand(model, windows)
    got_total, got_count = nll_sum(model, windows, batch_size=2, progress=False, head_chunk=chunk)
    assert got_count == count
    assert got_total == pytest.approx(total, rel=1e-5)


def test_softcapped_logits_fall_back_to_the_full_output(model, windows, monkeypatch):
    """A model whose logits are not just ``lm_head(hidden)`` (soft-capping) must not take the chunked path."""
    shapes = []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    try:
        nll_sum(model, windows, batch_size=5, progress=False, head_chunk=7)
        assert shapes and all(len(s) == 2 and s[0] <= 7 for s in shapes)  # chunked by default
        shapes.clear()
        monkeypatch.setattr(model.config, "final_logit_softcapping", 30.0, raising=False)
        nll_sum(model, windows, batch_size=5, progress=False, head_chunk=7)
    finally:
        handle.remove()
    assert shapes == [(5, SEQLEN, model.config.hidden_size)]  # one full-batch head call: the model's own logits

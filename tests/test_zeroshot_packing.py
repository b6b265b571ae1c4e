"""Zero-shot scoring packs the options of a multiple-choice item into one sequence (baseq.eval.zeroshot): every
request's log-likelihood and greedy flag are those of lm-eval's own unpacked path (``pack = False``), for FP,
fake-quant and packed runtime models, sliding-window and soft-capped families, eager and SDPA attention, on lm-eval's
requests of the nine standard tasks (fabricated documents, real prompts) and on synthetic ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from baseq.eval import standard
from baseq.eval import scoring
from baseq.eval import zeroshot as zs
from baseq.testing import byte_tokenizer, save_tiny_model, tiny_llama
from test_standard_tasks import write_hub_dir


@pytest.fixture(scope="module")
def instances(tmp_path_factory) -> list:
    """lm-eval's requests of the nine standard tasks on the fabricated documents (3 per task)."""
    from lm_eval.tasks import TaskManager

    tmp = tmp_path_factory.mktemp("std")
    (tmp / "yaml").mkdir()
    zs.write_offline_tasks([], list(standard.PAPER), tmp / "yaml", None, write_hub_dir(tmp / "hub"), None)
    tm = TaskManager(include_path=str(tmp / "yaml"), include_defaults=False)
    out = []
    for name in standard.PAPER:
        task = tm.load(f"baseq_std_{name}")["tasks"][f"baseq_std_{name}"]
        task.build_all_requests(limit=None)
        out += task.instances
    return out


def synthetic(model, tok) -> list:
    """Options of every length (one token included) after shared contexts, the greedy continuation among them (so
    that is_greedy is True somewhere), WinoGrande-like requests (contexts differ, continuation shared), and lone
    requests."""
    from lm_eval.api.instance import Instance

    pairs = []
    for i, ctx in enumerate(["The cat sat on the", "Question: what is 2+2?\nAnswer:", "Once upon a time"]):
        ids = tok(ctx, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            greedy = model.generate(ids, max_new_tokens=4, do_sample=False)[0, ids.shape[1]:]
        pairs += [(ctx, tok.decode(greedy)), (ctx, " x"), (ctx, " mat and the rug"), (ctx, f" {i}")]
    pairs += [("Ann beat Bea because Ann", " was better."), ("Ann beat Bea because Bea", " was better.")]
    pairs += [("A lone request", " with its answer"), ("z", " y")]
    return [Instance("loglikelihood", {}, p, 0) for p in pairs]


def compare(model, tok, requests, batch_size: int = 4) -> list:
    """Score ``requests`` packed and unpacked; assert equal numbers; return the packed rows scored."""
    lm = scoring.scoring_lm(model, tok, batch_size)
    lm.show = False
    rows, score_rows = [], lm.score_rows
    lm.score_rows = lambda batch: rows.extend(batch) or score_rows(batch)
    lm.pack = False
    ref = lm.loglikelihood(requests)
    lm.pack = True
    got = lm.loglikelihood(requests)
    assert len(got) == len(ref) == len(requests)
    for r, (ll, greedy), (ll_ref, greedy_ref) in zip(requests, got, ref):
        assert ll == pytest.approx(ll_ref, rel=1e-4, abs=1e-6), r.args
        assert greedy == greedy_ref, r.args
    return rows


@pytest.fixture(scope="module")
def fp(tmp_path_factory):
    from baseq.models.loading import load_model

    return load_model(str(save_tiny_model(tmp_path_factory.mktemp("fp") / "m", "llama", layers=2)))


def test_packing_matches_lm_evals_path_on_the_standard_tasks(fp, instances):
    model, tok = fp
    rows = compare(model, tok, instances)
    # every request was packed; the requests with one context share a row: an ARC-Challenge item's four options,
    # the twelve of HellaSwag's three fabricated items (one context)
    assert sum(len(conts) for _, conts in rows) == len(instances)

    def options_after(context: str) -> list[int]:
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        return [len(conts) for c, conts in rows if c == ctx]

    assert options_after("Question: What melts ice 0?\nAnswer:") == [4]
    assert options_after("Roof shingle removal: A man is on a roof. He") == [12]


def test_synthetic_requests_and_greedy_flags(fp):
    model, tok = fp
    requests = synthetic(model, tok)
    rows = compare(model, tok, requests, batch_size=3)
    assert max(len(conts) for _, conts in rows) == 4 and min(len(conts) for _, conts in rows) == 1
    lm = scoring.scoring_lm(model, tok, 4)
    lm.show = False
    assert any(g for _, g in lm.loglikelihood(requests))  # the greedy continuations: not a vacuous comparison


def test_long_items_split_into_rows_and_eager_attention(fp, instances, monkeypatch):
    model, tok = fp
    monkeypatch.setattr(scoring, "ROW_TOKENS", 40)  # a row holds a context and only a few options
    rows = compare(model, tok, instances, batch_size=5)
    assert sum(len(conts) for _, conts in rows) == len(instances) and len(rows) > 27
    model.set_attn_implementation("eager")  # an additive mask, applied by transformers' eager attention
    try:
        compare(model, tok, instances[:40])
    finally:
        model.set_attn_implementation("sdpa")


def test_logits_only_from_the_contexts_end_and_within_budget(fp, instances, monkeypatch):
    """Contexts are padded on the left to end in one column, so a forward keeps the logits of its longest continuation
    tail only (not of the longer contexts' last tokens), and a batch takes fewer rows where its logits would pass
    LOGITS_BYTES; the numbers stay lm-eval's."""
    import functools

    model, tok = fp
    vocab = model.config.vocab_size
    monkeypatch.setattr(scoring, "LOGITS_BYTES", 60 * 4 * vocab)  # 60 positions of float logits
    requests = instances + synthetic(model, tok)
    kept, batches = [], []
    forward = model.forward

    @functools.wraps(forward)
    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        if kwargs.get("logits_to_keep"):
            kept.append((out.logits.shape[0], out.logits.shape[1], kwargs["logits_to_keep"]))
        return out

    monkeypatch.setattr(model, "forward", spy)
    lm = scoring.scoring_lm(model, tok, 8)
    lm.show = False
    score_rows = lm.score_rows
    lm.score_rows = lambda batch: batches.append(batch) or score_rows(batch)
    got = lm.loglikelihood(requests)
    assert len(kept) == len(batches) > 0
    for (rows, width, keep), batch in zip(kept, batches):
        tails = [1 + sum(len(c) - 1 for c in conts) for _, conts in batch]
        assert width == keep == max(tails)
        assert rows == len(batch) <= 8
        assert rows == 1 or rows * width <= 60
    assert any(len({len(ctx) for ctx, _ in b}) > 1 for b in batches)  # contexts of several lengths shared a forward
    assert any(len(b) < 8 for b in batches[:-1])  # the budget, not batch_size, cut a batch
    lm.pack = False
    ref = lm.loglikelihood(requests)
    for (ll, greedy), (ll_ref, greedy_ref) in zip(got, ref):
        assert ll == pytest.approx(ll_ref, rel=1e-4, abs=1e-6) and greedy == greedy_ref


def test_batches_keep_order_and_bounds():
    rows = [5, 1, 1, 9, 2, 2, 2, 2, 30, 1]
    out = list(scoring._batches(rows, 3, lambda r: r, 10))
    assert [r for b in out for r in b] == rows
    assert out == [[5, 1], [1], [9], [2, 2, 2], [2], [30], [1]]


@pytest.mark.parametrize("family,packed", [("mistral", 4), ("gemma2", 4), ("gemma3", 4), ("qwen2", 6)])
def test_families_and_sliding_windows(family, packed, tmp_path):
    """Sliding-window families (Mistral; Gemma 2/3 local layers, Gemma 2's soft-capping): requests longer than the
    window (8 tokens here) take lm-eval's path, shorter ones are packed; the numbers are lm-eval's either way. (Qwen2
    without a window: all packed.)"""
    from lm_eval.api.instance import Instance

    from baseq.models.loading import load_model

    model, tok = load_model(str(save_tiny_model(tmp_path / "m", family, layers=2)))
    short = [("abc", " de"), ("abc", " f"), ("abc", " ghi"), ("xy", " z")]  # 3 + 4 tokens and less
    long = [("A longer context than the window", " and an answer"), ("A longer context than the window", " no")]
    requests = [Instance("loglikelihood", {}, p, 0) for p in short + long]
    rows = compare(model, tok, requests)
    assert sum(len(conts) for _, conts in rows) == packed


def _quantized(tmp_path: Path):
    from baseq.calibrate.pipeline import quantize_model
    from baseq.config import BitsConfig, CalibConfig, QuantizeConfig, TrainConfig

    text = tmp_path / "calib.txt"
    text.write_text("\n".join(f"Line {i}: a quick brown fox jumps over {i * 7} lazy dogs." for i in range(60)))
    tok = byte_tokenizer()
    model = tiny_llama(layers=2, seed=2, hidden=48, ffn=80, heads=4, kv_heads=2)
    cfg = QuantizeConfig(method="quarot", bits=BitsConfig(), train=TrainConfig(epochs=1),
                         calib=CalibConfig(data=str(text), samples=8, seqlen=32, batch_size=4))
    quantize_model(model, tok, cfg, progress=False, log_fn=lambda m: None)
    return model, tok, cfg


@pytest.mark.filterwarnings("ignore:no Hadamard matrix")
def test_fake_quant_and_packed_runtime_models(instances, tmp_path):
    """W4A4KV4 QuaRot: the simulated model (KV quantized per token in the "baseq" attention) and the integer runtime
    (its own attention and LM head; a head over few rows would take the decoding GEMV, scoring keeps it exact)."""
    from baseq.calibrate.pipeline import act_spec
    from baseq.load import load
    from baseq.runtime.packed import save_packed

    model, tok, cfg = _quantized(tmp_path)
    assert model.config._attn_implementation == "baseq"
    compare(model, tok, instances)
    b = cfg.bits
    out = save_packed(model, tok, tmp_path / "packed", act_spec(cfg), {"method": cfg.label, "bits": b.label},
                      w_bits=b.w_bits, w_group=b.w_group, embed_bits=b.embed_bits)
    rt, rt_tok = load(str(out))
    requests = instances + synthetic(rt, rt_tok)
    compare(rt, rt_tok, requests)
    compare(rt, rt_tok, requests, batch_size=1)  # lone rows with a one-token option: few rows of logits
    assert rt.lm_head.table.gemv_rows == 8  # restored after scoring


@pytest.mark.integration
def test_real_model_on_real_tasks(tmp_path):
    """SmolLM2-135M on the first documents of HellaSwag, ARC-Easy, WinoGrande, BoolQ and LAMBADA (the files of
    `baseq data tasks`; skipped when absent)."""
    from lm_eval.tasks import TaskManager

    from baseq.assets import cache_dir
    from baseq.models.loading import load_model

    folder = cache_dir() / "tasks"
    if not standard.is_complete(folder):
        pytest.skip(f"run `baseq data tasks` first ({folder} incomplete)")
    names = ["hellaswag", "arc_easy", "winogrande", "boolq", "lambada_openai"]
    zs.write_offline_tasks([], names, tmp_path, None, folder, 4)
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    requests = []
    for name in names:
        task = tm.load(f"baseq_std_{name}")["tasks"][f"baseq_std_{name}"]
        task.build_all_requests(limit=4)
        requests += task.instances
    model, tok = load_model("smollm2-135m")
    compare(model, tok, requests)
    json.dumps([r.args for r in requests])  # (plain strings: lm-eval's real prompts)

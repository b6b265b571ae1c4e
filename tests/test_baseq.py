"""BASE-Q stage 3: folding exactness, bias correction, gradients, ablation switches, non-finite loss, resume."""

from __future__ import annotations

import random

import pytest
import torch

from baseq.calibrate import stages as stages_mod
from baseq.calibrate.engine import BlockContext, capture_inputs
from baseq.calibrate.pipeline import act_spec, quantize_model
from baseq.calibrate.stages import BaseqTrainStage, GPTQStage, block_loss, block_points, fold_block
from baseq.config import QuantizeConfig
from baseq.errors import BaseqError
from baseq.quant.qmodel import quantize_structure, set_quantize
from baseq.rotation.fuse import rotate_model
from baseq.testing import byte_tokenizer, tiny_llama

WORDS = "the of and a to in is was for on that with as by at from his her it an were are which this be".split()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(6000)))
    return str(path)


def _cfg(text_file, **train) -> QuantizeConfig:
    return QuantizeConfig.from_dict({"method": "baseq", "calib": {"data": text_file, "samples": 6, "seqlen": 32,
                                                                  "batch_size": 3},
                                     "train": {"epochs": 2, "batch_size": 3, **train}})


def _block_ctx(cfg: QuantizeConfig, offsets: bool = False, seed: int = 0):
    """Layer 0 of a rotated, structured tiny model, with FP targets computed, as the engine would."""
    torch.manual_seed(seed)
    model = tiny_llama(hidden=48, ffn=80, heads=4, kv_heads=2, layers=1, seed=seed)
    for p in model.parameters():
        p.requires_grad_(False)
    rotate_model(model, seed=cfg.seed)
    ad = quantize_structure(model, act_spec(cfg))
    windows = torch.randint(0, 256, (6, 32))
    x, kwargs = capture_inputs(model, ad, windows, "cpu", 3)
    if offsets:  # strongly shifted channel means in the residual stream
        x = x + 3.0 * torch.linspace(-1, 1, x.shape[-1])
    layer = ad.layers[0]
    ctx = BlockContext(0, layer, x, x, None, kwargs, torch.device("cpu"), 3, progress=False)
    set_quantize(layer, False)
    ctx.fp_out = ctx.run(x)
    set_quantize(layer, True)
    return ctx


def test_fold_is_exact(text_file):
    cfg = _cfg(text_file)
    ctx = _block_ctx(cfg)
    GPTQStage(stages_mod.WeightQuantConfig(bits=4), cfg.gptq).run(ctx)
    with torch.no_grad():  # non-trivial trained-looking corrections
        for p in block_points(ctx.layer).values():
            p.scale.copy_(1 + 0.2 * torch.rand_like(p.scale))
            p.shift.copy_(0.1 * torch.randn_like(p.shift))
    before = ctx.run(ctx.fp_in)
    fold_block(ctx.layer)
    after = ctx.run(ctx.fp_in)
    assert all(bool(p.shift_folded) for p in block_points(ctx.layer).values())
    assert torch.equal(block_points(ctx.layer)["qkv"].scale, torch.ones(48))
    # equal up to float rounding; rounding can flip a few 4-bit levels, so compare in aggregate
    rel = (after - before).pow(2).mean() / before.pow(2).mean()
    assert rel < 1e-6
    # folding twice changes nothing
    fold_block(ctx.layer)
    assert torch.equal(ctx.run(ctx.fp_in), after)


def test_bias_correction_reduces_block_error(text_file):
    errs = {}
    for bias in (False, True):
        cfg = _cfg(text_file, bias=bias, scale=False, clip=False, bias_init="mean", epochs=3)
        ctx = _block_ctx(cfg, offsets=True)
        BaseqTrainStage(cfg.train).run(ctx)
        errs[bias] = ctx.log["loss_after"]
    assert errs[True] < 0.9 * errs[False]


def test_scale_and_clip_receive_gradients(text_file):
    cfg = _cfg(text_file)
    ctx = _block_ctx(cfg)
    stage = BaseqTrainStage(cfg.train)
    groups = stage.parameter_groups(ctx.layer)
    assert {g["name"] for g in groups} == {"scale", "bias", "clip"}
    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.requires_grad_(True)
    out = ctx.forward(ctx.fp_in[:2], grad=True)
    torch.nn.functional.mse_loss(out, ctx.fp_out[:2]).backward()
    for g in groups:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in g["params"]), g["name"]
    kv = ctx.layer.self_attn.kv_point
    assert kv.k.beta.shape == (2,) and kv.k.beta.grad.abs().sum() > 0  # one clip per KV head


@pytest.mark.parametrize("switch,group", [("bias", "bias"), ("scale", "scale"), ("clip", "clip")])
def test_ablation_switch_removes_its_parameters(text_file, switch, group):
    cfg = _cfg(text_file, **{switch: False})
    ctx = _block_ctx(cfg)
    names = {g["name"] for g in BaseqTrainStage(cfg.train).parameter_groups(ctx.layer)}
    assert group not in names and len(names) == 2
    if switch == "clip":  # clipping off: quantizers have no learnable beta at all
        assert all(p.quantizer.beta is None for p in block_points(ctx.layer).values())
    before = {k: v.clone() for k, v in ctx.layer.state_dict().items()}
    BaseqTrainStage(cfg.train).run(ctx)
    pts = block_points(ctx.layer)
    if switch == "scale":
        assert all(torch.equal(p.scale, torch.ones_like(p.scale)) for p in pts.values())
        assert torch.equal(ctx.layer.input_layernorm.weight, before["input_layernorm.weight"])
    if switch == "bias":
        assert all(torch.equal(p.shift, torch.zeros_like(p.shift)) for p in pts.values())


def test_training_changes_output_and_reduces_loss(text_file):
    cfg = _cfg(text_file, epochs=4)
    ctx = _block_ctx(cfg, offsets=True)
    BaseqTrainStage(cfg.train).run(ctx)
    assert ctx.log["loss_after"] < ctx.log["loss_before"]


def test_token_loss_weighs_every_token_alike():
    """``token`` is invariant to one token's scale (a huge attention-sink token does not dominate); ``mse`` is not."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 5, 16, generator=g)
    out = target + 0.1 * torch.randn(2, 5, 16, generator=g)
    loud = torch.ones(2, 5, 1)
    loud[:, 0] = 100.0  # the first token's residual stream is 100× larger, its error too
    assert block_loss(out * loud, target * loud, "token") == pytest.approx(block_loss(out, target, "token").item())
    assert block_loss(out * loud, target * loud, "mse") > 100 * block_loss(out, target, "mse")
    rel = ((out - target).pow(2).mean(-1) / target.pow(2).mean(-1)).mean()
    assert block_loss(out, target, "token") == pytest.approx(rel.item())
    with pytest.raises(ValueError, match="unknown block loss"):
        block_loss(out, target, "l1")


def test_both_loss_is_total_relative_error_plus_token():
    """``both`` = MSE over the target's mean square + ``token``: the loud token moves it (unlike ``token``), but by
    a bounded amount (unlike ``mse``, whose scale follows the loud token's), and it is invariant to a global scale."""
    g = torch.Generator().manual_seed(1)
    target = torch.randn(2, 5, 16, generator=g)
    out = target + 0.1 * torch.randn(2, 5, 16, generator=g)
    loud = torch.ones(2, 5, 1)
    loud[:, 0] = 100.0
    total = (out - target).pow(2).mean() / target.pow(2).mean()
    both = block_loss(out, target, "both")
    assert both == pytest.approx((total + block_loss(out, target, "token")).item())
    assert block_loss(7 * out, 7 * target, "both") == pytest.approx(both.item())
    loud_out = out.clone()
    loud_out[:, 0] = target[:, 0] + 3 * (out[:, 0] - target[:, 0])  # the first token's error alone 3× larger
    token_only = block_loss(loud_out * loud, target * loud, "token") - block_loss(out * loud, target * loud, "token")
    both_gain = block_loss(loud_out * loud, target * loud, "both") - block_loss(out * loud, target * loud, "both")
    assert both_gain > 5 * token_only > 0  # the loud token's error counts in full through the total term
    assert block_loss(loud_out * loud, target * loud, "both") < 1.0  # still a relative error


@pytest.mark.parametrize("loss", ["token", "both"])
def test_relative_losses_train_and_are_validated(text_file, loss):
    cfg = _cfg(text_file, epochs=4, loss=loss)
    ctx = _block_ctx(cfg, offsets=True)
    BaseqTrainStage(cfg.train).run(ctx)
    assert ctx.log["loss_after"] < ctx.log["loss_before"] < 1.0  # relative errors, so below 1 for a sane block
    with pytest.raises(BaseqError, match="train loss must be one of"):
        _cfg(text_file, loss="l1")


def test_non_finite_loss_stops_with_block_and_step(text_file):
    cfg = _cfg(text_file)
    ctx = _block_ctx(cfg)
    ctx.fp_out = ctx.fp_out.clone()
    ctx.fp_out[:, 0, 0] = float("nan")
    with pytest.raises(BaseqError, match=r"block 0 .*step 0"):
        BaseqTrainStage(cfg.train).run(ctx)


def _crash_on_block_2(monkeypatch, run) -> None:
    """``run()`` with BASE-Q's training failing on block 2 (blocks 0 and 1 saved), then the stage restored."""
    original = BaseqTrainStage.run

    def crash(self, ctx):
        if ctx.index == 2:
            raise RuntimeError("simulated crash")
        return original(self, ctx)

    monkeypatch.setattr(BaseqTrainStage, "run", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run()
    monkeypatch.setattr(BaseqTrainStage, "run", original)


def test_resume_gives_identical_result(text_file, tmp_path, monkeypatch):
    tok = byte_tokenizer()
    cfg = _cfg(text_file)

    def fresh():
        m = tiny_llama(hidden=48, ffn=80, heads=4, kv_heads=2, layers=3, seed=3)
        return m

    ref = fresh()
    quantize_model(ref, tok, _cfg(text_file), progress=False, log_fn=lambda m: None)
    work = tmp_path / "work"
    _crash_on_block_2(monkeypatch, lambda: quantize_model(fresh(), tok, cfg, work_dir=work, progress=False,
                                                          log_fn=lambda m: None))
    messages = []
    resumed = fresh()
    quantize_model(resumed, tok, _cfg(text_file), work_dir=work, resume=True, progress=False,
                   log_fn=messages.append)
    assert any("resuming after block 1" in m for m in messages)
    ref_state, res_state = ref.state_dict(), resumed.state_dict()
    assert ref_state.keys() == res_state.keys()
    for k in ref_state:
        assert torch.equal(ref_state[k], res_state[k]), k


@pytest.mark.parametrize("change", ["model files", "dtype", "calibration text"])
def test_a_partial_of_another_run_is_not_resumed_and_that_is_said(change, text_file, tmp_path, monkeypatch):
    """The partial run records what it was made from: the model's files (not only its name), the dtype, the
    calibration text's contents. Regression: changing any of these between the crash and --resume mixed blocks of
    two runs (or a float32 partial with a bfloat16 model died in a traceback)."""
    from baseq.testing import save_tiny_llama

    tok, shape = byte_tokenizer(), dict(hidden=48, ffn=80, heads=4, kv_heads=2, layers=3)
    folder = save_tiny_llama(tmp_path / "m", seed=3, **shape)
    text = tmp_path / "calib.txt"
    text.write_text(open(text_file).read())
    cfg = _cfg(str(text))
    work = tmp_path / "work"
    _crash_on_block_2(monkeypatch, lambda: quantize_model(tiny_llama(seed=3, **shape), tok, cfg,
                                                          model_spec=str(folder), work_dir=work, progress=False,
                                                          log_fn=lambda m: None))
    model = tiny_llama(seed=3, **shape)
    if change == "model files":  # the same path, other weights of the same shapes
        model = tiny_llama(seed=4, **shape)
        save_tiny_llama(folder, seed=4, **shape)
    elif change == "dtype":
        model = model.to(torch.bfloat16)
    else:
        text.write_text(open(text_file).read()[::-1])
    messages = []
    quantize_model(model, tok, cfg, model_spec=str(folder), work_dir=work, resume=True, progress=False,
                   log_fn=messages.append)
    assert not any("resuming after" in m for m in messages)
    assert any("made by another run" in m and "starting over" in m for m in messages)


def test_source_digest_sees_weights_changed_only_mid_shard(tmp_path):
    """Two shards equal in name, size, first and last MiB but with other weights between are other models; a copy
    of the same files elsewhere is the same model."""
    from baseq.models.loading import source_digest

    rng = random.Random(0)
    edge, middle = rng.randbytes(1 << 20), rng.randbytes(6 << 20)
    for name, mid in (("a", middle), ("b", rng.randbytes(6 << 20)), ("c", middle)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(edge + mid + edge)
    a, b, c = (source_digest(str(tmp_path / n)) for n in "abc")
    assert a != b and a == c


def test_the_same_model_under_another_spelling_of_its_path_resumes(text_file, tmp_path, monkeypatch):
    from baseq.calibrate.pipeline import fingerprint
    from baseq.testing import save_tiny_llama

    folder = save_tiny_llama(tmp_path / "m", layers=1)
    cfg = _cfg(text_file)
    monkeypatch.chdir(tmp_path)
    assert fingerprint(cfg, "m") == fingerprint(cfg, str(folder)) == fingerprint(cfg, "./m/")
    assert fingerprint(cfg, "m", dtype=torch.float32) != fingerprint(cfg, "m", dtype=torch.bfloat16)


# ---------------------------------------------------------------- stage 1: compensated transforms

def test_cayley_is_orthogonal_and_starts_at_identity():
    from baseq.calibrate.transforms import cayley

    p = torch.randn(3, 12, 12, dtype=torch.float64)
    r = cayley(p)
    assert torch.allclose(r @ r.transpose(-1, -2), torch.eye(12, dtype=torch.float64).expand(3, 12, 12), atol=1e-12)
    assert torch.equal(cayley(torch.zeros(2, 5, 5)), torch.eye(5).expand(2, 5, 5))


def test_transforms_keep_the_full_precision_block_function(text_file):
    from baseq.calibrate.transforms import TransformParams

    cfg = _cfg(text_file)
    ctx = _block_ctx(cfg)
    set_quantize(ctx.layer, False)
    ref = ctx.run(ctx.fp_in)
    tp = TransformParams(ctx.layer, rotation=True, scales=True)
    with torch.no_grad():
        for p in tp.parameters():
            p.normal_(0, 0.3)
        for name, value in tp.weights().items():
            ctx.layer.get_parameter(name).copy_(value)
    out = ctx.run(ctx.fp_in)
    assert not torch.equal(ctx.layer.self_attn.v_proj.weight, tp.base["v_w"])  # the weights really changed
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_transform_stage_lowers_quantized_loss_and_switches(text_file):
    from baseq.calibrate.transforms import CompensatedTransformStage, TransformParams
    from baseq.quant.quantizer import WeightQuantConfig

    cfg = _cfg(text_file)
    ctx = _block_ctx(cfg, offsets=True)
    CompensatedTransformStage(WeightQuantConfig(bits=4), epochs=4, lr=1e-2, batch_size=3).run(ctx)
    assert ctx.log["t_loss_last"] < ctx.log["t_loss_before"]
    assert {n for n, _ in TransformParams(ctx.layer, rotation=False, scales=True).named_parameters()} == \
        {"log_v", "log_o", "log_d"}
    assert {n for n, _ in TransformParams(ctx.layer, rotation=True, scales=False).named_parameters()} == {"rot"}


def test_method_composition_follows_switches(text_file):
    from baseq.calibrate.pipeline import build_stages, needs_calibration

    names = lambda c, shift=False: [s.name for s in build_stages(c, shift)]  # noqa: E731
    assert names(_cfg(text_file, transforms=True)) == ["transforms", "gptq", "baseq"]
    assert names(_cfg(text_file, transforms=False)) == ["gptq", "baseq"]
    assert names(_cfg(text_file, transforms=True), True) == ["transforms", "kv_shift", "gptq", "baseq"]
    q = QuantizeConfig.from_dict({"method": "quarot", "weights": "rtn"})
    assert names(q) == ["rtn"] and q.rotate and not needs_calibration(q)
    assert names(q, True) == ["kv_shift", "rtn"] and needs_calibration(q, True)  # the means need calibration data
    smooth = QuantizeConfig.from_dict({"method": "quarot", "weights": "rtn", "smooth": {"points": "qkv"}})
    assert names(smooth) == ["smooth", "rtn"] and needs_calibration(smooth)  # the FP inputs' channel maxima
    assert names(QuantizeConfig.from_dict({"method": "gptq"})) == ["gptq"]
    for fit, order in (("with", ["keep", "transforms", "smooth", "kv_shift", "gptq", "baseq"]),
                       ("without", ["transforms", "smooth", "kv_shift", "gptq", "baseq", "keep"])):
        every = QuantizeConfig.from_dict({"method": "baseq", "smooth": {"points": "down"},
                                          "train": {"transforms": True},
                                          "bits": {"keep_massive": 20.0, "keep_massive_fit": fit}})
        assert names(every, True) == order and needs_calibration(every)


def test_offloaded_activations_give_identical_results(text_file, tmp_path):
    tok = byte_tokenizer()
    results = []
    for offload in (False, True):
        model = tiny_llama(hidden=48, ffn=80, heads=4, kv_heads=2, layers=2, seed=5)
        cfg = _cfg(text_file, epochs=1, transform_epochs=1)
        cfg.calib.offload = offload
        quantize_model(model, tok, cfg, work_dir=tmp_path / f"w{offload}", progress=False, log_fn=lambda m: None)
        results.append(model.state_dict())
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), k
    assert not list(tmp_path.glob("baseq-acts-*"))  # the memory-mapped files are cleaned up


def test_training_that_makes_a_block_worse_is_reverted(text_file):
    cfg = _cfg(text_file, epochs=2, lr_bias=50.0, lr_scale=50.0, lr_clip=50.0)  # absurd rates: training overshoots
    ctx = _block_ctx(cfg)
    BaseqTrainStage(cfg.train).run(ctx)
    assert "reverted" not in ctx.log and ctx.log["loss_after"] > ctx.log["loss_before"]  # off by default
    cfg.train.revert_if_worse = True
    ctx = _block_ctx(cfg)
    BaseqTrainStage(cfg.train).run(ctx)
    assert ctx.log.get("reverted") == 1
    assert ctx.log["loss_after"] == ctx.log["loss_before"]
    assert BaseqTrainStage.loss(ctx, ctx.fp_in, ctx.fp_out) <= ctx.log["loss_before"] * (1 + 1e-4)


@pytest.mark.parametrize("train", [{"lr_bias": 1e30, "batch_size": 6}, {"lr_bias": 1e30, "batch_size": 6, "revert_if_worse": True}])
def test_a_block_whose_output_turns_nan_stops_the_run_naming_it(train, text_file, tmp_path):
    """A learning rate that blows the block up in its only (last) step, after which no loss is computed: one error
    naming the block, nothing of it saved. Regression: the NaN model was written with exit code 0 (16-bit weights),
    or the next block's GPTQ blamed the calibration data."""
    from baseq.errors import BaseqError

    cfg = _cfg(text_file, epochs=1, **train)
    cfg.bits.w_bits = 16
    work = tmp_path / "work"
    with pytest.raises(BaseqError, match=r"block 0: the quantized block's output is not finite"):
        quantize_model(tiny_llama(hidden=48, ffn=80, heads=4, kv_heads=2, layers=2), byte_tokenizer(), cfg,
                       work_dir=work, progress=False, log_fn=lambda m: None)
    assert not (work / "block0.safetensors").exists()

"""SpinQuant / OSTQuant: Stiefel optimisers, the online simulation, exact fusion, training, the methods end to end
(quantize → packed → runtime), the method registry and the --lazy refusal."""

from __future__ import annotations

import copy

import pytest
import torch

from baseq.calibrate.learned_rotations import OnlineTransforms, TrainSettings, kl_top, kl_top_targets, train_transforms
from baseq.calibrate.pipeline import act_spec, quantize_model
from baseq.cli import main
from baseq.config import BitsConfig, CalibConfig, QuantizeConfig
from baseq.data import eval_windows
from baseq.errors import BaseqError
from baseq.load import load
from baseq.models.adapter import LlamaAdapter
from baseq.quant.qmodel import ActSpec, quantize_structure
from baseq.rotation.learned import LearnedTransforms, fuse_transforms
from baseq.rotation.stiefel import CayleyAdam, CayleySGD, orthogonality_error
from baseq.runtime.packed import save_packed
from baseq.testing import byte_tokenizer, tiny_llama

SEQLEN = 32
TEXT = "\n".join(f"Line {i}: a quick brown fox jumps over {i * 7} lazy dogs, then rests." for i in range(80)) + "\n"
SHAPES = [dict(), dict(qkv_bias=True, hidden=96, ffn=80, heads=6, kv_heads=2, head_dim=16)]  # Llama; Qwen2 GQA


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("learned-text") / "sample.txt"
    f.write_text(TEXT, encoding="utf-8")
    return f


def _random_orthogonal(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(*shape, generator=g, dtype=torch.float64))[0]


# ------------------------------------------------------------------------------------------------ optimisers

@pytest.mark.parametrize("opt_cls,lr", [(CayleySGD, 1.5), (CayleyAdam, 0.05)])
def test_cayley_steps_stay_orthogonal_and_descend(opt_cls, lr):
    """Loss ‖R − T‖² to a target rotation T (batched: 3 independent matrices)."""
    target = _random_orthogonal((3, 12, 12), 1)
    r = torch.nn.Parameter(_random_orthogonal((3, 12, 12), 2).float())
    opt = opt_cls([r], lr=lr)

    def loss():
        return (r.double() - target).pow(2).sum()

    before = loss().item()
    for _ in range(60):
        opt.zero_grad()
        loss().backward()
        opt.step()
        assert orthogonality_error(opt.state[r]["master"]) < 1e-10  # the float64 master copy
        assert orthogonality_error(r) < 1e-5  # the float32 parameter
    assert loss().item() < 0.5 * before


def test_cayley_sgd_step_is_capped_by_the_one_norm():
    r = torch.nn.Parameter(torch.eye(6))
    opt = CayleySGD([r], lr=100.0)
    r.grad = torch.randn(6, 6) * 10
    opt.step()
    omega = (r.grad.double() - r.grad.double().T) / 2  # R = I: Ω = ½(G − Gᵀ)
    assert float(opt.state[r]["alpha"]) == pytest.approx(1 / omega.abs().sum(0).max().item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------ exactness

def _perturbed(sim: OnlineTransforms, seed: int) -> None:
    """Move the transforms well away from their Hadamard start (so fusion is really tested)."""
    with torch.no_grad():
        sim.r1.copy_(_random_orthogonal(sim.r1.shape, seed).float())
        sim.r2.copy_(_random_orthogonal(sim.r2.shape, seed + 1).float())
        if sim.log_s is not None:
            g = torch.Generator().manual_seed(seed)
            for v in sim.log_s.values():
                v.copy_(0.3 * torch.randn(v.shape, generator=g))


@pytest.mark.parametrize("kind", ["spinquant", "ostquant"])
@pytest.mark.parametrize("kw", SHAPES, ids=["llama", "qwen2-gqa"])
def test_fused_transforms_keep_the_fp_model_and_match_the_simulation(kind, kw):
    model = tiny_llama(layers=2, **kw)
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    spec = ActSpec()
    sim_model = copy.deepcopy(model)
    ost = kind == "ostquant"
    sim = OnlineTransforms(LlamaAdapter(model).shape, spec, r2_per_head=ost, scales=ost)
    _perturbed(sim, 3)
    sim.install(sim_model)
    sim.set_quantize(False)
    torch.testing.assert_close(sim_model(ids).logits, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    sim.set_quantize(True)
    simulated = sim_model(ids).logits
    sim.remove()
    t = sim.result(torch.optim.SGD([sim.r1], lr=0.0))
    t = LearnedTransforms(t.r1, t.r2, t.scales)
    assert t.r2.shape[:2] == (2, model.config.num_key_value_heads)
    fuse_transforms(model, t, seed=0)
    scale = ref.abs().max().item()
    assert (model(ids).logits - ref).abs().max().item() < 1e-4 * scale  # FP function unchanged by fusion
    quantize_structure(model, spec)
    with torch.no_grad():
        fused = model(ids).logits
    # the online simulation trained on is the fused W16A4KV4 model
    assert (fused - simulated).abs().max().item() < 1e-4 * scale
    assert (fused - ref).abs().max().item() > 1e-3 * scale  # (quantization is on)


def test_kl_top_is_zero_for_the_fp_model_and_positive_otherwise():
    logits = torch.randn(2, 5, 40)
    lp, ix = kl_top_targets(logits, 10)
    assert ix.shape == (2, 5, 10)
    assert kl_top(logits, lp, ix).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_top(logits + torch.randn_like(logits), lp, ix).item() > 1e-3


# ------------------------------------------------------------------------------------------------ training

@pytest.mark.parametrize("kind,lr", [("spinquant", 1.5), ("ostquant", 5e-3)])
def test_training_lowers_the_end_to_end_loss(kind, lr):
    """Same two windows every step: the trained loss must go down (A4KV4 make it far from the FP optimum)."""
    torch.manual_seed(0)
    model = tiny_llama(layers=2, hidden=64, ffn=96, heads=4, kv_heads=2)
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, 256, (2, SEQLEN), generator=torch.Generator().manual_seed(1))
    log = {}
    t = train_transforms(model, ids, ActSpec(a_bits=3, kv_bits=3), kind,
                         TrainSettings(steps=12, lr=lr, batch=2, topk=50), log=log)
    assert len(log["losses"]) == 12
    assert min(log["losses"][-3:]) < log["losses"][0]
    assert orthogonality_error(t.r1) < 1e-10 and orthogonality_error(t.r2) < 1e-10
    assert (t.scales is not None) == (kind == "ostquant")
    assert not any(hasattr(layer.self_attn, "kv_point") for layer in model.model.layers)  # hooks removed


def test_ostquant_targets_are_the_fp_models_own_logits(monkeypatch):
    """KL-Top's targets come from the model as it came, before the transforms are installed (with them and no
    quantizers the function is the same, at several times the cost): each window's logits, bit for bit."""
    from baseq.calibrate import learned_rotations as lr_mod

    torch.manual_seed(0)
    model = tiny_llama(layers=2, hidden=64, ffn=96, heads=4, kv_heads=2)
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, 256, (3, SEQLEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # (one window a forward, as the targets are computed)
        ref = [model(ids[j:j + 1], use_cache=False).logits[0] for j in range(3)]
    seen = []
    monkeypatch.setattr(lr_mod, "kl_top_targets", lambda logits, k: seen.append(logits.clone()) or
                        kl_top_targets(logits, k))
    train_transforms(model, ids, ActSpec(a_bits=4, kv_bits=4), "ostquant", TrainSettings(steps=2, batch=2, topk=20))
    assert len(seen) == 3  # one per window the steps use (steps 0, 1: windows 0, 1 and 2, 0)
    for j in range(3):
        assert torch.equal(seen[j], ref[j])


def test_training_simulates_the_kv_shift_of_a_model_with_key_biases():
    """With ``kv_shift`` (the fused model quantizes K / V around channel means, Qwen2's k_proj biases), the training
    quantizes each batch's K / V around their own means: the 4-bit keys then keep the token-dependent part a large
    key bias would drown — a much lower loss than without the shift."""
    from baseq.calibrate.learned_rotations import BatchMeanKV

    torch.manual_seed(0)
    model = tiny_llama(layers=2, seed=3, **SHAPES[1])
    for layer in model.model.layers:
        layer.self_attn.k_proj.bias.data += 40.0 * torch.randn_like(layer.self_attn.k_proj.bias)
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, 256, (2, SEQLEN), generator=torch.Generator().manual_seed(1))
    spec = ActSpec(a_bits=16, kv_bits=4)
    losses = {}
    for shift in (False, True):
        m = copy.deepcopy(model)
        sim = OnlineTransforms(LlamaAdapter(m).shape, spec, kv_shift=shift)
        sim.install(m)
        with torch.no_grad():
            logits = m(ids, use_cache=False).logits
            sim.set_quantize(False)
            ref = m(ids, use_cache=False).logits
        losses[shift] = (logits - ref).pow(2).mean().item()
        kv = m.model.layers[0].self_attn.kv_point
        assert isinstance(kv, BatchMeanKV) == shift
        assert bool(kv.k_shift.abs().max() > 1.0) == shift  # (set by the quantized forward)
        sim.remove()
    assert losses[True] < 0.5 * losses[False], losses


# ------------------------------------------------------------------------------------------------ resuming

def _train(model, ids, kind, checkpoint=None, resume=False, steps=5):
    log = {}
    lr = 1.5 if kind == "spinquant" else 5e-3
    t = train_transforms(model, ids, ActSpec(a_bits=3, kv_bits=3), kind,
                         TrainSettings(steps=steps, lr=lr, batch=2, topk=50), log=log,
                         checkpoint=checkpoint, resume=resume)
    return t, log


def _same(a: LearnedTransforms, b: LearnedTransforms) -> bool:
    return len(a.tensors()) == len(b.tensors()) and all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))


@pytest.mark.parametrize("kind", ["spinquant", "ostquant"])
def test_interrupted_training_resumes_to_the_same_transforms(kind, tmp_path, monkeypatch):
    """Cut after 2 of 5 steps, resumed from the saved state: the transforms and losses of an uncut run, bit for bit;
    a finished state is not trained again (no forward pass) but still folds the norms; another run's state is
    ignored, and so is any state without ``resume``."""
    from baseq.calibrate.learned_rotations import TrainingCheckpoint

    torch.manual_seed(0)
    base = tiny_llama(layers=2, hidden=64, ffn=96, heads=4, kv_heads=2)
    for p in base.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, 256, (4, SEQLEN), generator=torch.Generator().manual_seed(1))
    ref, ref_log = _train(copy.deepcopy(base), ids, kind)

    ckpt = TrainingCheckpoint(tmp_path / "rotations.safetensors", "run-a", every=0)
    opt_cls = CayleyAdam if kind == "ostquant" else CayleySGD
    step, calls = opt_cls.step, []

    def cut(self, closure=None):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(self, closure)

    monkeypatch.setattr(opt_cls, "step", cut)
    with pytest.raises(KeyboardInterrupt):
        _train(copy.deepcopy(base), ids, kind, ckpt)
    monkeypatch.setattr(opt_cls, "step", step)
    assert ckpt.path.is_file() and not list(tmp_path.glob(".*.tmp"))

    got, log = _train(copy.deepcopy(base), ids, kind, ckpt, resume=True)
    assert log["resumed_at"] == 2 and log["losses"] == ref_log["losses"]
    assert _same(got, ref)

    again = copy.deepcopy(base)
    forwards = []
    again.register_forward_pre_hook(lambda *a: forwards.append(1))
    done, log = _train(again, ids, kind, ckpt, resume=True)
    assert log["resumed_at"] == 5 and not forwards and _same(done, ref)
    assert all(torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
               for layer in again.model.layers)  # folded, as after training
    _, log = _train(copy.deepcopy(base), ids, kind, TrainingCheckpoint(ckpt.path, "run-b"), resume=True)
    assert "resumed_at" not in log
    _, log = _train(copy.deepcopy(base), ids, kind, ckpt)
    assert "resumed_at" not in log


def test_quantize_resumes_a_learned_rotation_from_its_saved_state(text_file, tmp_path):
    """The pipeline keeps the training state in the work folder under the run's fingerprint: ``resume`` reuses it
    (no step trained again) and gives the same quantized model."""
    tok = byte_tokenizer()
    cfg = QuantizeConfig(method="spinquant", bits=BitsConfig(),
                         calib=CalibConfig(data=str(text_file), samples=4, seqlen=SEQLEN, batch_size=4))
    cfg.rotation.steps, cfg.rotation.batch, cfg.rotation.seqlen = 3, 2, SEQLEN
    work = tmp_path / ".out.partial"
    first = tiny_llama(layers=2, seed=2)
    r1 = quantize_model(first, tok, cfg, progress=False, log_fn=lambda m: None, work_dir=work)
    assert (work / "rotations.safetensors").is_file() and "resumed_at" not in r1["rotation"]
    second = tiny_llama(layers=2, seed=2)
    r2 = quantize_model(second, tok, cfg, progress=False, log_fn=lambda m: None, work_dir=work, resume=True)
    assert r2["rotation"]["resumed_at"] == 3 and r2["rotation"]["losses"] == r1["rotation"]["losses"]
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ end to end

@pytest.mark.filterwarnings("ignore:no Hadamard matrix")
@pytest.mark.parametrize("method,rotations,kw", [
    ("spinquant", "hadamard", SHAPES[1]),
    ("ostquant", "hadamard", dict(hidden=48, ffn=80, heads=4, kv_heads=2, tied=False)),
    ("baseq", "spinquant", SHAPES[0]),
], ids=["spinquant-qwen2", "ostquant-untied", "baseq-on-spinquant"])
def test_methods_quantize_save_load_and_run(method, rotations, kw, text_file, tmp_path):
    tok = byte_tokenizer()
    model = tiny_llama(layers=2, seed=2, **kw)
    cfg = QuantizeConfig(method=method, bits=BitsConfig(),
                         calib=CalibConfig(data=str(text_file), samples=4, seqlen=SEQLEN, batch_size=4))
    cfg.rotation.kind, cfg.rotation.steps, cfg.rotation.batch, cfg.rotation.seqlen = rotations, 3, 2, SEQLEN
    cfg.train.epochs = 1
    report = quantize_model(model, tok, cfg, progress=False, log_fn=lambda m: None)
    assert report["rotation"]["kind"] == cfg.rotation_source and len(report["rotation"]["losses"]) == 3
    assert report["method"] == {"spinquant": "spinquant", "ostquant": "ostquant"}.get(method, "baseq-spinquant")
    out = save_packed(model, tok, tmp_path / "packed", act_spec(cfg), {"method": cfg.label, "bits": "W4A4KV4"},
                      w_bits=4, w_group=0, embed_bits=16)
    rt, _ = load(str(out))
    windows = eval_windows(tok, str(text_file), SEQLEN, 2)
    with torch.no_grad():
        ref = model(windows, use_cache=False).logits
        got = rt(windows, use_cache=False).logits
    assert ((got - ref).abs() / ref.abs().max()).max() < 1e-5


def test_ranks_left_idle_by_a_small_rotation_batch_are_named():
    from baseq.calibrate.pipeline import idle_ranks

    cfg = QuantizeConfig(method="ostquant")
    assert idle_ranks(cfg, 1) is None
    line = idle_ranks(cfg, 3)  # the default batch is one window a step
    assert line.startswith("warning: 3 ranks share training steps of --rotation-batch 1") and "2 rank(s)" in line
    cfg.rotation.batch = 4
    assert idle_ranks(cfg, 3) is None
    assert idle_ranks(QuantizeConfig(method="quarot"), 8) is None  # nothing trained end to end


def test_registry_labels_and_options():
    assert QuantizeConfig(method="spinquant").rotation_source == "spinquant"
    assert QuantizeConfig(method="spinquant").weight_method == "gptq"
    assert QuantizeConfig(method="ostquant", weights="rtn").label == "ostquant"
    cfg = QuantizeConfig(method="baseq")
    cfg.rotation.kind = "spinquant"
    assert cfg.validate().label == "baseq-spinquant" and act_spec(cfg).learnable_clip
    assert not act_spec(QuantizeConfig(method="spinquant")).learnable_clip
    assert QuantizeConfig(method="quarot", weights="gptaq").label == "quarot-gptaq"
    assert QuantizeConfig(method="gptq", weights="rtn").weight_method == "gptq"
    bad = QuantizeConfig(method="ostquant")
    bad.rotation.kind = "calibrated"
    with pytest.raises(BaseqError, match="ostquant takes rotations ostquant"):
        bad.validate()
    assert cfg.rotation.learning_rate("spinquant") == 1.5
    cfg.rotation.lr = 0.25
    assert cfg.rotation.learning_rate("ostquant") == 0.25


@pytest.mark.parametrize("argv", [["--method", "spinquant"], ["--method", "ostquant"],
                                  ["--method", "baseq", "--rotations", "spinquant"]])
def test_lazy_refuses_end_to_end_methods_in_one_line(argv, tmp_path, capsys):
    code = main(["quantize", "--model", str(tmp_path / "missing"), "--lazy", *argv, "--rotation-steps", "5"])
    err = capsys.readouterr().err.strip("\n").splitlines()
    assert code == 2 and len(err) == 1
    assert "needs the whole model in memory" in err[0] and "--lazy" in err[0]


def test_rotation_flags_reach_the_config():
    from baseq.cli import build_parser, config_from_args

    args = build_parser().parse_args(["quantize", "--method", "spinquant", "--rotation-steps", "7",
                                      "--rotation-lr", "0.5", "--rotation-batch", "2", "--rotation-seqlen", "64"])
    r = config_from_args(args).rotation
    assert (r.steps, r.lr, r.batch, r.seqlen) == (7, 0.5, 2, 64)


@pytest.mark.filterwarnings("ignore:no Hadamard matrix")
def test_learned_rotations_save_in_the_fake_format_and_train_in_bfloat16(text_file, tmp_path):
    """The learned R1 is one tensor at both ends: the fake format saves it once and loads it to both (was a
    safetensors 'tensors share memory' traceback after the whole calibration). OSTQuant trains a bfloat16 model
    (its float32 scales met half activations: a dtype-mismatch traceback)."""
    from baseq.runtime.save import save_fake

    tok = byte_tokenizer()
    for method, dtype in (("spinquant", torch.float32), ("ostquant", torch.bfloat16)):
        model = tiny_llama(layers=2, seed=2, **SHAPES[0]).to(dtype)
        cfg = QuantizeConfig(method=method, weights="rtn",
                             calib=CalibConfig(data=str(text_file), samples=4, seqlen=SEQLEN, batch_size=4))
        cfg.rotation.steps, cfg.rotation.batch, cfg.rotation.seqlen = 2, 2, SEQLEN
        quantize_model(model, tok, cfg, progress=False, log_fn=lambda m: None)
        out = save_fake(model, tok, tmp_path / method, act_spec(cfg), {"method": cfg.label, "bits": "W4A4KV4"})
        back, _ = load(str(out), dtype=dtype)
        windows = eval_windows(tok, str(text_file), SEQLEN, 1)
        with torch.no_grad():
            ref, got = model(windows, use_cache=False).logits, back(windows, use_cache=False).logits
        assert torch.isfinite(ref).all() and torch.equal(got, ref), method


def test_a_rotation_training_that_diverges_stops_in_one_line(text_file):
    from baseq.errors import BaseqError

    cfg = QuantizeConfig(method="ostquant", weights="rtn",
                         calib=CalibConfig(data=str(text_file), samples=4, seqlen=SEQLEN, batch_size=4))
    cfg.rotation.steps, cfg.rotation.batch, cfg.rotation.seqlen, cfg.rotation.lr_scale = 3, 2, SEQLEN, 1e30
    with pytest.raises(BaseqError, match=r"ostquant: the training loss or the learned parameters are not finite"):
        quantize_model(tiny_llama(layers=2, seed=2, **SHAPES[0]), byte_tokenizer(), cfg, progress=False,
                       log_fn=lambda m: None)

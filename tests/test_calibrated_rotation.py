"""Calibrated rotations (DartQuant-style): QR parametrisation, the whip loss, exact fusion, end to end."""

from __future__ import annotations

import pytest
import torch

from baseq.calibrate.pipeline import quantize_model
from baseq.config import QuantizeConfig
from baseq.rotation.calibrated import (apply_value_rotations, calibrate_rotations, per_token_error, qr_orthogonal,
                                       train_rotation, whip_loss)
from baseq.rotation.fuse import rotate_model
from baseq.rotation.hadamard import orthogonal_matrix
from baseq.testing import byte_tokenizer, tiny_llama


def test_qr_orthogonal_is_orthogonal_and_fixes_an_orthogonal_start():
    z = torch.randn(3, 12, 12, dtype=torch.float64)
    q = qr_orthogonal(z)
    torch.testing.assert_close(q @ q.transpose(-1, -2), torch.eye(12, dtype=torch.float64).expand(3, 12, 12))
    h = orthogonal_matrix(12, seed=4)
    torch.testing.assert_close(qr_orthogonal(h), h)  # starts exactly at the Hadamard


def test_whip_loss_is_minimal_for_flat_vectors():
    flat = torch.ones(1, 16)
    spiky = torch.zeros(1, 16)
    spiky[0, 0] = 4.0  # same RMS (1), one outlier
    assert whip_loss(flat) < whip_loss(spiky)


def test_training_flattens_outlier_activations():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2000, 16, generator=g)
    x[..., 3] *= 12.0  # an outlier channel the Hadamard spreads but a fitted rotation can do better with
    x[..., 7] += 5.0
    init = orthogonal_matrix(16, seed=0).expand(2, 16, 16)
    r, before, after = train_rotation(x, init, steps=150, lr=1.0, seed=0)
    assert after < before
    torch.testing.assert_close(r @ r.transpose(-1, -2), torch.eye(16, dtype=torch.float64).expand(2, 16, 16))
    assert per_token_error(x[0], r[0]) < per_token_error(x[0], init[0])


@pytest.mark.parametrize("kw", [{}, {"hidden": 96, "ffn": 5 * 16, "heads": 6, "kv_heads": 2, "head_dim": 12}])
def test_calibrated_rotations_keep_the_fp_model_function(kw):
    model = tiny_llama(layers=2, **kw)
    ids = torch.randint(0, 256, (3, 24))
    ref = model(ids).logits
    r1, r2 = calibrate_rotations(model, ids, seed=1, steps=5, tokens=40)
    s = model.config
    assert r1.shape == (s.hidden_size,) * 2
    assert r2.shape == (s.num_hidden_layers, s.num_key_value_heads, r1.shape[0] // s.num_attention_heads
                        if "head_dim" not in kw else kw["head_dim"], r2.shape[-1])
    rotate_model(model, seed=1, r1=r1)
    apply_value_rotations(model, r2, seed=1)
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_quantize_with_calibrated_rotations(tmp_path):
    model, tok = tiny_llama(layers=2), byte_tokenizer()
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 200)
    cfg = QuantizeConfig.from_dict({"method": "quarot", "rotation": {"kind": "calibrated", "steps": 3, "windows": 2},
                                    "calib": {"data": str(text), "samples": 4, "seqlen": 32, "batch_size": 2}})
    report = quantize_model(model, tok, cfg, progress=False, log_fn=lambda m: None)
    assert set(report["rotation"]) == {"r1_loss_before", "r1_loss_after", "r2_loss_before", "r2_loss_after"}
    assert torch.isfinite(model(torch.randint(0, 256, (1, 16))).logits).all()

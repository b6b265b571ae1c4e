"""Which code made a result: the code id, where it is recorded (packed folder, reports, block logs, checkpoints),
and a run resumed after the code changed, which must say so and record both codes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from baseq.calibrate.stages import GPTQStage
from baseq.cli import main
from baseq.provenance import UNKNOWN, code_id, made_by, mixed_code

SEQLEN = 32
OTHER = "0.0.9+0123456789ab"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("text") / "t.txt"
    f.write_text("\n".join(f"Line {i}: a brown fox jumps over {i * 7} lazy dogs." for i in range(80)) + "\n")
    return f


def _quantize(model, text_file, out, *extra) -> list[str]:
    return ["quantize", "--model", str(model), "--method", "quarot", "--weights", "gptq", "--calib-data",
            str(text_file), "--calib-samples", "4", "--calib-seqlen", str(SEQLEN), "--no-eval", "--quiet",
            "--out", str(out), *extra]


def _crash_after_block_0(model, text_file, out: Path, monkeypatch) -> Path:
    """A quantize run that dies in block 1; returns its checkpoint's progress.json."""
    original = GPTQStage.run

    def crash_on_block_1(self, ctx):
        if ctx.index == 1:
            raise RuntimeError("simulated crash")
        return original(self, ctx)

    with monkeypatch.context() as m:
        m.setattr(GPTQStage, "run", crash_on_block_1)
        with pytest.raises(RuntimeError, match="simulated crash"):
            main(_quantize(model, text_file, out))
    return out.parent / f".{out.name}.partial" / "progress.json"


def test_code_id_is_the_version_and_a_hash_of_the_sources():
    import baseq

    cid = code_id()
    assert re.fullmatch(re.escape(baseq.__version__) + r"\+[0-9a-f]{12}", cid)
    code_id.cache_clear()
    assert code_id() == cid  # the same sources, the same id
    assert mixed_code(cid, "blocks 0–3") is None
    line = mixed_code(OTHER, "blocks 0–3")
    assert line.startswith("warning: blocks 0–3 were made by other baseq code (0.0.9+0123456789ab; this is")
    assert "\n" not in line and UNKNOWN in mixed_code(None, "block 0")
    assert made_by({cid}) == {"code": cid} and made_by({cid, OTHER})["mixed_with"] == [OTHER]


def test_resumed_blocks_are_named_as_spans():  # interleaved codes after several resumes: no overlapping ranges
    from baseq.calibrate.engine import block_spans

    assert block_spans([7, 0, 1, 2, 5, 8]) == "blocks 0–2, 5, 7–8"
    assert block_spans([3]) == "block 3" and block_spans([3, 4]) == "blocks 3–4"


def test_a_run_resumed_across_code_says_so_and_its_folder_records_both(tiny_model_dir, text_file, tmp_path,
                                                                          monkeypatch, capsys):
    """The packed folder, the quantize report and each block's log name the code; a crashed run whose finished
    blocks came from other code is resumed with one warning line, and the folder lists both codes."""
    plain, js = tmp_path / "plain", tmp_path / "plain.json"
    assert main(_quantize(tiny_model_dir, text_file, plain, "--json", str(js))) == 0
    report = json.loads(js.read_text())
    assert report["made_by"] == {"code": code_id()}
    assert json.loads((plain / "baseq.json").read_text())["made_by"] == {"code": code_id()}
    assert {b["code"] for b in report["blocks"]} == {code_id()}

    out = tmp_path / "out"
    progress = _crash_after_block_0(tiny_model_dir, text_file, out, monkeypatch)
    state = json.loads(progress.read_text())
    assert state["done"] == 0 and state["code"] == code_id()
    state["code"], state["log"][0]["code"] = OTHER, OTHER  # as if an earlier baseq had written block 0
    progress.write_text(json.dumps(state))

    capsys.readouterr()
    js = tmp_path / "out.json"
    assert main(_quantize(tiny_model_dir, text_file, out, "--resume", "--json", str(js))) == 0
    report = json.loads(js.read_text())
    assert report["made_by"] == {"code": code_id(), "mixed_with": [OTHER]}
    assert json.loads((out / "baseq.json").read_text())["made_by"] == report["made_by"]
    assert [b["code"] for b in report["blocks"]][:2] == [OTHER, code_id()]

    ev = tmp_path / "eval.json"
    assert main(["eval", "--model", str(out), "--data", str(text_file), "--seqlen", str(SEQLEN), "--windows", "1",
                 "--quiet", "--json", str(ev)]) == 0
    ev = json.loads(ev.read_text())
    assert ev["code"] == code_id() and ev["model_made_by"] == report["made_by"]


def test_quiet_resume_across_code_still_warns(tiny_model_dir, text_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    progress = _crash_after_block_0(tiny_model_dir, text_file, out, monkeypatch)
    state = json.loads(progress.read_text())
    del state["code"]  # a checkpoint of a baseq that did not record its code
    for e in state["log"]:
        del e["code"]
    progress.write_text(json.dumps(state))
    capsys.readouterr()
    assert main(_quantize(tiny_model_dir, text_file, out, "--resume")) == 0
    err = capsys.readouterr()
    lines = [ln for ln in (err.out + err.err).splitlines() if "made by other baseq code" in ln]
    assert len(lines) == 1 and "block 0 were made" in lines[0] and UNKNOWN in lines[0]


def test_a_rotation_training_state_of_other_code_is_resumed_with_a_warning(tmp_path):
    import torch

    from baseq.calibrate.learned_rotations import TrainSettings, TrainingCheckpoint, train_transforms
    from baseq.quant.qmodel import ActSpec
    from baseq.testing import tiny_llama

    def train(ckpt, resume):
        model = tiny_llama(layers=1, hidden=32, ffn=48, heads=2, kv_heads=1, seed=0)
        for p in model.parameters():
            p.requires_grad_(False)
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
        log = {}
        train_transforms(model, ids, ActSpec(a_bits=4, kv_bits=4), "spinquant", TrainSettings(steps=2, batch=1),
                         log=log, checkpoint=ckpt, resume=resume)
        return log

    said = []
    ckpt = TrainingCheckpoint(tmp_path / "rotations.safetensors", "run", every=0, say=said.append)
    train(ckpt, False)
    with safe_open(str(ckpt.path), framework="pt") as f:
        meta = f.metadata()
    assert meta["code"] == code_id()
    assert train(ckpt, True)["resumed_code"] == code_id() and said == []
    save_file(load_file(ckpt.path), str(ckpt.path), metadata={**meta, "code": OTHER})
    log = train(ckpt, True)
    assert log["resumed_code"] == OTHER
    assert len(said) == 1 and said[0].startswith("warning: training steps 1–2 were made by other baseq code")

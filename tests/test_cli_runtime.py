"""The command line around the packed runtime: ``baseq quantize`` writing packed folders, ``baseq eval`` /
``generate`` / ``bench`` on them, and the early checks (context length, task names)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from baseq.cli import main
from baseq.errors import BaseqError

SEQLEN = 32
TEXT = "\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog, number {i * i}." for i in range(60)) + "\n"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("text") / "sample.txt"
    f.write_text(TEXT, encoding="utf-8")
    return f


def _quantize(model, text_file, out, *extra) -> list[str]:
    """QuaRot-RTN (data-free: no calibration options) evaluated on ``text_file``."""
    return ["quantize", "--model", str(model), "--method", "quarot", "--weights", "rtn", "--data", str(text_file),
            "--seqlen", str(SEQLEN), "--windows", "3", "--quiet", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tiny_model_dir, text_file) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("q")
    out, js = folder / "packed", folder / "r.json"
    assert main(_quantize(tiny_model_dir, text_file, out, "--json", str(js))) == 0
    return out, json.loads(js.read_text())


def _one_error_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("baseq: error:") and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_quantize_writes_a_packed_folder_that_eval_runs(packed, text_file, tmp_path, capsys):
    out, result = packed
    meta = json.loads((out / "baseq.json").read_text())
    assert meta["format"] == "baseq-packed/1" and result["format"] == "packed"
    assert abs(result["packed_check"]["rel_diff"]) < 1e-6  # the saved model, run by the runtime, matches
    js = tmp_path / "e.json"
    assert main(["eval", "--model", str(out), "--data", str(text_file), "--seqlen", str(SEQLEN), "--windows", "3",
                 "--quiet", "--json", str(js)]) == 0
    ev = json.loads(js.read_text())
    assert ev["ppl"] == pytest.approx(result["ppl_quant"], rel=2e-3)
    assert ev["method"] == "quarot-rtn"


def test_the_folder_and_report_record_the_settled_block_loss(text_file, tmp_path):
    from baseq.testing import save_tiny_model

    model = save_tiny_model(tmp_path / "gemma3", "gemma3", layers=1)
    args = ["quantize", "--model", str(model), "--calib-data", str(text_file), "--calib-samples", "2",
            "--calib-seqlen", "16", "--epochs", "1", "--no-eval", "--quiet", "--out", str(tmp_path / "o"),
            "--json", str(tmp_path / "r.json")]
    assert main(args) == 0
    meta, report = (json.loads(p.read_text()) for p in (tmp_path / "o" / "baseq.json", tmp_path / "r.json"))
    assert meta["config"]["train"]["loss"] == report["config"]["train"]["loss"] == "token"  # auto: post-norms


def test_fake_format_still_available(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "fake"
    assert main(_quantize(tiny_model_dir, text_file, out, "--format", "fake", "--no-eval")) == 0
    assert json.loads((out / "baseq.json").read_text())["format"] == "baseq-fake-quant/2"


def test_embed_bits_8_makes_a_smaller_folder(packed, tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "e8"
    assert main(_quantize(tiny_model_dir, text_file, out, "--embed-bits", "8", "--no-eval")) == 0
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    assert size(out) < size(packed[0])
    assert json.loads((out / "baseq.json").read_text())["embed_bits"] == 8


def test_generate_streams_text_for_packed_and_fp_models(packed, tiny_model_dir, capsys):
    for model in (packed[0], tiny_model_dir):
        assert main(["generate", "--model", str(model), "--prompt", "Line 3: the quick", "--max-new-tokens", "8"]) == 0
        cap = capsys.readouterr()
        assert cap.out.endswith("\n") and len(cap.out) > 1
        assert "8 new tokens" in cap.err and "tok/s" in cap.err


def test_generate_sampling_is_seeded(packed, capsys):
    args = ["generate", "--model", str(packed[0]), "--prompt", "Line", "--max-new-tokens", "12", "--temperature",
            "1.0", "--top-p", "0.9", "--quiet"]
    outs = []
    for seed in ("1", "1", "2"):
        assert main(args + ["--seed", seed]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]


@pytest.mark.parametrize("case", ["too-long", "chat-template", "bad-temperature", "zero-tokens", "greedy-top-p",
                                  "packed-dtype"])
def test_generate_bad_input(case, packed, capsys):
    args = ["generate", "--model", str(packed[0]), "--prompt", "hello"]
    if case == "too-long":  # the tiny model's context is 512 positions
        args[-1], frag = "x" * 600, "longer than the model's context of 512 tokens"
    elif case == "chat-template":
        args, frag = args + ["--chat"], "no chat template"
    elif case == "bad-temperature":
        args, frag = args + ["--temperature", "-1"], "--temperature"
    elif case == "greedy-top-p":  # greedy decoding would drop it
        args, frag = args + ["--top-p", "0.5"], "--top-p only applies when sampling"
    elif case == "packed-dtype":  # the integer runtime would drop it
        args, frag = args + ["--dtype", "bf16"], "--dtype bfloat16: a packed folder runs on its integer codes"
    else:
        args, frag = args + ["--max-new-tokens", "0"], "--max-new-tokens"
    assert main(args) == 2
    _one_error_line(capsys.readouterr().err, frag)


def test_bench_measures_model_and_baseline(packed, tiny_model_dir, tmp_path, capsys):
    js = tmp_path / "b.json"
    assert main(["bench", "--model", str(packed[0]), "--baseline", str(tiny_model_dir), "--prefill", "16",
                 "--decode", "4", "--repeats", "1", "--threads", "1", "--json", str(js), "--quiet"]) == 0
    res = json.loads(js.read_text())
    for key in ("model", "baseline"):
        r = res[key]
        assert {"prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_mb", "disk_mb"} <= set(r)
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["ttft_s"] > 0 and r["peak_rss_mb"] > 50
    assert res["model"]["method"] == "quarot-rtn" and res["baseline"]["method"] == "fp"
    assert res["threads"] == 1 and res["ratio"]["disk_mb"] > 0
    from baseq.runtime.native import native_ops  # the packed W4 model holds its codes two a byte where the kernel builds

    assert res["model"]["weights_held"] == ("4-bit, two a byte" if native_ops() is not None else "int8")
    assert res["baseline"]["weights_held"] is None
    out = capsys.readouterr().out
    assert "model / baseline" in out and "weights held" in out


def test_bench_bad_model_is_one_line(tmp_path, capsys):
    assert main(["bench", "--model", str(tmp_path / "nope"), "--baseline", "none", "--prefill", "8", "--decode", "2",
                 "--repeats", "1", "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, "benchmarking", "unknown model")


def test_bench_worker_killed_for_memory_is_one_line(tiny_model_dir, monkeypatch, capsys):
    import subprocess

    killed = subprocess.CompletedProcess([], returncode=-9, stdout="", stderr="")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: killed)  # as the out-of-memory killer leaves it
    assert main(["bench", "--model", str(tiny_model_dir), "--baseline", "none", "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, "benchmarking", "killed (SIGKILL: out of memory?)")


def test_eval_refuses_a_seqlen_past_the_context(tiny_model_dir, text_file, capsys):
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(text_file), "--seqlen", "100000",
                 "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, "--seqlen (100,000 tokens) is longer than the model's context of 512")


def test_quantize_refuses_a_calib_seqlen_past_the_context(tiny_model_dir, text_file, tmp_path, capsys):
    assert main(_quantize(tiny_model_dir, text_file, tmp_path / "o", "--weights", "gptq", "--calib-data",
                          str(text_file), "--calib-seqlen", "4096")) == 2
    _one_error_line(capsys.readouterr().err, "--calib-seqlen")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", ["spinquant", "ostquant"])
def test_quantize_refuses_rotation_windows_past_the_context(method, tiny_model_dir, text_file, tmp_path, capsys):
    assert main(_quantize(tiny_model_dir, text_file, tmp_path / "o", "--method", method, "--weights", "gptq",
                          "--calib-data", str(text_file), "--rotation-seqlen", "4096")) == 2
    _one_error_line(capsys.readouterr().err, "--rotation-seqlen (4,096 tokens) is longer than the model's context")
    assert not (tmp_path / "o").exists()


def test_quantize_refuses_more_train_samples_than_calibration_windows(tiny_model_dir, text_file, tmp_path, capsys):
    assert main(_quantize(tiny_model_dir, text_file, tmp_path / "o", "--method", "baseq", "--weights", "gptq",
                          "--calib-data", str(text_file), "--calib-samples", "4", "--train-samples", "5")) == 2
    _one_error_line(capsys.readouterr().err, "--train-samples 5 is more than the 4 calibration windows")
    assert not (tmp_path / "o").exists()


def test_unknown_tasks_fail_before_any_work(tiny_model_dir, text_file, tmp_path, capsys, monkeypatch):
    import baseq.eval.perplexity as perplexity

    monkeypatch.setattr(perplexity, "perplexity", lambda *a, **k: pytest.fail("perplexity ran before the check"))
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(text_file), "--tasks", "bb:nosuch",
                 "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, "unknown BIG-bench task 'bb:nosuch'")
    empty = tmp_path / "tasks"
    empty.mkdir()
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(text_file), "--tasks", "bb_siqa",
                 "--tasks-dir", str(empty), "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, "social_iqa.json for task 'bb_siqa' not found")
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(text_file), "--tasks", "siqa",
                 "--standard-dir", str(empty), "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, "siqa.jsonl for task 'siqa' not found")


@pytest.mark.parametrize("extra", [["--limit", "5"], ["--tasks-dir", "."], ["--limit", "5", "--standard-dir", "."]])
def test_task_options_without_tasks_are_one_line(extra, packed, text_file, capsys):
    assert main(["eval", "--model", str(packed[0]), "--data", str(text_file), "--seqlen", str(SEQLEN),
                 "--windows", "1", *extra]) == 2
    _one_error_line(capsys.readouterr().err, ("only applies" if len(extra) == 2 else "only apply")
                    + " to zero-shot tasks: add --tasks", extra[-2])


def test_quantize_calibrates_on_a_mix_of_texts(tiny_model_dir, text_file, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("Another text altogether, about rivers and the sea. " * 60, encoding="utf-8")
    js = tmp_path / "r.json"
    args = _quantize(tiny_model_dir, text_file, tmp_path / "q", "--json", str(js), "--no-eval", "--weights", "gptq",
                     "--calib-data", f"{text_file}+{other}", "--calib-samples", "4", "--calib-seqlen", "32")
    assert main(args) == 0
    assert json.loads(js.read_text())["config"]["calib"]["data"] == f"{text_file}+{other}"


def test_quantize_refuses_an_already_quantized_folder(packed, text_file, tmp_path, capsys):
    assert main(_quantize(packed[0], text_file, tmp_path / "again")) == 2
    _one_error_line(capsys.readouterr().err, "written by 'baseq quantize' already")


def test_default_out_from_a_fresh_working_directory(tiny_model_dir, text_file, tmp_path, monkeypatch):
    """The README's first command from an empty folder: the default --out (out/MODEL-METHOD-BITS) and --json in
    folders that do not exist yet are created when written."""
    cwd = tmp_path / "fresh"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    argv = _quantize(tiny_model_dir, text_file, "unused", "--json", "res/deep/r.json")
    argv = argv[:argv.index("--out")] + argv[argv.index("--out") + 2:]
    assert main(argv) == 0
    out = cwd / "out" / f"{tiny_model_dir.name}-quarot-rtn-W4A4KV4"
    assert json.loads((out / "baseq.json").read_text())["format"] == "baseq-packed/1"
    assert json.loads((cwd / "res" / "deep" / "r.json").read_text())["out"] == str(Path("out") / out.name)
    assert sorted(p.name for p in (cwd / "out").iterdir()) == [out.name]  # no work folder left beside it


def test_out_under_a_file_is_refused_before_any_work(tiny_model_dir, text_file, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(_quantize(tiny_model_dir, text_file, blocker / "sub" / "q")) == 2
    _one_error_line(capsys.readouterr().err, "is not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_sixteen_bit_weights_are_written_in_the_fake_format(tiny_model_dir, text_file, tmp_path, capsys):
    """A rotated full-precision model (the first check on a new family) is written as it computes; asking for the
    packed format with 16-bit weights is refused before any work."""
    bits = ["--w-bits", "16", "--a-bits", "16", "--kv-bits", "16"]
    out = tmp_path / "fp"
    assert main(_quantize(tiny_model_dir, text_file, out, *bits, "--json", str(tmp_path / "r.json"))) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["format"] == "fake" and r["ppl_quant"] == pytest.approx(r["ppl_fp"], rel=1e-4)
    assert json.loads((out / "baseq.json").read_text())["format"] != "baseq-packed/1"
    capsys.readouterr()
    assert main(_quantize(tiny_model_dir, text_file, tmp_path / "p", *bits, "--format", "packed")) == 2
    _one_error_line(capsys.readouterr().err, "--format packed stores quantized weights")
    assert not (tmp_path / "p").exists()


def test_missing_local_path_fails_at_once_without_a_hub(tmp_path, capsys, monkeypatch):
    import time

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    t0 = time.perf_counter()
    assert main(["generate", "--model", "out/missing-folder", "--prompt", "hi"]) == 2
    assert time.perf_counter() - t0 < 5
    _one_error_line(capsys.readouterr().err, "'out/missing-folder' is no local folder or file")


def test_the_compiled_kernels_change_no_bit_of_a_packed_model(packed, monkeypatch):
    """The nibble product and the one-pass token quantizer (runtime/native.py) against the torch code they replace,
    through a whole packed model: a prompt's logits and each decoding step's (one token: the nibble kernel)."""
    from baseq.load import load
    from baseq.runtime import kernels
    from baseq.runtime.native import native_ops

    if native_ops() is None:
        pytest.skip("the runtime's kernels do not build here (BASEQ_NATIVE=0 or no C++ compiler)")
    ids = torch.randint(3, 250, (2, 20), generator=torch.Generator().manual_seed(0))

    def run(model):
        with torch.no_grad():
            out = model.generate(ids[:1, :9], max_new_tokens=5, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
            return model(ids).logits, torch.stack(out.logits)

    fast, _ = load(str(packed[0]))
    assert fast.model.layers[0].mlp.gate_up.codes4 is not None
    with monkeypatch.context() as mp:
        mp.setattr(kernels, "native_ops", lambda: None)
        slow, _ = load(str(packed[0]))
        assert slow.model.layers[0].mlp.gate_up.codes4 is None
        ref = run(slow)
    got = run(fast)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_decoding_attention_on_packed_codes_keeps_a_packed_models_tokens(packed, monkeypatch):
    """A decoding step's attention in one compiled call (``kv_step``: the new K/V coded into the cache, attention on
    the codes two a byte) against the torch path through a whole packed model: each decoding step's logits to float
    rounding, the same greedy tokens."""
    from baseq.load import load
    from baseq.runtime import kvcache, modules
    from baseq.runtime.native import native_ops

    if native_ops() is None:
        pytest.skip("the runtime's kernels do not build here (BASEQ_NATIVE=0 or no C++ compiler)")
    model, _ = load(str(packed[0]))
    ids = torch.randint(3, 250, (1, 9), generator=torch.Generator().manual_seed(1))

    def run():
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=8, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        return out.sequences, torch.stack(out.logits)

    steps, step = [], kvcache.QuantizedKVLayer.step
    with monkeypatch.context() as mp:
        mp.setattr(kvcache.QuantizedKVLayer, "step", lambda self, *a, **k: steps.append(step(self, *a, **k)) or
                   steps[-1])
        seq, logits = run()
    # every step after the prompt's, every layer, in the compiled call
    assert len(steps) == 7 * model.config.num_hidden_layers and all(s is not None for s in steps)
    with monkeypatch.context() as mp:
        mp.setattr(modules, "native_ops", lambda: None)
        mp.setattr(kvcache, "native_ops", lambda: None)
        ref_seq, ref_logits = run()
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_context_length_counts_a_rope_scaling_factor():
    """Qwen2.5 documents YaRN ×4 over an unchanged max_position_embeddings of 32k: a prompt of 100k tokens is within
    its context (was refused); Llama 3 / LongRoPE state the extended length in max_position_embeddings itself; per
    layer-type parameters (Gemma 3) are read too, and its linear factor without an original length is already in
    max_position_embeddings."""
    from types import SimpleNamespace

    import transformers as tf

    from baseq.runtime.generate import check_context, context_length

    yarn = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32768}
    qwen = SimpleNamespace(config=tf.Qwen2Config(max_position_embeddings=32768, rope_parameters=yarn))
    assert context_length(qwen) == 131072
    check_context(qwen, 100_000, "the prompt")
    with pytest.raises(BaseqError, match="context of 131,072 tokens"):
        check_context(qwen, 140_000, "the prompt")
    plain = SimpleNamespace(config=tf.Qwen2Config(max_position_embeddings=32768))
    assert context_length(plain) == 32768
    llama3 = SimpleNamespace(config=tf.LlamaConfig(max_position_embeddings=131072, rope_parameters={
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}))
    assert context_length(llama3) == 131072
    gemma = tf.Gemma3TextConfig(max_position_embeddings=131072)
    gemma.rope_parameters = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    assert context_length(SimpleNamespace(config=gemma)) == 131072
    gemma.rope_parameters["full_attention"].update(rope_type="yarn", original_max_position_embeddings=65536)
    assert context_length(SimpleNamespace(config=gemma)) == 524288


def test_bench_finds_the_baseline_from_any_folder_or_says_it_is_gone(packed, tiny_model_dir, tmp_path, capsys,
                                                                     monkeypatch):
    """The folder records the absolute path of a local model, so `baseq bench` finds its baseline from any working
    directory; a baseline that is gone is one line before anything is measured. Regression: the path as typed
    (relative) was read against the current folder — late failure after timing the model, or another model timed."""
    import shutil

    from baseq.bench import default_baseline
    from baseq.runtime.format import read_meta

    assert read_meta(packed[0])["model_path"] == str(tiny_model_dir.resolve())
    monkeypatch.chdir(tmp_path)
    folder = shutil.copytree(packed[0], tmp_path / "copy")
    meta = json.loads((folder / "baseq.json").read_text())
    (folder / "baseq.json").write_text(json.dumps({**meta, "model": "m/llama"}))  # as typed elsewhere
    assert default_baseline(str(folder)) == str(tiny_model_dir.resolve())
    (folder / "baseq.json").write_text(json.dumps({**meta, "model": "m/llama", "model_path": str(tmp_path / "gone")}))
    import baseq.bench as bench_mod

    monkeypatch.setattr(bench_mod, "run_worker", lambda *a, **k: pytest.fail("measured before the check"))
    assert main(["bench", "--model", str(folder), "--prefill", "8", "--decode", "2"]) == 2
    _one_error_line(capsys.readouterr().err, "is not found: pass --baseline PATH")


@pytest.mark.parametrize("args, frag", [
    (["generate", "--prompt", "hi", "--device", "bogus"], "--device 'bogus' is not a torch device"),
    (["generate", "--prompt", "hi", "--temperature", "nan"], "--temperature must be a finite number"),
    (["generate", "--prompt", "hi", "--temperature", "1", "--seed", "99999999999999999999999"], "--seed must be in"),
    (["bench", "--decode", "1", "--baseline", "none"], "--decode must be at least 2"),
])
def test_generate_and_bench_refuse_bad_options_in_one_line(args, frag, tiny_model_dir, capsys):
    assert main([args[0], "--model", str(tiny_model_dir), *args[1:]]) == 2
    _one_error_line(capsys.readouterr().err, frag)


def test_a_tiny_temperature_samples_the_top_token():
    """1e-45 divided the logits into inf − inf = NaN (a multinomial traceback); shifted first, it is greedy."""
    from baseq.runtime.generate import _pick

    logits = torch.tensor([[0.5, 2.0, -1.0, 1.9]])
    gen = torch.Generator().manual_seed(0)
    assert _pick(logits, 1e-45, 1.0, gen).item() == 1 and _pick(logits, 1e-45, 0.9, gen).item() == 1

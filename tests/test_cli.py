"""Tests for the command line (``baseq eval``): in-process through ``baseq.cli.main`` and as real processes."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from baseq.cli import main
from baseq.testing import byte_tokenizer

SEQLEN, WINDOWS = 32, 3
LINES = [f"Line {i}: the quick brown fox jumps over the lazy dog, number {i * i}." for i in range(40)]
TEXT = "\n".join(LINES) + "\n"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("text") / "sample.txt"
    f.write_text(TEXT, encoding="utf-8")
    return f


@pytest.fixture(scope="module")
def expected_ppl(tiny_model_dir):
    """The perplexity of the tiny model on the first WINDOWS × SEQLEN bytes of TEXT, computed without the CLI."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    from baseq.testing import byte_tokenizer

    ids = byte_tokenizer()(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(TEXT.encode())
    w = torch.tensor(ids[: WINDOWS * SEQLEN]).view(WINDOWS, SEQLEN)
    with torch.no_grad():
        logits = model(w).logits.double()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
    return math.exp(nll.item())


def _eval_args(model, data, *extra):
    return ["eval", "--model", str(model), "--data", str(data), "--seqlen", str(SEQLEN),
            "--windows", str(WINDOWS), "--batch-size", "2", "--quiet", *extra]


def _assert_one_error_line(err: str, *fragments: str) -> str:
    assert "Traceback" not in err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("baseq: error:"), lines[0]
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    return lines[0]


def _json_payload_ok(payload: dict, model, data, expected_ppl):
    assert {"ppl", "tokens", "seconds", "model", "data", "seqlen", "windows"} <= set(payload)
    assert payload["ppl"] == pytest.approx(expected_ppl, rel=1e-4)
    assert payload["tokens"] == SEQLEN * WINDOWS
    assert payload["seqlen"] == SEQLEN and payload["windows"] == WINDOWS
    assert payload["model"] == str(model) and payload["data"] == str(data)
    assert isinstance(payload["seconds"], (int, float)) and 0 <= payload["seconds"] < 120


# ------------------------------------------------------------------ in-process


def test_eval_prints_table_and_writes_json(tiny_model_dir, text_file, expected_ppl, tmp_path, capsys):
    out = tmp_path / "result.json"
    assert main(_eval_args(tiny_model_dir, text_file, "--json", str(out))) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "error" not in captured.err
    payload = json.loads(out.read_text())
    _json_payload_ok(payload, tiny_model_dir, text_file, expected_ppl)
    assert "baseq eval" in captured.out and "perplexity" in captured.out
    assert f"{payload['ppl']:.3f}" in captured.out
    assert f"{SEQLEN * WINDOWS}" in captured.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]  # no temp file left beside it


def test_eval_json_is_replaced(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "result.json"
    out.write_text("old content")
    assert main(_eval_args(tiny_model_dir, text_file, "--json", str(out))) == 0
    assert json.loads(out.read_text())["tokens"] == SEQLEN * WINDOWS


def _bad_folders(root: Path, tiny_model_dir: Path) -> dict[str, Path]:
    folders = {}
    d = root / "t5"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "t5"}))  # seq2seq, not a causal LM
    folders["t5"] = d
    d = root / "garbage"
    d.mkdir()
    (d / "config.json").write_text("this is {not json")
    folders["garbage"] = d
    d = root / "noweights"
    d.mkdir()
    shutil.copy(tiny_model_dir / "config.json", d / "config.json")
    folders["noweights"] = d
    d = root / "badweights"
    shutil.copytree(tiny_model_dir, d)
    (d / "model.safetensors").write_bytes(b"not safetensors" * 10)
    folders["badweights"] = d
    d = root / "noconfig"
    d.mkdir()
    (d / "README").write_text("hello")
    folders["noconfig"] = d
    f = root / "junk.gguf"
    f.write_bytes(b"not a gguf file" * 10)
    folders["junk.gguf"] = f
    f = root / "model.bin"
    f.write_bytes(b"x")
    folders["model.bin"] = f
    f = root / "JUNK.GGUF"  # the suffix in capitals is still a GGUF file
    f.write_bytes(b"not a gguf file" * 10)
    folders["JUNK.GGUF"] = f
    d = root / "gptq"  # a checkpoint stored quantized: refused before transformers asks for optimum
    shutil.copytree(tiny_model_dir, d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    folders["gptq"] = d
    d = root / "notokenizer"
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / f, d / f)
    folders["notokenizer"] = d
    d = root / "bigtokenizer"  # a tokenizer of another model: more tokens than the embedding has rows
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=200, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=2, bos_token_id=0, eos_token_id=1)).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    folders["bigtokenizer"] = d
    return folders


@pytest.mark.parametrize("case,fragment", [
    ("t5", "not a loadable causal language model"),
    ("garbage", "not a loadable causal language model"),
    ("noweights", "not a loadable causal language model"),
    ("badweights", "not a loadable causal language model"),
    ("noconfig", "without config.json"),
    ("junk.gguf", "junk.gguf"),
    ("model.bin", "not a .gguf model"),
    ("JUNK.GGUF", "JUNK.GGUF' is not a loadable causal language model"),
    ("gptq", "quantized already (quant_method=gptq)"),
    ("notokenizer", "its tokenizer does not load"),
    ("bigtokenizer", "its tokenizer has 258 tokens but the model's embedding only 200 rows"),
])
def test_eval_bad_model_folder(case, fragment, tiny_model_dir, text_file, tmp_path, capsys):
    path = _bad_folders(tmp_path, tiny_model_dir)[case]
    capsys.readouterr()  # (saving the folders can draw transformers' progress bars: not the command's output)
    assert main(_eval_args(path, text_file)) != 0
    _assert_one_error_line(capsys.readouterr().err, fragment)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", ["unknown-model", "missing-model-path", "missing-data", "seqlen-1", "seqlen-0",
                                  "too-many-windows", "empty-text", "blank-text", "invalid-utf8", "data-dir",
                                  "json-under-a-file", "json-is-dir", "bad-dtype"])
def test_eval_bad_inputs(case, tiny_model_dir, text_file, tmp_path, capsys):
    model, data, extra, frags = tiny_model_dir, text_file, [], []
    if case == "unknown-model":
        model, frags = "no-such-model", ["unknown model 'no-such-model'"]
    elif case == "missing-model-path":
        model, frags = tmp_path / "missing" / "model", ["unknown model"]
    elif case == "missing-data":
        data, frags = tmp_path / "missing.txt", ["unknown data"]
    elif case == "seqlen-1":
        extra, frags = ["--seqlen", "1"], ["seqlen must be at least 2"]
    elif case == "seqlen-0":
        extra, frags = ["--seqlen", "0"], ["seqlen must be at least 2"]
    elif case == "too-many-windows":
        available = len(TEXT.encode()) // SEQLEN
        extra, frags = ["--windows", str(available + 5)], [f"holds {available} eval windows", f"{available + 5}"]
    elif case == "empty-text":
        data, frags = _write(tmp_path / "empty.txt", b""), ["is empty"]
    elif case == "blank-text":
        data, frags = _write(tmp_path / "blank.txt", b"\n \n\t\n"), ["is empty"]
    elif case == "invalid-utf8":
        data, frags = _write(tmp_path / "binary.txt", bytes(range(128, 256)) * 4), ["cannot read text file"]
    elif case == "data-dir":
        data, frags = tmp_path, ["is not a file"]
    elif case == "json-under-a-file":
        extra, frags = ["--json", str(_write(tmp_path / "f.txt", b"x") / "sub" / "r.json")], ["is not a folder"]
    elif case == "json-is-dir":
        extra, frags = ["--json", str(tmp_path)], ["is a directory"]
    elif case == "bad-dtype":
        extra, frags = ["--dtype", "float8"], ["unknown dtype 'float8'"]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(_eval_args(model, data, *extra)) != 0
    _assert_one_error_line(capsys.readouterr().err, *frags)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_help_mentions_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "eval" in out and "quantize" in out
    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--model", "--data", "--seqlen", "--windows", "--batch-size", "--json", "--quiet", "--dtype"):
        assert opt in out, opt


def test_quantize_help_shows_the_real_training_defaults(capsys):
    from baseq.config import TrainConfig

    with pytest.raises(SystemExit) as e:
        main(["quantize", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps help lines
    t = TrainConfig()
    assert f"epochs per block (default {t.epochs})" in out
    assert f"bias init (default {t.bias_init})" in out
    assert f"(default {t.lr_clip:g})" in out and f"(default {t.lr_scale:g})" in out
    stage1 = re.search(r"--transforms, --no-transforms (.*?)--vo-rotation", out).group(1)
    assert ("default: on" if t.transforms else "default: off") in stage1


def test_quantize_flags_reach_the_config():
    from baseq.cli import build_parser, config_from_args

    args = build_parser().parse_args([
        "quantize", "--bits", "W4A8KV8", "--w-group", "16", "--a-clip", "0.8", "--calib-samples", "7",
        "--calib-seqlen", "64", "--epochs", "2", "--lr-clip", "0.5", "--lr-bias", "0.25", "--lr-scale", "0.125",
        "--bias-init", "zero", "--train-batch-size", "2", "--train-samples", "3", "--train-inputs", "quant",
        "--train-loss", "token", "--no-scale", "--transforms", "--no-vo-rotation", "--transform-epochs", "1",
        "--lr-transform", "0.01", "--no-act-order", "--percdamp", "0.05", "--seed", "9",
        "--weights", "gptaq", "--gptaq-alpha", "0.5", "--weight-scale", "--lr-weight-scale", "0.004",
        "--revert-if-worse",
        "--smooth", "down,qkv", "--smooth-alpha", "0.5", "--rotations", "calibrated"])
    cfg = config_from_args(args)
    assert (cfg.bits.w_bits, cfg.bits.a_bits, cfg.bits.kv_bits, cfg.bits.w_group, cfg.bits.a_clip) == (4, 8, 8, 16, 0.8)
    assert (cfg.calib.samples, cfg.calib.seqlen, cfg.seed, cfg.calib.seed) == (7, 64, 9, 9)
    t = cfg.train
    assert (t.epochs, t.lr_clip, t.lr_bias, t.lr_scale, t.bias_init) == (2, 0.5, 0.25, 0.125, "zero")
    assert (t.batch_size, t.samples, t.inputs, t.loss) == (2, 3, "quant", "token")
    assert (t.scale, t.bias, t.transforms, t.vo_rotation, t.transform_epochs, t.lr_transform) == \
        (False, True, True, False, 1, 0.01)
    assert (cfg.gptq.act_order, cfg.gptq.percdamp, cfg.weights, cfg.gptq.asym_alpha) == (False, 0.05, "gptaq", 0.5)
    assert (t.weight_scale, t.lr_weight_scale, t.revert_if_worse) == (True, 0.004, True)
    assert (cfg.smooth.pairs, cfg.smooth.alpha, cfg.rotation.kind) == (("down", "qkv"), 0.5, "calibrated")


@pytest.mark.parametrize("words,fragment", [
    (["--method", "gptq", "--rotations", "spinquant"], "method gptq has no rotations, so no rotation source"),
    (["--method", "rtn", "--smooth", "down"], "smoothing runs before the rotations and method rtn has none"),
    (["--method", "quarot", "--transforms"], "(--transforms) are a BASE-Q stage; method quarot does not run them"),
    (["--method", "spinquant", "--transforms"], "method spinquant does not run them"),
    (["--method", "baseq", "--weights", "rtn"], "method baseq takes weights gptq, gptaq (got rtn; methods that "
                                                "take rtn: rtn, quarot, spinquant, ostquant)"),
    (["--method", "gptq", "--weights", "rtn"], "method gptq takes weights gptq, gptaq (got rtn"),
    (["--kv-bits", "16", "--kv-shift", "mean"], "kv-shift mean centres a quantized KV cache"),
    (["--method", "quarot", "--rotation-steps", "50"], "--rotation-steps: options of learned rotations' training; "
                                                       "the seeded Hadamards are not trained"),
    (["--method", "gptq", "--rotation-lr", "0.5"], "method gptq has no rotations"),
    (["--method", "quarot", "--epochs", "2", "--no-clip"], "--clip, --epochs: BASE-Q's training options; "
                                                         "method quarot does not train"),
    (["--method", "spinquant", "--lr-bias", "0.5"], "method spinquant does not train (use --method baseq)"),
])
def test_a_switch_the_method_would_ignore_is_one_line(words, fragment, tmp_path, capsys):
    """Each of these used to run and silently drop the switch (or take another weight quantizer)."""
    assert main(["quantize", *words, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("baseq: error:") and fragment in err[0], err
    assert not (tmp_path / "o").exists()


def test_calibration_options_of_a_data_free_run_are_one_warning(tiny_model_dir, tmp_path, capsys):
    assert main(["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--calib-data", "books",
                 "--calib-samples", "8", "--no-eval", "--quiet", "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["baseq: warning: --calib-data, --calib-samples not used: rtn W4A4KV4 reads no calibration data"]
    assert main(["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--kv-shift", "mean",  # K/V means
                 "--calib-data", str(tiny_model_dir / "nowhere.txt"), "--no-eval", "--quiet",
                 "--out", str(tmp_path / "p")]) == 2  # read: the missing text fails
    assert "unknown data" in capsys.readouterr().err


def test_the_weights_a_method_takes_by_default_and_from_a_file(tmp_path):
    from baseq.config import QuantizeConfig
    from baseq.errors import BaseqError

    assert QuantizeConfig(method="rtn").validate().weights == "rtn"  # the default gives way, and the config says so
    assert QuantizeConfig.from_dict({"method": "rtn"}).to_dict()["weights"] == "rtn"
    assert QuantizeConfig.from_dict(QuantizeConfig.from_dict({"method": "rtn"}).to_dict()).weights == "rtn"
    assert QuantizeConfig.from_dict({"method": "quarot", "weights": "rtn"}).weights == "rtn"
    with pytest.raises(BaseqError, match="method rtn takes weights rtn \\(got gptq"):
        QuantizeConfig.from_dict({"method": "rtn", "weights": "gptq"})  # named in a file: refused
    with pytest.raises(BaseqError, match="method baseq takes weights gptq, gptaq \\(got rtn"):
        QuantizeConfig(method="baseq", weights="rtn").validate()


def _non_default(f):
    """A valid value other than the field's default, and the command-line words setting it."""
    meta, default = f.metadata, f.default
    if isinstance(default, bool):
        return not default, [meta["flag"] if not default else "--no-" + meta["flag"].removeprefix("--")]
    if meta.get("choices"):
        value = next(c for c in meta["choices"] if c != default)
    elif isinstance(default, str):
        value = {"": "down", "wiki": "books"}[default]  # --smooth points, --calib-data
    elif meta["flag"] == "--keep-massive":
        value = 20.0  # a ratio above 1 (0 = off)
    elif isinstance(default, float):
        value = default / 2 if default else 0.5  # stays inside (0, 1] for the clip ratios, < 0 for "auto" values
    else:
        value = default + 1
    return value, [meta["flag"], str(value)]


def _flat(cfg) -> dict:
    return {f"{k}.{j}" if isinstance(v, dict) else k: w
            for k, v in cfg.to_dict().items() for j, w in (v.items() if isinstance(v, dict) else [(None, v)])}


def test_every_config_flag_is_in_the_help_and_sets_exactly_its_field(capsys, tmp_path):
    """The flags declared on the config fields (config.flag): each is in 'baseq quantize --help' and sets its
    field and nothing else; --seed also seeds the calibration windows; over a --config file, flags win."""
    from baseq.cli import build_parser, config_from_args, flag_dest
    from baseq.config import QuantizeConfig, flag_fields

    fields = list(flag_fields())
    assert len(fields) >= 43 and len({f.metadata["flag"] for _, f in fields}) == len(fields)
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    out = capsys.readouterr().out
    for _, f in fields:
        assert re.search(re.escape(f.metadata["flag"]) + r"(?![\w-])", out), f.metadata["flag"]
    parser = build_parser()
    base = _flat(config_from_args(parser.parse_args(["quantize"])))
    assert base == _flat(QuantizeConfig())
    needs = {f: (["--keep-massive", "20"], "bits.keep_massive")  # flags that refine another
             for f in ("--keep-massive-fit", "--keep-massive-kv")}
    needs.update({f: (["--rotations", "spinquant"], "rotation.kind")
                  for f in ("--rotation-steps", "--rotation-lr", "--rotation-batch", "--rotation-seqlen")})
    for section, f in fields:
        value, words = _non_default(f)
        extra, extra_key = needs.get(f.metadata["flag"], ([], None))
        args = parser.parse_args(["quantize", *extra, *words])
        assert getattr(args, flag_dest(f)) == value
        got = _flat(config_from_args(args))
        key = f"{section}.{f.name}" if section else f.name
        changed = {k for k in base if got[k] != base[k]}
        assert changed == {key} | {"seed": {"calib.seed"}}.get(key, set()) | ({extra_key} if extra else set()), words
        assert got[key] == value, words
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"seed": 5, "bits": {"w_bits": 8, "a_bits": 8}, "train": {"epochs": 1, "bias": False}}))
    cfg = config_from_args(parser.parse_args(["quantize", "--config", str(file), "--a-bits", "6", "--bias"]))
    assert (cfg.seed, cfg.calib.seed, cfg.bits.w_bits, cfg.bits.a_bits) == (5, 5, 8, 6)  # the file's seed draws the windows
    assert (cfg.train.epochs, cfg.train.bias) == (1, True)


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: baseq" in capsys.readouterr().out


# ------------------------------------------------------------------ real processes


def _console_script() -> str:
    beside = Path(sys.executable).parent / "baseq"
    found = str(beside) if beside.is_file() else shutil.which("baseq")
    assert found, "the 'baseq' console script is not installed (pip install -e .)"
    return found


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="default")


def _run(cmd, cwd=None, timeout=300):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=_env(), timeout=timeout)


def test_console_script_help():
    proc = _run([_console_script(), "--help"])
    assert proc.returncode == 0, proc.stderr
    assert "usage: baseq" in proc.stdout and "eval" in proc.stdout
    proc = _run([_console_script(), "eval", "--help"])
    assert proc.returncode == 0, proc.stderr
    assert "--seqlen" in proc.stdout and "--windows" in proc.stdout and "--json" in proc.stdout


def test_subprocess_eval_and_error(tiny_model_dir, text_file, expected_ppl, tmp_path):
    out = tmp_path / "r.json"
    available = len(TEXT.encode()) // SEQLEN
    cmds = {
        "ok": [sys.executable, "-m", "baseq.cli", *_eval_args(tiny_model_dir, text_file, "--json", str(out))],
        # an error found after the model is loaded: nothing else (warnings, progress bars) may reach stderr
        "error": [sys.executable, "-m", "baseq.cli",
                  *_eval_args(tiny_model_dir, text_file, "--windows", str(available + 1))],
    }
    # both processes at once: most of their time is importing torch and transformers
    procs = {k: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                                 env=_env()) for k, c in cmds.items()}
    results = {k: (p.communicate(timeout=300), p.returncode) for k, p in procs.items()}

    (stdout, stderr), code = results["ok"]
    assert code == 0, stderr
    assert "Traceback" not in stderr
    payload = json.loads(out.read_text())
    _json_payload_ok(payload, tiny_model_dir, text_file, expected_ppl)
    assert f"{payload['ppl']:.3f}" in stdout and "perplexity" in stdout

    (stdout, stderr), code = results["error"]
    assert code == 2
    _assert_one_error_line(stderr, f"holds {available} eval windows")
    assert stdout == ""


def test_preset_large_sets_the_budget_and_flags_override_it():
    from baseq.cli import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["quantize", "--preset", "large", "--epochs", "4"]))
    assert (cfg.calib.samples, cfg.calib.seqlen, cfg.train.epochs) == (64, 1024, 4)
    cfg = config_from_args(build_parser().parse_args(["quantize"]))
    assert (cfg.calib.samples, cfg.calib.seqlen, cfg.train.epochs) == (32, 512, 3)


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "soon"])
def test_dist_timeout_must_be_a_positive_finite_duration(value, capsys):
    """Regression: 0 / -5 died in C++ stack dumps from torch.distributed, nan in a conversion error."""
    with pytest.raises(SystemExit) as e:
        main(["quantize", f"--dist-timeout={value}"])
    assert e.value.code == 2
    _assert_one_error_line(capsys.readouterr().err, "--dist-timeout")

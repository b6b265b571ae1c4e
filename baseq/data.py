"""Text sources turned into deterministic token windows.

Sources: ``wiki`` (the embedded Wikipedia lead paragraphs; split by sha1 of the title, first hex digit 0-3 → eval),
``books`` (four embedded public-domain books, in sections of consecutive paragraphs split the same way by sha1 of
the book title and section number), ``wikitext2`` and ``c4`` (through ``datasets``, where a hub is reachable), or a
local ``.txt`` / ``.jsonl`` (``text`` field) file. Evaluation uses the first N non-overlapping windows; calibration uses N windows at random offsets
from a seeded generator.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from . import assets
from .errors import BaseqError

BUILTIN = ("wiki", "books", "wikitext2", "c4")
EVAL_DIGITS = "0123"
SECTION_CHARS = 4000  # a books section: consecutive paragraphs up to about this many characters (~1,000 tokens)


def _wiki(split: str) -> str:
    entries = json.loads(assets.fetch("wiki-leads").read_text(encoding="utf-8"))
    keep = []
    for title in sorted(entries):
        in_eval = hashlib.sha1(title.encode("utf-8")).hexdigest()[0] in EVAL_DIGITS
        if in_eval == (split == "eval"):
            keep.append(entries[title]["extract"].strip())
    return "\n\n".join(keep)


def _in_eval(key: str) -> bool:
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[0] in EVAL_DIGITS


_BOOK = re.compile(r"\*\*\* ?START OF (?:THE|THIS) PROJECT GUTENBERG EBOOK,? (.*?) ?\*\*\*(.*?)\*\*\* ?END OF",
                   re.DOTALL)


def book_sections(text: str) -> list[tuple[str, str]]:
    """``(key, section)`` for every section of every Project Gutenberg book in ``text``.

    Only each book's body (between the ``*** START OF`` and ``*** END OF`` markers) is kept, so the licence
    boilerplate never enters the text. Paragraphs are separated by blank lines; a paragraph's wrapped lines are
    joined with single spaces. A section is a run of consecutive paragraphs of about :data:`SECTION_CHARS`
    characters, so windows drawn from it read as continuous prose; its key is ``"TITLE/NUMBER"``."""
    out = []
    for title, body in _BOOK.findall(text):
        paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", body)]
        section, size, number = [], 0, 0
        for p in (p for p in paras if p):
            section.append(p)
            size += len(p)
            if size >= SECTION_CHARS:
                out.append((f"{title.strip()}/{number}", "\n\n".join(section)))
                section, size, number = [], 0, number + 1
        if section:
            out.append((f"{title.strip()}/{number}", "\n\n".join(section)))
    return out


def _books(split: str) -> str:
    sections = book_sections(assets.fetch("books").read_text(encoding="utf-8"))
    keep = sorted(((hashlib.sha1(k.encode("utf-8")).hexdigest(), s) for k, s in sections
                   if _in_eval(k) == (split == "eval")), key=lambda x: x[0])  # books interleaved, deterministically
    return "\n\n".join(s for _, s in keep)


def _hub_dataset(name: str, split: str) -> str:
    try:
        import datasets
    except ImportError:
        raise BaseqError(f"data '{name}' needs the 'datasets' package: pip install 'baseq[data]'") from None
    try:
        if name == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test" if split == "eval" else "train")
            return "\n\n".join(ds["text"])
        shard = "validation.00000-of-00008" if split == "eval" else "train.00000-of-01024"
        ds = datasets.load_dataset("allenai/c4", data_files={"x": f"en/c4-{shard}.json.gz"}, split="x")
        return "\n\n".join(ds["text"][:3000])
    except Exception as e:  # noqa: BLE001 - datasets raises many types when offline
        raise BaseqError(f"could not load '{name}' through datasets (no hub reachable?): "
                         f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None


def _local(path: Path) -> str:
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BaseqError(f"cannot read text file '{path}': {e.__class__.__name__}: {e}") from None
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise BaseqError(f"'{path}' line {i}: expected a JSON object with a 'text' field") from None
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise BaseqError(f"text file '{path}' is empty")
    return raw


def load_text(source: str, split: str = "eval") -> str:
    """The raw text of ``source`` for ``split`` ('eval' or 'calib'). Local files serve both splits."""
    if split not in ("eval", "calib"):
        raise ValueError(split)
    if source == "wiki":
        return _wiki(split)
    if source == "books":
        return _books(split)
    if source in ("wikitext2", "c4"):
        return _hub_dataset(source, split)
    path = Path(source).expanduser()
    if path.is_file():
        return _local(path)
    if path.exists():
        raise BaseqError(f"data '{source}' is not a file")
    raise BaseqError(f"unknown data '{source}': use one of {', '.join(BUILTIN)} or a path to a .txt/.jsonl file")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _check(seqlen: int, n: int, ntokens: int, source: str, what: str) -> None:
    if seqlen < 2:
        raise BaseqError(f"seqlen must be at least 2 (got {seqlen})")
    if n < 1:
        raise BaseqError(f"number of {what} windows must be at least 1 (got {n})")
    if ntokens < seqlen:
        raise BaseqError(f"'{source}' holds {ntokens} tokens, fewer than one window of {seqlen}")


def bos_prefix(tokenizer) -> torch.Tensor:
    """The tokens the tokenizer puts before any text (Gemma's and Llama's ``<bos>``; none for SmolLM2 or Qwen): each
    window starts with them, so a model that relies on its BOS token (Gemma's attention sink: without it its
    perplexity is several times higher) sees text the way it was trained. They are never predicted."""
    with_special = tokenizer("a", add_special_tokens=True, return_attention_mask=False)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False, return_attention_mask=False)["input_ids"]
    n = len(with_special) - len(plain)
    if n <= 0 or with_special[n:] != plain:
        return torch.zeros(0, dtype=torch.long)
    return torch.tensor(with_special[:n], dtype=torch.long)


def _text_span(seqlen: int, prefix: torch.Tensor) -> int:
    """Text tokens per window after the BOS prefix."""
    if seqlen - len(prefix) < 1:
        raise BaseqError(f"seqlen {seqlen} leaves no room for text after the model's {len(prefix)} BOS token(s)")
    return seqlen - len(prefix)


def _windows(ids: torch.Tensor, prefix: torch.Tensor, starts: list[int], span: int) -> torch.Tensor:
    return torch.stack([torch.cat([prefix, ids[s: s + span]]) for s in starts])


def eval_windows(tokenizer, source: str, seqlen: int, n: int) -> torch.Tensor:
    """The first ``n`` non-overlapping windows of ``seqlen`` tokens: LongTensor [n, seqlen] (each starting with the
    tokenizer's :func:`bos_prefix`, then consecutive text tokens)."""
    ids = tokenize(tokenizer, load_text(source, "eval"))
    prefix = bos_prefix(tokenizer)
    _check(seqlen, n, len(ids), source, "eval")
    span = _text_span(seqlen, prefix)
    available = len(ids) // span
    if n > available:
        raise BaseqError(f"'{source}' holds {available} eval windows of {seqlen} tokens; {n} requested")
    return _windows(ids, prefix, [i * span for i in range(n)], span)


def mixed_sources(source: str) -> list[str]:
    """The texts of a calibration source: ``A+B+…`` names several (an existing file whose name holds ``+`` is one)."""
    if "+" not in source or Path(source).expanduser().exists():
        return [source]
    parts = source.split("+")
    if not all(parts) or len(set(parts)) != len(parts):
        raise BaseqError(f"calibration data '{source}': name each text once, joined by '+' (e.g. wiki+books)")
    return parts


def text_digest(source: str) -> str:
    """sha256 of the calibration text(s) ``source`` names (their contents, not their names): a resumed run must
    calibrate on the text it started with."""
    h = hashlib.sha256()
    for part in mixed_sources(source):
        h.update(load_text(part, "calib").encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def calib_tokens(tokenizer, source: str) -> int:
    """Tokens of the calibration split of ``source``; of a mix (``A+B+…``), the smallest text's times their number
    (each gives an equal share of the windows)."""
    parts = mixed_sources(source)
    return len(parts) * min(len(tokenize(tokenizer, load_text(p, "calib"))) for p in parts)


def calib_windows(tokenizer, source: str, seqlen: int, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` windows at random offsets (seeded) of the calibration split: LongTensor [n, seqlen] (each starting with
    the tokenizer's :func:`bos_prefix`). ``A+B+…``: equal shares of each text (the first ones take one more when
    ``n`` does not divide), each drawn as alone with seed ``seed + its position``, interleaved A, B, …, A, B, … so
    that any leading windows (the per-block log's) hold every text."""
    parts = mixed_sources(source)
    if len(parts) > 1:
        if n < len(parts):
            raise BaseqError(f"calibration data '{source}' mixes {len(parts)} texts: it needs at least "
                             f"{len(parts)} windows (got {n})")
        shares = [calib_windows(tokenizer, p, seqlen, n // len(parts) + (k < n % len(parts)), seed + k)
                  for k, p in enumerate(parts)]
        return torch.stack([w[i] for i in range(len(shares[0])) for w in shares if i < len(w)])
    ids = tokenize(tokenizer, load_text(source, "calib"))
    prefix = bos_prefix(tokenizer)
    _check(seqlen, n, len(ids), source, "calibration")
    span = _text_span(seqlen, prefix)
    if n * span > len(ids):
        raise BaseqError(f"'{source}' calibration text holds {len(ids)} tokens, at most {len(ids) // span} "
                         f"windows of {seqlen}; {n} requested")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - span + 1, (n,), generator=gen)
    return _windows(ids, prefix, starts.tolist(), span)

"""Tests for baseq.data: the wiki split, local text sources, eval and calibration windows."""

from __future__ import annotations

import hashlib
import json
import random
import re
import textwrap

import pytest
import torch

from baseq import data
from baseq.errors import BaseqError


class ByteTok:
    """The simplest tokenizer: one token per UTF-8 byte, so the expected ids are ``list(text.encode())``; with
    ``bos``, that token is put first when special tokens are asked for (like Gemma's tokenizer)."""

    def __init__(self, bos: int | None = None):
        self.bos = bos

    def __call__(self, text, add_special_tokens=True, return_attention_mask=True):
        ids = list(text.encode("utf-8"))
        if add_special_tokens:
            assert len(text) < 4  # only bos_prefix's probe: texts are tokenized without special tokens
            return {"input_ids": ([self.bos] if self.bos is not None else []) + ids}
        return {"input_ids": ids}


TOK = ByteTok()


def _is_eval(title: str) -> bool:
    return hashlib.sha1(title.encode("utf-8")).hexdigest()[0] in "0123"


def _titles(n=200):
    rng = random.Random(1234)
    words = ["alpha", "Beta", "gamma", "Delta", "épsilon", "zeta", "Ωmega", "kappa", "lambda", "mu"]
    titles = set()
    while len(titles) < n:
        titles.add(f"{rng.choice(words)} {rng.choice(words)} {rng.randrange(10_000)}")
    titles = list(titles)
    rng.shuffle(titles)  # insertion order must not matter
    return titles


def _extract(title: str) -> str:
    return f"  [[{title}]] is an article. It has some text about {title.lower()} and more words.\n"


@pytest.fixture
def wiki(tmp_path, monkeypatch):
    """A synthetic wiki-leads JSON (~200 titles, same shape as the real one) served by assets.fetch."""
    titles = _titles()
    entries = {t: {"title": t, "extract": _extract(t)} for t in titles}
    path = tmp_path / "summaries.json"
    path.write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    asked = []

    def fake_fetch(name, asset=None, quiet=False):
        asked.append(name)
        return path

    monkeypatch.setattr("baseq.assets.fetch", fake_fetch)
    return {"titles": titles, "entries": entries, "asked": asked}


def _expected(titles, split):
    keep = [t for t in sorted(titles) if _is_eval(t) == (split == "eval")]
    return keep, "\n\n".join(_extract(t).strip() for t in keep)


def _titles_in(text):
    return re.findall(r"\[\[(.*?)\]\]", text)


# ------------------------------------------------------------------ wiki split


def test_wiki_split_by_sha1_sorted_disjoint_complete(wiki):
    ev, ca = data.load_text("wiki", "eval"), data.load_text("wiki", "calib")
    assert wiki["asked"] == ["wiki-leads", "wiki-leads"]
    ev_titles, ca_titles = _titles_in(ev), _titles_in(ca)
    assert set(ev_titles).isdisjoint(ca_titles)
    assert sorted(ev_titles + ca_titles) == sorted(wiki["titles"])
    assert len(ev_titles) == len(set(ev_titles))
    assert all(_is_eval(t) for t in ev_titles) and not any(_is_eval(t) for t in ca_titles)
    assert ev_titles == sorted(ev_titles) and ca_titles == sorted(ca_titles)
    # about a quarter goes to eval (4 of 16 hex digits); with 200 titles both sides are well populated
    assert 25 <= len(ev_titles) <= 80
    # exact text: stripped extracts joined by blank lines
    assert ev == _expected(wiki["titles"], "eval")[1]
    assert ca == _expected(wiki["titles"], "calib")[1]


def test_wiki_split_deterministic(wiki):
    assert data.load_text("wiki", "eval") == data.load_text("wiki", "eval")
    assert data.load_text("wiki", "calib") == data.load_text("wiki", "calib")


def test_bad_split_name(wiki):
    with pytest.raises(ValueError):
        data.load_text("wiki", "train")


# ------------------------------------------------------------------ eval windows


def test_eval_windows_are_first_nonoverlapping(wiki):
    _, text = _expected(wiki["titles"], "eval")
    ids = list(text.encode("utf-8"))
    seqlen, n = 64, 7
    w = data.eval_windows(TOK, "wiki", seqlen, n)
    assert w.dtype == torch.long and tuple(w.shape) == (n, seqlen)
    for i in range(n):
        assert w[i].tolist() == ids[i * seqlen:(i + 1) * seqlen]
    # a larger n extends, never reshuffles
    w2 = data.eval_windows(TOK, "wiki", seqlen, n + 3)
    assert torch.equal(w2[:n], w)


def test_eval_windows_with_real_byte_tokenizer(wiki):
    from baseq.testing import byte_tokenizer

    tok = byte_tokenizer()
    _, text = _expected(wiki["titles"], "eval")
    w = data.eval_windows(tok, "wiki", 50, 4)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))  # byte-level, no specials added
    assert w.flatten().tolist() == ids[:200]
    assert tok.decode(ids) == text  # the ids really are the text


def test_eval_too_many_windows_says_how_many(wiki):
    _, text = _expected(wiki["titles"], "eval")
    seqlen = 128
    available = len(text.encode("utf-8")) // seqlen
    assert data.eval_windows(TOK, "wiki", seqlen, available).shape == (available, seqlen)
    with pytest.raises(BaseqError) as e:
        data.eval_windows(TOK, "wiki", seqlen, available + 1)
    assert f"holds {available} eval windows of {seqlen} tokens" in str(e.value)
    assert f"{available + 1} requested" in str(e.value)


@pytest.mark.parametrize("fn", [data.eval_windows, data.calib_windows])
@pytest.mark.parametrize("seqlen", [1, 0, -5])
def test_seqlen_below_two(wiki, fn, seqlen):
    with pytest.raises(BaseqError, match="seqlen must be at least 2"):
        fn(TOK, "wiki", seqlen, 1)


@pytest.mark.parametrize("fn", [data.eval_windows, data.calib_windows])
def test_zero_windows(wiki, fn):
    with pytest.raises(BaseqError, match="at least 1"):
        fn(TOK, "wiki", 16, 0)


def test_window_longer_than_text(tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("only a few bytes")
    with pytest.raises(BaseqError, match="holds 16 tokens, fewer than one window of 17"):
        data.eval_windows(TOK, str(f), 17, 1)
    assert data.eval_windows(TOK, str(f), 16, 1).tolist() == [list(b"only a few bytes")]


# ------------------------------------------------------------------ calibration windows


def test_calib_windows_seeded_contiguous_slices(wiki):
    _, ctext = _expected(wiki["titles"], "calib")
    _, etext = _expected(wiki["titles"], "eval")
    cbytes, ebytes = ctext.encode("utf-8"), etext.encode("utf-8")
    seqlen, n = 48, 16
    a = data.calib_windows(TOK, "wiki", seqlen, n, seed=0)
    b = data.calib_windows(TOK, "wiki", seqlen, n, seed=0)
    c = data.calib_windows(TOK, "wiki", seqlen, n, seed=1)
    assert a.dtype == torch.long and tuple(a.shape) == (n, seqlen)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    for w in torch.cat([a, c]):
        assert bytes(w.tolist()) in cbytes  # a contiguous slice of the calibration stream
    assert any(bytes(w.tolist()) not in ebytes for w in a)
    # random offsets, not the first n windows
    assert not torch.equal(a, torch.tensor(list(cbytes[: n * seqlen])).view(n, seqlen))
    assert len({bytes(w.tolist()) for w in a}) > 1


def test_calib_windows_default_seed_is_zero(wiki):
    assert torch.equal(data.calib_windows(TOK, "wiki", 32, 4), data.calib_windows(TOK, "wiki", 32, 4, seed=0))


def test_calib_too_many_windows_says_how_many(wiki):
    _, ctext = _expected(wiki["titles"], "calib")
    ntok, seqlen = len(ctext.encode("utf-8")), 256
    at_most = ntok // seqlen
    data.calib_windows(TOK, "wiki", seqlen, at_most)
    with pytest.raises(BaseqError) as e:
        data.calib_windows(TOK, "wiki", seqlen, at_most + 1)
    assert f"holds {ntok} tokens, at most {at_most} windows of {seqlen}" in str(e.value)


# ------------------------------------------------------------------ local files


def test_txt_source(tmp_path):
    text = "First line.\nSecond line with ünïcödé.\n"
    f = tmp_path / "t.txt"
    f.write_text(text, encoding="utf-8")
    assert data.load_text(str(f), "eval") == text
    assert data.load_text(str(f), "calib") == text  # local files serve both splits
    ids = list(text.encode("utf-8"))
    w = data.eval_windows(TOK, str(f), 10, 3)
    assert w.tolist() == [ids[0:10], ids[10:20], ids[20:30]]


def test_jsonl_source(tmp_path):
    f = tmp_path / "t.jsonl"
    rows = [{"text": "one"}, {"text": "two", "other": 1}, {"text": 3}]
    f.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    assert data.load_text(str(f)) == "one\n\ntwo\n\n3"


@pytest.mark.parametrize("line", ['{"txt": "x"}', "not json", "[1, 2]"])
def test_jsonl_bad_line(tmp_path, line):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(BaseqError, match="line 2: expected a JSON object with a 'text' field"):
        data.load_text(str(f))


@pytest.mark.parametrize("name,content", [("e.txt", ""), ("w.txt", "  \n\t \n"), ("e.jsonl", "\n\n"),
                                          ("b.jsonl", '{"text": "  "}\n')])
def test_empty_file(tmp_path, name, content):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(BaseqError, match="is empty"):
        data.load_text(str(f))


def test_invalid_utf8(tmp_path):
    f = tmp_path / "bin.txt"
    f.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary")
    with pytest.raises(BaseqError, match="cannot read text file .*UnicodeDecodeError"):
        data.load_text(str(f))


def test_directory_source(tmp_path):
    with pytest.raises(BaseqError, match="is not a file"):
        data.load_text(str(tmp_path))


@pytest.mark.parametrize("source", ["no-such-source", "/definitely/missing/file.txt", "wiki2"])
def test_unknown_source(source):
    with pytest.raises(BaseqError, match="unknown data") as e:
        data.load_text(source)
    assert "wiki" in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------ books


def _gutenberg_book(title: str, paragraphs: list[str]) -> str:
    body = "\n\n".join(textwrap.fill(p, 60) for p in paragraphs)  # wrapped lines, as in the real file
    return (f"The Project Gutenberg EBook of {title.title()}\n\nlicence header text\n\n"
            f"*** START OF THE PROJECT GUTENBERG EBOOK, {title} ***\n\n\n{body}\n\n\n"
            f"*** END OF THE PROJECT GUTENBERG EBOOK, {title} ***\n\nlicence footer text\n")


@pytest.fixture
def books(tmp_path, monkeypatch):
    """A synthetic big.txt: three small books (wrapped lines, blank-line paragraphs) between licence texts."""
    rng = random.Random(7)
    content = {}
    for title in ("FIRST BOOK", "SECOND BOOK", "THIRD BOOK"):
        content[title] = [f"<{title}:{i}> " + " ".join(rng.choice(["tea", "rain", "door", "glass"]) for _ in
                                                        range(rng.randrange(20, 400)))
                          for i in range(120)]
    path = tmp_path / "big.txt"
    path.write_text("".join(_gutenberg_book(t, ps) for t, ps in content.items()) + "word lists at the end\n",
                    encoding="utf-8")
    monkeypatch.setattr("baseq.assets.fetch", lambda name, asset=None, quiet=False: path)
    return content


def test_book_sections_keep_bodies_and_paragraph_order(books):
    secs = data.book_sections(data.assets.fetch("books").read_text(encoding="utf-8"))
    for title, paras in books.items():
        mine = [s for k, s in secs if k.startswith(title + "/")]
        assert [k for k, _ in secs if k.startswith(title + "/")] == [f"{title}/{i}" for i in range(len(mine))]
        assert "\n\n".join(mine).split("\n\n") == paras  # unwrapped, in order, nothing lost or added
        assert all(len(s) >= data.SECTION_CHARS for s in mine[:-1])  # every section but the last is full
        assert all(len(s) < data.SECTION_CHARS + 3000 for s in mine)
    joined = "\n".join(s for _, s in secs)
    assert "licence" not in joined and "word lists" not in joined and "***" not in joined


def test_books_split_disjoint_complete_interleaved(books):
    ev, ca = data.load_text("books", "eval"), data.load_text("books", "calib")
    tags = lambda text: re.findall(r"<([A-Z ]+:\d+)>", text)  # noqa: E731
    ev_tags, ca_tags = tags(ev), tags(ca)
    everything = [f"{t}:{i}" for t, ps in books.items() for i in range(len(ps))]
    assert set(ev_tags).isdisjoint(ca_tags) and sorted(ev_tags + ca_tags) == sorted(everything)
    secs = data.book_sections(data.assets.fetch("books").read_text(encoding="utf-8"))
    n_eval = sum(_is_eval(k) for k, _ in secs)
    assert 0 < n_eval < len(secs) and ev.count("\n\n") + 1 == sum(s.count("\n\n") + 1 for k, s in secs if _is_eval(k))
    assert len({t.split(":")[0] for t in ev_tags[:40]}) > 1  # sections of several books mixed, not book by book
    assert data.load_text("books", "eval") == ev  # deterministic
    w = data.eval_windows(TOK, "books", 64, 3)
    assert bytes(w.flatten().tolist()) == ev.encode("utf-8")[:192]


def test_windows_start_with_the_bos_token_of_a_tokenizer_that_adds_one(tmp_path):
    """Gemma's tokenizer puts <bos> before any text and the model depends on it: every window starts with it, then
    consecutive text tokens (evaluation) or a seeded span (calibration); tokenizers that add none are unchanged."""
    text = "".join(f"sentence {i} of the text. " for i in range(400))
    f = tmp_path / "t.txt"
    f.write_text(text, encoding="utf-8")
    ids = torch.tensor(list(text.encode("utf-8")))
    plain = data.eval_windows(TOK, str(f), 16, 5)
    assert torch.equal(plain, ids[:80].view(5, 16))
    bos = ByteTok(bos=300)
    w = data.eval_windows(bos, str(f), 16, 5)
    assert w.shape == (5, 16) and (w[:, 0] == 300).all()
    assert torch.equal(w[:, 1:].reshape(-1), ids[:75])  # consecutive, non-overlapping text after each BOS
    c = data.calib_windows(bos, str(f), 16, 6, seed=3)
    assert c.shape == (6, 16) and (c[:, 0] == 300).all() and (c[:, 1:] != 300).all()
    assert torch.equal(c, data.calib_windows(bos, str(f), 16, 6, seed=3))
    with pytest.raises(BaseqError, match="leaves no room for text"):
        data.eval_windows(_TwoBos(), str(f), 2, 1)  # two prefix tokens fill a window of 2


class _TwoBos(ByteTok):
    """A tokenizer that puts two special tokens first."""

    def __call__(self, text, add_special_tokens=True, return_attention_mask=True):
        out = super().__call__(text, add_special_tokens, return_attention_mask)
        return {"input_ids": ([1, 2] if add_special_tokens else []) + out["input_ids"]}


# ------------------------------------------------------------------ mixed calibration texts


def test_mixed_calibration_takes_equal_interleaved_shares(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("a" * 400, encoding="utf-8")
    b.write_text("b" * 300, encoding="utf-8")
    w = data.calib_windows(TOK, f"{a}+{b}", 10, 5, seed=3)
    assert w.shape == (5, 10)
    assert [chr(int(r[0])) for r in w] == ["a", "b", "a", "b", "a"]  # 3 + 2, interleaved
    assert torch.equal(w[0::2], data.calib_windows(TOK, str(a), 10, 3, seed=3))  # each drawn as alone
    assert torch.equal(w[1::2], data.calib_windows(TOK, str(b), 10, 2, seed=4))  # with its own seed
    assert torch.equal(w, data.calib_windows(TOK, f"{a}+{b}", 10, 5, seed=3))
    assert data.calib_tokens(TOK, f"{a}+{b}") == 600 and data.calib_tokens(TOK, str(a)) == 400
    plus = tmp_path / "x+y.txt"  # a file whose name holds '+' is one text
    plus.write_text("c" * 100, encoding="utf-8")
    assert data.mixed_sources(str(plus)) == [str(plus)]


@pytest.mark.parametrize("source,n,fragment", [("{a}+{a}", 4, "name each text once"), ("{a}+", 4, "name each text once"),
                                               ("{a}+{b}", 1, "mixes 2 texts: it needs at least 2 windows"),
                                               ("{a}+nowhere.txt", 4, "unknown data 'nowhere.txt'")])
def test_bad_mixed_calibration_is_one_line(tmp_path, source, n, fragment):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("a" * 400, encoding="utf-8")
    b.write_text("b" * 300, encoding="utf-8")
    with pytest.raises(BaseqError, match=re.escape(fragment)):
        data.calib_windows(TOK, source.format(a=a, b=b), 10, n)

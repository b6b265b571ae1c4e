"""The model side of zero-shot scoring: lm-eval's ``HFLM`` around an in-memory model (FP, simulated or the packed
runtime), one progress bar per task, and the requests a multiple-choice item's options share scored as one packed
row (:func:`scoring_lm`; see ``ScoringLM._loglikelihood_tokens``)."""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def quiet_lm_eval(level: int = logging.WARNING):
    """Raise lm-eval's logger to ``level`` and silence datasets' progress bars for the duration."""
    logger = logging.getLogger("lm_eval")
    old = logger.level
    logger.setLevel(level)
    try:
        import datasets

        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover
        datasets, bars = None, False
    try:
        yield
    finally:
        logger.setLevel(old)
        if bars:
            datasets.enable_progress_bars()


ROW_TOKENS = 1024  # a packed row grows to at most this many tokens (or one request)
LOGITS_BYTES = 256 * 2**20  # float logits one scoring forward may keep (a 151,936-word vocabulary: ~440 positions)
MASKABLE = ("sdpa", "eager", "baseq")  # attention implementations that apply a custom 4D attention mask as given


def scoring_lm(model, tokenizer, batch_size: int | str):
    """lm-eval's ``HFLM`` around ``model`` with one progress bar per task (lm-eval's own bars are off and a bar named
    after the task advances once per scored request, through lm-eval's per-request cache hook), scoring the requests
    that share a context in one packed sequence (:meth:`ScoringLM._loglikelihood_tokens`)."""
    import torch
    import torch.nn.functional as F
    from lm_eval.api.model import CacheHook
    from lm_eval.models.huggingface import HFLM
    from tqdm.auto import tqdm

    class Progress(CacheHook):
        def __init__(self):
            super().__init__(None)
            self.bar = None

        def add_partial(self, attr, req, res) -> None:
            if self.bar is not None:
                self.bar.update(1)

    class ScoringLM(HFLM):
        label, show = "zero-shot", True
        pack = True  # False: lm-eval's own path for every request (the reference the tests compare with)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            hook = Progress()
            self.set_cache_hook(hook)
            off = {"disable": True} if disable_tqdm or not self.show else {}  # else tqdm's default ($TQDM_DISABLE)
            hook.bar = tqdm(total=len(requests), desc=self.label, unit="req", file=sys.stderr, **off)
            try:
                return super().loglikelihood(requests, disable_tqdm=True)
            finally:
                hook.bar.close()

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            """lm-eval's ``(log-likelihood, is_greedy)`` of each request ``((context, continuation), context
            tokens, continuation tokens)``, computing once what requests share. The requests with the same context
            tokens (a multiple-choice item's options) are packed into one row: the context, then each continuation
            but its last token, each attending to the context and to itself only, at the positions it would have
            alone (a custom 4D attention mask and position ids), so each sees exactly what lm-eval's forward over
            ``(context + continuation)[:-1]`` sees; only the continuations' logits are computed. Rows run longest
            context first, ``batch_size`` at a time and fewer where their logits would pass ``LOGITS_BYTES`` (a
            large vocabulary). Requests that lm-eval would truncate or that exceed a sliding window, and models whose
            attention ignores custom masks, take lm-eval's own path."""
            longest = self._packable_length()
            by_context: dict[tuple[int, ...], list[int]] = {}
            plain = []
            for i, (_, ctx, cont) in enumerate(requests):
                if cont and len(ctx) + len(cont) <= longest:
                    by_context.setdefault(tuple(ctx), []).append(i)
                else:
                    plain.append(i)
            rows: list[tuple[list[int], list[int]]] = []  # (context, the requests packed after it)
            for ctx, idx in by_context.items():
                row: list[int] = []
                for i in idx:
                    if row and _row_length(ctx, [requests[j][2] for j in row + [i]]) > ROW_TOKENS:
                        rows.append((list(ctx), row))
                        row = []
                    row.append(i)
                rows.append((list(ctx), row))
            # (context, its continuations, their requests), longest context first
            packed = sorted(((ctx, [requests[i][2] for i in idx], idx) for ctx, idx in rows),
                            key=lambda r: (-len(r[0]), -_row_length(r[0], r[1])))
            out: list[tuple[float, bool] | None] = [None] * len(requests)
            with _exact_logits(self.model):
                if plain:
                    for i, r in zip(plain, super()._loglikelihood_tokens([requests[i] for i in plain], True,
                                                                          override_bs)):
                        out[i] = r
                step = self.batch_size if isinstance(self.batch_size, int) else 8
                position_bytes = 4 * self.model.config.get_text_config().vocab_size  # one position's float logits
                for batch in _batches(packed, step, lambda r: _kept(r[1]), LOGITS_BYTES // position_bytes):
                    scores = self.score_rows([(ctx, conts) for ctx, conts, _ in batch])
                    for i, r in zip([i for _, _, idx in batch for i in idx], scores):
                        out[i] = r
                        if requests[i][0] is not None:  # (None: loglikelihood_rolling's windows)
                            self.cache_hook.add_partial("loglikelihood", requests[i][0], r)
            return out

        def _packable_length(self) -> int:
            """Longest context + continuation (tokens) that :meth:`score_rows` scores: what lm-eval scores without
            truncating, and within a sliding window (the custom mask stands for the window); 0 (lm-eval's path for
            everything) where the attention would not apply a custom mask (e.g. flash attention)."""
            config = self.model.config
            params = inspect.signature(self.model.forward).parameters
            if not (self.pack and self.backend == "causal" and "logits_to_keep" in params
                    and getattr(config, "_attn_implementation", None) in MASKABLE):
                return 0
            window = getattr(config.get_text_config(), "sliding_window", None)
            return min(self.max_length + 1, window or self.max_length + 1)

        @torch.no_grad()
        def score_rows(self, rows: list[tuple[list[int], list[list[int]]]]) -> list[tuple[float, bool]]:
            """``(log-likelihood, is_greedy)`` of each continuation of each ``(context, continuations)`` row, in
            order, from one forward over the packed rows, each padded on the left so that every context ends in the
            same column (the logits are needed from there on only), and on the right."""
            lead = max(len(ctx) for ctx, _ in rows)
            ids, segment, position = [], [], []
            for ctx, conts in rows:
                pad = lead - len(ctx)
                ids.append([0] * pad + list(ctx))
                segment.append([-1] * pad + [0] * len(ctx))
                position.append([0] * pad + list(range(len(ctx))))
                for j, c in enumerate(conts, 1):
                    ids[-1] += c[:-1]
                    segment[-1] += [j] * (len(c) - 1)
                    position[-1] += range(len(ctx), len(ctx) + len(c) - 1)
            width = max(map(len, ids))

            def pad(lists, value):
                return torch.tensor([x + [value] * (width - len(x)) for x in lists], device=self.device)

            ids, segment, position = pad(ids, 0), pad(segment, -1), pad(position, 0)
            q, k = segment[:, :, None], segment[:, None, :]
            causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
            # each token sees the context and its own continuation; padding (-1) is seen by padding only
            sees = ((k == 0) | (k == q)) & causal
            dtype = self.model.dtype
            mask = torch.zeros(sees.shape, dtype=dtype, device=self.device).masked_fill_(~sees, torch.finfo(dtype).min)
            first = lead - 1  # the contexts' last column: the first whose logits are needed
            logits = self.model(ids, attention_mask=mask[:, None], position_ids=position, use_cache=False,
                                logits_to_keep=width - first).logits
            out = []
            for row, (_, conts) in zip(logits, rows):
                end = 1
                for c in conts:  # c[0] is predicted at the context's last token, c[1:] at the continuation's own
                    at = [0] + list(range(end, end + len(c) - 1))
                    end += len(c) - 1
                    lp = F.log_softmax(row[at], dim=-1, dtype=self.softmax_dtype)
                    toks = torch.tensor(c, device=lp.device)
                    out.append((float(lp.gather(-1, toks[:, None]).sum()), bool((lp.argmax(-1) == toks).all())))
            return out

    with quiet_lm_eval(logging.ERROR):  # HFLM warns that a model object disables some of its options
        return ScoringLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _row_length(ctx: list[int], conts: list[list[int]]) -> int:
    """Tokens of a packed row: the context, then each continuation but its last token."""
    return len(ctx) + sum(len(c) - 1 for c in conts)


def _kept(conts: list[list[int]]) -> int:
    """Positions of a packed row whose logits are needed: its context's last token, then each continuation but its
    last token."""
    return 1 + sum(len(c) - 1 for c in conts)


def _batches(rows: list, most: int, kept: Callable[[Any], int], positions: int) -> Iterator[list]:
    """``rows`` in order, at most ``most`` at a time, and fewer where ``len(batch) * max(kept(row))`` (the logits a
    forward keeps) would pass ``positions``; at least one row each."""
    batch: list = []
    width = 0
    for r in rows:
        if batch and (len(batch) == most or (len(batch) + 1) * max(width, kept(r)) > positions):
            yield batch
            batch, width = [], 0
        batch.append(r)
        width = max(width, kept(r))
    if batch:
        yield batch


@contextlib.contextmanager
def _exact_logits(model):
    """The packed runtime's LM head takes a float16 / int8 GEMV for a few rows (decoding; ~1e-3 off): while scoring,
    exact float32 logits for any number of rows, so that a score does not depend on how a forward is batched."""
    tables = [m for m in model.modules() if hasattr(m, "gemv_rows")]
    old = [t.gemv_rows for t in tables]
    for t in tables:
        t.gemv_rows = 0
    try:
        yield
    finally:
        for t, rows in zip(tables, old):
            t.gemv_rows = rows

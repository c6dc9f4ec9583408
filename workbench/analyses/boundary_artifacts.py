"""Token-boundary artifacts: how tokenizers cut numbers, and what a non-canonical cut does to a model.

- :func:`digit_chunking`: how a tokenizer splits digit strings: single digits, fixed-size chunks
  from the left or from the right (e.g. groups of up to 3), or learned merges of irregular length.
- :func:`sum_logprobs`: a model's log-probability of the correct sum of two n-digit numbers in a
  few-shot prompt, written plain (``12345 + 67890 = 80235``) and with thousands separators
  (``12,345 + 67,890 = 80,235``): separators force the same 3-digit groups whatever the tokenizer.
- :func:`segmentations` / :func:`noncanonical_tokenizations`: every way to spell a word with the
  vocabulary's tokens (the byte-prefix index of :mod:`workbench.tokenization.vocab_bytes`), each
  one's log-probability after a context, and per layer the cosine between the residual state at the
  word's last token under the canonical and each non-canonical spelling: near 1 where the model has
  merged the pieces into the same word.
"""

from __future__ import annotations

import random
import re

import numpy as np
import torch
import xarray as xr


_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")  # SentencePiece byte fallback: shown as such


def _chunks(tokenizer, digits: str) -> list[int]:
    pieces = [tokenizer.decode([t]) for t in tokenizer.encode(digits, add_special_tokens=False)]
    if "".join(pieces) != digits:
        raise ValueError(f"the tokenizer does not spell {digits!r} back from its tokens ({pieces}); cannot read its chunks.")
    return [len(p) for p in pieces]


def digit_chunking(tokenizer, lengths=range(1, 13), samples: int = 20, seed: int = 0) -> xr.Dataset:
    """Chunk lengths of random digit strings of each length, and the rule they follow.

    ``pattern`` (length): the most common chunk lengths joined by '-' (e.g. '3-3-1'); ``share``: the
    fraction of samples with that pattern; ``max_chunk``; ``attrs['rule']``: 'single digits',
    'left to right, up to K', 'right to left, up to K' or 'learned merges' (patterns that differ
    between strings of the same length).
    """
    rng = random.Random(seed)
    patterns, shares, longest = [], [], []
    for n in lengths:
        seen = {}
        for _ in range(samples):
            digits = str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(n - 1))
            key = "-".join(map(str, _chunks(tokenizer, digits)))
            seen[key] = seen.get(key, 0) + 1
        best = max(seen, key=seen.get)
        patterns.append(best)
        shares.append(seen[best] / samples)
        longest.append(max(int(k) for p in seen for k in p.split("-")))
    ds = xr.Dataset({"pattern": ("length", patterns), "share": ("length", shares), "max_chunk": ("length", longest)},
                    coords={"length": list(lengths)})
    ds.attrs["rule"] = _rule(ds)
    return ds


def _rule(ds: xr.Dataset) -> str:
    k = int(ds.max_chunk.max())
    if k == 1:
        return "single digits"
    if float(ds.share.min()) < 1:
        return "learned merges"
    lengths = [list(map(int, p.split("-"))) for p in ds.pattern.values]
    if all(all(c == k for c in chunk[:-1]) for chunk in lengths):
        return f"left to right, up to {k}"
    if all(all(c == k for c in chunk[1:]) for chunk in lengths):
        return f"right to left, up to {k}"
    return "learned merges"


_SHOTS = [(3, 4), (12, 30), (205, 118), (4411, 2970), (31562, 50417)]


def _number(x: int, separators: bool) -> str:
    return f"{x:,}" if separators else str(x)


def sum_prompt(a: int, b: int, separators: bool) -> tuple[str, str]:
    """A few-shot prompt for ``a + b`` and the correct answer, plain or with thousands separators."""
    lines = [f"{_number(x, separators)} + {_number(y, separators)} = {_number(x + y, separators)}" for x, y in _SHOTS]
    return "\n".join(lines) + f"\n{_number(a, separators)} + {_number(b, separators)} =", " " + _number(a + b, separators)


def sum_logprobs(handle, digits=(2, 3, 4, 5, 6, 7), problems: int = 20, seed: int = 0) -> xr.Dataset:
    """Log-probability (nats) of the correct answer of random ``digits``-digit sums, plain vs with
    thousands separators: ``logprob`` (digits, problem, format), ``answer_tokens`` likewise, and
    ``greedy_correct``: whether each answer token is the model's top choice at its position."""
    from ..probes.token_scoring import text_logprobs
    from .byte_level import start_context

    rng = random.Random(seed)
    formats = ("plain", "separators")
    start = start_context(handle)
    sequences, where = [], []
    for i, n in enumerate(digits):
        for j in range(problems):
            a, b = rng.randint(10 ** (n - 1), 10**n - 1), rng.randint(10 ** (n - 1), 10**n - 1)
            for k, sep in enumerate((False, True)):
                prompt, answer = sum_prompt(a, b, sep)
                p = handle.tokenizer.encode(prompt, add_special_tokens=False)
                full = handle.tokenizer.encode(prompt + answer, add_special_tokens=False)
                if full[: len(p)] != p:  # the answer merged into the prompt's last token: score the whole text's tail
                    raise ValueError(f"{handle.name}: the prompt's tokens change when the answer follows; cannot score it.")
                sequences.append(start + full)
                where.append((i, j, k, len(start) + len(p), len(full) - len(p)))
    scores = text_logprobs(handle, sequences, first=[w[3] for w in where])
    logprob = np.zeros((len(digits), problems, 2))
    n_tokens = np.zeros((len(digits), problems, 2), dtype=np.int64)
    for (i, j, k, _, count), s in zip(where, scores):
        logprob[i, j, k] = float(s.sum(dtype=np.float64))
        n_tokens[i, j, k] = count
    return xr.Dataset({"logprob": (("digits", "problem", "format"), logprob),
                       "answer_tokens": (("digits", "problem", "format"), n_tokens)},
                      coords={"digits": list(digits), "problem": np.arange(problems), "format": list(formats)},
                      attrs={"model": handle.name, "seed": seed})


def segmentations(vocab, data: bytes, *, max_tokens: int | None = None, limit: int = 256) -> list[tuple[int, ...]]:
    """Token sequences that spell ``data`` exactly: all of them when there are at most ``limit``.

    Depth-first over the byte-prefix index (:meth:`VocabBytes.tokens_prefix_of`), longest pieces
    first; the first ``4 * limit`` found are kept and the ``limit`` with the fewest tokens returned,
    fewest first. ``max_tokens`` bounds the length (default ``len(data)``: no bound). Raises if none exists.
    """
    data = bytes(data)
    if not data:
        raise ValueError("cannot segment an empty string.")
    max_tokens = len(data) if max_tokens is None else max_tokens
    found: list[tuple[int, ...]] = []

    def walk(pos: int, prefix: tuple[int, ...]) -> None:
        if len(found) >= limit * 4:  # enough to choose the shortest ``limit`` from
            return
        if pos == len(data):
            found.append(prefix)
            return
        if len(prefix) >= max_tokens:
            return
        for token, n in reversed(vocab.tokens_prefix_of(data[pos:])):  # longest pieces first
            walk(pos + n, prefix + (int(token),))

    walk(0, ())
    if not found:
        raise ValueError(f"no sequence of this vocabulary's tokens spells {data!r} (within {max_tokens} tokens).")
    return sorted(found, key=len)[:limit]


def noncanonical_tokenizations(handle, context: str, word: str, *, limit: int = 16, max_tokens: int | None = None) -> xr.Dataset:
    """Log-probabilities of every spelling of ``word`` after ``context``, and how the model's residual
    stream at the word's last token compares with the canonical spelling's, layer by layer.

    ``word`` is spelled exactly as the tokenizer would spell it in ``context + word`` (so a leading
    space belongs to it). Returns ``logprob`` (segmentation): log P(the word's tokens | context),
    ``n_tokens``, ``canonical`` (bool), ``cosine`` (segmentation, layer): cosine between the
    ``blocks.{l}.hook_resid_post`` state at the last token and the canonical one's; coordinate
    ``tokens``: the pieces joined by '|'.
    """
    from ..probes import hooks
    from ..probes.sites import RESID_POST
    from ..probes.token_scoring import text_logprobs
    from ..tokenization.vocab_bytes import vocab_bytes
    from .byte_level import start_context

    tok = handle.tokenizer
    vocab = vocab_bytes(tok)
    ctx = start_context(handle) + tok.encode(context, add_special_tokens=False)
    full = start_context(handle) + tok.encode(context + word, add_special_tokens=False)
    if full[: len(ctx)] != ctx:
        raise ValueError(f"{context!r} is tokenised differently once {word!r} follows; end the context at a token "
                         "boundary (e.g. before a space) and put the space in the word.")
    canonical = tuple(full[len(ctx) :])
    spellings = segmentations(vocab, word.encode("utf-8"), max_tokens=max_tokens, limit=limit)
    if canonical not in spellings:
        spellings = [canonical, *spellings[: limit - 1]]
    spellings.sort(key=lambda s: (s != canonical, len(s)))
    sequences = [ctx + list(s) for s in spellings]
    scores = text_logprobs(handle, sequences, first=[len(ctx)] * len(sequences))
    logprob = np.array([float(sc.sum(dtype=np.float64)) for sc in scores])
    # residual states at each spelling's last token: one padded batch, read through the site map
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for r, s in enumerate(sequences):
        ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
    last = torch.tensor([len(s) - 1 for s in sequences])
    states = {}
    hooks.forward(handle, ids, mask, reads=hooks.expand([RESID_POST], handle.n_layers), logits=False,
                  on_site=lambda site, layer, x: states.__setitem__(layer, x[torch.arange(len(sequences)), last].double().cpu()))
    layers = sorted(states)
    cosine = np.stack([torch.nn.functional.cosine_similarity(states[l], states[l][:1], dim=-1).numpy() for l in layers], axis=1)
    names = tok.convert_ids_to_tokens(sorted({t for s in spellings for t in s}))
    byte_pieces = {t: n for t, n in zip(sorted({t for s in spellings for t in s}), names) if _BYTE_PIECE.match(str(n))}
    pieces = ["|".join(byte_pieces.get(t) or vocab.token_string(t) for t in s) for s in spellings]
    return xr.Dataset(
        {"logprob": ("segmentation", logprob), "n_tokens": ("segmentation", np.array([len(s) for s in spellings])),
         "canonical": ("segmentation", np.array([s == canonical for s in spellings])),
         "cosine": (("segmentation", "layer"), cosine)},
        coords={"segmentation": np.arange(len(spellings)), "tokens": ("segmentation", pieces), "layer": layers},
        attrs={"model": handle.name, "context": context, "word": word},
    )

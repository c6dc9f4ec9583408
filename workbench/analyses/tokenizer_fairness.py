"""Tokenizer unfairness between languages (Petrov et al., 2023, "Language Model Tokenizers
Introduce Unfairness Between Languages").

The same text, translated, needs very different numbers of tokens. On parallel units (the
same content in every language; the bundled UDHR articles, :func:`workbench.corpus.parallel_corpus`):

- :func:`parallel_counts`: tokens (no special tokens added), UTF-8 bytes and characters of every
  unit, per tokenizer and language;
- :func:`fairness_table`: per tokenizer and language, tokens per unit, bytes per token,
  characters per token and the **premium** relative to a reference language (English): the
  paper's measure, ``tokens(all units in L) / tokens(the same units in English)`` (the authors'
  code encodes each language's whole corpus and divides the lengths); also the mean over units of
  the per-unit ratio, which weights short units as much as long ones;
- :func:`loss_per_byte`: a model's bits per UTF-8 byte on each unit (whether a token premium
  shows up as worse modelling), scored from the tokenizer's start tokens.

Pure functions of tokenizers, texts and (for the loss) a model handle; no files, no plots.
"""

from __future__ import annotations

import math

import numpy as np
import xarray as xr

REFERENCE = "eng"


def _check_texts(corpus: dict[str, list[str]]) -> tuple[list[str], int]:
    if not corpus:
        raise ValueError("no languages given: pass {language: [unit texts]}, e.g. from workbench.corpus.parallel_corpus().")
    languages = list(corpus)
    lengths = {lang: len(units) for lang, units in corpus.items()}
    n = lengths[languages[0]]
    if n == 0 or any(v != n for v in lengths.values()):
        raise ValueError(f"parallel text needs the same number (> 0) of units in every language; got {lengths}.")
    for lang, units in corpus.items():
        for i, text in enumerate(units):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{lang}: unit {i} is empty or not a string; every language needs all {n} units.")
    return languages, n


def parallel_counts(tokenizers: dict, corpus: dict[str, list[str]]) -> xr.Dataset:
    """Tokens, bytes and characters of every parallel unit: ``tokens`` (tokenizer, language, unit),
    ``bytes`` and ``characters`` (language, unit).

    ``tokenizers``: ``{name: Hugging Face tokenizer}``; ``corpus``: ``{language: [unit texts]}``
    with the same number of units in each language, unit *i* a translation of the same text.
    Tokens are counted without special tokens (``add_special_tokens=False``).
    """
    languages, n = _check_texts(corpus)
    if not tokenizers:
        raise ValueError("no tokenizers given: pass {name: tokenizer}, e.g. {'smollm2-135m': wb.load_tokenizer('smollm2-135m')}.")
    tokens = np.zeros((len(tokenizers), len(languages), n), dtype=np.int64)
    for a, (name, tok) in enumerate(tokenizers.items()):
        for b, lang in enumerate(languages):
            ids = tok(list(corpus[lang]), add_special_tokens=False)["input_ids"]
            tokens[a, b] = [len(x) for x in ids]
    n_bytes = np.array([[len(t.encode("utf-8")) for t in corpus[lang]] for lang in languages], dtype=np.int64)
    chars = np.array([[len(t) for t in corpus[lang]] for lang in languages], dtype=np.int64)
    return xr.Dataset(
        {"tokens": (("tokenizer", "language", "unit"), tokens),
         "bytes": (("language", "unit"), n_bytes),
         "characters": (("language", "unit"), chars)},
        coords={"tokenizer": list(tokenizers), "language": languages, "unit": np.arange(n)},
    )


def fairness_table(counts: xr.Dataset, reference: str = REFERENCE) -> xr.Dataset:
    """Per tokenizer and language: ``premium`` (total tokens / the reference's total tokens on the
    same units, the paper's measure), ``premium_unit_mean`` (mean over units of the per-unit ratio),
    ``tokens_per_unit``, ``bytes_per_token``, ``characters_per_token``; and per language
    ``bytes_premium`` (UTF-8 bytes / the reference's bytes: the premium of a byte-level model)."""
    if reference not in counts.language.values:
        raise ValueError(f"reference language {reference!r} is not in the counts (languages: "
                         f"{', '.join(map(str, counts.language.values))}); pass reference=... or add it.")
    tokens, n_bytes, chars = counts.tokens, counts.bytes, counts.characters
    ref = tokens.sel(language=reference)
    if int((ref == 0).sum()):
        raise ValueError(f"a {reference!r} unit has no tokens; the premium needs every reference unit non-empty.")
    total = tokens.sum("unit")
    out = xr.Dataset({
        "premium": total / ref.sum("unit"),
        "premium_unit_mean": (tokens / ref).mean("unit"),
        "tokens_per_unit": tokens.mean("unit"),
        "bytes_per_token": n_bytes.sum("unit") / total,
        "characters_per_token": chars.sum("unit") / total,
        "bytes_premium": n_bytes.sum("unit") / n_bytes.sel(language=reference).sum("unit"),
    })
    out.attrs.update(reference=reference, units=int(counts.sizes["unit"]),
                     premium_definition="total tokens(L) / total tokens(reference) on the same parallel units (Petrov et al. 2023)")
    return out


def worst_pairs(table: xr.Dataset, n: int = 10) -> list[dict]:
    """The ``n`` (tokenizer, language) pairs with the highest premium, highest first."""
    premium = table.premium.to_series().sort_values(ascending=False)
    return [{"tokenizer": tok, "language": lang, "premium": float(v),
             "bytes_per_token": float(table.bytes_per_token.sel(tokenizer=tok, language=lang))}
            for (tok, lang), v in premium.head(n).items()]


def loss_per_byte(handle, texts: list[str], *, max_batch_tokens: int = 4096) -> xr.Dataset:
    """A model's loss on each text: ``nats`` (sum of -log p of its tokens after the tokenizer's start
    tokens), ``bytes`` (UTF-8), ``tokens`` and ``bits_per_byte`` = nats / ln 2 / bytes, per ``text``.

    Texts longer than the model's context are an error (split them first).
    """
    from ..analyses.byte_level import start_context
    from ..probes.token_scoring import text_logprobs

    texts = list(texts)
    if not texts or any(not isinstance(t, str) or not t for t in texts):
        raise ValueError("loss_per_byte needs a non-empty list of non-empty strings.")
    start = start_context(handle)
    encoded = handle.tokenizer(texts, add_special_tokens=False)["input_ids"]
    too_long = [i for i, ids in enumerate(encoded) if len(start) + len(ids) > handle.max_context]
    if too_long:
        raise ValueError(f"texts {too_long[:5]} exceed {handle.name}'s context of {handle.max_context} tokens; split them.")
    scores = text_logprobs(handle, [start + list(ids) for ids in encoded], max_batch_tokens=max_batch_tokens)
    nats = np.array([-float(s[len(start) - 1:].sum(dtype=np.float64)) for s in scores])
    n_bytes = np.array([len(t.encode("utf-8")) for t in texts])
    return xr.Dataset({
        "nats": ("text", nats), "bytes": ("text", n_bytes), "tokens": ("text", np.array([len(e) for e in encoded])),
        "bits_per_byte": ("text", nats / math.log(2) / n_bytes),
    }, attrs={"model": handle.name, "start_tokens": list(start)})

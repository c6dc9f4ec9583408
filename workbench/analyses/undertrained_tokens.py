"""Under-trained and glitch tokens (Land & Bartolo, 2024, "Fishing for Magikarp").

Tokens that exist in a vocabulary but (almost) never occurred in training keep near-initial
weights and make models misbehave. Three steps, as in the paper:

1. :func:`token_categories`: what the tokenizer alone says of every token: ``special``,
   ``byte_fallback`` (SentencePiece ``<0xNN>``), ``partial_utf8`` (its bytes are not valid UTF-8),
   ``unreachable`` (decoding it and encoding the result does not give the token back: the
   tokenizer never produces it for its own text; ``reencoded`` says into how many tokens) or ``ok``.
2. :func:`weight_indicators`: where under-trained rows sit, from the weights alone; low = more
   likely under-trained. ``embedding_norm``: the input embedding's L2 norm (the paper's indicator
   for untied models). Against the mean of *reference* rows known to be unused
   (:func:`reference_tokens`), the cosine distance of each unembedding row in the paper's three
   variants: ``cosine`` (raw rows), ``centred_cosine`` (every row minus the mean row) and
   ``pc_removed`` (the first principal component of the rows projected out: it carries a direction
   shared by all tokens), and the ``l2_distance``.
3. :func:`verify_tokens`: prompt the model to repeat each candidate in three styles (a few-shot
   input/output repetition, "what does X mean?", a string repeated over and over), the candidate
   inserted by its id; the largest probability of producing it next, over the styles, classifies it
   with the paper's thresholds (:func:`classify`): > 0.9 strongly rejected, > 0.1 weakly rejected,
   < 0.001 strongly verified (under-trained), otherwise weakly verified. The paper reads the
   probability over three greedily generated tokens; here it is read at the first answer
   position only, so every prompt of a style has the same length and a batch needs no padding.

On the embedded models the weights are 4-bit GGUF dequantised to float32: quantisation moves
every row by up to half a quantisation step, which blurs small differences between rarely trained
rows (norms, cosines) but not the large gap between trained and untouched rows. Those models tie
their embeddings, so ``embedding_norm`` is the unembedding's norm there and not the paper's
untied-model indicator.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr

CATEGORIES = ("ok", "unreachable", "partial_utf8", "byte_fallback", "special")
THRESHOLDS = {"strongly_rejected": 0.9, "weakly_rejected": 0.1, "strongly_verified": 0.001}
_UNUSED = re.compile(r"^<\|?(unused|reserved|extra_id|placeholder)[_\w]*\|?>$", re.I)
_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def readable(text: str) -> str:
    """``text`` with characters that do not print (NUL, control, format characters) written as escapes
    (``\\x00``, ``\\n``, ``\\u200b``), so every token shows and survives files that end strings at NUL."""
    return "".join(ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii") for ch in text)


def token_categories(tokenizer) -> xr.Dataset:
    """Every token's category (:data:`CATEGORIES`), its text (:func:`readable`), and whether it round-trips.

    ``round_trip``: ``encode(decode(t)) == [t]`` (no special tokens added). Dims: ``token`` (the id).
    Needs a tokenizer whose tokens can be read as bytes (byte-level BPE, SentencePiece with byte
    fallback, plain): others raise :class:`~workbench.tokenization.vocab_bytes.UnsupportedTokenizerError`.
    """
    from ..tokenization.vocab_bytes import vocab_bytes

    vocab = vocab_bytes(tokenizer)
    n = vocab.size
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = set(int(t) for t in vocab.special_ids) | set(tokenizer.all_special_ids)
    category = np.full(n, "ok", dtype=object)
    text = np.full(n, "", dtype=object)
    raw: dict[int, str] = {}
    decodable = []
    for t in range(n):
        b = vocab.token_bytes[t]
        if t in special or b is None:
            category[t] = "special"
            text[t] = str(pieces[t])
        elif vocab.scheme == "sentencepiece" and _BYTE_FALLBACK.match(str(pieces[t])):
            category[t] = "byte_fallback"
            text[t] = str(pieces[t])
        else:
            try:
                raw[t] = b.decode("utf-8")
                text[t] = readable(raw[t])
                decodable.append(t)
            except UnicodeDecodeError:
                category[t] = "partial_utf8"
                text[t] = readable(b.decode("utf-8", errors="backslashreplace"))
    encoded = tokenizer([raw[t] for t in decodable], add_special_tokens=False)["input_ids"] if decodable else []
    round_trip = np.zeros(n, dtype=bool)
    reencoded = np.zeros(n, dtype=np.int64)
    for t, ids in zip(decodable, encoded):
        round_trip[t] = list(ids) == [t]
        reencoded[t] = len(ids)
        if not round_trip[t]:
            category[t] = "unreachable"
    names = np.array([str(p) for p in pieces], dtype=object)
    return xr.Dataset(
        {"category": ("token", category.astype(str)), "text": ("token", text.astype(str)),
         "piece": ("token", names.astype(str)), "round_trip": ("token", round_trip),
         "reencoded": ("token", reencoded),
         "n_bytes": ("token", np.array([len(b) if b is not None else 0 for b in vocab.token_bytes]))},
        coords={"token": np.arange(n)}, attrs={"tokenizer": vocab.name, "scheme": vocab.scheme},
    )


def reference_tokens(categories: xr.Dataset, tokenizer=None) -> tuple[np.ndarray, str]:
    """Ids of tokens known to be unused, and how they were chosen, in this order of preference:
    ``<unused..>``-style tokens (Gemma's 6,000+), else unreachable tokens, else special tokens
    the tokenizer never inserts itself (not BOS/EOS/PAD/UNK, not in its chat template: SmolLM2's
    StarCoder-style ``<filename>``, ``<jupyter_code>``, ... markers); ``tokenizer`` is needed for
    the last. Pass your own ids to :func:`indicators_from_matrices` where you know better."""
    pieces, ids, cats = categories.piece.values, categories.token.values, categories.category.values
    unused = np.array([t for t, p in zip(ids, pieces) if _UNUSED.match(p)], dtype=np.int64)
    if len(unused):
        return unused, "unused-named tokens"
    unreachable = ids[cats == "unreachable"]
    if len(unreachable):
        return unreachable, "unreachable tokens"
    if tokenizer is not None:
        used = {getattr(tokenizer, a, None) for a in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")}
        template = getattr(tokenizer, "chat_template", None) or ""
        spare = np.array([t for t in ids[cats == "special"] if t not in used and pieces[t] not in template], dtype=np.int64)
        if len(spare):
            return spare, "special tokens the tokenizer never inserts"
    return np.array([], dtype=np.int64), "none"


def first_principal_component(matrix: np.ndarray, max_rows: int = 50_000) -> np.ndarray:
    """Unit vector of the rows' first principal component (of the centred rows; an evenly spaced
    subset of at most ``max_rows`` rows is enough and keeps 262k-row vocabularies fast)."""
    rows = matrix[np.linspace(0, len(matrix) - 1, min(len(matrix), max_rows)).astype(int)]
    return np.linalg.svd(rows - rows.mean(axis=0), full_matrices=False)[2][0]


def _cosine_distance(matrix: np.ndarray, direction: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1) * np.linalg.norm(direction)
    return 1.0 - (matrix @ direction) / np.maximum(norms, 1e-12)


def indicators_from_matrices(unembedding: np.ndarray, embedding: np.ndarray | None, reference) -> xr.Dataset:
    """The indicators of the module docstring from plain matrices (vocab, d); low = candidate.

    ``embedding``: the input embedding when it is not the unembedding (untied), else None (then
    ``embedding_norm`` is the unembedding's). ``reference``: ids of known-unused rows (empty: the
    reference-based indicators are NaN).
    """
    U = np.asarray(unembedding, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.int64)
    out = {}
    if len(reference):
        pc = first_principal_component(U)
        variants = {"cosine": U, "centred_cosine": U - U.mean(axis=0), "pc_removed": U - np.outer(U @ pc, pc)}
        for name, rows in variants.items():
            out[name] = ("token", _cosine_distance(rows, rows[reference].mean(axis=0)))
        out["l2_distance"] = ("token", np.linalg.norm(U - U[reference].mean(axis=0), axis=1))
    else:
        for name in ("cosine", "centred_cosine", "pc_removed", "l2_distance"):
            out[name] = ("token", np.full(len(U), np.nan))
    E = U if embedding is None else np.asarray(embedding, dtype=np.float64)
    out["embedding_norm"] = ("token", np.linalg.norm(E, axis=1))
    return xr.Dataset(out, coords={"token": np.arange(len(U))})


def weight_indicators(handle, categories: xr.Dataset, reference=None) -> xr.Dataset:
    """:func:`indicators_from_matrices` on a model's own weights (read through the site map), with
    ``attrs``: ``tied`` (SmolLM2 and Gemma 3 tie their embeddings), ``reference`` (how the
    reference rows were chosen), ``n_reference`` and ``primary``: the indicator the paper defaults
    to (``embedding_norm`` for untied models, else ``cosine``)."""
    from ..probes.hooks import site_map
    from ..probes.sites import UnsupportedSiteError

    sm = site_map(handle)
    W_U = sm.W_U().detach().float().cpu().numpy()  # no unembedding: UnsupportedSiteError names what is missing
    tied = sm.tied_embeddings()
    W_E, embedding_note = None, "tied to the unembedding" if tied else "input embedding"
    if not tied:
        try:
            W_E = sm.W_E().detach().float().cpu().numpy()
        except UnsupportedSiteError as err:  # the unembedding indicators still work
            embedding_note = f"not exposed ({err}); embedding_norm is NaN"
    n = min(len(W_U), categories.sizes["token"])  # padded vocabularies: rows past the tokenizer score no token
    if reference is None:
        reference, how = reference_tokens(categories, handle.tokenizer)
    else:
        reference, how = np.asarray(reference, dtype=np.int64), "given"
    reference = reference[reference < n]
    primary = "embedding_norm" if W_E is not None else "cosine"
    if primary == "cosine" and not len(reference):  # before any work on the matrices
        raise ValueError(f"{handle.name}: its input embedding is {embedding_note} and its vocabulary has no token known "
                         "to be unused (no <unused..>, unreachable or spare special token) for the unembedding "
                         "indicators: pass reference=[ids of unused tokens].")
    out = indicators_from_matrices(W_U[:n], None if W_E is None else W_E[:n], reference)
    if not tied and W_E is None:
        out["embedding_norm"] = ("token", np.full(n, np.nan))
    out.attrs.update(model=handle.name, tied=int(tied), reference=how, n_reference=len(reference),
                     embedding=embedding_note, primary=primary)
    return out


def candidates(categories: xr.Dataset, indicator: xr.DataArray, fraction: float = 0.02) -> np.ndarray:
    """The ``fraction`` of round-tripping (``ok``) tokens with the lowest indicator, lowest first."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}.")
    ok = categories.token.values[categories.category.values == "ok"]
    ok = ok[ok < indicator.sizes["token"]]
    values = indicator.values[ok]
    keep = max(1, int(round(fraction * len(ok))))
    return ok[np.argsort(values, kind="stable")[:keep]]


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class RepeatPrompt:
    """A verification prompt as token ids, ``None`` where the candidate goes; the model should
    produce the candidate right after the last id (its probability is read there)."""

    name: str
    template: tuple

    def ids(self, token: int) -> list[int]:
        return [int(token) if t is None else t for t in self.template]


_MARK = "\ue000"  # a private-use character: where the candidate's id goes
_STYLES = {
    "few_shot_repeat": "Each output repeats its input exactly.\n"
                       + "".join(f"Input: «{_MARK}»\nOutput: «{_MARK}»\n" for _ in range(5)) + f"Input: «{_MARK}»\nOutput: «",
    "meaning": "Q: What does 'florbix' mean?\nA: 'florbix' is not a word I know.\n"
               f"Q: What does '{_MARK}' mean?\nA: '",
    "repeated": "The same string, over and over:\n" + _MARK * 24,
}


def repeat_prompts(handle) -> list[RepeatPrompt]:
    """The three prompt styles for a model's tokenizer, after its start tokens (plain text, as in
    the paper, also for chat models)."""
    from ..analyses.byte_level import start_context

    tok = handle.tokenizer
    prompts = []
    for name, text in _STYLES.items():
        template = list(start_context(handle))
        for i, part in enumerate(text.split(_MARK)):
            if i:
                template.append(None)
            template += tok.encode(part, add_special_tokens=False) if part else []
        prompts.append(RepeatPrompt(name, tuple(template)))
    return prompts


def verify_tokens(handle, tokens, prompts: list[RepeatPrompt] | None = None, *, batch_size: int = 64) -> xr.Dataset:
    """Probability that the model produces each candidate token where a prompt asks for it again.

    Returns ``probability`` (token, prompt), ``max_probability`` (token) and ``verdict`` (token, from
    :func:`classify`); ``attrs['forward_passes']`` counts model calls. One prompt's sequences all have
    the same length, so ``batch_size`` candidates run in one forward pass with no padding, and only
    the last position is unembedded.
    """
    from ..probes import hooks
    from ..probes.sites import FINAL_NORM

    tokens = np.asarray([int(t) for t in tokens], dtype=np.int64)
    if tokens.size == 0:
        raise ValueError("no candidate tokens to verify.")
    if tokens.min() < 0 or tokens.max() >= handle.vocab_size:
        raise ValueError(f"candidate ids must be in [0, {handle.vocab_size}); got {tokens.min()}..{tokens.max()}.")
    prompts = repeat_prompts(handle) if prompts is None else list(prompts)
    sm = hooks.site_map(handle)
    probs = np.zeros((len(tokens), len(prompts)))
    calls = 0
    for j, prompt in enumerate(prompts):
        for a in range(0, len(tokens), batch_size):
            chunk = tokens[a : a + batch_size]
            ids = torch.tensor([prompt.ids(t) for t in chunk])
            last = {}
            hooks.forward(handle, ids, reads=[(FINAL_NORM, None)], logits=False,
                          on_site=lambda site, layer, x: last.__setitem__("h", x[:, -1]))
            calls += 1
            with torch.no_grad():
                logprobs = torch.log_softmax(sm.unembed(last["h"], normalized=True).float(), dim=-1)
            probs[a : a + len(chunk), j] = logprobs.gather(-1, torch.as_tensor(chunk, device=logprobs.device)[:, None])[:, 0].exp().cpu().numpy()
    best = probs.max(axis=1)
    return xr.Dataset(
        {"probability": (("token", "prompt"), probs), "max_probability": ("token", best),
         "verdict": ("token", np.array([classify(p) for p in best]))},
        coords={"token": tokens, "prompt": [p.name for p in prompts]},
        attrs={"forward_passes": calls, "model": handle.name},
    )


def classify(max_probability: float) -> str:
    """The paper's verdict for the largest probability of producing a token."""
    if max_probability > THRESHOLDS["strongly_rejected"]:
        return "strongly_rejected"
    if max_probability > THRESHOLDS["weakly_rejected"]:
        return "weakly_rejected"
    if max_probability < THRESHOLDS["strongly_verified"]:
        return "strongly_verified"
    return "weakly_verified"

"""Exact next-byte probabilities from a tokenized language model, and the baselines they fix.

Paper: "Exact Byte-Level Probabilities from Tokenized Language Models for FIM-Tasks and Model
Ensembles" (Phan, Amos, Gat, Havasi, Muckley, Ullrich, 2024). Their Byte-Token Representation
Lemma: the probability that the text starts with the bytes ``x`` is the total probability of
its *cover encodings*,

    P(x) = sum_{t in cover(x)} P(t),   cover(x) = { (t_1..t_k) : bytes(t_1..t_{k-1}) is a strict prefix of x,
                                                                x is a prefix of bytes(t_1..t_k) },

where ``P(t) = prod_i p(t_i | context, t_<i)`` is the model's probability that its token stream
*starts with* ``t``. Then ``P(b | x) = P(x b) / P(x)`` for each of the 256 bytes ``b``: a byte-level
language model with no training, for any cut of the text (mid-word, mid-UTF-8 character, after
a trailing space, or the empty prefix).

**Which covers are summed.** All token sequences, canonical or not: every sequence of
byte-producing tokens the model can emit, weighted by its probability, is a way of writing the
text, and the lemma is an identity about the model's distribution over *all* of them. Summing
only canonical (tokenizer-produced) covers, as the paper's implementation does when it masks
"invalid" encodings, gives quantities that are not a probability distribution over bytes
(``sum_b P(xb) != P(x)``) unless the model gives non-canonical sequences exactly zero mass, which
a trained model does not. Non-canonical tokenizations that matter are therefore kept, and the
many that do not are removed by pruning (below), not by a rule.

**Special tokens and end of text.** Tokens that stand for no bytes (BOS/EOS, ``<|im_start|>``,
``<unusedN>``, ...) are never part of a cover. The byte-level model is that of the token model
conditioned at every step on the next token being a byte token,
``q(t | h) = p(t | h) / (1 - p(specials | h))``, so the 256 next-byte probabilities sum to 1 and
the chain rule holds. The raw model's probability that the text *ends* at ``x`` (a special
token right after a tokenization that spells exactly ``x``, divided by ``P(x)``) is reported
separately, in ``attrs["p_end_of_text"]``, and is not part of the 256.

**Start-of-text context.** Every token sequence is conditioned on the tokenizer's own
start tokens when it adds any (Gemma: ``<bos>``); otherwise on ``<|endoftext|>``, the document
separator byte-level BPE models such as SmolLM2 are trained with between documents; otherwise
on the tokenizer's EOS token. Pass ``context_ids`` to choose another.

**Pruning.** A new tokenization ``h`` spelling exactly ``x[:j]`` is followed further (costing a
token position) only if its posterior ``P(h) / P(x[:j]) >= prune``; and at most ``max_hypotheses``
tokenizations are followed at once, ranked by their share of ``P(x)`` (a new one: ``P(h)``; an
older one: its covers whose last token runs past the cut). Everything pruned is accounted for:
the total probability of pruned tokenizations bounds what the computation leaves out,
``P(x) - P_computed(x) <= exp(attrs["pruned_logmass"])`` (rigorous, but loose over long texts), and
``pruned_fraction`` (the share of ``P(x)`` pruned at each cut) is what the 256 probabilities were
renormalised over, so the chain rule reads
``sum_i log P(b_i | x_<i) = log P(x) - sum_i log(1 - pruned_fraction_i)``. ``prune=0`` with
``max_hypotheses=None`` sums every cover (exponential in the text length: tiny vocabularies and
tests). With the defaults (``1e-5``, 32) on 200 bytes of the pydoc corpus with SmolLM2, the
next-byte distributions differ from a near-exhaustive run (``1e-6``, no cap, up to 678
tokenizations through a run of asterisks) by a total variation of about 1e-4 on average and
at most a few 1e-3, and bits per byte agree to 1e-4. Non-canonical tokenizations do matter:
e.g. ``' ident' + 'ifier'`` keeps about 0.1-0.2% of the mass of ``' identifier'`` all along a
text, which is why such tracks are followed rather than dropped.

**Long texts: ``window``.** ``ByteLevelModel(..., window=W)`` keeps, at each cut, only the
tokenizations that agree with the most probable ones on every token ending ``W`` bytes or more
before the cut (grouped by those tokens; the group with the largest share of ``P(x)`` is kept);
the others' shares are pruned and accounted for like any pruning (``pruned_fraction``,
``pruned_logmass``, the chain rule above). All followed tokenizations then share their tokens up
to ``W`` bytes and one token before the cut, so the scorer's trunk follows the walk and what is
kept besides it is bounded (about ``max_hypotheses`` histories of ``W`` bytes) however long the
text. The price is the mass of old splits that stay probable: on SmolLM2 and the pydoc text
non-canonical splits such as ``'********' + '********'`` for 16 asterisks or ``'",' + '"'`` for
``'","'`` keep 8-12% of the posterior for a while, so over its first 500 bytes ``W`` = 64, 128
and 256 change next-byte probabilities by at most 0.018, 0.006 and 0.003 and bits per byte by
4e-4, 3e-4 and 1e-4, against ``window=None`` (the default: exact up to ``prune`` and
``max_hypotheses``). What it buys is memory that stops growing along the text: over 20,000 bytes of
that text with ``W=256`` the peak RSS growth was 1.8 GiB, with no upward trend after the first tenth.
Time per byte still grows with the trunk, which every row attends to: about 15 bytes/s while it held
under 2,000 tokens, 6-8 beyond 3,000, 8.4 over the whole text (``benchmarks/byte_level.py
--exact-only --window 256 --bytes 20000``, RESULTS.md).

**Cost.** Each followed tokenization costs one token position: its next-token distribution,
from one forward pass of one token per row over the scorer's shared KV cache
(:mod:`workbench.probes.token_scoring`). The walk itself is sequential (which tokenizations are
followed at byte ``n`` depends on the distributions of those followed before): one model call
per byte scores every new tokenization that ends there. When the text is known
(:meth:`stream`, bits per byte, the ensemble, the bias-along-text view, and any query that walks
8 bytes or more to its cut), each call also scores,
ahead of the walk, the children of every tokenization already scored that the walk is likely to
follow: their log-probabilities are exact already (their parent's distribution), and which will
pass the pruning is judged from ``P(x[:n])`` times the canonical encoding's ``P(x[:m]) / P(x[:n])``
(one plain forward pass) and the shares already known, with a 3x margin. The walk then decides
exactly as before and finds most tokenizations ready: on 2,000 bytes of the pydoc corpus with
SmolLM2 and the defaults, 0.23 calls per byte instead of 1.0, 10.0 token positions per byte
instead of 8.1 (the guesses that were not followed), the same tokenizations followed at every
cut and the same numbers up to float32 rounding (max |dP| 6e-6: the rows of a call are batched
differently; bits per byte equal to 1e-7). Such a call reaches only one token past what is
scored, so it also scores *chains*: the text's own (canonical) tokens up to 16 bytes past the
cut, after every tokenization the walk is likely to keep that ends where one starts, each new
token attending to those before it in the same call (:meth:`PrefixTreeScorer.extend
<workbench.probes.token_scoring.PrefixTreeScorer.extend>`); the next call's lookahead scores the
other splits along them. On 600 bytes of pydoc prose (from byte 200,000, one thread) that is
0.13 calls per byte instead of 0.24, 1.50x faster, the same bits per byte
(``benchmarks/byte_level.py --exact-only --bytes 600 --offset 200000 --threads 1 --chain-bytes 0``,
then 16). The cost that remains is the positions themselves:
at about 8 followed tokenizations per byte against 0.23 tokens per byte for a plain forward pass,
exactness costs some 35 plain passes of compute on a CPU whatever the batching, more where many
tokenizations that split early stay probable and each attends to its own history
(``benchmarks/byte_level.py``, RESULTS.md). Memory too: where a tokenization that split early
stays above the pruning threshold (the run of asterisks under a pydoc title), the shared trunk
stops there and the keys of every followed history stay in memory, so memory and time per byte
grow along such a text (the trunk stays at 7 tokens for the first 1,000 of those 2,000 bytes;
peak RSS +0.75 GiB); stream documents or paragraphs separately, or give a ``window`` (above).
Where the text is not known ahead: a query keeps the
state of every 16th byte of its walk, so a later cut of the same text (the byte lens's slider)
walks from the nearest one; :meth:`sample` scores ahead along a guess of its next bytes, drawn
with its own uniforms from the tokenizations already scored, and needs a call about once per
token while the draws follow it;
:meth:`samples` walks several draws side by side, one call per byte for all of them
(``benchmarks/byte_queries.py`` compares these with the code of one call per byte). The paper's reference implementation
(``BytePredLLM.prob_next_byte``, facebookresearch/Exact-Byte-Level-Probabilities-from-Tokenized-LMs)
sums canonical covers only, conditions on the canonical encoding up to the last whitespace,
and runs the model once per byte over the tokens after that whitespace (from a cache), plus,
when it starts from a prompt, once per split point of the prompt's last word: one call per
byte, several positions each. Hayase et al.'s ByteSampler ("Sampling from Your Language Model
One Byte at a Time", 2025) likewise reports a constant per-byte overhead.

Dims: every distribution is a DataArray over ``byte`` (coordinate 0..255, with a readable
``char`` coordinate); :meth:`ByteLevelModel.stream` returns a Dataset over (``pos``, ``byte``).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import xarray as xr

from ..models import ModelHandle
from ..models.loading import holding_model_lock
from ..numerics import logsumexp
from ..probes.token_scoring import PrefixTreeScorer, ScoredSequence, next_token_logprob_rows
from ..tokenization.vocab_bytes import UnsupportedTokenizerError, VocabBytes, printable_byte, vocab_bytes

__all__ = ["ByteLevelModel", "ImpossiblePrefixError", "UnsupportedTokenizerError", "start_context"]

BYTES = np.arange(256)
BYTE_CHARS = [printable_byte(b) for b in range(256)]
_RECENT_STATES = 4  # queried states kept for reuse
_PIN_BYTES = 256  # how far the cursor may run past a kept state before it is dropped
_LOOKAHEAD_MARGIN = math.log(3.0)  # lookahead takes children up to 3x below the estimated pruning floor
_LOOKAHEAD_MIN_BYTES = 8  # a query walks this many known bytes or more: score ahead along them
_CHECKPOINT_BYTES = 16  # a query's walk keeps its state every this many bytes ...
_CHECKPOINTS = 32  # ... the latest this many of them
_CHAIN_BYTES = 16  # a known text's canonical tokens are scored ahead up to this many bytes past the cut
_SPLIT_BYTES = 3  # while sampling, tokens up to this long are scored ahead after each tokenization requested in a call


def _keep(kept: dict, state, limit: int) -> None:
    """Remember ``state`` under its prefix as the newest of at most ``limit`` states."""
    kept.pop(state.prefix, None)
    kept[state.prefix] = state
    while len(kept) > limit:
        kept.pop(next(iter(kept)))


def _common_prefix(a: bytes, b: bytes) -> int:
    """Length of the longest common prefix of ``a`` and ``b``."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.frombuffer(a[:n], np.uint8) != np.frombuffer(b[:n], np.uint8))
    return int(differ[0]) if len(differ) else n


class ImpossiblePrefixError(ValueError):
    """The model gives the byte prefix probability 0: no token sequence can spell it."""


# --------------------------------------------------------------------------- helpers


def as_bytes(prefix) -> bytes:
    if isinstance(prefix, str):
        return prefix.encode("utf-8")
    if isinstance(prefix, (bytes, bytearray, memoryview)):
        return bytes(prefix)
    raise TypeError(f"prefix must be str or bytes, got {type(prefix).__name__}.")


def byte_distribution(values: np.ndarray, name: str, attrs: dict) -> xr.DataArray:
    """A (byte,) DataArray with the byte value and a readable character as coordinates."""
    return xr.DataArray(
        np.asarray(values, dtype=np.float64),
        dims=("byte",),
        coords={"byte": BYTES, "char": ("byte", BYTE_CHARS)},
        name=name,
        attrs=attrs,
    )


def sampling_uniforms(n_bytes: int, seed: int, temperature: float) -> np.ndarray:
    """The uniforms in [0, 1) that draw ``n_bytes`` bytes, one each (seeded); the arguments checked first."""
    if n_bytes < 0:
        raise ValueError(f"n_bytes must be >= 0, got {n_bytes}.")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    return np.random.default_rng(seed).random(n_bytes)


def sample_bytes(next_distribution, prefix: bytes, n_bytes: int, seed: int, temperature: float) -> bytes:
    """Draw ``n_bytes`` bytes one at a time from ``next_distribution(bytes) -> (256,) probabilities``."""
    out = bytearray()
    for u in sampling_uniforms(n_bytes, seed, temperature):
        out.append(draw_byte(next_distribution(prefix + bytes(out)), u, temperature))
    return bytes(out)


def draw_byte(probabilities, u: float, temperature: float) -> int:
    """The byte that the uniform ``u`` picks from ``probabilities`` (256) rescaled by ``temperature`` (``p^(1/T)``).

    The inverse CDF, as ``numpy.random.Generator.choice(256, p=...)`` computes it from the
    generator's next ``random()``: the same bytes as that call, written out so that the uniforms
    can be drawn ahead of the distributions (the exact sampler guesses the bytes to come with them,
    :meth:`ByteLevelModel._draft`).
    """
    p = np.asarray(probabilities, dtype=np.float64)
    if temperature != 1.0:
        p = np.where(p > 0, p ** (1.0 / temperature), 0.0)
    cdf = (p / p.sum()).cumsum()
    cdf /= cdf[-1]
    return int(cdf.searchsorted(u, side="right"))


def start_context(handle: ModelHandle) -> list[int]:
    """Token ids every text is conditioned on: the tokenizer's own start tokens, else ``<|endoftext|>``, else EOS."""
    tok = handle.tokenizer
    with_special = tok("a", add_special_tokens=True)["input_ids"]
    plain = tok("a", add_special_tokens=False)["input_ids"]
    if len(with_special) > len(plain) and with_special[len(with_special) - len(plain) :] == plain:
        return list(with_special[: len(with_special) - len(plain)])
    eot = tok.convert_tokens_to_ids("<|endoftext|>")  # a lookup, not a copy of the whole vocabulary
    if isinstance(eot, int) and tok.convert_ids_to_tokens(eot) == "<|endoftext|>":
        return [eot]
    for attr in ("eos_token_id", "bos_token_id"):
        if getattr(tok, attr, None) is not None:
            return [getattr(tok, attr)]
    raise UnsupportedTokenizerError(
        f"{handle.name}: its tokenizer adds no start token and has no <|endoftext|>, EOS or BOS token to start a text "
        "with; pass context_ids=[...] explicitly."
    )


def byte_token_probs(logprobs: np.ndarray, vocab: VocabBytes) -> tuple[np.ndarray, float]:
    """Next-token probabilities over the byte tokens in sorted-bytes order, renormalised; and the special mass."""
    p = np.exp(logprobs.astype(np.float64))
    ids = vocab.sorted_ids
    inside = ids < p.shape[0]
    q = np.where(inside, p[np.minimum(ids, p.shape[0] - 1)], 0.0)
    total, everything = q.sum(), p.sum()
    if total <= 0:
        raise ValueError("the model puts no probability on any byte-producing token; cannot continue the text.")
    return q / total, max(0.0, (everything - total) / everything)


def _runs(vocab: VocabBytes, data: bytes, pos: int, stop: int):
    """Yield ``(m, lo, hi)`` for ``m = pos + 1 .. stop`` while some token starts with ``data[pos:m]``: ``sorted_ids[lo:hi]``."""
    lo, hi = 0, vocab.n_byte_tokens
    for m in range(pos + 1, stop + 1):
        lo, hi = vocab.prefix_range(data[pos:m], lo, hi)
        if lo == hi:
            return
        yield m, lo, hi


def _request_ids(requests) -> list[tuple]:
    """The token ids of each request ``(parent, token, ...)`` of :meth:`ByteLevelModel._score` (a parent is scored, or
    the index of an earlier request)."""
    ids: list[tuple] = []
    for parent, t, *_ in requests:
        ids.append((ids[parent] if isinstance(parent, int) else parent.seq.ids) + (t,))
    return ids


def encode_bytes(handle: ModelHandle, vocab: VocabBytes, data: bytes) -> list[int]:
    """The tokenizer's encoding of ``data``; bytes that are not valid UTF-8 become single-byte tokens.

    Special-token strings in the text (a literal ``<|endoftext|>``) are encoded as text: special
    tokens stand for no bytes here, as in :class:`ByteLevelModel`.
    """

    def encode(text: str) -> list[int]:
        return handle.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    ids: list[int] = []
    pos = 0
    while pos < len(data):
        try:
            ids += encode(data[pos:].decode("utf-8"))
            break
        except UnicodeDecodeError as err:
            if err.start:
                ids += encode(data[pos : pos + err.start].decode("utf-8"))
            bad = data[pos + err.start]
            single = vocab.tokens_equal_to(bytes([bad]))
            if not single:
                raise ImpossiblePrefixError(
                    f"{handle.name}: byte 0x{bad:02X} at offset {pos + err.start} is not valid UTF-8 and the "
                    "vocabulary has no single-byte token for it, so the prefix cannot be encoded."
                ) from None
            ids.append(single[0])
            pos += err.start + 1
    return ids


# --------------------------------------------------------------------------- the exact model


@dataclass(eq=False)
class _Tokenization:
    """A token sequence spelling exactly ``x[:pos]``, with its probability and next-token distribution."""

    seq: ScoredSequence
    pos: int
    logp: float  # log P(tokens after the context), under the byte-token-conditioned model q
    q: np.ndarray  # next-token probabilities over byte tokens, sorted-bytes order
    p_special: float  # raw probability of a special token next
    lo: int = 0  # run of tokens starting with x[pos:n] (n = current prefix length)
    hi: int = 0
    parent: ScoredSequence | None = field(default=None, repr=False)  # scored ahead: the sequence it extends

    @property
    def token_ids(self) -> tuple[int, ...]:
        return self.seq.ids


@dataclass
class _Step:
    """One byte more, planned (:meth:`ByteLevelModel._plan`): what the walk keeps, before any model call."""

    x: bytes  # the prefix one byte longer
    survivors: list  # older tokenizations whose last token may still run past x
    parents: list  # (_Tokenization, lo, hi) of every cover of x
    logp: float  # log P(x)
    kept: list  # (logp, parent, token): new tokenizations ending at len(x), to score
    pruned: list  # log-probabilities pruned at this byte


@dataclass(eq=False)
class _State:
    """Everything known at one cut point ``x``: the tokenizations still followed and ``log P(x)``."""

    prefix: bytes
    alive: list  # _Tokenization whose run for x[pos:n] is non-empty (pos == n: all tokens)
    parents: list  # (_Tokenization, lo, hi) of every cover of x (pos < n), for covers()
    logp: float  # log P(x), over the covers of followed tokenizations
    pruned_logmass: float  # log of the total probability of every tokenization pruned so far
    pruned_fraction: float  # posterior of the tokenizations ending at n that were pruned
    calls: int = 0
    _dist: object = field(default=None, repr=False)


class ByteLevelModel:
    """A tokenized language model read as an exact language model over bytes.

    "Exact Byte-Level Probabilities from Tokenized Language Models for FIM-Tasks and Model
    Ensembles" (Phan et al., 2024): ``P(b | x) = P(x b) / P(x)`` with ``P(x)`` summed over cover
    encodings (see the module docstring for which covers, pruning and end of text).

    ``prune``: posterior below which a tokenization is not followed (0: follow all).
    ``max_hypotheses``: most tokenizations followed at once (None: no limit).
    ``window``: bytes after which tokenizations that split from the most probable ones are pruned
    (None: never; see "Long texts" in the module docstring).
    ``context_ids``: tokens every text is conditioned on (default :func:`start_context`).
    :attr:`calls` counts model forward passes.
    """

    def __init__(
        self,
        handle: ModelHandle,
        prune: float = 1e-5,
        max_hypotheses: int | None = 32,
        context_ids=None,
        window: int | None = None,
    ):
        if not 0 <= prune < 1:
            raise ValueError(f"prune must be in [0, 1), got {prune}.")
        if max_hypotheses is not None and max_hypotheses < 1:
            raise ValueError(f"max_hypotheses must be >= 1 or None, got {max_hypotheses}.")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 (bytes) or None, got {window}.")
        self.handle = handle
        self.vocab = vocab_bytes(handle.tokenizer)
        self.prune = float(prune)
        self.max_hypotheses = max_hypotheses
        self.window = window
        self.context_ids = list(context_ids) if context_ids is not None else start_context(handle)
        self._scorer = PrefixTreeScorer(handle)
        self._first_byte = self.vocab.byte_matrix[0]
        self._token_lengths = [len(b or b"") for b in self.vocab.token_bytes]  # bytes each token id adds
        self._cursor: _State | None = None
        # Recently queried states, so that several continuations of one prefix reuse its work. They
        # keep the scorer's shared trunk from growing past their tokenizations while the cursor is
        # within _PIN_BYTES of them.
        self._recent: dict[bytes, _State] = {}
        # States every _CHECKPOINT_BYTES along the walks of queries, kept the same way: a later query
        # at an earlier cut of the same text (a slider moved back) walks from the nearest one.
        self._checkpoints: dict[bytes, _State] = {}
        # Lookahead (stream() of a known text): tokenizations scored before the walk reached their last byte,
        # by token ids.
        self._text: bytes | None = None
        self._canonical: np.ndarray | None = None  # the known text's canonical prefix log-probabilities
        self._canonical_next: dict[int, int] = {}  # byte -> the canonical token of the known text starting there
        # Sampling: tokenizations are scored ahead along a draft of the bytes to come (_draft), drawn with the
        # sampler's own uniforms: (length of the prefix sampled after, uniforms, temperature), or None.
        self._drafting: tuple[int, np.ndarray, float] | None = None
        self._draft_text = b""
        self._ahead: dict[tuple, _Tokenization] = {}
        self._cumulative: dict[ScoredSequence, np.ndarray] = {}  # cumulative sums of q, for _speculate

    @property
    def name(self) -> str:
        return self.handle.name

    @property
    def calls(self) -> int:
        """Model forward passes run so far."""
        return self._scorer.calls

    @property
    def positions(self) -> int:
        """Token positions run so far (a call scoring k tokenizations runs k positions)."""
        return self._scorer.positions

    # ------------------------------------------------------------------ state machine

    def _new_tokenization(self, seq: ScoredSequence, pos: int, logp: float) -> _Tokenization:
        q, p_special = byte_token_probs(seq.logprobs, self.vocab)
        return _Tokenization(seq, pos, logp, q, p_special, 0, self.vocab.n_byte_tokens)

    def _root(self) -> _State:
        seq = self._scorer.start(self.context_ids)
        root = self._new_tokenization(seq, 0, 0.0)
        state = _State(b"", [root], [], 0.0, -math.inf, 0.0, calls=self.calls)
        self._cursor = state
        self._recent.clear()  # a new scorer session: every earlier tokenization's cache is gone
        self._checkpoints.clear()
        self._ahead.clear()
        self._cumulative.clear()
        return state

    def _usable(self, state: _State | None) -> bool:
        return state is not None and all(self._scorer.usable(h.seq) for h in state.alive)

    def _state_for(self, prefix: bytes, remember: bool = True) -> _State:
        """The state at ``prefix``, walked from the longest usable known state that ``prefix`` extends."""
        known = [s for s in [self._cursor, *self._kept_states()] if s is not None and prefix.startswith(s.prefix)]
        known = [s for s in sorted(known, key=lambda s: -len(s.prefix)) if self._usable(s)]
        state = known[0] if known else self._root()
        self._cursor = state
        ahead = self._text is None and len(prefix) - len(state.prefix) >= _LOOKAHEAD_MIN_BYTES
        with self._known_text(prefix if ahead else None):
            for b in prefix[len(state.prefix) :]:
                state = self._advance(state, b)
                if remember and len(state.prefix) % _CHECKPOINT_BYTES == 0 and len(state.prefix) < len(prefix):
                    _keep(self._checkpoints, state, _CHECKPOINTS)
        if remember:
            _keep(self._recent, state, _RECENT_STATES)
        return state

    def _kept_states(self) -> list[_State]:
        return [*self._recent.values(), *self._checkpoints.values()]

    def _advance(self, state: _State, byte: int) -> _State:
        """``state`` one byte further (at most one model call; lookahead as :meth:`_score` says)."""
        return self._advance_all([(state, byte)])[0]

    def _advance_all(self, steps) -> list[_State]:
        """Each ``(state, byte)`` one byte further; the new tokenizations of several walks scored in one call."""
        plans = [self._plan(state, byte) for state, byte in steps]
        if len(plans) == 1:
            p = plans[0]
            children = [self._score(p.kept, p.x, p.logp, p.survivors)]
        else:
            children = self._score_all(plans)
        n = max(len(p.x) for p in plans)
        for store in (self._recent, self._checkpoints):
            for key in [k for k, st in store.items() if n - len(st.prefix) > _PIN_BYTES]:
                del store[key]
        alive = [h for p, c in zip(plans, children) for h in p.survivors + c]
        self._forget_orphans(alive)
        pinned = [h.seq for st in self._kept_states() for h in st.alive if self._scorer.usable(h.seq)]
        self._scorer.commit([h.seq for h in alive] + pinned + [a.seq for a in self._ahead.values()])
        new = []
        for (state, _), p, c in zip(steps, plans, children):
            pruned_here = logsumexp(p.pruned)
            new.append(_State(
                prefix=p.x,
                alive=p.survivors + c,
                parents=p.parents,
                logp=p.logp,
                pruned_logmass=float(np.logaddexp(state.pruned_logmass, pruned_here)),
                pruned_fraction=math.exp(pruned_here - p.logp) if p.pruned else 0.0,
                calls=self.calls,
            ))
        self._cursor = new[-1]
        return new

    def _plan(self, state: _State, byte: int) -> _Step:
        """What one byte more decides, before any model call: ``log P(x)``, the covers, what is kept and pruned."""
        vocab = self.vocab
        x = state.prefix + bytes([byte])
        n = len(x)
        survivors, parents, masses, candidates = [], [], [], []
        for h in state.alive:
            s = x[h.pos :]
            lo, hi = vocab.prefix_range(s, h.lo, h.hi)
            if lo == hi:
                continue
            mass = float(h.q[lo:hi].sum())
            if mass > 0:
                masses.append(h.logp + math.log(mass))
            parents.append((h, lo, hi))
            exact = vocab.tokens_equal_to(s)
            for t in exact:
                qt = h.q[vocab.rank[t]]
                if qt > 0:
                    candidates.append((h.logp + math.log(qt), h, t))
            if hi - lo > len(exact):
                survivors.append(_Tokenization(h.seq, h.pos, h.logp, h.q, h.p_special, lo, hi))
        logp = logsumexp(masses)
        if logp == -math.inf:
            raise ImpossiblePrefixError(
                f"{self.name}: no token sequence spells {x[-40:]!r}: byte 0x{byte:02X} at offset {n - 1} cannot "
                f"follow the {n - 1} bytes before it (probability 0; see attrs['impossible_bytes'] of the "
                "distribution before it). Check the text, or use a model whose vocabulary can spell it."
            )
        # Shares of P(x): a new tokenization ending at n carries P(h) q(t | h); an older one carries
        # the covers whose last token runs past n. Together with what is pruned they add up to P(x).
        floor = logp + math.log(self.prune) if self.prune > 0 else -math.inf
        ranked = [(lp, "new", (h, t)) for lp, h, t in candidates if lp >= floor]
        pruned = [lp for lp, _, _ in candidates if lp < floor]
        for h in survivors:
            start = h.lo + len(vocab.tokens_equal_to(x[h.pos :]))
            longer = float(h.q[start : h.hi].sum())
            ranked.append((h.logp + math.log(longer) if longer > 0 else -math.inf, "old", h))
        ranked.sort(key=lambda r: -r[0])
        if self.max_hypotheses is not None and len(ranked) > self.max_hypotheses:
            pruned += [r[0] for r in ranked[self.max_hypotheses :]]
            ranked = ranked[: self.max_hypotheses]
        in_window = candidates
        if self.window is not None and n > self.window and ranked:
            ranked, in_window, out = self._within_window(ranked, candidates, n - self.window)
            pruned += out
        if candidates and not any(kind == "new" for _, kind, _ in ranked):
            # Always keep a tokenization with a token boundary at n: only such a one can go on with any
            # byte (its next token may start with anything); the others can only spell the rest of their
            # last token. On flat distributions (random weights) pruning would otherwise keep just those
            # and make the next byte impossible. The most probable one takes the last place: one that
            # agrees with the window if any does, else one the window would prune (the group kept is
            # inside a long token; the trunk waits until it ends).
            best = max(in_window or candidates, key=lambda c: c[0])
            pruned.remove(best[0])
            if self.max_hypotheses is not None and len(ranked) >= self.max_hypotheses:
                pruned.append(ranked.pop()[0])
            ranked.append((best[0], "new", (best[1], best[2])))
        survivors = [r[2] for r in ranked if r[1] == "old"]
        kept = [(r[0], *r[2]) for r in ranked if r[1] == "new"]
        return _Step(x, survivors, parents, logp, kept, pruned)

    def _within_window(self, ranked, candidates, limit: int):
        """Keep the tokenizations that agree with the most probable ones on every token ending at or before
        byte ``limit`` (``window`` bytes before the cut); the others' shares are pruned.

        Tokenizations are grouped by those tokens (a new one by its parent's: its last token ends at the
        cut); the group with the largest total share of ``P(x)`` is kept. Returns ``(ranked, candidates,
        pruned)``: what :meth:`_plan` keeps and the log-shares pruned. Cost: a walk back over the last
        ``window`` bytes' tokens of each distinct parent, once per byte.
        """
        trunk, lengths, keys = self._scorer.trunk_length, self._token_lengths, {}

        def key(h: _Tokenization) -> tuple:  # h's tokens after the trunk that end at or before the limit
            if id(h.seq) not in keys:
                ids, j, end = h.seq.ids, len(h.seq.ids), h.pos
                while j > trunk and end > limit:
                    j -= 1
                    end -= lengths[ids[j]]
                keys[id(h.seq)] = ids[trunk:j]
            return keys[id(h.seq)]

        parent = [item[0] if kind == "new" else item for _, kind, item in ranked]
        groups: dict[tuple, list] = {}
        for r, h in zip(ranked, parent):
            groups.setdefault(key(h), []).append(r[0])
        if len(groups) == 1:
            return ranked, candidates, []
        best = max(groups, key=lambda k: logsumexp(groups[k]))
        kept = [r for r, h in zip(ranked, parent) if key(h) == best]
        out = [r[0] for r, h in zip(ranked, parent) if key(h) != best]
        return kept, [c for c in candidates if key(c[1]) == best], out

    def _forget_orphans(self, alive) -> None:
        """Forget the tokenizations scored ahead whose parent is no longer followed (pruned by any rule) nor
        itself scored ahead and kept: the walk never asks for them, and each would hold the scorer's trunk
        in place and its own keys and distributions (about 0.6 MB with SmolLM2's vocabulary) in memory."""
        live = {h.seq for h in alive}
        for ids in sorted(self._ahead, key=len):  # parents before their children
            if self._ahead[ids].parent in live:
                live.add(self._ahead[ids].seq)
            else:
                del self._ahead[ids]

    # ------------------------------------------------------------------ scoring, with lookahead on a known text

    def _score(self, kept, x: bytes, logp_n: float, survivors) -> list[_Tokenization]:
        """The tokenizations ``(logp, parent, token)`` ending at byte ``n = len(x)``, scored (one model call at most).

        Without lookahead each step's new tokenizations are one call. Otherwise a call also scores,
        ahead of the walk, the children of every scored tokenization that the walk may still follow
        along a text (:meth:`_speculate`): the known text (:meth:`stream`, a query far from any known
        state), or, while sampling, a guess of the bytes the sampler will draw (:meth:`_draft`).
        A later step finds them ready and needs no call. Which ones the walk keeps is decided exactly
        as without lookahead, so the results are the same; a child the lookahead left out, or one
        the sampled bytes did not follow, is scored when asked for.
        """
        n = len(x)
        for key in [k for k, a in self._ahead.items() if a.pos < n]:
            del self._ahead[key]  # the walk has passed their last byte without keeping them
        out, missing = [], []
        for lp, h, t in kept:
            ready = self._ahead.pop(h.seq.ids + (t,), None)
            if ready is None:
                missing.append((lp, h, t))
            else:
                out.append(replace(ready, logp=lp, parent=None))  # the walk's own arithmetic (the same value)
        if not missing:
            return out
        requested = {h.seq.ids + (t,) for _, h, t in missing}
        text, guide = self._text, self._canonical
        drafted = text is None and self._drafting is not None
        if drafted:
            text, guide = self._draft(x, [*survivors, *out]), None
        # (parent: a scored _Tokenization or the index of an earlier request, token, last byte, logp or None)
        requests = [(h, t, n, lp) for lp, h, t in missing]
        if text is not None:
            ahead, likely = self._speculate(n, logp_n, [*survivors, *out], requested, text, guide)
            requests += ahead
            roots = [*out, *range(len(missing)), *(len(missing) + i if isinstance(i, int) else i for i in likely)]
            if self._canonical_next:
                requests += self._chains(n, roots, requests)
            elif drafted:
                requests += self._splits(roots, requests, text)
        scored = self._scorer.extend([(p if isinstance(p, int) else p.seq, t) for p, t, _, _ in requests])
        made: list[_Tokenization] = []
        for seq, (parent, t, pos, lp) in zip(scored, requests):
            if lp is None:  # a chain's token: the log-probability its parent (scored in this call) gives it
                p = made[parent] if isinstance(parent, int) else parent
                qt = p.q[self.vocab.rank[t]]
                lp = p.logp + math.log(qt) if qt > 0 else -math.inf
            made.append(self._new_tokenization(seq, pos, lp))
        out += made[: len(missing)]
        for (parent, *_), h in zip(requests[len(missing) :], made[len(missing) :]):
            self._ahead[h.seq.ids] = replace(h, parent=made[parent].seq if isinstance(parent, int) else parent.seq)
        return out

    def _chains(self, n: int, roots, requests) -> list[tuple]:
        """Requests that score the known text's canonical tokens ahead, up to ``_CHAIN_BYTES`` past the cut, after
        each of ``roots`` that ends where a canonical token starts (a chain goes on from where the last one ended).

        Depth-one lookahead (:meth:`_speculate`) reaches one token past what is scored, so it would need a call
        per token of the text; a chain of new tokens is one call (:meth:`PrefixTreeScorer.extend`), and the next
        call's lookahead scores the other splits along it. ``roots``: tokenizations the walk is likely to
        follow, scored (``_Tokenization``) or requested in this call (index into ``requests``, whose entries are
        ``(parent, token, last byte, logp)`` as in :meth:`_score`). Only the cost depends on this guess.
        """
        starts, lengths, limit = self._canonical_next, self._token_lengths, n + _CHAIN_BYTES
        ids = _request_ids(requests)
        index = {key: i for i, key in enumerate(ids)}
        out: list[tuple] = []
        for root in roots:
            node, pos = root, requests[root][2] if isinstance(root, int) else root.pos
            key = ids[root] if isinstance(root, int) else root.seq.ids
            while pos in starts and pos + lengths[starts[pos]] <= limit:
                t = starts[pos]
                key, pos = key + (t,), pos + lengths[t]
                if key in self._ahead:
                    node = self._ahead[key]
                elif key in index:
                    node = index[key]
                else:
                    out.append((node, t, pos, None))
                    node = index[key] = len(requests) + len(out) - 1
        return out

    def _splits(self, roots, requests, text: bytes) -> list[tuple]:
        """Requests that score, after each of ``roots`` requested in this call (as in :meth:`_chains`), every token of
        up to ``_SPLIT_BYTES`` bytes that spells the draft ``text`` from where the root ends (the children of roots
        scored before are :meth:`_speculate`'s to choose, from their known probabilities).

        While sampling there is no known text to chain along, and depth-one lookahead leaves out the
        tokenizations one token past those scored ahead, which the walk keeps inside a word (" w" + "i"
        of " with", " famil" + "y"): each cost a call of its own. Longer last tokens are left out to bound
        the rows a call adds (the splits the walk keeps inside a word end in short tokens); the calls this
        saves are measured by ``benchmarks/byte_queries.py`` (RESULTS.md: 22 calls per draw instead of 31).
        """
        ids = _request_ids(requests)
        known = set(ids) | self._ahead.keys()
        out = []
        for root in (r for r in roots if isinstance(r, int)):
            pos, key = requests[root][2], ids[root]
            for t, length in self.vocab.tokens_prefix_of(text[pos : pos + _SPLIT_BYTES]):
                if key + (t,) not in known:
                    known.add(key + (t,))
                    out.append((root, t, pos + length, None))
        return out

    def _score_all(self, plans) -> list[list[_Tokenization]]:
        """The new tokenizations of several walks (:meth:`_plan`), scored in one model call (no lookahead)."""
        requests: dict[tuple, int] = {}  # (parent sequence, token) -> row; walks may ask for the same one
        for p in plans:
            for _, h, t in p.kept:
                requests.setdefault((h.seq, t), len(requests))
        scored = self._scorer.extend(list(requests)) if requests else []
        return [[self._new_tokenization(scored[requests[h.seq, t]], len(p.x), lp) for lp, h, t in p.kept]
                for p in plans]

    def _draft(self, x: bytes, alive) -> bytes:
        """``x`` and a guess at the bytes the sampler will draw after it, for scoring ahead.

        Byte by byte, the guess draws with the uniform the sampler will use for that byte
        (:func:`draw_byte`) from the next-byte distribution of the tokenizations already scored,
        over the tokens that run past the guess so far. Where those are most of the mass (inside a
        token), it is the exact distribution up to what is left out, so the guess is the draw the
        sampler will make; it stops where tokens ending there carry more (the next byte is then up
        to a tokenization not scored yet). Tokenizations scored ahead for an earlier guess that
        spell past where this one differs can no longer be asked for, and are dropped.
        """
        first, uniforms, temperature = self._drafting
        ref = max(h.logp for h in alive) if alive else 0.0
        text = x
        while len(text) - first < len(uniforms):
            num, _, _, ended = self._masses_after(text, alive, ref)
            if num.sum() == 0 or num.sum() <= ended:
                break
            text += bytes([draw_byte(num / num.sum(), uniforms[len(text) - first], temperature)])
        same = _common_prefix(text, self._draft_text)
        for key in [k for k, a in self._ahead.items() if a.pos > same]:
            del self._ahead[key]
        self._draft_text = text
        return text

    @contextmanager
    def _known_text(self, text: bytes | None):
        """Score ahead along ``text`` (the whole text from byte 0) while the block runs; forget it afterwards."""
        if text is None:
            yield
            return
        body = encode_bytes(self.handle, self.vocab, text)
        self._text, self._canonical = text, self._canonical_prefix_logprobs(text, body)
        starts = np.cumsum([0] + [self._token_lengths[t] for t in body])
        self._canonical_next = {int(start): t for start, t in zip(starts, body)}
        try:
            yield
        finally:
            self._text, self._canonical, self._canonical_next = None, None, {}
            self._ahead.clear()
            self._cumulative.clear()

    def _speculate(self, n: int, logp_n: float, alive, requested: set, text: bytes, guide: np.ndarray | None
                   ) -> tuple[list[tuple[_Tokenization, int, int, float]], list]:
        """Children ``(parent, token, last byte, logp)`` of scored tokenizations the walk is likely to keep after ``n``,
        and which of them (by index) and of the tokenizations scored ahead it will likely keep (no margin).

        Every scored tokenization (followed, or scored ahead) has children that spell ``text`` past
        byte ``n``, with exact log-probabilities already (the parent's next-token distribution).
        At each byte ``m`` the walk keeps the new tokenizations whose share of ``P(x[:m])`` passes the
        pruning threshold and ranks among the ``max_hypotheses`` largest; a child is taken if it
        would, with a margin of 3x: ``P(x[:m])`` estimated as the larger of ``P(x[:n])`` times the
        canonical encoding's ``P(x[:m]) / P(x[:n])`` (``guide``, :meth:`_canonical_prefix_logprobs`;
        None while sampling) and the covers of the scored tokenizations; the rank among the shares
        these give. The best child at each byte is always taken. Only the cost depends on this
        guess, never the result: a child left out is scored when the walk asks for it.
        """
        vocab = self.vocab
        scored = [*alive, *self._ahead.values()]
        horizon = min(len(text), max([n, *(h.pos for h in scored)]) + vocab.max_token_bytes + 1)
        if guide is None:
            estimate = np.full(horizon + 1, -math.inf)
        else:
            estimate = logp_n + guide[: horizon + 1] - guide[n]  # log P(x[:m]), m in (n, horizon]
            estimate[~np.isfinite(estimate)] = -math.inf  # no canonical guide there: the covers alone
        shares: dict[int, list] = {}  # m -> log shares of P(x[:m]) known: new tokenizations and longer covers
        candidates: dict[int, list] = {}
        taken = requested | self._ahead.keys()
        self._cumulative = {h.seq: self._cumulative.get(h.seq) for h in scored}
        for h in scored:
            seq, pos, logp, q = h.seq, h.pos, h.logp, h.q
            cumulative = self._cumulative[seq]
            if cumulative is None:
                cumulative = self._cumulative[seq] = np.concatenate([[0.0], np.cumsum(q)])
            for m, lo, hi in _runs(vocab, text, pos, horizon):
                if m <= n:
                    continue
                mass = cumulative[hi] - cumulative[lo]
                if mass > 0:
                    estimate[m] = np.logaddexp(estimate[m], logp + math.log(mass))
                for t in vocab.tokens_equal_to(text[pos:m]):
                    qt = q[vocab.rank[t]]
                    if qt > 0:
                        mass -= qt
                        lp = logp + math.log(qt)
                        shares.setdefault(m, []).append(lp)
                        candidates.setdefault(m, []).append((lp, seq.ids + (t,) not in taken, h, t))
                if mass > 0:
                    shares.setdefault(m, []).append(logp + math.log(mass))
        log_prune = math.log(self.prune) if self.prune > 0 else -math.inf
        floors = {}
        for m, found in candidates.items():
            found.sort(key=lambda c: -c[0])
            floor = estimate[m] + log_prune
            if self.max_hypotheses is not None and len(shares[m]) > self.max_hypotheses:
                floor = max(floor, float(np.partition(shares[m], -self.max_hypotheses)[-self.max_hypotheses]))
            floors[m] = (floor, found[0][0])
        # children of a tokenization scored ahead count only if the walk is likely to keep it (no margin)
        unlikely = {a.seq for a in self._ahead.values() if a.logp < min(*floors.get(a.pos, (-math.inf, -math.inf)))}
        likely = [a for a in self._ahead.values() if a.seq not in unlikely]
        out = []
        for m, found in candidates.items():
            floor = floors[m][0]
            for k, (lp, new, h, t) in enumerate(found):
                if new and (k == 0 or lp >= floor - _LOOKAHEAD_MARGIN) and h.seq not in unlikely:
                    if lp >= floor:
                        likely.append(len(out))
                    out.append((h, t, m, lp))
        return out, likely

    def _canonical_prefix_logprobs(self, data: bytes, body: list[int]) -> np.ndarray:
        """``log P(x[:m])`` for ``m = 0..len(data)`` summed over the covers that extend the tokenizer's own encoding.

        ``body``: the tokenizer's encoding of ``data``. One plain forward pass over it (a lower bound of the exact
        ``P(x[:m])``, whose differences between nearby cuts guide :meth:`_speculate`). Under the same
        byte-token-conditioned model as the walk.
        """
        vocab = self.vocab
        ids = list(self.context_ids) + body
        out = np.full(len(data) + 1, -math.inf)
        out[0], logp, pos = 0.0, 0.0, 0
        for j, row in next_token_logprob_rows(self.handle, ids, start=len(self.context_ids) - 1):
            q, _ = byte_token_probs(row, vocab)
            cumulative = np.concatenate([[0.0], np.cumsum(q)])
            for m, lo, hi in _runs(vocab, data, pos, min(len(data), pos + vocab.max_token_bytes)):
                mass = cumulative[hi] - cumulative[lo]
                if mass > 0:
                    out[m] = np.logaddexp(out[m], logp + math.log(mass))
            if j + 1 < len(ids):
                t = ids[j + 1]
                logp += math.log(max(q[vocab.rank[t]], 1e-300))
                pos += len(vocab.token_bytes[t])
        return out

    def _next_byte(self, state: _State) -> tuple[np.ndarray, dict]:
        """Unnormalised next-byte masses (relative to the best tokenization) and the structurally possible bytes."""
        if state._dist is not None:
            return state._dist
        n = len(state.prefix)
        ref = max(h.logp for h in state.alive)
        num, possible, end, _ = self._masses_after(state.prefix, state.alive, ref)
        total_prefix = math.exp(state.logp - ref) if n else 1.0
        info = {"ref": ref, "possible": possible, "p_end_of_text": end / total_prefix if total_prefix > 0 else 0.0}
        state._dist = (num, info)
        return state._dist

    def _masses_after(self, text: bytes, tokenizations, ref: float):
        """What ``tokenizations`` (scored, each spelling a prefix of ``text``) say of the byte after ``text``.

        ``(num, possible, p_end, ended)``, masses relative to ``exp(ref)``: ``num[b]`` of the tokens
        that go on with byte ``b`` (for a tokenization ending at ``text``, its next token's first
        byte; for the others, the next byte of a last token that runs past ``text``); ``possible``
        the bytes some token can spell there; ``p_end`` a special token next, after those ending at
        ``text``; ``ended`` the last tokens that end exactly at ``text``, whose next byte is up to
        tokenizations not among these.
        """
        vocab, n = self.vocab, len(text)
        num, possible, p_end, ended = np.zeros(256), np.zeros(256, dtype=bool), 0.0, 0.0
        for h in tokenizations:
            w = math.exp(h.logp - ref)
            if h.pos == n:
                num += w * np.bincount(self._first_byte, weights=h.q, minlength=256)
                possible |= vocab.producible_first_bytes()
                p_end += w * h.p_special
                continue
            lo, hi = vocab.prefix_range(text[h.pos :], h.lo, h.hi)
            equal = vocab.tokens_equal_to(text[h.pos :])
            ended += w * sum(float(h.q[vocab.rank[t]]) for t in equal)
            start = lo + len(equal)
            if start < hi:
                column = vocab.byte_matrix[n - h.pos, start:hi]
                num += w * np.bincount(column, weights=h.q[start:hi], minlength=256)
                possible[column] = True
        return num, possible, p_end, ended

    def _attrs(self, state: _State, method: str = "exact") -> dict:
        _, info = self._next_byte(state)
        impossible = [int(b) for b in np.flatnonzero(~info["possible"])]
        return {
            "method": method,
            "model": self.name,
            "prefix": state.prefix.decode("utf-8", errors="backslashreplace"),
            "prefix_bytes": len(state.prefix),
            "context_ids": list(self.context_ids),
            "prune": self.prune,
            "max_hypotheses": -1 if self.max_hypotheses is None else self.max_hypotheses,
            "window": -1 if self.window is None else self.window,
            "prefix_logprob": state.logp,
            "p_end_of_text": info["p_end_of_text"],
            "pruned_fraction": state.pruned_fraction,
            "pruned_logmass": state.pruned_logmass,
            "n_tokenizations": len(state.alive),
            "impossible_bytes": impossible,
            "note": "bytes in impossible_bytes have probability 0: no token sequence of this vocabulary can spell "
            "them after this prefix",
        }

    # ------------------------------------------------------------------ public API

    @holding_model_lock
    def next_byte_distribution(self, prefix) -> xr.DataArray:
        """Exact ``P(b | prefix)`` for all 256 bytes, a (byte,) DataArray summing to 1.

        ``prefix``: str (UTF-8) or bytes, any cut (empty: the first-byte distribution).
        ``P(b | x) = P(x b) / sum_b' P(x b')`` with ``P`` the cover sum of the module docstring.
        attrs: ``p_end_of_text`` (not part of the 256), ``impossible_bytes``, ``prefix_logprob``,
        pruning figures.
        """
        state = self._state_for(as_bytes(prefix))
        num, _ = self._next_byte(state)
        return byte_distribution(num / num.sum(), "next_byte_probability", self._attrs(state))

    @holding_model_lock
    def prefix_logprob(self, prefix) -> float:
        """``log P(x)`` (nats): the probability that the text starts with ``x``, ``log sum_{t in cover(x)} P(t)``.

        Summed over the covers of the tokenizations followed (all of them with ``prune=0`` and
        ``max_hypotheses=None``); :meth:`covers` lists them. Dims: prefix -> scalar.
        """
        return self._state_for(as_bytes(prefix)).logp

    @holding_model_lock
    def covers(self, prefix) -> list[tuple[tuple[int, ...], tuple[str, ...], float]]:
        """The cover encodings of ``prefix`` that are summed, most probable first.

        Each is ``(token_ids, token_strings, logprob)``: ids and strings exclude the start context;
        ``logprob = log P(tokens | context)`` under the byte-token-conditioned model. Their
        probabilities add up to ``exp(prefix_logprob(prefix))``. The empty prefix has one cover,
        the empty sequence.
        """
        state = self._state_for(as_bytes(prefix))
        if not state.prefix:
            return [((), (), 0.0)]
        out = []
        skip = len(self.context_ids)
        for h, lo, hi in state.parents:
            body = h.token_ids[skip:]
            for k in range(lo, hi):
                if h.q[k] <= 0:
                    continue
                t = int(self.vocab.sorted_ids[k])
                ids = body + (t,)
                out.append((ids, tuple(self.vocab.token_string(i) for i in ids), h.logp + math.log(h.q[k])))
        out.sort(key=lambda c: -c[2])
        return out

    def _walk(self, data: bytes):
        """Yield ``(pos, state before the byte, numerator, info, state after)`` along ``data``, from the root."""
        with self.handle.lock:
            state = self._root()
        for i, b in enumerate(data):
            with self.handle.lock:  # one step at a time; other threads may use the model between steps
                num, info = self._next_byte(state)
                after = self._advance(state, b)
            yield i, state, num, info, after
            state = after

    def iter_stream(self, text):
        """Yield the exact next-byte distribution (a (byte,) DataArray) at each cut point 0..len(text)-1, reusing state."""
        for _, state, num, _, _ in self._walk(as_bytes(text)):
            yield byte_distribution(num / num.sum(), "next_byte_probability", self._attrs(state))

    @holding_model_lock
    def stream(self, text, progress: bool | None = None, lookahead: bool = True) -> xr.Dataset:
        """Walk the cut point along ``text`` byte by byte: the exact next-byte distribution at every position.

        ``progress``: a progress bar (None: only for texts over 256 bytes). ``lookahead``: since the
        text is known, score tokenizations ahead of the walk, many cut points per model call
        (:meth:`_score`); the same numbers as ``lookahead=False`` (one call per step), in fewer calls.

        Reuses every tokenization and the KV cache from one byte to the next. Dims (pos, byte):
        ``probability[pos, b] = P(b | text[:pos])``; ``logprob[pos] = log P(text[pos] | text[:pos])``;
        ``prefix_logprob[pos] = log P(text[:pos + 1])`` from covers; ``pruned_fraction[pos]`` (posterior
        pruned at cut pos, what the 256 were renormalised over); ``p_end_of_text``, ``n_tokenizations``,
        ``calls`` (model calls made, cumulative, once the distribution at pos is known).
        Chain rule: ``logprob.sum() == prefix_logprob[-1] - log1p(-pruned_fraction).sum()``.
        """
        data = as_bytes(text)
        if not data:
            raise ValueError(
                "stream() needs a non-empty text; for the first-byte distribution use next_byte_distribution('')."
            )
        n = len(data)
        probs = np.zeros((n, 256))
        prefix_lp, pruned, p_end, n_tok = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n, dtype=np.int64)
        calls = np.zeros(n, dtype=np.int64)
        start_calls, start_positions = self.calls, self.positions
        walk = self._walk(data)
        if progress or (progress is None and n > 256):
            from tqdm.auto import tqdm

            walk = tqdm(walk, total=n, desc=f"exact next-byte ({self.name})", unit="B")
        with self._known_text(data if lookahead else None):
            for i, state, num, info, after in walk:
                probs[i] = num / num.sum()
                pruned[i] = state.pruned_fraction
                p_end[i] = info["p_end_of_text"]
                n_tok[i] = len(state.alive)
                calls[i] = state.calls - start_calls
                prefix_lp[i] = after.logp
        with np.errstate(divide="ignore"):
            logprob = np.log(probs[np.arange(n), np.frombuffer(data, dtype=np.uint8)])
        total_calls = self.calls - start_calls
        return xr.Dataset(
            {
                "probability": (("pos", "byte"), probs),
                "logprob": ("pos", logprob),
                "prefix_logprob": ("pos", prefix_lp),
                "pruned_fraction": ("pos", pruned),
                "p_end_of_text": ("pos", p_end),
                "n_tokenizations": ("pos", n_tok),
                "calls": ("pos", calls),
            },
            coords={
                "pos": np.arange(n),
                "byte": BYTES,
                "char": ("byte", BYTE_CHARS),
                "target": ("pos", np.frombuffer(data, dtype=np.uint8).astype(np.int64)),
                "target_char": ("pos", [BYTE_CHARS[b] for b in data]),
            },
            attrs={
                "method": "exact",
                "model": self.name,
                "text": data.decode("utf-8", errors="backslashreplace"),
                "n_bytes": n,
                "context_ids": list(self.context_ids),
                "prune": self.prune,
                "max_hypotheses": -1 if self.max_hypotheses is None else self.max_hypotheses,
                "window": -1 if self.window is None else self.window,
                "calls": total_calls,
                "calls_per_byte": total_calls / n,
                "positions_per_byte": (self.positions - start_positions) / n,
                "pruned_logmass": self._cursor.pruned_logmass,
            },
        )

    @holding_model_lock
    def sample(self, prefix=b"", n_bytes: int = 32, seed: int = 0, temperature: float = 1.0,
               draft: bool = True) -> bytes:
        """Draw ``n_bytes`` bytes after ``prefix`` from the exact next-byte distribution (seeded).

        ``x_{n+1} ~ P(. | x_1..x_n)``, byte by byte (:meth:`next_byte_distribution`). ``temperature``
        rescales the byte probabilities (``p^(1/T)``, renormalised). Each byte extends the state of
        the previous one. Returns the new bytes only (possibly ending mid-character).
        ``draft``: each model call also scores ahead along a guess of the bytes to come, drawn with
        the same uniforms from the distributions of the tokenizations already scored
        (:meth:`_draft`), so that while the draws follow it no call is needed; the same
        distributions and bytes as ``draft=False`` (one call per byte), in about one call per token.
        """

        def next_distribution(data: bytes) -> np.ndarray:
            num, _ = self._next_byte(self._state_for(data, remember=False))
            return num / num.sum()

        data = as_bytes(prefix)
        uniforms = sampling_uniforms(n_bytes, seed, temperature)  # those sample_bytes draws with
        self._state_for(data)  # remembered: sampling again from the same prefix starts here
        self._drafting, self._draft_text = (len(data), uniforms, temperature) if draft else None, b""
        try:
            return sample_bytes(next_distribution, data, n_bytes, seed, temperature)
        finally:
            self._drafting = None
            self._ahead.clear()
            self._cumulative.clear()

    @holding_model_lock
    def samples(self, prefix=b"", n_samples: int = 4, n_bytes: int = 32, seed: int = 0,
                temperature: float = 1.0) -> list[bytes]:
        """``n_samples`` independent draws of ``n_bytes`` bytes after ``prefix``, walked side by side.

        Draw ``i`` is the one :meth:`sample` gives with ``seed + i`` (the same exact next-byte
        distributions, seeded the same way). At each byte the new tokenizations of all the walks are
        scored in one model call, so ``n_samples`` draws cost little more than one on a CPU, where a
        call's cost is mostly reading the weights.
        """
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}.")
        uniforms = [sampling_uniforms(n_bytes, seed + i, temperature) for i in range(n_samples)]
        states = [self._state_for(as_bytes(prefix))] * n_samples
        out = [bytearray() for _ in range(n_samples)]
        for k in range(n_bytes):
            steps = []
            for state, u, drawn in zip(states, uniforms, out):
                num, _ = self._next_byte(state)
                drawn.append(draw_byte(num / num.sum(), u[k], temperature))
                steps.append((state, drawn[-1]))
            states = self._advance_all(steps)
        return [bytes(drawn) for drawn in out]

"""The bytes each token of a tokenizer's own vocabulary stands for, and a byte-prefix index over them.

Exact byte-level probabilities (``workbench.analyses.byte_level``; Phan et al., "Exact
Byte-Level Probabilities from Tokenized Language Models for FIM-Tasks and Model Ensembles")
need, for every token id ``t``, the byte string ``bytes(t)`` it adds to the text, and two
questions answered fast: which tokens have bytes starting with ``s``, and which tokens are a
prefix of ``s``.

Three vocabulary styles are understood, read from the tokenizer's own ``tokenizers`` JSON:

- ``byte_level`` (GPT-2 / SmolLM2 byte-level BPE): each character of a token string stands
  for one byte through the GPT-2 byte<->unicode table (``Ġ`` = 0x20, ``Ċ`` = 0x0A, ...).
- ``sentencepiece`` (Gemma, byte fallback): ``▁`` (U+2581) is a space, ``<0xNN>`` byte-fallback
  tokens are the single byte 0xNN, every other piece is its UTF-8.
- ``plain``: no normaliser, no decoder: a token's string is its UTF-8.

Special / control tokens (``<bos>``, ``<|endoftext|>``, ``<unused12>``, ...) stand for no
bytes: ``token_bytes[t] is None``; they are never part of a cover. A tokenizer that cannot be
read this way (a slow tokenizer, WordPiece, a normaliser that rewrites text such as NFKC or
lower-casing, a prepended space marker) raises :class:`UnsupportedTokenizerError` saying why.
Every accepted tokenizer is also checked by round trip: the bytes of ``encode(text)`` must
concatenate to ``text``'s UTF-8 on sample texts.

:func:`vocab_bytes` builds the index once per tokenizer and caches it in memory (keyed by the
tokenizer object, then by its class, name and a hash of its vocabulary).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
from dataclasses import dataclass, field

import numpy as np

SPACE_MARKER = "\u2581"  # SentencePiece's visible space
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_ROUND_TRIP_SAMPLES = (
    "Hello world. The cat sat on the mat.",
    "  two  spaces,\ttab\nnewline\n\nparagraph",
    "naïve café — Élan, ünïcode; 日本語のテキスト; emoji 🙂🚀",
    "def f(x):\n    return x ** 2  # comment\n",
)


class UnsupportedTokenizerError(ValueError):
    """The tokenizer's tokens cannot be read as byte strings; the message says why and what to do."""


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE.

    Printable Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) map to themselves; the
    other 68 bytes map, in order, to U+0100, U+0101, ... so that no token string holds a
    space or control character.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {ch: b for b, ch in gpt2_bytes_to_unicode().items()}


def printable_byte(b: int) -> str:
    """A readable label for one byte: the character for printable ASCII, an escape otherwise."""
    if 0x21 <= b <= 0x7E:
        return chr(b)
    return {0x20: "␠", 0x0A: "\\n", 0x09: "\\t", 0x0D: "\\r"}.get(b, f"0x{b:02X}")


@dataclass(eq=False)
class VocabBytes:
    """Token id -> bytes for one tokenizer, with a sorted-bytes index for prefix queries.

    ``token_bytes[t]``: the bytes token ``t`` adds to the text, ``None`` for special/control
    tokens. ``sorted_ids``: the byte-producing token ids sorted by their bytes, so the tokens
    whose bytes start with ``s`` are one contiguous run ``sorted_ids[lo:hi]``
    (:meth:`prefix_range`). ``rank[t]``: the position of ``t`` in that order (-1 for specials).
    ``byte_matrix[m, k]``: byte ``m`` of the ``k``-th sorted token (0 past its end);
    ``sorted_lengths[k]``: its length. ``first_byte_bounds[b]:first_byte_bounds[b+1]`` is the run of
    tokens starting with byte ``b``.
    """

    name: str
    scheme: str
    token_bytes: list
    special_ids: np.ndarray
    sorted_ids: np.ndarray
    sorted_bytes: list
    sorted_lengths: np.ndarray
    rank: np.ndarray
    byte_matrix: np.ndarray
    first_byte_bounds: np.ndarray
    by_bytes: dict = field(repr=False)
    max_token_bytes: int = 0

    @property
    def size(self) -> int:
        """Number of token ids covered (the tokenizer's length)."""
        return len(self.token_bytes)

    @property
    def n_byte_tokens(self) -> int:
        return len(self.sorted_ids)

    def producible_first_bytes(self) -> np.ndarray:
        """Bool (256,): bytes some token starts with (a text can only continue with these after a token boundary)."""
        return np.diff(self.first_byte_bounds) > 0

    def prefix_range(self, s: bytes, lo: int = 0, hi: int | None = None) -> tuple[int, int]:
        """``(lo, hi)`` such that ``sorted_ids[lo:hi]`` are exactly the tokens whose bytes start with ``s``.

        ``lo``/``hi`` may narrow the search to a run already known to hold them (the run of a
        prefix of ``s``).
        """
        hi = len(self.sorted_bytes) if hi is None else hi
        if not s:
            return lo, hi
        start = bisect.bisect_left(self.sorted_bytes, s, lo, hi)
        successor = _successor(s)
        end = hi if successor is None else bisect.bisect_left(self.sorted_bytes, successor, start, hi)
        return start, end

    def tokens_starting_with(self, s: bytes) -> np.ndarray:
        """Token ids whose bytes start with ``s`` (``s`` itself included)."""
        lo, hi = self.prefix_range(s)
        return self.sorted_ids[lo:hi]

    def tokens_equal_to(self, s: bytes) -> tuple[int, ...]:
        """Token ids whose bytes are exactly ``s`` (several when a vocabulary repeats a string, e.g. byte fallback)."""
        return self.by_bytes.get(bytes(s), ())

    def tokens_prefix_of(self, s: bytes) -> list[tuple[int, int]]:
        """``(token_id, length)`` of every token whose bytes are a prefix of ``s``, shortest first."""
        out = []
        for n in range(1, min(len(s), self.max_token_bytes) + 1):
            out.extend((t, n) for t in self.by_bytes.get(bytes(s[:n]), ()))
        return out

    def decode(self, ids) -> bytes:
        """The bytes of a token sequence (special tokens add nothing)."""
        return b"".join(self.token_bytes[int(t)] or b"" for t in ids)

    def token_string(self, t: int) -> str:
        """A readable form of one token's bytes (invalid UTF-8 shown with escapes)."""
        b = self.token_bytes[int(t)]
        if b is None:
            return f"<special {int(t)}>"
        return b.decode("utf-8", errors="backslashreplace")


def _successor(s: bytes) -> bytes | None:
    """The smallest byte string greater than every string that starts with ``s`` (None: no such bound)."""
    stripped = s.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


# --------------------------------------------------------------------------- reading a tokenizer


def _backend(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "get_added_tokens_decoder"):
        raise UnsupportedTokenizerError(
            f"{type(tokenizer).__name__} is not backed by the `tokenizers` library, so its vocabulary cannot be "
            "read as bytes. Load it with AutoTokenizer.from_pretrained(..., use_fast=True)."
        )
    return backend


def _component(component) -> dict | None:
    """A `tokenizers` component's settings as a dict (its JSON state), without the vocabulary."""
    return None if component is None else json.loads(component.__getstate__())


def _pipeline(backend) -> dict:
    """The parts of the tokenizer's pipeline that decide how tokens map to text (not its vocabulary)."""
    model = backend.model
    return {
        "model": {"type": type(model).__name__, "byte_fallback": bool(getattr(model, "byte_fallback", False))},
        "normalizer": _component(backend.normalizer),
        "pre_tokenizer": _component(backend.pre_tokenizer),
        "decoder": _component(backend.decoder),
    }


def _flatten(component) -> list[dict]:
    if component is None:
        return []
    for key in ("normalizers", "decoders", "pretokenizers"):
        if key in component:
            return [c for sub in component[key] for c in _flatten(sub)]
    return [component]


def _is_space_marker_replace(step: dict, forward: bool) -> bool:
    pattern = (step.get("pattern") or {}).get("String")
    src, dst = (" ", SPACE_MARKER) if forward else (SPACE_MARKER, " ")
    return step.get("type") == "Replace" and pattern == src and step.get("content") == dst


def _detect_scheme(spec: dict, name: str) -> str:
    model = spec.get("model") or {}
    mtype = model.get("type")
    if mtype == "WordPiece":
        raise UnsupportedTokenizerError(
            f"{name}: WordPiece tokenizers drop spaces and mark word pieces with '##', so a token sequence does "
            "not spell the text's bytes. Exact byte-level probabilities need a BPE or Unigram tokenizer."
        )
    for step in _flatten(spec.get("normalizer")):
        if not _is_space_marker_replace(step, forward=True):
            raise UnsupportedTokenizerError(
                f"{name}: its normaliser {step.get('type')!r} changes the text before tokenizing, so tokens do not "
                "spell the original bytes. Only a normaliser that replaces ' ' by the U+2581 space marker is "
                "supported."
            )
    pre = _flatten(spec.get("pre_tokenizer"))
    for step in pre:
        if step.get("type") == "Metaspace" and step.get("prepend_scheme", "always") != "never":
            raise UnsupportedTokenizerError(
                f"{name}: its Metaspace pre-tokenizer prepends a space marker to the text "
                f"(prepend_scheme={step.get('prepend_scheme', 'always')!r}), so the first token spells a space the "
                "text does not have. Use a tokenizer with prepend_scheme='never'."
            )
        if step.get("type") == "ByteLevel" and step.get("add_prefix_space"):
            raise UnsupportedTokenizerError(
                f"{name}: its ByteLevel pre-tokenizer adds a prefix space, so the first token spells a space the "
                "text does not have. Load it with add_prefix_space=False."
            )
    decoders = _flatten(spec.get("decoder"))
    types = {d.get("type") for d in decoders}
    if "ByteLevel" in types or any(s.get("type") == "ByteLevel" for s in pre):
        return "byte_level"
    if "WordPiece" in types or "BPEDecoder" in types or "CTC" in types:
        raise UnsupportedTokenizerError(
            f"{name}: its decoder ({', '.join(sorted(t for t in types if t))}) inserts or removes characters between "
            "tokens, so token strings are not the text's bytes."
        )
    if "Metaspace" in types or any(_is_space_marker_replace(d, forward=False) for d in decoders) or model.get(
        "byte_fallback"
    ):
        return "sentencepiece"
    unknown = types - {"Fuse", "ByteFallback", "Strip", None}
    if unknown:
        raise UnsupportedTokenizerError(
            f"{name}: its decoder ({', '.join(sorted(unknown))}) is not one the byte mapping understands "
            "(byte-level BPE, SentencePiece with U+2581 and <0xNN> byte fallback, or no decoder)."
        )
    return "plain"


def _token_to_bytes(piece: str, scheme: str, byte_fallback: bool, name: str, token_id: int) -> bytes:
    if scheme == "byte_level":
        try:
            return bytes(_UNICODE_TO_BYTE[ch] for ch in piece)
        except KeyError as err:
            raise UnsupportedTokenizerError(
                f"{name}: token {token_id} ({piece!r}) holds the character {err.args[0]!r}, which is not in the "
                "GPT-2 byte<->unicode table, so it cannot be mapped to bytes."
            ) from None
    if scheme == "sentencepiece":
        if byte_fallback and (m := _BYTE_FALLBACK.match(piece)):
            return bytes([int(m.group(1), 16)])
        return piece.replace(SPACE_MARKER, " ").encode("utf-8")
    return piece.encode("utf-8")


def _build(tokenizer) -> VocabBytes:
    name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    backend = _backend(tokenizer)
    spec = _pipeline(backend)
    scheme = _detect_scheme(spec, name)
    byte_fallback = spec["model"]["byte_fallback"]
    size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    special, plain_added = set(), {}
    for idx, added in backend.get_added_tokens_decoder().items():
        if added.special:
            special.add(int(idx))
        else:
            plain_added[int(idx)] = added.content
    special.update(int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []))

    token_bytes: list = []
    for t, piece in enumerate(pieces):
        if t in special or piece is None:
            token_bytes.append(None)
        elif t in plain_added:  # added tokens match the raw text: their content is their bytes
            token_bytes.append(plain_added[t].encode("utf-8") or None)
        else:
            token_bytes.append(_token_to_bytes(piece, scheme, byte_fallback, name, t) or None)

    ids = [t for t, b in enumerate(token_bytes) if b is not None]
    if not ids:
        raise UnsupportedTokenizerError(f"{name}: no token of its vocabulary stands for any bytes.")
    ids.sort(key=lambda t: token_bytes[t])
    sorted_bytes = [token_bytes[t] for t in ids]
    lengths = np.fromiter((len(b) for b in sorted_bytes), dtype=np.int64, count=len(ids))
    width = int(lengths.max())
    padded = b"".join(b.ljust(width, b"\x00") for b in sorted_bytes)
    matrix = np.ascontiguousarray(np.frombuffer(padded, dtype=np.uint8).reshape(len(ids), width).T)
    rank = np.full(size, -1, dtype=np.int64)
    rank[np.asarray(ids)] = np.arange(len(ids))
    first = matrix[0]
    bounds = np.searchsorted(first, np.arange(257), side="left")
    by_bytes: dict[bytes, tuple[int, ...]] = {}
    for t in ids:
        by_bytes[token_bytes[t]] = by_bytes.get(token_bytes[t], ()) + (t,)
    vocab = VocabBytes(
        name=name,
        scheme=scheme,
        token_bytes=token_bytes,
        special_ids=np.asarray(sorted(t for t, b in enumerate(token_bytes) if b is None), dtype=np.int64),
        sorted_ids=np.asarray(ids, dtype=np.int64),
        sorted_bytes=sorted_bytes,
        sorted_lengths=lengths,
        rank=rank,
        byte_matrix=matrix,
        first_byte_bounds=bounds,
        by_bytes=by_bytes,
        max_token_bytes=width,
    )
    _check_round_trip(tokenizer, vocab)
    return vocab


def _check_round_trip(tokenizer, vocab: VocabBytes) -> None:
    """Encode sample texts and check the token bytes spell them; texts with bytes no token holds are skipped."""
    samples = list(_ROUND_TRIP_SAMPLES)
    # Texts made of the vocabulary's own tokens check small or unusual vocabularies too.
    step = max(1, vocab.n_byte_tokens // 7)
    joined = b"".join(vocab.sorted_bytes[k] for k in range(0, vocab.n_byte_tokens, step))
    samples.append(joined.decode("utf-8", errors="ignore"))
    unk = getattr(tokenizer, "unk_token_id", None)
    known = set().union(*(set(b) for b in vocab.sorted_bytes))
    checked = 0
    for text in samples:
        if not text or not set(text.encode("utf-8")) <= known:
            continue  # a small vocabulary cannot spell every sample
        try:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        except Exception:  # noqa: BLE001 - a vocabulary without these characters may refuse them
            continue
        if unk is not None and unk in ids:
            continue
        got = vocab.decode(ids)
        if got != text.encode("utf-8"):
            raise UnsupportedTokenizerError(
                f"{vocab.name}: the bytes of its tokens do not spell the text they encode "
                f"({text[:40]!r} -> {got[:60]!r}); the tokenizer changes text (normalisation, prefix space, "
                "dropped characters), so exact byte-level probabilities are not defined for it."
            )
        checked += 1
    if checked == 0:
        raise UnsupportedTokenizerError(
            f"{vocab.name}: none of the sample texts could be encoded without unknown tokens, so the byte mapping "
            "could not be checked."
        )


# --------------------------------------------------------------------------- cache

_BY_OBJECT: dict[int, tuple[object, VocabBytes]] = {}
_BY_CONTENT: dict[tuple, VocabBytes] = {}


def _content_key(tokenizer) -> tuple:
    """Class, name, length and a hash of the token strings, added tokens and pipeline settings."""
    backend = _backend(tokenizer)
    digest = hashlib.sha1()
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    digest.update("\x00".join(p or "" for p in pieces).encode("utf-8", errors="surrogatepass"))
    added = sorted((int(i), a.content, bool(a.special)) for i, a in backend.get_added_tokens_decoder().items())
    digest.update(repr(added).encode("utf-8", errors="surrogatepass"))
    digest.update(json.dumps(_pipeline(backend), sort_keys=True).encode())
    return (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer), digest.hexdigest())


def vocab_bytes(tokenizer) -> VocabBytes:
    """The :class:`VocabBytes` of ``tokenizer``, built once and cached in memory.

    Raises :class:`UnsupportedTokenizerError` when the tokenizer's tokens cannot be read as bytes.
    """
    hit = _BY_OBJECT.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    key = _content_key(tokenizer)
    vocab = _BY_CONTENT.get(key)
    if vocab is None:
        vocab = _build(tokenizer)
        _BY_CONTENT[key] = vocab
    _BY_OBJECT[id(tokenizer)] = (tokenizer, vocab)  # holds the tokenizer, so its id is never reused
    return vocab

"""Next-token log-probabilities for a growing tree of token sequences, reusing the KV cache.

Exact byte-level probabilities (``workbench.analyses.byte_level``) follow many token
sequences at once: every tokenization of the text read so far that still has non-negligible
probability. They share a long common prefix (the context and the text tokenized so far) and
differ in their last few tokens. :class:`PrefixTreeScorer` keeps

- one *trunk* KV cache for the longest prefix shared by every sequence still followed, and
- for each scored sequence, the keys and values of its own tokens after the trunk,

so scoring a batch of one-token extensions ``(sequence, token)`` is **one** forward pass of one
token per row. :attr:`PrefixTreeScorer.calls` counts forward passes and
:attr:`PrefixTreeScorer.positions` the token positions they ran.

Two ways to run that pass:

- *shared-trunk attention* (Llama and Gemma 3): a custom attention function, registered with
  transformers' ``AttentionInterface`` and switched on only for the duration of the call, scores
  every row's query against the one trunk cache with a single matmul per layer (no per-row copy
  of the trunk), plus each row's own keys and the new token; sliding-window layers mask keys
  ``window`` or more positions back, as Hugging Face's mask does. The model runs without a
  cache; rotary positions are passed explicitly.
- *padded cache* (any other architecture): each row's cache is the trunk plus its own keys, left-padded
  to a common length in a transformers 5 ``DynamicCache`` (pads masked; real keys contiguous, so
  the causal and sliding-window masks Hugging Face builds from cache indices see true
  distances). This copies the trunk once per row.

Both give the model's own next-token log-probabilities (tested against plain forward passes,
also past Gemma 3's 512-token sliding window).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from ..models import ModelHandle
from ..numerics import log_softmax


class StaleSequenceError(RuntimeError):
    """A scored sequence was extended after the scorer moved its trunk past it (it was not kept)."""


@dataclass(eq=False)
class ScoredSequence:
    """A token sequence with its next-token log-probabilities ``(vocab,)`` (log-softmax, float32 or finer).

    ``ids``: the whole sequence, context included. Its keys/values after the scorer's trunk are
    held privately (``_keys[layer]``: (kv_heads, n, head_dim)) so that extensions need one token.
    """

    ids: tuple[int, ...]
    logprobs: np.ndarray
    _keys: list = field(repr=False, default_factory=list)
    _values: list = field(repr=False, default_factory=list)
    _base: int = field(repr=False, default=0)  # trunk length its private keys start at
    _session: int = field(repr=False, default=0)


class PrefixTreeScorer:
    """Score one-token extensions of many sequences that share a prefix, in one batched forward pass.

    >>> scorer = PrefixTreeScorer(handle)
    >>> root = scorer.start([bos])                  # one forward pass over the context
    >>> kids = scorer.extend([(root, 42), (root, 7)])   # one forward pass, two rows
    >>> scorer.commit(kids)                         # their common prefix becomes the shared trunk

    A sequence can be extended as long as it starts with the trunk (see :meth:`commit`).
    """

    def __init__(self, handle: ModelHandle, shared_trunk_attention: bool | None = None):
        """``shared_trunk_attention``: None picks it for the architectures it supports (Llama, Gemma 3)."""
        self.handle = handle
        supported = handle.architecture in _TREE_ATTENTION_ARCHITECTURES
        if shared_trunk_attention and not supported:
            raise ValueError(
                f"shared-trunk attention supports {', '.join(_TREE_ATTENTION_ARCHITECTURES)}, not "
                f"{handle.architecture!r}; use shared_trunk_attention=None to fall back to the padded cache."
            )
        self.shared_trunk_attention = supported if shared_trunk_attention is None else bool(shared_trunk_attention)
        self.calls = 0
        self.positions = 0
        self._session = 0  # bumped by start(): sequences of an earlier session are gone
        self._trunk_ids: tuple[int, ...] = ()
        self._trunk_k: list[torch.Tensor] = []  # per layer (kv_heads, capacity, head_dim)
        self._trunk_v: list[torch.Tensor] = []

    # ------------------------------------------------------------------ public

    @property
    def trunk_length(self) -> int:
        """Number of tokens in the shared trunk cache."""
        return len(self._trunk_ids)

    def start(self, context_ids) -> ScoredSequence:
        """Forget every sequence and score ``context_ids`` from scratch (one forward pass)."""
        ids = tuple(int(t) for t in context_ids)
        if not ids:
            raise ValueError("context_ids is empty: the model needs at least one token to condition on (e.g. BOS).")
        self._session += 1
        self._trunk_ids, self._trunk_k, self._trunk_v = (), [], []
        input_ids = torch.tensor([ids], device=self.handle.device)
        from transformers import DynamicCache

        cache = DynamicCache()
        with torch.no_grad():
            out = self.handle.hf_model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        self.calls += 1
        self.positions += len(ids)
        logprobs = log_softmax(out.logits[0, -1]).cpu().numpy()
        keys = [layer.keys[0] for layer in cache.layers]
        values = [layer.values[0] for layer in cache.layers]
        return ScoredSequence(ids, logprobs, keys, values, _base=0, _session=self._session)

    def extend(self, requests) -> list[ScoredSequence]:
        """Score ``sequence + (token,)`` for each ``(sequence, token)`` in one forward pass; returns them in order."""
        requests = [(seq, int(tok)) for seq, tok in requests]
        if not requests:
            return []
        for seq, _ in requests:
            self._check_usable(seq)
        if self.shared_trunk_attention and self.trunk_length:
            return self._extend_shared(requests)
        trunk = self.trunk_length
        own = [len(seq.ids) - trunk for seq, _ in requests]
        width = max(own)
        b = len(requests)
        device = self.handle.device
        cache_data = []
        for layer in range(self._n_cache_layers(requests)):
            ref = requests[0][0]._keys[layer] if own[0] else self._trunk_k[layer]
            kv_heads, head_dim, dtype = ref.shape[0], ref.shape[-1], ref.dtype
            keys = torch.zeros(b, kv_heads, width + trunk, head_dim, dtype=dtype, device=device)
            values = torch.zeros_like(keys)
            for i, (seq, _) in enumerate(requests):
                start = width - own[i]
                if trunk:
                    keys[i, :, start : start + trunk] = self._trunk_k[layer][:, :trunk]
                    values[i, :, start : start + trunk] = self._trunk_v[layer][:, :trunk]
                if own[i]:
                    skip = trunk - seq._base  # the trunk may have grown over the start of its private keys
                    keys[i, :, start + trunk :] = seq._keys[layer][:, skip:]
                    values[i, :, start + trunk :] = seq._values[layer][:, skip:]
            cache_data.append((keys, values))
        mask = torch.zeros(b, width + trunk + 1, dtype=torch.long, device=device)
        for i in range(b):
            mask[i, width - own[i] :] = 1
        positions = torch.tensor([[trunk + own[i]] for i in range(b)], device=device)
        tokens = torch.tensor([[tok] for _, tok in requests], device=device)
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=cache_data)
        with torch.no_grad():
            out = self.handle.hf_model(
                input_ids=tokens, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
            )
        self.calls += 1
        self.positions += b
        logprobs = log_softmax(out.logits[:, -1]).cpu().numpy()
        results = []
        for i, (seq, tok) in enumerate(requests):
            skip = trunk - seq._base
            keys = [torch.cat([s[:, skip:], layer.keys[i, :, -1:]], dim=1) if own[i] else layer.keys[i, :, -1:].clone()
                    for s, layer in zip(seq._keys or [None] * len(cache.layers), cache.layers)]
            values = [
                torch.cat([s[:, skip:], layer.values[i, :, -1:]], dim=1) if own[i] else layer.values[i, :, -1:].clone()
                for s, layer in zip(seq._values or [None] * len(cache.layers), cache.layers)
            ]
            results.append(ScoredSequence(seq.ids + (tok,), logprobs[i], keys, values, trunk, self._session))
        return results

    def _extend_shared(self, requests) -> list[ScoredSequence]:
        """One forward pass with shared-trunk attention (see the module docstring)."""
        trunk = self.trunk_length
        own = [len(seq.ids) - trunk for seq, _ in requests]
        width, b = max(own), len(requests)
        device = self.handle.device
        private_k, private_v = [], []
        for layer in range(len(self._trunk_k)):
            if width:
                kv_heads, _, head_dim = self._trunk_k[layer].shape
                keys = torch.zeros(b, kv_heads, width, head_dim, dtype=self._trunk_k[layer].dtype, device=device)
                values = torch.zeros_like(keys)
                for i, (seq, _) in enumerate(requests):
                    if own[i]:
                        skip = trunk - seq._base
                        keys[i, :, width - own[i] :] = seq._keys[layer][:, skip:]
                        values[i, :, width - own[i] :] = seq._values[layer][:, skip:]
                private_k.append(keys)
                private_v.append(values)
            else:
                private_k.append(None)
                private_v.append(None)
        positions = torch.tensor([trunk + o for o in own], device=device)
        valid = torch.arange(width, device=device)[None, :] >= (width - torch.tensor(own, device=device))[:, None]
        batch = _TreeBatch(
            trunk_k=[k[:, :trunk] for k in self._trunk_k],
            trunk_v=[v[:, :trunk] for v in self._trunk_v],
            private_k=private_k,
            private_v=private_v,
            private_valid=valid,
            private_positions=positions[:, None] - width + torch.arange(width, device=device)[None, :],
            positions=positions,
            new_k={},
            new_v={},
        )
        tokens = torch.tensor([[tok] for _, tok in requests], device=device)
        with _shared_trunk_attention(self.handle, batch), torch.no_grad():
            out = self.handle.hf_model(input_ids=tokens, position_ids=positions[:, None], use_cache=False)
        self.calls += 1
        self.positions += b
        logprobs = log_softmax(out.logits[:, -1]).cpu().numpy()
        results = []
        for i, (seq, tok) in enumerate(requests):
            skip = trunk - seq._base
            keys, values = [], []
            for layer in range(len(self._trunk_k)):
                new_k, new_v = batch.new_k[layer][i, :, -1:], batch.new_v[layer][i, :, -1:]
                if own[i]:
                    keys.append(torch.cat([seq._keys[layer][:, skip:], new_k], dim=1))
                    values.append(torch.cat([seq._values[layer][:, skip:], new_v], dim=1))
                else:
                    keys.append(new_k.clone())
                    values.append(new_v.clone())
            results.append(ScoredSequence(seq.ids + (tok,), logprobs[i], keys, values, trunk, self._session))
        return results

    def commit(self, keep) -> None:
        """Move the longest common prefix of ``keep`` into the shared trunk.

        Afterwards a sequence can be extended only if it starts with the trunk, so pass every
        sequence you may extend again. Its own keys are never rewritten, only read from a later offset.
        """
        keep = list(keep)
        if not keep:
            return
        for seq in keep:
            self._check_usable(seq)
        common = _common_prefix_length([seq.ids for seq in keep])
        grow = common - self.trunk_length
        if grow <= 0:
            return
        donor = keep[0]
        skip = self.trunk_length - donor._base
        self._append_trunk([k[:, skip : skip + grow] for k in donor._keys],
                           [v[:, skip : skip + grow] for v in donor._values])
        self._trunk_ids = donor.ids[:common]

    def usable(self, seq: ScoredSequence) -> bool:
        """Whether ``seq`` can still be extended: same session, and it starts with the trunk."""
        return seq._session == self._session and seq.ids[: self.trunk_length] == self._trunk_ids

    # ------------------------------------------------------------------ internals

    def _check_usable(self, seq: ScoredSequence) -> None:
        if not self.usable(seq):
            raise StaleSequenceError(
                f"the sequence of {len(seq.ids)} tokens no longer starts with the shared trunk of "
                f"{self.trunk_length} tokens (or belongs to an earlier start()), so its cache is gone; pass every "
                "sequence you will extend again to commit()."
            )

    def _n_cache_layers(self, requests) -> int:
        for seq, _ in requests:
            if seq._keys:
                return len(seq._keys)
        return len(self._trunk_k)

    def _append_trunk(self, keys, values) -> None:
        n_old = self.trunk_length
        n_new = n_old + keys[0].shape[1]
        if not self._trunk_k or self._trunk_k[0].shape[1] < n_new:
            capacity = max(64, 2 * n_new)
            grown_k, grown_v = [], []
            for layer, k in enumerate(keys):
                buf_k = torch.empty(k.shape[0], capacity, k.shape[2], dtype=k.dtype, device=k.device)
                buf_v = torch.empty_like(buf_k)
                if n_old:
                    buf_k[:, :n_old] = self._trunk_k[layer][:, :n_old]
                    buf_v[:, :n_old] = self._trunk_v[layer][:, :n_old]
                grown_k.append(buf_k)
                grown_v.append(buf_v)
            self._trunk_k, self._trunk_v = grown_k, grown_v
        for layer, (k, v) in enumerate(zip(keys, values)):
            self._trunk_k[layer][:, n_old:n_new] = k
            self._trunk_v[layer][:, n_old:n_new] = v


# --------------------------------------------------------------------------- shared-trunk attention

_TREE_ATTENTION = "workbench_prefix_tree"
_TREE_ATTENTION_ARCHITECTURES = ("llama", "gemma3_text")
_ACTIVE = threading.local()


@dataclass
class _TreeBatch:
    """What the attention function needs for one call: the trunk, each row's own keys, positions."""

    trunk_k: list  # per layer (kv_heads, T, head_dim)
    trunk_v: list
    private_k: list  # per layer (b, kv_heads, M, head_dim) left-padded, or None when M == 0
    private_v: list
    private_valid: torch.Tensor  # (b, M) bool: which private slots hold a real key
    private_positions: torch.Tensor  # (b, M) positions of the private keys
    positions: torch.Tensor  # (b,) position of each row's new token
    new_k: dict  # filled per layer: (b, kv_heads, 1, head_dim), rotated as a cache would store it
    new_v: dict


def _prefix_tree_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                           sliding_window=None, softcap=None, **kwargs):
    """Attention of one new token per row over [shared trunk | the row's own keys | itself].

    Same arithmetic as transformers' eager attention (scores in the query's precision, softmax
    in float32), without materialising the trunk per row. Dims: query (b, heads, 1, d),
    key/value (b, kv_heads, 1, d) -> (b, 1, heads, d).
    """
    batch: _TreeBatch = _ACTIVE.batch
    layer = module.layer_idx
    batch.new_k[layer], batch.new_v[layer] = key, value
    b, heads, q_len, d = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scaling = d**-0.5 if scaling is None else scaling
    q = query.reshape(b, kv_heads, groups, d)
    trunk_k, trunk_v = batch.trunk_k[layer], batch.trunk_v[layer]
    n_trunk = trunk_k.shape[1]
    # (kv, b * groups, d) @ (kv, d, T): every row against the one trunk
    q_by_head = q.permute(1, 0, 2, 3).reshape(kv_heads, b * groups, d)
    s_trunk = torch.matmul(q_by_head, trunk_k.transpose(1, 2)).reshape(kv_heads, b, groups, n_trunk)
    s_trunk = s_trunk.permute(1, 0, 2, 3)
    parts = [s_trunk]
    private_k = batch.private_k[layer]
    if private_k is not None:
        parts.append(torch.einsum("bkgd,bkmd->bkgm", q, private_k))
    parts.append((q * key.reshape(b, kv_heads, 1, d)).sum(-1, keepdim=True))
    scores = torch.cat(parts, dim=-1) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    visible = torch.ones(b, scores.shape[-1], dtype=torch.bool, device=scores.device)
    if private_k is not None:
        visible[:, n_trunk : n_trunk + private_k.shape[2]] = batch.private_valid
    if sliding_window is not None:
        key_positions = torch.cat(
            [torch.arange(n_trunk, device=scores.device)[None, :].expand(b, -1), batch.private_positions,
             batch.positions[:, None]], dim=1)
        visible &= (batch.positions[:, None] - key_positions) < sliding_window
    scores = scores.masked_fill(~visible[:, None, None, :], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)  # as eager attention does
    p_trunk = probs[..., :n_trunk].permute(1, 0, 2, 3).reshape(kv_heads, b * groups, n_trunk)
    out = torch.matmul(p_trunk, trunk_v).reshape(kv_heads, b, groups, d).permute(1, 0, 2, 3)
    if private_k is not None:
        m = private_k.shape[2]
        out = out + torch.einsum("bkgm,bkmd->bkgd", probs[..., n_trunk : n_trunk + m], batch.private_v[layer])
    out = out + probs[..., -1:] * value.reshape(b, kv_heads, 1, d)
    return out.reshape(b, heads, 1, d).transpose(1, 2).contiguous(), None


@contextmanager
def _shared_trunk_attention(handle: ModelHandle, batch: _TreeBatch):
    """Run the model with :func:`_prefix_tree_attention` for one call; the previous implementation comes back after."""
    from transformers import AttentionInterface

    if _TREE_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(_TREE_ATTENTION, _prefix_tree_attention)
    configs = {id(m.config): m.config for m in handle.hf_model.modules() if hasattr(m, "config")}
    before = {key: cfg._attn_implementation for key, cfg in configs.items()}
    _ACTIVE.batch = batch
    try:
        for cfg in configs.values():
            cfg._attn_implementation = _TREE_ATTENTION
        yield
    finally:
        for key, cfg in configs.items():
            cfg._attn_implementation = before[key]
        _ACTIVE.batch = None


def _common_prefix_length(sequences) -> int:
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in sequences):
            return i
    return n


def last_token_logprobs(handle: ModelHandle, ids) -> np.ndarray:
    """Log-probabilities ``(vocab,)`` of the token after ``ids`` (one plain forward pass, no cache kept)."""
    ids = [int(t) for t in ids]
    if not ids:
        raise ValueError("ids is empty: the model needs at least one token to condition on (e.g. BOS).")
    with torch.no_grad():
        out = handle.hf_model(input_ids=torch.tensor([ids], device=handle.device), use_cache=False, logits_to_keep=1)
    return log_softmax(out.logits[0, -1]).cpu().numpy()


def sequence_logprobs(handle: ModelHandle, ids) -> np.ndarray:
    """Log-probability of each token of ``ids`` after the ones before it, ``(len(ids) - 1,)`` (one forward pass)."""
    ids = [int(t) for t in ids]
    if len(ids) < 2:
        raise ValueError("sequence_logprobs needs at least two tokens (a context token and one to score).")
    x = torch.tensor([ids], device=handle.device)
    with torch.no_grad():
        out = handle.hf_model(input_ids=x, use_cache=False)
    logprobs = log_softmax(out.logits[0, :-1])
    return logprobs.gather(-1, x[0, 1:, None])[:, 0].cpu().numpy()


def successive_last_token_logprobs(handle: ModelHandle, sequences):
    """Log-probabilities ``(vocab,)`` of the token after each of ``sequences`` in turn, reusing the KV cache.

    For each sequence, the cached keys and values of the longest prefix it shares with the one
    before are kept and only its new tokens run (one forward pass each): the cheapest exact way
    to ask the naive question at every cut of a text, whose encodings differ only near the end.
    Where the cache cannot be cut back (sliding-window layers past their window), the sequence is
    run from scratch. Yields ``(logprobs, tokens_run)``.
    """
    from transformers import DynamicCache

    cache, cached = DynamicCache(), []
    for seq in sequences:
        ids = [int(t) for t in seq]
        if not ids:
            raise ValueError("a sequence is empty: the model needs at least one token to condition on (e.g. BOS).")
        keep = min(_common_prefix_length([ids, cached]) if cached else 0, len(ids) - 1)
        if keep < len(cached):
            try:
                cache.crop(keep - len(cached))  # a negative count: tokens to remove
            except (RuntimeError, ValueError):
                cache, keep = DynamicCache(), 0
        new = torch.tensor([ids[keep:]], device=handle.device)
        with torch.no_grad():
            out = handle.hf_model(input_ids=new, past_key_values=cache, use_cache=True, logits_to_keep=1,
                                  position_ids=torch.arange(keep, len(ids), device=handle.device)[None])
        cached = ids
        yield log_softmax(out.logits[0, -1]).cpu().numpy(), len(ids) - keep


def text_logprobs(handle: ModelHandle, sequences, *, first=None, max_batch_tokens: int = 4096,
                  vocab_chunk: int = 512) -> list[np.ndarray]:
    """Log-probability of every token of each sequence after the ones before it: ``[(len(s) - 1,), ...]``,
    or with ``first`` (one index per sequence) of its tokens from ``first[i]`` on: ``(len(s) - first[i],)``.

    Many sequences in few forward passes: sorted by length, right-padded into batches of at most
    ``max_batch_tokens`` positions, the base model run through :func:`workbench.probes.hooks.forward`
    reading the final-norm output, then unembedded ``vocab_chunk`` positions at a time so a
    262k-token vocabulary never needs a (batch, positions, vocab) tensor. Hand-written because no
    library scores a padded batch this way (transformers' loss averages over the batch). Tested
    against one plain forward pass per sequence.
    """
    from . import hooks
    from .sites import FINAL_NORM

    seqs = [[int(t) for t in s] for s in sequences]
    first = [1] * len(seqs) if first is None else [int(f) for f in first]
    if len(first) != len(seqs):
        raise ValueError(f"first has {len(first)} entries for {len(seqs)} sequences; give one index per sequence.")
    for i, s in enumerate(seqs):
        if len(s) < 2:
            raise ValueError(f"sequence {i} has {len(s)} token(s); scoring needs a context token and one to score.")
        if not 1 <= first[i] < len(s):
            raise ValueError(f"first[{i}] = {first[i]} is outside 1..{len(s) - 1} (sequence {i} has {len(s)} tokens).")
    out: list = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    sm = hooks.site_map(handle)
    start = 0
    while start < len(order):
        width = len(seqs[order[start]])
        stop = start + max(1, max_batch_tokens // width)
        batch = order[start:stop]
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
            mask[row, : len(seqs[i])] = 1
        states = {}
        hooks.forward(handle, ids, mask, reads=[(FINAL_NORM, None)], logits=False,
                      on_site=lambda site, layer, x: states.__setitem__("h", x))
        with torch.no_grad():
            for row, i in enumerate(batch):
                n, f = len(seqs[i]), first[i]
                target = ids[row, f:n].to(handle.device)
                scores = []
                for a in range(0, n - f, vocab_chunk):
                    logits = sm.unembed(states["h"][row, f - 1 + a : min(n - 1, f - 1 + a + vocab_chunk)], normalized=True)
                    lp = log_softmax(logits)
                    scores.append(lp.gather(-1, target[a : a + vocab_chunk, None])[:, 0])
                out[i] = torch.cat(scores).cpu().numpy()
        start = stop
    return out

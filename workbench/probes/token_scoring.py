"""Next-token log-probabilities for a growing tree of token sequences, reusing the KV cache.

Exact byte-level probabilities (``workbench.analyses.byte_level``) follow many token
sequences at once: every tokenization of the text read so far that still has non-negligible
probability. They share a long common prefix (the context and the text tokenized so far) and
differ in their last few tokens. :class:`PrefixTreeScorer` keeps

- one *trunk* KV cache for the longest prefix shared by every sequence still followed, and
- a *slot pool*: the keys and values of every other scored token, one slot each; a sequence
  knows the slots of its tokens after the trunk, so sequences that share a parent share its
  slots, and :meth:`PrefixTreeScorer.commit` frees the slots no kept sequence uses,

so scoring a batch of one-token extensions ``(sequence, token)`` is **one** forward pass of one
token per row. A row may also extend another row of the same batch (a chain of new tokens, for a
text known ahead): it then also attends to its ancestors among the rows.
:attr:`PrefixTreeScorer.calls` counts forward passes and :attr:`PrefixTreeScorer.positions` the
token positions they ran.

Two ways to run that pass:

- *shared-trunk attention* (Llama and Gemma 3): a custom attention function, registered with
  transformers' ``AttentionInterface`` and switched on only for the duration of the call, scores
  every row's query against the one trunk cache with a single matmul per layer (no per-row copy
  of the trunk), and likewise against the union of the pool slots the rows see, masked so that
  each row sees its own tokens, plus the new token itself; sliding-window layers mask keys
  ``window`` or more positions back, as Hugging Face's mask does. The model runs without a
  cache; rotary positions are passed explicitly.
- *padded cache* (any other architecture): each row's cache is the trunk plus its own keys, left-padded
  to a common length in a transformers 5 ``DynamicCache`` (pads masked; real keys contiguous, so
  the causal and sliding-window masks Hugging Face builds from cache indices see true
  distances). This copies the trunk once per row (one indexing operation per layer).

Both give the model's own next-token log-probabilities (tested against plain forward passes,
also past Gemma 3's 512-token sliding window). On the CPU in float32 the linear layers run on
weights packed once for small batches (:mod:`.packed_linear`: 1.5x faster at 13-32 rows, float32
rounding apart), in the scorer and in the one-sequence helpers below (:func:`last_token_logprobs`,
:func:`sequence_logprobs`, :func:`successive_last_token_logprobs`), so the byte-level methods that
compare with one another (exact, naive, token healing) run the same arithmetic.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from ..models import ModelHandle
from ..models.loading import holding_model_lock
from ..numerics import log_softmax
from .packed_linear import packed_linears


class StaleSequenceError(RuntimeError):
    """A scored sequence was extended after the scorer moved its trunk past it (it was not kept)."""


@dataclass(eq=False)
class ScoredSequence:
    """A token sequence with its next-token log-probabilities ``(vocab,)`` (log-softmax, float32 or finer).

    ``ids``: the whole sequence, context included. The keys and values of its tokens after the
    scorer's trunk live in the scorer's slot pool (``_slots``, one slot per token from trunk length
    ``_base`` on), so that extensions need one token.
    """

    ids: tuple[int, ...]
    logprobs: np.ndarray
    _slots: tuple[int, ...] = field(repr=False, default=())
    _base: int = field(repr=False, default=0)  # trunk length its slots start at
    _session: int = field(repr=False, default=0)
    _epoch: int = field(repr=False, default=0)


_COMPACT_MIN_SLOTS = 4096  # the slot pool is compacted when it holds more than this and twice the live slots


class PrefixTreeScorer:
    """Score one-token extensions of many sequences that share a prefix, in one batched forward pass.

    >>> scorer = PrefixTreeScorer(handle)
    >>> root = scorer.start([bos])                  # one forward pass over the context (the first trunk)
    >>> kids = scorer.extend([(root, 42), (root, 7)])   # one forward pass, two rows
    >>> scorer.commit(kids)                         # their common prefix becomes the shared trunk

    A sequence can be extended as long as it starts with the trunk and was passed to the last
    :meth:`commit` that freed memory (see there); :meth:`usable` says.

    Keys and values: the trunk's in one buffer per layer; every other scored token's in one slot
    of a pool per layer, so a batch gathers each row's own keys with one indexing operation per
    layer whatever the number of rows (per-row copies made Python the bottleneck of batches of
    hundreds of rows).
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
        self._epoch = 0  # bumped when the pool is compacted: sequences not kept then are gone
        self._trunk_ids: tuple[int, ...] = ()
        self._trunk_k: list[torch.Tensor] = []  # per layer (kv_heads, capacity, head_dim)
        self._trunk_v: list[torch.Tensor] = []
        self._pool_k: list[torch.Tensor] = []  # per layer (kv_heads, capacity, head_dim): one slot per token
        self._pool_v: list[torch.Tensor] = []
        self._used = 0
        self._slot_pos = np.zeros(0, dtype=np.int64)  # token position of each pool slot

    # ------------------------------------------------------------------ public

    @property
    def trunk_length(self) -> int:
        """Number of tokens in the shared trunk cache."""
        return len(self._trunk_ids)

    @holding_model_lock
    def start(self, context_ids) -> ScoredSequence:
        """Forget every sequence and score ``context_ids`` from scratch (one forward pass); the context is the trunk."""
        ids = tuple(int(t) for t in context_ids)
        if not ids:
            raise ValueError("context_ids is empty: the model needs at least one token to condition on (e.g. BOS).")
        self._session += 1
        self._trunk_ids, self._trunk_k, self._trunk_v = (), [], []
        self._pool_k, self._pool_v, self._used = [], [], 0
        self._slot_pos = np.zeros(0, dtype=np.int64)
        input_ids = torch.tensor([ids], device=self.handle.device)
        from transformers import DynamicCache

        cache = DynamicCache()
        with torch.no_grad(), packed_linears(self.handle):
            out = self.handle.hf_model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
        self.calls += 1
        self.positions += len(ids)
        logprobs = log_softmax(out.logits[0, -1]).cpu().numpy()
        self._append_trunk([layer.keys[0] for layer in cache.layers], [layer.values[0] for layer in cache.layers])
        self._trunk_ids = ids
        return ScoredSequence(ids, logprobs, (), len(ids), self._session, self._epoch)

    @holding_model_lock
    def extend(self, requests) -> list[ScoredSequence]:
        """Score ``sequence + (token,)`` for each ``(sequence, token)`` in one forward pass; returns them in order.

        A request's ``sequence`` may also be the index of an earlier request of the same call: a chain
        of several new tokens (``[(seq, 5), (0, 6), (1, 7)]`` scores ``seq+5``, ``seq+5+6`` and
        ``seq+5+6+7``), so a text known ahead advances many tokens per pass. With shared-trunk attention
        each row also attends to its ancestors among the new rows; the padded cache runs one pass per
        depth instead.
        """
        requests = [(seq, int(tok)) for seq, tok in requests]
        if not requests:
            return []
        for i, (seq, _) in enumerate(requests):
            if isinstance(seq, int):
                if not 0 <= seq < i:
                    raise ValueError(f"request {i} extends request {seq}: a parent index must point at an earlier "
                                     "request of the same call.")
            else:
                self._check_usable(seq)
        chained = any(isinstance(seq, int) for seq, _ in requests)
        if chained and not self.shared_trunk_attention:
            return self._extend_by_depth(requests)
        trunk = self.trunk_length
        own, ancestors = [], []  # pool slots of each row's older tokens after the trunk; its parents among the rows
        for seq, _ in requests:
            if isinstance(seq, int):
                own.append(own[seq])
                ancestors.append(ancestors[seq] + (seq,))
            else:
                own.append(seq._slots[trunk - seq._base :])
                ancestors.append(())
        device = self.handle.device
        positions = torch.tensor([trunk + len(o) + len(a) for o, a in zip(own, ancestors)], device=device)
        tokens = torch.tensor([[tok] for _, tok in requests], device=device)
        if chained:
            family = torch.eye(len(requests), dtype=torch.bool)
            rows = [i for i, a in enumerate(ancestors) for _ in a]
            family[rows, [j for a in ancestors for j in a]] = True
            new_k, new_v, logits = self._forward_shared(tokens, own, positions, family.to(device))
        else:
            forward = self._forward_shared if self.shared_trunk_attention else self._forward_padded
            new_k, new_v, logits = forward(tokens, own, positions)
        self.calls += 1
        self.positions += len(requests)
        logprobs = log_softmax(logits).cpu().numpy()
        first = self._store(new_k, new_v, positions)
        out: list[ScoredSequence] = []
        for i, (seq, tok) in enumerate(requests):
            parent_ids = out[seq].ids if isinstance(seq, int) else seq.ids
            slots = own[i] + tuple(first + j for j in ancestors[i]) + (first + i,)
            out.append(ScoredSequence(parent_ids + (tok,), logprobs[i], slots, trunk, self._session, self._epoch))
        return out

    def _extend_by_depth(self, requests) -> list[ScoredSequence]:
        """:meth:`extend` of chained requests as one pass per depth (the padded cache sees no rows of its own call)."""
        out: list[ScoredSequence | None] = [None] * len(requests)
        while any(o is None for o in out):
            ready = [i for i, (seq, _) in enumerate(requests)
                     if out[i] is None and (not isinstance(seq, int) or out[seq] is not None)]
            scored = self.extend([(out[requests[i][0]] if isinstance(requests[i][0], int) else requests[i][0],
                                   requests[i][1]) for i in ready])
            for i, seq in zip(ready, scored):
                out[i] = seq
        return out

    @holding_model_lock
    def commit(self, keep) -> None:
        """Move the longest common prefix of ``keep`` into the shared trunk, and free what only others used.

        Afterwards a sequence can be extended only if it starts with the trunk; and once the slot
        pool has grown large, only if it was in ``keep`` (the others' keys are freed). So pass every
        sequence you may extend again. Kept sequences' keys are never changed, only moved.
        """
        keep = list({id(seq): seq for seq in keep}.values())
        if not keep:
            return
        for seq in keep:
            self._check_usable(seq)
        trunk = self.trunk_length
        common = trunk + _common_prefix_length([seq.ids[trunk:] for seq in keep])  # all start with the trunk
        if common > trunk:
            donor = keep[0]
            moved = torch.tensor(donor._slots[trunk - donor._base : common - donor._base], device=self.handle.device)
            self._append_trunk([k[:, moved] for k in self._pool_k], [v[:, moved] for v in self._pool_v])
            self._trunk_ids = donor.ids[:common]
            trunk = common
        live = sorted({s for seq in keep for s in seq._slots[trunk - seq._base :]})
        if self._used > max(_COMPACT_MIN_SLOTS, 2 * len(live)):
            order = torch.tensor(live, dtype=torch.long, device=self.handle.device)
            for pool in (self._pool_k, self._pool_v):
                for layer, buf in enumerate(pool):
                    buf[:, : len(live)] = buf[:, order]
            self._slot_pos[: len(live)] = self._slot_pos[live]
            where = {s: i for i, s in enumerate(live)}
            self._epoch += 1
            for seq in keep:
                seq._slots = tuple(where[s] for s in seq._slots[trunk - seq._base :])
                seq._base, seq._epoch = trunk, self._epoch
            self._used = len(live)

    def usable(self, seq: ScoredSequence) -> bool:
        """Whether ``seq`` can still be extended: same session, its keys not freed, and it starts with the trunk."""
        return (seq._session == self._session and seq._epoch == self._epoch
                and seq.ids[: self.trunk_length] == self._trunk_ids)

    # ------------------------------------------------------------------ internals

    def _forward_shared(self, tokens, own, positions, family=None):
        """One forward pass with shared-trunk attention (see the module docstring); new keys/values and logits.

        Rows see the trunk, the pool slots of their own tokens and themselves (with ``family``, a
        (rows, rows) mask, the rows it marks: a row's ancestors in the call). The slots any row
        sees are gathered once (their union: rows that share ancestors share them) and every row
        is scored against them with one matmul per layer and a mask, as against the trunk.
        """
        trunk, device = self.trunk_length, positions.device
        union = sorted({slot for o in own for slot in o})
        column = {slot: j for j, slot in enumerate(union)}
        visible = torch.zeros(len(own), len(union), dtype=torch.bool)
        rows = [i for i, o in enumerate(own) for _ in o]
        if rows:
            visible[rows, [column[slot] for o in own for slot in o]] = True
        index = torch.tensor(union, dtype=torch.long, device=device)
        batch = _TreeBatch(
            trunk_k=[k[:, :trunk] for k in self._trunk_k],
            trunk_v=[v[:, :trunk] for v in self._trunk_v],
            seen_k=[k[:, index] for k in self._pool_k] if union else None,
            seen_v=[v[:, index] for v in self._pool_v] if union else None,
            seen_visible=visible.to(device),
            seen_positions=torch.as_tensor(self._slot_pos[union], device=device) if union else None,
            positions=positions,
            new_k={},
            new_v={},
            family=family,
        )
        with _shared_trunk_attention(self.handle, batch), torch.no_grad(), packed_linears(self.handle):
            out = self.handle.hf_model(input_ids=tokens, position_ids=positions[:, None], use_cache=False)
        layers = range(len(self._trunk_k))
        return [batch.new_k[l][:, :, -1] for l in layers], [batch.new_v[l][:, :, -1] for l in layers], out.logits[:, -1]

    def _forward_padded(self, tokens, own, positions):
        """One forward pass over a padded ``DynamicCache``: per row [pads | trunk | own keys], so real keys are contiguous."""
        from transformers import DynamicCache

        trunk, b, width = self.trunk_length, len(own), max(len(o) for o in own)
        device = positions.device
        # (b, width) slot of each row's own keys, left-padded (pads point at slot 0 and are masked)
        slots = torch.zeros(b, width, dtype=torch.long)
        for i, o in enumerate(own):
            if o:
                slots[i, width - len(o) :] = torch.tensor(o)
        slots = slots.to(device)
        valid = torch.arange(width, device=device)[None, :] >= (width - (positions - trunk))[:, None]
        # index of every row's keys in [trunk | pool]: [pads (-> 0, masked) | the trunk | the row's own slots]
        shift = (width - valid.sum(1))[:, None]
        col = torch.arange(width + trunk, device=device)[None, :].expand(b, -1)
        index = torch.where(col < shift, 0, col - shift)
        if width:
            own = slots.gather(1, (col - trunk).clamp(0, width - 1)) + trunk
            index = torch.where(col >= shift + trunk, own, index)
        cache_data = []
        for k_trunk, v_trunk, k_pool, v_pool in zip(self._trunk_k, self._trunk_v, self._pool_k or [None] * len(
                self._trunk_k), self._pool_v or [None] * len(self._trunk_v)):
            parts_k = [k_trunk[:, :trunk]] + ([k_pool[:, : self._used]] if k_pool is not None else [])
            parts_v = [v_trunk[:, :trunk]] + ([v_pool[:, : self._used]] if v_pool is not None else [])
            src_k, src_v = torch.cat(parts_k, dim=1), torch.cat(parts_v, dim=1)
            cache_data.append((src_k[:, index].permute(1, 0, 2, 3).contiguous(),
                               src_v[:, index].permute(1, 0, 2, 3).contiguous()))
        mask = torch.cat([col >= shift, torch.ones(b, 1, dtype=torch.bool, device=device)], dim=1)
        cache = DynamicCache(ddp_cache_data=cache_data)
        with torch.no_grad(), packed_linears(self.handle):
            out = self.handle.hf_model(input_ids=tokens, attention_mask=mask.long(), position_ids=positions[:, None],
                                       cache=cache, use_cache=True)
        return ([layer.keys[:, :, -1] for layer in cache.layers], [layer.values[:, :, -1] for layer in cache.layers],
                out.logits[:, -1])

    def _store(self, new_k, new_v, positions) -> int:
        """Put one new key/value per row (per layer (b, kv_heads, head_dim)) into the pool; the first slot used."""
        b, first = new_k[0].shape[0], self._used
        if len(self._slot_pos) < first + b:
            self._slot_pos = np.concatenate([self._slot_pos[:first], np.zeros(max(256, 2 * (first + b)), dtype=np.int64)])
        self._slot_pos[first : first + b] = positions.cpu().numpy()
        if not self._pool_k or self._pool_k[0].shape[1] < first + b:
            capacity = max(256, 2 * (first + b))
            grown = []
            for pool, new in ((self._pool_k, new_k), (self._pool_v, new_v)):
                bufs = []
                for layer, x in enumerate(new):
                    buf = torch.empty(x.shape[1], capacity, x.shape[2], dtype=x.dtype, device=x.device)
                    if pool:
                        buf[:, :first] = pool[layer][:, :first]
                    bufs.append(buf)
                grown.append(bufs)
            self._pool_k, self._pool_v = grown
        for layer in range(len(new_k)):
            self._pool_k[layer][:, first : first + b] = new_k[layer].transpose(0, 1)
            self._pool_v[layer][:, first : first + b] = new_v[layer].transpose(0, 1)
        self._used = first + b
        return first

    def _check_usable(self, seq: ScoredSequence) -> None:
        if not self.usable(seq):
            raise StaleSequenceError(
                f"the sequence of {len(seq.ids)} tokens no longer starts with the shared trunk of "
                f"{self.trunk_length} tokens, was not kept by the last commit() that freed memory, or belongs to "
                "an earlier start(), so its cache is gone; pass every sequence you will extend again to commit()."
            )

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
    """What the attention function needs for one call: the trunk, the pool slots rows see, positions."""

    trunk_k: list  # per layer (kv_heads, T, head_dim)
    trunk_v: list
    seen_k: list | None  # per layer (kv_heads, U, head_dim): the union of the pool slots any row sees
    seen_v: list | None
    seen_visible: torch.Tensor  # (b, U) bool: which of them each row sees (its own tokens after the trunk)
    seen_positions: torch.Tensor | None  # (U,) their positions
    positions: torch.Tensor  # (b,) position of each row's new token
    new_k: dict  # filled per layer: (b, kv_heads, 1, head_dim), rotated as a cache would store it
    new_v: dict
    family: torch.Tensor | None = None  # (b, b) bool: the new rows each row sees (None: itself only)
    bias: dict = field(default_factory=dict)  # (sliding window, dtype) -> (b, keys): 0 where a row sees a key, else min


def _prefix_tree_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                           sliding_window=None, softcap=None, **kwargs):
    """Attention of one new token per row over [shared trunk | the pool slots it sees | itself (and its ancestors
    among the rows, with ``family``)].

    Same arithmetic as transformers' eager attention (scores in the query's precision, softmax
    in float32, or float64 for a float64 model), with every row scored against the one trunk and the one set of seen slots by a
    matmul per layer, masked per row. Dims: query (b, heads, 1, d), key/value (b, kv_heads, 1, d)
    -> (b, 1, heads, d).
    """
    batch: _TreeBatch = _ACTIVE.batch
    layer = module.layer_idx
    batch.new_k[layer], batch.new_v[layer] = key, value
    b, heads, q_len, d = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scaling = d**-0.5 if scaling is None else scaling
    # Scores and probabilities are laid out (kv_heads, b, groups, keys): each kv head's rows are one matrix, so the
    # products with the keys and values are batched matmuls over views, with no copy of the probabilities.
    q = query.reshape(b, kv_heads, groups, d)
    q_by_head = q.permute(1, 0, 2, 3).reshape(kv_heads, b * groups, d)

    def against(keys):  # (kv, n, d) -> scores (kv, b, g, n)
        return torch.matmul(q_by_head, keys.transpose(1, 2)).reshape(kv_heads, b, groups, -1)

    trunk_k, trunk_v = batch.trunk_k[layer], batch.trunk_v[layer]
    n_trunk = trunk_k.shape[1]
    seen_k = batch.seen_k[layer] if batch.seen_k is not None else None
    n_seen = 0 if seen_k is None else seen_k.shape[1]
    parts = [against(trunk_k)] + ([against(seen_k)] if n_seen else [])
    family = batch.family
    if family is None:  # each row sees itself among the new rows
        parts.append((q * key.reshape(b, kv_heads, 1, d)).sum(-1, keepdim=True).permute(1, 0, 2, 3))
    else:  # and its ancestors among them: every row against every new key, masked
        new_keys = key.reshape(b, kv_heads, d).transpose(0, 1)
        parts.append(against(new_keys))
    n_new = 1 if family is None else b
    scores = torch.cat(parts, dim=-1) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    bias = batch.bias.get((sliding_window, scores.dtype))
    if bias is None:  # the same for every layer with this window: built once per call
        visible = _visible_keys(batch, b, n_trunk, n_seen, n_new, sliding_window, scores.device)
        bias = torch.zeros(visible.shape, dtype=scores.dtype, device=scores.device)
        bias = batch.bias[sliding_window, scores.dtype] = bias.masked_fill_(~visible, torch.finfo(scores.dtype).min)
    # Hidden keys get the dtype's minimum added (a visible score gets 0.0, exactly itself), so their probability is
    # exactly 0 as with eager attention's mask; one add of a bias made once per call replaces a masked fill per layer.
    scores.add_(bias[None, :, None, :])  # scores is this layer's own fresh tensor
    # softmax in float32 as eager attention does; in float64 for float64 models (exactness tests)
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(query.dtype, torch.float32)).to(query.dtype)

    def weighted(p, values):  # probs (kv, b, g, n), a view, x values (kv, n, d) -> (kv, b, g, d)
        return torch.matmul(p.reshape(kv_heads, b * groups, -1), values).reshape(kv_heads, b, groups, d)

    out = weighted(probs[..., :n_trunk], trunk_v)
    if n_seen:
        out = out + weighted(probs[..., n_trunk : n_trunk + n_seen], batch.seen_v[layer])
    if family is None:
        out = out + probs[..., -1:] * value.reshape(b, kv_heads, 1, d).permute(1, 0, 2, 3)
    else:
        out = out + weighted(probs[..., -n_new:], value.reshape(b, kv_heads, d).transpose(0, 1))
    return out.permute(1, 0, 2, 3).reshape(b, heads, 1, d).transpose(1, 2).contiguous(), None


def _visible_keys(batch: _TreeBatch, b: int, n_trunk: int, n_seen: int, n_new: int, sliding_window, device):
    """(b, keys) bool: the keys each row sees, in the order [trunk | seen pool slots | new rows]."""
    visible = torch.ones(b, n_trunk + n_seen + n_new, dtype=torch.bool, device=device)
    if n_seen:
        visible[:, n_trunk : n_trunk + n_seen] = batch.seen_visible
    if batch.family is not None:
        visible[:, -n_new:] = batch.family
    if sliding_window is not None:
        key_positions = [torch.arange(n_trunk, device=device)[None, :].expand(b, -1)]
        if n_seen:
            key_positions.append(batch.seen_positions[None, :].expand(b, -1))
        key_positions.append(batch.positions[:, None] if batch.family is None else batch.positions[None, :].expand(b, -1))
        visible &= (batch.positions[:, None] - torch.cat(key_positions, dim=1)) < sliding_window
    return visible


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
    with handle.lock, torch.no_grad(), packed_linears(handle):
        out = handle.hf_model(input_ids=torch.tensor([ids], device=handle.device), use_cache=False, logits_to_keep=1)
    return log_softmax(out.logits[0, -1]).cpu().numpy()


def sequence_logprobs(handle: ModelHandle, ids) -> np.ndarray:
    """Log-probability of each token of ``ids`` after the ones before it, ``(len(ids) - 1,)`` (one forward pass)."""
    ids = [int(t) for t in ids]
    if len(ids) < 2:
        raise ValueError("sequence_logprobs needs at least two tokens (a context token and one to score).")
    x = torch.tensor([ids], device=handle.device)
    with handle.lock, torch.no_grad(), packed_linears(handle):
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
        with handle.lock, torch.no_grad(), packed_linears(handle):
            out = handle.hf_model(input_ids=new, cache=cache, use_cache=True, logits_to_keep=1,
                                  position_ids=torch.arange(keep, len(ids), device=handle.device)[None])
        cached = ids
        yield log_softmax(out.logits[0, -1]).cpu().numpy(), len(ids) - keep


def next_token_logprob_rows(handle: ModelHandle, ids, *, start: int = 0, chunk: int = 256):
    """Yield ``(j, logprobs)`` for ``j = start..len(ids) - 1``: the next-token log-probabilities ``(vocab,)``
    after ``ids[: j + 1]``, from one forward pass over ``ids``.

    The final-norm output is unembedded ``chunk`` positions at a time, so the whole text never
    needs a (positions, vocab) tensor (262k-token vocabularies).
    """
    from . import hooks
    from .sites import FINAL_NORM

    ids = [int(t) for t in ids]
    states = {}
    hooks.forward(handle, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), reads=[(FINAL_NORM, None)],
                  logits=False, on_site=lambda site, layer, x: states.update(h=x))
    sm = hooks.site_map(handle)
    for a in range(start, len(ids), chunk):
        with torch.no_grad():
            rows = log_softmax(sm.unembed(states["h"][0, a : a + chunk], normalized=True)).cpu().numpy()
        yield from enumerate(rows, start=a)


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

"""What each probe captures: the raw site it reads and the reduction it stores.

Each probe reads one site of the site map (:mod:`workbench.probes.sites`, TransformerLens-style
names such as ``blocks.{l}.hook_resid_pre``) and stores either the site itself or a reduction of
it. Backends only find sites; every reduction lives here, once, so all backends store exactly the
same numbers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from ..numerics import entropy_from_logprobs

from . import sites as S


@dataclass
class BatchContext:
    """What a reduction may need besides the site tensor (made once per batch; what several layers'
    reductions derive from the batch alone is computed once, on first use)."""

    input_ids: torch.Tensor  # (b, p)
    valid: torch.Tensor  # (b, p) bool, False on padding
    w_o_factor: Callable[[int], torch.Tensor]  # layer -> (head, d_h, d_h): R with R^T R = W_O^h W_O^h^T
    n_heads: int
    top_k: int
    lengths: list[int] | None = None  # each sample's valid positions, its first ones (right padding); on the host

    @functools.cached_property
    def later_queries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(valid as float (b, p), number of valid queries after each key (b, 1, p)), for :func:`attention_received`."""
        return _later_queries(self.valid)


@dataclass(frozen=True)
class Variable:
    """One data variable a probe writes, with its dims (``layer`` is stacked over layers)."""

    name: str
    dims: tuple[str, ...]
    description: str


@dataclass(frozen=True)
class Probe:
    name: str
    site: str
    description: str
    variables: tuple[Variable, ...]
    reduce: Callable[[torch.Tensor, BatchContext, int | None], dict[str, torch.Tensor]]
    extra_sites: tuple[str, ...] = ()  # sites whose modules (weights) the reduction also needs

    @property
    def sites(self) -> tuple[str, ...]:
        return (self.site, *self.extra_sites)

    @property
    def needs_attention_probs(self) -> bool:
        return self.site == S.PATTERN

    @property
    def per_layer(self) -> bool:
        return S.is_layer_site(self.site)


# --------------------------------------------------------------------------- reductions


def _identity(name: str):
    def reduce(x: torch.Tensor, ctx: BatchContext, layer: int | None) -> dict[str, torch.Tensor]:
        return {name: x}

    return reduce


def _later_queries(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    valid_f = valid.float()
    return valid_f, (valid_f.flip(-1).cumsum(-1).flip(-1) - valid_f).unsqueeze(1)


def attention_received(weights: torch.Tensor, valid: torch.Tensor, lengths: list[int] | None = None,
                       later_queries: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean attention each key receives from the valid queries strictly after it.

    ``received[b, h, k] = sum_{q > k, valid q} A[b, h, q, k] / #{q > k, valid q}``;
    NaN where no query follows the key (the last token). For key 0 this is the
    attention-sink score averaged over queries > 0 (Guo et al., "Active-Dormant
    Attention Heads"). Dims: (b, head, q, k) -> (b, head, k), float32 (sums accumulate in
    float32 whatever the weights' dtype).

    ``lengths`` (known on the host): each sample's valid positions are its first ``lengths[b]``
    (right padding, as capture batches). The column sums are then plain sums over those query
    rows, which are memory-bound on a GPU; without it, a (1 x q) @ (q x k) product per head
    with the valid mask (same numbers, for any mask). ``later_queries``: ``_later_queries(valid)``,
    when the caller keeps it for all layers of a batch.
    """
    # Causal attention is zero above the diagonal, so the sum over queries after the key is
    # the column sum over valid queries minus the key's attention to itself.
    valid_f, count = later_queries if later_queries is not None else _later_queries(valid)
    if lengths is None:
        column = (valid.to(weights.dtype)[:, None, None, :] @ weights).squeeze(-2).float()  # matmul: 20x einsum on CPU
    elif all(n == weights.shape[-2] for n in lengths):
        column = weights.sum(-2, dtype=torch.float32)
    else:
        column = torch.stack([weights[b, :, :n].sum(-2, dtype=torch.float32) for b, n in enumerate(lengths)])
    diagonal = weights.diagonal(dim1=-2, dim2=-1).float() * valid_f.unsqueeze(1)
    return (column - diagonal) / count  # 0/0 -> NaN where no later query


def w_o_factor(w_o: torch.Tensor) -> torch.Tensor:
    """``R`` (head, d_h, d_h) with ``||W_O^h^T v|| = ||R_h v||`` for every v, from ``w_o`` (head, d_h, d_model).

    From the eigendecomposition of the Gram matrix ``W_O^h W_O^h^T = V diag(l) V^T`` (float64):
    ``R = diag(sqrt(l)) V^T``, so ``R^T R`` is the Gram matrix. It exists for any W_O (a Cholesky
    factor would fail on a rank-deficient head). The small (d_h x d_h) decompositions run on the
    CPU, where they are fast; only the Gram product runs where the weights are.
    """
    w = w_o.double()
    gram = (w @ w.transpose(1, 2)).cpu()
    eigenvalues, vectors = torch.linalg.eigh(gram)
    factor = (vectors * eigenvalues.clamp_min(0).sqrt()[:, None, :]).transpose(1, 2)
    return factor.to(device=w_o.device, dtype=torch.float32)


def value_norms(values: torch.Tensor, factor: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Norm of each head's value vector written into the residual, ||W_O^h v_j^h||.

    Grouped-query attention: query head h reads kv head h // (n_heads / n_kv_heads).
    Uses ``||W_O^h v|| = ||R_h v||`` (:func:`w_o_factor`): one (d_h x d_h) product per head and
    token instead of a (d_h x d_model) one, as one matrix product per kv head with its group's
    factors side by side (the values are read as they lie, not copied per query head).
    Dims: values (b, p, kv_head, d_h), factor (head, d_h, d_h) -> (b, head, p).
    """
    b, p, n_kv, d_h = values.shape
    group = n_heads // n_kv
    x = values.reshape(b * p, n_kv, d_h).transpose(0, 1)  # (kv, tokens, d_h), a view where it can be
    # r[k, :, g * d_h + e] = R_{k * group + g}[e, :]: every head of a kv group in one product
    r = factor.to(values.dtype).reshape(n_kv, group, d_h, d_h).permute(0, 3, 1, 2).reshape(n_kv, d_h, group * d_h)
    y = torch.bmm(x, r).view(n_kv, b * p, group, d_h)  # R_h v for each head h of the kv group
    return torch.linalg.vector_norm(y, dim=-1).permute(0, 2, 1).reshape(n_heads, b, p).transpose(0, 1)


def logit_summaries(
    logits: torch.Tensor, input_ids: torch.Tensor, top_k: int, valid: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Next-token log-prob, entropy and top-k of the output distribution at each position.

    ``next_token_logprob[b, p] = log softmax(logits[b, p])[input_ids[b, p + 1]]`` (NaN at
    the last real token, whose next token is unknown); ``entropy = -sum_v p_v log p_v`` in
    nats. Dims (b, p, vocab) -> (b, p) and (b, p, k).
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    entropy = entropy_from_logprobs(logprobs)
    nxt = torch.full(input_ids.shape, float("nan"), dtype=logprobs.dtype, device=logprobs.device)
    nxt[:, :-1] = logprobs[:, :-1].gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    if valid is not None:  # the token after the last real one is padding
        nxt[:, :-1] = nxt[:, :-1].masked_fill(~valid[:, 1:], float("nan"))
    top_logprobs, top_ids = logprobs.topk(top_k, dim=-1)
    return {
        "next_token_logprob": nxt,
        "entropy": entropy,
        "top_k_ids": top_ids,
        "top_k_logprobs": top_logprobs,
    }


def _reduce_resid_norm(x, ctx, layer):
    return {"resid_norm": torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)}


def _reduce_attn_received(x, ctx, layer):
    return {"attn_received": attention_received(x, ctx.valid, ctx.lengths, ctx.later_queries)}


def _reduce_value_norm(x, ctx, layer):
    return {"value_norm": value_norms(x, ctx.w_o_factor(layer), ctx.n_heads)}


def _reduce_logits(x, ctx, layer):
    return logit_summaries(x, ctx.input_ids, ctx.top_k, ctx.valid)


# --------------------------------------------------------------------------- the catalogue

_RESID_DIMS = ("sample", "pos", "layer", "d_model")

PROBES: dict[str, Probe] = {
    p.name: p
    for p in [
        Probe(
            "resid_pre", S.RESID_PRE, "residual stream entering each layer (HF hidden_states[l])",
            (Variable("resid_pre", _RESID_DIMS, "residual stream entering layer"),), _identity("resid_pre"),
        ),
        Probe(
            "resid_post", S.RESID_POST, "residual stream leaving each layer (before the final norm)",
            (Variable("resid_post", _RESID_DIMS, "residual stream leaving layer"),), _identity("resid_post"),
        ),
        Probe(
            "resid_norm", S.RESID_PRE, "L2 norm of the residual entering each layer (residual peaks, no d_model stored)",
            (Variable("resid_norm", ("sample", "pos", "layer"), "||resid_pre||_2"),), _reduce_resid_norm,
        ),
        Probe(
            "final_norm", S.FINAL_NORM, "output of the final norm (HF hidden_states[-1])",
            (Variable("final_norm", ("sample", "pos", "d_model"), "final-norm output"),), _identity("final_norm"),
        ),
        Probe(
            "attn_out", S.ATTN_OUT, "what each layer's attention adds to the residual stream",
            (Variable("attn_out", _RESID_DIMS, "attention update"),), _identity("attn_out"),
        ),
        Probe(
            "mlp_out", S.MLP_OUT, "what each layer's MLP adds to the residual stream",
            (Variable("mlp_out", _RESID_DIMS, "MLP update"),), _identity("mlp_out"),
        ),
        Probe(
            "attn_pattern", S.PATTERN, "full attention probabilities (memory: sample x layer x head x pos^2)",
            (Variable("attn_pattern", ("sample", "layer", "head", "pos", "key_pos"), "attention probability"),),
            _identity("attn_pattern"),
        ),
        Probe(
            "attn_received", S.PATTERN, "mean attention each key receives from later queries (sink mass)",
            (Variable("attn_received", ("sample", "layer", "head", "key_pos"), "mean attention from later queries"),),
            _reduce_attn_received,
        ),
        Probe(
            "value_norm", S.V, "norm of each head's value vector after W_O, ||v_j W_O^h||",
            (Variable("value_norm", ("sample", "layer", "head", "pos"), "||W_O^h v_j||"),), _reduce_value_norm,
            extra_sites=(S.Z,),  # W_O lives where hook_z is read
        ),
        Probe(
            "logits", S.LOGITS, "next-token log-prob, entropy (nats) and top-k of the output distribution",
            (
                Variable("next_token_logprob", ("sample", "pos"), "log p(next token)"),
                Variable("entropy", ("sample", "pos"), "entropy of the next-token distribution (nats)"),
                Variable("top_k_ids", ("sample", "pos", "k"), "top-k token ids"),
                Variable("top_k_logprobs", ("sample", "pos", "k"), "top-k log-probs"),
            ),
            _reduce_logits,
        ),
    ]
}

DEFAULT_PROBES = ("resid_pre", "resid_post", "final_norm", "attn_received", "value_norm", "logits")


class UnknownProbeError(ValueError):
    pass


def resolve_probes(names) -> list[Probe]:
    """Probe objects for names; a clear error lists the valid ones."""
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names:
        raise UnknownProbeError(f"No probes given. Valid probes: {', '.join(PROBES)}.")
    unknown = [n for n in names if n not in PROBES]
    if unknown:
        raise UnknownProbeError(
            f"Unknown probe(s) {', '.join(map(repr, unknown))}. Valid probes: {', '.join(PROBES)}."
        )
    return [PROBES[n] for n in dict.fromkeys(names)]


def unsupported_probes(site_map) -> dict[str, str]:
    """Probes a model cannot give, with the reason (from the site map's unsupported sites)."""
    out = {}
    for name, probe in PROBES.items():
        missing = [s for s in probe.sites if s in site_map.unsupported]
        if missing:
            out[name] = "; ".join(f"{s}: {site_map.unsupported[s]}" for s in missing)
    return out


def check_probes_supported(handle, probes: list[Probe]) -> None:
    """Raise before any forward pass when ``handle`` cannot give one of ``probes``, saying which and why."""
    gaps = unsupported_probes(handle.sites)
    bad = [p.name for p in probes if p.name in gaps]
    if bad:
        raise S.UnsupportedSiteError(
            f"{handle.name} ({handle.architecture}) cannot give probe(s) {', '.join(bad)}: "
            + " | ".join(f"{b}: {gaps[b]}" for b in bad)
        )

"""Stream every layer's hidden states over a corpus, one batch at a time, without keeping them.

For statistics that grow with the corpus only through sums (least-squares fits of the
next-token law, tuned-lens initialisation, future-token probes), the activations of a
batch are handed to a callback and dropped, so memory does not grow with the number of
tokens. Long documents are cut into consecutive windows of ``window`` tokens.

Features follow He & Su, "A Law of Next-Token Prediction in Large Language Models"
(the authors' public code): block ``l``'s output is normalised by a *freshly
initialised* norm of the model's own type (unit weight), except the last block, whose
output goes through the model's trained final norm (Hugging Face's ``hidden_states[-1]``).
The embedding layer is left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from ..models import ModelHandle
from .backends import run_batch
from .sites import FINAL_NORM, RESID_POST


@dataclass
class FeatureBatch:
    """One layer's features for the valid tokens of one batch.

    ``features`` (n, d_model) float32; ``targets`` (n, horizon) token ids ``k = 1..horizon``
    steps ahead, -1 past the end of the window; ``positions`` (n,) position in the window;
    ``window`` (n,) index of the window in the stream.
    """

    layer: int
    features: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor
    window: torch.Tensor


def fresh_norm(handle: ModelHandle) -> torch.nn.Module:
    """A newly initialised (unit-weight) norm of the same type as the model's final norm.

    Built by the norm class's own constructor (``(dim, eps=...)``, else ``(dim)`` with the
    final norm's epsilon copied), else a copy of the final norm with ``reset_parameters()``.
    """
    final = handle.sites.ln_final
    if final is None:
        raise NotImplementedError(f"{handle.name} ({handle.architecture}) has no final norm: the next-token-law "
                                  "features need a fresh norm of the model's own type.")
    eps = next((getattr(final, a) for a in ("eps", "variance_epsilon", "epsilon") if hasattr(final, a)), None)
    eps = eps or getattr(handle.config, "rms_norm_eps", None) or getattr(handle.config, "layer_norm_eps", None) or 1e-6
    norm = None
    for make in (lambda: type(final)(handle.d_model, eps=eps), lambda: type(final)(handle.d_model)):
        try:
            norm = make()
            break
        except TypeError:
            continue
    if norm is None and hasattr(final, "reset_parameters"):
        import copy

        norm = copy.deepcopy(final)
        norm.reset_parameters()
    if norm is None:
        raise NotImplementedError(
            f"cannot build a fresh {type(final).__name__} for {handle.name}: its constructor takes neither (dim, eps=...) "
            "nor (dim) and it has no reset_parameters(). The next-token-law features need a unit-weight norm of the model's own type."
        )
    for attr in ("eps", "variance_epsilon", "epsilon"):
        if hasattr(final, attr) and hasattr(norm, attr):
            setattr(norm, attr, getattr(final, attr))
    return norm.to(device=handle.device, dtype=handle.dtype).eval()


def token_windows(
    handle: ModelHandle,
    texts: Iterable[str],
    window: int | None = None,
    *,
    max_tokens: int | None = None,
    add_special_tokens: bool = True,
):
    """Token-id windows of at most ``window`` tokens, cutting long texts into consecutive pieces.

    ``window`` defaults to 512 tokens or the model's context if shorter; ``max_tokens``
    stops once the windows hold that many tokens (the last window is cut to fit).
    Each piece after the first of a text starts where the previous one ended (no overlap,
    no BOS re-inserted), so every token of the corpus is seen exactly once.
    """
    window = window or min(512, handle.max_context)
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}.")
    if window > handle.max_context:
        raise ValueError(f"window {window} exceeds {handle.name}'s context of {handle.max_context} tokens.")
    windows, total = [], 0
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts must be strings; item {i} is {type(text).__name__}.")
        ids = handle.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        for s in range(0, len(ids), window):
            piece = ids[s : s + window]
            if max_tokens is not None:
                piece = piece[: max_tokens - total]
            if len(piece) >= 2:
                windows.append(piece)
                total += len(piece)
        if max_tokens is not None and total >= max_tokens - 1:
            break
    if not windows:
        raise ValueError("the texts produced no window of at least 2 tokens; pass non-empty texts.")
    return windows


def stream_layer_features(
    handle: ModelHandle,
    windows: list[list[int]],
    on_batch: Callable[[FeatureBatch], None],
    *,
    horizon: int = 1,
    batch_size: int = 8,
    backend: str = "torch",
    progress: bool = True,
    desc: str = "features",
) -> int:
    """Run ``windows`` (from :func:`token_windows`) through the model and call ``on_batch``
    once per layer and batch with the normalised features (He & Su). Returns the token count.
    """
    norm = fresh_norm(handle)
    last = handle.n_layers - 1
    pad = handle.tokenizer.pad_token_id if handle.tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i]))  # similar lengths share a batch
    total = sum(map(len, windows))
    bar = tqdm(total=total, unit="tok", desc=desc, disable=not progress)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(windows[i]) for i in batch)
        ids = torch.full((len(batch), width + horizon), -1, dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(windows[i])] = torch.tensor(windows[i])
        valid = ids[:, :width] >= 0
        input_ids = ids[:, :width].clamp_min(0).masked_fill(~valid, pad).to(handle.device)
        targets = torch.stack([ids[:, k : k + width] for k in range(1, horizon + 1)], dim=-1)[valid]
        positions = torch.arange(width).expand(len(batch), width)[valid]
        window_idx = torch.tensor(batch)[:, None].expand(len(batch), width)[valid]
        valid_dev = valid.to(handle.device)

        def on_site(site, layer, tensor):
            if site == RESID_POST and layer != last:
                feats = norm(tensor)
            elif site == FINAL_NORM:
                feats, layer = tensor, last
            else:
                return
            on_batch(FeatureBatch(layer, feats[valid_dev].float(), targets, positions, window_idx))

        with torch.no_grad():
            run_batch(backend, handle, input_ids, valid_dev.long(), {RESID_POST, FINAL_NORM}, on_site)
        bar.update(int(valid.sum()))
    bar.close()
    return total

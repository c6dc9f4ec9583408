"""One token's residual stream at every depth, for many equal-length token windows (lines of thought).

A full capture stores every position; trajectory analyses (Sarfati et al., "Lines of Thought in
Large Language Models") need only the last token's state at each depth, for thousands of windows.
:func:`last_token_states` reads just that through the hook engine, keeping memory at
(windows, depth, d_model).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from . import hooks
from .sites import RESID_POST, RESID_PRE


def last_token_states(handle, windows: list[list[int]], *, batch_size: int = 16, progress: bool = True) -> torch.Tensor:
    """(window, depth, d_model) float32: ``resid_pre`` of every block at the last position, then the last ``resid_post``.

    Depth 0 is what enters block 0 (the embedding output), depth ``n_layers`` what leaves the
    last block (before the final norm). Windows must all have the same length (no padding).
    """
    lengths = {len(w) for w in windows}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"windows must be non-empty and of one length; got lengths {sorted(lengths)[:5]}.")
    n = handle.n_layers
    out = torch.empty(len(windows), n + 1, handle.d_model)
    reads = [(RESID_PRE, layer) for layer in range(n)] + [(RESID_POST, n - 1)]
    bar = tqdm(total=len(windows), desc="last-token states", unit="window", disable=not progress)
    for start in range(0, len(windows), batch_size):
        ids = torch.tensor(windows[start : start + batch_size])

        def on_site(site, layer, value, start=start):
            depth = layer + 1 if site == RESID_POST else layer
            out[start : start + len(value), depth] = value[:, -1].float().cpu()

        hooks.forward(handle, ids, reads=reads, on_site=on_site, logits=False)
        bar.update(len(ids))
    bar.close()
    return out

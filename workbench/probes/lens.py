"""Read a layer's residual stream through the model's own unembedding: logit lens and tuned lens.

- Logit lens (nostalgebraist, "interpreting GPT: the logit lens", 2020):
  ``logits_l = W_U final_norm(h_l)``.
- Tuned lens (Belrose et al., "Eliciting Latent Predictions from Transformers with the
  Tuned Lens", 2023): ``logits_l = W_U final_norm(h_l + A_l h_l + b_l)``, one affine
  translator per layer trained to minimise ``KL(p_final || p_l)``; the last layer's
  translator is the identity (the lens there *is* the model's output).

``h_l`` is block ``l``'s output (``resid_post``). Training here (CPU-practical): the
translators start from the least-squares map of ``h_l`` onto the last block's output
(closed form, from streamed float64 statistics), then take ``steps`` Adam steps on the
exact KL over the full vocabulary. The number of tokens each stage used is recorded.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from ..models import ModelHandle
from ..numerics import kl_from_logprobs
from .backends import run_batch
from .sites import RESID_POST


def lens_logits(handle: ModelHandle, states: torch.Tensor) -> torch.Tensor:
    """``W_U final_norm(states)`` exactly as the model computes its output (soft-caps and logit scales included)."""
    return handle.sites.unembed(states.to(handle.device, handle.dtype))


@dataclass
class TunedLens:
    """Per-layer affine translators ``h -> h + h @ weight[l].T + bias[l]`` (float32, CPU)."""

    model: str
    model_file_hash: str
    weight: torch.Tensor  # (layer, d_model, d_model)
    bias: torch.Tensor  # (layer, d_model)
    info: dict = field(default_factory=dict)

    @classmethod
    def identity(cls, handle: ModelHandle) -> "TunedLens":
        d, n = handle.d_model, handle.n_layers
        return cls(handle.name, handle.file_hash, torch.zeros(n, d, d), torch.zeros(n, d))

    def translate(self, layer: int, states: torch.Tensor) -> torch.Tensor:
        w, b = self.weight[layer].to(states.device), self.bias[layer].to(states.device)
        return states + (states.float() @ w.T + b).to(states.dtype)

    def logits(self, handle: ModelHandle, layer: int, states: torch.Tensor) -> torch.Tensor:
        self.check_model(handle)
        return lens_logits(handle, self.translate(layer, states.to(handle.device)))

    def check_model(self, handle: ModelHandle) -> None:
        if handle.file_hash != self.model_file_hash or self.weight.shape[1] != handle.d_model:
            raise ValueError(
                f"this tuned lens was trained on {self.model} ({self.model_file_hash[:12]}), not on "
                f"{handle.name} ({handle.file_hash[:12]}): train one for this model with train_tuned_lens()."
            )

    def to_dataset(self) -> xr.Dataset:
        """The lens as a Dataset: save it next to a run with ``workbench.runs.save_result``."""
        n, d, _ = self.weight.shape
        return xr.Dataset(
            {
                "lens_weight": (("layer", "d_model_out", "d_model"), self.weight.numpy()),
                "lens_bias": (("layer", "d_model_out"), self.bias.numpy()),
            },
            coords={"layer": np.arange(n)},
            attrs={"kind": "tuned_lens", "model": self.model, "model_file_hash": self.model_file_hash,
                   **{k: v for k, v in self.info.items() if isinstance(v, (int, float, str))}},
        )

    @classmethod
    def from_dataset(cls, ds: xr.Dataset) -> "TunedLens":
        if ds.attrs.get("kind") != "tuned_lens" or "lens_weight" not in ds:
            raise ValueError("this dataset is not a saved tuned lens (no kind='tuned_lens' / lens_weight).")
        info = {k: v for k, v in ds.attrs.items() if k not in ("kind", "model", "model_file_hash")}
        return cls(ds.attrs["model"], ds.attrs["model_file_hash"],
                   torch.from_numpy(np.asarray(ds.lens_weight.values, np.float32)),
                   torch.from_numpy(np.asarray(ds.lens_bias.values, np.float32)), info)


def collect_layer_states(handle: ModelHandle, windows: list[list[int]], max_tokens: int, *, seed: int = 0,
                         skip_first: int = 1, batch_size: int = 8, progress: bool = True) -> torch.Tensor:
    """``resid_post`` of every layer for up to ``max_tokens`` tokens of randomly chosen windows, (token, layer, d_model).

    The first ``skip_first`` positions of each window are skipped: the attention-sink
    token's residual is orders of magnitude larger than the rest and would dominate a fit.
    """
    # Whole windows in a seeded random order until enough tokens: only those windows are run.
    order = np.random.default_rng(seed).permutation(len(windows))
    chosen, take = [], 0
    for i in order:
        if take >= max_tokens:
            break
        n = min(max(len(windows[i]) - skip_first, 0), max_tokens - take)
        if n:
            chosen.append((windows[i][: skip_first + n], n))
            take += n
    out = torch.empty(take, handle.n_layers, handle.d_model)
    pad = handle.tokenizer.pad_token_id if handle.tokenizer.pad_token_id is not None else 0
    row = 0
    bar = tqdm(total=take, unit="tok", desc="tuned lens: collect states", disable=not progress)
    for start in range(0, len(chosen), batch_size):
        batch = chosen[start : start + batch_size]
        width = max(len(w) for w, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        picks = []
        for r, (w, n) in enumerate(batch):
            ids[r, : len(w)] = torch.tensor(w)
            mask[r, : len(w)] = 1
            picks += [(r, p) for p in range(skip_first, skip_first + n)]
        if not picks:
            continue
        rows, cols = torch.tensor(picks).T

        def on_site(site, layer, tensor, rows=rows, cols=cols, base=row):
            out[base : base + len(rows), layer] = tensor[rows, cols].float().cpu()

        with torch.no_grad():
            run_batch("torch", handle, ids.to(handle.device), mask.to(handle.device), {RESID_POST}, on_site)
        row += len(picks)
        bar.update(len(picks))
    bar.close()
    return out[:row]


def _least_squares_init(states: torch.Tensor, lens: TunedLens, ridge: float = 1e-4) -> None:
    """Translator init: least-squares affine map of each layer's state onto the last layer's (residual form)."""
    target = states[:, -1].double()
    for layer in range(states.shape[1] - 1):
        x = states[:, layer].double()
        mx, my = x.mean(0), target.mean(0)
        xc, yc = x - mx, target - my
        sxx = xc.T @ xc
        sxx += ridge * sxx.diagonal().mean() * torch.eye(sxx.shape[0], dtype=sxx.dtype)
        m = torch.linalg.solve(sxx, xc.T @ yc)  # y ~ x m + c
        lens.weight[layer] = (m.T - torch.eye(m.shape[0], dtype=m.dtype)).float()
        lens.bias[layer] = (my - mx @ m).float()


def _mean_kl(handle: ModelHandle, lens: TunedLens, states: torch.Tensor, chunk: int = 32) -> float:
    """Mean over tokens and layers (all but the last) of KL(p_final || q_l) on ``states`` (token, layer, d)."""
    if len(states) == 0:
        return float("nan")
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(states), chunk):
            batch = states[start : start + chunk].to(handle.device)
            final = torch.log_softmax(lens_logits(handle, batch[:, -1]).float(), -1)
            for layer in range(batch.shape[1] - 1):
                logq = torch.log_softmax(lens.logits(handle, layer, batch[:, layer]).float(), -1)
                total += float(kl_from_logprobs(final, logq).sum())
    return total / (len(states) * (states.shape[1] - 1))


def train_tuned_lens(
    handle: ModelHandle,
    windows: list[list[int]],
    *,
    max_tokens: int = 4096,
    steps: int = 40,
    batch_tokens: int = 64,
    lr: float = 1e-4,
    init: str = "least_squares",
    seed: int = 0,
    progress: bool = True,
) -> TunedLens:
    """Train a tuned lens on ``windows`` (token-id lists, e.g. from ``streaming.token_windows``).

    States of ``max_tokens`` random tokens are collected once; translators start from
    ``init`` ("least_squares" or "identity") and take ``steps`` Adam steps on
    ``sum_l KL(p_final || p_l)`` over ``batch_tokens`` tokens each (exact, full vocabulary).
    ``info`` records the tokens used, the steps and the KL before and after.
    """
    if init not in ("least_squares", "identity"):
        raise ValueError(f"init must be 'least_squares' or 'identity', got {init!r}.")
    torch.manual_seed(seed)
    states = collect_layer_states(handle, windows, max_tokens, seed=seed, progress=progress)
    n_tok, n_layers = states.shape[0], handle.n_layers
    if n_tok < 2 * handle.d_model:
        warnings.warn(
            f"the tuned lens sees only {n_tok} tokens for {handle.d_model}-dimensional translators; pass at least "
            f"{2 * handle.d_model} tokens of text for a least-squares start that generalises.",
            stacklevel=2,
        )
    # A fixed held-out slice of the collected tokens scores each stage of training.
    n_eval = min(256, n_tok // 5)
    perm = torch.randperm(n_tok, generator=torch.Generator().manual_seed(seed))
    evaluation, states = states[perm[:n_eval]], states[perm[n_eval:]]
    n_tok = states.shape[0]
    lens = TunedLens.identity(handle)
    kl_logit_lens = _mean_kl(handle, lens, evaluation)
    if init == "least_squares":
        _least_squares_init(states, lens)
    kl_init = _mean_kl(handle, lens, evaluation)
    trained = list(range(n_layers - 1))  # the last layer's lens is the model's output: identity
    weight = lens.weight[trained].clone().requires_grad_(True)
    bias = lens.bias[trained].clone().requires_grad_(True)
    opt = torch.optim.Adam([weight, bias], lr=lr)
    for p in handle.hf_model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    history = []
    bar = tqdm(range(steps), desc="tuned lens: KL steps", disable=not progress)
    for _ in bar:
        idx = torch.randint(0, n_tok, (min(batch_tokens, n_tok),), generator=gen)
        batch = states[idx].to(handle.device)  # (t, layer, d)
        with torch.no_grad():
            final = torch.log_softmax(lens_logits(handle, batch[:, -1]).float(), -1)
        h = batch[:, trained]  # (t, L-1, d)
        translated = h + torch.einsum("tld,led->tle", h, weight.to(h.device)) + bias.to(h.device)
        logq = torch.log_softmax(lens_logits(handle, translated).float(), -1)  # (t, L-1, V)
        kl = kl_from_logprobs(final[:, None], logq).mean(0)  # (L-1,)
        loss = kl.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(kl.detach().mean()))
        bar.set_postfix(mean_kl=f"{history[-1]:.3f}")
    with torch.no_grad():
        lens.weight[trained] = weight.detach().cpu()
        lens.bias[trained] = bias.detach().cpu()
    lens.info = {
        "tokens_collected": n_tok + n_eval,
        "skip_first_positions": 1,
        "tokens_train": n_tok,
        "tokens_eval": n_eval,
        "heldout_mean_kl_logit_lens": kl_logit_lens,
        "heldout_mean_kl_init": kl_init,
        "heldout_mean_kl_trained": _mean_kl(handle, lens, evaluation),
        "init": init,
        "steps": steps,
        "batch_tokens": batch_tokens,
        "kl_token_evaluations": steps * min(batch_tokens, n_tok),
        "lr": lr,
        "seed": seed,
        "mean_kl_first_step": history[0] if history else float("nan"),
        "mean_kl_last_step": history[-1] if history else float("nan"),
        "paper": "Belrose et al., Eliciting Latent Predictions from Transformers with the Tuned Lens (2023)",
    }
    return lens

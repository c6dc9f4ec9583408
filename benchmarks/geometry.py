"""What do the token-geometry analyses cost next to the forward passes that made the states?

Run from the repository root:

    .venv/bin/python benchmarks/geometry.py                       # 64 prompts x 512 tokens, SmolLM2
    .venv/bin/python benchmarks/geometry.py --prompts 8 --sweep-prompts 2   # smoke test

In one process, on ``--model`` (embedded, float32):

  capture     ``wb.capture(model, windows, ["resid_pre", "resid_post"], out=STORE)``: every prompt's
              residual stream at every depth streamed to a zarr store on disk (a saved run)
  forward     the same batches through the model alone (``hooks.forward`` without reads, no logits):
              the forward passes that produced the states, the baseline
  geometry    ``token_geometry(open_run(STORE))``: ID at every GRIDE scale up to ``--max-rank``,
              neighbourhood overlap at k = 1..32 and cosine statistics, every prompt and depth, read
              lazily from disk (no model); its peak RSS growth is measured apart, in a second call
  sweep       ``layer_intervention_sweep``: every layer deleted and every adjacent pair swapped on
              ``--sweep-prompts`` prompts of ``--sweep-tokens`` tokens: forward passes and time per
              intervention

Torch and NumPy's BLAS run with the same ``--threads``. Printed: machine, threads, per step the wall seconds and the share of the CPU other processes
used meanwhile. The last line is ``geometry/forward ratio: X`` (target <= 0.5).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

import workbench as wb
from capture_overhead import peak_rss_growth, timed  # shared helpers: wall seconds, others' CPU share, peak RSS
from workbench.analyses.layer_stages import layer_intervention_sweep
from workbench.analyses.token_geometry import token_geometry
from workbench.probes import hooks
from workbench.runs import open_run
from workbench.studies.geometry import bos_id, corpus_stream, prompt_windows, with_bos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--max-rank", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sweep-prompts", type=int, default=4)
    parser.add_argument("--sweep-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch and BLAS threads (both the same)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)  # NumPy's BLAS gets the same threads as torch: like with like
    model = wb.load_model(args.model)
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"with {torch.get_num_threads()} thread(s); model {model.name} ({model.source}; {model.dtype}), "
          f"{model.n_layers} layers, d_model {model.d_model}")
    bos = bos_id(model.tokenizer)
    windows = with_bos(prompt_windows(corpus_stream(model.tokenizer), args.prompts, args.tokens - (bos is not None)), bos)
    n_tokens = sum(map(len, windows))

    with tempfile.TemporaryDirectory() as tmp:  # the system temp folder: never inside the repository
        store = Path(tmp) / "states.zarr"
        seconds, others = timed(lambda: wb.capture(model, windows, ["resid_pre", "resid_post"], out=store,
                                                   batch_size=args.batch_size, progress=False))
        size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
        print(f"capture: {seconds:.1f} s for {args.prompts} prompts x {args.tokens} tokens = {n_tokens} tokens, "
              f"store {size / 2**30:.2f} GiB (others' CPU share {others:.0%})")

        def forward():
            for start in range(0, len(windows), args.batch_size):
                hooks.forward(model, torch.tensor(windows[start : start + args.batch_size]), logits=False)

        forward_s, others = timed(forward)
        print(f"forward: {forward_s:.1f} s, {n_tokens / forward_s:.0f} tokens/s (others' CPU share {others:.0%})")

        run = open_run(store)
        geometry_s, others = timed(lambda: token_geometry(run, max_rank=args.max_rank, progress=False))
        clouds = args.prompts * (model.n_layers + 1)
        print(f"geometry: {geometry_s:.1f} s for {clouds} clouds ({geometry_s / clouds * 1000:.1f} ms per prompt and "
              f"depth; others' CPU share {others:.0%})")
        peak = peak_rss_growth(lambda: token_geometry(open_run(store).isel(sample=slice(0, 8)), max_rank=args.max_rank,
                                                      progress=False))
        print(f"geometry peak RSS growth (8 prompts, read from disk): {peak / 2**20:.0f} MiB")

    ids = torch.tensor([w[: args.sweep_tokens] for w in windows[: args.sweep_prompts]])
    result = {}
    sweep_s, others = timed(lambda: result.setdefault("s", layer_intervention_sweep(model, ids, progress=False)))
    sweep = result["s"]
    print(f"sweep: {sweep.sizes['intervention']} interventions ({model.n_layers} deletions, {model.n_layers - 1} swaps) "
          f"on {args.sweep_prompts} x {args.sweep_tokens} tokens: {sweep.attrs['forward_passes']} forward passes, "
          f"{sweep_s:.1f} s, {sweep_s / sweep.sizes['intervention']:.2f} s per intervention (others' CPU share {others:.0%})")
    print(f"geometry/forward ratio: {geometry_s / forward_s:.2f}")


if __name__ == "__main__":
    main()

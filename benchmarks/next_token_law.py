"""PR of every layer (He & Su's law) streamed over 10k / 50k / 100k tokens vs plain forward passes.

Run from the repository root:

    .venv/bin/python benchmarks/next_token_law.py                    # 10k, 50k, 100k tokens of SmolLM2
    .venv/bin/python benchmarks/next_token_law.py --sizes 2000 4000  # smoke test

For each size, the same 512-token windows of the bundled pydoc corpus go through SmolLM2-135M
(float32, CPU, batches of 8):

  plain base      ``hf_model.base_model(input_ids, attention_mask, use_cache=False)`` on every batch:
                  the forward pass the streaming runs (no unembedding) -- the fair baseline
  plain forward   ``hf_model(...)``: the same with the unembedding (info)
  PR (law)        ``prediction_residuals(..., targets=("token_id",), heldout=0)``: all 30 layers'
                  normalised features streamed into float64 X^T X / X^T y, then the fits

Printed per size: wall seconds of each, the ratio PR/plain base (target <= 1.3; PR/plain
forward for information), and the peak RSS growth during the timed PR run (a
sampling thread; target: flat, 100k within 10% of 10k). Jobs run in shuffled order so
drift does not favour one method.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
import workbench as wb  # noqa: E402
from capture_overhead import PeakRSS, _fixed_mmap_threshold, timed  # noqa: E402  shared helpers
from workbench.analyses.linear_readout import UnstableFitWarning  # noqa: E402
from workbench.analyses.next_token_law import prediction_residuals  # noqa: E402
from workbench.corpus import load_corpus  # noqa: E402
from workbench.probes.streaming import token_windows  # noqa: E402


def plain_forward(model, windows, batch_size=8, base=False):
    pad = model.tokenizer.pad_token_id or 0
    order = sorted(windows, key=len, reverse=True)
    net = model.hf_model.base_model if base else model.hf_model
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = max(map(len, batch))
            ids = torch.tensor([w + [pad] * (width - len(w)) for w in batch])
            mask = torch.tensor([[1] * len(w) + [0] * (width - len(w)) for w in batch])
            net(input_ids=ids, attention_mask=mask, use_cache=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    global_libc = _fixed_mmap_threshold()  # noqa: F841  (keeps large buffers returnable, see peak_rss_growth)
    model = wb.load_model()
    texts = [doc["text"] for doc in load_corpus("pydoc")]
    windows = {n: token_windows(model, texts, 512, max_tokens=n) for n in args.sizes}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"model: {model.name} ({model.n_layers} layers, d_model {model.d_model})")

    def law(n):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnstableFitWarning)
            return prediction_residuals(model, texts, targets=("token_id",), heldout=0.0, window=512, max_tokens=n,
                                        progress=False)

    methods = ("plain", "base", "law")
    times = {n: {m: [] for m in methods} for n in args.sizes}
    peaks = {n: 0 for n in args.sizes}
    others = []
    rng = random.Random(0)
    plain_forward(model, windows[args.sizes[0]][:2])  # warm-up
    for _ in range(args.rounds):
        jobs = [(n, m) for n in args.sizes for m in methods]
        rng.shuffle(jobs)
        for n, method in jobs:
            fn = {"plain": lambda: plain_forward(model, windows[n]),
                  "base": lambda: plain_forward(model, windows[n], base=True),
                  "law": lambda: law(n)}[method]
            if method == "law":
                with PeakRSS() as mem:
                    wall, other = timed(fn)
                peaks[n] = max(peaks[n], mem.delta)
            else:
                wall, other = timed(fn)
            times[n][method].append(wall)
            others.append(other)
    print(f"other processes' CPU share during timings: median {statistics.median(others):.2f}, max {max(others):.2f}")
    print(f"{'tokens':>8} {'plain s':>8} {'PR s':>8} {'PR/plain':>9} {'base s':>8} {'PR/base':>8} {'peak RSS MiB':>13}")
    for n in args.sizes:
        tokens = sum(map(len, windows[n]))
        p, w = statistics.median(times[n]["plain"]), statistics.median(times[n]["law"])
        base = f"{statistics.median(times[n]['base']):>8.1f} {w / statistics.median(times[n]['base']):>8.3f}"
        print(f"{tokens:>8} {p:>8.1f} {w:>8.1f} {w / p:>9.3f} {base} {peaks[n] / 2**20:>13.0f}")
    first, last = args.sizes[0], args.sizes[-1]
    print(f"peak RSS {last} vs {first} tokens: {peaks[last] / peaks[first]:.3f}x")
    print(f"PR/plain base ratio ({last} tokens): {statistics.median(times[last]['law']) / statistics.median(times[last]['base']):.3f}")


if __name__ == "__main__":
    main()

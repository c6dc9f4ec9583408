"""Extreme-token metrics as on-the-fly reductions vs a plain forward pass, and their memory.

Run from the repository root:

    .venv/bin/python benchmarks/extreme_tokens.py                     # 64 x 512 tokens, 3 repeats
    .venv/bin/python benchmarks/extreme_tokens.py --samples 8 --repeats 1   # smoke test

On SmolLM2-135M (eager attention, float32), the same ``--samples`` texts of exactly
``--tokens`` tokens (real text, no padding) go through, round-robin, in batches of 8:

  plain forward   the forward pass capture runs, without the reductions: ``hf_model.base_model(
                  input_ids=batch, attention_mask=mask, use_cache=False)`` for every batch, under
                  ``torch.no_grad()`` (no unembedding: the reductions need no logits)
  reductions      ``wb.capture(texts, ["resid_norm", "attn_received", "value_norm"])``:
                  per-layer residual norms (residual peaks), attention received per key
                  (sink scores) and value norms (value drains), reduced inside the hooks

Printed: median wall seconds, the ratio (target <= 1.2), the peak RSS growth of each
(one more call, after the timings), the size of the reductions' result, and the size
the full attention patterns of the same inputs would take (what storing them costs).
The last line is ``reductions/plain ratio: X``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics

import torch

import workbench as wb
from capture_overhead import _fixed_mmap_threshold, make_inputs, peak_rss_growth, timed  # shared helpers

PROBES = ["resid_norm", "attn_received", "value_norm"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model = wb.load_model()
    ids, texts, dropped = make_inputs(model.tokenizer, args.samples, args.tokens)
    print(f"model: {model.name}; inputs: {args.samples} x {args.tokens} tokens of the bundled corpus "
          f"({dropped} windows dropped); batch {args.batch}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")

    def plain():
        with torch.no_grad():
            for start in range(0, len(ids), args.batch):
                batch = ids[start : start + args.batch]
                model.hf_model.base_model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)

    def reductions():
        return wb.capture(model, texts, PROBES, batch_size=args.batch, progress=False)

    run = reductions()  # warm-up, and a check that capture saw exactly these ids
    assert (run.token_id.values == ids.numpy()).all(), "capture tokenised the texts differently"
    plain()
    times = {"plain forward": [], "reductions (capture)": []}
    for r in range(args.repeats):
        report = []
        for name, fn in (("plain forward", plain), ("reductions (capture)", reductions)):
            elapsed, others = timed(fn)  # others: share of the CPUs other processes used meanwhile
            times[name].append(elapsed)
            report.append(f"{name} {elapsed:.2f} s (others used {others:.0%} of the CPUs)")
        print(f"  round {r + 1}/{args.repeats}: " + "; ".join(report))

    import capture_overhead

    capture_overhead._LIBC = _fixed_mmap_threshold()  # peak_rss_growth trims through it
    peaks = {"plain forward": peak_rss_growth(plain), "reductions (capture)": peak_rss_growth(reductions)}
    result_bytes = sum(v.nbytes for v in run.data_vars.values())
    n_layers, n_heads = model.n_layers, model.n_heads
    pattern_bytes = args.samples * n_layers * n_heads * args.tokens * args.tokens * 4
    print(f"\n{'method':24s} {'median s':>9s} {'x plain':>8s} {'peak RSS +MiB':>14s}")
    base = statistics.median(times["plain forward"])
    for name, values in times.items():
        print(f"{name:24s} {statistics.median(values):9.2f} {statistics.median(values) / base:8.3f} "
              f"{peaks[name] / 2**20:14.0f}")
    print(f"reduced results stored: {result_bytes / 2**20:.1f} MiB "
          f"(resid_norm {run.resid_norm.nbytes / 2**20:.1f}, attn_received {run.attn_received.nbytes / 2**20:.1f}, "
          f"value_norm {run.value_norm.nbytes / 2**20:.1f})")
    print(f"full attention patterns of the same inputs (float32): {pattern_bytes / 2**30:.1f} GiB "
          f"= {pattern_bytes / max(peaks['reductions (capture)'], 1):.0f}x the reductions' peak RSS growth")
    print(f"reductions/plain ratio: {statistics.median(times['reductions (capture)']) / base:.3f}")


if __name__ == "__main__":
    main()

"""What does finding under-trained tokens cost on a real model? (Land & Bartolo, "Fishing for Magikarp")

Run from the repository root:

    .venv/bin/python benchmarks/undertrained.py                   # SmolLM2, every 2% candidate
    .venv/bin/python benchmarks/undertrained.py --candidates 64   # smoke test

In one process, on ``--model`` (embedded, float32, eager attention):

  categories     ``token_categories(tokenizer)``: every token decoded and re-encoded (the tokenizer's
                 own batch encoder)
  indicators     ``weight_indicators(model, categories)``: the full-vocabulary pass over the
                 unembedding (first principal component, cosine and L2 distances)
  verification   ``verify_tokens(model, candidates, batch_size)``: three prompts per candidate, all
                 candidates of a prompt in batches of ``--batch-size`` (one forward pass each)
  one at a time  the same prompts for the first ``--baseline`` candidates with ``batch_size=1``, the
                 paper's way (one call per candidate and prompt), next to the batched run on the same
                 candidates: the ratio is measured side by side, same model, same prompts

Printed: machine, torch threads, per step the wall seconds and the share of the CPU other processes
used meanwhile (the machine may be shared), model calls and calls per candidate, the verdict counts,
the speed-up of batching. The last line is ``verification seconds per candidate: X``.
"""

from __future__ import annotations

import argparse
import os
import platform
from collections import Counter

import torch

import workbench as wb
from capture_overhead import timed  # shared helper: wall seconds and others' CPU share
from workbench.analyses.undertrained_tokens import candidates, token_categories, verify_tokens, weight_indicators


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--fraction", type=float, default=0.02, help="candidates: this share of round-tripping tokens")
    parser.add_argument("--candidates", type=int, default=None, help="verify only the first N candidates")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--baseline", type=int, default=24, help="candidates verified one at a time for the ratio")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = wb.load_model(args.model)
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"with {torch.get_num_threads()} thread(s); model {model.name} ({model.source}; 4-bit GGUF dequantised to float32)")

    results = {}
    seconds, others = timed(lambda: results.setdefault("categories", token_categories(model.tokenizer)))
    cats = results["categories"]
    print(f"categories: {seconds:.2f} s for {cats.sizes['token']} tokens (others' CPU share {others:.0%}); "
          + ", ".join(f"{c} {n}" for c, n in Counter(map(str, cats.category.values)).most_common()))
    seconds, others = timed(lambda: results.setdefault("indicators", weight_indicators(model, cats)))
    ind = results["indicators"]
    print(f"indicators: {seconds:.2f} s (others' CPU share {others:.0%}); primary {ind.attrs['primary']}, "
          f"reference: {ind.attrs['reference']} ({ind.attrs['n_reference']} rows)")
    cands = candidates(cats, ind[ind.attrs["primary"]], args.fraction)
    if args.candidates:
        cands = cands[: args.candidates]
    seconds, others = timed(lambda: results.setdefault("verified", verify_tokens(model, cands, batch_size=args.batch_size)))
    verified = results["verified"]
    calls = verified.attrs["forward_passes"]
    print(f"verification: {seconds:.1f} s for {len(cands)} candidates x {verified.sizes['prompt']} prompts, "
          f"{calls} model calls ({calls / len(cands):.3f} per candidate), batch {args.batch_size} "
          f"(others' CPU share {others:.0%})")
    print("verdicts: " + ", ".join(f"{v} {n}" for v, n in Counter(map(str, verified.verdict.values)).most_common()))
    per_candidate = seconds / len(cands)

    subset = cands[: args.baseline]
    batched_s, batched_others = timed(lambda: verify_tokens(model, subset, batch_size=args.batch_size))
    single_s, single_others = timed(lambda: verify_tokens(model, subset, batch_size=1))
    same = verify_tokens(model, subset[:4], batch_size=1).max_probability.values
    assert abs(same - verified.max_probability.values[:4]).max() < 1e-4, "batched and one-at-a-time verification differ"
    print(f"same {len(subset)} candidates: batched {batched_s:.2f} s (others {batched_others:.0%}), one at a time "
          f"{single_s:.2f} s (others {single_others:.0%}, {len(subset) * verified.sizes['prompt']} calls): "
          f"batching is {single_s / batched_s:.1f}x faster")
    print(f"verification seconds per candidate: {per_candidate:.4f}")


if __name__ == "__main__":
    main()

"""Does keeping large CPU buffers in the heap (``workbench/cpu_memory.py``) speed up a forward pass?

Run from the repository root:

    .venv/bin/python benchmarks/cpu_allocator.py                  # 8 x 512 tokens, 2 rounds
    .venv/bin/python benchmarks/cpu_allocator.py --tokens 64      # smoke test

The malloc setting is per process and cannot be undone once buffers live in the heap, so each
setting runs in its own process: rounds alternate a process with ``WORKBENCH_KEEP_CPU_BUFFERS=0``
(glibc's defaults) and one with ``WORKBENCH_KEEP_CPU_BUFFERS=1`` (the tuning), in that order and then the reverse. Each
process loads the embedded SmolLM2, makes the same inputs as ``capture_overhead.py`` and times
``--calls`` fair plain forward passes (``hf_model.base_model``, eager attention, no KV cache) after
a warm-up, and ``--calls`` captures of that benchmark's probes; printed per process: the minimum
seconds of each. The last line is ``default/tuned plain forward time ratio: X`` (the minima over
all processes of each setting).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def child(batch: int, tokens: int, calls: int) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch

    import workbench as wb
    from capture_overhead import make_inputs, reference_and_capture
    from workbench.cpu_memory import keep_large_buffers

    model = wb.load_model()
    ids, texts, _ = make_inputs(model.tokenizer, batch, tokens)
    plain, capture = reference_and_capture(model, ids, texts, batch)
    plain(), capture()
    out = {"tuned": keep_large_buffers(), "threads": torch.get_num_threads(), "plain": [], "capture": []}
    for _ in range(calls):
        for name, fn in (("plain", plain), ("capture", capture)):
            start = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - start)
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--calls", type=int, default=3, help="timed calls of each method per process")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of processes (default, tuned) per run")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.batch, args.tokens, args.calls)
    best: dict[str, dict[str, float]] = {}
    for round_ in range(args.rounds):
        settings = ["default", "tuned"] if round_ % 2 == 0 else ["tuned", "default"]
        for setting in settings:
            env = dict(os.environ, WORKBENCH_KEEP_CPU_BUFFERS="0" if setting == "default" else "1")
            done = subprocess.run([sys.executable, __file__, "--child", "--batch", str(args.batch), "--tokens",
                                   str(args.tokens), "--calls", str(args.calls)], env=env, check=True,
                                  capture_output=True, text=True)
            got = json.loads(done.stdout.strip().splitlines()[-1])
            assert got["tuned"] == (setting == "tuned"), f"the {setting} process reports tuned={got['tuned']}"
            print(f"round {round_ + 1} {setting:>7} ({got['threads']} threads): plain "
                  + " ".join(f"{t:.2f}" for t in got["plain"]) + " s, capture "
                  + " ".join(f"{t:.2f}" for t in got["capture"]) + " s", flush=True)
            for name in ("plain", "capture"):
                best.setdefault(setting, {})[name] = min(best.get(setting, {}).get(name, float("inf")), *got[name])
    for setting, b in best.items():
        print(f"{setting}: min plain {b['plain']:.2f} s, min capture {b['capture']:.2f} s, "
              f"capture/plain {b['capture'] / b['plain']:.3f}")
    print(f"default/tuned capture time ratio: {best['default']['capture'] / best['tuned']['capture']:.2f}")
    print(f"default/tuned plain forward time ratio: {best['default']['plain'] / best['tuned']['plain']:.2f}")


if __name__ == "__main__":
    main()

"""Streaming capture to disk: is memory bounded, and does it keep up with the in-memory capture?

Run from the repository root:

    .venv/bin/python benchmarks/streaming.py                       # 10k, 100k, 300k tokens (~18 min on 2 cores)
    .venv/bin/python benchmarks/streaming.py --sizes 2000,6000     # smoke test

SmolLM2-135M (``wb.load_model()``, float32 weights dequantised from the Q4_1 GGUF), probes
``resid_post`` (stored as float16) + ``attn_received`` + ``value_norm``, texts of 512 tokens cut
from the bundled corpus (repeated as often as the size needs), ``batch_size`` 8. Each size runs in
a fresh subprocess (so each peak RSS is its own):

  streamed   ``wb.capture(..., residual_dtype="float16", out=tmp/run.zarr)`` at every size
  in memory  ``wb.capture(..., residual_dtype="float16")`` at the smallest size only (the same
             batches; the larger sizes would not fit: 300k tokens of float32 residuals are 21 GB)

At the smallest size the two modes run ``--repeats`` times each, alternating (in memory, streamed,
in memory, ...), so that drift in this machine's speed falls on both alike; the ratio is of the
median tokens/s (the ratio of the fastest runs is printed beside it).

Printed per run: tokens, wall seconds, tokens/s, peak RSS (``ru_maxrss`` of the subprocess), store
size on disk, and the share of the CPUs other processes used meanwhile. Then: the largest streamed
peak RSS over the smallest (target <= 1.10), and the last line ``streaming/in-memory throughput
ratio: X`` (streamed tokens/s at the smallest size over in-memory tokens/s at the same size;
target >= 0.90).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, os, resource, shutil, sys, time, warnings
warnings.filterwarnings("ignore")
import torch
import workbench as wb
from workbench.corpus import load_corpus
mode, n_tokens, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3]
model = wb.load_model()
ids = model.tokenizer("\n\n".join(d["text"] for d in load_corpus("pydoc")), add_special_tokens=False)["input_ids"]
texts, i = [], 0
while len(texts) * 511 < n_tokens:  # 511 corpus tokens + BOS = 512 per text
    window = ids[(i * 511) % (len(ids) - 511):][:511]
    texts.append(model.tokenizer.decode(window))
    i += 1
probes = ["resid_post", "attn_received", "value_norm"]
out = os.path.join(folder, "run.zarr") if mode == "streamed" else None
t0 = time.perf_counter()
run = wb.capture(model, texts, probes, batch_size=8, residual_dtype="float16", out=out, progress=False,
                 truncate=True, max_tokens=512)
wall = time.perf_counter() - t0
tokens = int(run.n_tokens.sum())
size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs) if out else 0
print(json.dumps({"mode": mode, "tokens": tokens, "wall": wall, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "disk": size, "threads": torch.get_num_threads()}))
"""


def cpu_busy() -> int:
    with open("/proc/stat") as fh:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fh.readline().split()[1:9])
    return user + nice + system + irq + softirq + steal


def child(mode: str, n_tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:  # the system temp folder: never inside the repository
        busy0, t0 = cpu_busy(), time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(n_tokens), folder], capture_output=True,
                              text=True)
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        # CPU time of the whole machine minus this child's, over the child's wall time
        ticks = os.sysconf("SC_CLK_TCK")
        child_cpu = sum(os.times()[2:4])
        result["others"] = max(0.0, (cpu_busy() - busy0) / ticks - (child_cpu - child.cpu)) / (elapsed * os.cpu_count())
        child.cpu = child_cpu
        return result


child.cpu = 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,300000", help="token counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each mode at the smallest size")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print("model: smollm2-135m (Q4_1 GGUF dequantised to float32), probes resid_post (float16), attn_received, "
          "value_norm; batches of 8 x 512 tokens\n")
    rows = [child(mode, sizes[0]) for _ in range(args.repeats) for mode in ("in-memory", "streamed")]
    rows += [child("streamed", n) for n in sizes[1:]]
    print(f"{'mode':<10} {'tokens':>8} {'wall s':>8} {'tok/s':>7} {'peak RSS MiB':>13} {'disk MiB':>9} "
          f"{'threads':>7} {'others CPU':>10}")
    for r in rows:
        print(f"{r['mode']:<10} {r['tokens']:>8} {r['wall']:8.1f} {r['tokens'] / r['wall']:7.0f} "
              f"{r['rss'] / 2**20:13.0f} {r['disk'] / 2**20:9.0f} {r['threads']:>7} {r['others']:10.0%}")
    def rates(mode: str) -> list[float]:
        return [r["tokens"] / r["wall"] for r in rows if r["mode"] == mode and r["tokens"] == rows[0]["tokens"]]

    smallest = [r for r in rows if r["mode"] == "streamed" and r["tokens"] == rows[0]["tokens"]]
    largest = [r for r in rows if r["mode"] == "streamed"][-1]
    print(f"\npeak RSS, largest streamed over smallest streamed: {largest['rss'] / statistics.median(r['rss'] for r in smallest):.3f}")
    streamed, memory = rates("streamed"), rates("in-memory")
    print(f"fastest runs: streaming/in-memory throughput ratio {max(streamed) / max(memory):.3f}")
    print(f"streaming/in-memory throughput ratio: {statistics.median(streamed) / statistics.median(memory):.3f}")


if __name__ == "__main__":
    main()

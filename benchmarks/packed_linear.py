"""Packed oneDNN linear layers vs dense ``F.linear``: the same products, on SmolLM2-135M's own weights.

Run from the repository root:

    .venv/bin/python benchmarks/packed_linear.py                # rows 1, 13, 32, 128, 512; 8 rounds
    .venv/bin/python benchmarks/packed_linear.py --rounds 2     # smoke test

For each number of rows, every one of the model's ``nn.Linear`` layers (211: 7 per block and the
tied unembedding) multiplies a random input of that many rows, once dense (``F.linear`` on the
weights as stored) and once packed (:mod:`workbench.probes.packed_linear`: weights reordered
once, ``_linear_pointwise`` per call); the two alternate, ``--rounds`` times, and the minima are
compared (contention only slows a call down). Printed: machine, torch threads, per row count the
minimum ms of both and their ratio, and the largest absolute difference of the outputs. Last line:
``dense/packed time ratio at 13 rows: X`` (13 rows: a sampled draw's typical call).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

import workbench as wb
from workbench.probes.packed_linear import _packed, applies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,13,32,128,512")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    handle = wb.load_model()
    if not applies(handle):
        raise SystemExit("packed linear layers do not apply here (needs CPU float32 and oneDNN).")
    layers = [(module.weight.detach(), module.bias, packed) for module, packed in _packed(handle)]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads; {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"model: {handle.name} ({handle.dtype}), {len(layers)} linear layers")
    print(f"{'rows':>5} {'dense ms':>9} {'packed ms':>10} {'dense/packed':>13} {'max |diff|':>11}")
    ratio13 = None
    with torch.no_grad():
        for rows in (int(r) for r in args.rows.split(",")):
            inputs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w, _, _ in layers}
            times = {"dense": [], "packed": []}
            for _ in range(args.rounds):
                for kind in ("dense", "packed"):
                    start = time.perf_counter()
                    for w, b, p in layers:
                        x = inputs[w.shape[1]]
                        if kind == "dense":
                            torch.nn.functional.linear(x, w, b)
                        else:
                            torch.ops.mkldnn._linear_pointwise(x, p, b, "none", [], "")
                    times[kind].append(time.perf_counter() - start)
            diff = max((torch.nn.functional.linear(inputs[w.shape[1]], w, b)
                        - torch.ops.mkldnn._linear_pointwise(inputs[w.shape[1]], p, b, "none", [], "")).abs().max().item()
                       for w, b, p in layers)
            dense, packed = min(times["dense"]) * 1000, min(times["packed"]) * 1000
            if rows == 13:
                ratio13 = dense / packed
            print(f"{rows:>5} {dense:>9.1f} {packed:>10.1f} {dense / packed:>13.2f} {diff:>11.1e}")
    if ratio13 is not None:
        print(f"dense/packed time ratio at 13 rows: {ratio13:.2f}")


if __name__ == "__main__":
    main()

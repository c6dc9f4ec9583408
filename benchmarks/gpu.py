"""What a capture costs on a GPU, next to the same forward pass, for real model shapes.

Run on a machine with CUDA, from the repository root (``benchmarks/gpu_check.sh`` runs it on a lent
GPU machine, after the CUDA tests):

    python benchmarks/gpu.py                 # ~2 min on an H100/H200
    python benchmarks/gpu.py --rounds 3      # quicker

The weights cannot travel to the GPU machine (64 MiB of files), so the models are random-init
with real shapes (``wb.load_model("random-<shape>")``: SmolLM2-135M's 30 x 576 layers, and
Llama-3.2-1B's 16 x 2048 layers with SmolLM2's 49,152-token vocabulary, 1.07 B parameters).
Random weights change no shape, so the costs measured are those of the real models.

Per model, dtype and probe set, on ``--batch`` x ``--tokens`` tokens of the bundled corpus, in
interleaved rounds after a warm-up (each round runs both methods, order alternating), each call
ended by ``torch.cuda.synchronize()``:

  plain     ``hf_model.base_model(input_ids, attention_mask, use_cache=False)`` under ``no_grad``:
            the forward pass capture runs (no unembedding: no probe here needs logits)
  capture   ``wb.capture(model, texts, probes, batch_size=batch)`` (torch backend), which also
            copies what it keeps to host memory and builds the run

Then throughput, the issue's target: tokens/s of ``--batches`` plain forwards (each batch's token
ids copied from host memory to the GPU) against one capture of the same token ids
(``batch_size=--batch``) with the reduced probes, bfloat16, for random-init Llama-3.2-1B and
Llama-3-8B shapes (7.4 B parameters with SmolLM2's vocabulary), and the peak GPU memory; a capture
from the texts (which also tokenises them) is timed alongside. ``--profile`` adds torch.profiler's
kernel tables of both and a cProfile of the capture.

Probe sets: ``full`` = all-layer ``resid_pre, resid_post`` + ``attn_received, value_norm`` (the CPU
benchmark's set: two d_model floats per token and layer go to the host), ``reduced`` =
``resid_norm, attn_received, value_norm`` (what the extreme-token studies need). Reported: minimum
and median seconds and their ratios; then the other backends on one configuration (info). Each
line names the GPU, torch and CUDA versions.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import workbench as wb
from capture_overhead import make_inputs

PROBE_SETS = {
    "full": ["resid_pre", "resid_post", "attn_received", "value_norm"],
    "reduced": ["resid_norm", "attn_received", "value_norm"],
}
CONFIGS = [  # (model, dtype, probe set)
    ("random-smollm2-135m", "float32", "full"),
    ("random-smollm2-135m", "float32", "reduced"),
    ("random-smollm2-135m", "bfloat16", "reduced"),
    ("random-llama-1b", "bfloat16", "full"),
    ("random-llama-1b", "bfloat16", "reduced"),
]


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    del out
    return elapsed


def compare(methods: dict, rounds: int) -> dict[str, list[float]]:
    for fn in methods.values():  # warm-up: kernels chosen, allocator grown
        fn()
    walls = {name: [] for name in methods}
    names = list(methods)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            walls[name].append(timed(methods[name]))
    return walls


def profile(plain, capture) -> None:
    """Where the time goes: the GPU kernels of a plain pass and of a capture side by side (torch.profiler,
    top 12 by own device time), then cProfile of one capture (top 20 functions by own host time)."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for label, fn in (("plain", plain), ("capture", capture)):
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            fn()
            torch.cuda.synchronize()
        events = prof.key_averages()
        key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
        print(f"\n--- {label}: GPU kernels by own device time")
        print(events.table(sort_by=key, row_limit=10, max_name_column_width=60))
        print(f"\n--- {label}: host time by operator and input shapes")
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=14,
                                                                max_name_column_width=30))
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    prof.enable()
    capture()
    torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(20)
    print("\n".join(line for line in buf.getvalue().splitlines()[3:] if line.strip()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per configuration (default 7)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--batches", type=int, default=8, help="batches in the throughput comparison (default 8)")
    parser.add_argument("--profile", action="store_true", help="also kernel and host profiles of the 1B shape")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA device; on the CPU run benchmarks/capture_overhead.py.")
    warnings.filterwarnings("ignore")
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}; {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"inputs: {args.batch} x {args.tokens} tokens of the bundled corpus; {args.rounds} rounds after a warm-up\n")
    print(f"{'model':<22} {'dtype':<9} {'probes':<8} {'plain min s':>11} {'capture min s':>13} {'min ratio':>9} "
          f"{'median ratio':>12}")
    loaded: dict[tuple[str, str], object] = {}
    for name, dtype, probe_set in CONFIGS:
        key = (name, dtype)
        if key not in loaded:
            loaded.clear()
            torch.cuda.empty_cache()
            loaded[key] = wb.load_model(name, device="cuda", dtype=dtype)
        model = loaded[key]
        ids, texts, _ = make_inputs(model.tokenizer, args.batch, args.tokens)
        ids = ids.cuda()
        mask = torch.ones_like(ids)
        probes = PROBE_SETS[probe_set]

        def plain():
            with torch.no_grad():
                return model.hf_model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)

        def capture():
            return wb.capture(model, texts, probes=probes, batch_size=args.batch, progress=False)

        walls = compare({"plain": plain, "capture": capture}, args.rounds)
        p, c = walls["plain"], walls["capture"]
        print(f"{name:<22} {dtype:<9} {probe_set:<8} {min(p):11.4f} {min(c):13.4f} {min(c) / min(p):9.2f} "
              f"{statistics.median(c) / statistics.median(p):12.2f}", flush=True)

    loaded.clear()
    print(f"\nthroughput over {args.batches} batches of {args.batch} x {args.tokens} tokens, bfloat16, probes "
          f"{','.join(PROBE_SETS['reduced'])} (target: capture >= 0.9x plain). Both start from the same token ids "
          "in host memory; capture from the texts (tokenising them too) for information:")
    for name in ("random-llama-1b", "random-llama-3-8b"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model = wb.load_model(name, device="cuda", dtype="bfloat16")
        ids, texts, _ = make_inputs(model.tokenizer, args.batch * args.batches, args.tokens)
        id_lists = ids.tolist()
        batches = [ids[i : i + args.batch] for i in range(0, len(ids), args.batch)]

        def plain_all():
            with torch.no_grad():
                for batch in batches:
                    batch = batch.to("cuda")
                    model.hf_model.base_model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)

        def capture_from(inputs):
            return lambda: wb.capture(model, inputs, probes=PROBE_SETS["reduced"], batch_size=args.batch,
                                      progress=False)

        walls = compare({"plain": plain_all, "ids": capture_from(id_lists), "texts": capture_from(texts)},
                        max(3, args.rounds // 2))
        tps = {k: ids.numel() / min(w) for k, w in walls.items()}
        print(f"  {name:<20} plain {tps['plain']:8.0f} tok/s, capture {tps['ids']:8.0f} tok/s from token ids, "
              f"{tps['texts']:8.0f} from texts: capture/plain throughput {tps['ids'] / tps['plain']:.2f} "
              f"(from texts {tps['texts'] / tps['plain']:.2f}); peak GPU memory "
              f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
        if args.profile and name == "random-llama-1b":
            one = {p: (lambda p=p: wb.capture(model, id_lists, probes=[p], batch_size=args.batch, progress=False))
                   for p in PROBE_SETS["reduced"]}
            walls = compare({"plain": plain_all, **one}, 3)
            print("  one probe at a time, capture/plain throughput: " + ", ".join(
                f"{p} {min(walls['plain']) / min(walls[p]):.2f}" for p in one))
            profile(plain_all, capture_from(id_lists))
        model = batches = None  # free the GPU memory before the next shape loads
    loaded.clear()

    model = wb.load_model("random-smollm2-135m", device="cuda")
    ids, texts, _ = make_inputs(model.tokenizer, args.batch, args.tokens)
    probes = PROBE_SETS["reduced"]
    methods = {backend: (lambda b=backend: wb.capture(model, texts, probes=probes, backend=b,
                                                       batch_size=args.batch, progress=False))
               for backend in ("torch", "nnsight", "transformer_lens")}
    walls = compare(methods, max(3, args.rounds // 2))
    base = min(walls["torch"])
    print("\nbackends (random-smollm2-135m, float32, reduced probes): min s (x torch) "
          + ", ".join(f"{b} {min(w):.4f} ({min(w) / base:.2f})" for b, w in walls.items()))


if __name__ == "__main__":
    main()

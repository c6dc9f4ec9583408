"""What do exact next-byte probabilities cost, next to a plain token-level forward pass?

Run from the repository root:

    .venv/bin/python benchmarks/byte_level.py                    # 2,000 bytes of the pydoc corpus
    .venv/bin/python benchmarks/byte_level.py --bytes 50         # smoke test

On SmolLM2-135M (``wb.load_model()``: eager attention, float32), over the same ``--bytes``
bytes of real text (the bundled pydoc corpus, all documents joined, from byte ``--offset``),
in one process:

  plain forward   ``hf_model(input_ids=<|endoftext|> encode(text))``: one pass over every token,
                  the token-level log-probability of the text (timed ``--repeats`` times, before
                  and after the others; median)
  exact stream    ``ByteLevelModel(model, prune, max_hypotheses).stream(text)``: the exact
                  next-byte distribution at every one of the ``--bytes`` cut points (timed once),
                  scoring tokenizations ahead of the walk (the text is known)
  exact, one call ``stream(text, lookahead=False)``: the same, one model call per step (the
  per step        incremental algorithm of next-byte sampling and single-cut queries); the
                  two must agree (printed: max |dP|, bits per byte, cuts where they differ)
  naive, cached   ``naive_next_byte_stream(model, text)``: the naive distribution at every one of
                  the ``--bytes`` cut points, reusing the KV cache of the tokens successive cuts
                  share (the fair baseline: the same question at every cut, asked as cheaply as
                  the model allows; timed once)
  naive, per call ``naive_next_byte_distribution(model, text[:i])`` at every ``--naive-every``-th
                  cut point (one forward pass over the encoded prefix each, no cache; info)
  token healing   ``token_healing_next_byte_distribution`` at the same cut points (two passes each)

Printed: the machine, torch threads, the text's bytes and tokens, then per method the wall
seconds, bytes per second, model calls and calls per byte (token positions per byte for the
exact stream), the ratio to the plain forward and the share of the CPU *other* processes used
meanwhile (the machine may be shared; contention only slows a method down). Then the bits per
byte of the exact model and of the token-level forward (the canonical tokenization only), the
posterior mass pruned, and the mean / max total variation between the exact and the naive and
token-healing distributions at the sampled cut points. The last line is
``exact/plain time ratio: X``. ``--exact-only`` times just the plain forward and the exact
stream and prints the stream's peak RSS growth (sampled every 5 ms) and, per tenth of the text, its
bytes/s, RSS and shared trunk: for long texts (``--bytes 20000``), where the one-call-per-step walk
would take hours. ``--window W`` prunes tokenizations that split from the most probable ones more than
``W`` bytes back (``ByteLevelModel(window=W)``), which bounds what a long text keeps in memory.
``--chain-bytes 0`` turns off the chains of canonical tokens scored ahead (to compare with them).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import threading
import time

import numpy as np
import torch

import workbench as wb
from capture_overhead import PeakRSS, _rss_bytes, timed  # shared helpers: wall seconds and others' CPU share; peak RSS
from workbench.analyses.byte_baselines import (
    naive_next_byte_distribution,
    naive_next_byte_stream,
    token_healing_next_byte_distribution,
    total_variation,
)
from workbench.analyses import byte_level
from workbench.analyses.byte_level import ByteLevelModel, start_context
from workbench.corpus import load_corpus
from workbench.probes.token_scoring import sequence_logprobs


def corpus_bytes(offset: int, n: int) -> bytes:
    """``n`` bytes of the pydoc corpus from byte ``offset``, ending on a UTF-8 character boundary."""
    data = "\n\n".join(d["text"] for d in load_corpus("pydoc")).encode("utf-8")
    if offset + n > len(data):
        raise SystemExit(f"the corpus has {len(data)} bytes; --offset {offset} + --bytes {n} is past its end.")
    chunk = data[offset : offset + n]
    while chunk:
        try:
            chunk.decode("utf-8")
            return chunk
        except UnicodeDecodeError:
            chunk = chunk[:-1]
    raise SystemExit("the chosen range holds no whole UTF-8 character.")


class Trace:
    """Where the walk is (bytes done, from the model's cursor: a diagnostic read of a private field), the RSS and
    the scorer's shared trunk, sampled every second by a thread; :meth:`report` prints them per tenth of the text."""

    def __init__(self, blm: ByteLevelModel):
        self.blm, self.samples = blm, []

    def __enter__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(1.0):
            cursor = self.blm._cursor
            self.samples.append((time.perf_counter() - self._start, 0 if cursor is None else len(cursor.prefix),
                                 _rss_bytes(), self.blm._scorer.trunk_length))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def report(self, n: int) -> None:
        print("along the text (sampled each second): bytes, bytes/s over that stretch, RSS at its end, shared trunk")
        last_t, last_b = 0.0, 0
        for k in range(1, 11):
            done = [s for s in self.samples if s[1] >= k * n // 10]
            if not done:
                break
            t, b, rss, trunk = done[0]
            print(f"  {last_b:>6}..{b:<6} {(b - last_b) / max(t - last_t, 1e-9):6.1f} B/s   RSS {rss / 2**20:6.0f} MiB   "
                  f"trunk {trunk} tokens")
            last_t, last_b = t, b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bytes", type=int, default=2000, help="bytes of text to walk (default 2000)")
    parser.add_argument("--offset", type=int, default=0, help="first byte of the corpus to use")
    parser.add_argument("--prune", type=float, default=1e-5, help="ByteLevelModel prune (posterior threshold)")
    parser.add_argument("--max-hypotheses", type=int, default=32, help="ByteLevelModel max_hypotheses (0: no cap)")
    parser.add_argument("--naive-every", type=int, default=20, help="time the naive/healing baselines every k-th byte")
    parser.add_argument("--repeats", type=int, default=3, help="plain forward repeats (median)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--model", default=None, help="model name for wb.load_model (default: the embedded SmolLM2-135M; "
                        "random-llama-1b on a GPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    parser.add_argument("--window", type=int, default=0, help="ByteLevelModel window in bytes (0: none, the default)")
    parser.add_argument("--chain-bytes", type=int, default=None,
                        help="how far past the cut a call scores the text's canonical tokens (byte_level._CHAIN_BYTES, "
                             "default 16; 0: no chains, one token of lookahead per call as before them)")
    parser.add_argument("--exact-only", action="store_true", help="time only the plain forward and the exact stream "
                        "(lookahead), with the stream's peak RSS growth: for long texts (--bytes 20000)")
    args = parser.parse_args()
    if args.bytes < 1 or args.naive_every < 1 or args.repeats < 1:
        raise SystemExit("--bytes, --naive-every and --repeats must be >= 1.")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.chain_bytes is not None:
        byte_level._CHAIN_BYTES = args.chain_bytes

    model = wb.load_model(args.model, device=args.device, dtype=args.dtype)
    text = corpus_bytes(args.offset, args.bytes)
    n = len(text)
    context = start_context(model)
    ids = context + model.tokenizer(text.decode("utf-8"), add_special_tokens=False)["input_ids"]
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"with {torch.get_num_threads()} threads; {time.strftime('%Y-%m-%d %H:%M')}")
    gpu = f", {torch.cuda.get_device_name(model.device)}" if model.device.type == "cuda" else ""
    print(f"model: {model.name} ({model.dtype}, {model.attn_implementation} attention, {model.device}{gpu}; "
          f"{model.source})")
    print(f"text: pydoc corpus bytes {args.offset}..{args.offset + n} ({n} bytes, {len(ids) - len(context)} tokens, "
          f"{n / (len(ids) - len(context)):.2f} bytes/token), starts {text[:60]!r}")
    print(f"exact: prune={args.prune:g}, max_hypotheses={args.max_hypotheses or None}, window={args.window or None}, "
          f"chains {byte_level._CHAIN_BYTES} bytes ahead, context={context}\n")

    def plain():
        return sequence_logprobs(model, ids)

    plain()  # warm-up
    plain_runs = [timed(plain) for _ in range(args.repeats)]

    blm = ByteLevelModel(model, prune=args.prune, max_hypotheses=args.max_hypotheses or None, window=args.window or None)
    holder = {}

    def exact():
        holder["ds"] = blm.stream(text, progress=True)
        return holder["ds"]

    with PeakRSS() as memory, Trace(blm) as trace:
        exact_time, exact_others = timed(exact)
    ds = holder["ds"]
    if args.exact_only:
        plain_runs += [timed(plain) for _ in range(args.repeats)]
        plain_time = statistics.median(t for t, _ in plain_runs)
        output = sum(v.nbytes for v in ds.data_vars.values())
        print(f"exact stream: {exact_time:.1f} s, {n / exact_time:.1f} bytes/s, {ds.attrs['calls_per_byte']:.3f} calls "
              f"and {ds.attrs['positions_per_byte']:.2f} token positions per byte, others' CPU {exact_others:.0%}")
        print(f"plain forward: {plain_time:.3f} s (median of {len(plain_runs)})")
        print(f"peak RSS growth during the exact stream: {memory.delta / 2**20:.0f} MiB (of which the returned "
              f"Dataset: {output / 2**20:.0f} MiB); RSS before it {memory.base / 2**20:.0f} MiB")
        trace.report(n)
        print(f"bits per byte: exact {-float(ds.logprob.sum()) / (n * math.log(2)):.4f}; pruned posterior: sum "
              f"{float(ds.pruned_fraction.sum()):.2e}, max at one cut {float(ds.pruned_fraction.max()):.2e}")
        print(f"exact/plain time ratio: {exact_time / plain_time:.1f}")
        return
    incremental = ByteLevelModel(model, prune=args.prune, max_hypotheses=args.max_hypotheses or None)
    inc_time, inc_others = timed(lambda: holder.update(inc=incremental.stream(text, progress=True, lookahead=False)))
    inc = holder["inc"]
    plain_runs += [timed(plain) for _ in range(args.repeats)]
    plain_time = statistics.median(t for t, _ in plain_runs)
    plain_others = statistics.median(o for _, o in plain_runs)

    stream_holder = {}
    cached_time, cached_others = timed(lambda: stream_holder.update(ds=naive_next_byte_stream(model, text)))
    naive_stream = stream_holder["ds"]
    cuts = list(range(0, n, args.naive_every))
    naive_dists, healed_dists = [], []
    naive_time, naive_others = timed(lambda: naive_dists.extend(naive_next_byte_distribution(model, text[:i])
                                                                 for i in cuts))
    healed_time, healed_others = timed(lambda: healed_dists.extend(token_healing_next_byte_distribution(model, text[:i])
                                                                    for i in cuts))

    token_bits = -float(plain().sum()) / (n * math.log(2))
    exact_bits = -float(ds.logprob.sum()) / (n * math.log(2))
    exact_at_cuts = ds.probability.isel(pos=cuts)
    tv_naive = np.array([total_variation(exact_at_cuts.isel(pos=k), d) for k, d in enumerate(naive_dists)])
    tv_healed = np.array([total_variation(exact_at_cuts.isel(pos=k), d) for k, d in enumerate(healed_dists)])

    rows = [
        ("plain forward", plain_time, 1, f"{(len(ids)) / n:.2f}", plain_others),
        ("exact stream (lookahead)", exact_time, ds.attrs["calls"], f"{ds.attrs['positions_per_byte']:.2f}",
         exact_others),
        ("exact, one call per step", inc_time, inc.attrs["calls"], f"{inc.attrs['positions_per_byte']:.2f}",
         inc_others),
        (f"naive, KV-cached, all {n} cuts", cached_time, n, f"{int(naive_stream.tokens_run.sum()) / n:.2f}",
         cached_others),
        (f"naive, {len(cuts)} cuts", naive_time, len(cuts), "-", naive_others),
        (f"naive, all {n} cuts (proj.)", naive_time * n / len(cuts), n, "-", naive_others),
        (f"token healing, {len(cuts)} cuts", healed_time, 2 * len(cuts), "-", healed_others),
    ]
    print(f"{'method':<30} {'wall s':>9} {'bytes/s':>9} {'calls':>7} {'calls/B':>8} {'pos/B':>6} {'x plain':>8} "
          f"{'others CPU':>10}")
    for name, seconds, calls, positions, others in rows:
        covered = n if "cuts" not in name or "all" in name else len(cuts)
        print(f"{name:<30} {seconds:9.2f} {covered / seconds:9.1f} {calls:7d} {calls / covered:8.3f} {positions:>6} "
              f"{seconds / plain_time:8.1f} {others:10.0%}")
    print()
    print(f"bits per byte: exact {exact_bits:.4f}, token-level (canonical tokenization only) {token_bits:.4f}")
    print(f"pruned posterior: sum {float(ds.pruned_fraction.sum()):.2e}, max at one cut "
          f"{float(ds.pruned_fraction.max()):.2e}; tokenizations followed: mean {float(ds.n_tokenizations.mean()):.1f}, "
          f"max {int(ds.n_tokenizations.max())}")
    print(f"TV(exact, naive) over {len(cuts)} cuts: mean {tv_naive.mean():.3f}, max {tv_naive.max():.3f}; "
          f"TV(exact, token healing): mean {tv_healed.mean():.4f}, max {tv_healed.max():.4f}")
    print(f"exact calls per byte: {ds.attrs['calls_per_byte']:.3f} (one call per step: {inc.attrs['calls_per_byte']:.3f})")
    inc_bits = -float(inc.logprob.sum()) / (n * math.log(2))
    print(f"lookahead vs one call per step: max |dP| {float(abs(ds.probability - inc.probability).max()):.1e}, "
          f"bits per byte {exact_bits:.7f} vs {inc_bits:.7f}, tokenizations followed differ at "
          f"{int((ds.n_tokenizations != inc.n_tokenizations).sum())} cuts")
    print(f"exact (one call per step)/plain time ratio: {inc_time / plain_time:.1f}")
    # both are distributions after text[:i] for i = 0..n-1, in order
    tv_cached = 0.5 * np.abs(ds.probability.values - naive_stream.probability.values).sum(-1)
    agree = max(float(0.5 * np.abs(naive_stream.probability.sel(cut=c).values - d.values).sum())
                for c, d in zip(cuts, naive_dists))
    print(f"naive KV-cached vs per call at the sampled cuts: max TV {agree:.1e}")
    print(f"TV(exact, naive) over all {n} cuts: mean {tv_cached.mean():.3f}")
    print(f"exact/naive KV-cached time ratio: {exact_time / cached_time:.1f}")
    print(f"exact/plain time ratio: {exact_time / plain_time:.1f}")


if __name__ == "__main__":
    main()

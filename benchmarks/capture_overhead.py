"""How much does ``wb.capture`` cost on top of a plain forward pass?

Run from the repository root:

    .venv/bin/python benchmarks/capture_overhead.py                 # 8 x 512 tokens, 5 repeats
    .venv/bin/python benchmarks/capture_overhead.py --repeats 1 --tokens 64   # smoke test

On the embedded SmolLM2-135M (``wb.load_model()``: eager attention, float32), with
identical inputs -- ``--batch`` sequences of exactly ``--tokens`` tokens of real text,
no padding -- it times, in one process and round-robin (one call of each method per
round, after one untimed warm-up round):

  plain (eager)      ``hf_model(input_ids=ids)`` under ``torch.no_grad()``: the reference
  plain (sdpa)       the same with sdpa attention (informational: probing attention needs eager)
  capture nnsight    ``wb.capture(..., probes=PROBES, backend="nnsight")``
  capture TL         ``wb.capture(..., backend="transformer_lens")``
  TL run_with_cache  ``bridge.run_with_cache(ids)`` (full cache, every hook)
  nnsight bare       ``NNsight(hf_model).trace(input_ids=ids)`` keeping each layer's input and
                     its attention probabilities summed over queries (informational extra:
                     the same with all four of capture's raw sites)

Capture takes texts, so the texts are decoded from ``--tokens``-long windows of the
tokenised corpus and kept only where re-encoding them gives back the same ids; the
script also checks that the ``token_id`` of the first capture equals the ids every
other method is fed. Reported: median seconds over ``--repeats``, the ratio to the
eager plain forward, and the peak RSS growth during the call (sampled every 5 ms).
The last line printed is ``capture/plain ratio: X`` (median capture nnsight /
median plain eager). ``--profile`` adds a per-stage timing and a cProfile of one
nnsight capture, printed before that line.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import platform
import pstats
import statistics
import threading
import time
import warnings

import torch

import workbench as wb

PROBES = ["resid_pre", "resid_post", "attn_received", "value_norm"]


# --------------------------------------------------------------------------- inputs


def corpus_text() -> tuple[str, str]:
    """All of the bundled corpus as one string, and where it came from."""
    try:
        from workbench.corpus import load_corpus

        docs = load_corpus("pydoc")
        return "\n\n".join(d["text"] for d in docs), "workbench.corpus.load_corpus('pydoc')"
    except ImportError:
        import pydoc_data.topics

        topics = pydoc_data.topics.topics
        return "\n\n".join(topics[k] for k in sorted(topics)), "pydoc_data.topics"


def make_inputs(tokenizer, batch: int, tokens: int) -> tuple[torch.Tensor, list[str], int]:
    """``batch`` texts that tokenise to exactly ``tokens`` ids each, and those ids (batch, tokens)."""
    text, _ = corpus_text()
    all_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rows, texts, dropped = [], [], 0
    for start in range(0, len(all_ids) - tokens + 1, tokens):
        window = all_ids[start : start + tokens]
        decoded = tokenizer.decode(window, clean_up_tokenization_spaces=False)
        if not decoded.strip() or tokenizer(decoded, add_special_tokens=True)["input_ids"] != window:
            dropped += 1
            continue
        rows.append(window)
        texts.append(decoded)
        if len(rows) == batch:
            return torch.tensor(rows, dtype=torch.long), texts, dropped
    raise SystemExit(f"corpus gave only {len(rows)} round-tripping windows of {tokens} tokens; need {batch}.")


# --------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident-set growth while the block runs, sampled by a thread every 5 ms."""

    def __enter__(self):
        self.base = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        self.delta = self.peak - self.base


# --------------------------------------------------------------------------- methods


def build_methods(model, ids: torch.Tensor, texts: list[str], batch: int):
    hf = model.hf_model
    n_layers = model.n_layers
    b, p = ids.shape

    def plain_eager():
        with torch.no_grad():
            return hf(input_ids=ids)

    def plain_sdpa():
        hf.set_attn_implementation("sdpa")
        try:
            with torch.no_grad():
                return hf(input_ids=ids)
        finally:
            hf.set_attn_implementation("eager")

    def capture_nnsight():
        return wb.capture(model, texts, probes=PROBES, backend="nnsight", batch_size=batch, progress=False)

    def capture_tl():
        return wb.capture(model, texts, probes=PROBES, backend="transformer_lens", batch_size=batch, progress=False)

    bridge = model.transformer_bridge()  # built (deep copy + boot) once, outside the timings

    def tl_run_with_cache():
        with torch.no_grad():
            return bridge.run_with_cache(ids)

    from nnsight import NNsight

    traced = NNsight(hf)  # instrumenting the modules happens once, here

    def nnsight_bare():
        resid, received = [], []  # created outside the trace: the body runs on real tensors
        with torch.no_grad(), traced.trace(input_ids=ids):
            for layer in traced.model.layers:  # read in module execution order
                resid.append(layer.input)
                received.append(layer.self_attn.output[1].sum(dim=2))
        return resid, received

    def nnsight_bare_4():
        resid, values, received, post = [], [], [], []
        with torch.no_grad(), traced.trace(input_ids=ids):
            for layer in traced.model.layers:
                resid.append(layer.input)
                values.append(layer.self_attn.v_proj.output)
                received.append(layer.self_attn.output[1].sum(dim=2))
                post.append(layer.output[0] if isinstance(layer.output, tuple) else layer.output)
        assert len(post) == n_layers
        return resid, values, received, post

    return {
        "plain HF forward (eager)": plain_eager,
        "plain HF forward (sdpa, info)": plain_sdpa,
        "wb.capture nnsight": capture_nnsight,
        "wb.capture transformer_lens": capture_tl,
        "TL bridge.run_with_cache": tl_run_with_cache,
        "nnsight bare trace": nnsight_bare,
        "nnsight bare, 4 sites (info)": nnsight_bare_4,
    }


def timed(fn):
    gc.collect()
    with PeakRSS() as mem:
        start = time.perf_counter()
        out = fn()
        elapsed = time.perf_counter() - start
    del out
    gc.collect()
    return elapsed, mem.delta


# --------------------------------------------------------------------------- profiling


def profile_capture(model, texts, batch):
    """Time capture's stages by hand, then cProfile one whole capture."""
    import importlib

    cap = importlib.import_module("workbench.capture")  # the module; wb.capture is the function
    from workbench.probes import BatchCollector, BatchContext, resolve_probes, run_batch, w_o_gram_getter

    probe_list = resolve_probes(PROBES)
    stages: dict[str, float] = {}

    def stage(name, fn):
        gc.collect()
        t = time.perf_counter()
        out = fn()
        stages[name] = time.perf_counter() - t
        return out

    encoded = stage("tokenise (_encode, offsets)", lambda: [cap._encode(model.tokenizer, t, True) for t in texts])
    variable_dims = {v.name: v.dims for pr in probe_list for v in pr.variables}
    ids = torch.tensor([e[0] for e in encoded])
    valid = torch.ones_like(ids, dtype=torch.bool)
    ctx = BatchContext(input_ids=ids, valid=valid, w_o_gram=w_o_gram_getter(model), n_heads=model.n_heads, top_k=5)
    collector = BatchCollector(model, probe_list, ctx)
    stage("forward + reductions (run_batch)", lambda: run_batch("nnsight", model, ids, valid.long(), collector.sites, collector))
    # the same forward with a collector that keeps nothing: what the reductions cost
    noop = lambda site, layer, tensor: None  # noqa: E731
    stage("  forward alone (run_batch, no-op on_site)", lambda: run_batch("nnsight", model, ids, valid.long(), collector.sites, noop))
    values = stage("stack layers (collector.stacked)", lambda: collector.stacked(variable_dims, model.n_layers))
    lengths = [len(e[0]) for e in encoded]
    per_sample = stage(
        "per-sample trim (_trim)",
        lambda: [{n: cap._trim(v[r], variable_dims[n][1:], lengths[r]) for n, v in values.items()} for r in range(len(texts))],
    )
    ds = stage("assemble xarray (_assemble)", lambda: cap._assemble(model, texts, encoded, per_sample, variable_dims, 5))
    stage("validate_run", lambda: wb.validate_run(ds))
    del ds, per_sample, values
    gc.collect()

    print("\nprofile: capture stages (one nnsight capture, by hand)")
    for name, sec in stages.items():
        print(f"  {name:<44} {sec:8.3f} s")
    # the reductions alone, on a site-shaped tensor
    b, p = ids.shape
    weights = torch.softmax(torch.randn(b, model.n_heads, p, p), dim=-1)
    values_t = torch.randn(b, p, model.n_kv_heads, model.head_dim)
    gram = w_o_gram_getter(model)(0)
    from workbench.probes.catalog import attention_received, value_norms

    t = time.perf_counter()
    for _ in range(model.n_layers):
        attention_received(weights, valid)
    t_recv = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(model.n_layers):
        value_norms(values_t, gram, model.n_heads)
    t_vn = time.perf_counter() - t
    print(f"  {'  attention_received x n_layers (isolated)':<44} {t_recv:8.3f} s")
    print(f"  {'  value_norms x n_layers (isolated)':<44} {t_vn:8.3f} s")

    prof = cProfile.Profile()
    prof.enable()
    wb.capture(model, texts, probes=PROBES, backend="nnsight", batch_size=batch, progress=False)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
    print("\nprofile: cProfile of one nnsight capture, top 25 by own time")
    print("\n".join(line for line in buf.getvalue().splitlines() if line.strip()))


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported; default 5)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per forward (default 8)")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--profile", action="store_true", help="also break one nnsight capture down by stage")
    args = parser.parse_args()

    warnings.filterwarnings("ignore")
    model = wb.load_model()
    ids, texts, dropped = make_inputs(model.tokenizer, args.batch, args.tokens)
    _, source = corpus_text()
    print(f"model: {model.name} ({model.n_layers} layers, d_model {model.d_model}, {model.attn_implementation}, {model.dtype})")
    print(f"inputs: {args.batch} x {args.tokens} tokens from {source} ({dropped} windows dropped: no round trip)")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, python {platform.python_version()}, "
        f"repeats {args.repeats} (round-robin, after 1 warm-up round), probes {','.join(PROBES)}"
    )

    methods = build_methods(model, ids, texts, args.batch)

    # warm-up round; check that capture saw exactly the ids every other method is fed
    ds = methods["wb.capture nnsight"]()
    seen = torch.from_numpy(ds["token_id"].values)
    if seen.shape != ids.shape or not torch.equal(seen, ids):
        raise SystemExit("capture tokenised the texts differently from the ids fed to the other methods")
    del ds
    for fn in methods.values():
        fn()
        gc.collect()

    times: dict[str, list[float]] = {name: [] for name in methods}
    mems: dict[str, list[int]] = {name: [] for name in methods}
    for r in range(args.repeats):
        for name, fn in methods.items():
            sec, mem = timed(fn)
            times[name].append(sec)
            mems[name].append(mem)
        print(f"  round {r + 1}/{args.repeats}: " + ", ".join(f"{t[-1]:.2f}" for t in times.values()), flush=True)

    if args.profile:
        profile_capture(model, texts, args.batch)

    ref = statistics.median(times["plain HF forward (eager)"])
    print()
    print(f"{'method':<32} {'median s':>9} {'min s':>8} {'max s':>8} {'x plain':>8} {'peak RSS +MiB':>14}")
    for name in methods:
        med = statistics.median(times[name])
        print(
            f"{name:<32} {med:9.3f} {min(times[name]):8.3f} {max(times[name]):8.3f} "
            f"{med / ref:8.3f} {max(mems[name]) / 2**20:14.0f}"
        )
    ratio = statistics.median(times["wb.capture nnsight"]) / ref
    print(f"capture/plain ratio: {ratio:.3f}")


if __name__ == "__main__":
    main()

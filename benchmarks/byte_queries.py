"""Exact byte-level queries whose text is not known ahead: sampling and single cuts, now against the issue's code.

Run from the repository root (needs the git history, for the baseline's code):

    .venv/bin/python benchmarks/byte_queries.py                  # ~6 min on 2 cores
    .venv/bin/python benchmarks/byte_queries.py --quick          # smoke test

The same work on SmolLM2-135M (``wb.load_model()``: float32 from the 4-bit GGUF, eager
attention), by two versions of ``workbench``, each task in a fresh process, the versions
alternating, ``--repeats`` rounds (medians):

  issue    the package at ``--baseline`` (default 07ae921, the code when the byte-level speed issue
           was filed), extracted with ``git archive`` into a temporary folder
  current  this checkout

Tasks (the prefix is walked before the clock starts, in both versions):

  sample     ``sample(prefix, n_bytes, seed)``: one draw (current: scored ahead along a draft of
             the most probable token)
  samples    eight draws, seeds ``seed..seed+7``: the issue's code calls ``sample`` eight times
             (each starts from the remembered prefix state); current: ``samples(prefix, 8, ...)``
             (the eight walks side by side, one model call per byte for all of them)
  cuts       the byte lens's pattern: ``next_byte_distribution``, ``covers`` and
             ``prefix_logprob`` at a sequence of cut points of one text (the slider moved back and
             forth); current: lookahead over the known bytes and states kept every 16 bytes

Every sampled byte string must be equal between the versions (the same distributions, seeded the
same way) and the distributions at the cuts must agree (max |dP| printed). Printed: machine, torch
threads, others' CPU share per run; per task and version the median seconds and model calls;
the ratios issue/current. ``--figure STEM`` writes the bar chart (STEM.png, STEM.svg). The last line is
``single-cut/sampling speed-up (worst task): X``.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("sample", "samples", "cuts")
PREFIX = "The history of the city begins"
N_SAMPLES = 8


def cut_points(n: int) -> list[int]:
    """Where the slider stops: the whole text, back, forward, back to the start, forward again."""
    return [n, n - 8, (3 * n) // 4, n // 2, n // 2 + 8, n // 4, n - 1]


def worker(task: str, args) -> dict:
    """Run one task in this process (the package on sys.path is the version under test)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import workbench as wb
    from capture_overhead import timed
    from workbench.analyses.byte_level import ByteLevelModel

    current = hasattr(ByteLevelModel, "samples")
    model = wb.load_model()
    warm = ByteLevelModel(model)
    warm.sample("Warm", n_bytes=4)
    blm = ByteLevelModel(model)
    out: dict = {"package": str(Path(wb.__file__).parent), "threads": torch.get_num_threads()}
    if task in ("sample", "samples"):
        blm.sample(PREFIX, n_bytes=0)  # the prefix walked, and remembered, before the clock starts
        calls = blm.calls
        if task == "sample":
            run = lambda: [blm.sample(PREFIX, n_bytes=args.bytes, seed=args.seed)]  # noqa: E731
        elif current:
            run = lambda: blm.samples(PREFIX, N_SAMPLES, n_bytes=args.bytes // 2, seed=args.seed)  # noqa: E731
        else:
            run = lambda: [blm.sample(PREFIX, n_bytes=args.bytes // 2, seed=args.seed + i)  # noqa: E731
                           for i in range(N_SAMPLES)]
        holder = {}
        seconds, others = timed(lambda: holder.update(drawn=run()))
        out.update(seconds=seconds, others=others, calls=blm.calls - calls,
                   drawn=[d.decode("latin-1") for d in holder["drawn"]])
    else:
        text = cut_text(args.cut_bytes)
        dists = []

        def sweep():
            for cut in cut_points(len(text)):
                dists.append(blm.next_byte_distribution(text[:cut]).values.tolist())
                blm.covers(text[:cut])
                blm.prefix_logprob(text[:cut])

        seconds, others = timed(sweep)
        out.update(seconds=seconds, others=others, calls=blm.calls, dists=dists)
    return out


def cut_text(n: int) -> bytes:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from byte_level import corpus_bytes

    return corpus_bytes(4000, n)


def run_version(version: str, package_root: Path, task: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(ROOT / "benchmarks" / "byte_queries.py"), "--worker", task, "--result", str(result),
               "--bytes", str(args.bytes), "--cut-bytes", str(args.cut_bytes), "--seed", str(args.seed),
               "--threads", str(args.threads)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package_root), str(ROOT / "benchmarks")])}
        done = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{version} {task} failed:\n{done.stderr[-3000:]}")
        out = json.loads(result.read_text())
    if Path(out["package"]).resolve() != (package_root / "workbench").resolve():
        raise SystemExit(f"{version} ran {out['package']}, not {package_root / 'workbench'}")
    return out


def figure(medians: dict, args, path: str) -> None:
    import plotly.graph_objects as go

    from workbench.plots.export import export_figure

    labels = {"sample": f"one draw, {args.bytes} B", "samples": f"{N_SAMPLES} draws x {args.bytes // 2} B",
              "cuts": f"{len(cut_points(args.cut_bytes))} cuts of {args.cut_bytes} B"}
    fig = go.Figure()
    for version, color in (("issue", "#999999"), ("current", "#0072B2")):
        values = [medians[version][t] for t in TASKS]
        fig.add_bar(name=f"{version} ({args.baseline})" if version == "issue" else version, x=[labels[t] for t in TASKS],
                    y=values, marker_color=color, text=[f"{v:.1f} s" for v in values], textposition="outside")
    fig.update_layout(title="Exact byte-level queries without a known text (SmolLM2-135M, CPU)",
                      yaxis_title="seconds (median)", barmode="group", width=720, height=420)
    for written in export_figure(fig, path, formats=("png", "svg"), columns="two"):
        print(f"figure: {written}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default="07ae921", help="commit of the issue's code (default 07ae921)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds, versions alternating (median)")
    parser.add_argument("--bytes", type=int, default=96, help="bytes per draw of 'sample' (half per draw of 'samples')")
    parser.add_argument("--cut-bytes", type=int, default=128, help="length of the text the cuts move over")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--figure", default=None, help="write the bar chart to FIGURE.png and FIGURE.svg")
    parser.add_argument("--quick", action="store_true", help="smoke test: 16 bytes, 32-byte text, one round")
    parser.add_argument("--worker", choices=TASKS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(args.worker, args)))
        return
    if args.quick:
        args.bytes, args.cut_bytes, args.repeats = 16, 32, 1
    if args.repeats < 1 or args.bytes < 2 or args.cut_bytes < 16:
        raise SystemExit("--repeats >= 1, --bytes >= 2 and --cut-bytes >= 16, please.")
    with tempfile.TemporaryDirectory() as old:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline, "workbench"], capture_output=True)
        if archive.returncode:
            raise SystemExit(f"git archive {args.baseline} failed (a clone with history is needed): "
                             f"{archive.stderr.decode()[-300:]}")
        subprocess.run(["tar", "-x", "-C", old], input=archive.stdout, check=True)
        roots = {"issue": Path(old), "current": ROOT}
        print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M')}")
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        print(f"current: {commit.stdout.strip()} (+ uncommitted changes, if any); issue: {args.baseline}")
        print(f"sample: {args.bytes} B after {PREFIX!r}; samples: {N_SAMPLES} x {args.bytes // 2} B; "
              f"cuts {cut_points(args.cut_bytes)} of {args.cut_bytes} pydoc bytes\n")
        runs: dict = {v: {t: [] for t in TASKS} for v in roots}
        for r in range(args.repeats):
            for task in TASKS:
                order = ("issue", "current") if r % 2 == 0 else ("current", "issue")
                for version in order:
                    out = run_version(version, roots[version], task, args)
                    runs[version][task].append(out)
                    print(f"round {r + 1} {task:<8} {version:<8} {out['seconds']:7.2f} s  {out['calls']:5d} calls  "
                          f"threads {out['threads']}  others' CPU {out['others']:.0%}", flush=True)
    medians = {v: {t: statistics.median(o["seconds"] for o in runs[v][t]) for t in TASKS} for v in roots}
    print()
    for task in ("sample", "samples"):
        same = all(o["drawn"] == runs["issue"][task][0]["drawn"] for v in roots for o in runs[v][task])
        print(f"{task}: sampled bytes equal across versions and rounds: {same}")
    import numpy as np

    d_issue = np.array(runs["issue"]["cuts"][0]["dists"])
    d_now = np.array(runs["current"]["cuts"][0]["dists"])
    print(f"cuts: max |dP| between the versions {np.abs(d_issue - d_now).max():.1e}")
    print(f"\n{'task':<10} {'issue s':>9} {'current s':>10} {'speed-up':>9}")
    ratios = {}
    for task in TASKS:
        ratios[task] = medians["issue"][task] / medians["current"][task]
        print(f"{task:<10} {medians['issue'][task]:9.2f} {medians['current'][task]:10.2f} {ratios[task]:9.2f}")
    if args.figure:
        figure(medians, args, args.figure)
    print(f"single-cut/sampling speed-up (worst task): {min(ratios.values()):.2f}")


if __name__ == "__main__":
    main()

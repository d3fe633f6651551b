"""``make bench``: hess_utils against PyHessian, hessian-eigenthings and curvlinops on the same work.

Every measurement runs in a fresh process (:mod:`benchmarks.worker`); systems alternate in a rotating
order, repeated ``--repeats`` times; the table shows medians. Time ratios are taken inside each process,
a plain gradient and a product alternating, so that load from other programs hits both alike.

Usage: ``python -m benchmarks.run [--quick] [--workloads gpt2-5m,pythia-70m] [--repeats N] ...``
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import systems as S  # noqa: E402
from benchmarks.results_md import replace_section  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
HVP_SYSTEMS = [S.GRADIENT, *S.PEERS, "ours-rebuilt", "ours-kept", "ours-kept-pair", "ours-fd", "ours-fd-fixed"]
SLQ_SYSTEMS = ["pyhessian", "eigenthings", "curvlinops", "eigenthings-fd", "ours-kept", "ours-kept-trimming",
               "ours-kept-full", "ours-kept-interleaved", "ours-kept-pair"]


def worker(task: str, system: str, workload: str, device: str, extra: list[str] = (), env: dict | None = None,
           timeout: float = 3600) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "worker.py"), task, "--system", system,
           "--workload", workload, "--device", device, *extra]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                **(env or {})}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[len("RESULT "):])
            out["wall_s"] = time.perf_counter() - t0
            return out
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    print(f"  !! {system} {task} failed: {' | '.join(tail)}", flush=True)
    return {"task": task, "system": system, "workload": workload, "error_text": "\n".join(tail)}


def rotate(items: list[str], r: int) -> list[str]:
    r %= len(items)
    return items[r:] + items[:r]


def rel_error(path: Path, ref: list[torch.Tensor]) -> float:
    got = torch.load(path)
    a = torch.cat([x.reshape(-1).double() for x in got])
    b = torch.cat([x.reshape(-1).double() for x in ref])
    return float((a - b).norm() / b.norm())


def block_errors(path: Path, ref: list[torch.Tensor]) -> float:
    """The largest relative error of one parameter block (LayerNorm blocks show curvlinops' offset)."""
    got = torch.load(path)
    worst = 0.0
    for x, r in zip(got, ref, strict=True):
        n = float(r.double().norm())
        if n > 0:
            worst = max(worst, float((x.double() - r.double()).norm()) / n)
    return worst


def med(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and np.isfinite(x)]
    return statistics.median(xs) if xs else float("nan")


def run_workload(workload: str, args, device: str, raw: list[dict]) -> list[dict]:
    work = RESULTS / "cache" / workload
    work.mkdir(parents=True, exist_ok=True)
    print(f"== {workload}: float64 reference product", flush=True)
    ref_path = work / "ref_float64.pt"
    if not ref_path.exists() or args.fresh_reference:
        raw.append(worker("ref", "ours-rebuilt", workload, device, ["--save", str(ref_path)]))
    ref = torch.load(ref_path)
    quick_pythia = workload == "pythia-70m"
    repeats = args.pythia_repeats if quick_pythia else args.repeats
    inner = args.pythia_inner if quick_pythia else args.inner
    systems = [s for s in HVP_SYSTEMS if s in args.systems]

    rows = {s: {"times": [], "grads": [], "ratios": [], "mem": None} for s in systems}
    for r in range(repeats):
        print(f"== {workload}: HVP timings, round {r + 1}/{repeats}", flush=True)
        for s in rotate(systems, r):
            save = ["--save", str(work / f"{s}.pt")] if r == 0 else []
            out = worker("time", s, workload, device, ["--inner", str(inner), *save])
            raw.append(out)
            if "ratio" in out:
                rows[s]["times"].append(out["hvp_s"])
                rows[s]["grads"].append(out["grad_s"])
                rows[s]["ratios"].append(out["ratio"])
                print(f"   {s:16s} hvp {out['hvp_s']:.3f} s  gradient {out['grad_s']:.3f} s  "
                      f"ratio {out['ratio']:.2f}", flush=True)
    print(f"== {workload}: peak memory", flush=True)
    mem_env = {} if device == "cuda" else {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    for s in systems:
        out = worker("mem", s, workload, device, env=mem_env)
        raw.append(out)
        rows[s]["mem"] = out.get("peak_bytes")
        rows[s]["mem_method"] = out.get("method")
        if rows[s]["mem"] is not None:
            print(f"   {s:16s} peak {rows[s]['mem'] / 2**20:.0f} MiB above the model", flush=True)

    slq_systems = [s for s in SLQ_SYSTEMS if s in args.systems]
    slq = {s: {} for s in dict.fromkeys(systems + slq_systems)}
    if workload in args.slq_workloads:
        for shape in args.slq:
            iters, probes = (int(x) for x in shape.split("x"))
            for r in range(args.slq_repeats):
                print(f"== {workload}: SLQ {iters} it. x {probes} probes, round {r + 1}/{args.slq_repeats}",
                      flush=True)
                for s in rotate(slq_systems, r):
                    out = worker("slq", s, workload, device, ["--iters", str(iters), "--probes", str(probes)])
                    raw.append(out)
                    if "slq_s" in out:
                        entry = slq[s].setdefault(shape, {"times": [], "top": []})
                        entry["times"].append(out["slq_s"])
                        entry["top"].append(out["top_ritz"])
                        print(f"   {s:16s} {out['slq_s']:.1f} s  top Ritz {out['top_ritz']:.8g}", flush=True)

    unit_time = med(rows[S.GRADIENT]["times"]) if S.GRADIENT in rows else float("nan")
    unit_mem = rows.get(S.GRADIENT, {}).get("mem")
    table = []
    for s in dict.fromkeys(systems + slq_systems):  # an SLQ-only system gets a row with its SLQ columns
        info = rows.get(s, {"times": [], "grads": [], "ratios": [], "mem": None})
        pred = work / f"{s}.pt"
        row = {
            "workload": workload,
            "system": S.SYSTEMS[s].name,
            "key": s,
            "hvp_s": med(info["times"]),
            "time_per_gradient": med(info["ratios"]),
            "peak_mib": (info["mem"] / 2**20) if info["mem"] is not None else float("nan"),
            "memory_per_gradient": (info["mem"] / unit_mem) if info["mem"] and unit_mem else float("nan"),
            "error_vs_float64": rel_error(pred, ref) if pred.exists() and s != S.GRADIENT else float("nan"),
            "worst_block_error": block_errors(pred, ref) if pred.exists() and s != S.GRADIENT else float("nan"),
            "gradient_s": unit_time,
            "repeats": len(info["ratios"]),
        }
        for shape in args.slq:
            entry = slq[s].get(shape)
            row[f"slq_{shape}_s"] = med(entry["times"]) if entry else float("nan")
            row[f"slq_{shape}_top_ritz"] = med(entry["top"]) if entry else float("nan")
        table.append(row)
    # Top Ritz value relative to PyHessian's, per SLQ shape.
    by_key = {r["key"]: r for r in table}
    for shape in args.slq:
        base = by_key.get("pyhessian", {}).get(f"slq_{shape}_top_ritz", float("nan"))
        base_t = by_key.get("pyhessian", {}).get(f"slq_{shape}_s", float("nan"))
        for r in table:
            top = r[f"slq_{shape}_top_ritz"]
            r[f"slq_{shape}_top_vs_pyhessian"] = abs(top - base) / abs(base) if np.isfinite(base) else float("nan")
            r[f"slq_{shape}_speedup_vs_pyhessian"] = base_t / r[f"slq_{shape}_s"]
    return table


def fmt(x: float, spec: str) -> str:
    return "-" if x is None or not np.isfinite(x) else format(x, spec)


def markdown(table: list[dict], args, machine: str) -> str:
    lines = []
    for workload in dict.fromkeys(r["workload"] for r in table):
        rows = [r for r in table if r["workload"] == workload]
        unit = rows[0]["gradient_s"]
        lines.append(f"### {workload} ({machine})\n")
        lines.append(f"Unit: one plain gradient ({fmt(unit, '.3f')} s median).\n")
        head = "| system | HVP time / gradient | HVP memory / gradient | HVP error vs float64 | worst block error |"
        sep = "|---|---|---|---|---|"
        for shape in args.slq:
            it, pr = shape.split("x")
            head += f" SLQ {it} it. x {pr} probe(s): time, top Ritz (rel. to PyHessian) |"
            sep += "---|"
        lines += [head, sep]
        for r in rows:
            line = (f"| {r['system']} | {fmt(r['time_per_gradient'], '.2f')} | {fmt(r['memory_per_gradient'], '.2f')} "
                    f"({fmt(r['peak_mib'], '.0f')} MiB) | {fmt(r['error_vs_float64'], '.1e')} | "
                    f"{fmt(r['worst_block_error'], '.1e')} |")
            for shape in args.slq:
                t = r[f"slq_{shape}_s"]
                if np.isfinite(t):
                    line += (f" {t:.1f} s ({fmt(r[f'slq_{shape}_speedup_vs_pyhessian'], '.2f')}x PyHessian), "
                             f"{r[f'slq_{shape}_top_ritz']:.7g} ({fmt(r[f'slq_{shape}_top_vs_pyhessian'], '.0e')}) |")
                else:
                    line += " - |"
            lines.append(line)
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: gpt2-5m, 1 round, short SLQ")
    ap.add_argument("--workloads", default="gpt2-5m,pythia-70m")
    ap.add_argument("--repeats", type=int, default=3, help="timing processes per system (gpt2-5m)")
    ap.add_argument("--inner", type=int, default=5, help="gradient/product pairs per timing process")
    ap.add_argument("--pythia-repeats", type=int, default=1)
    ap.add_argument("--pythia-inner", type=int, default=2)
    ap.add_argument("--slq", default="80x2,30x1", help="SLQ shapes ITERSxPROBES, comma separated")
    ap.add_argument("--slq-workloads", default="gpt2-5m")
    ap.add_argument("--slq-repeats", type=int, default=1)
    ap.add_argument("--systems", default=",".join(dict.fromkeys(HVP_SYSTEMS + SLQ_SYSTEMS)))
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--fresh-reference", action="store_true")
    ap.add_argument("--tag", default=None, help="file name stem under benchmarks/results/")
    args = ap.parse_args()
    if args.quick:
        args.workloads, args.repeats, args.inner, args.slq = "gpt2-5m", 1, 2, "10x2"
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.slq = [s for s in args.slq.split(",") if s]
    args.slq_workloads = args.slq_workloads.split(",")
    args.systems = [s for s in args.systems.split(",") if s]
    unknown = [s for s in args.systems if s not in S.SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; choose from {list(S.SYSTEMS)}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device

    from hess_utils.runs import provenance

    cpu = platform.processor() or platform.machine()
    machine = (f"{torch.cuda.get_device_name(0)}" if device == "cuda"
               else f"CPU {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, float32")
    t0 = time.perf_counter()
    raw: list[dict] = []
    table: list[dict] = []
    for workload in args.workloads:
        table += run_workload(workload, args, device, raw)
    elapsed = time.perf_counter() - t0
    md = markdown(table, args, machine)
    print("\n" + md)
    print(f"total {elapsed / 60:.1f} min")

    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = args.tag or time.strftime("bench-%Y%m%d-%H%M%S")
    prov = provenance(benchmark="benchmarks/run.py", arguments={k: v for k, v in vars(args).items()},
                      device=device, machine=machine, elapsed_s=elapsed,
                      memory_method=("torch.cuda.max_memory_allocated above the allocation before setup"
                                     if device == "cuda" else
                                     "peak RSS (VmHWM after clear_refs) above RSS before setup, "
                                     "MALLOC_MMAP_THRESHOLD_=65536"))
    with open(RESULTS / f"{stem}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0].keys()))
        writer.writeheader()
        writer.writerows(table)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"provenance": prov, "table": table, "raw": raw},
                                                      indent=1, default=str))
    header = (f"Latest `make bench` ({'quick smoke run' if args.quick else 'full run'}), "
              f"{prov['created']}, git {prov.get('git_commit')}, on {machine}. Memory: {prov['memory_method']}. "
              f"Raw data: `benchmarks/results/{stem}.json`. Total time {elapsed / 60:.1f} min.\n\n")
    replace_section("hvp-and-slq", header + md)
    print(f"saved benchmarks/results/{stem}.csv, .json and benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()

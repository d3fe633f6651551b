"""Top-k eigenpairs side by side: hess_utils ``eigsh``, scipy's ARPACK on ``to_scipy()``, PyHessian's power iteration.

    python -m benchmarks.eigs [--workload gpt2-5m] [--k 5] [--repeats 2] [--quick] [--threads 1]
                              [--target 1e-5] [--ours-tols 1e-4,1e-5] [--scipy-tols 1e-4,1e-5]
                              [--pyhessian 1e-3:100,1e-10:100] [--extras check,memory[,basis]]
                              [--memory-extra 3] [--memory-budget 60] [--resume STEM]

The defaults are the full run of ``benchmarks/RESULTS.md`` (about 35 min on one loaded core).

Every system gets the same model, batch and loss (``benchmarks/workloads.py``; ``--quick``: a smaller GPT-2,
vocab 2048, 2 layers, width 128, same 4 x 128 batch) and is asked for the ``k`` largest eigenpairs:

* ``ours``: ``eigsh(hessian_operator(model, [batch], method="rev-rev"), k, which="LA", tol)`` (kept graph,
  default basis ``max(2k + 1, 20)``, ARPACK's default ``ncv``; no multiplicity check, the default, as in ARPACK);
  once more each at ``tol=--target`` with ``check_multiplicity=True`` and with ARPACK's basis size
  (``num_extra = ncv - k``), as ``--extras`` says;
* ``scipy``: ``scipy.sparse.linalg.eigsh(op.to_scipy(), k, which="LA", tol, v0)`` on a fresh operator of the
  same kind, ``v0`` the Rademacher start ``eigsh`` uses, scipy's default ``ncv`` (``max(2k + 1, 20)``);
  ARPACK's ``tol`` bounds each Ritz estimate relative to its own Ritz value;
* ``pyhessian``: ``hessian(model, CrossEntropyLoss(), data=...).eigenvalues(top_n=k, maxIter, tol)``: power
  iteration with deflation; it stops a pair when the eigenvalue changes by less than ``tol`` (relative)
  between iterations, so a residual ``r`` needs ``tol`` about ``r^2 / gap``; a tolerance it cannot meet in
  float32 (``1e-10``) makes it run ``maxIter`` products per pair.

What is measured, per run, all in one process: first ``--repeats`` rounds of the main rows (the first
tolerance of ``ours`` and of ``scipy``), one after the other in an order that rotates between rounds, so that
other programs' load falls on both alike; then every other row once. Results are rewritten after every run,
so an interrupted run leaves the rows measured so far.

* **products**: calls of the operator's ``matvec`` (ours and scipy: a counting wrapper on the instance) or of
  ``pyhessian.utils.hessian_vector_product`` as PyHessian's module calls it (a counting wrapper patched
  in for the run); ours is cross-checked with ``EigshResult.num_products``;
* **time**: wall clock of setup (operator or ``hessian`` object, i.e. the kept first-order graph) plus the
  solve; the main rows' time ratio is to ``ours`` in the same round (median over rounds), the number to read
  on a shared machine; rows run once are divided by ours' median (less reliable: the load changes);
* **residuals**: afterwards, not counted, for every returned pair ``(theta, x)``: ``||H x - theta x|| /
  |lambda_max|`` with ``x`` normalised and ``H`` our exact rev-rev operator (one product each), and
  ``|lambda_max|`` the top eigenvalue of the reference run: the run of ``ours`` or ``scipy`` (both ``"LA"``)
  with the smallest worst residual; also each run's largest eigenvalue error against that run (sorted
  values; PyHessian's power iteration finds the largest *magnitudes*, which may include negative ones);
* **memory**: peak resident set above the resident set just before the run: ``VmHWM`` of
  ``/proc/self/status`` after writing ``5`` to ``/proc/self/clear_refs`` (which resets the peak). The process
  runs with ``MALLOC_MMAP_THRESHOLD_=4194304`` (it re-executes itself with it unless ``--default-malloc``):
  every tensor of 4 MiB or more (a Krylov basis, ARPACK's workspace, a 16 MiB logits tensor) is its own
  mapping, returned to the kernel on free, so the resident set follows them rather than glibc's cache
  (without a fixed threshold glibc raises it to 32 MiB after the first free and keeps freed vectors);
  smaller tensors stay on the heap, which may hold a few of them freed (so two runs' baselines differ by tens
  of MiB). ``benchmarks/worker.py`` uses 65536, which here made each product about 1.6x slower (a page fault
  per fresh activation); on the rows both measured (a first, interrupted run with 65536) they agreed within
  about 15%. ``tracemalloc`` does not see torch's allocations and torch has no CPU allocator statistics; a
  sampling thread would miss short peaks.
* **memory flatness**: ``ours`` with a small basis (``num_extra=--memory-extra``, so it restarts often) once
  to ``--target`` and once for a fixed budget of ``--memory-budget`` products (``tol`` near float32 rounding);
  a callback reads and resets the peak after every product, giving the peak per product; the table shows the
  run's peak and the largest per-product peaks over its first and last quarter of products (the same
  baseline, so they compare better than two runs, whose baselines differ by what the heap kept).

Results: ``benchmarks/results/eigs-<date>.csv`` (one row per run), ``.json`` (provenance, arguments, every run
with eigenvalues, residuals and the per-product memory trace) and ``.md`` (the table).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from benchmarks import workloads as W
from benchmarks.results_md import replace_section
from benchmarks.systems import ShiftedLogits, targets_of
from hess_utils import vectors as V
from hess_utils._io import write_json, write_text
from hess_utils.runs import provenance

RESULTS = Path(__file__).resolve().parent / "results"
MMAP_THRESHOLD = str(4 * 2**20)
MIB = 2.0**20


# ---------------------------------------------------------------------------------------------- memory
def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def rss_bytes() -> int:
    return 1024 * _status_kib("VmRSS")


def reset_peak() -> None:
    """Reset the kernel's peak resident set (``VmHWM``) to the current one."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_bytes() -> int:
    return 1024 * _status_kib("VmHWM")


class PeakTrace:
    """Peak resident set per product (a callback after each product reads the peak, then resets it)."""

    def __init__(self, baseline: int) -> None:
        self.baseline = baseline
        self.per_product: list[int] = []

    def __call__(self, *_: Any) -> None:
        self.per_product.append(peak_bytes() - self.baseline)
        reset_peak()


# ---------------------------------------------------------------------------------------------- counting
class Counted:
    """A callable wrapper that counts calls and sums their wall time."""

    def __init__(self, fn: Callable[..., Any], after: Callable[[Any, Any], None] | None = None) -> None:
        self.fn, self.after = fn, after
        self.calls, self.seconds, self.after_seconds = 0, 0.0, 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        if self.after is not None:
            t1 = time.perf_counter()
            self.after(args, out)
            self.after_seconds += time.perf_counter() - t1
        return out


# ---------------------------------------------------------------------------------------------- the workload
def quick_config():
    import transformers as tf

    cfg = tf.GPT2Config(vocab_size=2048, n_positions=W.SEQ_LEN, n_embd=128, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    return cfg


def build_workload(name: str, quick: bool) -> tuple[torch.nn.Module, dict[str, torch.Tensor], str]:
    """``(model, batch, label)``: the named workload, or with ``quick`` a smaller GPT-2 (same batch shape)."""
    if not quick:
        return W.build_model(name), W.build_batch(name), name
    import transformers as tf

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(quick_config(), attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, quick_config().vocab_size, (W.BATCH_SIZE, W.SEQ_LEN), generator=g)
    return model, {"input_ids": ids}, "gpt2-quick (vocab 2048, 2 layers, width 128)"


def _operator(model, batch):
    from hess_utils.operators.hessian import hessian_operator

    return hessian_operator(model, [batch], method="rev-rev")


# ---------------------------------------------------------------------------------------------- systems
@dataclass
class Outcome:
    values: list[float]
    vectors: list[list[torch.Tensor]]  # in the layout of our operator (its parameter order)
    products: int
    product_seconds: float
    info: dict[str, Any] = field(default_factory=dict)
    trace: list[int] | None = None


@dataclass
class Spec:
    key: str
    system: str  # "ours", "scipy", "pyhessian"
    label: str
    params: dict[str, Any]
    repeats: int
    memory_row: bool = False


def run_ours(model, batch, k: int, tol: float, num_extra: int | None = None, check_multiplicity: bool = False,
             max_products: int | None = None, trace: PeakTrace | None = None) -> Outcome:
    from hess_utils.algorithms.eigsh import eigsh

    op = _operator(model, batch)
    counter = Counted(op.matvec)
    op.matvec = counter  # instance attribute: eigsh's products go through it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        res = eigsh(op, k=k, which="LA", tol=tol, num_extra=num_extra, max_products=max_products,
                    check_multiplicity=check_multiplicity, progress=False, callback=trace)
    if counter.calls != res.num_products:
        raise AssertionError(f"counted {counter.calls} products, eigsh reports {res.num_products}")
    info = {"tol": tol, "basis_size": res.basis_size, "num_restarts": res.num_restarts,
            "num_multiplicity_checks": res.num_multiplicity_checks, "converged": res.converged.tolist(),
            "own_relative_residuals": res.relative_residuals.tolist(), "check_multiplicity": check_multiplicity,
            "max_products": max_products, "warnings": [str(w.message) for w in caught]}
    vectors = [list(x) for x in res.eigenvectors]
    op.clear_graphs()
    return Outcome(res.eigenvalues.tolist(), vectors, counter.calls, counter.seconds, info,
                   trace.per_product if trace is not None else None)


def run_scipy(model, batch, k: int, tol: float, ncv: int | None = None) -> Outcome:
    import scipy.sparse.linalg as sla

    op = _operator(model, batch)
    counter = Counted(op.matvec)
    op.matvec = counter  # to_scipy's matvec calls self.matvec
    A = op.to_scipy()
    v0 = V.flatten(op.random_vector("rademacher", 0)).numpy()  # the start eigsh uses
    values, vecs = sla.eigsh(A, k=k, which="LA", tol=tol, v0=v0, ncv=ncv)
    products, seconds = counter.calls, counter.seconds
    ref = op.zeros()
    vectors = [V.unflatten(torch.from_numpy(np.ascontiguousarray(vecs[:, i])), ref) for i in range(k)]
    used_ncv = ncv if ncv is not None else min(op.dim, max(2 * k + 1, 20))
    op.clear_graphs()
    return Outcome(values.tolist(), vectors, products, seconds, {"tol": tol, "ncv": used_ncv})


def run_pyhessian(model, batch, k: int, tol: float, max_iter: int, order: list[torch.Tensor],
                  seed: int = 0) -> Outcome:
    """PyHessian 0.1's ``eigenvalues(top_n=k)``; ``order`` is our operator's parameter list (for the layout)."""
    from pyhessian import hessian

    module = sys.modules["pyhessian.hessian"]  # where eigenvalues() looks the product up
    history: list[tuple[float, float]] = []

    def note(args, hv):  # Rayleigh quotient and residual of the iterate, from the product it just made
        v = args[2]
        vv = float(sum(torch.sum(x.double() * x.double()) for x in v))
        theta = float(sum(torch.sum(a.double() * x.double()) for a, x in zip(hv, v))) / vv
        res = math.sqrt(float(sum(torch.sum((a.double() - theta * x.double()) ** 2) for a, x in zip(hv, v))) / vv)
        history.append((theta, res))

    original = module.hessian_vector_product
    counter = Counted(original, note)
    module.hessian_vector_product = counter
    wrapper = ShiftedLogits(model)
    try:
        t0 = time.perf_counter()
        h = hessian(wrapper, torch.nn.CrossEntropyLoss(), data=(batch["input_ids"], targets_of(batch)), cuda=False)
        setup_s = time.perf_counter() - t0
        torch.manual_seed(seed)
        values, vecs = h.eigenvalues(maxIter=max_iter, tol=tol, top_n=k)
    finally:
        module.hessian_vector_product = original
    index = {id(p): i for i, p in enumerate(h.params)}
    if len(index) != len(order) or any(id(p) not in index for p in order):
        raise AssertionError("PyHessian's parameters differ from the operator's")
    vectors = [[vec[index[id(p)]].detach() for p in order] for vec in vecs]
    del h
    for p in model.parameters():
        p.grad = None  # PyHessian's backward(create_graph=True) left its graph in .grad
    info = {"tol": tol, "maxIter": max_iter, "setup_s": setup_s, "note_s": counter.after_seconds,
            "iterate_history": history}
    return Outcome([float(x) for x in values], vectors, counter.calls, counter.seconds, info)


# ---------------------------------------------------------------------------------------------- checking
def true_residuals(check_op, values: list[float], vectors: list[list[torch.Tensor]]) -> dict[str, list[float]]:
    """``||H x - theta x||`` (``x`` normalised), the Rayleigh quotient ``x^T H x`` and its residual, per pair."""
    res, rq, rq_res = [], [], []
    for theta, x in zip(values, vectors):
        x = check_op.check_vector([b.detach() for b in x])
        size = V.norm(x)
        x = [b / size for b in x]
        hx = check_op.matvec(x)
        hx64 = V.flatten(hx)
        x64 = V.flatten(x)
        res.append(float(torch.linalg.vector_norm(hx64 - theta * x64)))
        q = float(hx64 @ x64)
        rq.append(q)
        rq_res.append(float(torch.linalg.vector_norm(hx64 - q * x64)))
    return {"residual": res, "rayleigh": rq, "rayleigh_residual": rq_res}


# ---------------------------------------------------------------------------------------------- plan
def parse_list(text: str, cast=float) -> list:
    return [cast(x) for x in text.split(",") if x.strip()]


def plan(args) -> list[Spec]:
    """The rows in table order: ours' tolerances, scipy's, PyHessian's, then the extra rows of ``--extras``.

    The first tolerance of ours and of scipy are the main rows (``--repeats`` rounds); every other row runs once.
    """
    k, reps = args.k, args.repeats
    specs = []
    ours_tols = parse_list(args.ours_tols)
    for i, t in enumerate(ours_tols):
        specs.append(Spec(f"ours-{t:g}", "ours", f"hess_utils eigsh, tol={t:g}", {"tol": t}, reps if i == 0 else 1))
    for i, t in enumerate(parse_list(args.scipy_tols)):
        specs.append(Spec(f"scipy-{t:g}", "scipy", f"scipy eigsh (ARPACK) on to_scipy(), tol={t:g}", {"tol": t},
                          reps if i == 0 else 1))
    for item in filter(None, (x.strip() for x in args.pyhessian.split(","))):  # "" skips PyHessian
        t, it = item.split(":")
        specs.append(Spec(f"pyhessian-{float(t):g}-{int(it)}", "pyhessian",
                          f"PyHessian eigenvalues(top_n={k}), tol={float(t):g}, maxIter={int(it)}",
                          {"tol": float(t), "max_iter": int(it)}, 1))
    extras = set(parse_list(args.extras, str))
    t = args.target
    if "check" in extras:
        specs.append(Spec("ours-check", "ours", f"hess_utils eigsh, tol={t:g}, check_multiplicity=True",
                          {"tol": t, "check_multiplicity": True}, 1))
    if "basis" in extras:
        ncv = max(2 * k + 1, 20)  # scipy's default ncv
        specs.append(Spec(f"ours-basis{ncv}", "ours", f"hess_utils eigsh, tol={t:g}, basis {ncv} (ARPACK's ncv)",
                          {"tol": t, "num_extra": ncv - k}, 1))
    if "memory" in extras:
        m = k + args.memory_extra
        specs.append(Spec("ours-small", "ours", f"hess_utils eigsh, basis {m} (num_extra={args.memory_extra}), "
                          f"tol={args.target:g}", {"tol": args.target, "num_extra": args.memory_extra}, 1, True))
        tight = 2.0 * float(torch.finfo(torch.float32).eps)
        specs.append(Spec("ours-small-budget", "ours", f"hess_utils eigsh, basis {m}, {args.memory_budget} "
                          f"products (tol={tight:.1e})", {"tol": tight, "num_extra": args.memory_extra,
                                                          "max_products": args.memory_budget}, 1, True))
    return specs


def schedule(specs: list[Spec]) -> list[tuple[int, Spec]]:
    """``(round, spec)`` in execution order: the rounds of the repeated rows (rotated), then the single rows,
    PyHessian's last (the longest)."""
    repeated = [s for s in specs if s.repeats > 1]
    out = []
    for r in range(max((s.repeats for s in repeated), default=0)):
        todo = [s for s in repeated if s.repeats > r]
        shift = r % len(todo)
        out += [(r, s) for s in todo[shift:] + todo[:shift]]
    singles = [s for s in specs if s.repeats <= 1]
    out += [(0, s) for s in singles if s.system != "pyhessian"] + [(0, s) for s in singles if s.system == "pyhessian"]
    return out


def execute(spec: Spec, model, batch, k: int, order) -> tuple[Outcome, float, int]:
    """Run one spec: ``(outcome, wall seconds, peak bytes above the resident set before it)``."""
    gc.collect()
    baseline = rss_bytes()
    reset_peak()
    t0 = time.perf_counter()
    if spec.system == "ours":
        trace = PeakTrace(baseline) if spec.memory_row else None
        out = run_ours(model, batch, k, trace=trace, **spec.params)
    elif spec.system == "scipy":
        out = run_scipy(model, batch, k, **spec.params)
    else:
        out = run_pyhessian(model, batch, k, order=order, **spec.params)
    wall = time.perf_counter() - t0
    if spec.system == "pyhessian":
        wall -= out.info["note_s"]  # the iterate bookkeeping of the counting wrapper is not PyHessian's
    peak = peak_bytes() - baseline
    if out.trace:
        peak = max(peak, max(out.trace))
    return out, wall, peak


# ---------------------------------------------------------------------------------------------- tables
def _fmt_e(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.1e}"


def summarise(specs: list[Spec], runs: list[dict], target: float) -> pd.DataFrame:
    base = specs[0].key  # the main row of ours: the ratios are to it
    ours_time = {r["round"]: r["seconds"] for r in runs if r["key"] == base}
    ours_products = statistics.median(r["products"] for r in runs if r["key"] == base)
    rows = []
    for s in specs:
        mine = [r for r in runs if r["key"] == s.key]
        if not mine:
            continue
        worst = [max(r["relative_residuals"]) for r in mine]
        if s.repeats > 1:  # the main rows: to ours in the same round
            ratios = [r["seconds"] / ours_time[r["round"]] for r in mine if r["round"] in ours_time]
        else:  # a row run once, later: to ours' median
            ratios = [r["seconds"] / statistics.median(ours_time.values()) for r in mine]
        last = mine[-1]
        per_pair = " ".join(_fmt_e(x) for x in sorted(last["relative_residuals"]))
        quarters = "-"
        if last.get("trace"):
            n = max(1, len(last["trace"]) // 4)
            first, tail = max(last["trace"][:n]) / MIB, max(last["trace"][-n:]) / MIB
            quarters = f"{first:.0f} / {tail:.0f}"
        rows.append({
            "system": s.label,
            "runs": len(mine),
            "products": statistics.median(r["products"] for r in mine),
            "products / ours": statistics.median(r["products"] for r in mine) / ours_products,
            "time s": statistics.median(r["seconds"] for r in mine),
            "time / ours": statistics.median(ratios) if ratios else math.nan,
            "s / product": statistics.median(r["product_seconds"] / max(r["products"], 1) for r in mine),
            "worst rel. residual": max(worst),
            f"pairs <= {target:g}": f"{min(sum(x <= target for x in r['relative_residuals']) for r in mine)}/"
                                    f"{len(last['relative_residuals'])}",
            "rel. residuals (last run, ascending)": per_pair,
            "eigenvalue error / |lambda_max|": max(r["eigenvalue_error"] for r in mine),
            "peak MiB above start": statistics.median(r["peak_bytes"] for r in mine) / MIB,
            "peak MiB per product, first / last quarter": quarters,
        })
    return pd.DataFrame(rows)


def pyhessian_iterates(run: dict, k: int, lam: float, target: float) -> str:
    """Per pair of a PyHessian run: its products, the Rayleigh quotient and residual of its last iterate (from
    the counting wrapper, relative to ``|lambda_max|``), the per-iteration factor of the residual over the last
    half of its iterations, and the iterations that factor would need to reach ``target`` (an extrapolation).

    A pair starts from a Gaussian vector, whose Rayleigh quotient (about ``trace / n``) is far below the
    converging ones: a new pair is where it drops under a fifth of the previous iterate's."""
    hist = run["info"].get("iterate_history") or []
    if not hist:
        return ""
    theta_all = [h[0] for h in hist]
    starts = [0] + [i for i in range(1, len(hist)) if abs(theta_all[i]) < 0.2 * abs(theta_all[i - 1])]
    if len(starts) != k:
        return ""
    bounds = list(zip(starts, starts[1:] + [len(hist)]))
    lines = [f"PyHessian `{run['key']}`, per pair (the iterate's residual ||Hv - (v^T H v) v|| / |lambda_max|, "
             "seen by the counting wrapper; the last column extrapolates the last half's rate)", "",
             "| pair | products | Rayleigh quotient, last iterate | residual, last iterate | factor per iteration, "
             f"last half | iterations to {target:g} at that factor |", "|---|---|---|---|---|---|"]
    for j, (lo, hi) in enumerate(bounds):
        n = hi - lo
        res = np.array([h[1] for h in hist[lo:hi]]) / lam
        half = res[n // 2:]
        slope = np.polyfit(np.arange(len(half)), np.log(np.maximum(half, 1e-300)), 1)[0] if len(half) > 1 else 0.0
        factor = float(np.exp(slope))
        more = math.log(target / res[-1]) / slope if slope < 0 and res[-1] > target else math.nan
        need = "-" if not math.isfinite(more) else f"{n + more:,.0f}"
        lines.append(f"| {j + 1} | {n} | {theta_all[hi - 1]:.6g} | {res[-1]:.1e} | {factor:.4f} | {need} |")
    return "\n".join(lines) + "\n"


def markdown(frame: pd.DataFrame) -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in frame.iterrows():
        cells = []
        for c in cols:
            x = row[c]
            if c in ("worst rel. residual", "eigenvalue error / |lambda_max|"):
                cells.append(_fmt_e(x))
            elif c in ("products", "runs"):
                cells.append(f"{x:g}")
            elif c in ("time s",):
                cells.append(f"{x:.1f}")
            elif c in ("products / ours", "time / ours"):
                cells.append("-" if not math.isfinite(x) else f"{x:.2f}")
            elif c == "s / product":
                cells.append(f"{x:.2f}")
            elif c == "peak MiB above start":
                cells.append("-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.0f}")
            else:
                cells.append(str(x))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="gpt2-5m", choices=W.WORKLOADS)
    parser.add_argument("--quick", action="store_true", help="a smaller GPT-2 (vocab 2048, 2 layers, width 128)")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the main rows (the others run once)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for every system (1: on a loaded 2-core machine two threads made "
                             "a product 2-17x slower in a probe)")
    parser.add_argument("--target", type=float, default=1e-5, help="relative residual to reach")
    parser.add_argument("--ours-tols", default="1e-4,1e-5", help="the first runs --repeats times, the rest once")
    parser.add_argument("--scipy-tols", default="1e-4,1e-5", help="the first runs --repeats times, the rest once")
    parser.add_argument("--pyhessian", default="1e-3:100,1e-10:100",
                        help="TOL:MAXITER,... (each runs once); '' for none")
    parser.add_argument("--extras", default="check,memory",
                        help="extra rows of ours: check (check_multiplicity=True), basis (ARPACK's ncv), memory")
    parser.add_argument("--memory-extra", type=int, default=3, help="num_extra of the memory-flatness rows")
    parser.add_argument("--memory-budget", type=int, default=60, help="products of the fixed-budget row")
    parser.add_argument("--results-md", action="store_true",
                        help="also put the table in its section of benchmarks/RESULTS.md (make bench does)")
    parser.add_argument("--stem", default=None, help="output file stem (default eigs-<date>[-quick])")
    parser.add_argument("--resume", default=None, metavar="STEM",
                        help="continue benchmarks/results/STEM.json: keep its runs, do only the missing ones "
                             "(the same arguments otherwise)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="do not re-execute with MALLOC_MMAP_THRESHOLD_ (memory then includes glibc's cache)")
    args = parser.parse_args(argv)
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    if not args.default_malloc and os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.eigs", *raw_argv], env)

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(True)
    started = time.perf_counter()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = args.resume or args.stem or f"eigs-{stamp}{'-quick' if args.quick else ''}"
    command = "python -m benchmarks.eigs " + " ".join(raw_argv)
    runs: list[dict] = []
    if args.resume:
        import json

        previous = json.loads((RESULTS / f"{stem}.json").read_text())
        runs = previous["runs"]
        started -= previous["total_seconds"]
        command = f"{previous['command']} (interrupted after {len(runs)} runs, resumed: {command})"
    model, batch, label = build_workload(args.workload, args.quick)
    with torch.no_grad():
        model(input_ids=batch["input_ids"], use_cache=False)  # warm-up forward
    check_op = _operator(model, batch)
    order = check_op.params
    print(f"workload {label}: {check_op.dim:,} parameters, float32, {torch.get_num_threads()} thread(s), "
          f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_')}", flush=True)
    check_op.matvec(check_op.random_vector())  # builds the checker's kept graph (outside every run)

    specs = plan(args)
    done_before = {(r["key"], r["round"]) for r in runs}
    todo = schedule(specs)
    for r, s in todo:
        if (s.key, r) in done_before:
            continue
        out, wall, peak = execute(s, model, batch, args.k, order)
        t0 = time.perf_counter()
        check = true_residuals(check_op, out.values, out.vectors)
        check_s = time.perf_counter() - t0
        run = {"key": s.key, "system": s.system, "label": s.label, "round": r, "params": s.params,
               "seconds": wall, "products": out.products, "product_seconds": out.product_seconds,
               "peak_bytes": peak, "values": out.values, **check, "check_seconds": check_s,
               "info": out.info, "trace": out.trace}
        runs.append(run)
        print(f"round {r} {s.key:<22} products {out.products:>5}  {wall:8.1f} s  peak {peak / MIB:7.0f} MiB  "
              f"max residual {max(check['residual']):.2e}  values {np.round(sorted(out.values), 4)}", flush=True)
        del out
        gc.collect()
        report(args, specs, runs, stem, label, check_op.dim, command, started, done=len(runs) == len(todo))
    if all((s.key, r) in done_before for r, s in todo):  # resumed a finished run: only render the tables again
        started = time.perf_counter() - previous["total_seconds"]
        report(args, specs, runs, stem, label, check_op.dim, previous["command"], started, done=True)


def finished_at(record: dict) -> str:
    """The provenance's creation time (written at the end of the run), to the minute (``YYYY-MM-DD HH:MM``)."""
    return str(record.get("created", ""))[:16].replace("T", " ")


def report(args, specs, runs, stem, label, dim, command, started, done) -> None:
    """Tables of the runs so far: printed when ``done``, written to ``benchmarks/results/<stem>.*`` every time."""
    # The reference: the run of ours or scipy (both "LA") with the smallest worst residual; |lambda_max| = its top.
    best = min((r for r in runs if r["system"] != "pyhessian"), key=lambda r: max(r["residual"]))
    ref = np.sort(best["values"])[::-1]
    lam = abs(float(ref[0]))
    for r in runs:
        r["relative_residuals"] = [x / lam for x in r["residual"]]
    for r in runs:
        mine = np.sort(np.asarray(r["values"]))[::-1]
        r["eigenvalue_error"] = float(np.abs(mine - ref).max() / lam)
    frame = summarise(specs, runs, args.target)
    table = markdown(frame)
    total = time.perf_counter() - started
    partial = "" if done else f" PARTIAL: {len(runs)} run(s) so far."
    head = (f"Top-{args.k} eigenpairs, {label} ({dim:,} parameters, float32, CPU, "
            f"{torch.get_num_threads()} thread(s)); |lambda_max| = {lam:.6g}; reference eigenvalues "
            f"(run `{best['key']}` round {best['round']}): {', '.join(f'{x:.6g}' for x in ref)}. "
            f"Command: `{command}`; {total / 60:.1f} min in all.{partial}\n\n")
    if done:
        print("\n" + head + table, flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    flat_rows = []
    for r in runs:
        flat_rows.append({
            "key": r["key"], "label": r["label"], "round": r["round"], "products": r["products"],
            "seconds": r["seconds"], "product_seconds": r["product_seconds"], "peak_mib": r["peak_bytes"] / MIB,
            "max_relative_residual": max(r["relative_residuals"]),
            "relative_residuals": " ".join(f"{x:.3e}" for x in r["relative_residuals"]),
            "eigenvalues": " ".join(f"{x:.8g}" for x in r["values"]),
            "eigenvalue_error": r["eigenvalue_error"], "params": str(r["params"]),
        })
    write_text(RESULTS / f"{stem}.csv", pd.DataFrame(flat_rows).to_csv(index=False))
    record = provenance(benchmark="benchmarks.eigs", command=command, arguments=vars(args), workload=label,
                        dim=dim, threads=torch.get_num_threads(), complete=done,
                        malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"), lambda_max=lam,
                        reference_run=[best["key"], best["round"]], reference_eigenvalues=ref.tolist(),
                        total_seconds=total, summary=frame.to_dict(orient="records"), runs=runs)
    write_json(RESULTS / f"{stem}.json", record)
    iterates = [pyhessian_iterates(r, args.k, lam, args.target) for r in runs if r["system"] == "pyhessian"]
    write_text(RESULTS / f"{stem}.md", head + table + "".join("\n" + x for x in iterates if x))
    if done:
        print(f"wrote {RESULTS / stem}.csv/.json/.md", flush=True)
        if args.results_md:
            title = f"### Top-{args.k} eigenpairs (`benchmarks.eigs`), finished {finished_at(record)}\n\n"
            replace_section("eigs", title + head + table + f"\nRaw data: `benchmarks/results/{stem}.json`.\n")
            print("updated its section of benchmarks/RESULTS.md", flush=True)


if __name__ == "__main__":
    main()

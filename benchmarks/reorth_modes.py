"""Cost per Lanczos step, beyond the product with ``H``, of each re-orthogonalisation mode.

    python -m benchmarks.reorth_modes [--operator gpt2-5m | diag] [--iters 80] [--modes full,partial,none]
                                      [--dim 5000000] [--dtype float32] [--device cpu] [--spectrum lm]
                                      [--threads N] [--repeats R] [--out PATH] [--results-md]

``--operator gpt2-5m`` (the default, part of ``make bench``): the exact Hessian of the benchmark's GPT-2
shape workload (:mod:`benchmarks.workloads`, ``keep_graph="auto"``, float32 unless ``--dtype``), the
products of a user's SLQ. ``--operator diag``: ``H = diag(d)`` on one block, whose product is one
elementwise multiplication, so what is timed is the Lanczos bookkeeping alone. Its spectra (fixed seed):

* ``lm``: seven outliers from -15 to 100 over a Gaussian bulk of standard deviation 0.5, the shape of a
  trained LM Hessian (the outliers converge in a few steps and a plain run loses orthogonality fast);
* ``flat``: uniform on [-1, 1], no outliers (slow convergence, slow loss of orthogonality).

Each mode runs once from the same seed-0 probe (``--repeats``: more runs, the least times kept). Per mode it prints
the mean time of the product and of the rest of the step (:func:`lanczos_advance`), the rest over the product, the
time of :func:`lanczos_finish` (which measures ``max |Q^T Q - I|`` from the basis), the re-orthogonalised, the
checked and the recalibrated steps of ``"partial"``, the measured orthogonality and Simon's estimate of it, the top
Ritz value, the largest difference of the top five Ritz values from those of ``"full"`` relative to ``max
|theta|``, and the Wasserstein-1 distance of the run's spectral measure (Ritz values, weights) to that of
``"full"``, relative to the width of ``"full"``'s Ritz values. ``--out PATH`` also writes the table as CSV and
markdown; ``--results-md`` writes it to the ``reorth-modes`` section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time

import numpy as np
import torch
from scipy.stats import wasserstein_distance

from hess_utils._memory import holds_freed_memory
from hess_utils.algorithms._products import owned_matvec
from hess_utils.operators.base import SymmetricOperator

# The module (hess_utils.algorithms re-exports a function of the same name).
lz = importlib.import_module("hess_utils.algorithms.lanczos")


class DiagonalOperator(SymmetricOperator):
    """``H = diag(d)`` on one block: a product costs one pass over two vectors."""

    def __init__(self, diagonal: torch.Tensor) -> None:
        self.diagonal = diagonal
        self.param_names, self.shapes = ["d"], [diagonal.shape]
        self.dtypes, self.devices = [diagonal.dtype], [diagonal.device]

    def _matvec(self, v):
        return [self.diagonal * v[0]]


def spectrum(kind: str, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "lm":
        outliers = np.array([100.0, 60.0, 35.0, 20.0, 12.0, -8.0, -15.0])
        return np.concatenate([rng.normal(0.0, 0.5, dim - outliers.size), outliers])
    if kind == "flat":
        return rng.uniform(-1.0, 1.0, dim)
    raise ValueError(f"unknown spectrum {kind!r}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_operator(workload: str, dtype: torch.dtype, device: str) -> SymmetricOperator:
    """The exact Hessian of a benchmark workload, as :mod:`benchmarks.systems`' ``ours-kept`` builds it."""
    from benchmarks import workloads
    from hess_utils.operators.hessian import HessianOperator

    model = workloads.build_model(workload, dtype=dtype, device=device)
    batch = workloads.build_batch(workload, device=device)
    return HessianOperator(model, [batch], method="rev-rev", keep_graph="auto")


@holds_freed_memory  # as lanczos() and slq() run
def run_mode(op: SymmetricOperator, mode: str, iters: int) -> dict:
    """One Lanczos run of ``iters`` steps from the seed-0 probe, timing the product and the rest apart."""
    device = op.devices[0]
    state = lz.lanczos_init(op, iters, reorth=mode, seed=0)
    product = advance = 0.0
    while not state.done:
        _sync(device)
        t0 = time.perf_counter()
        w = owned_matvec(op, state.q, keep=state.q_prev or ())
        _sync(device)
        t1 = time.perf_counter()
        lz.lanczos_advance(state, w)
        _sync(device)
        t2 = time.perf_counter()
        product += t1 - t0
        advance += t2 - t1
    t0 = time.perf_counter()
    result = lz.lanczos_finish(state)
    finish = time.perf_counter() - t0
    k = result.num_iters
    return {"mode": mode, "result": result, "product_ms": 1e3 * product / k, "advance_ms": 1e3 * advance / k,
            "finish_s": finish}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--operator", default="gpt2-5m", choices=["gpt2-5m", "pythia-70m", "diag"])
    parser.add_argument("--dim", type=int, default=5_000_000, help="diag only")
    parser.add_argument("--iters", type=int, default=80)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--spectrum", default="lm", choices=["lm", "flat"], help="diag only")
    parser.add_argument("--modes", default="full,partial,none")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 on a shared machine, where idle OpenMP "
                             "threads waiting for busy cores make small operations hundreds of times slower")
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode; the least times are printed")
    parser.add_argument("--out", default=None, help="write PATH.csv and PATH.md with the table")
    parser.add_argument("--results-md", action="store_true",
                        help="write the table to the 'reorth-modes' section of benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.operator == "diag":
        op = DiagonalOperator(torch.tensor(spectrum(args.spectrum, args.dim), dtype=dtype, device=device))
        what = f"diag operator, n = {args.dim:,}, spectrum {args.spectrum!r}"
    else:
        op = model_operator(args.operator, dtype, args.device)
        what = f"exact Hessian of {args.operator} (n = {op.dim:,}, keep_graph='auto')"
    eps = float(torch.finfo(dtype).eps)
    print(f"{what}, {args.dtype}, {device}, {args.iters} iterations, {torch.get_num_threads()} threads; "
          f"sqrt(eps) = {math.sqrt(eps):.2e}")
    owned_matvec(op, op.random_vector("rademacher", 0))  # warm-up: the first product builds caches and graphs
    rows = []
    for mode in args.modes.split(","):
        runs = [run_mode(op, mode, args.iters) for _ in range(args.repeats)]
        best = runs[0]  # the runs are identical but for the times
        for key in ("product_ms", "advance_ms", "finish_s"):
            best[key] = min(r[key] for r in runs)
        rows.append(best)
    full = next((r["result"] for r in rows if r["mode"] == "full"), None)
    top_full = None if full is None else full.ritz_values[-5:]
    reference = full if full is not None else rows[0]["result"]
    scale = float(np.abs(reference.ritz_values).max())
    width = float(reference.ritz_values.max() - reference.ritz_values.min())
    header = (f"{'mode':<8} {'product ms':>10} {'rest ms/step':>12} {'rest/product':>12} {'finish s':>9} "
              f"{'reorth steps':>12} {'checks':>6} {'recal':>5} {'max|QtQ-I|':>10} {'max omega':>9} {'top Ritz':>12} "
              f"{'top-5 vs full':>13} {'W1/width':>9}")
    print(header)
    table = []
    for r in rows:
        res = r["result"]
        steps = f"{res.num_reorth_steps}/{res.num_iters}" if res.reorth == "partial" else (
            f"{res.num_iters}/{res.num_iters}" if res.reorth in ("full", "offload") else "0")
        checks = str(len(res.check_steps)) if res.check_steps is not None else "-"
        recal = str(len(res.recalibration_steps)) if res.recalibration_steps is not None else "-"
        omega = f"{res.max_omega:.1e}" if res.max_omega is not None else "-"
        diff = "-" if top_full is None else f"{np.abs(res.ritz_values[-5:] - top_full).max() / scale:.1e}"
        w1_value = (None if full is None else
                    wasserstein_distance(res.ritz_values, full.ritz_values, res.ritz_weights, full.ritz_weights))
        w1 = "-" if w1_value is None else f"{w1_value / width:.1e}"
        row = dict(mode=r["mode"], operator=args.operator, n=op.dim, dtype=args.dtype, products=res.num_iters,
                   product_ms=r["product_ms"], rest_ms_per_step=r["advance_ms"],
                   rest_over_product=r["advance_ms"] / r["product_ms"], finish_s=r["finish_s"],
                   reorth_steps=steps, checks=checks, recalibrations=recal, orthogonality=res.orthogonality_loss,
                   max_omega=omega,
                   top_ritz=float(res.ritz_values[-1]), top5_vs_full=diff, w1_over_width=w1)
        table.append(row)
        print(f"{r['mode']:<8} {r['product_ms']:>10.2f} {r['advance_ms']:>12.2f} {row['rest_over_product']:>12.3f} "
              f"{r['finish_s']:>9.2f} {steps:>12} {checks:>6} {recal:>5} {res.orthogonality_loss:>10.1e} {omega:>9} "
              f"{row['top_ritz']:>12.6f} {diff:>13} {w1:>9}")
        if res.reorth == "partial":
            print(f"         re-orthogonalised at {list(res.reorth_steps)}, checked at {list(res.check_steps)}, "
                  f"recalibrated at {list(res.recalibration_steps)}")
    command = f"`python -m benchmarks.reorth_modes {' '.join(argv if argv is not None else sys.argv[1:])}`"
    md = (f"{command} ({torch.get_num_threads()} thread(s)); {what}, {args.dtype}, {args.device}.\n\n"
          + "| " + " | ".join(table[0]) + " |\n|" + "---|" * len(table[0]) + "\n"
          + "".join("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values())
                    + " |\n" for row in table))
    if args.out:
        import csv

        with open(f"{args.out}.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
        with open(f"{args.out}.md", "w") as fh:
            fh.write(md)
    if args.results_md:
        from benchmarks.results_md import replace_section

        stamp = time.strftime("%Y-%m-%d %H:%M")
        replace_section("reorth-modes", f"### Re-orthogonalisation modes (`benchmarks.reorth_modes`), {stamp}\n\n"
                        + md + "\nrest: the Lanczos step beyond its product (recurrence, norms, basis passes). "
                        "W1/width: Wasserstein-1 distance of the spectral measure to that of `full`.\n")


if __name__ == "__main__":
    main()

"""Cost per Lanczos step, beyond the product with ``H``, of each re-orthogonalisation mode.

    python -m benchmarks.reorth_modes [--dim 5000000] [--iters 80] [--dtype float32] [--device cpu]
                                      [--spectrum lm] [--modes full,partial,none] [--rounding sqrt-n]
                                      [--threads N] [--repeats R]

The operator is diagonal, ``H = diag(d)``, so its product is one elementwise multiplication and what is
timed is the Lanczos bookkeeping: the recurrence, the norms and, for ``"full"`` and ``"partial"``, the
passes over the kept basis. Spectra (fixed seed):

* ``lm``: seven outliers from -15 to 100 over a Gaussian bulk of standard deviation 0.5, the shape of an
  LM Hessian (the outliers converge in a few steps and a plain run loses orthogonality fast);
* ``flat``: uniform on [-1, 1], no outliers (slow convergence, slow loss of orthogonality).

Per mode it prints the mean time of the product and of the rest of the step (:func:`lanczos_advance`;
with ``--repeats``, the least over that many runs, each timing being noisy on a shared machine),
the time of :func:`lanczos_finish` (which measures ``max |Q^T Q - I|`` from the basis), the number of
re-orthogonalised steps of ``"partial"``, the measured orthogonality, and the largest relative
difference of the top five Ritz values from those of ``"full"``, and the Wasserstein-1 distance of the
run's spectral measure (Ritz values, weights) to that of ``"full"``, relative to the spectral width.
``--out PATH`` also writes the table as CSV (``PATH.csv``) and markdown (``PATH.md``).

``--rounding 1`` runs ``"partial"`` with the rounding level :math:`\\varepsilon_1 = \\varepsilon` instead of
:func:`~hess_utils.algorithms.lanczos.omega_rounding`'s :math:`\\varepsilon \\sqrt{n}`: an experiment on how
much of the re-orthogonalisation the :math:`\\sqrt{n}` of the rounding model costs (in float32,
:math:`\\varepsilon \\sqrt{n} > \\sqrt{\\varepsilon} / 2` once ``n > 1 / (4 eps) = 2.1e6``, and then every step
re-orthogonalises).
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


def run_mode(op: DiagonalOperator, mode: str, iters: int, rounding: str) -> dict:
    """One Lanczos run of ``iters`` steps from the seed-0 probe, timing the product and the rest apart."""
    device = op.devices[0]
    reorth = "partial" if mode.startswith("partial") else mode
    state = lz.lanczos_init(op, iters, reorth=reorth, seed=0)
    if reorth == "partial" and rounding == "1":
        state.omega = lz.OmegaEstimates(rounding=state.unit_roundoff, threshold=math.sqrt(state.unit_roundoff))
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
    parser.add_argument("--dim", type=int, default=5_000_000)
    parser.add_argument("--iters", type=int, default=80)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--spectrum", default="lm", choices=["lm", "flat"])
    parser.add_argument("--modes", default="full,partial,none")
    parser.add_argument("--rounding", default="sqrt-n", choices=["sqrt-n", "1"],
                        help="rounding level of 'partial': eps * sqrt(n) (the default) or eps (an experiment)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 on a shared machine, where idle OpenMP "
                             "threads waiting for busy cores make small operations hundreds of times slower")
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode; the least times are printed")
    parser.add_argument("--hvp-ms", type=float, default=415.0,
                        help="product time the overhead is compared with: the gpt2-5m float32 HVP of "
                             "benchmarks/RESULTS.md (1.94 x 0.214 s)")
    parser.add_argument("--out", default=None, help="write PATH.csv and PATH.md with the table")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    diagonal = torch.tensor(spectrum(args.spectrum, args.dim), dtype=getattr(torch, args.dtype), device=device)
    op = DiagonalOperator(diagonal)
    eps = float(torch.finfo(diagonal.dtype).eps)
    print(f"diag operator: n = {args.dim:,}, {args.dtype}, {device}, spectrum {args.spectrum!r}, "
          f"{args.iters} iterations, {torch.get_num_threads()} threads; sqrt(eps) = {math.sqrt(eps):.2e}, "
          f"eps sqrt(n) = {eps * math.sqrt(args.dim):.2e}, partial rounding = {args.rounding}")
    rows = []
    for mode in args.modes.split(","):
        runs = [run_mode(op, mode, args.iters, args.rounding) for _ in range(args.repeats)]
        best = runs[0]  # the runs are identical but for the times
        for key in ("product_ms", "advance_ms", "finish_s"):
            best[key] = min(r[key] for r in runs)
        rows.append(best)
    full = next((r["result"] for r in rows if r["mode"] == "full"), None)
    top_full = None if full is None else full.ritz_values[-5:]
    scale = float(diagonal.abs().max())
    width = float(diagonal.max() - diagonal.min())
    header = (f"{'mode':<8} {'product ms':>10} {'rest ms/step':>12} {'rest/HVP':>12} {'finish s':>9} "
              f"{'reorth steps':>12} {'max|QtQ-I|':>10} {'max omega':>9} {'top Ritz':>12} {'top-5 vs full':>13} "
              f"{'W1/width':>9}")
    print(header)
    table = []
    for r in rows:
        res = r["result"]
        steps = f"{res.num_reorth_steps}/{res.num_iters}" if res.reorth == "partial" else (
            f"{res.num_iters}/{res.num_iters}" if res.reorth in ("full", "offload") else "0")
        omega = f"{res.max_omega:.1e}" if res.max_omega is not None else "-"
        diff = "-" if top_full is None else f"{np.abs(res.ritz_values[-5:] - top_full).max() / scale:.1e}"
        w1_value = (None if full is None else
                    wasserstein_distance(res.ritz_values, full.ritz_values, res.ritz_weights, full.ritz_weights))
        w1 = "-" if w1_value is None else f"{w1_value / width:.1e}"
        row = dict(mode=r["mode"], n=args.dim, dtype=args.dtype, iters=res.num_iters, products=res.num_iters,
                   product_ms=r["product_ms"], rest_ms_per_step=r["advance_ms"],
                   rest_over_gpt2_hvp=r["advance_ms"] / args.hvp_ms, finish_s=r["finish_s"], reorth_steps=steps,
                   orthogonality=res.orthogonality_loss, max_omega=omega, top_ritz=float(res.ritz_values[-1]),
                   top5_vs_full=diff, w1_over_width=w1)
        table.append(row)
        print(f"{r['mode']:<8} {r['product_ms']:>10.2f} {r['advance_ms']:>12.2f} {row['rest_over_gpt2_hvp']:>12.3f} "
              f"{r['finish_s']:>9.2f} {steps:>12} {res.orthogonality_loss:>10.1e} {omega:>9} "
              f"{row['top_ritz']:>12.6f} {diff:>13} {w1:>9}")
        if res.reorth == "partial":
            print(f"         re-orthogonalised at {list(res.reorth_steps)}")
    if args.out:
        import csv

        with open(f"{args.out}.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
        with open(f"{args.out}.md", "w") as fh:
            fh.write(f"`python -m benchmarks.reorth_modes {' '.join(argv if argv is not None else sys.argv[1:])}`"
                     f" ({torch.get_num_threads()} thread(s)); diag operator, spectrum {args.spectrum!r}.\n\n")
            fh.write("| " + " | ".join(table[0]) + " |\n|" + "---|" * len(table[0]) + "\n")
            for row in table:
                fh.write("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values())
                         + " |\n")

if __name__ == "__main__":
    main()

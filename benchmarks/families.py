"""Float64 Hessian-vector products across model families, against an independent dense Hessian.

    python -m benchmarks.families [--families llama,gemma2,...] [--vectors 2] [--out benchmarks/results/families.md]

For each family of ``tests/tiny.py`` (tiny float64 models built from configs: hidden 8, one layer,
vocabulary 24; two padded batches of 2 x 6 tokens), the reference is ``tests.tiny.dense_hessian`` (its own
loss and its own float64 mode, none of the package's code). Each method multiplies ``--vectors`` Gaussian
vectors; a cell is the largest relative error ``||Hv - H_dense v|| / ||H_dense v||``. ``rev-rev, no mode``
and ``fd, no mode`` are those methods with the float64 mode of :mod:`hess_utils.operators.precision`
switched off (what the modeling code's float32 casts cost). ``low ops`` counts the operations of one loss
(forward and cross-entropy) that made a tensor below float64, without the mode / with it
(:func:`~hess_utils.operators.precision.report_low_precision`; the second number must be 0). Targets
(tests/test_families.py): 1e-10 for the exact methods, 1e-6 for ``fd``.

Mixture-of-experts families (``tests.tiny.MOE_FAMILIES``) are built with transformers' default experts kernel;
``experts`` says which kernel each product ran (:func:`~hess_utils.operators.kernels.experts_kernel`: as
built -> exact products / finite differences) and ``fd flips`` the top-k routing decisions the finite
differences' points moved (:mod:`hess_utils.operators.routing`; 0 means every difference stayed on ``w``'s
piece). Prints a markdown table; ``--out`` also writes it to a file.
"""

from __future__ import annotations

import argparse
import sys
import time
from unittest import mock

import torch
import transformers

from hess_utils import vectors as V
from hess_utils.operators import kernels
from hess_utils.operators.hessian import hessian_operator
from hess_utils.operators.kernels import experts_kernel
from hess_utils.operators.precision import report_low_precision
from tests.tiny import FAMILIES, dense_hessian, tiny_batches, tiny_model

METHODS = ("rev-rev", "fwd-rev", "fd")
TARGETS = {"rev-rev": 1e-10, "fwd-rev": 1e-10, "fd": 1e-6}


def _error(op, H: torch.Tensor, vectors: int, flips: list[int] | None = None) -> float:
    worst = 0.0
    for seed in range(vectors):
        v = op.random_vector("gaussian", seed)
        ref = H @ V.flatten(v)
        worst = max(worst, float((V.flatten(op.matvec(v)) - ref).norm() / ref.norm()))
        if flips is not None and op.last_fd is not None:
            flips.append(op.last_fd.routing_flips)
    return worst


def _experts(model) -> str:
    """``grouped_mm -> eager / eager``: the experts kernel as built, in exact products, in finite differences."""
    built = {getattr(m.config, "_experts_implementation", None) for _, m in kernels.experts_modules(model)}
    if not built:
        return "-"
    with experts_kernel(model, exact=True, method="rev-rev") as exact, experts_kernel(model, exact=False) as fd:
        return f"{'/'.join(sorted(map(str, built)))} -> {'/'.join(sorted(set(exact.values())))} / " \
               f"{'/'.join(sorted(set(fd.values())))}"


def _cell(fn) -> str:
    """A relative error as ``1.2e-15`` (bold where it misses its target), or the error class that stopped it."""
    try:
        err, target = fn()
    except Exception as exc:  # a family that cannot run a method: say why, briefly
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:60]}"
    mark = "" if target is None or err <= target else "**"
    return f"{mark}{err:.1e}{mark}"


def family_row(family: str, vectors: int) -> list[str]:
    start = time.perf_counter()
    model = tiny_model(family)
    batches = tiny_batches(pad=True)
    H = dense_hessian(model, batches)
    cells = [family, str(H.shape[0]), _experts(model)]
    flips: list[int] = []
    for method in METHODS:
        cells.append(_cell(lambda m=method: (_error(hessian_operator(model, batches, method=m), H, vectors,
                                                    flips if m == "fd" else None), TARGETS[m])))
    cells.append(str(sum(flips)) if flips and kernels.experts_modules(model) else "-")
    with mock.patch.object(kernels, "is_float64_model", lambda model: False):
        for method in ("rev-rev", "fd"):
            cells.append(_cell(lambda m=method: (_error(hessian_operator(model, batches, method=m), H, vectors),
                                                 None)))
    raw = report_low_precision(model, batches[0], keep=False)
    kept = report_low_precision(model, batches[0])
    cells.append(f"{len(raw)} / {len(kept)}")
    cells.append(f"{time.perf_counter() - start:.1f}")
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated names of tests/tiny.py")
    parser.add_argument("--vectors", type=int, default=2, help="Gaussian vectors per method")
    parser.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (1: these tensors are tiny, and spinning threads on shared cores "
                             "cost up to 50x)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    header = ["family", "params", "experts (built -> exact / fd)", *METHODS, "fd flips", "rev-rev, no mode",
              "fd, no mode", "low ops (no mode / mode)", "s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    print(*lines, sep="\n")
    for family in args.families.split(","):
        lines.append("| " + " | ".join(family_row(family.strip(), args.vectors)) + " |")
        print(lines[-1], flush=True)
    lines.append(f"\ntorch {torch.__version__}, transformers {transformers.__version__}; "
                 "bold: misses its target (exact 1e-10, fd 1e-6)")
    print(lines[-1])
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Float64 Hessian-vector products across families (`python -m benchmarks.families`)\n\n"
                    f"Arguments: `--families {args.families} --vectors {args.vectors}`\n\n")
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

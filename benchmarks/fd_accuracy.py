"""Accuracy of finite-difference Hessian-vector products on the embedded models, against exact float64.

    python -m benchmarks.fd_accuracy [--models tiny-gpt2,smollm2-135m] [--sequences 2] [--seq-len 32]
    python -m benchmarks.fd_accuracy --u-curve tiny-opt     # fixed-step error over the step, per vector

For each model, on ``--sequences`` wiki sequences: the exact float64 product (``rev-rev`` on the float64
model) is the reference; the vectors are a Gaussian and a Rademacher vector and the first three normalised
Krylov vectors ``H^j r / ||H^j r||`` (``j = 1, 2, 3``, ``r`` Rademacher), the kind Lanczos multiplies.
Each is multiplied by finite differences in float32 and float64, ``fd_mode="adaptive"`` (the default) and
``"fixed"`` (the cheap mode), and the relative error ``||Hv_fd - Hv|| / ||Hv||`` and the gradients spent on
the product are printed as a table and written to ``benchmarks/results/fd_accuracy.{json,md}`` with the
provenance. Targets (issue 13): float32 within 1e-3, float64 within 1e-7, adaptive mode.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

from hess_utils import runs
from hess_utils import vectors as V
from hess_utils._io import write_json, write_text
from hess_utils.batches import load_batches
from hess_utils.harness.zoo import EMBEDDED_MODELS
from hess_utils.models import load_model
from hess_utils.operators.hessian import hessian_operator

TARGETS = {"float32": 1e-3, "float64": 1e-7}
RESULTS = Path(__file__).resolve().parent / "results"


def flat64(x) -> torch.Tensor:
    return torch.cat([b.reshape(-1).to(torch.float64) for b in x])


def test_vectors(exact) -> tuple[dict[str, list[torch.Tensor]], dict[str, torch.Tensor]]:
    """The probe vectors (float64) and their exact products, flattened (float64)."""
    vecs = {"gaussian": exact.random_vector("gaussian", 0), "rademacher": exact.random_vector("rademacher", 1)}
    refs = {k: flat64(exact.matvec(v)) for k, v in vecs.items()}
    x = exact.random_vector("rademacher", 0)
    hx = exact.matvec(x)
    for j in (1, 2, 3):
        x = V.scaled(1.0 / V.norm(hx), hx)
        hx = exact.matvec(x)
        vecs[f"krylov {j}"] = x
        refs[f"krylov {j}"] = flat64(hx)
    return vecs, refs


def cached_test_vectors(exact, cache: str | None, key: str):
    """:func:`test_vectors`, read from / written to ``cache/key.pt`` when a cache folder is given."""
    if cache is None:
        return test_vectors(exact)
    path = Path(cache) / f"{key}.pt"
    if path.exists():
        return torch.load(path)
    out = test_vectors(exact)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def model_rows(name: str, sequences: int, seq_len: int, cache: str | None = None,
               dtypes: list[str] | None = None) -> list[dict]:
    m64, tok = load_model(name, dtype=torch.float64)
    batches = load_batches("wiki", tok, seq_len=seq_len, num_sequences=sequences, batch_size=min(2, sequences))
    exact = hessian_operator(m64, batches, method="rev-rev")
    vecs, refs = cached_test_vectors(exact, cache, f"{name}-{sequences}x{seq_len}")
    del exact
    rows = []
    for dtype in (getattr(torch, d) for d in (dtypes or ["float32", "float64"])):
        model = m64 if dtype == torch.float64 else load_model(name, dtype=dtype)[0]
        for mode in ("adaptive", "fixed"):
            op = hessian_operator(model, batches, method="fd", fd_mode=mode)
            for kind, v in vecs.items():
                out = op.matvec([b.to(dtype) for b in v])
                err = float((flat64(out) - refs[kind]).norm() / refs[kind].norm())
                del out
                rows.append({"model": name, "dtype": str(dtype).split(".")[1], "mode": mode, "vector": kind,
                             "error": err, "gradients": op.last_fd.gradients,
                             "steps": list(op.last_fd.steps), "taus": list(op.last_fd.taus)})
            del op
        del model
    return rows


def u_curve(name: str, sequences: int, seq_len: int, cache: str | None = None,
            dtypes: list[str] | None = None) -> str:
    """Error of one fixed central pair (``fd_eps`` given) over the relative step, per dtype and vector."""
    m64, tok = load_model(name, dtype=torch.float64)
    batches = load_batches("wiki", tok, seq_len=seq_len, num_sequences=sequences, batch_size=min(2, sequences))
    vecs, refs = cached_test_vectors(hessian_operator(m64, batches, method="rev-rev"), cache,
                                     f"{name}-{sequences}x{seq_len}")
    grids = {torch.float32: [4e-3 / 2**k for k in range(13)], torch.float64: [1e-4 / 4**k for k in range(9)]}
    grids = {k: v for k, v in grids.items() if str(k).split(".")[1] in (dtypes or ["float32", "float64"])}
    lines = []
    for dtype, grid in grids.items():
        model = m64 if dtype == torch.float64 else load_model(name, dtype=dtype)[0]
        lines += [f"{name} {str(dtype).split('.')[1]}: relative error of one central pair at fd_eps",
                  "| vector | " + " | ".join(f"{e:.1e}" for e in grid) + " |", "|---" * (len(grid) + 1) + "|"]
        for kind, v in vecs.items():
            errs = []
            for eps in grid:
                out = hessian_operator(model, batches, method="fd", fd_eps=eps).matvec([b.to(dtype) for b in v])
                errs.append(float((flat64(out) - refs[kind]).norm() / refs[kind].norm()))
            lines.append(f"| {kind} | " + " | ".join(f"{e:.1e}" for e in errs) + " |")
        lines.append("")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    lines = ["| model | dtype | mode | vector | error | gradients | target |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        target = TARGETS[r["dtype"]]
        mark = "" if r["mode"] != "adaptive" else (" ok" if r["error"] <= target else " **MISSED**")
        lines.append(f"| {r['model']} | {r['dtype']} | {r['mode']} | {r['vector']} | {r['error']:.1e} | "
                     f"{r['gradients']} | {target:.0e}{mark} |")
    return "\n".join(lines) + "\n"


def summary(rows: list[dict]) -> str:
    lines = ["| dtype | mode | worst error (random) | worst error (Krylov) | mean gradients per product |",
             "|---|---|---|---|---|"]
    for dtype in TARGETS:
        for mode in ("adaptive", "fixed"):
            sel = [r for r in rows if r["dtype"] == dtype and r["mode"] == mode]
            if not sel:
                continue
            rnd = max(r["error"] for r in sel if not r["vector"].startswith("krylov"))
            kry = max(r["error"] for r in sel if r["vector"].startswith("krylov"))
            grads = sum(r["gradients"] for r in sel) / len(sel)
            lines.append(f"| {dtype} | {mode} | {rnd:.1e} | {kry:.1e} | {grads:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(EMBEDDED_MODELS))
    parser.add_argument("--sequences", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--out", default=str(RESULTS / "fd_accuracy"))
    parser.add_argument("--cache", default=None, help="folder for the exact vectors and products (re-runs)")
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--u-curve", metavar="MODEL", help="print the fixed-step U-curves of MODEL instead")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.u_curve:
        text = u_curve(args.u_curve, args.sequences, args.seq_len, args.cache, args.dtypes.split(","))
        print(text)
        write_text(str(RESULTS / f"fd_u_curve_{args.u_curve}.md"), text + "\n")
        return 0
    rows = []
    start = time.perf_counter()
    for name in args.models.split(","):
        t0 = time.perf_counter()
        rows += model_rows(name, args.sequences, args.seq_len, args.cache, args.dtypes.split(","))
        gc.collect()  # a float64 model, its vectors and products: about 10 GB for SmolLM2-135M
        print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    table = summary(rows) + "\n" + markdown(rows)
    print(table)
    record = {"rows": rows, "args": vars(args), "seconds": time.perf_counter() - start,
              "provenance": runs.provenance()}
    write_json(args.out + ".json", record)
    write_text(args.out + ".md", table)
    missed = [r for r in rows if r["mode"] == "adaptive" and r["error"] > TARGETS[r["dtype"]]]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())

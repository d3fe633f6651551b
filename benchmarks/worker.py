"""One measurement of one system in a fresh process; prints one JSON line (``RESULT {...}``).

Tasks
-----
``time``  setup, one warm-up product and gradient, then ``--inner`` rounds alternating a plain gradient
          and a product; reports both medians and their ratio (side by side in one process). With
          ``--save`` it writes the product of the probe vector for the error column.
``mem``   peak memory above the model: CUDA ``max_memory_allocated`` minus the allocation before setup;
          CPU the kernel's peak resident set (``VmHWM`` after resetting it through
          ``/proc/self/clear_refs``) minus the resident set before setup. The orchestrator runs this
          task with ``MALLOC_MMAP_THRESHOLD_=65536`` so that every large tensor is its own mapping,
          returned to the kernel when freed: the resident set then follows live tensors instead of
          glibc's cache. Measured over setup and two products (or two gradients for the unit).
``slq``   setup plus one SLQ call (``--iters`` x ``--probes``), wall time and Ritz values.
``ref``   the float64 reference product (hess_utils rev-rev on a float64 copy), saved with ``--save``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import systems as S  # noqa: E402
from benchmarks.workloads import build_batch, build_model, probe_vector  # noqa: E402


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak memory above the level at ``start()`` (see module docstring for the method)."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        self.method = "torch.cuda.max_memory_allocated" if self.cuda else "VmHWM - VmRSS (clear_refs)"

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _status_kib("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM to the current resident set

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _status_kib("VmHWM") * 1024 - self.base


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _import_for(key: str) -> None:
    """Import the system's package before any baseline so that module code is not counted."""
    if key.startswith("pyhessian"):
        import pyhessian  # noqa: F401
    elif key.startswith("eigenthings"):
        import hessian_eigenthings  # noqa: F401
    elif key.startswith("curvlinops"):
        import curvlinops  # noqa: F401
    else:
        import hess_utils.algorithms.slq  # noqa: F401
        import hess_utils.operators.hessian  # noqa: F401


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("task", choices=["time", "mem", "slq", "ref"])
    ap.add_argument("--system", default="ours-kept")
    ap.add_argument("--workload", default="gpt2-5m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--inner", type=int, default=5)
    ap.add_argument("--iters", type=int, default=80)
    ap.add_argument("--probes", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", default=None)
    args = ap.parse_args()
    device = args.device
    system = S.SYSTEMS[args.system]
    _import_for(args.system)

    dtype = torch.float64 if args.task == "ref" else torch.float32
    model = build_model(args.workload, dtype=dtype, device=device)
    batch = build_batch(args.workload, device=device)
    params = list(model.parameters())
    v = probe_vector(params)
    with torch.no_grad():  # one-time initialisations (thread pools, kernels) before any baseline
        model(input_ids=batch["input_ids"], use_cache=False)
    out: dict = {"task": args.task, "system": args.system, "workload": args.workload, "device": device,
                 "num_params": sum(p.numel() for p in params)}

    if args.task == "ref":
        from hess_utils.operators.hessian import HessianOperator

        hv = HessianOperator(model, [batch], method="rev-rev").matvec(v)
        torch.save([x.cpu() for x in hv], args.save)
    elif args.task == "mem":
        meter = PeakMemory(device)
        meter.start()
        state = system.setup(model, batch, params)
        for _ in range(2):
            result = system.hvp(state, v)
            del result
        _sync(device)
        out.update(peak_bytes=meter.peak(), method=meter.method)
    elif args.task == "time":
        gstate = S._grad_setup(model, batch, params)
        t0 = time.perf_counter()
        state = system.setup(model, batch, params)
        _sync(device)
        out["setup_s"] = time.perf_counter() - t0
        first = system.hvp(state, v)
        if args.save:
            torch.save([x.detach().cpu() for x in first], args.save)
        del first
        S.plain_gradient(gstate)
        grads, prods = [], []
        for _ in range(args.inner):
            _sync(device)
            t0 = time.perf_counter()
            S.plain_gradient(gstate)
            _sync(device)
            t1 = time.perf_counter()
            system.hvp(state, v)
            _sync(device)
            t2 = time.perf_counter()
            grads.append(t1 - t0)
            prods.append((t2 - t1) / S.hvp_time_divisor(args.system))
        out.update(grad_s=statistics.median(grads), hvp_s=statistics.median(prods), grads=grads, hvps=prods)
        out["ratio"] = out["hvp_s"] / out["grad_s"]
    elif args.task == "slq":
        t0 = time.perf_counter()
        state = system.setup(model, batch, params)
        values = system.slq(state, args.iters, args.probes, args.seed)
        _sync(device)
        out["slq_s"] = time.perf_counter() - t0
        out["ritz"] = [[float(x) for x in row] for row in values]
        out["top_ritz"] = S.top_ritz(values)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()

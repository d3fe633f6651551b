"""Checks that need a GPU: run on a machine with at least one CUDA device (no test runs them).

    python scripts/gpu_checks.py [--model tiny-gpt2] [--big-model smollm2-135m] [--out gpu_checks.json]

1. device_map split between ``cuda:0`` and ``cpu`` (a real two-device model-parallel run through accelerate's
   hooks): the exact HVP equals the single-device HVP (float64), and a short Lanczos gives the same Ritz values.
2. ``torch.distributed`` with nccl, a single rank on ``cuda:0``: the data-parallel operator equals the plain one.
3. FSDP2 (one rank, nccl): the finite-difference HVP is within 1e-6 (float64) of the exact one.
4. Full-reorthogonalisation Lanczos with the basis offloaded to the CPU (``reorth="offload"``) keeps GPU memory
   flat as the iterations grow (peak growth from the fewest to the most iterations under two vectors), where the
   basis kept on the GPU (``reorth="full"``) grows by one vector per iteration; both give the same Ritz values.
5. Timings on ``cuda:0`` (float32, synchronised, median of repeats): a gradient, an exact HVP (graph rebuilt and
   graph kept) and a finite-difference HVP on the big model, as ratios to the gradient, with peak memory.

Prints one line per check and a table, writes everything as JSON (``--out``), exits 1 if a check fails.
``--cpu-smoke`` runs checks 1-4 with ``cpu`` in place of ``cuda:0`` and gloo in place of nccl (no timings, no memory
criterion): it only checks that the script itself works, on any machine (tests/test_scripts.py runs it).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch


def _rel(a, b) -> float:
    """Relative 2-norm difference of two vector lists, in float64 on the CPU."""
    fa = torch.cat([x.detach().to("cpu", torch.float64).reshape(-1) for x in a])
    fb = torch.cat([x.detach().to("cpu", torch.float64).reshape(-1) for x in b])
    return float((fa - fb).norm() / fb.norm())


def _batches(tokenizer, seq_len: int, num: int, batch_size: int, device: str):
    from hess_utils import load_batches

    return [{k: v.to(device) for k, v in b.items()}
            for b in load_batches("wiki", tokenizer, seq_len=seq_len, num_sequences=num, batch_size=batch_size)]


def check_device_map(model_name: str, device: str) -> dict:
    """Explicit map: embeddings and head on cpu, decoder blocks on ``device``; compare with all-on-cpu."""
    from accelerate import dispatch_model

    from hess_utils import hessian_operator, lanczos, load_model
    from hess_utils.operators.engines import check_materialised

    ref_model, tok = load_model(model_name, dtype=torch.float64)
    batches = _batches(tok, 64, 4, 2, "cpu")
    ref = hessian_operator(ref_model, batches, method="rev-rev")
    v = ref.random_vector("gaussian", 0)
    hv_ref = ref.matvec(v)
    lz_ref = lanczos(ref, num_iters=10, reorth="full", seed=0, progress=False)

    model, _ = load_model(model_name, dtype=torch.float64)
    names = [n for n, _ in model.named_children()]
    base = getattr(model, names[0])  # e.g. transformer / model / gpt_neox
    device_map = {}
    for child, _ in base.named_children():
        device_map[f"{names[0]}.{child}"] = device if child in ("h", "layers") else "cpu"
    for other in names[1:]:
        device_map[other] = "cpu"
    # main_device="cpu": accelerate treats "cpu" entries as CPU *offload* (weights on meta, copied to the main
    # device per forward, out of the graph) whenever the main device is a GPU; we want them computed on cpu.
    model = dispatch_model(model, device_map=device_map, main_device="cpu", force_hooks=True)
    check_materialised(model)
    devices = sorted({str(p.device) for p in model.parameters()})
    op = hessian_operator(model, batches, method="rev-rev")
    v_split = [x.to(d) for x, d in zip(v, op.devices, strict=True)]
    err = _rel(op.matvec(v_split), hv_ref)
    lz = lanczos(op, num_iters=10, reorth="full", seed=0, progress=False)
    ritz_err = float(abs(lz.ritz_values - lz_ref.ritz_values).max() / abs(lz_ref.ritz_values).max())
    ok = len(devices) == (1 if device == "cpu" else 2) and err < 1e-10 and ritz_err < 1e-8
    return {"check": f"device_map {device} + cpu", "devices": devices, "hvp_rel_error": err,
            "ritz_rel_error": ritz_err, "ok": ok}


def _init_single_rank(device: str) -> str:
    """One-rank process group: nccl on cuda:0, gloo on cpu; returns the backend."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if device == "cpu":
        dist.init_process_group("gloo", rank=0, world_size=1)
        return "gloo"
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device(device))
    return "nccl"


def check_nccl_and_fsdp(model_name: str, device: str) -> list[dict]:
    """Data parallel and FSDP2 on one nccl rank against the plain operator on ``device``."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from hess_utils import hessian_operator, load_model
    from hess_utils.cli import decoder_blocks
    from hess_utils.operators.engines import DataParallelHessianOperator, FSDPHessianOperator

    backend = _init_single_rank(device)
    try:
        model, tok = load_model(model_name, dtype=torch.float64)
        model = model.to(device)
        batches = _batches(tok, 64, 4, 2, device)
        plain = hessian_operator(model, batches, method="rev-rev")
        v = plain.random_vector("gaussian", 1)
        hv = plain.matvec(v)
        ddp = DataParallelHessianOperator(model, batches, method="rev-rev")
        out = [{"check": f"{backend} data parallel, 1 rank", "backend": str(dist.get_backend()),
                "hvp_rel_error": _rel(ddp.matvec(v), hv)}]
        out[-1]["ok"] = out[-1]["hvp_rel_error"] < 1e-12
        sharded, _ = load_model(model_name, dtype=torch.float64)
        sharded = sharded.to(device)
        for block in decoder_blocks(sharded):
            fully_shard(block)
        fully_shard(sharded)
        fsdp = FSDPHessianOperator(sharded, batches)
        err = _rel(fsdp.matvec([x.to(device) for x in v]), hv)
        out.append({"check": f"FSDP2 finite differences, 1 {backend} rank", "hvp_rel_error": err, "ok": err < 1e-6})
        return out
    finally:
        dist.destroy_process_group()


def check_offload_flat(model_name: str, device: str, iterations: tuple[int, ...]) -> dict:
    """Peak ``device`` memory of Lanczos runs of growing length, basis on the device vs offloaded to the CPU."""
    from hess_utils import hessian_operator, lanczos, load_model

    model, tok = load_model(model_name, dtype=torch.float32)
    model = model.to(device)
    batches = _batches(tok, 64, 4, 2, device)
    op = hessian_operator(model, batches, method="rev-rev")  # graph rebuilt: the same peak at every product
    vector_bytes = sum(t.numel() * t.element_size() for t in op.zeros())
    cuda = device.startswith("cuda")
    peaks: dict[str, dict[int, float]] = {"full": {}, "offload": {}}
    top: dict[str, float] = {}
    for reorth in peaks:
        for k in iterations:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            result = lanczos(op, num_iters=k, reorth=reorth, seed=0, progress=False)
            if cuda:
                torch.cuda.synchronize()
            peaks[reorth][k] = float(torch.cuda.max_memory_allocated() - base) if cuda else float("nan")
            top[reorth] = float(result.ritz_values[-1])
            del result
    first, last = iterations[0], iterations[-1]
    growth = {r: (peaks[r][last] - peaks[r][first]) / vector_bytes for r in peaks}  # in vectors
    ritz_gap = abs(top["offload"] - top["full"]) / abs(top["full"])
    ok = ritz_gap < 1e-5 and (not cuda or growth["offload"] < 2)
    peak_mib = {r: {k: m / 2**20 for k, m in by_k.items()} for r, by_k in peaks.items()}
    return {"check": f"offloaded basis keeps {device} memory flat", "iterations": list(iterations),
            "vector_mib": vector_bytes / 2**20, "peak_mib": peak_mib, "growth_in_vectors": growth,
            "top_ritz_rel_gap": ritz_gap, "ok": ok}


def _timed(fn, repeats: int) -> tuple[float, float]:
    """Median seconds and peak memory (bytes above the start) of ``fn`` on cuda:0."""
    fn()  # warm-up (kernels, caching allocator)
    times, peaks = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        peaks.append(torch.cuda.max_memory_allocated() - base)
    return statistics.median(times), max(peaks)


def timings(model_name: str, seq_len: int, num_sequences: int, repeats: int) -> dict:
    """Gradient vs HVP (rev-rev rebuilt, rev-rev graph kept, fd) on cuda:0 in float32."""
    from hess_utils import hessian_operator, load_model

    model, tok = load_model(model_name, dtype=torch.float32)
    model = model.to("cuda:0")
    batches = _batches(tok, seq_len, num_sequences, num_sequences, "cuda:0")
    rows = {}
    grad_op = hessian_operator(model, batches, method="rev-rev")
    rows["gradient"] = _timed(grad_op.gradient, repeats)
    v = grad_op.random_vector("rademacher", 0)
    for label, kw in {"hvp rev-rev (graph rebuilt)": {"method": "rev-rev"},
                      "hvp rev-rev (graph kept)": {"method": "rev-rev", "keep_graph": True},
                      "hvp fwd-rev": {"method": "fwd-rev"},
                      "hvp fd": {"method": "fd"}}.items():
        op = hessian_operator(model, batches, **kw)
        try:
            rows[label] = _timed(lambda op=op: op.matvec(v), repeats)
        except (RuntimeError, NotImplementedError) as err:  # e.g. a kernel without forward-mode support
            rows[label] = (float("nan"), float("nan"))
            print(f"  {label}: failed ({str(err).splitlines()[0]})")
        del op
        torch.cuda.empty_cache()
    g_time, g_mem = rows["gradient"]
    table = {k: {"seconds": t, "time_ratio": t / g_time, "peak_bytes": m, "memory_ratio": m / g_mem}
             for k, (t, m) in rows.items()}
    return {"check": "timings", "model": model_name, "tokens": seq_len * num_sequences,
            "device": torch.cuda.get_device_name(0), "table": table, "ok": True}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-gpt2", help="model of the exactness checks (default: %(default)s)")
    parser.add_argument("--big-model", default="smollm2-135m", help="model of the timings (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence in the timings")
    parser.add_argument("--num-sequences", type=int, default=8, help="sequences in the timings")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    parser.add_argument("--out", default="gpu_checks.json", help="JSON file of every result")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="checks 1-3 on cpu/gloo, no timings: tests the script, not the GPU")
    args = parser.parse_args(argv)
    device = "cpu" if args.cpu_smoke else "cuda:0"
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("error: no CUDA device is visible; run this script on a machine with a GPU", file=sys.stderr)
        return 2
    from hess_utils.runs import provenance

    results = [check_device_map(args.model, device), *check_nccl_and_fsdp(args.model, device),
               check_offload_flat(args.model, device, (4, 8) if args.cpu_smoke else (8, 16, 32))]
    if not args.cpu_smoke:
        results.append(timings(args.big_model, args.seq_len, args.num_sequences, args.repeats))
    for r in results:
        detail = {k: v for k, v in r.items() if k not in ("check", "ok", "table")}
        print(f"{'PASS' if r['ok'] else 'FAIL'}  {r['check']}: {detail}")
        for label, row in r.get("table", {}).items():
            print(f"      {label:30s} {row['seconds'] * 1e3:9.1f} ms  x{row['time_ratio']:.2f} time  "
                  f"{row['peak_bytes'] / 2**20:9.1f} MiB  x{row['memory_ratio']:.2f} memory")
    from hess_utils import _io

    _io.write_json(Path(args.out), provenance(kind="gpu_checks", parameters=vars(args), results=results))
    print(f"written {args.out}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())

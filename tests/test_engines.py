"""Engines beyond one process: data parallel and FSDP2 with 2 gloo processes on CPU, device maps."""

from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hess_utils import vectors as V
from hess_utils.algorithms import slq
from hess_utils.operators.engines import DataParallelHessianOperator, FSDPHessianOperator, check_materialised
from hess_utils.operators.hessian import hessian_operator
from tests.tiny import tiny_batches, tiny_model

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, job: str, dtype_name: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        dtype = getattr(torch, dtype_name)
        model = tiny_model("gpt2", dtype=dtype)
        batches = tiny_batches(num_batches=3, pad=True)  # 3 batches over 2 ranks: uneven on purpose
        if job == "ddp":
            op = DataParallelHessianOperator(model, batches, method="rev-rev")
        else:
            from torch.distributed.fsdp import fully_shard

            for block in model.transformer.h:
                fully_shard(block)
            fully_shard(model)
            op = FSDPHessianOperator(model, batches)
        v = op.random_vector("gaussian", 7)
        hv = op.matvec(v)
        result = slq(op, num_iters=12, num_probes=2, reorth="full", seed=3, progress=False)
        loss = op.loss()  # a collective: every rank calls it
        if rank == 0:
            torch.save({"hv": [x.detach().cpu() for x in hv], "ritz": result.ritz_values, "loss": loss,
                        "tokens": op.num_tokens}, os.path.join(out_dir, "result.pt"))
    except Exception:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        dist.destroy_process_group()
        raise
    # A barrier before tearing gloo down, then a hard exit: gloo's threads can otherwise abort the
    # interpreter's shutdown ("terminate called without an active exception") after the work succeeded.
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def _run(job: str, dtype_name: str, tmp_path) -> dict:
    mp.start_processes(_worker, args=(_free_port(), job, dtype_name, str(tmp_path)), nprocs=WORLD,
                       start_method="spawn", join=True)
    return torch.load(tmp_path / "result.pt", weights_only=False)


def _single(dtype, method):
    model = tiny_model("gpt2", dtype=dtype)
    batches = tiny_batches(num_batches=3, pad=True)
    op = hessian_operator(model, batches, method=method)
    v = op.random_vector("gaussian", 7)
    return op, op.matvec(v), slq(op, num_iters=12, num_probes=2, reorth="full", seed=3, progress=False)


def _rel(a, b) -> float:
    return float((V.flatten(a) - V.flatten(b)).norm() / V.flatten(b).norm())


def test_data_parallel_hvp_and_slq_equal_single_process(tmp_path):
    got = _run("ddp", "float64", tmp_path)
    op, hv, ref = _single(torch.float64, "rev-rev")
    assert got["tokens"] == op.num_tokens
    assert _rel(got["hv"], hv) < 1e-12
    assert abs(got["loss"] - op.loss()) < 1e-12
    assert abs(got["ritz"] - ref.ritz_values).max() < 1e-8 * abs(ref.ritz_values).max()


@pytest.mark.parametrize("dtype_name,tol", [("float64", 1e-6), ("float32", 1e-4)])
def test_fsdp2_finite_difference_hvp_matches_exact(tmp_path, dtype_name, tol):
    got = _run("fsdp", dtype_name, tmp_path)
    op, hv_exact, _ = _single(torch.float64, "rev-rev")
    assert _rel(got["hv"], [x.double() for x in hv_exact]) < tol
    if dtype_name == "float64":
        _, _, ref_fd = _single(torch.float64, "fd")
        assert abs(got["ritz"] - ref_fd.ritz_values).max() < 1e-8 * abs(ref_fd.ritz_values).max()


def test_device_map_hooks_keep_double_backward():
    """An explicit device map dispatched with accelerate's hooks gives the same exact HVP."""
    from accelerate import dispatch_model

    model = tiny_model("gpt2")
    batches = tiny_batches()
    op = hessian_operator(model, batches, method="rev-rev")
    v = op.random_vector("gaussian", 0)
    ref = op.matvec(v)
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    device_map = {"transformer.wte": devices[0], "transformer.wpe": devices[0], "transformer.h": devices[-1],
                  "transformer.ln_f": devices[-1], "lm_head": devices[0]}
    # main_device="cpu": with a GPU main device accelerate would CPU-*offload* the "cpu" entries (weights on meta)
    dispatched = dispatch_model(tiny_model("gpt2"), device_map=device_map, main_device="cpu", force_hooks=True)
    assert any(hasattr(m, "_hf_hook") for m in dispatched.modules())
    check_materialised(dispatched)
    op_map = hessian_operator(dispatched, batches, method="rev-rev")
    assert _rel(op_map.matvec(v), ref) < 1e-12


def test_offloaded_weights_are_refused():
    model = tiny_model("gpt2")
    model.hf_device_map = {"transformer.wte": "cpu", "transformer.h": "disk"}
    with pytest.raises(ValueError, match="offloaded"):
        check_materialised(model)

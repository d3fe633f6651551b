"""Engines beyond one process: data parallel and FSDP2 with 2 gloo processes on CPU, device maps."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def _gloo_rank(rank: int, port: int, out_dir: str):
    """One rank of a 2-process gloo group: a failure is written to ``error<rank>.txt``; on success a barrier
    before tearing gloo down, then a hard exit: gloo's threads can otherwise abort the interpreter's shutdown
    ("terminate called without an active exception") after the work succeeded."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        yield
    except Exception:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        dist.destroy_process_group()
        raise
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def _sharded_operator(job: str, dtype: torch.dtype = torch.float64):
    """The tiny GPT-2's operator on 3 padded batches (uneven over 2 ranks on purpose): data parallel with
    rev-rev, or FSDP2 (finite differences)."""
    model = tiny_model("gpt2", dtype=dtype)
    batches = tiny_batches(num_batches=3, pad=True)
    if job == "ddp":
        return DataParallelHessianOperator(model, batches, method="rev-rev")
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    return FSDPHessianOperator(model, batches)


def _worker(rank: int, port: int, job: str, dtype_name: str, out_dir: str) -> None:
    with _gloo_rank(rank, port, out_dir):
        op = _sharded_operator(job, getattr(torch, dtype_name))
        v = op.random_vector("gaussian", 7)
        hv = op.matvec(v)
        result = slq(op, num_iters=12, num_probes=2, reorth="full", seed=3, progress=False)
        loss = op.loss()  # a collective: every rank calls it
        if rank == 0:
            torch.save({"hv": [x.detach().cpu() for x in hv], "ritz": result.ritz_values, "loss": loss,
                        "tokens": op.num_tokens}, os.path.join(out_dir, "result.pt"))


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


# ---------------------------------------------------------------------------------------------- eigenpairs and solves
class _Interrupted(Exception):
    """Raised by an eigsh callback on every rank at the same restart, as a kill of the whole job would."""


def _stop_at_restart(restarts: int):
    def callback(state):
        if state.num_restarts >= restarts:
            raise _Interrupted

    return callback


def _eigenpairs(result) -> tuple:
    return result.eigenvalues, [V.flatten(x).detach().cpu() for x in result.eigenvectors], result.residuals


EIGS_K = 3
EIGS_EXTRA = 6  # basis 9: about ten thick restarts on the 1,208-dimensional tiny Hessian
FD_TOL = 1e-6  # fd products are within ~1e-7 of H v in float64: residuals cannot go much below that


def _eig_worker(rank: int, port: int, job: str, out_dir: str) -> None:
    """eigsh top-k (LA), and under ddp cg and an interrupted + resumed checkpointed eigsh."""
    from pathlib import Path

    from hess_utils.algorithms.eigsh import eigsh
    from hess_utils.algorithms.solve import cg

    with _gloo_rank(rank, port, out_dir):
        op = _sharded_operator(job)
        tol = 1e-10 if job == "ddp" else FD_TOL  # fsdp: method="fd"
        kwargs = dict(k=EIGS_K, tol=tol, num_extra=EIGS_EXTRA, progress=False)
        out: dict = {"LA": _eigenpairs(eigsh(op, which="LA", **kwargs))}
        if job == "ddp":
            g = op.gradient()
            out["gradient"] = V.flatten(g).cpu()
            out["cg"] = V.flatten(cg(op, g, damping=7.0, tol=1e-12, progress=False).x).cpu()
            # Checkpointed on every rank into one folder: interrupted at restart 3, then resumed; only rank 0 writes.
            shared = Path(out_dir) / "shared"
            try:
                eigsh(op, which="LA", **kwargs, checkpoint_dir=shared, callback=_stop_at_restart(3))
            except _Interrupted:
                pass
            out["pointer_at_stop"] = (shared / "checkpoint.json").read_text()
            out["resumed"] = _eigenpairs(eigsh(op, which="LA", **kwargs, checkpoint_dir=shared))
            out["finished"] = _eigenpairs(eigsh(op, which="LA", **kwargs, checkpoint_dir=shared))
            # A folder per rank: rank 1 writes nothing (one cycle is enough to see it; it warns, unconverged).
            eigsh(op, which="LA", **{**kwargs, "max_products": EIGS_K + EIGS_EXTRA},
                  checkpoint_dir=Path(out_dir) / f"own{rank}")
        if rank == 0:
            torch.save(out, os.path.join(out_dir, "eigs.pt"))


def _run_eigs(job: str, tmp_path) -> dict:
    mp.start_processes(_eig_worker, args=(_free_port(), job, str(tmp_path)), nprocs=WORLD, start_method="spawn",
                       join=True)
    return torch.load(tmp_path / "eigs.pt", weights_only=False)


def _single_eigs(method: str, tol: float) -> tuple:
    from hess_utils.algorithms.eigsh import eigsh

    op = hessian_operator(tiny_model("gpt2"), tiny_batches(num_batches=3, pad=True), method=method)
    kwargs = dict(k=EIGS_K, tol=tol, num_extra=EIGS_EXTRA, progress=False)
    return op, {"LA": _eigenpairs(eigsh(op, which="LA", **kwargs))}


def _vector_errors(got: list, ref: list) -> list[float]:
    """``min(||x - u||, ||x + u||)`` per pair: eigenvectors agree up to sign."""
    return [min(float((x - u).norm()), float((x + u).norm())) for x, u in zip(got, ref, strict=True)]


def test_data_parallel_eigsh_and_cg_equal_single_process(tmp_path):
    """rev-rev under DDP: each H v equals the single process's to rounding (1e-12 above), so eigsh converged to a
    1e-10 residual finds eigenvalues within residual^2 / gap of the same exact ones on both: 1e-8 relative is a
    wide margin, and eigenvectors within residual / gap (~1e-9 here) of each other; cg's solution to 1e-10."""
    import json

    from hess_utils.algorithms.solve import cg

    got = _run_eigs("ddp", tmp_path)
    op, ref = _single_eigs("rev-rev", 1e-10)
    values, vectors, residuals = got["LA"]
    ref_values, ref_vectors, _ = ref["LA"]
    assert abs(values - ref_values).max() <= 1e-8 * abs(ref_values).max()
    assert max(_vector_errors(vectors, ref_vectors)) < 1e-7
    assert residuals.max() <= 1e-10 * abs(ref_values).max() * 10
    g = op.gradient()
    assert float((got["gradient"] - V.flatten(g)).norm() / V.flatten(g).norm()) < 1e-12
    x = V.flatten(cg(op, g, damping=7.0, tol=1e-12, progress=False).x)  # H + 7 I is positive definite
    assert float((got["cg"] - x).norm() / x.norm()) < 1e-10
    # The checkpointed run under DDP: stopped at restart 3, resumed to the same numbers as the uninterrupted
    # run of the same ranks (bitwise: gloo's CPU all-reduce of two ranks is deterministic), then loaded.
    assert json.loads(got["pointer_at_stop"])["num_restarts"] == 3
    for key in ("resumed", "finished"):
        values, vectors, residuals = got[key]
        assert (values == got["LA"][0]).all() and (residuals == got["LA"][2]).all(), key
        assert all(torch.equal(x, y) for x, y in zip(vectors, got["LA"][1], strict=True)), key
    assert (tmp_path / "own0" / "checkpoint.json").exists() and not (tmp_path / "own1").exists()


def test_fsdp2_finite_difference_eigsh_matches_single_process(tmp_path):
    """FSDP2 computes H v by central differences of gradients (method fd, float64).

    Against the single process's fd operator (the same formula and step, gradients equal to rounding) the
    eigenvalues agree to 1e-8 relative, as SLQ's Ritz values above. Against the exact rev-rev eigenvalues
    the fd operator itself is off by its truncation and rounding error, ~1e-7 ||H||, and the pairs are only
    converged to FD_TOL = 1e-6: eigenvalues within 1e-6 relative, and eigenvectors of separated
    eigenvalues within (1e-6 ||H||) / gap.
    """
    got = _run_eigs("fsdp", tmp_path)
    _, ref_fd = _single_eigs("fd", FD_TOL)
    _, exact = _single_eigs("rev-rev", 1e-10)
    values, vectors, _ = got["LA"]
    scale = abs(exact["LA"][0]).max()
    assert abs(values - ref_fd["LA"][0]).max() <= 1e-8 * abs(ref_fd["LA"][0]).max()
    assert abs(values - exact["LA"][0]).max() <= 1e-6 * scale
    assert max(_vector_errors(vectors, exact["LA"][1])) < 1e-4

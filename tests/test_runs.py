"""Checkpointed SLQ runs: resumed runs equal uninterrupted ones bit for bit; bad folders are refused."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import traceback
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hess_utils import runs
from hess_utils.algorithms import slq
from hess_utils.checkpoint import CheckpointError, load_slq_result
from hess_utils.operators.base import SymmetricOperator
from hess_utils.operators.hessian import hessian_operator
from tests.tiny import tiny_batches, tiny_model

REPO = Path(__file__).resolve().parents[1]
ITERS, PROBES, SEED = 15, 3, 4


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: bit-identical comparisons across processes, and no OpenMP spinning on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _operator():
    return hessian_operator(tiny_model("gpt2"), tiny_batches(num_batches=3, pad=True), method="rev-rev")


class Interrupting(SymmetricOperator):
    """Wraps an operator; raises KeyboardInterrupt at product number ``stop_at`` (as a Ctrl-C would)."""

    def __init__(self, inner: SymmetricOperator, stop_at: int | None = None) -> None:
        self.inner, self.stop_at, self.count = inner, stop_at, 0
        self.param_names, self.shapes = inner.param_names, inner.shapes
        self.dtypes, self.devices = inner.dtypes, inner.devices

    def _matvec(self, v):
        self.count += 1
        if self.stop_at is not None and self.count >= self.stop_at:
            raise KeyboardInterrupt
        return self.inner.matvec(v)


def _same_tridiagonals(a, b) -> None:
    assert a.num_probes == b.num_probes
    for ra, rb in zip(a.runs, b.runs, strict=True):
        assert np.array_equal(ra.alphas, rb.alphas), np.abs(ra.alphas - rb.alphas).max()
        assert np.array_equal(ra.betas, rb.betas), np.abs(ra.betas - rb.betas).max()
        assert ra.last_beta == rb.last_beta


def _interrupted_then_resumed(op, run_dir: Path, stop_at: int, reorth: str, **kw):
    # The product counts of these tests assume probes one after the other (default "auto" interleaves two on
    # a CPU); groups of probes are checkpointed and resumed in test_lockstep_group_checkpoint_resumes_bit_for_bit.
    kw.setdefault("probes_at_once", 1)
    wrapped = Interrupting(op, stop_at)
    with pytest.raises(KeyboardInterrupt):
        slq(wrapped, ITERS, PROBES, checkpoint_dir=run_dir, reorth=reorth, seed=SEED, progress=False, **kw)
    resumed = Interrupting(op)
    result = slq(resumed, ITERS, PROBES, checkpoint_dir=run_dir, reorth=reorth, seed=SEED, progress=False, **kw)
    return result, resumed.count


# ---------------------------------------------------------------------------------------------- equality
@pytest.mark.parametrize("reorth", ["full", "offload", "none"])
def test_checkpointed_slq_equals_slq_and_resume_is_bit_identical(tmp_path, reorth):
    op = _operator()
    ref = slq(op, ITERS, PROBES, reorth=reorth, seed=SEED, progress=False)
    straight = slq(op, ITERS, PROBES, reorth=reorth, seed=SEED, progress=False, checkpoint_dir=tmp_path / "straight",
                   checkpoint_every=4)
    _same_tridiagonals(straight, ref)
    # Interrupt in probe 1 at iteration 9 (last checkpoint at iteration 8): 7 + 1 products are redone.
    stop_at = ITERS + 9
    resumed, count = _interrupted_then_resumed(op, tmp_path / "resumed", stop_at, reorth, checkpoint_every=4)
    _same_tridiagonals(resumed, ref)
    assert np.array_equal(resumed.ritz_values, ref.ritz_values, equal_nan=True)
    assert count == PROBES * ITERS - (ITERS + 8)  # resumed from the checkpoint, not from scratch
    record = json.loads((tmp_path / "resumed" / "run.json").read_text())
    sessions = record["timings"]["sessions"]
    assert len(sessions) == 2 and sessions[1]["resumed_at"] == {"probe": 1, "iteration": 8}
    assert record["timings"]["matvecs"] == PROBES * ITERS


_RESULT_ARRAYS = ("ritz_values", "ritz_weights", "ghost_masks", "residual_estimates", "alphas", "betas", "iterations")


def _same_results(a, b) -> None:
    for name in _RESULT_ARRAYS:
        assert np.array_equal(getattr(a, name), getattr(b, name), equal_nan=True), name
    assert (a.num_iters, a.num_probes, a.dim, a.seed, a.probe, a.reorth) == (
        b.num_iters, b.num_probes, b.dim, b.seed, b.probe, b.reorth)


@pytest.mark.parametrize(("reorth", "probes_at_once"), [("full", 1), ("none", 1), ("full", 3)])
def test_slq_with_checkpoint_dir_returns_the_same_ritz_values_and_weights(tmp_path, reorth, probes_at_once):
    """One driver: a run folder changes where the state goes, not a single number of the result."""
    op = _operator()
    plain = slq(op, ITERS, PROBES, reorth=reorth, seed=SEED, progress=False, probes_at_once=probes_at_once)
    saved = slq(op, ITERS, PROBES, reorth=reorth, seed=SEED, progress=False, probes_at_once=probes_at_once,
                checkpoint_dir=tmp_path, checkpoint_every=4)
    _same_results(saved, plain)
    _same_results(load_slq_result(tmp_path), plain)  # what the folder holds
    frame, _ = runs.load_run(tmp_path)
    assert np.array_equal(frame["value"].to_numpy(), plain.ritz_values.reshape(-1))
    assert np.array_equal(frame["weight"].to_numpy(), plain.ritz_weights.reshape(-1))
    assert not (tmp_path / "basis").exists() or not any((tmp_path / "basis").iterdir())


def test_run_folder_options_without_a_folder_are_refused():
    op = _operator()
    with pytest.raises(ValueError, match="config.*checkpoint_dir"):
        slq(op, 3, 1, progress=False, config={"model": "tiny"})
    with pytest.raises(ValueError, match="record.*checkpoint_dir"):
        slq(op, 3, 1, progress=False, record={"loss": 1.0})


def test_bad_arguments_write_no_run_folder(tmp_path):
    with pytest.raises(ValueError, match="unknown reorth"):
        slq(_operator(), 5, 1, reorth="nope", progress=False, checkpoint_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _hadamard_operator() -> SymmetricOperator:
    """8 x 8, eigenvectors two 4 x 4 Hadamard blocks: a Rademacher probe that is (plus or minus) a Hadamard
    vector of a block has one non-zero projection there, any other has four, so the Krylov spaces of the probes
    have dimension 2, 5 or 8 and a lockstep group breaks down probe by probe."""
    from hess_utils.operators import as_operator

    h = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64) / 2
    q = torch.block_diag(h, h)
    eigenvalues = torch.tensor([3.0, 1.0, -0.5, 2.0, 0.25, -1.5, 4.0, 0.75], dtype=torch.float64)
    return Interrupting(as_operator(q @ torch.diag(eigenvalues) @ q.T))


@pytest.mark.parametrize(("every", "stop_at", "redone", "again"), [(1, 13, 3, 3), (3, 11, 7, 1)])
def test_lockstep_group_checkpoint_resumes_bit_for_bit(tmp_path, every, stop_at, redone, again):
    """Probes advancing together are checkpointed as a group, one that broke down early by its result.

    Seed 3: probes 0, 1, 2 break down after 5, 8 and 2 iterations; probe 3 runs in a second group. Products
    of the group: 3 per step for steps 1-2, 2 for steps 3-5, 1 for steps 6-8 (16 in all). Resumed with
    ``probes_at_once=again``: the group in flight continues as it started, the later probes follow ``again``.
    """
    iters, probes, seed = 8, 4, 3
    ref = slq(_hadamard_operator(), iters, probes, seed=seed, progress=False, probes_at_once=3)
    assert ref.iterations[:3].tolist() == [5, 8, 2]
    with pytest.raises(KeyboardInterrupt):
        slq(Interrupting(_hadamard_operator(), stop_at), iters, probes, seed=seed, progress=False, probes_at_once=3,
            checkpoint_dir=tmp_path, checkpoint_every=every)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["state"] is None and len(saved["lockstep"]) == 3
    assert "result" in saved["lockstep"][2]  # probe 2 broke down at step 2, before every checkpoint
    resumed_op = _hadamard_operator()
    resumed = slq(resumed_op, iters, probes, seed=seed, progress=False, probes_at_once=again,
                  checkpoint_dir=tmp_path, checkpoint_every=every)
    assert resumed_op.count == redone + ref.iterations[3]
    _same_results(resumed, ref)
    assert sorted(p.name for p in (tmp_path / "basis").iterdir()) == []


def test_checkpoint_every_zero_saves_after_probes_only(tmp_path):
    op = _operator()
    ref = slq(op, ITERS, PROBES, reorth="full", seed=SEED, progress=False)
    resumed, count = _interrupted_then_resumed(op, tmp_path, 2 * ITERS + 5, "full", checkpoint_every=0)
    _same_tridiagonals(resumed, ref)
    assert count == ITERS  # probe 2 redone from its start


# ---------------------------------------------------------------------------------------------- real kill
_KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {repo!r})
    from hess_utils.algorithms import slq
    from hess_utils.operators.hessian import hessian_operator
    from tests.tiny import tiny_batches, tiny_model

    run_dir, delay = sys.argv[1], float(sys.argv[2])
    op = hessian_operator(tiny_model("gpt2"), tiny_batches(num_batches=3, pad=True), method="rev-rev")
    inner = op._matvec
    def slow(v):  # slow enough for the test to kill it mid-probe
        time.sleep(delay)
        return inner(v)
    op._matvec = slow
    slq(op, 30, 3, reorth="full", seed=5, progress=False, checkpoint_dir=run_dir, checkpoint_every=4,
        config={{"test": "kill"}}, probes_at_once=1)  # probe by probe: the layout the test kills into
""")


def _script_command(run_dir: Path, delay: float) -> list[str]:
    return [sys.executable, "-c", _KILL_SCRIPT.format(repo=str(REPO)), str(run_dir), str(delay)]


def test_sigkill_mid_run_then_resume_gives_the_same_tridiagonal(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_script_command(killed, 0.04), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sidecar = killed / "checkpoint.json"
    deadline = time.monotonic() + 120
    try:
        while True:  # until a checkpoint in the middle of probe 1 (a basis on disk) exists
            assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, "no mid-run checkpoint within 120 s"
            if sidecar.exists():
                info = json.loads(sidecar.read_text())
                if info["probe_index"] == 1 and info["iteration"] >= 8:
                    break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "ritz.csv").exists()
    # A kill between the sidecar's rename and the checkpoint's leaves the sidecar one checkpoint ahead (both
    # digests accepted, module docstring of hess_utils.checkpoint): the run resumes from checkpoint.pt.
    at_kill = torch.load(killed / "checkpoint.pt", weights_only=True)
    sidecar_products = json.loads(sidecar.read_text())["products"]
    assert at_kill["products"] in (sidecar_products, sidecar_products - 4)

    # The same command resumes (the delay is the same too); the reference runs uninterrupted elsewhere.
    resumed = subprocess.run(_script_command(killed, 0.04), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {killed} at probe 1" in resumed.stdout
    straight = tmp_path / "straight"
    ref = subprocess.run(_script_command(straight, 0.0), env=env, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]

    got, want = runs.load_tridiagonals(killed), runs.load_tridiagonals(straight)
    assert len(got) == len(want) == 3
    for (a1, b1), (a2, b2) in zip(got, want, strict=True):
        assert np.array_equal(a1, a2) and np.array_equal(b1, b2)
    _same_tridiagonals(load_slq_result(killed), load_slq_result(straight))
    sessions = json.loads((killed / "run.json").read_text())["timings"]["sessions"]
    assert sessions[-1]["products"] == 90 - at_kill["products"]
    assert sorted(p.name for p in (killed / "basis").iterdir()) == []  # finished probes' bases are cleaned up


# ---------------------------------------------------------------------------------------------- refusals
def test_changed_parameters_are_refused_naming_each_mismatch(tmp_path):
    op = _operator()
    with pytest.raises(KeyboardInterrupt):
        slq(Interrupting(op, 6), ITERS, PROBES, checkpoint_dir=tmp_path, seed=SEED, checkpoint_every=2, progress=False,
            config={"model": "tiny-gpt2"})
    with pytest.raises(ValueError) as err:
        slq(op, ITERS + 1, PROBES, checkpoint_dir=tmp_path, seed=SEED + 1, checkpoint_every=2, progress=False,
            config={"model": "tiny-llama"})
    message = str(err.value)
    assert f"num_iters: {ITERS} (saved) != {ITERS + 1} (now)" in message
    assert f"seed: {SEED} (saved) != {SEED + 1} (now)" in message
    assert "model: 'tiny-gpt2' (saved) != 'tiny-llama' (now)" in message
    assert "--out" in message and "delete" in message
    # The folder is untouched and still resumes with the original parameters.
    result = slq(op, ITERS, PROBES, checkpoint_dir=tmp_path, seed=SEED, checkpoint_every=2, progress=False,
                 config={"model": "tiny-gpt2"})
    _same_tridiagonals(result, slq(op, ITERS, PROBES, seed=SEED, progress=False))


def test_another_operator_is_refused(tmp_path):
    slq(_operator(), 5, 1, checkpoint_dir=tmp_path, progress=False)
    other = hessian_operator(tiny_model("gpt2"), tiny_batches(num_batches=3, pad=True), params="transformer.h.*",
                             method="rev-rev")
    with pytest.raises(ValueError) as err:
        slq(other, 5, 1, checkpoint_dir=tmp_path, progress=False)
    assert f"dim: 1208 (saved) != {other.dim} (now)" in str(err.value) and "blocks_sha256" in str(err.value)


def _partial_run(op, run_dir: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        slq(Interrupting(op, ITERS + 7), ITERS, PROBES, seed=SEED, progress=False, checkpoint_dir=run_dir,
            checkpoint_every=3)
    assert (run_dir / "checkpoint.pt").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-sidecar", "basis"])
def test_corrupt_checkpoint_is_refused(tmp_path, damage):
    op = _operator()
    _partial_run(op, tmp_path)
    target = tmp_path / "checkpoint.pt"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x10
        target.write_bytes(bytes(data))
    elif damage == "no-sidecar":
        (tmp_path / "checkpoint.json").unlink()
    else:
        chunk = sorted((tmp_path / "basis").iterdir())[-1]
        chunk.write_bytes(chunk.read_bytes()[:-8])
    with pytest.raises(CheckpointError) as err:
        slq(Interrupting(op, 1), ITERS, PROBES, checkpoint_dir=tmp_path, seed=SEED, checkpoint_every=3, progress=False)
    assert "delete" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_kill_between_sidecar_and_checkpoint_rename_is_recoverable(tmp_path):
    """The sidecar is renamed first and accepts the checkpoint it replaces: a kill between the two is harmless."""
    op = _operator()
    one = {"probes_at_once": 1, "checkpoint_every": 3}  # probe after probe: the iterations below
    with pytest.raises(KeyboardInterrupt):  # checkpoints at iterations 3 and 6 of probe 1
        slq(Interrupting(op, ITERS + 7), ITERS, PROBES, seed=SEED, progress=False, checkpoint_dir=tmp_path, **one)
    old = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(KeyboardInterrupt):  # resumes at 6, saves at 9, stops at 10
        slq(Interrupting(op, 5), ITERS, PROBES, checkpoint_dir=tmp_path, seed=SEED, progress=False, **one)
    assert (tmp_path / "checkpoint.pt").read_bytes() != old  # the save at 9 happened: there is a race to undo
    (tmp_path / "checkpoint.pt").write_bytes(old)  # as if killed after the sidecar's rename, before the checkpoint's
    result = slq(op, ITERS, PROBES, checkpoint_dir=tmp_path, seed=SEED, progress=False, **one)
    _same_tridiagonals(result, slq(op, ITERS, PROBES, seed=SEED, progress=False))


def test_folder_with_results_but_no_config_is_refused(tmp_path):
    (tmp_path / "ritz.csv").write_text("probe,value,weight\n0,1.0,1.0\n")
    with pytest.raises(ValueError, match="no config.json"):
        slq(_operator(), 5, 1, checkpoint_dir=tmp_path, progress=False)


# ---------------------------------------------------------------------------------------------- finished runs
def test_finished_run_is_returned_without_recomputing(tmp_path, capsys):
    op = _operator()
    first = slq(op, ITERS, PROBES, checkpoint_dir=tmp_path, seed=SEED, progress=False)
    capsys.readouterr()
    never = Interrupting(op, stop_at=1)  # any product raises
    again = slq(never, ITERS, PROBES, checkpoint_dir=tmp_path, seed=SEED, progress=False)
    assert never.count == 0
    assert "nothing recomputed" in capsys.readouterr().out
    _same_tridiagonals(again, first)
    assert np.array_equal(again.ritz_weights, first.ritz_weights)


def test_run_folder_files_reload_and_replot(tmp_path):
    from hess_utils.plotting import plot_spectrum_run

    op = _operator()
    result = slq(op, ITERS, 2, checkpoint_dir=tmp_path, seed=SEED, progress=False,
                 record=lambda: {"model": "tiny", "data": "tiny", "num_tokens": op.num_tokens, "method": op.method,
                                 "loss": op.loss()})
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "checkpoint.pt", "checkpoint.json", "ritz.csv", "tridiagonal.csv", "probes.csv",
            "density.csv", "run.json"} <= names
    frame, record = runs.load_run(tmp_path)
    assert list(frame.columns[:3]) == ["probe", "value", "weight"] and "ghost" in frame.columns
    assert len(frame) == 2 * ITERS
    assert np.array_equal(frame["value"].to_numpy(), result.ritz_values.reshape(-1))
    assert np.allclose(frame.groupby("probe")["weight"].sum(), 1.0)
    for key in ("model", "data", "loss", "versions", "git_commit", "devices", "timings", "config", "dim"):
        assert key in record, key
    assert record["density"]["sigma_is"].startswith("the standard deviation")
    # The default re-orthogonalisation's diagnostics: measured and estimated loss, steps, per probe.
    ortho = record["orthogonality"]
    assert ortho["reorth"] == result.reorth == "partial"
    assert ortho["measured_max"] == max(r.orthogonality_loss for r in result.runs)
    assert ortho["measured_max"] <= ortho["estimated_max"] <= 1.5e-8  # sqrt(eps), float64
    assert ortho["reorth_steps"] == [r.num_reorth_steps for r in result.runs]
    assert ortho["check_steps"] == [len(r.check_steps) for r in result.runs]
    assert ortho["recalibration_steps"] == [len(r.recalibration_steps) for r in result.runs]
    probes = runs.load_table(tmp_path, "probes.csv")
    assert probes["reorth_steps"].tolist() == ortho["reorth_steps"]
    assert probes["max_omega"].tolist() == [r.max_omega for r in result.runs]
    assert probes["recalibration_steps"].tolist() == ortho["recalibration_steps"]
    density = runs.load_table(tmp_path, "density.csv")
    assert list(density.columns) == ["eigenvalue", "density"]
    tri = runs.load_tridiagonals(tmp_path)
    assert all(np.array_equal(a, r.alphas) and np.array_equal(b, r.betas)
               for (a, b), r in zip(tri, result.runs, strict=True))
    paths = plot_spectrum_run(tmp_path, tmp_path / "figure")
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)


# ---------------------------------------------------------------------------------------------- distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from hess_utils.operators.engines import DataParallelHessianOperator

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        op = DataParallelHessianOperator(tiny_model("gpt2"), tiny_batches(num_batches=3, pad=True), method="rev-rev")
        straight = slq(op, ITERS, PROBES, checkpoint_dir=Path(out_dir) / "straight", seed=SEED, checkpoint_every=4,
                       progress=False)
        try:  # every rank is interrupted at the same product, as a job killed as a whole
            slq(Interrupting(op, ITERS + 10), ITERS, PROBES, checkpoint_dir=Path(out_dir) / "resumed", seed=SEED,
                checkpoint_every=4, progress=False)
        except KeyboardInterrupt:
            pass
        dist.barrier()
        resumed = slq(op, ITERS, PROBES, seed=SEED, progress=False, checkpoint_dir=Path(out_dir) / "resumed",
                      checkpoint_every=4)
        torch.save({"straight": straight.alphas, "resumed": resumed.alphas, "ritz": resumed.ritz_values,
                    "betas": (straight.betas, resumed.betas)}, Path(out_dir) / f"rank{rank}.pt")
    except Exception:
        Path(out_dir, f"error{rank}.txt").write_text(traceback.format_exc())
        dist.destroy_process_group()
        raise
    dist.barrier()  # then a hard exit: gloo's threads can abort a normal shutdown after the work succeeded
    dist.destroy_process_group()
    os._exit(0)


def test_data_parallel_run_resumes_on_every_rank(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for g in got:  # every rank resumed to exactly the uninterrupted run
        assert np.array_equal(g["straight"], g["resumed"])
        assert np.array_equal(g["betas"][0], g["betas"][1], equal_nan=True)
    assert np.array_equal(got[0]["resumed"], got[1]["resumed"])
    ref = slq(_operator(), ITERS, PROBES, seed=SEED, progress=False)
    assert np.abs(got[0]["ritz"] - ref.ritz_values).max() < 1e-8 * np.abs(ref.ritz_values).max()
    assert (tmp_path / "resumed" / "ritz.csv").exists()


def test_cached_tables_compute_once_and_refuse_other_config(tmp_path):
    calls = []
    def compute():
        calls.append(1)
        return {"a": pd.DataFrame({"x": [0.1, 0.2]})}, {"note": "hi"}
    folder = runs.result_dir(tmp_path, "demo", {"k": 1})
    t1, r1 = runs.cached_tables(folder, {"k": 1}, compute, model="m")
    t2, r2 = runs.cached_tables(folder, {"k": 1}, compute, model="m")
    assert len(calls) == 1
    assert t2["a"]["x"].tolist() == [0.1, 0.2] and r2["model"] == "m" and r2["note"] == "hi"
    assert "versions" in r2 and r2["config"] == {"k": 1}
    assert runs.result_dir(tmp_path, "demo", {"k": 2}) != folder
    with pytest.raises(ValueError, match="k: 1 \\(saved\\) != 2"):
        runs.cached_tables(folder, {"k": 2}, compute)
    (folder / "done.json").unlink()  # an interrupted run is recomputed
    runs.cached_tables(folder, {"k": 1}, compute)
    assert len(calls) == 2

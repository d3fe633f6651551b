"""The command line: run folders, re-runs, bad input, and the same Ritz values under every engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from hess_utils.cli import main
from hess_utils.paths import repo_root

SMALL = ["--model", "tiny-gpt2", "--data", "wiki", "--seq-len", "16", "--num-sequences", "3", "--batch-size", "1",
         "--dtype", "float64", "--seed", "1", "--params", "transformer.h.0.*", "--no-progress"]
SPECTRUM = ["spectrum", *SMALL, "--num-iters", "8", "--probes", "2"]


def _ritz(folder) -> np.ndarray:
    frame = pd.read_csv(folder / "ritz.csv")
    return frame.sort_values(["probe", "value"])["value"].to_numpy()


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "single"
    assert main([*SPECTRUM, "--out", str(out)]) == 0
    return out


def test_spectrum_writes_the_run_folder(single_run):
    frame = pd.read_csv(single_run / "ritz.csv")
    assert list(frame.columns[:3]) == ["probe", "value", "weight"]
    assert len(frame) == 16 and sorted(frame["probe"].unique()) == [0, 1]
    np.testing.assert_allclose(frame.groupby("probe")["weight"].sum(), 1.0, atol=1e-12)
    record = json.loads((single_run / "run.json").read_text())
    for key in ("model", "data", "seed", "versions", "git_commit", "devices", "timings", "dim", "num_tokens"):
        assert key in record, key
    assert record["model"] == "tiny-gpt2" and record["seed"] == 1 and record["num_tokens"] == 3 * 15
    # The fast path is the default, and run.json says what it cost: a gradient, the median product, the ratio.
    assert record["keep_graph"] == "auto" and record["method"] == "rev-rev"
    assert record["keep_graph_fallback"] is None and record["graph_bytes"] > 0  # kept: the decision is recorded
    timings = record["timings"]
    assert timings["gradient_s"] > 0 and timings["median_product_s"] > 0 and timings["products"] == 16
    assert timings["product_per_gradient"] == pytest.approx(timings["median_product_s"] / timings["gradient_s"])


def test_rerun_recomputes_nothing_and_other_parameters_are_refused(single_run, capsys):
    assert main([*SPECTRUM, "--out", str(single_run)]) == 0
    assert "nothing recomputed" in capsys.readouterr().out
    changed = [a if a != "8" else "9" for a in SPECTRUM]  # --num-iters 9
    assert main([*changed, "--out", str(single_run)]) == 2
    err = capsys.readouterr().err
    assert "num_iters: 8 (saved) != 9 (now)" in err


@pytest.mark.parametrize("argv,message", [
    (["spectrum", "--num-iters", "0"], "--num-iters must be at least 1"),
    (["spectrum", "--engine", "ddp"], "under torchrun"),
    (["spectrum", "--engine", "fsdp", "--method", "rev-rev"], "finite differences only"),
    (["spectrum", "--model", "no-such-model-anywhere"], "tiny-gpt2"),
    (["column", *SMALL, "--index", "999999999"], "out of range"),
    (["spectrum", "--method", "rev-rev", "--fd-eps", "1e-4"], "--method fd only"),
    (["spectrum", "--method", "fd", "--fd-eps", "0"], "--fd-eps must be positive"),
])
def test_bad_input_is_a_clear_error(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    message_start = err.rfind("error: ")  # after any loading progress bar
    assert message_start >= 0 and message in err[message_start:], err
    assert "Traceback" not in err


def test_diagonal_and_column_write_their_files(tmp_path):
    assert main(["diagonal", *SMALL, "--probes", "4", "--out", str(tmp_path / "d")]) == 0
    summary = pd.read_csv(tmp_path / "d" / "diagonal.csv")
    assert summary["param"].str.startswith("transformer.h.0.").all()
    assert main(["column", *SMALL, "--index", "0", "5", "--out", str(tmp_path / "c")]) == 0
    assert len(pd.read_csv(tmp_path / "c" / "columns.csv")) == 2
    thresholds = pd.read_csv(tmp_path / "c" / "thresholds.csv")
    assert len(thresholds) > 0


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "hess_utils",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=repo_root(), env=env)


@pytest.mark.parametrize("engine,method", [("ddp", "rev-rev"), ("fsdp", "fd")])
def test_engines_under_torchrun_give_the_single_process_ritz_values(engine, method, tmp_path):
    single = tmp_path / "single"
    assert main([*SPECTRUM, "--method", method, "--out", str(single)]) == 0
    proc = _torchrun([*SPECTRUM, "--engine", engine, "--method", method, "--device", "cpu",
                      "--out", str(tmp_path / engine)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ref, got = _ritz(single), _ritz(tmp_path / engine)
    assert np.abs(got - ref).max() < 1e-8 * np.abs(ref).max()
    record = json.loads((tmp_path / engine / "run.json").read_text())
    assert record["world_size"] == 2 and record["backend"] == "gloo"


def test_fd_eps_reaches_the_operator_and_the_run_config(tmp_path):
    import json

    out = tmp_path / "fd"
    assert main(["diagonal", *SMALL, "--probes", "2", "--method", "fd", "--fd-eps", "2e-4", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["fd_eps"] == 2e-4


# ---------------------------------------------------------------------------------------------- eigs and solve
# A smaller Hessian than SMALL's (17,024 parameters, one batch of 2 x 12 tokens): both verbs cost tens of products.
EIGS_SMALL = ["--model", "tiny-gpt2", "--data", "wiki", "--seq-len", "12", "--num-sequences", "2", "--batch-size", "2",
              "--dtype", "float64", "--seed", "1", "--params", "transformer.h.0.attn.c_proj.*,transformer.h.0.ln_*",
              "--no-progress"]
EIGS = ["eigs", *EIGS_SMALL, "--k", "3", "--which", "LA", "--tol", "1e-10"]
SOLVE = ["solve", *EIGS_SMALL, "--damping", "1.0", "--tol", "1e-10"]


@pytest.fixture(scope="module")
def _one_thread_cli():
    """One thread: the products are tiny, and OpenMP spins on a busy 2-core box."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def direct_op(_one_thread_cli):
    """The operator of EIGS_SMALL built with the public API, apart from the CLI's own loading code."""
    import torch

    from hess_utils.batches import load_batches
    from hess_utils.models import load_model
    from hess_utils.operators.hessian import hessian_operator

    model, tokenizer = load_model("tiny-gpt2", dtype=torch.float64)
    batches = load_batches("wiki", tokenizer, seq_len=12, num_sequences=2, batch_size=2, split="train", seed=1)
    return hessian_operator(model, batches, params=["transformer.h.0.attn.c_proj.*", "transformer.h.0.ln_*"],
                            method="auto")


@pytest.fixture(scope="module")
def eigs_run(tmp_path_factory, _one_thread_cli):
    out = tmp_path_factory.mktemp("eigs") / "run"
    assert main([*EIGS, "--out", str(out)]) == 0
    return out


def test_eigs_writes_eigenpairs_equal_to_eigsh_on_the_same_operator(eigs_run, direct_op):
    import torch

    from hess_utils.algorithms.directions import gradient_overlap, mass_by_group
    from hess_utils.algorithms.eigsh import eigsh

    for name in ("eigenpairs.csv", "eigenvectors.pt", "mass_by_layer.csv", "gradient_overlap.csv", "run.json",
                 "config.json"):
        assert (eigs_run / name).exists(), name
    ref = eigsh(direct_op, k=3, which="LA", tol=1e-10, seed=1, progress=False)
    pairs = pd.read_csv(eigs_run / "eigenpairs.csv")
    assert list(pairs.columns) == ["index", "eigenvalue", "residual", "relative_residual", "converged"]
    assert pairs["converged"].all() and pairs["index"].tolist() == [0, 1, 2]
    # float64 throughout, same operator and seed: the eigenvalues agree to rounding, far inside 1e-10.
    np.testing.assert_allclose(pairs["eigenvalue"], ref.eigenvalues, rtol=1e-10, atol=0)
    assert (pairs["relative_residual"] <= 1e-10).all()

    vectors = torch.load(eigs_run / "eigenvectors.pt")
    assert len(vectors) == 3 and all(list(v) == direct_op.param_names for v in vectors)
    for value, saved, x in zip(ref.eigenvalues, vectors, ref.eigenvectors, strict=True):
        blocks = [saved[n] for n in direct_op.param_names]
        assert all(b.device.type == "cpu" and b.dtype == torch.float64 for b in blocks)
        # Signs are arbitrary: compare |<saved, x>| (both unit vectors), and check H v = lambda v directly.
        dot = sum(float((a * b).sum()) for a, b in zip(blocks, x, strict=True))
        assert abs(abs(dot) - 1.0) < 1e-10
        hv = direct_op.matvec(blocks)
        residual = sum(float(((h - value * b) ** 2).sum()) for h, b in zip(hv, blocks, strict=True)) ** 0.5
        assert residual <= 1e-10 * ref.scale * 1.01

    masses = pd.read_csv(eigs_run / "mass_by_layer.csv")
    assert list(masses.columns[:2]) == ["eigenvector", "eigenvalue"]
    np.testing.assert_allclose(masses.groupby("eigenvector")["mass"].sum(), 1.0, atol=1e-12)
    for i, x in enumerate(ref.eigenvectors):  # masses do not see the sign
        want = mass_by_group(direct_op, x, by="module")
        np.testing.assert_allclose(masses[masses["eigenvector"] == i]["mass"], want["mass"], rtol=1e-8, atol=1e-14)
    overlap = pd.read_csv(eigs_run / "gradient_overlap.csv")
    want = gradient_overlap(ref, direct_op.gradient())
    assert overlap["index"].tolist() == [2, 1, 0]  # largest first for LA
    np.testing.assert_allclose(overlap["cumulative"], want["cumulative"], rtol=1e-8, atol=1e-14)

    record = json.loads((eigs_run / "run.json").read_text())
    for key in ("model", "data", "seed", "versions", "git_commit", "devices", "timings", "dim", "eigsh", "config"):
        assert key in record, key
    assert record["kind"] == "eigs" and record["dim"] == direct_op.dim == 17024
    np.testing.assert_allclose(record["eigsh"]["eigenvalues"], ref.eigenvalues, rtol=1e-10)
    assert record["eigsh"]["all_converged"] and record["timings"]["gradient_s"] > 0


def test_eigs_rerun_recomputes_nothing_and_other_options_are_refused(eigs_run, capsys):
    stamps = {p.name: p.stat().st_mtime_ns for p in eigs_run.iterdir()}
    assert main([*EIGS, "--out", str(eigs_run)]) == 0
    assert "nothing recomputed" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in eigs_run.iterdir()} == stamps
    changed = [a if a != "3" else "4" for a in EIGS]  # --k 4
    assert main([*changed, "--out", str(eigs_run)]) == 2
    assert "k: 3 (saved) != 4 (now)" in capsys.readouterr().err


@pytest.mark.parametrize("solver", ["cg", "minres"])
def test_solve_writes_the_solution_of_the_damped_system(solver, direct_op, tmp_path, capsys, _one_thread_cli):
    import torch

    from hess_utils import vectors as V
    from hess_utils.algorithms.solve import cg, minres

    out = tmp_path / solver
    assert main([*SOLVE, "--solver", solver, "--out", str(out)]) == 0
    for name in ("solution.pt", "residuals.csv", "run.json", "config.json"):
        assert (out / name).exists(), name
    saved = torch.load(out / "solution.pt")
    x = [saved[n] for n in direct_op.param_names]
    g = direct_op.gradient()
    # The damped system, checked with the independently built operator: ||g - (H + I) x|| / ||g||.
    residual = V.add(g, V.add(direct_op.matvec(x), x), alpha=-1.0)
    assert V.norm(residual) / V.norm(g) <= 1e-9
    ref = (cg if solver == "cg" else minres)(direct_op, g, damping=1.0, tol=1e-10, progress=False)
    assert V.norm(V.add(x, ref.x, alpha=-1.0)) <= 1e-10 * V.norm(ref.x)
    history = pd.read_csv(out / "residuals.csv")
    assert list(history.columns) == ["step", "relative_residual"] and history["relative_residual"].iloc[0] == 1.0
    record = json.loads((out / "run.json").read_text())
    summary = record["solve"]
    assert summary["solver"] == solver and summary["damping"] == 1.0 and summary["converged"]
    assert summary["true_residual"] <= 1e-10 and summary["num_iters"] == len(history) - 1 - summary["num_replacements"]
    assert summary["gradient_dot_solution"] == pytest.approx(V.dot(g, x), rel=1e-10)
    capsys.readouterr()
    assert main([*SOLVE, "--solver", solver, "--out", str(out)]) == 0
    assert "nothing recomputed" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["eigs", "--k", "0"], "--k must be at least 1"),
    (["eigs", "--tol", "0"], "--tol must be a finite number > 0"),
    (["eigs", "--max-products", "0"], "--max-products must be at least 1"),
    (["solve", "--damping", "nan"], "--damping must be finite"),
    (["solve", "--damping", "1", "--max-iters", "0"], "--max-iters must be at least 1"),
    (["eigs", *EIGS_SMALL, "--k", "17024"], "must be below the Hessian's dimension"),
    # H has negative eigenvalues here, so undamped CG must refuse rather than return a meaningless x.
    (["solve", *EIGS_SMALL, "--damping", "0", "--solver", "cg"], "not positive definite"),
])
def test_eigs_and_solve_bad_input_is_a_clear_error(argv, message, capsys, tmp_path, _one_thread_cli):
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    message_start = err.rfind("error: ")
    assert message_start >= 0 and message in err[message_start:], err
    assert "Traceback" not in err


def test_solve_points_a_solver_given_as_method_to_solver(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["solve", "--damping", "1", "--method", "cg"])
    assert exit_info.value.code == 2
    assert "use --solver cg" in capsys.readouterr().err

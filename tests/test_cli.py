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

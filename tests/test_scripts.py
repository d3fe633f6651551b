"""Scripts run end to end on CPU (the GPU checks with gloo in place of nccl; a benchmark on a small operator),
so that they cannot rot unnoticed."""

from __future__ import annotations

import json
import subprocess
import sys

from hess_utils.paths import repo_root


def test_gpu_checks_cpu_smoke(tmp_path):
    out = tmp_path / "gpu_checks.json"
    proc = subprocess.run([sys.executable, str(repo_root() / "scripts" / "gpu_checks.py"), "--cpu-smoke", "--out",
                           str(out)], capture_output=True, text=True, timeout=600, cwd=repo_root())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads(out.read_text())
    checks = {r["check"]: r for r in record["results"]}
    assert len(checks) == 4 and all(r["ok"] for r in checks.values())
    assert checks["offloaded basis keeps cpu memory flat"]["top_ritz_rel_gap"] < 1e-5
    assert checks["device_map cpu + cpu"]["hvp_rel_error"] < 1e-10
    assert checks["FSDP2 finite differences, 1 gloo rank"]["hvp_rel_error"] < 1e-6
    assert "versions" in record and "git_commit" in record


def test_reorth_modes_benchmark_smoke(tmp_path, capsys):
    """``make bench``'s re-orthogonalisation table, on a small diagonal operator: it runs, writes its table, and
    ``partial`` (the SLQ default) matches ``full`` where ``none`` does not."""
    import csv

    from benchmarks import reorth_modes

    out = tmp_path / "modes"
    reorth_modes.main(["--operator", "diag", "--dim", "20000", "--iters", "20", "--out", str(out)])
    rows = {r["mode"]: r for r in csv.DictReader(open(f"{out}.csv"))}
    assert set(rows) == {"full", "partial", "none"} and (tmp_path / "modes.md").exists()
    assert float(rows["partial"]["w1_over_width"]) < 1e-6 < float(rows["none"]["w1_over_width"])
    assert float(rows["partial"]["orthogonality"]) < 3.45e-4  # sqrt(eps), float32
    steps, iters = rows["partial"]["reorth_steps"].split("/")
    assert 0 < int(steps) < int(iters) == 20
    assert "re-orthogonalised at" in capsys.readouterr().out


def test_step_floor_benchmark(capsys):
    """The floor bench runs on a small diagonal operator, and its oracle is priced from the measured parts:
    iteration j reads j rows twice, once a probe, spread over the steps (closed form on made-up parts)."""
    from benchmarks import step_floor

    step_floor.main(["--operator", "diag", "--dim", "20000", "--iters", "12", "--pairs", "5,6", "--repeats", "2",
                     "--pyhessian-s", "1"])
    out = capsys.readouterr().out
    assert "oracle step share" in out and "at most" in out
    parts = {"product_ms": 100.0, "recurrence_ms": 4.0, "coefficients_ms_per_row": 1.0,
             "subtraction_ms_per_row": 0.5, "first_touch_ms_per_row": 2.0, "diagnostic_ms": 30.0}
    floor = step_floor.oracle_floor(parts, iters=10, probes=2, pairs=[4, 5, 99])  # 99 > iters: not reached
    reads = (4 + 5) * 1.5
    assert floor["reads_ms_per_probe"] == reads
    assert floor["step_ms"] == 4.0 + reads / 10
    assert floor["step_share_first_probe"] == (4.0 + reads / 10 + 2.0) / 100.0
    assert abs(floor["slq_s"] - (2 * (10 * (100.0 + 4.0 + reads / 10) + 30.0) + 11 * 2.0) / 1e3) < 1e-12

"""The GPU check script runs end to end on CPU (gloo in place of nccl) so it cannot rot unnoticed."""

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

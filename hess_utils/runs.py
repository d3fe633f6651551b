"""Run folders: results with their provenance, written atomically, re-plottable without recomputing.

A spectrum run folder (written by :func:`hess_utils.algorithms.slq.slq` given ``checkpoint_dir``) holds

``config.json``
    The parameters that define the result (see :func:`hess_utils.checkpoint.slq_config`).
``checkpoint.pt``, ``checkpoint.json``, ``basis/``
    The resumable state (see :mod:`hess_utils.checkpoint`); kept at the end, small once every probe is done.
``ritz.csv``
    One row per Ritz pair: ``probe, value, weight, ghost, residual`` (weights sum to 1 per probe). Written
    last: its presence marks a finished run.
``tridiagonal.csv``
    ``probe, i, alpha, beta``: row ``i`` (0-based) of each probe's Lanczos matrix ``T``; ``beta`` couples rows
    ``i`` and ``i + 1``, so it is empty on each probe's last row (that residual norm is ``last_beta`` in
    ``probes.csv``).
``probes.csv``
    One row per probe: ``probe, seed, iterations, breakdown, last_beta, orthogonality_loss, ghosts, reorth_steps,
    check_steps, recalibration_steps, max_omega`` (the last four: ``reorth="partial"``'s diagnostics).
``density.csv``
    ``eigenvalue, density``: the Gaussian-smoothed spectral density with the default kernel width; the
    kernel's **standard deviation** ``sigma`` is in ``run.json`` under ``density``.
``run.json``
    Provenance (model, data, seed, package versions, git commit, devices) and timings.

A result folder of :func:`cached_results` (notebook tables and dense arrays such as heat maps, computed once)
holds ``config.json`` (a re-run with other parameters is refused, each mismatch named), ``NAME.csv`` per table,
``NAME.npy`` per array (``numpy.save``, no pickle), ``run.json`` and, written last, ``done.json`` naming the
tables and arrays; without it the result counts as unfinished and is recomputed.

All CSV floats are written with Python's shortest round-trip representation, so reading them back gives
the same float64 bits.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hess_utils import _io
from hess_utils.paths import repo_root

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from hess_utils.algorithms.density import DensityResult
    from hess_utils.algorithms.slq import SLQResult

RITZ_FILE = "ritz.csv"
TRIDIAGONAL_FILE = "tridiagonal.csv"
PROBES_FILE = "probes.csv"
DENSITY_FILE = "density.csv"
RUN_FILE = "run.json"
CONFIG_FILE = "config.json"


# ---------------------------------------------------------------------------------------------- provenance
def package_versions() -> dict[str, str]:
    """Versions of the packages a result depends on."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "accelerate", "datasets", "numpy", "scipy", "hess_utils"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    """The commit of the checkout, with ``-dirty`` if it has uncommitted changes; None outside git."""
    try:
        root = repo_root()
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=root, capture_output=True, text=True,
                               timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_list() -> list[str]:
    """The devices this process can see."""
    devices = [f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    return devices


def provenance(**fields: Any) -> dict[str, Any]:
    """A provenance record: the given fields (model, data, seed, parameters...) plus versions, commit, devices."""
    return {
        **fields,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "devices": device_list(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------- configs
def normalise_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` as it reads back from JSON (tuples become lists, unknown objects strings)."""
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def config_mismatches(saved: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, new value)`` for every key whose values differ (``"<absent>"`` when missing)."""
    saved, new = normalise_config(saved), normalise_config(new)
    out = []
    for key in sorted(set(saved) | set(new)):
        old_value, new_value = saved.get(key, "<absent>"), new.get(key, "<absent>")
        if old_value != new_value:
            out.append((key, old_value, new_value))
    return out


def save_config(run_dir: str | Path, config: dict[str, Any]) -> Path:
    """``config.json``, written atomically."""
    return _io.write_json(Path(run_dir) / CONFIG_FILE, normalise_config(config))


def load_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's ``config.json``, or None when the folder has none.

    Raises
    ------
    ValueError
        If the file exists but is not valid JSON.
    """
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is unreadable ({err}); delete the run folder {run_dir} to start over") from err


# ---------------------------------------------------------------------------------------------- tables
def save_table(run_dir: str | Path, name: str, frame: pd.DataFrame) -> Path:
    """``run_dir/name`` as CSV (no index), written atomically."""
    target = Path(run_dir) / name
    with _io.atomic_path(target) as tmp:
        frame.to_csv(tmp, index=False)
    return target


def save_ritz_table(run_dir: str | Path, frame: pd.DataFrame) -> Path:
    """``ritz.csv`` with columns ``probe,value,weight`` (plus any others), written atomically."""
    return save_table(run_dir, RITZ_FILE, frame)


def save_run_json(run_dir: str | Path, record: dict[str, Any]) -> Path:
    """``run.json`` (provenance and timings), written atomically."""
    return _io.write_json(Path(run_dir) / RUN_FILE, record)


def ritz_frame(result: SLQResult) -> pd.DataFrame:
    """One row per Ritz pair: ``probe, value, weight, ghost, residual``; padding of short runs dropped."""
    import pandas as pd

    rows = []
    for p in range(result.num_probes):
        k = int(result.iterations[p])
        rows.append(pd.DataFrame({
            "probe": np.full(k, p, dtype=np.int64),
            "value": result.ritz_values[p, :k],
            "weight": result.ritz_weights[p, :k],
            "ghost": result.ghost_masks[p, :k],
            "residual": result.residual_estimates[p, :k],
        }))
    return pd.concat(rows, ignore_index=True)


def tridiagonal_frame(result: SLQResult) -> pd.DataFrame:
    """``probe, i, alpha, beta`` for every row of every probe's ``T`` (``beta`` NaN on the last row)."""
    import pandas as pd

    rows = []
    for p, run in enumerate(result.runs):
        k = run.num_iters
        beta = np.full(k, np.nan)
        beta[: k - 1] = run.betas
        rows.append(pd.DataFrame({"probe": np.full(k, p, dtype=np.int64), "i": np.arange(k), "alpha": run.alphas,
                                  "beta": beta}))
    return pd.concat(rows, ignore_index=True)


def probes_frame(result: SLQResult) -> pd.DataFrame:
    """One row per probe: ``probe, seed, iterations, breakdown, last_beta, orthogonality_loss, ghosts,
    reorth_steps, check_steps, recalibration_steps, max_omega``: re-orthogonalised iterations (all with
    ``"full"``/``"offload"``, none with ``"none"``), and for ``reorth="partial"`` the checked and the recalibrated
    ones and Simon's estimate of the loss (0 and NaN in the other modes)."""
    import pandas as pd

    return pd.DataFrame({
        "probe": np.arange(result.num_probes),
        "seed": [r.seed for r in result.runs],
        "iterations": [r.num_iters for r in result.runs],
        "breakdown": [r.breakdown for r in result.runs],
        "last_beta": [r.last_beta for r in result.runs],
        "orthogonality_loss": [r.orthogonality_loss for r in result.runs],
        "ghosts": [int(r.ghost_mask.sum()) for r in result.runs],
        "reorth_steps": [int(r.num_iters) if r.reorth in ("full", "offload") else int(r.num_reorth_steps)
                         for r in result.runs],
        "check_steps": [len(r.check_steps or ()) for r in result.runs],
        "recalibration_steps": [len(r.recalibration_steps or ()) for r in result.runs],
        "max_omega": [np.nan if r.max_omega is None else float(r.max_omega) for r in result.runs],
    })


def orthogonality_record(result: SLQResult) -> dict[str, Any]:
    """What ``run.json`` says of the basis: the measured loss of orthogonality (largest over the probes) and,
    for ``reorth="partial"``, the estimate, the re-orthogonalised, checked and recalibrated iterations and the
    rounding level."""
    measured = [float(r.orthogonality_loss) for r in result.runs]
    record: dict[str, Any] = {"reorth": result.reorth,
                              "measured_max": None if all(np.isnan(measured)) else float(np.nanmax(measured))}
    if result.reorth == "partial":
        record.update(
            estimated_max=max(float(r.max_omega or 0.0) for r in result.runs),
            reorth_steps=[int(r.num_reorth_steps) for r in result.runs],
            check_steps=[len(r.check_steps or ()) for r in result.runs],
            recalibration_steps=[len(r.recalibration_steps or ()) for r in result.runs],
            iterations=[int(r.num_iters) for r in result.runs],
            rounding_level=max(float(r.omega_rounding or 0.0) for r in result.runs),
        )
    return record


def density_frame(density: DensityResult) -> pd.DataFrame:
    """``eigenvalue, density`` of a smoothed density (its sigma, a standard deviation, goes to run.json)."""
    import pandas as pd

    return pd.DataFrame({"eigenvalue": density.grid, "density": density.density})


def save_slq_tables(run_dir: str | Path, result: SLQResult) -> dict[str, Any]:
    """Write ``tridiagonal.csv``, ``probes.csv`` and ``density.csv`` (not ``ritz.csv``, written last by the caller).

    Returns
    -------
    dict
        What ``run.json`` should say about the density: ``sigma`` (standard deviation of the Gaussian kernel),
        ``mass_on_grid``, ``num_points``; or the reason it was skipped.
    """
    from hess_utils.algorithms.density import gaussian_density

    save_table(run_dir, TRIDIAGONAL_FILE, tridiagonal_frame(result))
    save_table(run_dir, PROBES_FILE, probes_frame(result))
    try:
        density = gaussian_density(result)
    except ValueError as err:  # e.g. all Ritz values equal: no spread to scale the default sigma by
        return {"skipped": str(err)}
    save_table(run_dir, DENSITY_FILE, density_frame(density))
    return {"file": DENSITY_FILE, "kernel": "gaussian", "sigma": density.sigma,
            "sigma_is": "the standard deviation of the Gaussian kernel (not a variance)",
            "mass_on_grid": density.mass_on_grid, "num_points": int(density.grid.size)}


# ---------------------------------------------------------------------------------------------- loading
def load_run(run_dir: str | Path):
    """``(ritz DataFrame, run.json dict)`` of a saved run, for re-plotting without recomputing."""
    import pandas as pd

    run_dir = Path(run_dir)
    if not (run_dir / RITZ_FILE).exists():
        raise FileNotFoundError(f"{run_dir} holds no ritz.csv: not a finished spectrum run")
    record_path = run_dir / RUN_FILE
    record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.exists() else {}
    return pd.read_csv(run_dir / RITZ_FILE), record


def load_table(run_dir: str | Path, name: str) -> pd.DataFrame:
    """A CSV table of a run folder (``"tridiagonal.csv"``, ``"density.csv"``, ...)."""
    import pandas as pd

    path = Path(run_dir) / name
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: the run is not finished, or is not this kind of run")
    return pd.read_csv(path)


def load_tridiagonals(run_dir: str | Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(alphas, betas), ...]`` per probe from ``tridiagonal.csv`` (float64, exactly as computed)."""
    frame = load_table(run_dir, TRIDIAGONAL_FILE)
    out = []
    for _, rows in frame.groupby("probe", sort=True):
        rows = rows.sort_values("i")
        alphas = rows["alpha"].to_numpy(np.float64)
        betas = rows["beta"].to_numpy(np.float64)[:-1]
        out.append((alphas, betas))
    return out


def finite_or_none(x: float) -> float | None:
    """``x`` for JSON: None instead of NaN or infinity (JSON has neither)."""
    return float(x) if x is not None and math.isfinite(x) else None


# ---------------------------------------------------------------------------------------------- cached results
DONE_FILE = "done.json"


def config_digest(config: dict[str, Any]) -> str:
    """A short, stable digest of a configuration (8 hex digits of the sha256 of its sorted JSON)."""
    import hashlib

    return hashlib.sha256(json.dumps(normalise_config(config), sort_keys=True).encode()).hexdigest()[:8]


def result_dir(base: str | Path, name: str, config: dict[str, Any]) -> Path:
    """``base/name-DIGEST``: one folder per configuration, so the same parameters always find their results."""
    return Path(base) / f"{name}-{config_digest(config)}"


def cached_tables(
    run_dir: str | Path,
    config: dict[str, Any],
    compute: Any,
    **record: Any,
) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """Tables computed once and re-read afterwards: ``({name: DataFrame}, run.json dict)``.

    If ``run_dir`` holds a finished result of this ``config`` (``config.json`` equal, ``done.json`` present),
    its CSV tables are read back and nothing is computed. Otherwise ``compute()`` runs; it returns
    ``{name: DataFrame}`` or ``({name: DataFrame}, extra_record)``. Each table is written as ``name.csv``,
    then ``run.json`` (``record``, ``extra_record``, provenance and the compute time), then ``done.json`` last,
    each atomically, so an interrupted run is recomputed, never half-read. The tables-only case of
    :func:`cached_results` (which also stores arrays).

    Raises
    ------
    ValueError
        If ``run_dir`` holds a result of another configuration (each mismatch named), or ``compute`` returns
        something other than DataFrames.
    """
    import pandas as pd

    def tables_only() -> Any:
        out = compute()
        tables = out[0] if isinstance(out, tuple) else out
        wrong = [name for name, value in tables.items() if not isinstance(value, pd.DataFrame)]
        if wrong:
            raise ValueError(f"cached_tables stores DataFrames only; {wrong} are not (use "
                             "hess_utils.runs.cached_results for arrays)")
        return out

    return cached_results(run_dir, config, tables_only, **record)


def save_array(run_dir: str | Path, name: str, array: np.ndarray) -> Path:
    """``run_dir/name.npy``, written atomically; object arrays are refused (they would need pickle)."""
    array = np.asarray(array)
    if array.dtype == object:
        raise TypeError(f"array {name!r} has dtype object; store numbers only (or a DataFrame as a table)")
    target = Path(run_dir) / f"{name}.npy"
    with _io.atomic_path(target) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    return target


def cached_results(
    run_dir: str | Path,
    config: dict[str, Any],
    compute: Callable[[], Any],
    **record: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tables and arrays computed once and re-read afterwards: ``({name: DataFrame | ndarray}, run.json dict)``.

    ``compute()`` returns ``{name: DataFrame | ndarray}`` or ``(that dict, extra_record)``. If ``run_dir``
    holds a finished result of the same ``config``, it is read back and nothing is computed.

    Raises
    ------
    ValueError
        If ``run_dir`` holds a result of another configuration, or ``compute`` returns something that is
        neither a DataFrame nor an array.
    """
    import pandas as pd

    run_dir = Path(run_dir)
    saved = load_config(run_dir)
    if saved is not None and config_mismatches(saved, config):
        details = "; ".join(f"{k}: {o!r} (saved) != {n!r} (now)" for k, o, n in config_mismatches(saved, config))
        raise ValueError(f"{run_dir} holds a result of other parameters: {details}. Use another folder (see "
                         "hess_utils.result_dir) or delete it to recompute")
    done = run_dir / DONE_FILE
    if saved is not None and done.exists():
        names = json.loads(done.read_text(encoding="utf-8"))
        out: dict[str, Any] = {name: pd.read_csv(run_dir / f"{name}.csv") for name in names.get("tables", [])}
        out.update({name: np.load(run_dir / f"{name}.npy", allow_pickle=False) for name in names.get("arrays", [])})
        return out, json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    save_config(run_dir, config)
    start = time.perf_counter()
    result = compute()
    results, extra = result if isinstance(result, tuple) else (result, {})
    seconds = time.perf_counter() - start
    tables, arrays = [], []
    for name, value in results.items():
        if isinstance(value, pd.DataFrame):
            save_table(run_dir, f"{name}.csv", value)
            tables.append(name)
        elif isinstance(value, np.ndarray):
            save_array(run_dir, name, value)
            arrays.append(name)
        else:
            raise ValueError(f"result {name!r} is a {type(value).__name__}; return DataFrames or numpy arrays")
    run = provenance(**record, **extra, config=normalise_config(config), compute_seconds=seconds,
                          tables=sorted(tables), arrays=sorted(arrays))
    save_run_json(run_dir, run)
    _io.write_json(done, {"tables": sorted(tables), "arrays": sorted(arrays)})
    return dict(results), normalise_config(run)

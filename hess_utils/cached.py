"""Compute-once results holding arrays as well as tables (a companion of :func:`hess_utils.runs.cached_tables`).

Notebook results such as Hessian heat maps are dense ``(n, n)`` arrays that would make long CSV files. A
result folder written by :func:`cached_results` holds

``config.json``
    The parameters that define the result; a re-run with other ones is refused (each mismatch named).
``NAME.csv``
    Each table (a ``pandas.DataFrame``), without its index.
``NAME.npy``
    Each array (``numpy.ndarray``), saved with ``numpy.save`` (no pickle: numeric dtypes only).
``run.json``
    Provenance (:func:`hess_utils.runs.provenance`), the caller's record and the compute time.
``done.json``
    Written last: the names of the tables and arrays. Its absence means an unfinished result, recomputed.

Every file is written atomically (:mod:`hess_utils._io`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hess_utils import _io, runs


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
    saved = runs.load_config(run_dir)
    if saved is not None and runs.config_mismatches(saved, config):
        details = "; ".join(f"{k}: {o!r} (saved) != {n!r} (now)" for k, o, n in runs.config_mismatches(saved, config))
        raise ValueError(f"{run_dir} holds a result of other parameters: {details}. Use another folder (see "
                         "hess_utils.runs.result_dir) or delete it to recompute")
    done = run_dir / runs.DONE_FILE
    if saved is not None and done.exists():
        names = json.loads(done.read_text(encoding="utf-8"))
        out: dict[str, Any] = {name: pd.read_csv(run_dir / f"{name}.csv") for name in names.get("tables", [])}
        out.update({name: np.load(run_dir / f"{name}.npy", allow_pickle=False) for name in names.get("arrays", [])})
        return out, json.loads((run_dir / runs.RUN_FILE).read_text(encoding="utf-8"))
    runs.save_config(run_dir, config)
    start = time.perf_counter()
    result = compute()
    results, extra = result if isinstance(result, tuple) else (result, {})
    seconds = time.perf_counter() - start
    tables, arrays = [], []
    for name, value in results.items():
        if isinstance(value, pd.DataFrame):
            runs.save_table(run_dir, f"{name}.csv", value)
            tables.append(name)
        elif isinstance(value, np.ndarray):
            save_array(run_dir, name, value)
            arrays.append(name)
        else:
            raise ValueError(f"result {name!r} is a {type(value).__name__}; return DataFrames or numpy arrays")
    run = runs.provenance(**record, **extra, config=runs.normalise_config(config), compute_seconds=seconds,
                          tables=sorted(tables), arrays=sorted(arrays))
    runs.save_run_json(run_dir, run)
    _io.write_json(done, {"tables": sorted(tables), "arrays": sorted(arrays)})
    return dict(results), runs.normalise_config(run)

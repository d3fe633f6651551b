"""Run the notebooks headless: ``make reproduce`` (``python -m hess_utils reproduce``) and its ``--quick`` smoke test.

Conventions every notebook ``notebooks/NN_topic.ipynb`` follows
----------------------------------------------------------------
* Stored without outputs, kernel ``python3``; the first cell is markdown: title, the paper section it
  reproduces, what it shows, how long it takes (quick / full, measured).
* The first code cell is tagged ``parameters`` (papermill) and holds at least::

      import os
      quick = os.environ.get("HESS_UTILS_QUICK", "0") == "1"  # tests set it; papermill: -p quick True
      model_name = "tiny-gpt2"   # or an embedded name / hub id / local path
      data_name = "wiki"
      seed = 0
      out_dir = "runs/notebooks"   # results (CSV + run.json provenance), re-plotted without recomputing
      figures_dir = "figures"

  plus the notebook's sizes; the next cell shrinks the sizes ``if quick:``.
* Relative ``out_dir`` / ``figures_dir`` are taken from the checkout (:func:`project_path`), whatever the
  kernel's working directory (nbval starts kernels in ``notebooks/``, papermill here in the repository root).
* Results are computed once with provenance (:func:`hess_utils.runs.cached_tables` or
  :func:`hess_utils.slq` with ``checkpoint_dir=``); figures are saved with :func:`hess_utils.plotting.save_figure`.

:func:`run_all` executes every notebook in order with papermill (cwd: the repository root), writing the
executed copies to ``figures/executed/NN_topic.ipynb`` and a progress line per notebook; the first failure
stops the run with :class:`NotebookError` naming the notebook and the cell. ``quick=True`` passes
``quick=True`` to every notebook and writes its figures and executed copies under ``figures/quick/`` so that
they never overwrite the full-size ones.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hess_utils.paths import repo_root

NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"
KERNEL_NAME = "python3"
QUICK_ENV = "HESS_UTILS_QUICK"


class NotebookError(RuntimeError):
    """A notebook failed; the message names it, the failing cell's error and the executed copy to open."""


@dataclass(frozen=True)
class NotebookRun:
    """One executed notebook: where it came from, where its executed copy is, and how long it took (seconds)."""

    notebook: Path
    executed: Path
    seconds: float


def project_path(path: str | os.PathLike) -> Path:
    """``path`` itself if absolute, else relative to the checkout (:func:`hess_utils.paths.repo_root`)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else repo_root() / path


def notebook_dir() -> Path:
    """The ``notebooks/`` folder of the checkout."""
    return repo_root() / "notebooks"


def list_notebooks(folder: str | os.PathLike | None = None, select: Sequence[str] | None = None) -> list[Path]:
    """The notebooks ``NN_*.ipynb`` of ``folder`` (default :func:`notebook_dir`), in order of their number.

    ``select`` keeps those whose name starts with one of its entries (``["00", "03_hess"]``).

    Raises
    ------
    FileNotFoundError
        If the folder does not exist or holds no notebook (or none matching ``select``).
    """
    folder = Path(folder) if folder is not None else notebook_dir()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: run from a checkout of the project (notebooks/)")
    found = sorted(folder.glob(NOTEBOOK_GLOB))
    if select:
        found = [p for p in found if any(p.name.startswith(s) for s in select)]
    if not found:
        what = f" matching {list(select)}" if select else ""
        raise FileNotFoundError(f"no notebook NN_topic.ipynb{what} in {folder}")
    return found


def run_notebook(
    notebook: str | os.PathLike,
    executed: str | os.PathLike,
    parameters: dict | None = None,
    cwd: str | os.PathLike | None = None,
    kernel_name: str = KERNEL_NAME,
    progress: bool = False,
) -> NotebookRun:
    """Execute one notebook with papermill, injecting ``parameters`` after its ``parameters`` cell.

    Parameters
    ----------
    notebook, executed
        The notebook and the path of its executed copy (written even when a cell fails, with the error).
    parameters
        Values for the parameters cell (``{"quick": True}``).
    cwd
        The kernel's working directory (default: the repository root).
    kernel_name
        The Jupyter kernel (default ``python3``: this environment's Python).
    progress
        papermill's per-cell progress bar.

    Raises
    ------
    NotebookError
        If a cell raises; names the notebook, the exception and the executed copy.
    """
    import papermill

    notebook, executed = Path(notebook), Path(executed)
    executed.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        papermill.execute_notebook(str(notebook), str(executed), parameters=dict(parameters or {}),
                                   cwd=str(cwd or repo_root()), kernel_name=kernel_name, progress_bar=progress,
                                   log_output=False)
    except papermill.PapermillExecutionError as err:
        raise NotebookError(f"notebook {notebook.name} failed in cell {err.exec_count}: {err.ename}: {err.evalue}. "
                            f"The executed copy with the traceback is {executed}") from err
    return NotebookRun(notebook=notebook, executed=executed, seconds=time.perf_counter() - start)


def run_all(
    quick: bool = False,
    select: Sequence[str] | None = None,
    folder: str | os.PathLike | None = None,
    figures: str | os.PathLike | None = None,
    progress: bool = False,
) -> list[NotebookRun]:
    """Run every notebook in order (see the module docstring); print one line per notebook and the total.

    Parameters
    ----------
    quick
        Pass ``quick=True`` (small sizes) to every notebook; figures and executed copies go to
        ``figures/quick/``.
    select
        Only the notebooks whose name starts with one of these (e.g. ``["00", "01"]``).
    folder
        The notebooks' folder (default ``notebooks/``).
    figures
        Root of the figures (default :func:`hess_utils.paths.figures_dir`).

    Raises
    ------
    NotebookError
        At the first failing notebook (the ones before it have run and kept their outputs).
    """
    from hess_utils.paths import figures_dir

    notebooks = list_notebooks(folder, select)
    root = Path(figures) if figures is not None else figures_dir()
    if quick:
        root = root / "quick"
    parameters = {"quick": bool(quick), "figures_dir": str(root)}
    mode = "quick" if quick else "full"
    print(f"running {len(notebooks)} notebooks ({mode} mode); figures under {root}, executed copies under "
          f"{root / 'executed'}", flush=True)
    done: list[NotebookRun] = []
    start = time.perf_counter()
    for i, notebook in enumerate(notebooks, 1):
        print(f"[{i}/{len(notebooks)}] {notebook.name} ...", flush=True)
        run = run_notebook(notebook, root / "executed" / notebook.name, parameters, progress=progress)
        done.append(run)
        print(f"[{i}/{len(notebooks)}] {notebook.name} done in {run.seconds:.0f} s", flush=True)
    total = time.perf_counter() - start
    print(f"all {len(done)} notebooks ran in {total:.0f} s ({total / 60:.1f} min); figures under {root}", flush=True)
    return done

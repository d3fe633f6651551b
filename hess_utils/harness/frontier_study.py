"""The analyses and figures of notebook 05 (HessFormer section 4: frontier spectra, Table 2, the mass near zero).

Every number notebook 05 prints or writes in its conclusions comes from a function here (or from
:mod:`hess_utils.harness.studies`); ``tests/test_frontier_study.py`` checks each against hand-worked Ritz tables and,
for the runs, against the dense float64 Hessian of a tiny model.

* :func:`frontier_slq`: the checkpointed SLQ run of the main model (``hu.slq(..., checkpoint_dir=...)``, read back
  once finished); :func:`ritz_table`, :func:`weight_summary` and :func:`table2_markdown`: the paper's Table 2.
* :func:`near_zero_table`: spectral mass below absolute thresholds and below the scale-aware ones of section 4.1
  (:func:`relative_thresholds`: machine epsilon of float64 / float32 times ``max |theta|``).
* :func:`noise_floor_tables`, :func:`zero_test_summary`, :func:`zero_test_markdown`: the float32 noise floor of the
  products (float32 against float64 on the same vectors) and which Ritz values can be told apart from zero.
* :func:`precision_runs`, :func:`precision_table`, :func:`precision_markdown`: the same SLQ on a small model in
  float32 without and with re-orthogonalisation and in float64; :func:`near_zero_figure` draws them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from hess_utils.dtypes import as_dtype
from hess_utils.harness.studies import hvp_precision, near_zero_mass, ritz_zero_test

EPS32 = float(torch.finfo(torch.float32).eps)
EPS64 = float(torch.finfo(torch.float64).eps)
#: thresholds relative to the spectral scale max |theta| of the precision table (:func:`precision_table`)
RELATIVE_THRESHOLDS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
#: the small-model runs of :func:`precision_runs`: (dtype, reorth); the last is the reference
PRECISION_VARIANTS = (("float32", "none"), ("float32", "full"), ("float64", "full"))
SHIFT = "extremes: max |Δθ| / max|θ| vs float64"


def _styled(frame: pd.DataFrame, formats: Mapping[str, str] | str, caption: str | None = None) -> Any:
    style = frame.style.format(formats).hide(axis="index")
    return style.set_caption(caption) if caption else style


# ---------------------------------------------------------------------------------------------- the main run
def _record(op: Any, model_name: str, data_name: str, dtype: str) -> dict[str, Any]:
    return dict(model=model_name, data=data_name, num_tokens=op.num_tokens, dim=op.dim, method=op.method,
                dtype=dtype, loss=op.loss())


def frontier_slq(op: Any, out: str | Path, model_name: str, data_name: str, dtype: str, method: str, seq_len: int,
                 num_sequences: int, num_iters: int, num_probes: int, reorth: str, seed: int,
                 checkpoint_every: int = 8) -> tuple[pd.DataFrame, dict[str, Any], Path, float]:
    """SLQ of ``op`` in its run folder under ``out`` (``05_frontier_slq-DIGEST``), resumed or read back if there.

    Returns ``(ritz, record, run_dir, seconds)``: the Ritz table (``ritz.csv``), ``run.json`` (with the loss) and
    the seconds spent in this call.
    """
    from hess_utils import runs
    from hess_utils.algorithms.slq import slq

    config = dict(model=model_name, data=data_name, split="train", seq_len=seq_len, num_sequences=num_sequences,
                  method=method, model_dtype=dtype)
    run_dir = runs.result_dir(Path(out), "05_frontier_slq", {**config, "num_iters": num_iters,
                                                             "num_probes": num_probes, "reorth": reorth, "seed": seed})
    started = time.perf_counter()
    slq(op, num_iters, num_probes, reorth=reorth, seed=seed, checkpoint_dir=run_dir, checkpoint_every=checkpoint_every,
        config=config, record=partial(_record, op, model_name, data_name, dtype))
    ritz, record = runs.load_run(run_dir)
    return ritz, record, run_dir, time.perf_counter() - started


def ritz_table(ritz: pd.DataFrame, probe: int = 0) -> pd.DataFrame:
    """The Ritz pairs of one probe sorted by value: ``value, weight, residual, ghost`` (the paper's Table 2)."""
    return ritz[ritz["probe"] == probe].sort_values("value")[["value", "weight", "residual", "ghost"]]


def ritz_view(table: pd.DataFrame, caption: str) -> Any:
    """:func:`ritz_table` formatted as the notebook shows it."""
    return _styled(table, {"value": "{:.4f}", "weight": "{:.4e}", "residual": "{:.2e}"}, caption)


def weight_summary(table: pd.DataFrame, dim: int) -> dict[str, Any]:
    """The heaviest Ritz node of a :func:`ritz_table` and the weights of the others.

    ``top_value``, ``top_weight``; ``outliers`` (how many others), their ``outlier_min``, ``outlier_max``,
    ``outlier_sum``, ``outlier_median``; ``dim`` and ``one_over_dim`` (a random probe's expected overlap with one
    eigenvector); ``of_that_order``: the median outlier weight is below ``1e3 / dim``.
    """
    if table.empty:
        raise ValueError("the Ritz table is empty")
    heaviest = table["weight"].idxmax()
    others = table.drop(index=heaviest)["weight"].astype(float)
    median = float(others.median()) if len(others) else float("nan")
    return {"top_value": float(table.loc[heaviest, "value"]), "top_weight": float(table.loc[heaviest, "weight"]),
            "outliers": int(len(others)), "outlier_min": float(others.min()), "outlier_max": float(others.max()),
            "outlier_sum": float(others.sum()), "outlier_median": median, "dim": int(dim),
            "one_over_dim": 1.0 / dim, "of_that_order": bool(median < 1e3 / dim)}


def table2_markdown(s: Mapping[str, Any]) -> str:
    """Notebook 05's reading of its Table 2 (Markdown) from :func:`weight_summary`."""
    return (
        f"The heaviest node is θ = {s['top_value']:.4g} with weight {s['top_weight']:.4f}; the other {s['outliers']} "
        f"nodes carry weights from {s['outlier_min']:.2e} to {s['outlier_max']:.2e} (total {s['outlier_sum']:.2e}). "
        f"The paper's Table 2 (70 B parameters) has one node at 0.0145 or 1.1e-06 with weight 1.0000 and outliers "
        f"with weights 1e-18 to 4e-10; with {s['dim']:.3g} parameters a random probe's overlap with one eigenvector "
        f"is about 1/dim = {s['one_over_dim']:.1e}, so the outlier weights here are "
        + ("of that order." if s["of_that_order"] else
           f"larger than that ({s['outlier_median']:.1e} median): the Lanczos nodes summarise groups of eigenvalues "
           "rather than single outliers at this small number of iterations."))


# ---------------------------------------------------------------------------------------------- near zero
def relative_thresholds(scale: float) -> dict[str, float]:
    """The scale-aware thresholds of section 4.1: ``{label: factor * scale}`` for factors eps64, eps32, 1e-4, 1e-2."""
    return {"ε64 · max|θ|": EPS64 * scale, "ε32 · max|θ|": EPS32 * scale, "1e-4 · max|θ|": 1e-4 * scale,
            "1e-2 · max|θ|": 1e-2 * scale}


def near_zero_table(ritz: pd.DataFrame, thresholds: Sequence[float], num_probes: int = 1) -> tuple[pd.DataFrame, float]:
    """Spectral mass with ``|lambda| < t``, first for :func:`relative_thresholds` of ``scale = max |theta|``, then
    for the absolute ``thresholds``.

    Returns ``(table, scale)``; the table has ``threshold is`` (the relative label or ``"absolute"``) and the
    columns of :func:`~hess_utils.harness.studies.near_zero_mass` (``threshold, mass, nodes``).
    """
    scale = float(ritz["value"].abs().max())
    relative = relative_thresholds(scale)
    mass = near_zero_mass(ritz["value"], ritz["weight"], list(relative.values()) + [float(t) for t in thresholds],
                          num_probes)
    mass.insert(0, "threshold is", list(relative) + ["absolute"] * len(thresholds))
    return mass, scale


def mass_view(mass: pd.DataFrame, caption: str) -> Any:
    """:func:`near_zero_table` formatted as the notebook shows it."""
    return _styled(mass, {"threshold": "{:.3e}", "mass": "{:.6f}"}, caption)


# ---------------------------------------------------------------------------------------------- noise floor
def noise_floor_tables(op: Any, model_name: str, batches: Sequence[Any], num_vectors: int = 1,
                       seed: int = 0) -> dict[str, pd.DataFrame]:
    """``{"noise": hvp_precision(op, op64)}``: ``op``'s products against those of ``model_name`` loaded in float64
    on the same ``batches`` (exact products), for :func:`hess_utils.runs.cached_results`."""
    from hess_utils.models import load_model
    from hess_utils.operators.hessian import hessian_operator

    model64, _ = load_model(model_name, dtype=torch.float64)
    op64 = hessian_operator(model64, batches, method="rev-rev")
    return {"noise": hvp_precision(op, op64, num_vectors=num_vectors, seed=seed)}


def zero_test_summary(ritz: pd.DataFrame, noise: pd.DataFrame, num_probes: int = 1) -> dict[str, Any]:
    """Which Ritz values can be told apart from zero given their residuals and the noise floor of ``noise``
    (a :func:`~hess_utils.harness.studies.hvp_precision` table).

    ``floor``: the largest ``abs_error``; ``rel_error``: the largest ``rel_error``; ``tested``: the
    :func:`~hess_utils.harness.studies.ritz_zero_test` table; ``unresolved`` of ``total`` Ritz values are not
    resolved and carry ``unresolved_mass`` of the spectral mass (weights over ``num_probes``).
    """
    floor = float(noise["abs_error"].max())
    tested = ritz_zero_test(ritz, noise_floor=floor)
    unresolved = tested[~tested["resolved"]]
    return {"floor": floor, "rel_error": float(noise["rel_error"].max()), "tested": tested,
            "unresolved": int(len(unresolved)), "total": int(len(tested)),
            "unresolved_mass": float(unresolved["weight"].sum()) / num_probes}


def zero_test_view(tested: pd.DataFrame, probe: int = 0) -> Any:
    """The zero test of one probe, sorted by value, formatted as the notebook shows it."""
    table = tested[tested["probe"] == probe].sort_values("value")[["value", "weight", "residual", "bound", "resolved"]]
    return _styled(table, {"value": "{:.4g}", "weight": "{:.3e}", "residual": "{:.2e}", "bound": "{:.2e}"},
                   "resolved: |θ| > residual + float32 noise floor")


def zero_test_markdown(s: Mapping[str, Any], scale: float) -> str:
    """Notebook 05's reading of the noise floor (Markdown) from :func:`zero_test_summary`."""
    return (f"float32 products are off by {s['rel_error']:.1e} relative to float64 (floor {s['floor']:.2e} in "
            f"eigenvalue units, against max |θ| = {scale:.3g}). {s['unresolved']} of {s['total']} Ritz values cannot "
            f"be told apart from zero; they carry {s['unresolved_mass']:.4f} of the spectral mass.")


# ---------------------------------------------------------------------------------------------- small model
def _precision_record(op: Any, model_name: str, data_name: str, dtype: str) -> dict[str, Any]:
    return dict(model=model_name, data=data_name, num_tokens=op.num_tokens, dim=op.dim, method="rev-rev",
                dtype=dtype)


def precision_runs(out: str | Path, model_name: str, data_name: str, seq_len: int, num_sequences: int,
                   num_iters: int, seed: int = 0, variants: Sequence[tuple[str, str]] = PRECISION_VARIANTS,
                   ) -> tuple[dict[str, tuple[pd.DataFrame, pd.DataFrame]], int]:
    """One probe of SLQ (exact products) on ``model_name`` per ``(dtype, reorth)`` of ``variants``, each in its run
    folder under ``out`` (``05_precision_slq-DIGEST``, read back once finished).

    Returns ``({"<dtype>, reorth=<reorth>": (ritz, probes)}, dim)``, ``probes`` the run's ``probes.csv``.
    """
    from hess_utils import runs
    from hess_utils.algorithms.slq import slq
    from hess_utils.batches import load_batches
    from hess_utils.models import load_model
    from hess_utils.operators.hessian import hessian_operator

    small, dim = {}, 0
    for dt, ro in variants:
        model, tokenizer = load_model(model_name, dtype=as_dtype(dt))
        batches = load_batches(data_name, tokenizer, seq_len=seq_len, num_sequences=num_sequences,
                               batch_size=num_sequences, seed=seed)
        op = hessian_operator(model, batches, method="rev-rev", keep_graph=True)
        cfg = dict(model=model_name, data=data_name, seq_len=seq_len, num_sequences=num_sequences, method="rev-rev",
                   model_dtype=dt)
        run_dir = runs.result_dir(Path(out), "05_precision_slq", {**cfg, "num_iters": num_iters, "reorth": ro,
                                                                  "seed": seed})
        slq(op, num_iters, 1, reorth=ro, seed=seed, progress=False, checkpoint_dir=run_dir, config=cfg,
            record=partial(_precision_record, op, model_name, data_name, dt))
        small[f"{dt}, reorth={ro}"] = (runs.load_run(run_dir)[0], runs.load_table(run_dir, "probes.csv"))
        dim = op.dim
        del model, op
    return small, dim


def precision_table(small: Mapping[str, tuple[pd.DataFrame, pd.DataFrame]],
                    rel_thresholds: Sequence[float] = RELATIVE_THRESHOLDS) -> pd.DataFrame:
    """One row per run of :func:`precision_runs`, the last run the reference (float64 with full re-orth).

    ``max θ``, ``min θ``; ``distinct Ritz values`` (distinct after rounding ``theta / s`` to 6 decimals, ``s`` the
    reference's ``max |theta|``); ``ghosts`` (Cullum-Willoughby flags); ``orthogonality loss`` (of probe 0);
    :data:`SHIFT`: the larger move of the two extreme Ritz values against the reference, over ``s``; and
    ``mass |λ|<t·max`` for each ``t`` of ``rel_thresholds`` (the SLQ mass below ``t * s``).
    """
    if not small:
        raise ValueError("no runs")
    reference = list(small.values())[-1][0]
    ref_scale = float(reference["value"].abs().max())
    rows = []
    for label, (frame, probes) in small.items():
        near = near_zero_mass(frame["value"], frame["weight"], [t * ref_scale for t in rel_thresholds])
        shift = max(abs(frame["value"].max() - reference["value"].max()),
                    abs(frame["value"].min() - reference["value"].min()))
        distinct = np.unique(np.round(frame["value"].to_numpy() / ref_scale, 6)).size
        rows.append({"run": label, "max θ": frame["value"].max(), "min θ": frame["value"].min(),
                     "distinct Ritz values": distinct, "ghosts": int(frame["ghost"].sum()),
                     "orthogonality loss": probes["orthogonality_loss"].iloc[0], SHIFT: shift / ref_scale,
                     **{f"mass |λ|<{t:.0e}·max": v for t, v in zip(rel_thresholds, near["mass"])}})
    return pd.DataFrame(rows)


def precision_view(precision: pd.DataFrame, caption: str) -> Any:
    """:func:`precision_table` formatted as the notebook shows it."""
    return _styled(precision, {c: "{:.3g}" for c in precision.columns if c != "run"}, caption)


def precision_markdown(precision: pd.DataFrame, precision_model: str, precision_iters: int, model_name: str,
                       top: Mapping[str, Any], eps32_mass: float) -> str:
    """Notebook 05's conclusion (Markdown) from :func:`precision_table` (rows: float32 none, float32 full, float64
    full), the main run's :func:`weight_summary` ``top`` and its mass below ``eps32 * max |theta|``."""
    none, full, ref = precision.iloc[0], precision.iloc[1], precision.iloc[2]
    mass = "mass |λ|<1e-07·max"
    return (
        f"On {precision_model}, the extreme Ritz values of float32 with full re-orthogonalisation match float64 to "
        f"{full[SHIFT]:.1e} of the spectral scale, and without re-orthogonalisation to {none[SHIFT]:.1e}; without "
        f"re-orthogonalisation only {int(none['distinct Ritz values'])} of {precision_iters} Ritz values are distinct "
        f"(to 1e-6 of the scale), against {int(full['distinct Ritz values'])} with it: converged values come back as "
        f"copies. Cullum-Willoughby flags {int(none['ghosts'])} / {int(full['ghosts'])} / {int(ref['ghosts'])} Ritz "
        "values (float32 none / float32 full / float64 full): the test runs only without re-orthogonalisation (a kept "
        "basis makes no ghosts) and flags a simple value only if its weight is at roundoff level, so copies of "
        "converged values are flagged while genuine outliers of tiny weight stay listed. The mass below ε₃₂ · max|θ| "
        f"is {none[mass]:.4f} / {full[mass]:.4f} / {ref[mass]:.4f} (float32 none / float32 full / float64). The "
        "paper's huge weight (≈1.0000) on a single node near zero is "
        + ("also seen" if top["top_weight"] > 0.9 else "not seen")
        + f" on {model_name}: its heaviest node has weight {top['top_weight']:.3f} at θ = {top['top_value']:.3g}, "
          f"and the mass within ε₃₂ · max|θ| of zero is {eps32_mass:.4f}.")


# ---------------------------------------------------------------------------------------------- figure
def near_zero_figure(small: Mapping[str, tuple[pd.DataFrame, pd.DataFrame]], ritz: pd.DataFrame, num_probes: int,
                     precision_model: str, model_name: str, dtype: str, reorth: str, data_name: str) -> Any:
    """The mass below relative thresholds of every run (the small model's three and the main run), and the Ritz
    pairs of the small model in its three precisions."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    grid = np.logspace(-17, 0.5, 400)
    styles = ["-", "--", ":"]
    for k, (label, (frame, _)) in enumerate(small.items()):
        s = float(frame["value"].abs().max())
        m = near_zero_mass(frame["value"], frame["weight"], grid * s)
        axes[0].step(grid, m["mass"], where="post", ls=styles[k % 3], lw=1.5 + k * 0.5,
                     label=f"{precision_model}, {label}")
    scale = float(ritz["value"].abs().max())
    m = near_zero_mass(ritz["value"], ritz["weight"], grid * scale, num_probes)
    axes[0].step(grid, m["mass"], where="post", color="k", lw=2, label=f"{model_name}, {dtype}, reorth={reorth}")
    for eps, name in ((EPS32, "ε float32"), (EPS64, "ε float64")):
        axes[0].axvline(eps, ls=":", color="grey")
        axes[0].text(eps, 0.02, name, rotation=90, va="bottom", ha="right", fontsize=8)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("relative threshold t (|λ| < t · max |θ|)")
    axes[0].set_ylabel("spectral mass below the threshold")
    axes[0].set_title(f"Mass near zero, {data_name}")
    axes[0].legend(fontsize="small")
    for k, (label, (frame, _)) in enumerate(small.items()):
        f = frame.sort_values("value")
        axes[1].semilogy(f["value"], f["weight"], "oxs"[k % 3], ms=5 + 2 * k, mfc="none", label=label)
    axes[1].set_xlabel("Ritz value θ (nats/token per unit²)")
    axes[1].set_ylabel("Ritz weight")
    axes[1].set_title(f"{precision_model}: Ritz pairs in three precisions")
    axes[1].legend(fontsize="small")
    fig.tight_layout()
    return fig

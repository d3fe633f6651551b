"""The analyses and figures of notebook 09 (Hessian spectral analysis at foundation-model scale, four claims).

Every number notebook 09 prints or writes in its conclusions comes from a function here (or from
:mod:`hess_utils.harness.studies`); ``tests/test_foundation_study.py`` checks each against hand-worked tables,
closed forms (exact power laws) and the dense float64 Hessian of a tiny model.

1. Finite differences against exact products: :func:`fd_sweep` (cached :func:`~hess_utils.harness.studies.
   fd_error_sweep`), :func:`fd_best_with_defaults` (the best step per dtype and vector kind, and the error at the
   swept step nearest the package's default, :func:`error_at_nearest_step`), :func:`fd_conclusions`.
2. FSDP2 against one process: :func:`cli_variants`, :func:`cli_runs` (the command line in new processes),
   :func:`cli_summary`, :func:`fsdp_conclusions`.
3. Block-diagonal approximations: :func:`block_diagonal_tables`, :func:`block_diagonal_study` (errors, and the
   SLQ spectra of ``H`` and ``H_bd``), :func:`block_diagonal_summary`, :func:`block_diagonal_conclusions`.
4. Cost against model size: :func:`width_configs`, :func:`scaling_costs`, :func:`power_law_fits`,
   :func:`scaling_conclusions`.

The ``*_figure`` functions draw the notebook's figures; ``*_view`` functions format its tables.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from hess_utils.dtypes import as_dtype
from hess_utils.harness import studies

#: the exact reference run of section 2
EXACT = "single, rev-rev, float64"
FSDP_DIFF = "max |θ_fsdp − θ_single| / max|θ|"
FD_DIFF = "max |θ_fd − θ_exact64| / max|θ|"


def _styled(frame: pd.DataFrame, formats: Mapping[str, str] | str, caption: str | None = None) -> Any:
    style = frame.style.format(formats).hide(axis="index")
    return style.set_caption(caption) if caption else style


# ---------------------------------------------------------------------------------------------- 1. finite differences
def fd_sweep_tables(model: torch.nn.Module, batches: Sequence[Any], eps_values: Sequence[float],
                    dtypes: Sequence[str], num_vectors: int, seed: int,
                    vector_kinds: Sequence[str]) -> dict[str, pd.DataFrame]:
    """``{"sweep": fd_error_sweep(...)}`` for :func:`hess_utils.runs.cached_results`."""
    return {"sweep": studies.fd_error_sweep(model, batches, eps_values, dtypes=dtypes, num_vectors=num_vectors,
                                            seed=seed, vector_kinds=vector_kinds)}


def fd_sweep(model: torch.nn.Module, tokenizer: Any, out: str | Path, model_name: str, data_name: str, seq_len: int,
             num_sequences: int, eps_values: Sequence[float], dtypes: Sequence[str], num_vectors: int,
             vector_kinds: Sequence[str], seed: int = 0) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The finite-difference sweep of ``num_sequences x seq_len`` tokens of ``data_name``, computed once in
    ``out/09_fd_sweep-DIGEST`` and read back afterwards: ``(sweep, run.json)``."""
    from hess_utils import runs
    from hess_utils.batches import load_batches

    config = dict(model=model_name, data=data_name, seq_len=seq_len, num_sequences=num_sequences, seed=seed,
                  eps=list(eps_values), dtypes=list(dtypes), vectors=num_vectors, kinds=list(vector_kinds))
    batches = load_batches(data_name, tokenizer, seq_len=seq_len, num_sequences=num_sequences,
                           batch_size=num_sequences, seed=seed)
    res, run = runs.cached_results(
        runs.result_dir(Path(out), "09_fd_sweep", config), config,
        partial(fd_sweep_tables, model, batches, eps_values, dtypes, num_vectors, seed, vector_kinds),
        model=model_name, data=data_name)
    return res["sweep"], run


def error_at_nearest_step(sweep: pd.DataFrame, dtype: str, kind: str, eps: float) -> float:
    """Mean finite-difference error (over vectors) of ``dtype`` and ``kind`` at the swept step nearest ``eps``.

    Nearest in ``|log10 step - log10 eps|``; of two equally near steps the smaller. Raises ValueError when the
    sweep has no finite-difference row of ``dtype`` and ``kind``.
    """
    sel = sweep[(sweep["dtype"] == dtype) & (sweep["kind"] == kind) & (sweep["method"] == "fd")]
    if sel.empty:
        raise ValueError(f"no finite-difference rows of {dtype}, {kind} in the sweep")
    steps = np.unique(sel["eps"].to_numpy(np.float64))  # sorted ascending: argmin takes the smaller of a tie
    nearest = steps[int(np.argmin(np.abs(np.log10(steps) - np.log10(float(eps)))))]
    return float(sel.loc[sel["eps"] == nearest, "rel_error"].mean())


def fd_best_with_defaults(sweep: pd.DataFrame) -> pd.DataFrame:
    """:func:`~hess_utils.harness.studies.fd_best_eps` with ``package default eps`` (the package's
    ``DEFAULT_FD_EPS`` of the dtype) and ``fd error at ~default`` (:func:`error_at_nearest_step` at it)."""
    from hess_utils.operators.hessian import DEFAULT_FD_EPS

    best = studies.fd_best_eps(sweep)
    best["package default eps"] = [DEFAULT_FD_EPS[as_dtype(d)] for d in best["dtype"]]
    best["fd error at ~default"] = [error_at_nearest_step(sweep, d, k, e) for d, k, e in
                                    zip(best["dtype"], best["kind"], best["package default eps"])]
    return best


def fd_best_view(best: pd.DataFrame) -> Any:
    """:func:`fd_best_with_defaults` formatted as the notebook shows it."""
    return _styled(best, {c: "{:.2e}" for c in best.columns if c not in ("dtype", "kind")},
                   "best step per dtype (mean over vectors) against the rule of thumb u^(1/3)")


def fd_conclusions(best: pd.DataFrame, dtypes: Sequence[str], vector_kinds: Sequence[str]) -> str:
    """Section 1's conclusion (Markdown) from :func:`fd_best_with_defaults`."""
    b = best.set_index(["dtype", "kind"])
    text = " ".join(
        f"In {d} (Gaussian v) the error is smallest, {b.loc[(d, 'gaussian'), 'best_fd_error']:.1e}, at ε = "
        f"{b.loc[(d, 'gaussian'), 'best_eps']:.0e} (u^(1/3) = {b.loc[(d, 'gaussian'), 'u^(1/3)']:.0e}; the exact "
        f"product in {d} is off by {b.loc[(d, 'gaussian'), 'exact_error']:.1e})." for d in dtypes)
    text += (" Left of the minimum rounding noise grows like u/ε, right of it the O(ε²) truncation bias: the operating "
             "regime is a band around u^(1/3), narrow in bfloat16.")
    if "krylov" in vector_kinds:
        kr = {d: b.loc[(d, "krylov")] for d in dtypes}
        text += (" For Krylov vectors H r / ||H r|| (what Lanczos multiplies after its first step, concentrated on few "
                 "parameters) the U-curve sits elsewhere than for spread-out vectors even with the step "
                 "h = ε <|v|, |w|> / ||v||² (scaled by the weights v moves rather than by ||w|| / ||v||): the best "
                 "steps are "
                 + ", ".join(f"ε = {kr[d]['best_eps']:.0e} in {d} (error {kr[d]['best_fd_error']:.1e})" for d in dtypes)
                 + ", and at the package's default steps the errors are "
                 + ", ".join(f"{kr[d]['fd error at ~default']:.1e} ({d})" for d in dtypes)
                 + ". A finite-difference Lanczos run is therefore less accurate than its error on random vectors "
                 "suggests (section 2).")
    return text


def fd_u_curve_figure(sweep: pd.DataFrame, dtypes: Sequence[str], vector_kinds: Sequence[str], model_name: str,
                      data_name: str, num_sequences: int, seq_len: int) -> Any:
    """The finite-difference error against the step per dtype and vector kind (mean, band min-max over vectors),
    the exact product's error and ``u^(1/3)`` of each dtype."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 5.5))
    for k, d in enumerate(dtypes):
        for kind, style in zip(vector_kinds, ["o-", "s--"]):
            sel = sweep[(sweep.dtype == d) & (sweep.kind == kind) & (sweep.method == "fd")].groupby("eps")["rel_error"]
            mean, lo, hi = sel.mean(), sel.min(), sel.max()
            ax.loglog(mean.index, mean.values, style, color=f"C{k}", ms=4, mfc="none" if kind != "gaussian" else None,
                      label=f"{d}, {kind} v: finite differences")
            ax.fill_between(mean.index, lo.values, hi.values, color=f"C{k}", alpha=0.15)
        exact = sweep[(sweep.dtype == d) & (sweep.method == "rev-rev")]["rel_error"].mean()
        if exact > 0:
            ax.axhline(exact, color=f"C{k}", ls="-.", lw=1.2, label=f"{d}: exact rev-rev (rounding floor)")
        ax.axvline(studies.unit_roundoff(d) ** (1 / 3), color=f"C{k}", ls=":", lw=1)
    ax.set_xlabel("relative step ε (h = ε <|v|, |w|> / ||v||², fd_eps)")
    ax.set_ylabel("||H v − H₆₄ v|| / ||H₆₄ v|| (dimensionless)")
    ax.set_title(f"{model_name} on {data_name} ({num_sequences} x {seq_len} tokens): finite-difference error\n"
                 "against exact float64 products; dotted: u^(1/3) of each dtype")
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_ylim(top=1e3)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------- 2. FSDP2
def cli_variants(dtypes: Sequence[str], fd_eps: Mapping[str, float], nproc: int
                 ) -> dict[str, tuple[dict[str, Any], int | None]]:
    """The command-line runs of section 2: ``{label: (options, nproc or None)}``, per dtype FSDP2 on ``nproc``
    processes then one process, with finite differences (``fd_eps[dtype]`` when given), then :data:`EXACT`."""
    variants = {f"{engine}, fd, {dt}": ({"engine": engine, "method": "fd", "dtype": dt,
                                         **({"fd_eps": fd_eps[dt]} if fd_eps.get(dt) else {})},
                                        nproc if engine == "fsdp" else None)
                for dt in dtypes for engine in ("fsdp", "single")}
    variants[EXACT] = ({"engine": "single", "method": "rev-rev", "dtype": "float64"}, None)
    return variants


def cli_runs(out: str | Path, model_name: str, data_name: str, seq_len: int, num_sequences: int, batch_size: int,
             num_iters: int, dtypes: Sequence[str], fd_eps: Mapping[str, float], nproc: int, seed: int = 0,
             timeout: float = 900, verbose: bool = True) -> tuple[dict[str, pd.DataFrame], dict[str, np.ndarray]]:
    """Each run of :func:`cli_variants` by the command line in new processes
    (:func:`~hess_utils.harness.studies.spectrum_subprocess`), in ``out/09_cli_<label>-DIGEST`` (finished runs are
    read back). Returns ``({label: ritz}, {label: alphas of probe 0})``; prints each run's seconds."""
    from hess_utils import runs

    cli = dict(model=model_name, data=data_name, seq_len=seq_len, num_sequences=num_sequences, batch_size=batch_size,
               seed=seed, num_iters=num_iters, probes=1, reorth="full")
    ritz, alphas = {}, {}
    for label, (extra, n) in cli_variants(dtypes, fd_eps, nproc).items():
        options = {**cli, **extra, **({"device": "cpu"} if extra["engine"] == "single" else {})}
        run_dir = runs.result_dir(Path(out), "09_cli_" + label.replace(", ", "_"), {**options, "nproc": n})
        started = time.perf_counter()
        studies.spectrum_subprocess(run_dir, options, nproc=n, timeout=timeout)
        ritz[label], alphas[label] = runs.load_run(run_dir)[0], runs.load_tridiagonals(run_dir)[0][0]
        if verbose:
            print(f"{label:>26}: {time.perf_counter() - started:5.1f} s  ({run_dir.name})")
    return ritz, alphas


def cli_summary(ritz: Mapping[str, pd.DataFrame], alphas: Mapping[str, np.ndarray],
                dtypes: Sequence[str]) -> pd.DataFrame:
    """Per dtype: the largest difference of the Ritz values of FSDP2 and one process (finite differences) and of
    one process against :data:`EXACT`, over ``max |theta|`` of the second run
    (:func:`~hess_utils.harness.studies.compare_ritz`); and the differences of the first two Lanczos diagonal
    entries ``alpha_0, alpha_1`` over ``max |alpha|`` of the exact run."""
    alpha_exact = np.asarray(alphas[EXACT], dtype=np.float64)
    scale = float(np.abs(alpha_exact).max())
    rows = []
    for dt in dtypes:
        fs, sg = f"fsdp, fd, {dt}", f"single, fd, {dt}"
        a_fs, a_sg = np.asarray(alphas[fs], dtype=np.float64), np.asarray(alphas[sg], dtype=np.float64)
        rows.append({"dtype": dt,
                     FSDP_DIFF: studies.compare_ritz(ritz[fs], ritz[sg])["rel_diff"].max(),
                     FD_DIFF: studies.compare_ritz(ritz[sg], ritz[EXACT])["rel_diff"].max(),
                     "|α₀ fsdp − single| / max|α|": abs(a_fs[0] - a_sg[0]) / scale,
                     "|α₁ fsdp − single| / max|α|": abs(a_fs[1] - a_sg[1]) / scale,
                     "|α₀ fd − exact| / max|α|": abs(a_sg[0] - alpha_exact[0]) / scale,
                     "|α₁ fd − exact| / max|α|": abs(a_sg[1] - alpha_exact[1]) / scale})
    return pd.DataFrame(rows)


def cli_summary_view(summary: pd.DataFrame, model_name: str, num_iters: int, nproc: int) -> Any:
    """:func:`cli_summary` formatted as the notebook shows it."""
    return _styled(summary, {c: "{:.1e}" for c in summary.columns if c != "dtype"},
                   f"{model_name}: SLQ, {num_iters} iterations, FSDP2 ({nproc} gloo ranks) vs one process vs exact")


def fsdp_conclusions(summary: pd.DataFrame, dtypes: Sequence[str], agree_below: float = 1e-4) -> str:
    """Section 2's conclusion (Markdown) from :func:`cli_summary`; FSDP2 and one process agree when their Ritz
    values differ by less than ``agree_below`` of the spectral scale."""
    sm = summary.set_index("dtype")
    text = []
    for dt in dtypes:
        r = sm.loc[dt]
        text.append(
            f"In {dt}, FSDP2 and one process agree on α₀ to {r['|α₀ fsdp − single| / max|α|']:.0e} and their Ritz "
            f"values differ by {r[FSDP_DIFF]:.1e} of the spectral scale; finite differences differ from exact float64 "
            f"products by {r[FD_DIFF]:.1e} (α₁, the product with the concentrated vector H q₀ / ||H q₀||: "
            f"{r['|α₁ fd − exact| / max|α|']:.0e}). "
            + ("The sharding changes only the summation order: rounding-level agreement." if r[FSDP_DIFF] < agree_below
               else "Both finite-difference runs are dominated by the step error on Krylov vectors (section 1), and "
               "Lanczos amplifies the rounding differences between sharded and unsharded gradient sums; the sharding "
               "is not the cause, the finite-difference step is."))
    return " ".join(text)


def fsdp_figure(ritz: Mapping[str, pd.DataFrame], dtypes: Sequence[str], model_name: str, data_name: str,
                num_iters: int) -> Any:
    """The Ritz pairs of every command-line run, and the differences per Ritz value between the runs."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    for k, (label, frame) in enumerate(ritz.items()):
        f = frame.sort_values("value")
        axes[0].semilogy(f["value"], f["weight"], "oxs+d"[k % 5], ms=8, mfc="none", label=label)
    axes[0].set_xlabel("Ritz value θ (nats/token per unit²)")
    axes[0].set_ylabel("Ritz weight")
    axes[0].set_title(f"{model_name} on {data_name}: SLQ, {num_iters} iterations, one probe")
    axes[0].legend(fontsize="small")
    for k, dt in enumerate(dtypes):
        a = studies.compare_ritz(ritz[f"fsdp, fd, {dt}"], ritz[f"single, fd, {dt}"])
        b = studies.compare_ritz(ritz[f"single, fd, {dt}"], ritz[EXACT])
        axes[1].semilogy(a["rank"], np.maximum(a["rel_diff"], 1e-17), "o-", color=f"C{k}",
                         label=f"{dt}: FSDP2 vs one process (fd)")
        axes[1].semilogy(b["rank"], np.maximum(b["rel_diff"], 1e-17), "s--", color=f"C{k}", mfc="none",
                         label=f"{dt}: fd vs exact float64")
    axes[1].set_xlabel("Ritz value rank (ascending)")
    axes[1].set_ylabel("|Δθ| / max |θ| (dimensionless)")
    axes[1].set_title("differences between the runs")
    axes[1].legend(fontsize="small")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------- 3. block diagonal
def block_diagonal_tables(op: Any, groupings: Sequence[str], num_vectors: int, seed: int = 0
                          ) -> dict[str, pd.DataFrame]:
    """``{"errors": ...}``: :func:`hess_utils.block_diagonal_error` of ``op`` per grouping, one row per vector
    (``grouping, groups, vector, relative_error, cosine``), for :func:`hess_utils.runs.cached_results`."""
    from hess_utils.algorithms.blocks import block_diagonal_error

    rows = []
    for by in groupings:
        err = block_diagonal_error(op, by=by, num_vectors=num_vectors, seed=seed)
        for k, (e, c) in enumerate(zip(err.relative_errors, err.cosines)):
            rows.append({"grouping": by, "groups": err.num_groups, "vector": k, "relative_error": e, "cosine": c})
    return {"errors": pd.DataFrame(rows)}


def block_diagonal_study(model: torch.nn.Module, tokenizer: Any, out: str | Path, model_name: str, data_name: str,
                         seq_len: int, num_sequences: int, groupings: Sequence[str], num_vectors: int,
                         num_iters: int, seed: int = 0, spectrum_grouping: str = "block"
                         ) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Section 3: the errors of :func:`block_diagonal_tables` (computed once in ``out/09_block_diagonal-DIGEST``)
    and one SLQ probe of ``num_iters`` iterations of ``H`` and of ``H_bd`` (``spectrum_grouping``), each in its run
    folder ``out/09_bd_slq-DIGEST``. Returns ``(errors, {"H": ritz, "H_bd (block)": ritz})``."""
    from hess_utils import runs
    from hess_utils.algorithms.blocks import BlockDiagonalOperator
    from hess_utils.algorithms.slq import slq
    from hess_utils.batches import load_batches
    from hess_utils.operators.hessian import hessian_operator

    batches = load_batches(data_name, tokenizer, seq_len=seq_len, num_sequences=num_sequences,
                           batch_size=num_sequences, seed=seed)
    op = hessian_operator(model, batches, method="rev-rev", keep_graph=True)
    config = dict(model=model_name, data=data_name, seq_len=seq_len, num_sequences=num_sequences, seed=seed,
                  groupings=list(groupings), vectors=num_vectors)
    res, _ = runs.cached_results(runs.result_dir(Path(out), "09_block_diagonal", config), config,
                                 partial(block_diagonal_tables, op, groupings, num_vectors, seed),
                                 model=model_name, data=data_name)
    spectra = {}
    for label, operator in (("H", op), (f"H_bd ({spectrum_grouping})", BlockDiagonalOperator(op, spectrum_grouping))):
        cfg = dict(model=model_name, data=data_name, seq_len=seq_len, num_sequences=num_sequences,
                   method="rev-rev", operator=label)
        run_dir = runs.result_dir(Path(out), "09_bd_slq", {**cfg, "num_iters": num_iters, "seed": seed,
                                                          "reorth": "partial"})
        slq(operator, num_iters, 1, reorth="partial", seed=seed, checkpoint_dir=run_dir, config=cfg,
            record=dict(model=model_name, data=data_name, operator=label))
        spectra[label] = runs.load_run(run_dir)[0]
    return res["errors"], spectra


def block_diagonal_summary(errors: pd.DataFrame) -> pd.DataFrame:
    """Per grouping (in order): mean and standard deviation (``ddof=1``) of the relative error, mean and minimum
    of the cosine over the vectors."""
    return errors.groupby(["grouping", "groups"], sort=False).agg(
        relative_error=("relative_error", "mean"), relative_error_sd=("relative_error", "std"),
        cosine=("cosine", "mean"), cosine_min=("cosine", "min")).reset_index()


def block_diagonal_view(bd: pd.DataFrame, model_name: str, num_vectors: int) -> Any:
    """:func:`block_diagonal_summary` formatted as the notebook shows it."""
    return _styled(bd, {c: "{:.3f}" for c in bd.columns if c not in ("grouping", "groups")},
                   f"{model_name}: ||(H − H_bd) v|| / ||H v|| and cos(H v, H_bd v) over {num_vectors} Gaussian vectors")


def block_diagonal_conclusions(bd: pd.DataFrame, spectra: Mapping[str, pd.DataFrame],
                               order_one: float = 0.3) -> str:
    """Section 3's conclusion (Markdown) from :func:`block_diagonal_summary` and the two spectra (``H`` first):
    the range of the mean errors and cosines, whether the worst mean error exceeds ``order_one``, and the extreme
    Ritz values of each spectrum."""
    (h, fh), (hb, fb) = list(spectra.items())[:2]
    worst = float(bd["relative_error"].max())
    return (
        f"Dropping the couplings between blocks changes H v by {bd['relative_error'].min():.2f}-{worst:.2f} of its "
        f"norm (cosine {bd['cosine'].min():.2f}-{bd['cosine'].max():.2f}); "
        + ("order-one errors with poor alignment, as the paper reports for mid-scale LLMs. "
           if worst > order_one else "smaller errors than the order-one errors the paper reports. ")
        + f"The extreme eigenvalues move from [{fh['value'].min():.3g}, {fh['value'].max():.3g}] for {h} to "
          f"[{fb['value'].min():.3g}, {fb['value'].max():.3g}] for the per-block approximation.")


def block_diagonal_figure(errors: pd.DataFrame, spectra: Mapping[str, pd.DataFrame], groupings: Sequence[str],
                          model_name: str, data_name: str, num_iters: int) -> Any:
    """Error against cosine per vector and grouping; the smoothed SLQ densities and the Ritz pairs of the spectra."""
    import matplotlib.pyplot as plt

    from hess_utils.algorithms.density import gaussian_density

    fig, axes = plt.subplots(1, 3, figsize=(18, 4.6))
    for k, by in enumerate(groupings):
        sel = errors[errors.grouping == by]
        axes[0].scatter(sel["relative_error"], sel["cosine"], color=f"C{k}",
                        label=f"{by} ({sel.groups.iloc[0]} blocks)")
    axes[0].axvline(1.0, color="grey", ls=":")
    axes[0].set_xlabel("relative error ||(H − H_bd) v|| / ||H v||")
    axes[0].set_ylabel("cos(H v, H_bd v)")
    axes[0].set_title(f"{model_name} on {data_name}: block-diagonal error per random vector")
    axes[0].legend(fontsize="small")
    lo = min(f["value"].min() for f in spectra.values())
    hi = max(f["value"].max() for f in spectra.values())
    grid = np.linspace(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo), 800)
    sigma = 0.02 * (hi - lo)
    for k, (label, frame) in enumerate(spectra.items()):
        dens = gaussian_density((frame["value"].to_numpy(), frame["weight"].to_numpy()), sigma=sigma, grid=grid)
        axes[1].semilogy(dens.grid, np.maximum(dens.density, 1e-12), color=f"C{k}", label=label)
        f = frame.sort_values("value")
        axes[2].semilogy(f["value"], f["weight"], "o" if k == 0 else "x", color=f"C{k}", mfc="none", label=label)
    axes[1].set_ylim(bottom=1e-8)
    axes[1].set_xlabel("eigenvalue λ (nats/token per unit²)")
    axes[1].set_ylabel("spectral density")
    axes[1].set_title(f"SLQ densities, {num_iters} iterations, Gaussian σ = {sigma:.3g}")
    axes[1].legend()
    axes[2].set_xlabel("Ritz value θ")
    axes[2].set_ylabel("Ritz weight")
    axes[2].set_title("Ritz values and weights")
    axes[2].legend()
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------- 4. scaling
def width_configs(family: str, widths: Sequence[int]) -> dict[str, Any]:
    """``{"width W": config}``: the embedded tiny config of ``family`` with hidden size ``W`` and MLP ``4 W``
    (GPT-2 names ``n_embd, n_inner``; otherwise ``hidden_size, intermediate_size``)."""
    from hess_utils.harness.zoo import tiny_config

    configs = {}
    for width in widths:
        cfg = copy.deepcopy(tiny_config(family))
        if hasattr(cfg, "n_embd"):
            cfg.n_embd, cfg.n_inner = int(width), 4 * int(width)
        else:
            cfg.hidden_size, cfg.intermediate_size = int(width), 4 * int(width)
        configs[f"width {width}"] = cfg
    return configs


def scaling_tables(configs: Mapping[str, Any], batches: Sequence[Any], repeats: int,
                   seed: int = 0) -> dict[str, pd.DataFrame]:
    """``{"costs": scaling_study(...)}`` for :func:`hess_utils.runs.cached_results`."""
    return {"costs": studies.scaling_study(configs, batches, repeats=repeats, seed=seed)}


def scaling_costs(out: str | Path, family: str, widths: Sequence[int], data_name: str, seq_len: int,
                  num_sequences: int, repeats: int, seed: int = 0) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Section 4: a gradient and the two products for each of :func:`width_configs` (random weights), on
    ``num_sequences x seq_len`` tokens tokenised by ``family``'s tokenizer, computed once in
    ``out/09_scaling-DIGEST`` (the configuration includes torch's thread count): ``(costs, run.json)``."""
    from hess_utils import runs
    from hess_utils.batches import load_batches
    from hess_utils.models import load_model

    config = dict(family=family, widths=list(widths), data=data_name, seq_len=seq_len, num_sequences=num_sequences,
                  repeats=repeats, seed=seed, threads=torch.get_num_threads())
    _, tokenizer = load_model(family)
    batches = load_batches(data_name, tokenizer, seq_len=seq_len, num_sequences=num_sequences,
                           batch_size=num_sequences, seed=seed)
    res, run = runs.cached_results(runs.result_dir(Path(out), "09_scaling", config), config,
                                   partial(scaling_tables, width_configs(family, widths), batches, repeats, seed),
                                   model=family, data=data_name)
    return res["costs"], run


def power_law_fits(costs: pd.DataFrame) -> pd.DataFrame:
    """Per operation of a :func:`~hess_utils.harness.studies.scaling_study` table (in order): the power law of
    the time against the parameter count (:func:`~hess_utils.harness.studies.fit_power_law`), that of the peak
    memory over the rows with ``peak_mib > 0`` (NaN with fewer than two), and the range of the ratio to the
    gradient."""
    fits = []
    for name, group in costs.groupby("op", sort=False):
        t = studies.fit_power_law(group["num_params"], group["seconds"])
        m = group[group["peak_mib"] > 0]
        mem = studies.fit_power_law(m["num_params"], m["peak_mib"]) if len(m) >= 2 else None
        fits.append({"op": name, "time exponent": t.exponent, "time coefficient (s)": t.coefficient, "time r²": t.r2,
                     "memory exponent": mem.exponent if mem else np.nan, "memory r²": mem.r2 if mem else np.nan,
                     "ratio to gradient (min)": group["ratio_to_gradient"].min(),
                     "ratio to gradient (max)": group["ratio_to_gradient"].max()})
    return pd.DataFrame(fits)


def costs_view(costs: pd.DataFrame) -> Any:
    """The cost table formatted as the notebook shows it."""
    return _styled(costs, {"seconds": "{:.3f}", "seconds_min": "{:.3f}", "peak_mib": "{:.0f}",
                           "ratio_to_gradient": "{:.2f}", "num_params": "{:,}"})


def fits_view(fits: pd.DataFrame) -> Any:
    """:func:`power_law_fits` formatted as the notebook shows it."""
    return _styled(fits, {c: "{:.3g}" for c in fits.columns if c != "op"},
                   "power laws y = a N^b over the parameter count N")


def scaling_conclusions(costs: pd.DataFrame, fits: pd.DataFrame, modest_below: float = 6.0) -> str:
    """Section 4's conclusion (Markdown) from the cost table and :func:`power_law_fits` (ops ``gradient``,
    ``rev-rev``, ``fd``); the overhead is "modest" when no product costs ``modest_below`` gradients or more."""
    r = fits.set_index("op")
    fd_min, fd_max = r.loc["fd", "ratio to gradient (min)"], r.loc["fd", "ratio to gradient (max)"]
    return (
        f"Over {costs['num_params'].min():,}-{costs['num_params'].max():,} parameters a gradient scales like "
        f"N^{r.loc['gradient', 'time exponent']:.2f}, an exact product like N^{r.loc['rev-rev', 'time exponent']:.2f} "
        f"and a finite-difference product like N^{r.loc['fd', 'time exponent']:.2f}; a product costs "
        f"{r.loc['rev-rev', 'ratio to gradient (min)']:.1f}-{r.loc['rev-rev', 'ratio to gradient (max)']:.1f} "
        f"gradients (exact) and {fd_min:.1f}-{fd_max:.1f}"
        " (finite differences, two gradients plus vector updates). "
        + ("As the paper states, the overhead is a modest constant factor over first-order work."
           if r.loc[["rev-rev", "fd"], "ratio to gradient (max)"].max() < modest_below else
           "The overhead is larger than the modest constant factor the paper reports.")
        + " Small models on a shared CPU are dominated by fixed per-call costs, so exponents below 1 are expected "
          "here.")


def scaling_figure(costs: pd.DataFrame, fits: pd.DataFrame, family: str, widths: Sequence[int], num_sequences: int,
                   seq_len: int) -> Any:
    """Time per call with the fitted power laws, the ratio to a gradient and the peak memory, per operation."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 4.6))
    fit_rows = fits.set_index("op")
    for k, (name, group) in enumerate(costs.groupby("op", sort=False)):
        n = group["num_params"].to_numpy(float)
        axes[0].loglog(n, group["seconds"], "o", color=f"C{k}",
                       label=f"{name}: N^{fit_rows.loc[name, 'time exponent']:.2f}")
        law = studies.fit_power_law(n, group["seconds"])
        xs = np.geomspace(n.min(), n.max(), 50)
        axes[0].loglog(xs, law(xs), "-", color=f"C{k}", lw=1)
        axes[1].semilogx(n, group["ratio_to_gradient"], "o-", color=f"C{k}", label=name)
        m = group[group["peak_mib"] > 0]
        axes[2].loglog(m["num_params"], m["peak_mib"], "o-", color=f"C{k}", label=name)
    axes[0].set_xlabel("parameters N")
    axes[0].set_ylabel("median wall time per call (s)")
    axes[0].set_title(f"{family} widths {widths[0]}-{widths[-1]}, {num_sequences} x {seq_len} tokens, "
                      f"{torch.get_num_threads()} thread(s)")
    axes[0].legend(fontsize="small")
    axes[1].set_xlabel("parameters N")
    axes[1].set_ylabel("time / time of one gradient")
    axes[1].set_title("overhead of a Hessian-vector product over a gradient")
    axes[1].legend(fontsize="small")
    axes[2].set_xlabel("parameters N")
    axes[2].set_ylabel("peak extra memory (MiB, resident set)")
    axes[2].set_title("memory beyond the weights")
    axes[2].legend(fontsize="small")
    fig.tight_layout()
    return fig

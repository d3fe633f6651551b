"""The one setup call of a notebook, and the figures the notebooks draw.

Every notebook's third cell is::

    setup = notebook_setup(out_dir, figures_dir, quick=quick, torch_threads=torch_threads, seed=seed)

which resolves ``out_dir`` and ``figures_dir`` from the checkout (:func:`hess_utils.harness.notebooks.project_path`),
creates the figures folder, sets torch's threads (and seed), pandas' display width, starts the clock and prints one
line saying where results and figures go. :meth:`NotebookSetup.show` saves a figure (PNG + PDF) and shows it once,
:meth:`NotebookSetup.markdown` displays a conclusion, :meth:`NotebookSetup.done` says how long the notebook ran.

The ``*_figure`` functions below draw the notebooks' multi-panel figures from their tables; they compute no number
a notebook quotes (those come from :mod:`hess_utils.harness.studies`, where they are tested).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hess_utils.harness.notebooks import project_path
from hess_utils.paths import repo_root


@dataclass
class NotebookSetup:
    """Where a notebook writes (``out``: results, ``figures``: figures) and its helpers."""

    out: Path
    figures: Path
    quick: bool = False
    started: float = field(default_factory=time.perf_counter)
    saved: list[Path] = field(default_factory=list)

    def show(self, fig: Any, name: str) -> None:
        """Save ``fig`` as ``figures/name.png`` and ``.pdf``, close it, display the PNG once, print the paths
        (also kept in :attr:`saved`)."""
        import matplotlib.pyplot as plt

        from hess_utils import plotting

        paths = plotting.save_figure(fig, self.figures / name)
        plt.close(fig)
        _display_image(paths[0])
        root = repo_root()
        print("saved", ", ".join(str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in paths))
        self.saved.extend(paths)

    def markdown(self, text: str) -> None:
        """Display ``text`` as Markdown (printed outside a notebook)."""
        try:
            from IPython.display import Markdown, display
        except ImportError:  # pragma: no cover - IPython comes with the harness extra
            print(text)
            return
        display(Markdown(text))

    def elapsed(self) -> float:
        """Seconds since the setup call."""
        return time.perf_counter() - self.started

    def done(self) -> None:
        """Print the notebook's last line: how long it ran and where its results are."""
        print(f"notebook ran in {self.elapsed():.0f} s (quick={self.quick}); results under {self.out}")


def _display_image(path: Path) -> None:
    try:
        from IPython.display import Image, display
    except ImportError:  # pragma: no cover
        return
    display(Image(filename=str(path)))


def notebook_setup(
    out_dir: str | os.PathLike,
    figures_dir: str | os.PathLike,
    quick: bool = False,
    torch_threads: int | None = 1,
    seed: int | None = None,
    display_width: int = 160,
    verbose: bool = True,
) -> NotebookSetup:
    """The preamble of every notebook in one call.

    Parameters
    ----------
    out_dir, figures_dir
        Relative paths are taken from the checkout, whatever the kernel's working directory (nbval starts kernels
        in ``notebooks/``, papermill in the repository root). ``figures_dir`` is created.
    quick
        The notebook's quick flag (only reported).
    torch_threads
        ``torch.set_num_threads`` (1 is the fastest on a busy 2-core machine); None or 0 keeps torch's default.
    seed
        ``torch.manual_seed(seed)`` when given.
    """
    import pandas as pd
    import torch

    setup = NotebookSetup(project_path(out_dir), project_path(figures_dir), quick=bool(quick))
    setup.figures.mkdir(parents=True, exist_ok=True)
    if torch_threads:
        torch.set_num_threads(int(torch_threads))
    if seed is not None:
        torch.manual_seed(int(seed))
    pd.set_option("display.width", display_width)
    if verbose:
        print(f"quick={setup.quick}; results under {setup.out}, figures under {setup.figures}; "
              f"torch threads {torch.get_num_threads()}")
    return setup


# ---------------------------------------------------------------------------------------------- figures
def ghost_figure(ritz: Any, ghosts: Any, matrix: Any, seed: int, stem_iters: int, model_name: str) -> Any:
    """Notebook 03: stems of the float32 Ritz values with and without re-orthogonalisation against the exact
    spectral measure seen from the probe, and the converged copies / Cullum-Willoughby counts against ``k``."""
    import matplotlib.pyplot as plt
    import torch

    from hess_utils import plotting
    from hess_utils.harness import ablations
    from hess_utils.operators.dense import as_operator

    matrix = torch.as_tensor(np.asarray(matrix, dtype=np.float64))
    dim = matrix.shape[0]
    start = as_operator(matrix).random_vector("rademacher", seed)[0]
    true_values, true_weights = ablations.exact_spectral_measure(matrix, start)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    panels = (("full", "full re-orthogonalisation"), ("none", "no re-orthogonalisation"))
    for ax, (mode, label) in zip(axes[:2], panels):
        sel = ritz[(ritz.reorth == mode) & (ritz.dtype == "float32") & (ritz.k == min(stem_iters, dim))]
        plotting.ritz_stems(ax, true_values, np.maximum(true_weights, 1e-300), color="C7",
                            label=f"exact measure ({dim} eigenvalues)")
        plotting.ritz_stems(ax, sel.value, sel.weight, color="C0" if mode == "full" else "C3",
                            label=f"Ritz, k = {int(sel.k.iloc[0])}")
        flagged = sel[sel.ghost.astype(bool)]
        if len(flagged):
            ax.plot(flagged.value, flagged.weight, "kx", ms=9, label=f"{len(flagged)} ghost(s) (Cullum-Willoughby)")
        ax.set_ylim(1e-12, 2)
        ax.set_title(f"{label}, float32\nHessian of {model_name} w.r.t. {dim} parameters", fontsize=9)
        ax.legend(fontsize="small", loc="lower left")
    for (dt, mode), part in ghosts.groupby(["dtype", "reorth"]):
        style = "-o" if mode == "none" else "--s"
        axes[2].plot(part.k, part.extra_converged, style, ms=3, label=f"{mode}, {dt}: converged copies")
        if mode == "none":
            axes[2].plot(part.k, part.cw_ghosts, ":", label=f"{mode}, {dt}: flagged by Cullum-Willoughby")
    axes[2].axvline(dim, color="grey", lw=0.8)
    axes[2].text(dim, axes[2].get_ylim()[1] * 0.9, " k = dim", fontsize=8)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("Lanczos iterations k (Hessian-vector products)")
    axes[2].set_ylabel("number of Ritz values")
    axes[2].set_title("ghosts against iterations", fontsize=9)
    axes[2].legend(fontsize="x-small")
    fig.tight_layout()
    return fig


def reorth_cost_figure(costs: Any, title: str) -> Any:
    """Notebook 03: seconds per Lanczos iteration (product and the rest) and MiB held, per re-orthogonalisation
    mode of a :func:`hess_utils.harness.ablations.reorth_costs` table."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    x = np.arange(len(costs))
    axes[0].bar(x, costs.matvec_s_per_iter, label="Hessian-vector product")
    axes[0].bar(x, costs.reorth_s_per_iter, bottom=costs.matvec_s_per_iter, label="recurrence + re-orthogonalisation")
    axes[0].set_xticks(x, costs.reorth)
    axes[0].set_ylabel("seconds per Lanczos iteration")
    axes[0].set_title(title, fontsize=9)
    axes[0].legend(fontsize="small")
    axes[1].bar(x - 0.2, costs.basis_bytes_on_operator_device / 2**20, 0.4,
                label=f"basis on the operator's device ({costs.operator_device[0]})")
    axes[1].bar(x + 0.2, costs.basis_bytes_in_cpu_memory / 2**20, 0.4, label="basis in CPU memory")
    axes[1].bar(x, costs.working_vector_bytes / 2**20, 0.15, color="k", label="three working vectors (every mode)")
    axes[1].set_xticks(x, costs.reorth)
    axes[1].set_ylabel("MiB")
    axes[1].set_title("memory held by Lanczos", fontsize=9)
    axes[1].legend(fontsize="x-small")
    fig.tight_layout()
    return fig


def banded_figure(hists: Any, fractions: Any, model_name: str, data_name: str, num_columns: int) -> Any:
    """Notebook 06: histograms of |H_ij| of the random columns per subsample size, and their threshold fractions
    (mean, band min-max over columns), from :func:`hess_utils.harness.studies.banded_columns`."""
    import matplotlib.pyplot as plt
    import torch

    from hess_utils.algorithms.columns import DEFAULT_THRESHOLDS

    thr_cols = [c for c in fractions.columns if c.startswith("<")]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    for k, (size, group) in enumerate(hists.groupby("num_sequences")):
        nonzero = group[group["lo"] > 0].groupby("lo", as_index=False)[["hi", "count"]].agg({"hi": "first",
                                                                                              "count": "sum"})
        centres = np.sqrt(nonzero["lo"] * nonzero["hi"])
        axes[0].step(centres, nonzero["count"] / group["count"].sum(), where="mid", color=f"C{k}",
                     label=f"{size} sequence(s)")
    eps = float(torch.finfo(torch.float32).eps)
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].axvline(eps, color="grey", ls=":")
    axes[0].text(eps, axes[0].get_ylim()[1], " ε float32", va="top", fontsize=8)
    axes[0].set_xlabel("|H_ij| (nats/token per unit²)")
    axes[0].set_ylabel("fraction of entries per bin (4 per decade; zeros left out)")
    axes[0].set_title(f"{model_name} on {data_name}: |entries| of {num_columns} random Hessian columns")
    axes[0].legend()
    thresholds = np.array(DEFAULT_THRESHOLDS)
    for k, (size, group) in enumerate(fractions.groupby("num_sequences")):
        values = group[thr_cols].to_numpy()
        axes[1].plot(thresholds, values.mean(0), "o-", color=f"C{k}", label=f"{size} sequence(s), mean")
        axes[1].fill_between(thresholds, values.min(0), values.max(0), color=f"C{k}", alpha=0.2)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("threshold t (nats/token per unit²)")
    axes[1].set_ylabel("fraction of entries with |H_ij| < t")
    axes[1].set_title("threshold fractions (band: min-max over columns)")
    axes[1].legend()
    fig.tight_layout()
    return fig


def dataset_density_figure(plan: Any, ritz: Any, num_probes: int, model_name: str, base_seq_len: int,
                           base_sequences: int) -> Any:
    """Notebook 04: smoothed densities of the four studies of a :func:`hess_utils.harness.studies.dataset_plan`."""
    import matplotlib.pyplot as plt

    from hess_utils import plotting
    from hess_utils.harness.studies import study_spectra

    fig, axes = plt.subplots(2, 2, figsize=(15, 9))
    panels = [("random: sample size", f"random tokens, {base_seq_len} tokens per sequence: sample size (paper Fig. 4)"),
              ("random: sequence length", f"random tokens, {base_sequences} sequences: sequence length (paper Fig. 4)"),
              ("news: sample size", f"news, {base_seq_len} tokens per sequence: sample size (paper Fig. 5)"),
              ("corpora", f"{base_sequences} x {base_seq_len} tokens of each corpus")]
    for ax, (study, title) in zip(axes.flat, panels):
        sigma = plotting.density_overlay(ax, study_spectra(plan, ritz, study, num_probes))
        ax.set_title(f"{model_name}: {title}\nGaussian σ = {sigma:.3g}", fontsize=9)
    fig.tight_layout()
    return fig


def seen_unseen_figure(plan: Any, ritz: Any, summary: Any, model_name: str, data_name: str, base_seq_len: int,
                       sample_sizes: Any) -> Any:
    """Notebook 04: Ritz stems on seen (train) and unseen (held-out) text, and the extreme Ritz values against the
    number of sequences."""
    import matplotlib.pyplot as plt

    from hess_utils import plotting
    from hess_utils.harness.studies import sample_size_sweep

    seen = plan[(plan.study == "seen vs unseen")]
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.6))
    for ax, split in zip(axes[:2], ("train", "heldout")):
        for i, lab in enumerate(seen[seen.split == split].label):
            part = ritz[ritz.label == lab]
            plotting.ritz_stems(ax, part.value, part.weight, color=f"C{i}", label=lab)
        ax.set_title(f"{model_name} on {data_name} {split} "
                     f"({'seen in training' if split == 'train' else 'never seen'})", fontsize=9)
        ax.legend(fontsize="x-small")
        ax.set_ylim(1e-10, 2)
    for split, style in (("train", "-o"), ("heldout", "--s")):
        top, sizes = sample_size_sweep(summary, data_name, split, "lambda_max", base_seq_len, sample_sizes)
        low, _ = sample_size_sweep(summary, data_name, split, "lambda_min", base_seq_len, sample_sizes)
        axes[2].plot(sizes, top, style, color="C0", label=f"λ_max, {split}")
        axes[2].plot(sizes, -low, style, color="C3", label=f"|λ_min|, {split}")
    axes[2].set_xscale("log", base=2)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("sequences in the loss")
    axes[2].set_ylabel("|extreme Ritz value| (nats per token per unit²)")
    axes[2].set_title("extreme eigenvalues against sample size", fontsize=9)
    axes[2].legend(fontsize="x-small")
    fig.tight_layout()
    return fig


def subset_heatmaps_figure(matrices: Any, layout: Any, titles: dict[str, str], suptitle: str) -> Any:
    """Notebook 07: |H| of each subset of :func:`hess_utils.harness.studies.subset_hessians`, per-weight blocks
    outlined."""
    import matplotlib.pyplot as plt

    from hess_utils import plotting
    from hess_utils.harness.studies import subset_offsets

    fig, axes = plt.subplots(2, 2, figsize=(13, 12))
    for ax, (kind, title) in zip(axes.flat, titles.items()):
        h = matrices[f"H_{kind}"]
        offsets = subset_offsets(layout, kind)
        plotting.abs_heatmap(ax, h, f"{title}\n|H|, {h.shape[0]} x {h.shape[0]}", label="|H_ij| (nats/token per unit²)")
        for o in offsets[1:-1]:
            ax.axhline(o - 0.5, color="w", lw=0.4)
            ax.axvline(o - 0.5, color="w", lw=0.4)
        ax.set_xlabel("parameter index j in the subset")
        ax.set_ylabel("parameter index i in the subset")
    fig.suptitle(suptitle, y=1.0)
    fig.tight_layout()
    return fig


def batch_size_figure(errors: Any, title: str, seq_len: int) -> Any:
    """Notebook 07: relative errors and differences of the Hessian of ``b`` sequences (spectral and Frobenius)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    ax.semilogy(errors["b"], errors["rel_error_2"], "o-", color="C0", label="relative l2 error vs H^B (spectral)")
    ax.semilogy(errors["b"], errors["rel_error_fro"], "--", color="C0", alpha=0.6, label="same, Frobenius")
    ax.semilogy(errors["b"], errors["rel_diff_2"], "s-", color="C1", label="relative l2 difference H^(b+1) vs H^b")
    ax.semilogy(errors["b"], errors["rel_diff_fro"], "--", color="C1", alpha=0.6, label="same, Frobenius")
    ax.set_xlabel(f"batch size b (sequences of {seq_len} tokens)")
    ax.set_ylabel("relative error (dimensionless)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def hutchinson_convergence_figure(curve: Any, fit: Any, title: str) -> Any:
    """Notebook 08: the error and successive differences of the Hutchinson diagonal against ``k``, with the fit."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    ax.loglog(curve["k"], curve["rel_error"], color="C0", label="partial relative l2 error vs exact, first row (eq. 2)")
    ax.loglog(curve["k"], curve["rel_diff"], color="C1", alpha=0.7,
              label="relative l2 difference D^k vs D^(k-1) (eq. 3)")
    ax.loglog(curve["k"], fit(curve["k"]), "k--", lw=1,
              label=f"fit {fit.coefficient:.2f} k^{fit.exponent:.2f} (Monte Carlo: k^-0.5)")
    ax.axhline(0.25, color="grey", ls=":", lw=1)
    ax.set_xlabel("k, number of Hessian-vector products")
    ax.set_ylabel("relative l2 error (dimensionless)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def hutchinson_heatmaps_figure(res: Any, exact: Any, shown: Any, vmin: float, suptitle: str) -> Any:
    """Notebook 08: |D^k| at the ``shown`` k, and the first row's exact diagonal against the estimates."""
    import matplotlib.pyplot as plt

    from hess_utils import plotting

    fig, axes = plt.subplots(1, 3, figsize=(18, 5.6))
    for ax, k in zip(axes[:2], shown):
        plotting.abs_heatmap(ax, res[f"D_{k}"], f"|D^k|, k = {k}", vmin=vmin,
                             label="|diagonal estimate| (nats/token per unit²)")
        ax.set_xlabel("input index (column of the weight)")
        ax.set_ylabel("output index (row of the weight)")
    axes[2].plot(exact, "k", lw=2, label="exact (subset_hessian)")
    for k in shown:
        axes[2].plot(res[f"D_{k}"].reshape(-1)[: len(exact)], alpha=0.7, label=f"D^k, k = {k}")
    axes[2].set_xlabel("entry of the first row")
    axes[2].set_ylabel("diagonal of H (nats/token per unit²)")
    axes[2].set_title("first row: exact against estimates")
    axes[2].legend(fontsize="small")
    fig.suptitle(suptitle, y=1.02)
    fig.tight_layout()
    return fig


def device_map_figure(losses: Any, wide: Any, ritz: Any, model_name: str, data_name: str, spec_sequences: int,
                      spec_seq_len: int, num_iters: int) -> Any:
    """Notebook 01: the training and validation losses of both set-ups overlaid, their difference (a
    :func:`hess_utils.harness.studies.loss_differences` table) and the two smoothed Hessian spectra."""
    import matplotlib.pyplot as plt

    from hess_utils import plotting

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    for i, (name, group) in enumerate(losses.groupby("setup", sort=False)):
        for split, style in (("train", "-"), ("validation", "--")):
            part = group[group.split == split]
            axes[0].plot(part.step, part.loss, style, color=f"C{i}", lw=2.5 - 1.2 * i, label=f"{name}, {split}")
    axes[0].set_xlabel("optimiser step")
    axes[0].set_ylabel("mean token loss (nats per token)")
    axes[0].set_title(f"{model_name} trained further on {data_name}: losses overlaid")
    axes[0].legend(fontsize="small")
    for split, style in (("train", "-o"), ("validation", "--s")):
        part = wide[wide.split == split]
        axes[1].plot(part.step, part.difference, style, ms=3, label=split)
    axes[1].axhline(0, color="grey", lw=0.8)
    axes[1].set_xlabel("optimiser step")
    axes[1].set_ylabel("loss(device_map) - loss(single) (nats per token)")
    axes[1].set_title("difference of the losses")
    axes[1].legend(fontsize="small")
    spectra = {name: (g.value.to_numpy(), g.weight.to_numpy()) for name, g in ritz.groupby("setup", sort=False)}
    sigma = plotting.density_overlay(axes[2], spectra)
    axes[2].set_title(f"Hessian spectra after training ({spec_sequences} x {spec_seq_len} tokens, {num_iters} "
                      f"iterations)\nGaussian σ = {sigma:.3g}")
    fig.tight_layout()
    return fig


def density_slider(ritz: Any, title: str) -> Any:
    """Notebook 00: a slider of the Gaussian kernel width σ that re-smooths the Ritz table ``ritz`` (its measure from
    :func:`hess_utils.harness.studies.ritz_measure`; :func:`hess_utils.gaussian_density` on each move, no Hessian
    product). Starts at the default σ, spans 1/100 to 10 times it; displayed by ``ipywidgets.interact``, whose
    return value it returns."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    from hess_utils import gaussian_density
    from hess_utils.harness.studies import ritz_measure

    measure = ritz_measure(ritz)
    default_sigma = gaussian_density(measure).sigma

    def show_density(sigma: float) -> None:
        dens = gaussian_density(measure, sigma=sigma)
        fig, ax = plt.subplots(figsize=(8, 3.8))
        ax.semilogy(dens.grid, np.maximum(dens.density, dens.density.max() * 1e-10))
        ax.set_xlabel("eigenvalue λ of the loss Hessian (nats per token per unit²)")
        ax.set_ylabel("spectral density")
        ax.set_title(f"{title}: Gaussian smoothing σ = {sigma:.3g} (mass on grid {dens.mass_on_grid:.3f})")
        plt.show()

    slider = widgets.FloatLogSlider(value=default_sigma, base=10, min=np.log10(default_sigma) - 2,
                                    max=np.log10(default_sigma) + 1, step=0.05, description="σ",
                                    readout_format=".2e", continuous_update=False)
    return widgets.interact(show_density, sigma=slider)


def engine_stems_figure(ddp: Any, single: Any, agreement: Any, title: str, nproc: int) -> Any:
    """Notebook 02: the Ritz stems of the distributed and the single-process run (ghosts marked) and the difference
    per Ritz value, from :func:`hess_utils.harness.studies.engine_agreement`."""
    import matplotlib.pyplot as plt

    from hess_utils import plotting

    cmp = agreement["table"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    for ax, (engine, frame), color in zip(axes[:2], ((f"ddp, {nproc} ranks", ddp), ("single process", single)),
                                          ("C0", "C3")):
        plotting.ritz_stems(ax, frame.value, frame.weight, color=color, label=engine)
        ghosts = frame[frame.ghost.astype(bool)]
        if len(ghosts):
            ax.plot(ghosts.value, ghosts.weight, "kx", ms=9, label="flagged ghost (Cullum-Willoughby)")
        ax.set_title(f"{engine}\n{title}", fontsize=9)
        ax.legend(fontsize="small")
    floor = 1e-17 * float(np.abs(cmp.value_single).max())  # exact agreement (0) is drawn at this floor
    axes[2].semilogy(cmp.value_single, np.maximum(cmp.abs_diff, floor), "o", ms=4)
    axes[2].axhline(floor, color="grey", lw=0.8, ls=":")
    axes[2].set_xlabel("Ritz value θ (single process)")
    axes[2].set_ylabel(f"|θ_ddp - θ_single| (floor {floor:.0e} = exact agreement)")
    axes[2].set_title(f"difference per Ritz value: max {agreement['max_dvalue']:.2e} ({agreement['max_rel']:.1e} "
                      "relative)", fontsize=9)
    fig.tight_layout()
    return fig

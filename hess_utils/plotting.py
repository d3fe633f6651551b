"""Figures shared by the notebooks and the CLI; every function takes saved results, never recomputes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hess_utils import _io


def _matplotlib():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("module://matplotlib_inline.backend_inline", "agg"):
        try:
            import IPython  # noqa: F401  (inside Jupyter the inline backend is already chosen)
        except ImportError:
            matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, stem: str | Path, formats: tuple[str, ...] = ("png", "pdf")) -> list[Path]:
    """Save ``fig`` as ``stem.png`` and ``stem.pdf`` (atomically); returns the paths."""
    paths = []
    for fmt in formats:
        target = Path(f"{stem}.{fmt}")
        with _io.atomic_path(target) as tmp:
            fig.savefig(tmp, format=fmt, dpi=150, bbox_inches="tight")
        paths.append(target)
    return paths


def spectrum_axes(ax_density, ax_stem, ax_log, values, weights, probes, title: str, sigma: float | None = None):
    """Draw a Gaussian-smoothed density, a Ritz stem plot and a log-|lambda| view of one spectrum."""
    from hess_utils.algorithms.density import gaussian_density, log_abs_density

    dens = gaussian_density((values, weights), sigma=sigma)
    floor = max(dens.density.max() * 1e-10, 1e-300)
    ax_density.semilogy(dens.grid, np.maximum(dens.density, floor))
    ax_density.set_xlabel("eigenvalue λ of the loss Hessian (nats per token per unit²)")
    ax_density.set_ylabel("spectral density")
    ax_density.set_title(f"{title}\nGaussian smoothing, σ = {dens.sigma:.3g} (standard deviation)")
    for p in np.unique(probes):
        sel = probes == p
        ax_stem.stem(values[sel], weights[sel], linefmt=f"C{int(p) % 10}-", markerfmt=f"C{int(p) % 10}o",
                     basefmt=" ", label=f"probe {int(p)}")
    ax_stem.set_yscale("log")
    ax_stem.set_xlabel("Ritz value θ")
    ax_stem.set_ylabel("Ritz weight (squared first component)")
    ax_stem.set_title("Ritz values and weights per probe")
    if len(np.unique(probes)) <= 10:
        ax_stem.legend(fontsize="small")
    logd = log_abs_density((values, weights))
    ax_log.plot(logd.grid, logd.positive, label=f"λ > 0 (mass {logd.positive_mass:.2f})")
    ax_log.plot(logd.grid, logd.negative, label=f"λ < 0 (mass {logd.negative_mass:.2f})")
    ax_log.set_xlabel("log10 |λ|")
    ax_log.set_ylabel("density per decade")
    ax_log.set_title(f"log view; |λ| < {logd.threshold:.1e}: mass {logd.near_zero_mass:.2f}")
    ax_log.legend(fontsize="small")


def plot_spectrum_run(run_dir: str | Path, stem: str | Path, sigma: float | None = None) -> list[Path]:
    """Plot a saved spectrum run (``ritz.csv`` + ``run.json``) to ``stem.png`` / ``stem.pdf``."""
    from hess_utils.runs import load_run

    plt = _matplotlib()
    frame, record = load_run(run_dir)
    values, weights = frame["value"].to_numpy(float), frame["weight"].to_numpy(float)
    probes = frame["probe"].to_numpy()
    title = (f"{record.get('model')} on {record.get('data')} ({record.get('num_tokens')} tokens, "
             f"dim {record.get('dim'):,}, {record.get('method')})")
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    spectrum_axes(*axes, values, weights, probes, title, sigma=sigma)
    fig.tight_layout()
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths

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


def abs_heatmap(ax, matrix, title: str, vmin: float | None = None, cmap: str = "viridis", colorbar: bool = True,
                label: str = "|entry|"):
    """Heat map of ``|matrix|`` on a logarithmic colour scale (entries span many decades); zeros drawn at ``vmin``.

    ``vmin`` defaults to ``1e-6 * max |entry|``. Returns the image.
    """
    from matplotlib.colors import LogNorm

    mags = np.abs(np.asarray(matrix, dtype=np.float64))
    top = float(mags.max()) if mags.size and mags.max() > 0 else 1.0
    vmin = top * 1e-6 if vmin is None else float(vmin)
    image = ax.imshow(np.maximum(mags, vmin), norm=LogNorm(vmin=vmin, vmax=max(top, vmin * 10)), cmap=cmap,
                      interpolation="nearest", aspect="equal")
    ax.set_title(title)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=label)
    return image


def ritz_stems(ax, values, weights, label: str | None = None, color: str = "C0", marker: str = "o",
               log: bool = True):
    """Stem plot of Ritz values ``values`` (x) against their weights ``weights`` (y, log scale by default).

    Several calls on one axis overlay runs (e.g. single-device in one colour, distributed in another).
    """
    values, weights = np.asarray(values, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    stems = ax.stem(values, weights, linefmt=f"{color}-", markerfmt=f"{color}{marker}", basefmt=" ", label=label)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("Ritz value θ (nats per token per unit²)")
    ax.set_ylabel("Ritz weight (squared first component)")
    return stems


def density_overlay(ax, spectra, sigma: float | None = None, num_points: int = 2000, log: bool = True,
                    floor: float = 1e-8) -> float:
    """Gaussian-smoothed densities of several spectra on one common grid; returns the kernel's sigma.

    ``spectra`` maps a label to ``(values, weights)`` (weights summing to 1, e.g. one probe's Ritz pairs, or
    several probes' with weights divided by the number of probes). ``sigma`` (a standard deviation) defaults to
    1/100 of the spread of all values together, so the curves are smoothed alike and comparable. With ``log`` the
    y axis is logarithmic and densities below ``floor`` times the largest peak are clipped to it.
    """
    from hess_utils.algorithms.density import DEFAULT_MARGIN, default_sigma, gaussian_density

    if not spectra:
        raise ValueError("no spectra to plot: pass {label: (values, weights)}")
    everything = np.concatenate([np.asarray(v, dtype=np.float64) for v, _ in spectra.values()])
    sigma = default_sigma(everything) if sigma is None else float(sigma)
    grid = np.linspace(everything.min() - DEFAULT_MARGIN * sigma, everything.max() + DEFAULT_MARGIN * sigma,
                       num_points)
    curves = {label: gaussian_density((np.asarray(v, np.float64), np.asarray(w, np.float64)), sigma=sigma, grid=grid)
              for label, (v, w) in spectra.items()}
    top = max(float(c.density.max()) for c in curves.values())
    for i, (label, dens) in enumerate(curves.items()):
        y = np.maximum(dens.density, floor * top) if log else dens.density
        ax.plot(dens.grid, y, color=f"C{i % 10}", label=label)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("eigenvalue λ (nats per token per unit²)")
    ax.set_ylabel("spectral density")
    ax.legend(fontsize="small")
    return sigma

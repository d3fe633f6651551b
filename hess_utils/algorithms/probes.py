"""Seeds of random probes and the argument checks shared by the estimators.

Every randomised estimator here draws probe ``p`` (``p = 0, 1, ...``) from the seed

.. math:: s_p = \\text{seed} \\cdot 1\\,000\\,003 + p,

so probe ``p`` of a run is the same vector whatever the number of probes, the engine or the devices
(:func:`hess_utils.vectors.random_like` draws on the CPU), and runs with different seeds share no probe as
long as they use fewer than 1,000,003 probes.
"""

from __future__ import annotations

import numbers

SEED_STRIDE = 1_000_003


def probe_seed(seed: int, index: int) -> int:
    """Seed of probe ``index`` of a run seeded with ``seed``: ``seed * 1_000_003 + index``.

    Parameters
    ----------
    seed : int
        Non-negative seed of the whole run.
    index : int
        Probe number, ``0 <= index < 1_000_003``.

    Returns
    -------
    int
    """
    seed = check_seed(seed)
    if not 0 <= index < SEED_STRIDE:
        raise ValueError(f"probe index {index} out of range [0, {SEED_STRIDE}); use fewer probes per seed")
    return seed * SEED_STRIDE + index


def check_seed(seed: int) -> int:
    """``seed`` as a Python int, refusing negative or non-integer seeds."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def check_count(name: str, value: int, minimum: int = 1) -> int:
    """``value`` as a Python int, refusing non-integers and values below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)

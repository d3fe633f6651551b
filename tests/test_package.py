"""The public names the notebooks, tests and benchmarks rely on."""

import hess_utils

NAMES = ["load_model", "load_batches", "hessian_operator", "as_operator", "lanczos", "slq", "gaussian_density",
         "kpm_density", "hutchinson_diagonal", "hutchinson_trace", "subset_hessian", "hessian_column"]


def test_top_level_names_resolve():
    for name in NAMES:
        assert callable(getattr(hess_utils, name)), name
    assert set(NAMES) <= set(hess_utils.__all__)

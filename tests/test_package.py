"""The public names the notebooks, tests and benchmarks rely on."""

import hess_utils

NAMES = ["load_model", "load_batches", "hessian_operator", "as_operator", "lanczos", "slq", "gaussian_density",
         "kpm_density", "hutchinson_diagonal", "hutchinson_trace", "subset_hessian", "hessian_column"]


def test_top_level_names_resolve():
    for name in NAMES:
        assert callable(getattr(hess_utils, name)), name
    assert set(NAMES) <= set(hess_utils.__all__)


RESULTS = ["LanczosResult", "SLQResult", "DensityResult", "LogDensityResult", "KPMResult", "HutchinsonResult",
           "EigshResult", "SolveResult", "SubsetHessian", "HessianColumn", "BlockDiagonalError"]


def test_result_types_are_exported_frozen_dataclasses():
    import dataclasses

    for name in RESULTS:
        cls = getattr(hess_utils, name)
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, name
        assert name in hess_utils.__all__, name


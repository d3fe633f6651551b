"""Root pytest set-up, read before any test or notebook is collected.

The notebooks under ``notebooks/`` run under nbval (``--nbval-lax`` in ``pyproject.toml``) in *quick* mode: their
parameters cell reads ``HESS_UTILS_QUICK``, and nbval's kernels inherit this process's environment, so it is set
here before any kernel starts. ``HESS_UTILS_QUICK=0 pytest notebooks/`` runs them at full size instead. Nothing
reaches a model or dataset hub.
"""

import os

os.environ.setdefault("HESS_UTILS_QUICK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

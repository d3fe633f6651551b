"""The library on its own dependencies: ``hessian_operator -> slq -> gaussian_density`` with nothing else.

    python scripts/core_smoke.py

Run by ``make core-smoke`` (part of ``make test``) in a scratch environment that holds only the
``[project] dependencies`` of pyproject.toml, none of the ``harness`` extra (corpora, GGUF, tokenizer
training) nor the ``dev`` one. A tiny Llama is built from a config (no download), its exact Hessian in float64
is taken as an operator, SLQ runs with its default re-orthogonalisation (``"partial"``: a semi-orthogonal
basis) for ``m = dim`` steps on one probe, and the checks are ones that can fail: the Ritz values of a
complete Krylov basis are the eigenvalues of the dense Hessian (built column by column with the same
operator, then ``numpy.linalg.eigvalsh``), and no
module of the reproduction harness nor any harness-only package was imported on the way.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

HARNESS_PACKAGES = ("datasets", "gguf", "mwparserfromhell", "pyarrow", "seaborn", "papermill", "nbval")
HARNESS_PREFIX = "hess_utils.harness"


def main() -> int:
    import transformers

    import hess_utils as hu

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=16, hidden_size=4, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=8, max_position_embeddings=8)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model = model.to(torch.float64).eval()
    ids = torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(0))
    op = hu.hessian_operator(model, [{"input_ids": ids}], method="rev-rev")
    dense = op.to_dense().numpy()
    eigenvalues = np.linalg.eigvalsh((dense + dense.T) / 2)
    result = hu.slq(op, num_iters=op.dim, num_probes=1, progress=False)
    ritz = np.sort(result.runs[0].ritz_values)
    density = hu.gaussian_density(result)
    scale = np.abs(eigenvalues).max()
    top, bottom = abs(ritz[-1] - eigenvalues[-1]) / scale, abs(ritz[0] - eigenvalues[0]) / scale
    problems = []
    if not (top < 1e-10 and bottom < 1e-10):
        problems.append(f"extreme Ritz values off the dense eigenvalues: {top:.1e}, {bottom:.1e} (bound 1e-10)")
    if not np.isfinite(density.density).all() or abs(density.mass_on_grid - 1) > 1e-3:
        problems.append(f"density not finite or its mass on the grid is {density.mass_on_grid:.6f}")
    imported = [m for m in HARNESS_PACKAGES if m in sys.modules]
    imported += sorted(m for m in sys.modules if m == HARNESS_PREFIX or m.startswith(HARNESS_PREFIX + "."))
    if imported:
        problems.append(f"the library imported {', '.join(imported)}")
    print(f"core smoke: dim {op.dim}, {len(ritz)} Ritz values, extreme ones within {max(top, bottom):.1e} of "
          f"eigvalsh, density mass {density.mass_on_grid:.6f}, harness modules imported: {imported or 'none'}")
    for p in problems:
        print(f"  FAILED: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

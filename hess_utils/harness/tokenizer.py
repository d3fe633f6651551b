"""The project's own tokenizer for the tiny embedded models.

Tokenizer
---------
One byte-level BPE tokenizer (vocabulary 4096, GPT-2-style pre-tokenisation, no normaliser, so that
``decode(encode(s)) == s`` for any text) trained with the ``tokenizers`` library on the ``wiki`` and ``news``
train texts of :mod:`hess_utils.harness.corpora`, wrapped in a :class:`~transformers.PreTrainedTokenizerFast` with
bos, eos and pad tokens, and cached under ``cache_dir("tokenizers", "bpe4096")``. Training takes a few
seconds and is deterministic. Encoding adds no special tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hess_utils._io import atomic_path, is_complete, mark_complete
from hess_utils.paths import cache_dir

BPE_VOCAB_SIZE = 4096
BPE_NAME = "bpe4096"
BPE_CORPORA = ("wiki", "news")
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
MODEL_MAX_LENGTH = 256

# Anything that changes the trained tokenizer goes here: a change invalidates existing caches.
BPE_RECIPE: dict[str, Any] = {
    "kind": "byte-level-bpe",
    "version": 1,
    "vocab_size": BPE_VOCAB_SIZE,
    "corpora": list(BPE_CORPORA),
    "split": "train",
    "special_tokens": list(SPECIAL_TOKENS),
    "min_frequency": 2,
    "model_max_length": MODEL_MAX_LENGTH,
}


# ----------------------------------------------------------------------------------------------------------
# The shared BPE tokenizer
# ----------------------------------------------------------------------------------------------------------


def tokenizer_dir() -> Path:
    """Folder of the cached BPE tokenizer: ``cache_dir("tokenizers") / "bpe4096"`` (not created here)."""
    return cache_dir("tokenizers") / BPE_NAME


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = BPE_VOCAB_SIZE):
    """Train a byte-level BPE tokenizer on ``texts``.

    Parameters
    ----------
    texts
        Training documents.
    vocab_size
        Size of the vocabulary, special tokens included.

    Returns
    -------
    transformers.PreTrainedTokenizerFast
        The tokenizer, with bos ``<|bos|>`` (id 0), eos ``<|eos|>`` (id 1) and pad ``<|pad|>`` (id 2);
        encoding adds no special tokens and decoding does not clean up spaces, so that text round-trips.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=BPE_RECIPE["min_frequency"],
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_MAX_LENGTH,
    )


def prepare_tokenizer() -> Path:
    """Train and cache the shared BPE tokenizer once (idempotent; rebuilt when the cache is invalid).

    Returns
    -------
    Path
        The tokenizer folder (load it with ``PreTrainedTokenizerFast.from_pretrained``).
    """
    from filelock import FileLock

    target = tokenizer_dir()
    if is_complete(target, BPE_RECIPE):
        return target
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if is_complete(target, BPE_RECIPE):
            return target
        from hess_utils.batches import corpus_texts

        texts: list[str] = []
        for name in BPE_CORPORA:
            texts.extend(corpus_texts(name, split="train"))
        tokenizer = train_bpe_tokenizer(texts)
        with atomic_path(target) as tmp:
            tokenizer.save_pretrained(str(tmp))
            mark_complete(tmp, BPE_RECIPE)
    return target


def load_tokenizer():
    """The shared BPE tokenizer (prepared on first use).

    Returns
    -------
    transformers.PreTrainedTokenizerFast
        A fresh tokenizer instance.
    """
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(prepare_tokenizer()))

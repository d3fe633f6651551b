"""The project's own tokenizer for the tiny embedded models, and the completion markers of prepared caches.

Tokenizer
---------
One byte-level BPE tokenizer (vocabulary 4096, GPT-2-style pre-tokenisation, no normaliser, so that
``decode(encode(s)) == s`` for any text) trained with the ``tokenizers`` library on the ``wiki`` and ``news``
train texts of :mod:`hess_utils.data`, wrapped in a :class:`~transformers.PreTrainedTokenizerFast` with
bos, eos and pad tokens, and cached under ``cache_dir("tokenizers", "bpe4096")``. Training takes a few
seconds and is deterministic. Encoding adds no special tokens.

Cache markers
-------------
A prepared cache folder (tokenizer or model) is valid only if its marker file ``complete.json``, written
last, lists every other file of the folder with its size and sha256, and the recipe it was built from
matches the current one. Files whose size and modification time are unchanged are trusted without
re-hashing (so that loading a 500 MB model stays fast); others are re-hashed. A truncated, deleted,
rewritten or half-written file, or a changed recipe, makes the folder invalid, and it is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hess_utils._io import atomic_path
from hess_utils.paths import cache_dir

MARKER = "complete.json"
MARKER_FORMAT = 1

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
# Completion markers
# ----------------------------------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes.

    Parameters
    ----------
    path
        The file.

    Returns
    -------
    str
        The hex digest.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _normalised(recipe: Mapping[str, Any]) -> Any:
    """The recipe as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(recipe, sort_keys=True, default=str))


def _payload_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER)


def mark_complete(folder: str | Path, recipe: Mapping[str, Any]) -> Path:
    """Write the marker of ``folder``: size, mtime and sha256 of every other file, and the recipe.

    Call it last, once everything else in the folder is written.

    Parameters
    ----------
    folder
        The cache folder (typically the temporary folder of :func:`hess_utils._io.atomic_path`).
    recipe
        JSON-serialisable description of how the content was built; :func:`is_complete` requires the
        same recipe.

    Returns
    -------
    Path
        The marker file.
    """
    folder = Path(folder)
    files = {}
    for p in _payload_files(folder):
        st = p.stat()
        files[p.relative_to(folder).as_posix()] = {
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "sha256": file_sha256(p),
        }
    marker = folder / MARKER
    body = {"format": MARKER_FORMAT, "recipe": _normalised(recipe), "files": files}
    marker.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return marker


def is_complete(folder: str | Path, recipe: Mapping[str, Any] | None = None, full: bool = False) -> bool:
    """Whether ``folder`` holds a complete, intact cache built from ``recipe``.

    Parameters
    ----------
    folder
        The cache folder.
    recipe
        The expected recipe; ``None`` accepts any.
    full
        Re-hash every file even when its size and modification time match the marker.

    Returns
    -------
    bool
        ``True`` when the marker exists, is readable, matches the recipe, and every file it lists exists
        with the recorded size and content, and no file has been added.
    """
    folder = Path(folder)
    try:
        body = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        files = body["files"]
        if body.get("format") != MARKER_FORMAT or not files:
            return False
        if recipe is not None and body.get("recipe") != _normalised(recipe):
            return False
        present = {p.relative_to(folder).as_posix() for p in _payload_files(folder)}
        if present != set(files):
            return False
        for rel, meta in files.items():
            st = (folder / rel).stat()
            if st.st_size != meta["size"]:
                return False
            if full or st.st_mtime_ns != meta["mtime_ns"]:
                if file_sha256(folder / rel) != meta["sha256"]:
                    return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return True


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
        from hess_utils.data import corpus_texts

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

"""Texts and token batches for the loss: prepared corpora, local files and hub datasets, one batch loader.

A corpus name is, in this order: a prepared corpus folder ``cache_dir("corpora", name)`` (the embedded
corpora of the reproduction harness, built by ``python -m hess_utils.harness prepare``: ``train.txt`` and
``heldout.txt`` in JSON Lines, one ``{"id", "text"}`` object per document, and ``meta.json`` with their sizes
and sha256, checked on every read), ``"random"`` (uniform token ids, no text), an existing local file or
folder, or a Hugging Face hub dataset id (the last two through :mod:`datasets`, imported only then).

Splits
------
A prepared corpus carries its own ``train`` / ``heldout`` files (the harness splits by a hash of each document's
key, :mod:`hess_utils.harness.corpora`). A local file or hub dataset without named splits is split by the same
rule keyed by document index: ``heldout`` iff the first 8 bytes of ``sha256("<tag>/<index>")`` as a fraction of
``2**64`` are below :data:`HELDOUT_FRACTION` (0.1); were none to land there, the smallest hash moves there.

Other corpora
-------------
A name that is not prepared is (1) an existing local ``.txt``/``.json``/``.jsonl``/``.csv``/``.parquet``
file or a folder of such files (``.txt``: one document per non-empty line; others: the ``text`` column, or the
first string column), or (2) a Hugging Face hub dataset id, with an optional configuration written
``repo:config`` (``wikitext:wikitext-2-raw-v1``); ``repo/config`` is also tried as repository ``repo`` with
configuration ``config`` when ``repo/config`` itself cannot be loaded. Offline (``HF_DATASETS_OFFLINE=1``) a hub
dataset must already be in the local ``datasets`` cache. ``train`` is the hub split ``train``; ``heldout`` is
``validation``, else ``test``. A local folder with files whose names say ``train`` and
``valid``/``validation``/``dev``/``test``/``heldout`` uses them as the two splits; otherwise (a single file, or a
hub dataset with only ``train``) the documents are split with the hash rule above, keyed by their index.

Batches
-------
:func:`load_batches` shuffles the documents of a split with a seeded generator, tokenises them in that order
(no special tokens) until it has twice the tokens it needs (or the corpus ends), joins them with the
tokenizer's EOS token between documents, cuts the stream into contiguous chunks of exactly ``seq_len``
tokens, and picks ``num_sequences`` of them without replacement with the same generator. Nothing is padded,
so batches carry only ``input_ids`` (no ``attention_mask``).
"""


from __future__ import annotations

import hashlib
import json
import operator
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hess_utils.paths import cache_dir
from hess_utils.progress import progress_bar, quiet_library_bars

__all__ = ["SPLITS", "HELDOUT_FRACTION", "corpus_texts", "load_batches", "prepared_corpora"]

SPLITS: tuple[str, ...] = ("train", "heldout")
"""The two splits; ``validation``, ``valid`` and ``test`` are accepted as aliases of ``heldout``."""

HELDOUT_FRACTION = 0.1
"""Expected share of documents in the ``heldout`` split (see the module docstring for the rule)."""

_SPLIT_ALIASES = {
    "train": "train",
    "heldout": "heldout",
    "validation": "heldout",
    "valid": "heldout",
    "test": "heldout",
}
_LOCAL_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

# Files already hashed in this process: path -> (size, mtime_ns, sha256).
_VERIFIED: dict[str, tuple[int, int, str]] = {}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _verified_sha256(path: Path) -> str:
    """sha256 of ``path``, re-hashed only if its size or modification time changed in this process."""
    st = path.stat()
    known = _VERIFIED.get(str(path))
    if known is not None and known[:2] == (st.st_size, st.st_mtime_ns):
        return known[2]
    digest = _sha256_file(path)
    _VERIFIED[str(path)] = (st.st_size, st.st_mtime_ns, digest)
    return digest


def _is_heldout_key(corpus: str, key: str) -> bool:
    digest = hashlib.sha256(f"{corpus}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < HELDOUT_FRACTION


def _hash_rank(corpus: str, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{corpus}/{key}".encode()).digest()[:8], "big")


def _derive_seed(seed: int, *tags: str) -> int:
    """A 63-bit seed mixing ``seed`` with ``tags`` (so that splits and corpora draw independent streams)."""
    text = "/".join([str(seed), *tags])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") & (2**63 - 1)


def _normalise_split(split: str) -> str:
    if not isinstance(split, str) or split.lower() not in _SPLIT_ALIASES:
        raise ValueError(
            f"Unknown split {split!r}: use 'train' or 'heldout' ('validation', 'valid' and 'test' are "
            "accepted as aliases of 'heldout')."
        )
    return _SPLIT_ALIASES[split.lower()]


def _check_name(name: Any) -> str:
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str) or not name.strip():
        raise ValueError(
            f"Dataset name must be a non-empty string, got {name!r}: use a prepared corpus "
            f"({', '.join(prepared_corpora()) or 'none prepared'}), 'random', a local file or folder, or a Hugging "
            "Face hub id."
        )
    return name.strip()


def _datasets():
    """The :mod:`datasets` package, or a clear error (only local files and hub datasets need it)."""
    try:
        import datasets
    except ImportError:
        raise ValueError("reading local files or hub datasets needs the `datasets` package: pip install datasets "
                         "(or the harness extra, pip install -e .[harness])") from None
    return datasets


def prepared_corpora() -> list[str]:
    """The names of the prepared corpus folders under ``cache_dir("corpora")`` (those with a ``meta.json``)."""
    return sorted(p.name for p in cache_dir("corpora").iterdir() if (p / "meta.json").is_file())


def _prepared_folder(name: str) -> Path | None:
    if "/" in name or name.startswith(".") or os.sep in name:
        return None
    folder = cache_dir("corpora") / name
    return folder if (folder / "meta.json").is_file() else None


def _read_prepared(folder: Path, split: str) -> list[str]:
    """The documents of a prepared corpus split, after checking the file against its size and sha256."""
    path = folder / f"{split}.txt"
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        expected_size, expected_sha = meta["bytes"][path.name], meta["sha256"][path.name]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{folder} is not a readable prepared corpus ({type(err).__name__}: {err}): rebuild it "
                         "with `python -m hess_utils.harness prepare`") from None
    if not path.is_file() or path.stat().st_size != expected_size or _verified_sha256(path) != expected_sha:
        raise ValueError(f"{path} is missing or does not match its meta.json (truncated or edited): rebuild it "
                         "with `python -m hess_utils.harness prepare`")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _text_column(dataset: Any, where: str) -> list[str]:
    """The non-empty strings of the ``text`` column of ``dataset``, or of its first string column."""
    columns = list(dataset.column_names)
    string_columns = [
        c for c in columns if getattr(dataset.features.get(c), "dtype", None) in ("string", "large_string")
    ]
    column = "text" if "text" in columns else (string_columns[0] if string_columns else None)
    if column is None:
        raise ValueError(f"{where} has no text column (columns: {columns}): give it a 'text' column of strings.")
    return [t for t in dataset[column] if isinstance(t, str) and t.strip()]


def _hash_split(texts: list[str], tag: str, split: str) -> list[str]:
    """The documents of ``split`` under the hash rule, keyed by index (at least one heldout if possible)."""
    heldout = {i for i in range(len(texts)) if _is_heldout_key(tag, str(i))}
    if not heldout and len(texts) > 1:
        heldout = {min(range(len(texts)), key=lambda i: _hash_rank(tag, str(i)))}
    return [t for i, t in enumerate(texts) if (i in heldout) == (split == "heldout")]


def _local_texts(path: Path, split: str) -> list[str]:
    datasets = _datasets()

    if path.is_file():
        files = [path]
    else:
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in _LOCAL_BUILDERS
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    if not files:
        raise ValueError(
            f"{str(path)!r} holds no .txt/.json/.jsonl/.csv/.parquet file: point to such a file or a folder of them."
        )
    kinds = {_LOCAL_BUILDERS.get(p.suffix.lower()) for p in files}
    if None in kinds or len(kinds) != 1:
        raise ValueError(
            f"{str(path)!r}: cannot mix or read these file types ({sorted({p.suffix for p in files})}); use one "
            "of .txt, .json/.jsonl, .csv or .parquet."
        )
    builder = kinds.pop()

    def role(p: Path) -> str | None:
        stem = p.stem.lower()
        if re.search(r"(^|[^a-z])(train|training)([^a-z]|$)", stem):
            return "train"
        if re.search(r"(^|[^a-z])(valid|validation|val|dev|test|heldout|eval)([^a-z]|$)", stem):
            return "heldout"
        return None

    named = {s: [str(p) for p in files if role(p) == s] for s in SPLITS}
    use_named = path.is_dir() and all(named.values())
    data_files = named[split] if use_named else [str(p) for p in files]
    try:
        with quiet_library_bars():
            ds = datasets.load_dataset(builder, data_files={"train": data_files}, split="train")
    except Exception as err:  # noqa: BLE001 - any reader error becomes one readable message
        raise ValueError(
            f"Could not read {str(path)!r} with datasets' {builder!r} loader: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None
    texts = _text_column(ds, repr(str(path)))
    return texts if use_named else _hash_split(texts, f"local:{path.resolve()}", split)


def _unknown_message(name: str, reasons: Sequence[str]) -> str:
    why = "; ".join(reasons) if reasons else "not found"
    return (
        f"Unknown dataset {name!r}: it is not a prepared corpus, not an existing local file or folder, and "
        f"could not be loaded as a Hugging Face hub dataset ({why}). Use a prepared corpus "
        f"({', '.join(prepared_corpora()) or 'none prepared'}; the embedded ones are built by "
        "`python -m hess_utils.harness prepare`) or 'random'; or a local .txt/.json/.jsonl/.csv/.parquet file or a "
        "folder of them; or a hub id, "
        "with an optional configuration as 'repo:config' (e.g. 'wikitext:wikitext-2-raw-v1'), which must "
        "already be in the local datasets cache when offline (HF_DATASETS_OFFLINE=1)."
    )


def _hub_texts(name: str, split: str) -> list[str]:
    datasets = _datasets()

    if ":" in name:
        repo, config = name.rsplit(":", 1)
        candidates: list[tuple[str, str | None]] = [(repo, config or None)]
    else:
        candidates = [(name, None)]
        if "/" in name:
            repo, config = name.rsplit("/", 1)
            candidates.append((repo, config))
    reasons = []
    for repo, config in candidates:
        try:
            dsd = datasets.load_dataset(repo, config)
        except Exception as err:  # noqa: BLE001 - offline, missing or malformed: all become one ValueError
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            label = repo if config is None else f"{repo}:{config}"
            reasons.append(f"{label}: {type(err).__name__}: {first}")
            continue
        available = list(dsd.keys())
        if split == "train":
            chosen = "train" if "train" in available else None
        else:
            chosen = next((s for s in ("validation", "test") if s in available), None)
        if chosen is not None:
            return _text_column(dsd[chosen], f"{name!r} split {chosen!r}")
        if "train" in available:
            return _hash_split(_text_column(dsd["train"], f"{name!r} split 'train'"), f"hub:{name}", split)
        raise ValueError(f"{name!r} has splits {available} but no 'train', 'validation' or 'test' split.")
    raise ValueError(_unknown_message(name, reasons))


def corpus_texts(name: str, split: str = "train") -> list[str]:
    """The documents of one split of a corpus, as non-empty plain-text strings.

    Parameters
    ----------
    name
        A prepared corpus (the embedded ``wiki``, ``news``, ``speeches``, ``code``), an existing local file or
        folder, or a Hugging Face hub id (``repo`` or ``repo:config``); see the module docstring.
    split
        ``"train"`` or ``"heldout"`` (aliases ``"validation"``, ``"valid"``, ``"test"``).

    Returns
    -------
    list of str
        The documents, in corpus order (a fresh list on every call).

    Raises
    ------
    ValueError
        For ``"random"`` (which has no text), an unknown split, or a name that is neither embedded, local,
        nor loadable from the hub (the message lists the embedded names and how to pass the others).
    """
    name = _check_name(name)
    split = _normalise_split(split)
    if name == "random":
        raise ValueError("'random' has no text: its token ids are drawn on the fly by load_batches('random', ...).")
    folder = _prepared_folder(name)
    if folder is not None:
        return _read_prepared(folder, split)
    path = Path(name).expanduser()
    if path.exists():
        return _local_texts(path, split)
    if path.suffix.lower() in _LOCAL_BUILDERS or name.startswith((".", "~", os.sep)):
        raise ValueError(
            f"No such file or folder: {name!r}. Pass an existing local file or folder, a prepared corpus "
            f"({', '.join(prepared_corpora()) or 'none prepared'}), or a hub id such as 'wikitext:wikitext-2-raw-v1'."
        )
    return _hub_texts(name, split)


# ----------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------


def _positive_int(value: Any, what: str, minimum: int, hint: str) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}. {hint}") from None
    if number < minimum:
        raise ValueError(f"{what} must be at least {minimum}, got {number}. {hint}")
    return number


def _context_length(tokenizer: Any) -> int | None:
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, (int, np.integer)) and not isinstance(limit, bool) and 0 < limit < 1_000_000:
        return int(limit)
    return None


def _vocab_size(tokenizer: Any) -> int:
    if isinstance(tokenizer, (int, np.integer)) and not isinstance(tokenizer, bool):
        size = int(tokenizer)
    else:
        size = getattr(tokenizer, "vocab_size", None)
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise ValueError(
            f"Cannot tell the vocabulary size of {type(tokenizer).__name__}: pass a tokenizer with a positive "
            "integer `vocab_size` (or, for 'random', the vocabulary size itself)."
        )
    return int(size)


def _sample_chunks(
    texts: list[str], tokenizer: Any, seq_len: int, num_sequences: int, seed: int, label: str, split: str
) -> torch.Tensor:
    rng = np.random.default_rng(_derive_seed(seed, label, split))
    order = rng.permutation(len(texts))
    eos = getattr(tokenizer, "eos_token_id", None)
    wanted = 2 * num_sequences * seq_len  # margin, so that the chunks picked are a random subset
    pieces: list[np.ndarray] = []
    total = 0
    position = 0
    bar = progress_bar(total=wanted, desc=f"tokenising {label}/{split}", unit="tok", leave=False,
                       disable=wanted < 2_000_000)
    try:
        while total < wanted and position < len(order):
            # Take documents worth about 4 characters per missing token, at least one.
            budget = 4 * (wanted - total)
            group = []
            while position < len(order) and (not group or budget > 0):
                text = texts[int(order[position])]
                group.append(text)
                budget -= len(text)
                position += 1
            encoded = tokenizer(group, add_special_tokens=False, verbose=False)["input_ids"]
            for ids in encoded:
                if eos is not None:
                    ids = [*ids, eos]
                pieces.append(np.asarray(ids, dtype=np.int64))
                total += len(ids)
            bar.update(min(total, wanted) - bar.n)
    finally:
        bar.close()
    n_chunks = total // seq_len
    if n_chunks < num_sequences:
        raise ValueError(
            f"Corpus {label!r} split {split!r} has {total:,} tokens with this tokenizer: enough for only "
            f"{n_chunks} sequences of {seq_len} tokens, but num_sequences={num_sequences}. Ask for at most "
            f"{n_chunks} sequences, use a shorter seq_len, the 'train' split or a larger corpus."
        )
    stream = np.concatenate(pieces)[: n_chunks * seq_len].reshape(n_chunks, seq_len)
    picked = rng.choice(n_chunks, size=num_sequences, replace=False)
    return torch.from_numpy(stream[picked].copy())


def load_batches(
    name: str,
    tokenizer: Any,
    seq_len: int,
    num_sequences: int,
    batch_size: int,
    split: str = "train",
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """Batches of ``num_sequences`` token sequences of exactly ``seq_len`` tokens from a corpus.

    Text corpora: the split's documents are shuffled with a generator seeded by ``seed`` (and the corpus and
    split), tokenised in that order without special tokens until twice the needed tokens are at hand (or the
    corpus ends), joined with the tokenizer's EOS token between documents (none if it has no EOS), and cut
    into contiguous chunks of ``seq_len`` tokens; ``num_sequences`` chunks are picked without replacement by
    the same generator. ``"random"``: token ids uniform in ``[0, tokenizer.vocab_size)`` from a seeded
    :class:`torch.Generator`. Nothing is padded, so there is no ``attention_mask``.

    Parameters
    ----------
    name
        ``"wiki"``, ``"news"``, ``"speeches"``, ``"code"``, ``"random"``, a local file or folder, or a hub id
        (see :func:`corpus_texts`).
    tokenizer
        A Hugging Face tokenizer (called as ``tokenizer(list_of_texts, add_special_tokens=False)``). For
        ``"random"`` only its ``vocab_size`` and ``model_max_length`` are used; an int vocabulary size is
        accepted too.
    seq_len
        Tokens per sequence, at least 2 and at most ``tokenizer.model_max_length`` when that is known
        (a number below one million).
    num_sequences
        Number of sequences, at least 1.
    batch_size
        Sequences per batch, at least 1; the last batch may be smaller.
    split
        ``"train"`` or ``"heldout"`` (aliases ``"validation"``, ``"valid"``, ``"test"``).
    seed
        Same seed, same batches; different seeds give different batches.

    Returns
    -------
    list of dict
        ``ceil(num_sequences / batch_size)`` dicts ``{"input_ids": LongTensor[b, seq_len]}`` on the CPU.

    Raises
    ------
    ValueError
        Unknown corpus or split, ``seq_len < 2`` or longer than the tokenizer's context, non-positive
        ``num_sequences`` or ``batch_size``, or a corpus too small for ``num_sequences`` chunks (the message
        says how many it can give).
    """
    name = _check_name(name)
    split = _normalise_split(split)
    seq_len = _positive_int(seq_len, "seq_len", 2, "A sequence needs at least 2 tokens (input and target).")
    context = _context_length(tokenizer)
    if context is not None and seq_len > context:
        raise ValueError(
            f"seq_len={seq_len} is longer than the tokenizer's context (model_max_length={context}): use "
            f"seq_len <= {context}."
        )
    num_sequences = _positive_int(num_sequences, "num_sequences", 1, "Ask for at least one sequence.")
    batch_size = _positive_int(batch_size, "batch_size", 1, "Use a batch size of at least 1.")
    seed = _positive_int(seed, "seed", -(2**62), "Use an integer seed.")

    if name == "random":
        vocab = _vocab_size(tokenizer)
        generator = torch.Generator().manual_seed(_derive_seed(seed, "random", split))
        ids = torch.randint(0, vocab, (num_sequences, seq_len), generator=generator, dtype=torch.long)
    else:
        if tokenizer is None or not callable(tokenizer):
            raise ValueError(f"Corpus {name!r} needs a callable Hugging Face tokenizer, got {tokenizer!r}.")
        texts = corpus_texts(name, split)
        if not texts:
            raise ValueError(f"Corpus {name!r} split {split!r} is empty: use another split or corpus.")
        ids = _sample_chunks(texts, tokenizer, seq_len, num_sequences, seed, name, split)
    return [{"input_ids": ids[i : i + batch_size].clone()} for i in range(0, num_sequences, batch_size)]

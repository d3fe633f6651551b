"""Tiny models of many transformer families, built from configs (no downloads), and a float64 oracle.

Every model has hidden size 8, one layer, two attention heads (one key/value head where the family has
grouped or multi-query attention) and a vocabulary of 24; features that change the function are switched
on where the family has them: Mistral/Starcoder2 sliding window 3 (shorter than the test sequences),
Gemma-2 attention and final-logit soft-capping at 2 and 3 (where ``tanh`` bends), Bloom ALiBi, partial
rotary embeddings (GPT-NeoX, Phi, StableLM, GPT-J, CodeGen, GLM), QK norms (OLMo-2, Qwen3, Cohere).

Mixture-of-experts families (:data:`MOE_FAMILIES`): 4 experts of intermediate size 8, top-2, built with
transformers' default experts kernel (``grouped_mm``, which has no float64 version: the package must choose);
Mixtral and PhiMoE with sliding window 3, Qwen2-MoE with a gated shared expert and unnormalised top-k weights,
Qwen3-MoE with QK norms, GPT-oss with two layers (sliding window 3, then full attention), attention sinks,
biased experts and YaRN, DeepSeek-V3 with multi-head latent attention (low-rank q and kv), one shared
expert and group-limited top-k (2 groups, 1 chosen), OLMoE, GraniteMoE.

:func:`dense_hessian` is the reference the package is tested against, so it shares none of the package's
code paths: its own loss (the definition of :mod:`hess_utils.loss`, written out), its own float64 mode and,
for MoE models, its own switch to the eager experts (it sets the experts' config itself).
"""

from __future__ import annotations

import contextlib

import torch
import transformers as tf

VOCAB = 24

_COMMON = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=1)
# Llama-style decoders: hidden 8, 2 query heads of size 4, 1 key/value head, MLP 16, 16 positions.
_DECODER = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=16, max_position_embeddings=16, **_COMMON)


def _gemma2(**extra):
    return tf.Gemma2Config(**{**_DECODER, "head_dim": 4, "query_pre_attn_scalar": 4, "sliding_window": 3,
                              "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0, **extra})


_CONFIGS = {
    "gpt2": lambda: tf.GPT2Config(n_positions=16, n_embd=8, n_layer=1, n_head=2, **_COMMON),
    "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=16, max_position_embeddings=16, rotary_pct=0.5,
                                         **_COMMON),
    "opt": lambda: tf.OPTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, ffn_dim=16,
                                max_position_embeddings=16, word_embed_proj_dim=8, **_COMMON),
    "llama": lambda: tf.LlamaConfig(**_DECODER),
    "qwen2": lambda: tf.Qwen2Config(**_DECODER),
    "mistral": lambda: tf.MistralConfig(**_DECODER, sliding_window=3),
    "qwen3": lambda: tf.Qwen3Config(**_DECODER, head_dim=4),
    "phi3": lambda: tf.Phi3Config(**_DECODER, original_max_position_embeddings=16),
    "gemma": lambda: tf.GemmaConfig(**_DECODER, head_dim=4),
    "gemma2": _gemma2,
    "cohere": lambda: tf.CohereConfig(**_DECODER, use_qk_norm=False, logit_scale=0.5),
    "olmo": lambda: tf.OlmoConfig(**_DECODER),
    "olmo2": lambda: tf.Olmo2Config(**_DECODER),
    "starcoder2": lambda: tf.Starcoder2Config(**_DECODER, sliding_window=3),
    "stablelm": lambda: tf.StableLmConfig(**_DECODER, partial_rotary_factor=0.5, qk_layernorm=False),
    "phi": lambda: tf.PhiConfig(**_DECODER),
    "granite": lambda: tf.GraniteConfig(**_DECODER, embedding_multiplier=2.0, logits_scaling=2.0,
                                        residual_multiplier=0.5, attention_multiplier=0.4),
    "glm": lambda: tf.GlmConfig(**_DECODER, head_dim=4),
    "falcon": lambda: tf.FalconConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                      max_position_embeddings=16, **_COMMON),
    "gpt_bigcode": lambda: tf.GPTBigCodeConfig(n_positions=16, n_embd=8, n_layer=1, n_head=2,
                                               multi_query=True, **_COMMON),
    "bloom": lambda: tf.BloomConfig(hidden_size=8, n_layer=1, n_head=2, **_COMMON),
    "gptj": lambda: tf.GPTJConfig(n_positions=16, n_embd=8, n_layer=1, n_head=2, rotary_dim=2, **_COMMON),
    "codegen": lambda: tf.CodeGenConfig(n_positions=16, n_ctx=16, n_embd=8, n_layer=1, n_head=2,
                                        rotary_dim=2, **_COMMON),
}
_MOE = dict(num_experts_per_tok=2)
_MOE_DECODER = {**_DECODER, "intermediate_size": 8}
_MOE_CONFIGS = {
    "mixtral": lambda: tf.MixtralConfig(**_MOE_DECODER, num_local_experts=4, sliding_window=3, **_MOE),
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(**_DECODER, num_experts=4, moe_intermediate_size=8,
                                           shared_expert_intermediate_size=8, norm_topk_prob=False, **_MOE),
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(**_DECODER, head_dim=4, num_experts=4, moe_intermediate_size=8,
                                           norm_topk_prob=True, **_MOE),
    "gpt_oss": lambda: tf.GptOssConfig(
        **{**_MOE_DECODER, "num_hidden_layers": 2}, head_dim=4, num_local_experts=4, sliding_window=3,
        rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=4.0, beta_fast=32.0, beta_slow=1.0,
                             truncate=False, original_max_position_embeddings=4), **_MOE),
    "deepseek_v3": lambda: tf.DeepseekV3Config(
        **{**_DECODER, "num_key_value_heads": 2}, moe_intermediate_size=8, first_k_dense_replace=0,
        n_routed_experts=4, n_shared_experts=1, n_group=2, topk_group=1, kv_lora_rank=4, q_lora_rank=4,
        qk_rope_head_dim=2, qk_nope_head_dim=2, v_head_dim=4, routed_scaling_factor=2.5, norm_topk_prob=True,
        **_MOE),
    "olmoe": lambda: tf.OlmoeConfig(**_MOE_DECODER, num_experts=4, **_MOE),
    "granitemoe": lambda: tf.GraniteMoeConfig(**_MOE_DECODER, num_local_experts=4, **_MOE),
}
_CONFIGS.update(_MOE_CONFIGS)
MOE_FAMILIES = tuple(_MOE_CONFIGS)
FAMILIES = tuple(_CONFIGS)


def tiny_config(family: str, attn: str = "eager"):
    if family not in _CONFIGS:
        raise ValueError(family)
    cfg = _CONFIGS[family]()
    cfg._attn_implementation = attn
    return cfg


def tiny_model(family: str, dtype=torch.float64, seed: int = 0, attn: str = "eager") -> torch.nn.Module:
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(family, attn), attn_implementation=attn)
    # Larger than default init so second derivatives are not dominated by one term.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    if family == "opt":
        model.model.decoder.embed_tokens.padding_idx = None
    return model.to(dtype).eval()


def tiny_batches(num_batches: int = 2, batch_size: int = 2, seq_len: int = 6, seed: int = 0, pad: bool = False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_batches):
        ids = torch.randint(2, VOCAB, (batch_size, seq_len), generator=g)
        batch = {"input_ids": ids}
        if pad:
            mask = torch.ones_like(ids)
            mask[0, -2:] = 0  # right padding on the first row
            ids[0, -2:] = 1
            batch["attention_mask"] = mask
        out.append(batch)
    return out


# --------------------------------------------------------------------------------------------- oracle
_LOW = (torch.float32, torch.float16, torch.bfloat16)
_T = torch.Tensor


class _NoDownCast(torch.overrides.TorchFunctionMode):
    """Test-local float64 mode, written apart from the package's: every low float dtype asked for is float64.

    The same rule as :mod:`hess_utils.operators.precision`, implemented the short way: any float32, float16
    or bfloat16 ``torch.dtype`` among a call's arguments (except ``view``'s bit reinterpretation) becomes
    float64, ``t.to(other)`` takes ``other``'s device only, ``.float()``/``.half()``/``.bfloat16()`` are
    float64 copies. Factories without a dtype are float64 because :func:`_float64_everywhere` sets the default
    dtype (which also makes ``int_tensor * 0.5`` float64, where the package's mode leaves it float32 and its
    checker reports it: no tiny family has such an operation).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (_T.float, _T.half, _T.bfloat16):
            return args[0].to(torch.float64, copy=True)
        if func is _T.view:
            return func(*args, **kwargs)
        if func is _T.to and len(args) > 1 and isinstance(args[1], torch.Tensor) and args[1].dtype in _LOW:
            args = (args[0], args[1].device, torch.float64, *args[2:])  # t.to(other) is t.to(device, dtype)
        low = [i for i, a in enumerate(args) if isinstance(a, torch.dtype) and a in _LOW]
        args = [torch.float64 if i in low else a for i, a in enumerate(args)]
        changed = bool(low) or kwargs.get("dtype") in _LOW
        if kwargs.get("dtype") in _LOW:
            kwargs["dtype"] = torch.float64
        if func is _T.to and changed:
            kwargs["copy"] = True  # the original would have made a new tensor
        return func(*args, **kwargs)


@contextlib.contextmanager
def _float64_everywhere(model):
    """The test-local float64 mode and a float64 default dtype, for a model whose weights are all float64."""
    if not all(p.dtype == torch.float64 for p in model.parameters() if p.is_floating_point()):
        yield  # a float32 model is differentiated as it is (its upcasts are deliberate)
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with _NoDownCast():
            yield
    finally:
        torch.set_default_dtype(previous)


@contextlib.contextmanager
def _eager_experts(model):
    """Every experts module that reads ``config._experts_implementation`` runs its eager loop in this block.

    Written apart from the package's kernel choice: the attribute is set on each such module's config (found
    by the attribute itself) and put back afterwards.
    """
    configs = {}
    for m in model.modules():
        experts = getattr(m, "down_proj", None)  # experts keep their weights as one 3-D parameter per projection
        config = getattr(m, "config", None)
        if isinstance(experts, torch.nn.Parameter) and experts.ndim == 3 and hasattr(config, "_experts_implementation"):
            configs[id(config)] = config
    saved = {k: c._experts_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._experts_implementation = "eager"
        yield
    finally:
        for k, c in configs.items():
            c._experts_implementation = saved[k]


def _predicted(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets ``y[b, t] = labels[b, t+1]`` (``labels`` defaults to ``input_ids``) and the 0/1 mask of the
    positions predicted: target not ``-100`` and not padding (``attention_mask[b, t+1] = 1``)."""
    targets = batch.get("labels", batch["input_ids"])[:, 1:]
    keep = targets != -100
    if batch.get("attention_mask") is not None:
        keep = keep & (batch["attention_mask"][:, 1:] == 1)
    return targets.clamp_min(0), keep


def _summed_nll(logits: torch.Tensor, batch) -> torch.Tensor:
    """``sum_{(b, t) predicted} -log softmax(logits[b, t])[y[b, t]]`` for logits ``(B, s, V)``."""
    targets, keep = _predicted(batch)
    logp = torch.log_softmax(logits[:, :-1, :], dim=-1)
    picked = logp.gather(-1, targets[..., None]).squeeze(-1)
    return -(picked * keep.to(picked.dtype)).sum()


def _num_predicted(batches) -> int:
    return int(sum(_predicted(b)[1].sum() for b in batches))


def dense_hessian(model, batches, names=None, reduction="mean") -> torch.Tensor:
    """Float64 oracle ``H = d^2 L / dw^2`` on the flat selected parameters, checked symmetric to 1e-10.

    ``L`` is the token-weighted cross-entropy of :mod:`hess_utils.loss` (the mean over all predicted tokens of
    all batches, or their sum), written out here; the forward runs under a test-local float64 mode
    (:class:`_NoDownCast` and a float64 default dtype), SDPA under its MATH backend. The Hessian is
    ``jacrev(grad(L))``; for a model holding an ``autograd.Function`` that ``torch.func`` refuses (no
    ``setup_context``: Bloom's ``GeLUFunction``) the gradient is built by ``torch.autograd.grad`` with
    ``create_graph=True`` and its rows are the double backward of the basis vectors, vectorised.
    """
    from torch.func import functional_call, grad, jacrev
    from torch.nn.attention import SDPBackend, sdpa_kernel

    named = dict(model.named_parameters())
    names = list(named) if names is None else list(names)
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]
    flat0 = torch.cat([named[n].detach().reshape(-1) for n in names])
    n_tok = _num_predicted(batches)

    def f(flat):
        parts = torch.split(flat, sizes)
        weights = {n: p.reshape(s) for n, p, s in zip(names, parts, shapes)}
        total = 0
        for b in batches:
            kwargs = {k: b[k].to(flat.device) for k in ("input_ids", "attention_mask") if b.get(k) is not None}
            out = functional_call(model, weights, args=(), kwargs={**kwargs, "use_cache": False})
            total = total + _summed_nll(out.logits, b)
        return total / n_tok if reduction == "mean" else total

    with sdpa_kernel(SDPBackend.MATH), _float64_everywhere(model), _eager_experts(model):
        try:
            H = jacrev(grad(f))(flat0)
        except RuntimeError as err:
            if "setup_context" not in str(err):
                raise
            x = flat0.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(f(x), x, create_graph=True)
            # torch.func.vmap over the second backward (the graph was built outside it, so the Function is not
            # re-run): 15 times faster than is_grads_batched, whose legacy vmap loops over 10 of these ops.
            rows = torch.func.vmap(lambda e: torch.autograd.grad(g, x, grad_outputs=e, retain_graph=True)[0])
            H = rows(torch.eye(x.numel(), dtype=x.dtype))
    asym = (H - H.T).abs().max() / H.abs().max()
    assert asym < 1e-10, f"oracle Hessian not symmetric: {asym:.2e}"
    return (H + H.T) / 2

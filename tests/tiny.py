"""Tiny models of several transformer families, built from configs (no downloads), for float64 oracles."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 24


def tiny_config(family: str, attn: str = "eager"):
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if family == "gpt2":
        cfg = tf.GPT2Config(n_positions=16, n_embd=8, n_layer=1, n_head=2, **common)
    elif family == "gpt_neox":
        cfg = tf.GPTNeoXConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                               max_position_embeddings=16, rotary_pct=0.5, **common)
    elif family == "opt":
        cfg = tf.OPTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, ffn_dim=16,
                           max_position_embeddings=16, word_embed_proj_dim=8, **common)
    elif family == "llama":
        cfg = tf.LlamaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                             intermediate_size=16, max_position_embeddings=16, **common)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                             intermediate_size=16, max_position_embeddings=16, **common)
    else:
        raise ValueError(family)
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


def dense_hessian(model, batches, names=None, reduction="mean") -> torch.Tensor:
    """Float64 oracle: ``jacrev(grad(L))`` on the flat selected parameters (checked symmetric)."""
    from torch.func import functional_call, grad, jacrev

    from hess_utils import loss as L

    named = dict(model.named_parameters())
    names = list(named) if names is None else list(names)
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]
    flat0 = torch.cat([named[n].detach().reshape(-1) for n in names])
    n_tok = L.total_tokens(batches)

    def f(flat):
        parts = torch.split(flat, sizes)
        weights = {n: p.reshape(s) for n, p, s in zip(names, parts, shapes)}
        total = 0
        for b in batches:
            kwargs = {**L.model_inputs(b, flat.device), "use_cache": False}
            out = functional_call(model, weights, args=(), kwargs=kwargs)
            total = total + L.summed_cross_entropy(out.logits, b)
        return total / n_tok if reduction == "mean" else total

    from hess_utils.operators.kernels import hessian_context

    with hessian_context(model):
        H = jacrev(grad(f))(flat0)
    asym = (H - H.T).abs().max() / H.abs().max()
    assert asym < 1e-10, f"oracle Hessian not symmetric: {asym:.2e}"
    return (H + H.T) / 2

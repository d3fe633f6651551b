"""The benchmark workloads: the same model, batch and loss for every system.

``gpt2-5m``: GPT-2 shape, vocab 8192, 4 layers, width 256, 4 heads, 128 positions (5.3 M parameters).
``pythia-70m``: the GPTNeoX config of EleutherAI/pythia-70m written out here (no hub), random init.
Both: eager attention, float32, one batch of 4 x 128 random tokens (seed 0), mean next-token
cross-entropy over the 4 x 127 predicted tokens.
"""

from __future__ import annotations

import torch

WORKLOADS = ("gpt2-5m", "pythia-70m")
BATCH_SIZE, SEQ_LEN = 4, 128


def config(name: str):
    import transformers as tf

    if name == "gpt2-5m":
        cfg = tf.GPT2Config(vocab_size=8192, n_positions=SEQ_LEN, n_embd=256, n_layer=4, n_head=4,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    elif name == "pythia-70m":
        # EleutherAI/pythia-70m config.json, copied field by field.
        cfg = tf.GPTNeoXConfig(vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                               intermediate_size=2048, hidden_act="gelu", rotary_pct=0.25, rotary_emb_base=10000,
                               max_position_embeddings=2048, initializer_range=0.02, layer_norm_eps=1e-5,
                               use_parallel_residual=True, tie_word_embeddings=False, bos_token_id=0,
                               eos_token_id=0, attention_dropout=0.0, hidden_dropout=0.0)
    else:
        raise ValueError(f"unknown workload {name!r}; choose one of {WORKLOADS}")
    cfg._attn_implementation = "eager"
    return cfg


def build_model(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0):
    """The workload's model, random init from ``seed``, eval mode, eager attention."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config(name), attn_implementation="eager")
    return model.to(device=device, dtype=dtype).eval()


def build_batch(name: str, device: str = "cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    vocab = config(name).vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (BATCH_SIZE, SEQ_LEN), generator=g)
    return {"input_ids": ids.to(device)}


def probe_vector(params, seed: int = 1) -> list[torch.Tensor]:
    """A Rademacher vector shaped like ``params`` (same for all systems)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 2, p.shape, generator=g) * 2 - 1).to(device=p.device, dtype=p.dtype) for p in params]

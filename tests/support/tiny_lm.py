"""Tiny random-weight GPT-2 / Llama / Gemma2 language models with an in-memory tokenizer.

Everything is built from configs (2 layers, hidden 64) and an in-memory byte-level vocabulary, so the fast tier
needs no files and no network (ENVIRONMENT.md, "Tiny random models of the real architectures").
"""

from __future__ import annotations

import torch

ARCHS = ("gpt2", "llama", "gemma2")
EOS = "<|endoftext|>"
VOCAB_SIZE = 257  # 256 byte symbols + <|endoftext|>
HIDDEN = 64


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode character table (the byte-level BPE alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def make_tokenizer(padding_side: str = "left"):
    """A byte-level GPT-2 tokenizer built in memory: one token per byte (ids 0-255 in byte order) + EOS (256)."""
    from transformers import GPT2TokenizerFast

    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    vocab[EOS] = 256
    tok = GPT2TokenizerFast(
        vocab=vocab, merges=[], unk_token=EOS, bos_token=EOS, eos_token=EOS, pad_token=EOS
    )
    tok.padding_side = padding_side
    if len(tok) != VOCAB_SIZE:
        raise RuntimeError(f"In-memory tokenizer has {len(tok)} tokens, expected {VOCAB_SIZE}")
    return tok


def _config(arch: str):
    import transformers

    common = dict(vocab_size=VOCAB_SIZE, bos_token_id=256, eos_token_id=256, pad_token_id=256)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=128, **common)
    elif arch == "llama":
        cfg = transformers.LlamaConfig(
            hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, **common,
        )
    elif arch == "gemma2":
        cfg = transformers.Gemma2Config(
            hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=64, **common,
        )
    else:
        raise ValueError(f"Unknown tiny architecture {arch!r}; choose one of: {', '.join(ARCHS)}")
    cfg._attn_implementation = "eager"  # deterministic on CPU, and what Gemma2 recommends
    return cfg


def make_tiny_lm(arch: str, dtype: torch.dtype = torch.float32, padding_side: str = "left", *, seed: int = 0):
    """``(model, tokenizer)``: a tiny random ``arch`` causal LM in eval mode, weights seeded by ``seed``."""
    import transformers

    cls = {
        "gpt2": transformers.GPT2LMHeadModel,
        "llama": transformers.LlamaForCausalLM,
        "gemma2": transformers.Gemma2ForCausalLM,
    }
    cfg = _config(arch)
    torch.manual_seed(seed)
    model = cls[arch](cfg).to(dtype).eval()
    model.generation_config.pad_token_id = 256
    return model, make_tokenizer(padding_side)

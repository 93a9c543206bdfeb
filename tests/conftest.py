"""Shared fixtures: tiny AR parents of each family, small real tokenizers, the real SmolLM2 GGUF."""

import os

import pytest
import torch

# The Triton kernels' tests run under Triton's interpreter where there is no GPU. torch._dynamo imports triton as
# soon as transformers is imported, so the switch must be set before that import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_VOCAB = 128
WORDS = [f"w{i}" for i in range(TINY_VOCAB)]


def randomize_(model: torch.nn.Module, std: float = 0.08, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (biases and norm weights too) random values, so that a dropped or misnamed tensor shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator) * std
            parameter.copy_(1.0 + noise if name.endswith("norm.weight") else noise)
    return model


def tiny_ar_model(family: str, *, tie: bool = False, rope_parameters: dict | None = None, seed: int = 0,
                  max_positions: int = 512, vocab_size: int = TINY_VOCAB):
    """A random AR parent of `family` with sizes small enough for a CPU test (GQA 4:2, head_dim 16)."""
    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_positions, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, rope_parameters=rope_parameters,
    )
    if family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=16, attention_bias=True, **common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(head_dim=16, attention_bias=True, mlp_bias=True, **common))
    else:
        raise ValueError(family)
    return randomize_(model, seed=seed).eval()


def tiny_tokenizer(extra_special: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A real fast tokenizer (whitespace word level) over `TINY_VOCAB` ids: ids 0-2 are pad/bos/eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", *extra_special]
    vocab = {token: i for i, token in enumerate(specials + WORDS[: TINY_VOCAB - len(specials)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=list(extra_special),
    )
    return tokenizer


def left_padded_batch(lengths: list[int], vocab: int = TINY_VOCAB, seed: int = 0):
    """Random token rows of the given lengths, left-padded with id 0."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, width - length:] = torch.randint(3, vocab, (length,), generator=generator)
        attention_mask[row, width - length:] = 1
    return input_ids, attention_mask


@pytest.fixture(scope="session")
def smollm2_gguf_path():
    from efficient_dlm.conversion import embedded_gguf_path

    return embedded_gguf_path()


@pytest.fixture(scope="session")
def smollm2_parent(smollm2_gguf_path):
    """The real SmolLM2-135M-Instruct (dequantised from the Q4_1 GGUF, fp32) and its tokenizer, loaded as conversion
    loads it (the tokenizer's EOS and pad aligned with the model config on every transformers version)."""
    from efficient_dlm.conversion import load_ar_model, resolve_base

    return load_ar_model(resolve_base(smollm2_gguf_path), torch.float32)

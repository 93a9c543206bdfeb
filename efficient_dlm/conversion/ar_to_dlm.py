"""AR checkpoint -> Efficient-DLM checkpoint.

The decoder weights keep their names, so conversion is a config mapping, a mask-token choice and `load_state_dict`.
What makes it a diffusion model is the training that follows (`efficient_dlm.training`).
"""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .. import __version__
from ..configuration_efficient_dlm import EfficientDlmConfig
from ..generation_efficient_dlm import EfficientDlmGenerationConfig
from ..modeling_efficient_dlm import SUPPORTED_ROPE_TYPES, EfficientDlmForMaskedDiffusion
from .sources import BaseSource, check_base_model_type, gguf_model_type, resolve_base

# Unused special tokens that can serve as the mask token, in order of preference. `<|fim_pad|>` is the one the
# official Efficient-DLM checkpoints use (id 151662 in Qwen2.5/Qwen3); `<empty_output>` is a SmolLM2 special token
# that a chat never produces.
MASK_TOKEN_CANDIDATES = ("<|mask|>", "<|fim_pad|>", "<empty_output>")
NEW_MASK_TOKEN = "<|mask|>"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Files of the package that every checkpoint folder carries, so `trust_remote_code` needs nothing installed.
SHIPPED_CODE_FILES = ("configuration_efficient_dlm.py", "modeling_efficient_dlm.py", "generation_efficient_dlm.py",
                      "kernels_efficient_dlm.py")
CONVERSION_RECORD = "conversion.json"


@dataclass
class ConversionResult:
    model: EfficientDlmForMaskedDiffusion
    tokenizer: object
    base: BaseSource
    mask_token: str
    output_dir: Path | None = None


def dlm_config_from_ar(ar_config, *, block_size: int, shift_logits: bool, mask_token_id: int) -> EfficientDlmConfig:
    """Map a Qwen3/Qwen2/Llama config onto `EfficientDlmConfig` (the decoder stays identical)."""
    model_type = ar_config.model_type
    check_base_model_type(model_type, "config.model_type")
    if getattr(ar_config, "use_sliding_window", False):
        raise ValueError("base models with sliding-window attention (use_sliding_window=True) are not supported")
    if getattr(ar_config, "pretraining_tp", 1) not in (None, 1):
        raise ValueError(f"base config pretraining_tp must be 1, got {ar_config.pretraining_tp}")
    rope_parameters = dict(ar_config.rope_parameters or {})
    if rope_parameters.get("rope_type", "default") not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"base rope_type {rope_parameters.get('rope_type')!r} is not supported: use one of {SUPPORTED_ROPE_TYPES}"
        )
    if model_type == "qwen2":  # Qwen2 always has q/k/v bias and never an o bias
        attention_bias, attention_output_bias = True, False
    else:  # Llama and Qwen3: one flag for all four projections
        attention_bias = attention_output_bias = bool(getattr(ar_config, "attention_bias", False))
    head_dim = getattr(ar_config, "head_dim", None) or ar_config.hidden_size // ar_config.num_attention_heads
    return EfficientDlmConfig(
        vocab_size=ar_config.vocab_size,
        hidden_size=ar_config.hidden_size,
        intermediate_size=ar_config.intermediate_size,
        num_hidden_layers=ar_config.num_hidden_layers,
        num_attention_heads=ar_config.num_attention_heads,
        num_key_value_heads=ar_config.num_key_value_heads or ar_config.num_attention_heads,
        head_dim=head_dim,
        hidden_act=ar_config.hidden_act,
        max_position_embeddings=ar_config.max_position_embeddings,
        initializer_range=getattr(ar_config, "initializer_range", 0.02),
        rms_norm_eps=ar_config.rms_norm_eps,
        tie_word_embeddings=bool(ar_config.tie_word_embeddings),
        rope_parameters=rope_parameters,
        attention_bias=attention_bias,
        attention_output_bias=attention_output_bias,
        mlp_bias=bool(getattr(ar_config, "mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        attention_dropout=float(getattr(ar_config, "attention_dropout", 0.0) or 0.0),
        pad_token_id=ar_config.pad_token_id,
        bos_token_id=ar_config.bos_token_id,
        eos_token_id=ar_config.eos_token_id,
        mask_token_id=mask_token_id,
        block_size=block_size,
        shift_logits=shift_logits,
        base_model_type=model_type,
    )


def dlm_from_ar_model(ar_model, *, block_size: int, shift_logits: bool, mask_token_id: int):
    """Build the converted model from an in-memory AR `*ForCausalLM` (same weights, same dtype)."""
    config = dlm_config_from_ar(
        ar_model.config, block_size=block_size, shift_logits=shift_logits, mask_token_id=mask_token_id
    )
    weight = ar_model.get_input_embeddings().weight
    model = EfficientDlmForMaskedDiffusion(config).to(device=weight.device, dtype=weight.dtype)
    state = {k: v for k, v in ar_model.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"base weights do not match the converted decoder: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def _vocabulary(tokenizer) -> dict:
    return tokenizer.get_vocab()


def resolve_mask_token(tokenizer, requested: str | int | None, *, eos_token_id, pad_token_id) -> tuple[str, int, bool]:
    """Pick the mask token: (string, id, whether it must be added to the vocabulary).

    `requested` may be a token string or id and must already be in the vocabulary. Without one, the tokenizer's own
    mask token, else an unused special token from `MASK_TOKEN_CANDIDATES`, else a new `<|mask|>`.
    """
    vocab = _vocabulary(tokenizer)
    eos_ids = set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]) - {None}
    if requested is not None:
        if isinstance(requested, int) or (isinstance(requested, str) and requested.isdigit()):
            token_id = int(requested)
            token = tokenizer.convert_ids_to_tokens(token_id) if 0 <= token_id < len(tokenizer) else None
            if token is None:
                raise ValueError(f"mask token id {token_id} is not in the vocabulary (size {len(tokenizer)})")
        else:
            if requested not in vocab:
                raise ValueError(f"mask token {requested!r} is not in the vocabulary")
            token, token_id = requested, vocab[requested]
        if token_id in eos_ids:
            raise ValueError(f"mask token {token!r} (id {token_id}) collides with the EOS token")
        if pad_token_id is not None and token_id == pad_token_id:
            raise ValueError(f"mask token {token!r} (id {token_id}) collides with the PAD token")
        return token, token_id, False
    own = getattr(tokenizer, "mask_token", None)
    for token in ([own] if own else []) + list(MASK_TOKEN_CANDIDATES):
        token_id = vocab.get(token)
        if token_id is not None and token_id not in eos_ids and token_id != pad_token_id:
            return token, token_id, False
    return NEW_MASK_TOKEN, len(tokenizer), True


def _add_mask_token(model, tokenizer) -> int:
    """Add `<|mask|>` to the tokenizer and give it a row initialised at the mean embedding."""
    tokenizer.add_special_tokens({"mask_token": NEW_MASK_TOKEN})
    token_id = tokenizer.convert_tokens_to_ids(NEW_MASK_TOKEN)
    embeddings = model.get_input_embeddings().weight
    old_rows = embeddings.shape[0]
    if token_id >= old_rows:
        model.resize_token_embeddings(token_id + 1, mean_resizing=False)
    with torch.no_grad():
        for matrix in {id(m): m for m in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}.values():
            matrix[token_id] = matrix[: min(old_rows, token_id)].float().mean(0).to(matrix.dtype)
    return token_id


def pad_with_eos_if_unset(tokenizer) -> None:
    """Batched prompts are left-padded; a tokenizer without a pad token (SmolLM2's GGUF under transformers 5.17)
    pads with EOS, as the same GGUF does under newer transformers."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token


def load_ar_model(source: BaseSource, dtype: torch.dtype):
    """Load the AR parent and its tokenizer from a resolved source."""
    if source.kind == "gguf":
        gguf_model_type(source.location)  # refuse unknown architectures before dequantising anything
        folder, name = os.path.split(source.location)
        tokenizer = AutoTokenizer.from_pretrained(folder or ".", gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder or ".", gguf_file=name, dtype=dtype)
        eos_id = model.config.eos_token_id
        if isinstance(eos_id, int) and tokenizer.eos_token_id != eos_id:
            # transformers 5.17 reads SmolLM2's GGUF tokenizer with <|im_start|> as its EOS; the GGUF metadata,
            # which the model config carries, says <|im_end|> (newer transformers agree). The model config wins.
            tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    else:
        config = AutoConfig.from_pretrained(source.location)
        check_base_model_type(config.model_type, f"{source.description}")
        tokenizer = AutoTokenizer.from_pretrained(source.location)
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype)
    pad_with_eos_if_unset(tokenizer)
    return model.eval(), tokenizer


def convert(
    base: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    *,
    block_size: int = 32,
    shift_logits: bool = False,
    mask_token: str | int | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    ar_model=None,
    tokenizer=None,
) -> ConversionResult:
    """Convert an AR checkpoint into an Efficient-DLM model and, with `output_dir`, write a complete checkpoint.

    Args:
        base: a transformers folder, a Hub id, a `.gguf` file, or None for the embedded SmolLM2-135M-Instruct.
        output_dir: where to write safetensors weights, config (with `auto_map`), the model code, the tokenizer
            with its mask token, `generation_config.json` and `conversion.json`.
        block_size: the attention block (>= 1). Block 1 with `shift_logits=True` reproduces the AR parent exactly.
        shift_logits: False = Efficient-DLM in-place prediction; True = Fast-dLLM v2 token shift.
        mask_token: token string or id already in the vocabulary; None picks one (see `resolve_mask_token`).
        dtype: "float32", "bfloat16" or "float16".
        ar_model, tokenizer: an already loaded AR parent (skips loading `base`, which then only labels the result).
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if output_dir is not None:
        output_dir = Path(output_dir)
        if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
            raise FileExistsError(f"output folder {output_dir} exists and is not empty (pass overwrite=True)")
    if ar_model is None:
        source = resolve_base(base)
        ar_model, tokenizer = load_ar_model(source, DTYPES[dtype])
    else:
        if tokenizer is None:
            raise ValueError("pass the tokenizer together with ar_model")
        source = BaseSource("folder", str(base or getattr(ar_model, "name_or_path", "") or "in-memory model"))
        ar_model = ar_model.to(DTYPES[dtype])
    check_base_model_type(ar_model.config.model_type, "config.model_type")

    pad_with_eos_if_unset(tokenizer)
    eos_id = ar_model.config.eos_token_id if ar_model.config.eos_token_id is not None else tokenizer.eos_token_id
    pad_id = ar_model.config.pad_token_id if ar_model.config.pad_token_id is not None else tokenizer.pad_token_id
    token, token_id, is_new = resolve_mask_token(tokenizer, mask_token, eos_token_id=eos_id, pad_token_id=pad_id)
    if is_new:
        token_id = _add_mask_token(ar_model, tokenizer)
    else:
        tokenizer.mask_token = token
    model = dlm_from_ar_model(ar_model, block_size=block_size, shift_logits=shift_logits, mask_token_id=token_id)
    model.config.eos_token_id, model.config.pad_token_id = eos_id, pad_id
    # Decoding defaults of the released Efficient-DLM checkpoints: the training block and threshold 0.9.
    model.generation_config = EfficientDlmGenerationConfig(
        bos_token_id=model.config.bos_token_id, eos_token_id=eos_id, pad_token_id=pad_id, block_size=block_size,
        threshold=0.9,
    )
    result = ConversionResult(model=model, tokenizer=tokenizer, base=source, mask_token=token)
    if output_dir is not None:
        save_checkpoint(result, output_dir, overwrite=overwrite)
    return result


def conversion_record(model, mask_token: str, base_location: str, base_kind: str) -> dict:
    """What `conversion.json` says of a converted model: where it came from and how it was converted."""
    config = model.config
    return {
        "efficient_dlm_version": __version__,
        "base": base_location,
        "base_kind": base_kind,
        "base_model_type": config.base_model_type,
        "block_size": config.block_size,
        "shift_logits": config.shift_logits,
        "mask_token": mask_token,
        "mask_token_id": config.mask_token_id,
        "dtype": str(model.dtype).replace("torch.", ""),
    }


def save_checkpoint(result: ConversionResult, output_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output folder {output_dir} exists and is not empty (pass overwrite=True)")
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    result.model.save_pretrained(output_dir)  # safetensors + config with auto_map + the code files
    result.tokenizer.save_pretrained(output_dir)
    package_dir = Path(__file__).resolve().parent.parent
    for name in SHIPPED_CODE_FILES:  # save_pretrained copies them too; make the folder complete regardless
        if not (output_dir / name).exists():
            shutil.copyfile(package_dir / name, output_dir / name)
    record = conversion_record(result.model, result.mask_token, result.base.location, result.base.kind)
    (output_dir / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    result.output_dir = output_dir
    return output_dir

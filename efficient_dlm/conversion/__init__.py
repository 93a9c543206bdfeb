"""Conversion of AR checkpoints (transformers folder, Hub id, GGUF) into Efficient-DLM checkpoints."""

from .ar_to_dlm import (
    CONVERSION_RECORD,
    MASK_TOKEN_CANDIDATES,
    SHIPPED_CODE_FILES,
    ConversionResult,
    conversion_record,
    convert,
    dlm_config_from_ar,
    dlm_from_ar_model,
    load_ar_model,
    resolve_mask_token,
    save_checkpoint,
)
from .sources import BaseSource, embedded_gguf_path, resolve_base

__all__ = [
    "CONVERSION_RECORD",
    "MASK_TOKEN_CANDIDATES",
    "SHIPPED_CODE_FILES",
    "BaseSource",
    "ConversionResult",
    "conversion_record",
    "convert",
    "dlm_config_from_ar",
    "dlm_from_ar_model",
    "embedded_gguf_path",
    "load_ar_model",
    "resolve_base",
    "resolve_mask_token",
    "save_checkpoint",
]

"""Efficient-DLM: turn pretrained autoregressive decoders into fast block-diffusion language models."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_efficient_dlm import EfficientDlmConfig
from .generation_efficient_dlm import DiffusionGenerateOutput, DiffusionGenerationMixin, EfficientDlmGenerationConfig
from .modeling_efficient_dlm import AttentionPattern, EfficientDlmForMaskedDiffusion, EfficientDlmModel

__version__ = "0.1.0"

# In-process registration: with the package imported, the Auto classes resolve our model without trust_remote_code.
AutoConfig.register(EfficientDlmConfig.model_type, EfficientDlmConfig, exist_ok=True)
AutoModel.register(EfficientDlmConfig, EfficientDlmForMaskedDiffusion, exist_ok=True)
AutoModelForCausalLM.register(EfficientDlmConfig, EfficientDlmForMaskedDiffusion, exist_ok=True)


def __getattr__(name):
    # Conversion pulls in tokenizers and gguf; import it only when asked for.
    if name in ("convert", "ConversionResult"):
        from . import conversion

        return getattr(conversion, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AttentionPattern",
    "DiffusionGenerateOutput",
    "DiffusionGenerationMixin",
    "EfficientDlmConfig",
    "EfficientDlmForMaskedDiffusion",
    "EfficientDlmGenerationConfig",
    "EfficientDlmModel",
    "convert",
]

"""Configuration of the Efficient-DLM block-diffusion model family.

This file ships inside every checkpoint folder (remote code): it imports only transformers and the stdlib.

One config covers the decoders that Efficient-DLM converts — Qwen3 (q/k RMSNorm), Qwen2/2.5 (bias on q/k/v) and
the Llama family (SmolLM2 included) — plus the diffusion fields that say how the model is trained and decoded.
"""

from transformers.configuration_utils import PreTrainedConfig

# Decoder families whose `*ForCausalLM` weights load into `EfficientDlmForMaskedDiffusion` unchanged.
SUPPORTED_BASE_MODEL_TYPES = ("qwen3", "qwen2", "llama")

# Where `trust_remote_code` finds the classes in a checkpoint folder (the shipped files sit flat at its root).
AUTO_MAP = {
    "AutoConfig": "configuration_efficient_dlm.EfficientDlmConfig",
    "AutoModel": "modeling_efficient_dlm.EfficientDlmForMaskedDiffusion",
    "AutoModelForCausalLM": "modeling_efficient_dlm.EfficientDlmForMaskedDiffusion",
}


class EfficientDlmConfig(PreTrainedConfig):
    r"""
    Configuration for [`EfficientDlmModel`] and [`EfficientDlmForMaskedDiffusion`].

    Decoder fields carry the meaning they have in `Qwen3Config`, `Qwen2Config` and `LlamaConfig`. The bias of the
    attention projections is split in two because the families disagree: Qwen2 puts a bias on q/k/v but not on o,
    Llama's `attention_bias` covers all four.

    Diffusion fields:
        mask_token_id (`int`): id of the token that marks a position still to be denoised. Chosen at conversion
            (an unused special token of the tokenizer where there is one); always read from here, never a literal.
        block_size (`int`, defaults to 32): the block of the attention pattern. Tokens attend bidirectionally inside
            a block and causally across blocks; a model converted with `block_size=1` is exactly causal.
        shift_logits (`bool`, defaults to `False`): `False` is Efficient-DLM's in-place prediction (position i
            predicts token i); `True` is Fast-dLLM v2's token shift (position i-1 predicts token i), which is also
            what an untouched AR parent does.
        base_model_type (`str`): the `model_type` of the AR checkpoint this model was converted from.
    """

    model_type = "efficient_dlm"
    keys_to_ignore_at_inference = ["past_key_values"]
    default_theta = 1_000_000.0

    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 40960
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_output_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    attention_dropout: float = 0.0
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    mask_token_id: int | None = None
    block_size: int = 32
    shift_logits: bool = False
    base_model_type: str | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)
        if getattr(self, "auto_map", None) is None:
            self.auto_map = dict(AUTO_MAP)
        self._check_diffusion_fields()

    def _check_diffusion_fields(self):
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {self.block_size!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})"
            )
        if self.mask_token_id is not None:
            if not 0 <= self.mask_token_id < self.vocab_size:
                raise ValueError(
                    f"mask_token_id must be a token id in [0, vocab_size={self.vocab_size}), got {self.mask_token_id}"
                )
            eos_ids = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
            if self.mask_token_id in eos_ids:
                raise ValueError(f"mask_token_id ({self.mask_token_id}) must differ from eos_token_id {eos_ids}")
            if self.mask_token_id == self.pad_token_id:
                raise ValueError(f"mask_token_id ({self.mask_token_id}) must differ from pad_token_id")


EfficientDlmConfig.register_for_auto_class()

__all__ = ["AUTO_MAP", "EfficientDlmConfig", "SUPPORTED_BASE_MODEL_TYPES"]

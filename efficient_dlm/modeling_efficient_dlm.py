"""Efficient-DLM: a block-diffusion language model converted from a pretrained AR decoder.

This file ships inside every checkpoint folder (remote code): it imports only torch, transformers, the stdlib and
its sibling files by relative import.

The decoder is the Qwen3 / Qwen2 / Llama decoder with the same tensor names, so an AR checkpoint of those families
loads into it with `load_state_dict`. What differs is who may attend to whom. The caller names an
`AttentionPattern`; the model renders it for the backend in use (a boolean mask for SDPA and eager, a `BlockMask` for
flex_attention). The forward is pure: it never noises and never samples.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import PreTrainedModel

from .configuration_efficient_dlm import EfficientDlmConfig
from .generation_efficient_dlm import DiffusionGenerationMixin

# RoPE variants whose frequencies do not depend on the sequence length. The families we convert use "default"
# (all of them), "llama3" (Llama 3.1+), "yarn" (Qwen2.5/Qwen3 long context) and "linear".
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


# ----------------------------------------------------------------------------------------------------------------------
# Attention patterns: defined once, rendered for every backend
# ----------------------------------------------------------------------------------------------------------------------

ATTENTION_PATTERN_KINDS = ("block_causal", "bd3", "bidirectional", "noisy_context")


@dataclass(frozen=True)
class AttentionPattern:
    """Who may attend to whom, in terms of each token's block and whether it is noisy.

    - `block_causal(b)`: a clean sequence; q sees k iff block(q) >= block(k). With b=1 this is the causal mask.
    - `bd3(b)`: training over `[x_t ; x_0]` (length 2L, both halves at positions 0..L-1). A noisy token sees the
      noisy tokens of its own block and the clean tokens of strictly earlier blocks; clean tokens are block-causal
      among themselves and never see noisy ones.
    - `bidirectional`: every real token sees every real token (the Dream-style ablation).
    - `noisy_context(b)`: block-causal over x_t alone (the paper's ablation without a clean copy).

    Blocks are counted on logical positions (padding excluded), so a left-padded row has the blocks it would have
    alone. Padding keys are never visible, whatever the pattern.
    """

    kind: str = "block_causal"
    block_size: int = 1

    def __post_init__(self):
        if self.kind not in ATTENTION_PATTERN_KINDS:
            raise ValueError(f"attention_pattern kind must be one of {ATTENTION_PATTERN_KINDS}, got {self.kind!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {self.block_size!r}")

    @classmethod
    def block_causal(cls, block_size: int) -> "AttentionPattern":
        return cls("block_causal", block_size)

    @classmethod
    def bd3(cls, block_size: int) -> "AttentionPattern":
        return cls("bd3", block_size)

    @classmethod
    def bidirectional(cls) -> "AttentionPattern":
        return cls("bidirectional", 1)

    @classmethod
    def noisy_context(cls, block_size: int) -> "AttentionPattern":
        return cls("noisy_context", block_size)

    @property
    def doubles_sequence(self) -> bool:
        """True when the input is `[x_t ; x_0]` and only the first half's logits are wanted."""
        return self.kind == "bd3"

    def allows(self, q_block, q_noisy, k_block, k_noisy):
        """The pattern's one definition. Elementwise on broadcastable tensors, so the same code builds the dense
        SDPA mask and serves as flex_attention's `mask_mod`."""
        if self.kind == "bidirectional":
            return k_block == k_block  # all true, in the inputs' shape
        if self.kind in ("block_causal", "noisy_context"):
            return k_block <= q_block
        # bd3
        noisy_to_own_block = q_noisy & k_noisy & (k_block == q_block)
        noisy_to_earlier_clean = q_noisy & ~k_noisy & (k_block < q_block)
        clean_to_clean = ~q_noisy & ~k_noisy & (k_block <= q_block)
        return noisy_to_own_block | noisy_to_earlier_clean | clean_to_clean


class TokenLayout(NamedTuple):
    """Per-token attributes an `AttentionPattern` reads. Each field is `[batch, tokens]`."""

    block_ids: torch.Tensor  # long: block index of the token's logical position
    noisy: torch.Tensor  # bool: token belongs to x_t (only `bd3` has noisy tokens)
    real: torch.Tensor  # bool: not padding


def dense_attention_mask(pattern: AttentionPattern, queries: TokenLayout, keys: TokenLayout) -> torch.Tensor:
    """The pattern as a boolean `[batch, 1, q_len, kv_len]` mask (True = may attend), for SDPA and eager."""
    allowed = pattern.allows(
        queries.block_ids[:, :, None], queries.noisy[:, :, None], keys.block_ids[:, None, :], keys.noisy[:, None, :]
    )
    allowed = allowed & keys.real[:, None, :]
    # A padding query may have no visible key at all; softmax over nothing is NaN, which would then leak into
    # gradients. Its output is never read, so let it see everything.
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return allowed[:, None]


def flex_block_mask(pattern: AttentionPattern, queries: TokenLayout, keys: TokenLayout):
    """The pattern as a flex_attention `BlockMask` (no dense mask is materialised)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = pattern.allows(
            queries.block_ids[b, q_idx], queries.noisy[b, q_idx], keys.block_ids[b, kv_idx], keys.noisy[b, kv_idx]
        )
        return allowed & keys.real[b, kv_idx]

    batch, q_len = queries.block_ids.shape
    kv_len = keys.block_ids.shape[1]
    return create_block_mask(mask_mod, batch, None, q_len, kv_len, device=queries.block_ids.device)


# ----------------------------------------------------------------------------------------------------------------------
# Attention backends
# ----------------------------------------------------------------------------------------------------------------------


def sdpa_attention(query, key, value, mask, scaling, dropout):
    # query [B, H, Q, D]; key/value [B, H_kv, K, D]; mask bool [B, 1, Q, K]
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )


def eager_attention(query, key, value, mask, scaling, dropout):
    """The reference: every step written out, in the inputs' dtype."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return torch.matmul(probs, value)


_compiled_flex_attention = None


def flex_attention(query, key, value, block_mask, scaling, dropout):
    if dropout > 0:
        raise ValueError("attention_dropout > 0 is not supported with attn_implementation='flex_attention'")
    global _compiled_flex_attention
    from torch.nn.attention.flex_attention import flex_attention as _flex

    if query.device.type == "cuda":
        # flex_attention is only fast (and memory-lean) when compiled; eager flex materialises the scores.
        if _compiled_flex_attention is None:
            _compiled_flex_attention = torch.compile(_flex, dynamic=False)
        fn = _compiled_flex_attention
    else:
        fn = _flex
    return fn(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])


ATTENTION_BACKENDS = {"sdpa": sdpa_attention, "eager": eager_attention, "flex_attention": flex_attention}


# ----------------------------------------------------------------------------------------------------------------------
# Decoder
# ----------------------------------------------------------------------------------------------------------------------


class EfficientDlmRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class EfficientDlmRotaryEmbedding(nn.Module):
    # Attribute names follow transformers' rotary modules, so `PreTrainedModel._init_weights` recomputes the buffers.
    def __init__(self, config: EfficientDlmConfig):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_parameters['rope_type'] must be one of {SUPPORTED_ROPE_TYPES}, got {self.rope_type!r}"
            )
        init_fn = self.compute_default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config, **kwargs):
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    def forward(self, x, position_ids):
        # position_ids [B, N] -> cos, sin [B, N, head_dim]
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    # q/k [B, H, N, D]; cos/sin [B, N, D]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class EfficientDlmMLP(nn.Module):
    def __init__(self, config: EfficientDlmConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class EfficientDlmAttention(nn.Module):
    def __init__(self, config: EfficientDlmConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(
            self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_output_bias
        )
        if config.qk_norm:  # Qwen3: RMSNorm over each head's query and key
            self.q_norm = EfficientDlmRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = EfficientDlmRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None):
        batch, seq_len, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch, seq_len, self.num_heads, self.head_dim)
        key = self.k_proj(hidden_states).view(batch, seq_len, self.num_kv_heads, self.head_dim)
        value = self.v_proj(hidden_states).view(batch, seq_len, self.num_kv_heads, self.head_dim)
        if self.config.qk_norm:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # [B, H, N, D]
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)

        backend = ATTENTION_BACKENDS[self.config._attn_implementation or "sdpa"]
        if getattr(past_key_values, "is_layer_view", False):
            # generate()'s static decoder hands each layer a view of its own cache slots, which writes the K/V and
            # attends (maybe through a Triton kernel). It never reads layer_idx: one compiled layer then serves every
            # layer, where an int attribute read inside torch.compile would specialise (recompile) per layer.
            attn_output = past_key_values.attend(query, key, value, attention_mask, self.scaling, backend)
        else:
            if past_key_values is not None:
                key, value = past_key_values.update(key, value, self.layer_idx)
            dropout = self.config.attention_dropout if self.training else 0.0
            attn_output = backend(query, key, value, attention_mask, self.scaling, dropout)
        attn_output = attn_output.transpose(1, 2).reshape(batch, seq_len, -1)
        return self.o_proj(attn_output)


class EfficientDlmDecoderLayer(nn.Module):
    def __init__(self, config: EfficientDlmConfig, layer_idx: int):
        super().__init__()
        self.self_attn = EfficientDlmAttention(config, layer_idx)
        self.mlp = EfficientDlmMLP(config)
        self.input_layernorm = EfficientDlmRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = EfficientDlmRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None):
        residual = hidden_states
        hidden_states = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, past_key_values
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class EfficientDlmPreTrainedModel(PreTrainedModel):
    config_class = EfficientDlmConfig
    config: EfficientDlmConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["EfficientDlmDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_flash_attn = False
    _supports_attention_backend = False

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # transformers guesses this from the module source (it looks for its AttentionInterface). Our attention reads
        # `config._attn_implementation` on every call (ATTENTION_BACKENDS), so `set_attn_implementation` works.
        return True


class EfficientDlmModel(EfficientDlmPreTrainedModel):
    def __init__(self, config: EfficientDlmConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            [EfficientDlmDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = EfficientDlmRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = EfficientDlmRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_pattern: AttentionPattern | None = None,
        block_offset: torch.Tensor | int = 0,
        token_layouts: tuple[TokenLayout, TokenLayout] | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        pattern = attention_pattern if attention_pattern is not None else AttentionPattern.block_causal(
            self.config.block_size
        )
        if not isinstance(pattern, AttentionPattern):
            raise ValueError(
                f"attention_pattern must be an AttentionPattern (e.g. AttentionPattern.bd3(32)), got {type(pattern)}"
            )
        use_cache = use_cache if use_cache is not None else False
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)

        if token_layouts is None:
            queries, keys, position_ids = self._token_layouts(
                inputs_embeds, attention_mask, position_ids, past_key_values, pattern, block_offset
            )
        else:
            # A caller that owns a static cache (generate's CUDA-graph path) knows every slot's layout already;
            # deriving it from a mask would need shapes that change from block to block.
            if position_ids is None:
                raise ValueError("token_layouts needs position_ids")
            queries, keys = token_layouts
        # Built once per forward, shared by every layer. A static decoding step whose attention runs the block kernel
        # needs no mask at all (the cache says which slots are visible).
        run_layer = getattr(past_key_values, "run_layer", None)
        if run_layer is not None and not past_key_values.needs_mask:
            mask = None
        elif self.config._attn_implementation == "flex_attention":
            mask = flex_block_mask(pattern, queries, keys)
        else:
            mask = dense_attention_mask(pattern, queries, keys)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for index, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training:
                hidden_states = self._gradient_checkpointing_func(
                    layer.__call__, hidden_states, position_embeddings, mask, past_key_values
                )
            elif run_layer is not None:  # generate()'s static cache: per-layer views, maybe a compiled layer
                hidden_states = run_layer(layer, index, hidden_states, position_embeddings, mask)
            else:
                hidden_states = layer(hidden_states, position_embeddings, mask, past_key_values)
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)

    def _token_layouts(self, inputs_embeds, attention_mask, position_ids, past_key_values, pattern, block_offset=0):
        """Logical positions, blocks and noisy flags of the queries and of all keys (cached + current)."""
        batch, seq_len = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if pattern.doubles_sequence:
            if past_len:
                raise ValueError("attention_pattern 'bd3' is a training layout and takes no past_key_values")
            if seq_len % 2:
                raise ValueError(f"attention_pattern 'bd3' needs input [x_t ; x_0] of even length, got {seq_len}")
            half = seq_len // 2
            if attention_mask is not None and tuple(attention_mask.shape) == (batch, half):
                attention_mask = attention_mask.repeat(1, 2)  # one padding mask for both halves
            expected = [(batch, seq_len), (batch, half)]
        else:
            expected = [(batch, past_len + seq_len)] + ([(batch, seq_len)] if past_len == 0 else [])
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_len + seq_len, dtype=torch.bool, device=device)
        elif attention_mask.dim() != 2 or tuple(attention_mask.shape) not in expected:
            raise ValueError(
                f"attention_mask must be a 2D padding mask of shape {' or '.join(map(str, expected))} "
                f"(batch, past + current tokens), got {tuple(attention_mask.shape)}"
            )
        real = attention_mask.to(device=device, dtype=torch.bool)

        if pattern.doubles_sequence:
            # Both halves carry positions 0..L-1 of the same sequence.
            half_real = real[:, :half]
            half_positions = (half_real.long().cumsum(-1) - 1).clamp(min=0)
            key_positions = half_positions.repeat(1, 2)
            noisy = torch.zeros(batch, seq_len, dtype=torch.bool, device=device)
            noisy[:, :half] = True
        else:
            key_positions = (real.long().cumsum(-1) - 1).clamp(min=0)
            noisy = torch.zeros(batch, past_len + seq_len, dtype=torch.bool, device=device)
        positions_given = position_ids is not None
        if not positions_given:
            position_ids = key_positions[:, past_len:]
        else:
            if position_ids.shape[-1] != seq_len:
                raise ValueError(f"position_ids must have {seq_len} positions per row, got {tuple(position_ids.shape)}")
            position_ids = position_ids.to(device).expand(batch, seq_len)
            key_positions = torch.cat([key_positions[:, :past_len], position_ids], dim=1)

        # Derived logical positions never exceed physical indices, so only a long physical sequence (or positions
        # the caller chose) needs the exact check: a host sync, which the decoding loop avoids.
        beyond = positions_given or past_len + seq_len > self.config.max_position_embeddings
        max_position = int(position_ids.max()) if beyond and position_ids.numel() else 0
        if max_position >= self.config.max_position_embeddings:
            raise ValueError(
                f"sequence needs position {max_position}, beyond the model's max_position_embeddings "
                f"({self.config.max_position_embeddings})"
            )
        if isinstance(block_offset, torch.Tensor):
            block_offset = block_offset.to(device).view(-1, 1)
        key_blocks = (key_positions + block_offset) // pattern.block_size
        keys = TokenLayout(key_blocks, noisy, real)
        queries = TokenLayout(key_blocks[:, past_len:], noisy[:, past_len:], real[:, past_len:])
        return queries, keys, position_ids


class EfficientDlmForMaskedDiffusion(EfficientDlmPreTrainedModel, DiffusionGenerationMixin):
    """The decoder with its LM head. Position i's logits predict token i in place (`config.shift_logits=False`) or
    token i+1 (`shift_logits=True`); either way the forward itself is the same. `generate()` decodes block-wise
    (see `DiffusionGenerationMixin`)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: EfficientDlmConfig):
        super().__init__(config)
        self.model = EfficientDlmModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_pattern: AttentionPattern | None = None,
        block_offset: torch.Tensor | int = 0,
        token_layouts: tuple[TokenLayout, TokenLayout] | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        attention_pattern (`AttentionPattern`, *optional*):
            Who attends to whom. Defaults to `AttentionPattern.block_causal(config.block_size)`. With `bd3` the input
            is `[x_t ; x_0]` and logits are returned for the noisy half only.
        block_offset (`torch.LongTensor` of shape `(batch,)` or `int`, defaults to 0):
            Moves block boundaries: the token at logical position p is in block `(p + block_offset) // block_size`.
            `generate()` uses it so that each row's prompt ends exactly on a block boundary.
        token_layouts (`(TokenLayout, TokenLayout)`, *optional*):
            The queries' and all keys' layouts, given directly instead of derived from `attention_mask` (with
            `position_ids`); used with a static cache whose `update` returns every slot.
        labels (`torch.LongTensor`, *optional*):
            Targets aligned with the returned logits (-100 = ignored). With `config.shift_logits` the logit at i is
            scored against label i+1, as in a causal LM; otherwise against label i.
        logits_to_keep (`int` or `torch.Tensor`):
            Keep only the last `logits_to_keep` positions' logits (0 = all), or the positions a 1D tensor lists.
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            attention_pattern=attention_pattern,
            block_offset=block_offset,
            token_layouts=token_layouts,
            use_cache=use_cache,
        )
        hidden_states = outputs.last_hidden_state
        if attention_pattern is not None and attention_pattern.doubles_sequence:
            hidden_states = hidden_states[:, : hidden_states.shape[1] // 2]
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = None
        if labels is not None:
            if labels.shape != logits.shape[:2]:
                raise ValueError(f"labels must have shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
            scored_logits, targets = (logits[:, :-1], labels[:, 1:]) if self.config.shift_logits else (logits, labels)
            loss = F.cross_entropy(
                scored_logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values)


EfficientDlmForMaskedDiffusion.register_for_auto_class("AutoModel")

__all__ = [
    "AttentionPattern",
    "EfficientDlmForMaskedDiffusion",
    "EfficientDlmModel",
    "EfficientDlmPreTrainedModel",
    "TokenLayout",
    "dense_attention_mask",
    "flex_block_mask",
]

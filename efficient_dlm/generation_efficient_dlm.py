"""Block-wise confidence-threshold decoding (Fast-dLLM style) over an exact block KV cache.

This file ships inside every checkpoint folder (remote code): it imports only torch, transformers, the stdlib and its
sibling kernels_efficient_dlm.py (whose triton import is optional).

Per request: the prompt and then, block after block, `block_size` positions that start as the mask token. Each
denoising step is one forward of the current block against the cache; every still-masked position whose confidence
passes the threshold is committed, and always the most confident one. A finished block is never recomputed: its
K/V are written into the cache by the *next* forward, which carries it as a clean prefix in front of the next masked
block (one forward = commit of block k + first denoising step of block k+1). The block-causal pattern makes this
exact: the clean block attends only to the cache and itself, the masked block to everything before it and itself.
Hence the number of forwards (NFE) is exactly the number of denoising steps, and the prompt prefill is the first
step of the first block.
"""

import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.generation import GenerationConfig, GenerationMixin
from transformers.generation.stopping_criteria import StoppingCriteriaList
from transformers.utils import ModelOutput

from .kernels_efficient_dlm import cached_block_attention, confidence_argmax, triton_usable


# ----------------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------------

DIFFUSION_DEFAULTS = {
    "block_size": None,  # None: the model config's block_size
    "threshold": 0.9,
    "factor": None,
    "steps": None,
    "sub_block_size": None,
    "output_history": False,
    "compile": False,
    "kernels": "auto",
}

# Triton kernels the static decoding step can use (kernels_efficient_dlm.py); each beat its torch counterpart inside a
# CUDA graph on an H100 (benchmarks/results/kernels_bench_h100.json): the fused confidence/argmax over the vocabulary
# and the block attention over the cache (no dense mask).
KERNEL_NAMES = ("confidence_argmax", "block_attention")


class EfficientDlmGenerationConfig(GenerationConfig):
    """`GenerationConfig` with the block-diffusion decoding fields.

    Args:
        block_size (`int`, *optional*): positions decoded together; defaults to the model's `config.block_size`.
        threshold (`float`, defaults to 0.9): commit every masked position whose confidence is >= threshold
            (0 < threshold <= 1), and always the most confident one. 1.0 commits one token per step.
        factor (`float`, *optional*): Fast-dLLM's factor rule instead of the threshold: with the masked confidences
            sorted c_1 >= c_2 >= ..., commit the n most confident where (n + 1)(1 - c_n) <= factor (at least one).
        steps (`int`, *optional*): commit exactly this many tokens per step (the most confident), whatever their
            confidence; fixes the tokens per forward, e.g. for benchmarks.
        sub_block_size (`int`, *optional*): decode each block in sub-blocks left to right (must divide block_size).
        output_history (`bool`, defaults to False): with `return_dict_in_generate`, keep the completion after every
            denoising step (undecoded positions hold the mask token).
        compile (`bool`, defaults to False): with the static path, run each decoder layer of the two repeating step
            shapes through `torch.compile` (inside the CUDA graph on CUDA). One compiled layer serves every layer;
            compiled code and captured graphs are kept for later calls with the same shapes.
        kernels (`str` or list, defaults to "auto"): Triton kernels for the static path's steps: "auto" (all of
            `KERNEL_NAMES` where CUDA and triton are available, else the torch code with one log line), "none", or
            names among `KERNEL_NAMES` ("confidence_argmax", "block_attention"; also a comma-separated string).
    """

    def __init__(self, **kwargs):
        for name, default in DIFFUSION_DEFAULTS.items():
            setattr(self, name, kwargs.pop(name, default))
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, model_config):
        # Generation parameters do not belong in the model config (transformers v5); the model's own defaults
        # (block size, EOS, PAD) are read at generate() time instead.
        raise NotImplementedError("EfficientDlmGenerationConfig is not built from a model config")


def resolve_generation_config(model, generation_config, overrides: dict) -> EfficientDlmGenerationConfig:
    """Merge, in increasing priority: the model's defaults, its `generation_config`, the one passed to generate()
    (a plain `GenerationConfig` works: unknown fields such as `threshold` are read as overrides) and keyword
    arguments. Then validate."""
    merged = {}
    for source in (model.generation_config, generation_config):
        if source is not None:
            merged.update({k: v for k, v in source.to_dict().items() if v is not None and not k.startswith("_")})
    merged.update(overrides)
    merged.pop("transformers_version", None)
    config = EfficientDlmGenerationConfig(**merged)
    model_config = model.config
    if config.block_size is None:
        config.block_size = model_config.block_size
    if config.eos_token_id is None:
        config.eos_token_id = model_config.eos_token_id
    if config.pad_token_id is None:
        config.pad_token_id = model_config.pad_token_id
    if config.max_new_tokens is None:
        config.max_new_tokens = config.block_size if config.max_length is None else None
    validate_generation_config(config)
    return config


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_generation_config(config: EfficientDlmGenerationConfig) -> None:
    if not _is_int(config.block_size) or config.block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {config.block_size!r}")
    if config.sub_block_size is not None:
        if not _is_int(config.sub_block_size) or config.sub_block_size < 1:
            raise ValueError(f"sub_block_size must be an integer >= 1, got {config.sub_block_size!r}")
        if config.block_size % config.sub_block_size:
            raise ValueError(
                f"sub_block_size ({config.sub_block_size}) must divide block_size ({config.block_size})"
            )
    if not isinstance(config.threshold, (int, float)) or not 0 < config.threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {config.threshold!r}")
    if config.factor is not None and (not isinstance(config.factor, (int, float)) or config.factor <= 0):
        raise ValueError(f"factor must be a number > 0, got {config.factor!r}")
    if config.steps is not None and (not _is_int(config.steps) or config.steps < 1):
        raise ValueError(f"steps (tokens committed per step) must be an integer >= 1, got {config.steps!r}")
    if config.max_new_tokens is not None and (not _is_int(config.max_new_tokens) or config.max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {config.max_new_tokens!r}")
    if config.do_sample:
        if config.temperature is not None and config.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {config.temperature!r}")
        if config.top_k is not None and (not _is_int(config.top_k) or config.top_k < 0):
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {config.top_k!r}")
        if config.top_p is not None and not 0 < config.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {config.top_p!r}")
    if not isinstance(config.compile, bool):
        raise ValueError(f"compile must be True or False, got {config.compile!r}")
    requested_kernels(config.kernels)  # raises on a bad value
    if config.num_return_sequences not in (None, 1) or config.num_beams not in (None, 1):
        raise ValueError("num_return_sequences and num_beams must be 1: beam search does not apply to diffusion")


def requested_kernels(value) -> frozenset:
    """The kernel names a `kernels` setting asks for ("auto" and "all": every one; "none": none)."""
    if value is None or value in ("auto", "all"):
        return frozenset(KERNEL_NAMES)
    if value in ("none", False):
        return frozenset()
    names = [n.strip() for n in value.split(",") if n.strip()] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple, set, frozenset)) or any(n not in KERNEL_NAMES for n in names):
        raise ValueError(f"kernels must be 'auto', 'none', 'all' or names among {KERNEL_NAMES}, got {value!r}")
    return frozenset(names)


# ----------------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class DiffusionGenerateOutput(ModelOutput):
    """Output of `generate(..., return_dict_in_generate=True)`.

    sequences: prompt + completion `[batch, prompt_len + new]`, padded with `pad_token_id` after EOS.
    nfe: model forward passes (each one a denoising step; the prompt prefill is the first step).
    tokens_per_forward: generated tokens (up to and including EOS) per denoising step of their row, summed over
        rows; a step counts for a row while the row has masked positions, so batching does not change it.
    history: with `output_history`, the completion `[batch, max_new_tokens]` after each step (mask token = undecoded).
    decode_path: how the repeating steps ran, e.g. "dynamic", "uncached", "static", "static+graphs+compile+kernels(
        block_attention,confidence_argmax)" (kernels as actually used, after any fallback).
    """

    sequences: torch.LongTensor = None
    nfe: int = None
    tokens_per_forward: float = None
    history: tuple | None = None
    decode_path: str | None = None


# ----------------------------------------------------------------------------------------------------------------------
# The block KV cache
# ----------------------------------------------------------------------------------------------------------------------


class BlockKVCache:
    """A preallocated KV cache of finished blocks: keys/values `[layers, batch, kv_heads, capacity, head_dim]`.

    Left padding keeps every row on the same physical layout, so one `length` serves the batch; which slots are
    padding is the attention mask's business. `update()` writes the current tokens' K/V right after `length` and
    returns the filled view, without advancing: a denoising step thus attends to the cache plus its own block and
    leaves the cache as it was. `advance(n)` keeps the first n of those tokens — the finished block.
    """

    def __init__(self, num_layers, batch, num_kv_heads, capacity, head_dim, dtype, device):
        shape = (num_layers, batch, num_kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def update(self, key, value, layer_idx):
        end = self.length + key.shape[2]
        if end > self.capacity:
            raise ValueError(f"BlockKVCache capacity {self.capacity} exceeded (needs {end})")
        self.keys[layer_idx, :, :, self.length:end] = key
        self.values[layer_idx, :, :, self.length:end] = value
        return self.keys[layer_idx, :, :, :end], self.values[layer_idx, :, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (finished rows stop costing compute)."""
        self.keys = self.keys[:, rows]
        self.values = self.values[:, rows]


# ----------------------------------------------------------------------------------------------------------------------
# Proposal and commit rules (pure functions on tensors; tested on crafted logits)
# ----------------------------------------------------------------------------------------------------------------------


def propose_tokens(logits, *, do_sample=False, temperature=None, top_k=None, top_p=None, generator=None):
    """A token and its confidence per position. Greedy: argmax and its softmax probability. Sampling: a draw from
    the temperature/top-k/top-p distribution and that distribution's probability of the drawn token."""
    logits = logits.float()
    greedy = not do_sample or temperature == 0
    if not greedy:
        if temperature is not None and temperature != 1.0:
            logits = logits / temperature
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None and top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    if greedy:
        # The argmax of the logits, not of the probabilities: rounding in the softmax could tie distinct logits. The
        # fused kernel (kernels_efficient_dlm.confidence_argmax) makes the same choice, lowest index on ties.
        tokens = logits.argmax(-1)
        confidence = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    else:
        flat = probs.reshape(-1, probs.shape[-1])
        tokens = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
        confidence = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, confidence


def select_commits(confidence, eligible, *, threshold=0.9, factor=None, steps=None):
    """Which positions to commit this step, per row (`confidence`, `eligible`: `[batch, positions]`).

    Only eligible (still masked, in the active sub-block) positions are candidates; a row with any candidate always
    commits its most confident one. Rule: `steps` (exactly that many, the most confident) if given, else `factor`
    ((n+1)(1-c_n) <= factor over the sorted confidences), else `threshold` (every c >= threshold).
    """
    candidates = torch.where(eligible, confidence, torch.full_like(confidence, -1.0))
    sorted_conf, order = torch.sort(candidates, dim=-1, descending=True)
    rank = torch.arange(1, confidence.shape[-1] + 1, device=confidence.device)
    if steps is not None:
        take_sorted = rank <= steps
    elif factor is not None:
        # Thresholds 1 - f/(n+1) rise with n while sorted confidences fall, so the passing n form a prefix.
        take_sorted = (rank + 1) * (1 - sorted_conf) <= factor
    else:
        take_sorted = sorted_conf >= threshold
    take_sorted = (take_sorted | (rank == 1)).expand_as(sorted_conf)  # with the forced top-1
    commit = torch.zeros_like(eligible).scatter(-1, order, take_sorted)
    return commit & eligible


def active_sub_block(masked, sub_block_size):
    """Positions of each row's leftmost sub-block that still has a mask (all positions when sub-blocks are off)."""
    if sub_block_size is None:
        return torch.ones_like(masked)
    positions = masked.shape[-1]
    sub_block = torch.arange(positions, device=masked.device) // sub_block_size
    first_masked = torch.where(masked, sub_block, torch.full_like(sub_block, positions)).min(-1, keepdim=True).values
    return sub_block == first_masked


# ----------------------------------------------------------------------------------------------------------------------
# The mixin
# ----------------------------------------------------------------------------------------------------------------------


class DiffusionGenerationMixin(GenerationMixin):
    """`generate()` for block-diffusion models: a drop-in for the AR one (same inputs, same output shape)."""

    generation_config_class = EfficientDlmGenerationConfig

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.LongTensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor=None,
        stopping_criteria: StoppingCriteriaList | None = None,
        streamer=None,
        **kwargs,
    ):
        r"""Decode block by block with confidence-threshold parallel decoding.

        Args:
            inputs / input_ids (`torch.LongTensor` `[batch, prompt_len]`): left-padded prompts.
            attention_mask (`torch.LongTensor`, *optional*): 1 for prompt tokens, 0 for left padding.
            generation_config: an `EfficientDlmGenerationConfig` or a plain `GenerationConfig`.
            stopping_criteria: transformers `StoppingCriteria`, checked after every committed block.
            streamer: receives the prompt, then each committed block's tokens (`put`), then `end()`; batch size 1.
            tokenizer: needed for `stop_strings`.
            use_cache (`bool`, defaults to True): False recomputes the whole prefix every step (the reference).
            cache_implementation (`str`, *optional*): "static" = fixed shapes, finished rows stay in the batch, and
                on CUDA with greedy decoding each step is a replayed CUDA graph (the default on CUDA); "dynamic" =
                the eager block cache that evicts finished rows (the default on CPU). The static path keeps its
                buffers and graphs per model for the next call with the same shapes (`clear_static_decoding_state()`
                frees them).
            kwargs: any `EfficientDlmGenerationConfig` field (`max_new_tokens`, `threshold`, `block_size`, ...).

        Returns:
            `torch.LongTensor` of prompt + completion, or a `DiffusionGenerateOutput` with
            `return_dict_in_generate=True`.
        """
        input_ids = kwargs.pop("input_ids", None) if inputs is None else inputs
        attention_mask = kwargs.pop("attention_mask", None)
        tokenizer = kwargs.pop("tokenizer", None)
        use_cache = kwargs.pop("use_cache", True)
        generator = kwargs.pop("generator", None)
        if logits_processor:
            raise ValueError("logits_processor is not supported by diffusion decoding; use temperature/top_k/top_p")
        known = set(EfficientDlmGenerationConfig().to_dict()) | set(DIFFUSION_DEFAULTS)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"generate() got unknown arguments {unknown}")
        config = resolve_generation_config(self, generation_config, kwargs)
        mask_token_id = getattr(self.config, "mask_token_id", None)
        if mask_token_id is None:
            raise ValueError("the model config has no mask_token_id: it is not a converted diffusion model")
        input_ids, attention_mask = self._check_prompt(input_ids, attention_mask)
        prompt_lengths = attention_mask.sum(-1)
        max_new_tokens = config.max_new_tokens
        if max_new_tokens is None:  # only max_length was given
            max_new_tokens = config.max_length - input_ids.shape[1]
            if max_new_tokens < 1:
                raise ValueError(f"max_length ({config.max_length}) leaves no room after the prompt")
        longest = int(prompt_lengths.max()) + max_new_tokens
        if longest > self.config.max_position_embeddings:
            raise ValueError(
                f"prompt + max_new_tokens needs {longest} positions, beyond the model's max_position_embeddings "
                f"({self.config.max_position_embeddings})"
            )
        if streamer is not None and input_ids.shape[0] != 1:
            raise ValueError("streamer supports batch size 1 only")
        eos_ids = config.eos_token_id
        eos_ids = torch.tensor(
            [] if eos_ids is None else eos_ids if isinstance(eos_ids, list) else [eos_ids], dtype=torch.long,
            device=input_ids.device,
        )
        pad_id = config.pad_token_id if config.pad_token_id is not None else (eos_ids[0].item() if len(eos_ids) else 0)
        stop_strings = config.stop_strings
        if stop_strings is not None:
            if tokenizer is None:
                raise ValueError("stop_strings needs the tokenizer: generate(..., tokenizer=tokenizer)")
            stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)

        # On CUDA the fixed-shape path is the default: eager Python costs ~30 ms a step there, whatever the model.
        static = config.cache_implementation == "static" or (
            config.cache_implementation is None and use_cache and input_ids.device.type == "cuda"
        )
        if config.cache_implementation == "static" and not use_cache:
            raise ValueError("cache_implementation='static' needs use_cache=True")
        if config.cache_implementation not in (None, "static", "dynamic"):
            raise ValueError(
                f"cache_implementation must be 'static', 'dynamic' or None, got {config.cache_implementation!r}"
            )
        if config.compile and not static:
            raise ValueError("compile=True needs the static decoding path: cache_implementation='static' (the default "
                             "on CUDA) and use_cache=True")
        if static:
            # CUDA graphs replay fixed kernels: greedy decoding only (sampling draws would be frozen into the graph).
            use_graphs = input_ids.device.type == "cuda" and not (config.do_sample and config.temperature != 0)
            decoder = _StaticBlockDecoder(self, config, input_ids, attention_mask, eos_ids, pad_id, mask_token_id,
                                          max_new_tokens, generator, use_graphs)
        else:
            decoder = _BlockDecoder(self, config, input_ids, attention_mask, eos_ids, pad_id, mask_token_id,
                                    max_new_tokens, use_cache, generator)
        if streamer is not None:
            streamer.put(input_ids[:, attention_mask[0].argmax():].cpu())
        completion, nfe, history = decoder.run(
            stopping_criteria=stopping_criteria, stop_strings=stop_strings, tokenizer=tokenizer, streamer=streamer
        )
        if streamer is not None:
            streamer.end()
        sequences = torch.cat([input_ids, completion], dim=1)
        if not config.return_dict_in_generate:
            return sequences
        return DiffusionGenerateOutput(
            sequences=sequences, nfe=nfe,
            tokens_per_forward=decoder.generated_tokens / max(int(decoder.row_forwards), 1),
            history=tuple(history) if config.output_history else None, decode_path=decoder.decode_path(),
        )

    def clear_static_decoding_state(self) -> None:
        """Free the static path's kept buffers, KV caches and CUDA graphs (they are kept per shape for later calls)."""
        _STATIC_STATES.pop(self, None)

    def _check_prompt(self, input_ids, attention_mask):
        if input_ids is None:
            raise ValueError("generate() needs input_ids (the prompt)")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a non-empty [batch, prompt_len] tensor, got {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got "
                f"{tuple(attention_mask.shape)}"
            )
        attention_mask = attention_mask.to(input_ids.device).long()
        if (attention_mask.sum(-1) == 0).any():
            raise ValueError("every prompt needs at least one token: a row of attention_mask is all zeros (empty prompt)")
        if (attention_mask[:, -1] == 0).any() or (attention_mask[:, 1:] < attention_mask[:, :-1]).any():
            raise ValueError(
                "attention_mask shows right padding; generate() needs left padding "
                "(tokenizer(..., padding_side='left'))"
            )
        return input_ids, attention_mask


class _BlockDecoder:
    """The state of one generate() call. Rows that finish are evicted; `rows` maps active rows to the batch."""

    def __init__(self, model, config, input_ids, attention_mask, eos_ids, pad_id, mask_token_id, max_new_tokens,
                 use_cache, generator):
        self.model, self.config = model, config
        self.eos_ids, self.pad_id, self.mask_id = eos_ids, pad_id, mask_token_id
        self.max_new_tokens, self.use_cache, self.generator = max_new_tokens, use_cache, generator
        self.shift = bool(model.config.shift_logits)
        self.block_size = config.block_size
        batch, width = input_ids.shape
        self.device = input_ids.device
        self.rows = torch.arange(batch, device=self.device)
        self.completion = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=self.device)
        # How many completion tokens each row returns: cut after its first EOS or stop string.
        self.lengths = torch.full((batch,), max_new_tokens, dtype=torch.long, device=self.device)
        self.prompt_ids = input_ids
        self.done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        # Each row's blocks end where its prompt ends: the token at logical position p is in block
        # (p + offset) // block_size, and generated block k covers the next block_size positions exactly.
        self.block_offset = (-attention_mask.sum(-1)) % self.block_size
        self.attention_mask = attention_mask
        # Tokens not yet in the cache (at first the whole prompt), carried as clean prefix by the next forward.
        self.pending = input_ids
        self.prefix = input_ids  # the whole clean sequence so far (for the uncached reference path)
        if use_cache:
            c = model.config
            capacity = width + max_new_tokens + self.block_size
            self.cache = BlockKVCache(c.num_hidden_layers, batch, c.num_key_value_heads, capacity, c.head_dim,
                                      model.dtype, self.device)
        self.prev_logits = None  # shift mode: the logits of the position before the current block
        self.confidence_kernel = False  # the static decoder may switch on the fused Triton confidence/argmax
        self.generated_tokens = 0
        self.row_forwards = 0  # denoising steps summed over rows (see `run`): the denominator of TPF

    def decode_path(self) -> str:
        return "dynamic" if self.use_cache else "uncached"

    def _forward(self, canvas):
        """Logits for the canvas positions (already shifted in token-shift mode); writes pending K/V to the cache."""
        model, n = self.model, canvas.shape[1]
        pending = self.pending.shape[1]
        keep = n + 1 if self.shift else n
        canvas_mask = torch.ones_like(canvas)
        if self.use_cache:
            tokens = torch.cat([self.pending, canvas], 1)
            mask = torch.cat([self.attention_mask, canvas_mask], 1)
            logits = model(tokens, attention_mask=mask, past_key_values=self.cache, block_offset=self.block_offset,
                           logits_to_keep=keep).logits
            self.cache.advance(pending)
            self.pending = self.pending[:, :0]
        else:
            tokens = torch.cat([self.prefix, canvas], 1)
            mask = torch.cat([self.attention_mask, canvas_mask], 1)
            logits = model(tokens, attention_mask=mask, block_offset=self.block_offset, logits_to_keep=keep).logits
        if not self.shift:
            return logits
        # Token shift: position i's logits predict token i+1, so the block's first token is predicted by the position
        # just before the block. That position is in this forward when clean tokens precede the canvas (then there
        # are n + 1 logits); otherwise it was in an earlier one.
        if logits.shape[1] == n + 1:
            self.prev_logits = logits[:, :1]
            return logits[:, :n]
        return torch.cat([self.prev_logits, logits[:, : n - 1]], 1)

    def run(self, stopping_criteria=None, stop_strings=None, tokenizer=None, streamer=None):
        config, nfe, history = self.config, 0, []
        done_tokens = 0
        while done_tokens < self.max_new_tokens and self._has_active_rows():
            n = min(self.block_size, self.max_new_tokens - done_tokens)
            canvas, masked = self._new_block(n)
            while True:
                # A row's denoising steps are the forwards in which it still had masked positions (a row done with
                # its block only waits for the others): counted so, TPF is what the row gets when decoded alone.
                # Summed on the device: no host sync beyond the one per step below.
                self.row_forwards = self.row_forwards + masked.any(-1).sum()
                canvas, masked = self._step(canvas, masked)
                nfe += 1
                if streamer is not None and hasattr(streamer, "put_draft"):  # TextDiffusionStreamer: the draft so far
                    streamer.put_draft(canvas[0][~masked[0]].cpu())
                if config.output_history:
                    snapshot = self.completion.clone()
                    snapshot[self.rows, done_tokens:done_tokens + n] = canvas
                    snapshot[self.rows, done_tokens + n:] = self.mask_id
                    history.append(snapshot.cpu())
                if not masked.any():  # the one host sync per step
                    break
            self.completion[self.rows, done_tokens:done_tokens + n] = canvas
            self._append_clean_block(canvas)
            finished = self._finished_rows(canvas, done_tokens + n, stopping_criteria, stop_strings, tokenizer)
            if streamer is not None:
                streamer.put(self.completion[0, done_tokens:min(done_tokens + n, int(self.lengths[0]))].cpu())
            done_tokens += n
            if finished.any():
                self._evict(~finished)
        return self._trim(), nfe, history

    def _has_active_rows(self) -> bool:
        return len(self.rows) > 0

    def _new_block(self, n):
        """The canvas of a new block: every position masked."""
        canvas = torch.full((len(self.rows), n), self.mask_id, dtype=torch.long, device=self.device)
        return canvas, torch.ones_like(canvas, dtype=torch.bool)

    def _step(self, canvas, masked):
        """One denoising step: forward the block, propose a token per position, commit by the rule."""
        config = self.config
        logits = self._forward(canvas)
        if self.confidence_kernel and (not config.do_sample or config.temperature == 0):
            # One pass over the vocabulary, no float32 softmax materialised; the same choice as propose_tokens.
            tokens, confidence = confidence_argmax(logits, exclude_token_id=self.mask_id, use_triton=True)
        else:
            logits[..., self.mask_id] = float("-inf")  # the mask token is never a prediction
            tokens, confidence = propose_tokens(
                logits, do_sample=config.do_sample, temperature=config.temperature, top_k=config.top_k,
                top_p=config.top_p, generator=self.generator,
            )
        eligible = masked & active_sub_block(masked, config.sub_block_size)
        commit = select_commits(confidence, eligible, threshold=config.threshold, factor=config.factor,
                                steps=config.steps)
        canvas = torch.where(commit, tokens, canvas)
        masked, canvas = self._end_rows_at_eos(canvas, masked & ~commit)
        return canvas, masked

    def _end_rows_at_eos(self, canvas, masked):
        """A row that has committed EOS with no mask before it is done: its later positions need no decoding."""
        if not len(self.eos_ids):
            return masked, canvas
        is_eos = ~masked & torch.isin(canvas, self.eos_ids)
        position = torch.arange(canvas.shape[1], device=canvas.device)
        first_eos = torch.where(is_eos, position, torch.full_like(position, canvas.shape[1])).min(-1, keepdim=True)
        first_eos = first_eos.values
        masked_before = (masked & (position < first_eos)).any(-1, keepdim=True)
        after = (position > first_eos) & ~masked_before
        return masked & ~after, torch.where(after, torch.full_like(canvas, self.pad_id), canvas)

    def _append_clean_block(self, canvas):
        self.pending = canvas
        self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(canvas)], 1)
        if not self.use_cache:
            self.prefix = torch.cat([self.prefix, canvas], 1)

    def _finished_rows(self, canvas, generated, stopping_criteria, stop_strings, tokenizer):
        """Rows that are done after this block; records where each one's returned completion ends."""
        completion = self.completion[self.rows, :generated]
        finished = torch.zeros_like(self.rows, dtype=torch.bool)
        if len(self.eos_ids):
            is_eos = torch.isin(completion, self.eos_ids)
            finished = is_eos.any(-1)
            first_eos = torch.where(finished, is_eos.float().argmax(-1) + 1, self.lengths[self.rows])
            self.lengths[self.rows] = torch.minimum(self.lengths[self.rows], first_eos)
        already_done = self.done[self.rows]  # rows the static path keeps in the batch after they finished
        if stopping_criteria:
            sequences = torch.cat([self.prompt_ids[self.rows], completion], 1)
            stopped = stopping_criteria(sequences, None).to(finished.device)
            self.lengths[self.rows] = torch.where(stopped & ~finished & ~already_done, generated,
                                                  self.lengths[self.rows])
            finished |= stopped
        if stop_strings:
            for index, row in enumerate(self.rows.tolist()):  # string matching is per row by nature
                if self.done[row]:
                    continue
                kept = int(self.lengths[row])
                cut = _stop_string_cut(tokenizer, self.completion[row, :min(kept, generated)].tolist(), stop_strings)
                if cut is not None:
                    self.lengths[row] = min(kept, cut)
                    finished[index] = True
        return finished

    def _evict(self, keep):
        self.rows = self.rows[keep]
        self.pending = self.pending[keep]
        self.attention_mask = self.attention_mask[keep]
        self.block_offset = self.block_offset[keep]
        if self.prev_logits is not None:
            self.prev_logits = self.prev_logits[keep]
        if self.use_cache:
            self.cache.select_rows(keep.nonzero().squeeze(-1))
        else:
            self.prefix = self.prefix[keep]

    def _trim(self):
        """Pad everything after each row's end; drop columns no row uses."""
        position = torch.arange(self.max_new_tokens, device=self.device)
        completion = self.completion.masked_fill(position >= self.lengths[:, None], self.pad_id)
        self.generated_tokens = int(self.lengths.sum())
        return completion[:, : int(self.lengths.max())]


class StaticBlockKVCache:
    """A KV cache whose `update` writes at a slot index held on the device and returns every slot.

    Shapes and addresses never change, so a denoising step over it can be captured in a CUDA graph. Which slots a
    query may see is the caller's business (`token_layouts`); unfilled slots are simply invisible.
    keys/values: `[layers, batch, kv_heads, capacity, head_dim]`; `write_index`: a 0-d long tensor.

    The model's forward calls `run_layer` for each layer (see `EfficientDlmModel.forward`): each layer then gets its
    own `_StaticLayerKV` view, and during the repeating step shapes (`fast`) the layer may run compiled and its
    attention through the Triton block kernel. Outside those steps (the prompt prefill, a short last block) every
    layer runs as written, over a dense mask.
    """

    def __init__(self, num_layers, batch, num_kv_heads, capacity, head_dim, dtype, device):
        shape = (num_layers, batch, num_kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.write_index = torch.zeros((), dtype=torch.long, device=device)
        self.pad_len = torch.zeros(batch, dtype=torch.long, device=device)  # each row's left padding (prompt slots)
        self.views = [_StaticLayerKV(self, layer) for layer in range(num_layers)]
        # Per step, set by the decoder: a repeating step shape, its clean prefix, and how that step runs.
        self.fast = False
        self.clean_prefix_len = 0
        self.compiled_layer = None
        self.block_attention = False

    @property
    def needs_mask(self) -> bool:
        return not (self.fast and self.block_attention)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions come with token_layouts; nothing is derived from a length here

    def update(self, key, value, layer_idx):
        return self.views[layer_idx].update(key, value)

    def run_layer(self, layer, index, hidden_states, position_embeddings, mask):
        if self.fast and self.compiled_layer is not None:
            return self.compiled_layer(layer, hidden_states, position_embeddings, mask, self.views[index])
        return layer(hidden_states, position_embeddings, mask, self.views[index])


class _StaticLayerKV:
    """One layer's slots of a `StaticBlockKVCache`, handed to that layer's attention (`is_layer_view`)."""

    is_layer_view = True

    def __init__(self, cache: StaticBlockKVCache, layer: int):
        self.cache = cache
        self.keys, self.values = cache.keys[layer], cache.values[layer]

    def update(self, key, value):
        """Write the step's K/V at the write index; return every slot."""
        slots = self.cache.write_index + torch.arange(key.shape[2], device=key.device)
        # Under autocast (e.g. a model still wrapped by a mixed-precision Trainer) K/V may arrive in another dtype.
        self.keys.index_copy_(2, slots, key.to(self.keys.dtype))
        self.values.index_copy_(2, slots, value.to(self.values.dtype))
        return self.keys, self.values

    def attend(self, query, key, value, mask, scaling, backend):
        cache = self.cache
        if cache.fast and cache.block_attention:
            # The kernel reads the filled slots [pad_len, write_index) and takes the step's own K/V directly; the
            # write is for later steps, into slots it does not read. Writing first matters under torch.compile: the
            # write can then happen in place, where a write after a read of the same cache makes inductor copy the
            # whole layer cache to keep the read's input intact.
            keys, values = self.update(key, value)
            key, value = key.to(keys.dtype), value.to(values.dtype)
            return cached_block_attention(query, keys, values, key, value, cache.write_index, cache.pad_len, scaling,
                                          cache.clean_prefix_len)
        keys, values = self.update(key, value)
        return backend(query, keys, values, mask, scaling, 0.0)


def _run_layer(layer, hidden_states, position_embeddings, mask, layer_kv):
    return layer(hidden_states, position_embeddings, mask, layer_kv)


_COMPILED_LAYER = []  # torch.compile(_run_layer), made on first use (compiled code is cached per code object anyway)
# Options for that torch.compile call. dynamic=False: the two step shapes are few
# and fixed; specialised code is what the CUDA graph wants. Each (batch, step shape, kernel setting, dtype, width)
# is one entry of dynamo's cache for `_run_layer`; past `torch._dynamo.config.recompile_limit` (8) new shapes run the
# layer uncompiled (same tokens, slower), so a process serving many shapes should raise that limit.
COMPILE_OPTIONS = {"dynamic": False}


def _compiled_layer():
    if not _COMPILED_LAYER:
        _COMPILED_LAYER.append(torch.compile(_run_layer, **COMPILE_OPTIONS))
    return _COMPILED_LAYER[0]


class _StaticState:
    """What the static decoder keeps across generate() calls of one shape: the cache, every slot's layout, the
    step's input/output buffers and the CUDA graphs that read and write them. A graph replays fixed addresses, so
    reusing it means refilling these tensors in place, never replacing them. Holds tensors only (no model): the
    per-model registry below is a weak mapping."""

    def __init__(self, model, batch, capacity, device):
        c = model.config
        self.cache = StaticBlockKVCache(c.num_hidden_layers, batch, c.num_key_value_heads, capacity, c.head_dim,
                                        model.dtype, device)
        self.slot_positions = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        self.slot_blocks = torch.zeros_like(self.slot_positions)
        self.slot_is_real = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.committed = torch.zeros_like(self.slot_is_real)
        self.no_noise = torch.zeros_like(self.slot_is_real)
        self.slots = torch.arange(capacity, device=device)
        self.eos_ids = None
        self.prev_logits = None  # shift mode: made by the first prefill, refilled by later ones
        self.graphs = {}  # (step kind, how it decodes) -> (graph, buffers)


# model -> OrderedDict(shape key -> _StaticState), the most recently used last. Weak: a freed model frees its states.
_STATIC_STATES = weakref.WeakKeyDictionary()
MAX_STATIC_STATES = 4  # shapes kept per model (each holds a KV cache); the least recently used goes first


def _static_state(model, key, batch, capacity, device) -> _StaticState:
    states = _STATIC_STATES.setdefault(model, OrderedDict())
    state = states.pop(key, None)
    if state is None:
        while len(states) >= MAX_STATIC_STATES:
            states.popitem(last=False)
        state = _StaticState(model, batch, capacity, device)
    states[key] = state
    return state


class _StaticBlockDecoder(_BlockDecoder):
    """The fixed-shape decoder behind `cache_implementation="static"`.

    Every slot's logical position and block is known when the call starts (left padding keeps rows aligned), so
    they are computed once; a step then only moves a device-side write index. Rows stay in the batch after they
    finish (their positions count as decoded), which keeps shapes fixed. Two step shapes repeat — a plain step over
    the block, and the first step of a block carrying the previous block in front —; on CUDA with greedy decoding
    each is captured once as a CUDA graph and replayed (and kept, with the buffers it reads, for later calls with the
    same shapes), with `compile` their decoder layers run through torch.compile, and the Triton kernels serve their
    attention and commit. The host synchronises once per step (any mask left?).
    """

    def __init__(self, model, config, input_ids, attention_mask, eos_ids, pad_id, mask_token_id, max_new_tokens,
                 generator, use_graphs):
        super().__init__(model, config, input_ids, attention_mask, eos_ids, pad_id, mask_token_id, max_new_tokens,
                         use_cache=False, generator=generator)
        batch, width = input_ids.shape
        self.capacity = width + max_new_tokens
        kernels = requested_kernels(config.kernels)
        if kernels:
            # "auto" uses the compiled kernels only (CUDA); naming kernels also allows triton's interpreter (tests).
            usable = triton_usable(self.device, "the static decoding step",
                                   allow_interpreter=config.kernels not in (None, "auto"))
            kernels = kernels if usable else frozenset()
        self.kernels = kernels
        # Everything a captured graph bakes in: shapes, dtype, and the Python constants of the step's code.
        # Parameters are part of it by address, so graphs never outlive the weights they read (e.g. after .to()).
        shape_key = (batch, width, max_new_tokens, self.block_size, model.dtype, str(self.device), self.shift,
                     tuple(eos_ids.tolist()), tuple(p.data_ptr() for p in model.parameters()))
        state = _static_state(model, shape_key, batch, self.capacity, self.device)
        self.state, self.cache = state, state.cache
        self.graph_key = (
            config.threshold, config.factor, config.steps, config.sub_block_size, mask_token_id, pad_id,
            config.compile, tuple(sorted(kernels)), model.config._attn_implementation,
        )
        # Refill the kept buffers in place (captured graphs read these very tensors).
        prompt_lengths = attention_mask.sum(-1, keepdim=True)
        prompt_positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        generated_positions = prompt_lengths + (state.slots[width:] - width)
        positions = torch.cat([prompt_positions, generated_positions], 1)  # [B, capacity]
        state.slot_positions.copy_(positions)
        state.slot_blocks.copy_((positions + self.block_offset[:, None]) // self.block_size)
        state.slot_is_real.copy_(torch.cat([attention_mask.bool(), torch.ones_like(generated_positions, dtype=torch.bool)],
                                           1))
        state.committed.zero_()
        state.cache.write_index.zero_()
        state.cache.pad_len.copy_(width - prompt_lengths[:, 0])
        if state.eos_ids is None:
            state.eos_ids = eos_ids.clone()
        self.eos_ids = state.eos_ids
        self.slot_positions, self.slot_blocks, self.slot_is_real = (state.slot_positions, state.slot_blocks,
                                                                    state.slot_is_real)
        self.committed, self.no_noise = state.committed, state.no_noise
        self.prev_logits = state.prev_logits
        self.slots = state.slots
        self._prefill_pending = True  # the first step (prompt + first block) runs eagerly: its shape is unique
        self.use_graphs = use_graphs

    def decode_path(self) -> str:
        path = "static" + ("+graphs" if self.use_graphs else "") + ("+compile" if self.config.compile else "")
        return path + (f"+kernels({','.join(sorted(self.kernels))})" if self.kernels else "")

    def _has_active_rows(self) -> bool:
        return not bool(self.done.all())

    def _new_block(self, n):
        canvas = torch.full((len(self.rows), n), self.mask_id, dtype=torch.long, device=self.device)
        # Finished rows ride along; their positions count as decoded so they never hold the batch back.
        masked = (~self.done)[:, None].expand_as(canvas).clone()
        return canvas, masked

    def _evict(self, keep):
        self.done |= ~keep

    def _append_clean_block(self, canvas):
        self.pending = canvas

    def _forward(self, canvas):
        """Static-shape forward: pending tokens (if any) + canvas written at the write index; K/V of pending kept."""
        from .modeling_efficient_dlm import TokenLayout  # here: the modeling file imports this one

        n, pending = canvas.shape[1], self.pending.shape[1]
        tokens = torch.cat([self.pending, canvas], 1) if pending else canvas
        window = self.cache.write_index + torch.arange(tokens.shape[1], device=self.device)
        in_window = (self.slots >= self.cache.write_index) & (self.slots < self.cache.write_index + tokens.shape[1])
        position_ids = self.slot_positions.index_select(1, window)
        query_blocks = self.slot_blocks.index_select(1, window)
        queries = TokenLayout(query_blocks, torch.zeros_like(tokens, dtype=torch.bool),
                              torch.ones_like(tokens, dtype=torch.bool))
        keys = TokenLayout(self.slot_blocks, self.no_noise, self.committed | (in_window[None] & self.slot_is_real))
        keep = n + 1 if self.shift and pending else n
        logits = self.model(tokens, position_ids=position_ids, past_key_values=self.cache,
                            token_layouts=(queries, keys), logits_to_keep=keep).logits
        if pending:  # the clean tokens in front of the canvas stay in the cache from now on
            kept = in_window & (self.slots < self.cache.write_index + pending)
            self.committed |= kept[None] & self.slot_is_real
            self.cache.write_index += pending
        if not self.shift:
            return logits
        if logits.shape[1] == n + 1:
            if self.prev_logits is None:
                self.prev_logits = self.state.prev_logits = logits[:, :1].clone()
            else:
                self.prev_logits.copy_(logits[:, :1])
            return logits[:, :n]
        return torch.cat([self.prev_logits, logits[:, : n - 1]], 1)

    def _configure_step(self, fast: bool, clean_prefix_len: int) -> None:
        """How this step runs: the repeating shapes get the compiled layer and the kernels, the others neither."""
        cache = self.cache
        cache.fast = fast
        cache.clean_prefix_len = clean_prefix_len
        cache.compiled_layer = _compiled_layer() if fast and self.config.compile else None
        cache.block_attention = fast and "block_attention" in self.kernels
        self.confidence_kernel = fast and "confidence_argmax" in self.kernels

    def _step(self, canvas, masked):
        first_of_block = self.pending.shape[1] > 0
        prefill = first_of_block and self._prefill_pending
        fast = not prefill and canvas.shape[1] == self.block_size  # one of the two shapes that repeat
        self._configure_step(fast, self.pending.shape[1])
        if not (fast and self.use_graphs):
            canvas, masked = super()._step(canvas, masked)
            self.pending = self.pending[:, :0]
            self._prefill_pending = False
            return canvas, masked
        key = ("first" if first_of_block else "plain", *self.graph_key)
        graphs = self.state.graphs
        if key not in graphs:
            graphs[key] = self._capture(key[0], canvas, masked)
        graph, buffers = graphs[key]
        buffers["canvas"].copy_(canvas)
        buffers["masked"].copy_(masked)
        if first_of_block:
            buffers["pending"].copy_(self.pending)
        graph.replay()
        self.pending = self.pending[:, :0]
        return buffers["canvas_out"], buffers["masked_out"]

    def _capture(self, kind, canvas, masked):
        """Capture one step shape as a CUDA graph over static buffers (state it mutates is restored after warm-up).

        All graphs of a state share one memory pool. That is safe because each replay's outputs are consumed
        (copied into the next step's inputs, the completion) before any other graph replays."""
        buffers = {"canvas": canvas.clone(), "masked": masked.clone()}
        if kind == "first":
            buffers["pending"] = self.pending.clone()
        saved = (self.cache.write_index.clone(), self.committed.clone())
        graphs = self.state.graphs
        pool = next(iter(graphs.values()))[0].pool() if graphs else None

        def step():
            self.pending = buffers["pending"] if kind == "first" else buffers["canvas"][:, :0]
            out_canvas, out_masked = _BlockDecoder._step(self, buffers["canvas"], buffers["masked"])
            buffers["canvas_out"], buffers["masked_out"] = out_canvas, out_masked

        def restore():
            self.cache.write_index.copy_(saved[0])
            self.committed.copy_(saved[1])

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # warm-up: compilation, allocations and lazy initialisation happen outside the capture
        torch.cuda.current_stream().wait_stream(side)
        restore()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            step()
        restore()
        return graph, buffers


def _stop_string_cut(tokenizer, token_ids, stop_strings):
    """Number of tokens to keep so that the text ends with the first stop string, or None if none occurs."""
    text = tokenizer.decode(token_ids)
    hits = [text.find(s) + len(s) for s in stop_strings if s in text]
    if not hits:
        return None
    end = min(hits)
    low, high = 1, len(token_ids)
    while low < high:  # the fewest tokens whose text reaches the end of the stop string
        middle = (low + high) // 2
        if len(tokenizer.decode(token_ids[:middle])) >= end:
            high = middle
        else:
            low = middle + 1
    return low


__all__ = [
    "BlockKVCache",
    "DiffusionGenerateOutput",
    "DiffusionGenerationMixin",
    "EfficientDlmGenerationConfig",
    "KERNEL_NAMES",
    "active_sub_block",
    "propose_tokens",
    "select_commits",
]

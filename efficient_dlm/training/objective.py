"""The block-diffusion training objective: noise a clean batch, lay it out for an attention pattern, score it.

`noise_batch` turns a clean batch (`input_ids`, `labels`, `attention_mask`, `block_offset`, as the collator gives it)
into the model input of one training step; `masked_token_loss_sum` scores the model's logits on it. The trainer
divides that sum by `expected_masked_weight(...) * num_items`, where num_items is the number of maskable tokens of
the whole optimiser step (see `DlmConversionTrainer.compute_loss` for why this normaliser).

Layouts (`attention`):
- `bd3` (default, Efficient-DLM): the input is `[x_t ; x_0]`; each noisy block attends to itself and to the clean
  copies of the blocks before it; logits come back for x_t only.
- `noisy_context`: x_t alone, block-causal: a noisy block sees the *noisy* earlier blocks (the paper's Fig. 2c).
- `bidirectional`: x_t alone, every token sees every token (Dream-style).

Which logit scores a masked token (`shift_logits`):
- False (Efficient-DLM): the logit at position i scores token i.
- True (Fast-dLLM v2): the logit at i-1 scores token i, as in a causal LM, across block boundaries too. The first
  token of a block is then scored from the last position of the previous noisy block. At decode time that token is
  predicted from the same position of the *clean*, fully decoded previous block (`generate()` reads the logit just
  before the block); the two agree exactly when the previous block's noisy copy has no mask left, which is what low
  noise levels train. Position 0 of a row has no logit before it: the collator marks its label -100, so it is
  never masked nor counted.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..modeling_efficient_dlm import AttentionPattern
from .masking import (
    DEFAULT_EPS,
    DEFAULT_MASK_LAMBDA,
    complementary_mask,
    draw_block_masks,
    num_grid_blocks,
    sample_noise_levels,
    token_noise_levels,
)

LOSS_WEIGHTINGS = ("elbo", "none")
ATTENTION_LAYOUTS = ("bd3", "noisy_context", "bidirectional")


def check_objective_arguments(weighting: str, attention: str) -> None:
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
    if attention not in ATTENTION_LAYOUTS:
        raise ValueError(f"attention must be one of {ATTENTION_LAYOUTS}, got {attention!r}")


def attention_pattern_for(attention: str, block_size: int) -> AttentionPattern:
    """The model's `AttentionPattern` for a training layout name."""
    check_objective_arguments("elbo", attention)
    if attention == "bd3":
        return AttentionPattern.bd3(block_size)
    if attention == "noisy_context":
        return AttentionPattern.noisy_context(block_size)
    return AttentionPattern.bidirectional()


@dataclass
class NoisedBatch:
    """One training step's model input and what its logits are scored against.

    With the complementary copy, every tensor holds 2 * batch rows: the first-copy rows, then their complements.
    """

    input_ids: torch.Tensor  # [rows, 2L] for bd3 ([x_t ; x_0]), else [rows, L] (x_t)
    attention_mask: torch.Tensor  # [rows, L]: the padding mask of one half (the model applies it to both)
    block_offset: torch.Tensor  # [rows]
    attention_pattern: AttentionPattern
    targets: torch.Tensor  # [rows, L]: the clean tokens x_0
    masked: torch.Tensor  # bool [rows, L]: positions replaced by the mask token (the scored tokens)
    weights: torch.Tensor  # float [rows, L]: loss weight of each token (1/t or 1)
    noise_levels: torch.Tensor  # [rows, grid blocks]: t of each block

    def model_inputs(self) -> dict:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "attention_pattern": self.attention_pattern,
            "block_offset": self.block_offset,
        }


def maskable_positions(labels: torch.Tensor, shift_logits: bool) -> torch.Tensor:
    """Tokens that may be masked and scored: a label (not -100: prompt and padding have none), and with the token
    shift a logit before them."""
    maskable = labels != -100
    if shift_logits:
        maskable[:, 0] = False
    return maskable


def noise_batch(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    mask_token_id: int,
    block_size: int,
    attention_mask: torch.Tensor | None = None,
    block_offset: torch.Tensor | int = 0,
    masking: str = "position_dependent",
    mask_lambda: float = DEFAULT_MASK_LAMBDA,
    complementary: bool = False,
    eps: float = DEFAULT_EPS,
    weighting: str = "elbo",
    attention: str = "bd3",
    shift_logits: bool = False,
    generator: torch.Generator | None = None,
    noise_levels: torch.Tensor | None = None,
) -> NoisedBatch:
    """Noise a right-padded clean batch on its own device and lay it out for `attention`.

    `labels` marks what may be masked (anything but -100); prompt and padding tokens carry -100 and are never
    masked. `noise_levels` ([batch, num_grid_blocks(L, block_size)]) fixes t instead of drawing it.
    """
    check_objective_arguments(weighting, attention)
    batch, length = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(block_offset, torch.Tensor):
        block_offset = torch.full((batch,), int(block_offset), dtype=torch.long, device=device)
    block_offset = block_offset.to(device)
    maskable = maskable_positions(labels, shift_logits)
    if noise_levels is None:
        noise_levels = sample_noise_levels((batch, num_grid_blocks(length, block_size)), eps, generator=generator,
                                           device=device)
    masked = draw_block_masks(maskable, noise_levels, block_size, schedule=masking, mask_lambda=mask_lambda,
                              block_offset=block_offset, generator=generator)
    if complementary:
        # The complement of a block with k of n masked has n - k masked: its noise level is 1 - t.
        masked = torch.cat([masked, complementary_mask(masked, maskable)])
        noise_levels = torch.cat([noise_levels, 1.0 - noise_levels])
        input_ids, attention_mask = input_ids.repeat(2, 1), attention_mask.repeat(2, 1)
        block_offset = block_offset.repeat(2)
    return lay_out_noised_batch(input_ids, masked, noise_levels, mask_token_id=mask_token_id, block_size=block_size,
                                attention_mask=attention_mask, block_offset=block_offset, weighting=weighting,
                                attention=attention)


def lay_out_noised_batch(
    input_ids: torch.Tensor,
    masked: torch.Tensor,
    noise_levels: torch.Tensor,
    *,
    mask_token_id: int,
    block_size: int,
    attention_mask: torch.Tensor,
    block_offset: torch.Tensor,
    weighting: str = "elbo",
    attention: str = "bd3",
) -> NoisedBatch:
    """The model input and loss weights for given masks and block noise levels (`[rows, grid blocks]`)."""
    check_objective_arguments(weighting, attention)
    length = input_ids.shape[1]
    noisy = torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)
    if weighting == "elbo":
        weights = 1.0 / token_noise_levels(noise_levels, length, block_size, block_offset)
    else:
        weights = torch.ones(masked.shape, dtype=torch.float32, device=input_ids.device)
    model_input = torch.cat([noisy, input_ids], dim=1) if attention == "bd3" else noisy
    return NoisedBatch(
        input_ids=model_input,
        attention_mask=attention_mask,
        block_offset=block_offset,
        attention_pattern=attention_pattern_for(attention, block_size),
        targets=input_ids,
        masked=masked,
        weights=weights * masked,
        noise_levels=noise_levels,
    )


def _scored(logits: torch.Tensor, noised: NoisedBatch, shift_logits: bool):
    """(logits [M, V], targets [M], weights [M]) of the masked tokens, each with the logit that scores it."""
    targets, masked, weights = noised.targets, noised.masked, noised.weights
    if shift_logits:  # logit i-1 scores token i
        logits, targets, masked, weights = logits[:, :-1], targets[:, 1:], masked[:, 1:], weights[:, 1:]
    return logits[masked], targets[masked], weights[masked]


def masked_token_loss_sum(logits: torch.Tensor, noised: NoisedBatch, shift_logits: bool = False) -> torch.Tensor:
    """sum over masked tokens of weight * cross-entropy, in float32. `logits` are the noisy half's `[rows, L, V]`."""
    scored_logits, targets, weights = _scored(logits, noised, shift_logits)
    losses = F.cross_entropy(scored_logits.float(), targets, reduction="none")
    return (losses * weights).sum()


def masked_token_log_likelihoods(logits: torch.Tensor, noised: NoisedBatch, shift_logits: bool = False,
                                 compute_entropy: bool = False):
    """Per position: weight * log p(token) where the token is masked, 0 elsewhere. float32 `[rows, L]`.

    A row's sum is its term of the ELBO (with 1/t weights); the RL trainer needs it per row, where
    `masked_token_loss_sum` sums over the batch. With `compute_entropy`, also the entropy of the predicted
    distribution at each masked position (0 elsewhere): `(log_likelihoods, entropies)`.
    """
    scored_logits, targets, weights = _scored(logits, noised, shift_logits)
    log_probs = torch.log_softmax(scored_logits.float(), dim=-1)
    values = log_probs.gather(-1, targets[:, None]).squeeze(-1) * weights
    # Scatter back to the positions of the scored tokens (with the shift, token i is scored at position i).
    scored = noised.masked.clone()
    if shift_logits:
        scored[:, 0] = False
    per_position = torch.zeros(scored.shape, dtype=values.dtype, device=values.device).masked_scatter(scored, values)
    if not compute_entropy:
        return per_position
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return per_position, torch.zeros_like(per_position).masked_scatter(scored, entropy)


def masked_token_accuracy(logits: torch.Tensor, noised: NoisedBatch, shift_logits: bool = False) -> tuple[int, int]:
    """(correct, total) argmax predictions over the masked tokens."""
    scored_logits, targets, _ = _scored(logits, noised, shift_logits)
    predictions = scored_logits.argmax(-1)
    return int((predictions == targets).sum()), int(targets.numel())


def expected_masked_weight(weighting: str, complementary: bool, eps: float = DEFAULT_EPS) -> float:
    """E[sum of the masked tokens' weights] per maskable token, over the noise.

    elbo: a block with k = round(t n) of n masked carries weight k / t ~ n per copy, so 1 per copy.
    none: the masked fraction, E[t] = (1 + eps) / 2 for one copy; exactly 1 with the complementary copy (every
    token is masked in exactly one of the two).
    """
    check_objective_arguments(weighting, "bd3")
    copies = 2 if complementary else 1
    if weighting == "elbo":
        return float(copies)
    return 1.0 if complementary else (1.0 + eps) / 2.0


__all__ = [
    "ATTENTION_LAYOUTS",
    "LOSS_WEIGHTINGS",
    "NoisedBatch",
    "attention_pattern_for",
    "check_objective_arguments",
    "expected_masked_weight",
    "lay_out_noised_batch",
    "masked_token_accuracy",
    "masked_token_log_likelihoods",
    "masked_token_loss_sum",
    "maskable_positions",
    "noise_batch",
]

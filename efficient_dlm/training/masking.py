"""Masking schedules of block-diffusion training: which tokens of each block are replaced by the mask token.

Pure tensor functions. They run on the device of their inputs, draw their randomness from an explicit
`torch.Generator`, and are vectorised over rows and blocks (no Python loop over either, no host sync).

Per block, the noise level is t ~ U(eps, 1) and exactly k = round(t * n) of the block's n maskable positions are
masked (n = block_size except where prompt or padding tokens, which are never masked, take part of the block):
- `uniform`: the k positions are a uniformly random subset;
- `position_dependent` (Efficient-DLM §3.3): the k positions are drawn without replacement with weights
  w_i = exp(beta * (1 - t) * i) over the block's positions i = 0..b-1, beta = ln 2 / (lambda * b). As t -> 1 the draw
  becomes uniform; as t -> 0 the masks crowd at the end of the block, where decoding leaves its last tokens.
  Weighted sampling without replacement is Gumbel-top-k: the k largest of log w_i + Gumbel noise.
- the complementary copy (Fast-dLLM v2) masks exactly the maskable positions the first copy left visible.
- `draw_independent_masks`: each maskable token is masked on its own with probability t (the continuous-time
  forward process). The count per block then varies, and E[1/t * sum over masked tokens] of any per-token quantity
  is exactly its sum over the maskable tokens, for every t: the likelihood estimator of RL
  (`efficient_dlm.training.grpo`) integrates over t with quadrature nodes and needs this exactness at each node.

Blocks are those of the attention pattern: the token at position p of a row is in block (p + block_offset) // b,
the rule the model and `generate()` use (a row whose prompt must end on a block boundary has block_offset > 0).
Training batches are right-padded, so a token's position is its index in the row.
"""

import math

import torch

MASKING_SCHEDULES = ("uniform", "position_dependent")
DEFAULT_EPS = 1e-3
DEFAULT_MASK_LAMBDA = 0.1


def check_masking_arguments(schedule: str, mask_lambda: float, eps: float) -> None:
    """The one place the ranges are checked (the training config and the functions below both call it)."""
    if schedule not in MASKING_SCHEDULES:
        raise ValueError(f"masking must be one of {MASKING_SCHEDULES}, got {schedule!r}")
    if isinstance(mask_lambda, bool) or not isinstance(mask_lambda, (int, float)) or not 0 < mask_lambda <= 1:
        raise ValueError(f"mask_lambda (the half-life ratio lambda) must be in (0, 1], got {mask_lambda!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ValueError(f"eps (the smallest noise level) must be in (0, 1), got {eps!r}")


def sample_noise_levels(shape, eps: float = DEFAULT_EPS, *, generator: torch.Generator | None = None,
                        device=None) -> torch.Tensor:
    """t ~ U(eps, 1), one per entry of `shape` (rows x blocks). float32."""
    device = device if device is not None else (generator.device if generator is not None else None)
    return eps + (1.0 - eps) * torch.rand(shape, generator=generator, device=device)


def position_log_weights(noise_levels: torch.Tensor, block_size: int, mask_lambda: float) -> torch.Tensor:
    """log w_i = beta * (1 - t) * i for i = 0..block_size-1: `[..., block_size]` for noise levels `[...]`."""
    beta = math.log(2.0) / (mask_lambda * block_size)
    positions = torch.arange(block_size, device=noise_levels.device, dtype=torch.float32)
    return beta * (1.0 - noise_levels.float())[..., None] * positions


def position_weights(noise_level: float, block_size: int, mask_lambda: float) -> torch.Tensor:
    """The normalised weights w_i / sum(w) of one block at noise level t (for checks and plots)."""
    log_w = position_log_weights(torch.tensor(noise_level), block_size, mask_lambda)
    return torch.softmax(log_w, dim=-1)


def num_grid_blocks(length: int, block_size: int) -> int:
    """Blocks needed to hold `length` tokens shifted right by any block_offset in [0, block_size)."""
    return (length + 2 * block_size - 2) // block_size


def _block_slots(length: int, block_size: int, block_offset, batch: int, device) -> torch.Tensor:
    """Slot of each token in a row's `[blocks * block_size]` grid: position + block_offset. `[batch, length]`."""
    positions = torch.arange(length, device=device).expand(batch, length)
    if isinstance(block_offset, torch.Tensor):
        return positions + block_offset.to(device).view(-1, 1)
    return positions + int(block_offset)


def draw_block_masks(
    maskable: torch.Tensor,
    noise_levels: torch.Tensor,
    block_size: int,
    *,
    schedule: str = "position_dependent",
    mask_lambda: float = DEFAULT_MASK_LAMBDA,
    block_offset: torch.Tensor | int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mask exactly round(t * n) of the n maskable positions of every block.

    Args:
        maskable: bool `[batch, length]`; False for prompt and padding tokens (never masked).
        noise_levels: `[batch, num_grid_blocks(length, block_size)]`, t of each block (grid block j holds the
            positions p with (p + block_offset) // block_size == j).
        block_offset: int or `[batch]` tensor, in [0, block_size).
    Returns:
        bool `[batch, length]`, True where the token is replaced by the mask token.
    """
    check_masking_arguments(schedule, mask_lambda, DEFAULT_EPS)
    batch, length = maskable.shape
    device = maskable.device
    blocks = num_grid_blocks(length, block_size)
    if tuple(noise_levels.shape) != (batch, blocks):
        raise ValueError(f"noise_levels must have shape {(batch, blocks)} (rows, grid blocks), "
                         f"got {tuple(noise_levels.shape)}")
    slots = _block_slots(length, block_size, block_offset, batch, device)
    grid = torch.zeros(batch, blocks * block_size, dtype=torch.bool, device=device)
    grid = grid.scatter(1, slots, maskable.bool()).view(batch, blocks, block_size)

    counts = torch.round(noise_levels.to(device).float() * grid.sum(-1)).long()  # k per block, <= n
    uniform = torch.rand(grid.shape, generator=generator, device=device).clamp_(min=1e-20, max=1.0 - 1e-7)
    scores = -torch.log(-torch.log(uniform))  # Gumbel(0, 1)
    if schedule == "position_dependent":
        scores = scores + position_log_weights(noise_levels.to(device), block_size, mask_lambda)
    scores = scores.masked_fill(~grid, float("-inf"))
    # Rank of each slot within its block by score (0 = largest): the top-k of a Gumbel-perturbed log weight is a
    # weighted draw of k positions without replacement. Unmaskable slots rank last, and k never exceeds their
    # complement, so they are never picked.
    ranks = scores.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    masked_grid = (ranks < counts[..., None]) & grid
    return masked_grid.view(batch, -1).gather(1, slots)


def seeded_uniforms(seeds, draws: int, length: int, device=None) -> torch.Tensor:
    """U(0, 1) of shape `[rows, draws, length]`; row r comes from a CPU generator seeded with `seeds[r]`.

    A row's numbers depend on its seed only: not on the batch it sits in, its place there, or the device. So a row
    scored again later (the old and the new policy of one RL update, after the batch was shuffled and split) gets
    the same masks, on a CPU as on a GPU.
    """
    seeds = seeds.tolist() if isinstance(seeds, torch.Tensor) else list(seeds)
    rows = [torch.rand((draws, length), generator=torch.Generator().manual_seed(int(seed))) for seed in seeds]
    uniforms = torch.stack(rows) if rows else torch.empty(0, draws, length)
    return uniforms.to(device) if device is not None else uniforms


def draw_independent_masks(maskable: torch.Tensor, noise_levels: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Mask each maskable position independently with probability t.

    Args:
        maskable: bool `[batch, length]`.
        noise_levels: t per token, broadcastable to `[batch, length]`.
        uniforms: U(0, 1) `[batch, length]` (e.g. a slice of `seeded_uniforms`).
    """
    return maskable.bool() & (uniforms.to(maskable.device) < noise_levels)


def complementary_mask(mask: torch.Tensor, maskable: torch.Tensor) -> torch.Tensor:
    """The maskable positions `mask` left visible: the two copies together mask every maskable token once."""
    return maskable.bool() & ~mask


def token_noise_levels(noise_levels: torch.Tensor, length: int, block_size: int,
                       block_offset: torch.Tensor | int = 0) -> torch.Tensor:
    """Each token's block noise level t: `[batch, length]` from the per-block `[batch, grid blocks]`."""
    batch = noise_levels.shape[0]
    slots = _block_slots(length, block_size, block_offset, batch, noise_levels.device)
    return noise_levels.gather(1, slots // block_size)


__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_MASK_LAMBDA",
    "MASKING_SCHEDULES",
    "check_masking_arguments",
    "complementary_mask",
    "draw_block_masks",
    "draw_independent_masks",
    "num_grid_blocks",
    "position_log_weights",
    "position_weights",
    "sample_noise_levels",
    "seeded_uniforms",
    "token_noise_levels",
]

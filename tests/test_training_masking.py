"""Masking statistics: exact counts per block, position-dependent frequencies, complementary copies, noise range."""

import itertools
import math

import pytest
import torch

from efficient_dlm.training import complementary_mask, draw_block_masks, position_weights, sample_noise_levels
from efficient_dlm.training.masking import num_grid_blocks, token_noise_levels
from efficient_dlm.training.objective import noise_batch


def fixed_levels(rows, length, block_size, t):
    return torch.full((rows, num_grid_blocks(length, block_size)), float(t))


def blocks_of(tensor, block_size):
    return tensor.view(tensor.shape[0], -1, block_size)


@pytest.mark.parametrize("schedule", ["uniform", "position_dependent"])
def test_exactly_round_t_b_positions_are_masked_in_every_block(schedule):
    rows, length, block_size = 512, 64, 16
    generator = torch.Generator().manual_seed(0)
    levels = sample_noise_levels((rows, num_grid_blocks(length, block_size)), 1e-3, generator=generator)
    maskable = torch.ones(rows, length, dtype=torch.bool)
    masked = draw_block_masks(maskable, levels, block_size, schedule=schedule, generator=generator)
    counts = blocks_of(masked, block_size).sum(-1)
    expected = torch.round(levels[:, : length // block_size] * block_size).long()
    assert torch.equal(counts, expected)
    assert counts.min() == 0 and counts.max() == block_size  # both ends of the range do occur


def test_noise_levels_lie_in_eps_one_and_are_uniform():
    eps = 1e-3
    levels = sample_noise_levels((200_000,), eps, generator=torch.Generator().manual_seed(1))
    assert levels.min() >= eps and levels.max() <= 1.0
    assert abs(levels.mean().item() - (1 + eps) / 2) < 0.005
    histogram = torch.histc(levels, bins=10, min=eps, max=1.0) / len(levels)
    assert (histogram - 0.1).abs().max() < 0.005


def test_one_masked_position_follows_the_weights_chi_square():
    """k = 1: the masked position is a single draw from w_i / sum(w); Pearson's chi^2 over the 8 positions."""
    block_size, mask_lambda, t, draws = 8, 0.1, 0.125, 40_000  # round(0.125 * 8) = 1
    masked = draw_block_masks(torch.ones(draws, block_size, dtype=torch.bool), fixed_levels(draws, block_size,
                              block_size, t), block_size, schedule="position_dependent", mask_lambda=mask_lambda,
                              generator=torch.Generator().manual_seed(2))
    assert (masked.sum(-1) == 1).all()
    observed = masked.sum(0).double()
    expected = position_weights(t, block_size, mask_lambda).double() * draws
    assert expected[-1] / expected[0] > 100  # a strongly skewed target, so the test can fail
    chi_square = ((observed - expected) ** 2 / expected).sum().item()
    assert chi_square < 24.32  # the 0.999 quantile of chi^2 with 7 degrees of freedom


def inclusion_probabilities(weights: list[float], k: int) -> list[float]:
    """P(position i is among k draws without replacement, each proportional to w): every ordered sequence."""
    inclusion = [0.0] * len(weights)
    for sequence in itertools.permutations(range(len(weights)), k):
        probability, left = 1.0, sum(weights)
        for i in sequence:
            probability *= weights[i] / left
            left -= weights[i]
        for i in sequence:
            inclusion[i] += probability
    return inclusion


@pytest.mark.parametrize("t", [0.375, 0.75])
def test_several_masked_positions_are_weighted_draws_without_replacement(t):
    """k = round(t b) > 1: per-position frequencies match the exact inclusion probabilities of sequential
    weighted sampling without replacement (what Gumbel-top-k implements), within 4.5 standard errors."""
    block_size, mask_lambda, draws = 8, 0.1, 40_000
    k = round(t * block_size)
    masked = draw_block_masks(torch.ones(draws, block_size, dtype=torch.bool), fixed_levels(draws, block_size,
                              block_size, t), block_size, schedule="position_dependent", mask_lambda=mask_lambda,
                              generator=torch.Generator().manual_seed(3))
    assert (masked.sum(-1) == k).all()
    weights = torch.exp(math.log(2) / (mask_lambda * block_size) * (1 - t) * torch.arange(block_size)).tolist()
    expected = torch.tensor(inclusion_probabilities(weights, k))
    frequency = masked.double().mean(0)
    standard_error = (expected * (1 - expected) / draws).sqrt().clamp(min=1e-4)
    assert ((frequency - expected).abs() / standard_error).max() < 4.5
    assert frequency[-1] > frequency[0] + 0.1  # masks crowd at the end of the block at low noise


def test_uniform_masking_is_uniform_over_positions():
    block_size, draws = 8, 40_000
    levels = fixed_levels(draws, block_size, block_size, 0.25)
    masked = draw_block_masks(torch.ones(draws, block_size, dtype=torch.bool), levels, block_size, schedule="uniform",
                              generator=torch.Generator().manual_seed(4))
    frequency = masked.double().mean(0)
    assert (frequency - 0.25).abs().max() < 4.5 * math.sqrt(0.25 * 0.75 / draws)


def test_near_full_noise_position_dependent_is_nearly_uniform():
    weights = position_weights(0.999, 16, 0.1)
    assert (weights - 1 / 16).abs().max() < 1e-3


def test_complementary_copies_partition_the_maskable_positions():
    rows, length, block_size = 64, 24, 8
    generator = torch.Generator().manual_seed(5)
    maskable = torch.rand(rows, length, generator=generator) > 0.2
    levels = sample_noise_levels((rows, num_grid_blocks(length, block_size)), generator=generator)
    first = draw_block_masks(maskable, levels, block_size, generator=generator)
    second = complementary_mask(first, maskable)
    assert not (first & second).any()
    assert torch.equal(first | second, maskable)


def test_prompt_and_padding_are_never_masked_and_k_counts_only_maskable_positions():
    # Row 0: 5 prompt tokens, answer from position 5 (block_offset 3 puts it on a block boundary), 3 padding tokens.
    block_size, length = 4, 16
    labels = torch.full((2, length), -100)
    labels[0, 5:13] = 7
    labels[1, :] = 9
    input_ids = torch.full((2, length), 9)
    offsets = torch.tensor([3, 0])
    generator = torch.Generator().manual_seed(6)
    for _ in range(50):
        noised = noise_batch(input_ids, labels, mask_token_id=3, block_size=block_size, block_offset=offsets,
                             generator=generator)
        assert not (noised.masked & (labels == -100)).any()
        # Row 0's blocks (with the offset) are positions 5-8 and 9-12: each fully maskable.
        levels = noised.noise_levels
        assert noised.masked[0, 5:9].sum() == torch.round(levels[0, 2] * 4)
        assert noised.masked[0, 9:13].sum() == torch.round(levels[0, 3] * 4)
        # Token noise levels follow the same blocks.
        token_levels = token_noise_levels(levels, length, block_size, offsets)
        assert torch.equal(token_levels[0, 5:9], levels[0, 2].expand(4))


def test_partly_maskable_block_masks_round_t_times_its_maskable_count():
    maskable = torch.tensor([[False, False, True, True, True, True, True, True]])  # block 0 has 2 maskable of 4
    levels = torch.tensor([[0.5, 0.5, 0.0]])
    masked = draw_block_masks(maskable, levels, 4, generator=torch.Generator().manual_seed(7))
    assert masked[0, :4].sum() == 1 and masked[0, 4:].sum() == 2
    assert not masked[0, :2].any()


def test_masks_are_reproducible_from_the_generator_seed():
    maskable = torch.ones(4, 32, dtype=torch.bool)
    draws = []
    for _ in range(2):
        generator = torch.Generator().manual_seed(11)
        levels = sample_noise_levels((4, num_grid_blocks(32, 8)), generator=generator)
        draws.append(draw_block_masks(maskable, levels, 8, generator=generator))
    assert torch.equal(draws[0], draws[1])


@pytest.mark.parametrize("mask_lambda", [0.0, -0.1, 1.5])
def test_lambda_outside_zero_one_is_refused(mask_lambda):
    with pytest.raises(ValueError, match="mask_lambda"):
        draw_block_masks(torch.ones(1, 4, dtype=torch.bool), torch.ones(1, 1 + 1), 4, mask_lambda=mask_lambda)

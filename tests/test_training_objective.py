"""The loss against a hand computation; the layouts the model sees; the trainer's normalisation."""

import math

import pytest
import torch
from training_helpers import MASK, quiet_config, single_threaded, tiny_dlm

from efficient_dlm import AttentionPattern
from efficient_dlm.training import DlmConversionTrainer, expected_masked_weight, masked_token_loss_sum, noise_batch
from efficient_dlm.training.masking import num_grid_blocks


@pytest.fixture(autouse=True)
def _one_thread():
    yield from single_threaded()


def tiny_batch():
    """Two right-padded rows of 8 (block 4): row 1 has 3 padding tokens; row 0 a 2-token prompt."""
    input_ids = torch.tensor([[11, 12, 13, 14, 15, 16, 17, 18], [21, 22, 23, 24, 25, 0, 0, 0]])
    attention_mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    labels = input_ids.clone()
    labels[0, :2] = -100
    labels[1, 5:] = -100
    return input_ids, attention_mask, labels


def hand_loss(logits, input_ids, masked, levels, block_size, *, weighting, shift, normaliser):
    """sum over masked tokens of w * -log softmax(logit scoring it)[token], by hand, divided by `normaliser`."""
    total = 0.0
    rows, length = input_ids.shape
    for r in range(rows):
        for i in range(length):
            if not masked[r, i]:
                continue
            source = i - 1 if shift else i
            row_logits = logits[r, source].double()
            log_probability = row_logits[input_ids[r, i]] - math.log(row_logits.exp().sum().item())
            t = levels[r, i // block_size].item()
            total += -log_probability.item() * (1.0 / t if weighting == "elbo" else 1.0)
    return total / normaliser


@pytest.mark.parametrize("weighting", ["elbo", "none"])
@pytest.mark.parametrize("shift", [False, True])
def test_loss_equals_a_hand_computation_on_a_tiny_batch(weighting, shift, tmp_path):
    block_size = 4
    model = tiny_dlm(block_size, shift_logits=shift)
    input_ids, attention_mask, labels = tiny_batch()
    if shift:
        labels[:, 0] = -100  # as the collator marks it: no logit precedes position 0
    levels = torch.tensor([[0.3, 0.8, 0.5], [0.6, 0.26, 0.9]])  # one t per grid block
    noised = noise_batch(input_ids, labels, mask_token_id=MASK, block_size=block_size, attention_mask=attention_mask,
                         weighting=weighting, shift_logits=shift, noise_levels=levels,
                         generator=torch.Generator().manual_seed(0))
    # The layout: [x_t ; x_0], x_t has the mask token exactly where masked, never on prompt or padding.
    length = input_ids.shape[1]
    assert torch.equal(noised.input_ids[:, length:], input_ids)
    assert torch.equal(noised.input_ids[:, :length], torch.where(noised.masked, MASK, input_ids))
    assert not (noised.masked & (labels == -100)).any()
    assert noised.masked.sum() > 3

    model.eval()
    with torch.no_grad():
        logits = model(**noised.model_inputs()).logits
        assert logits.shape[:2] == (2, length)  # the noisy half only
        # Those are the noisy half's logits: the same forward, read in full through the decoder, agrees.
        hidden = model.model(noised.input_ids, attention_mask=attention_mask,
                             attention_pattern=AttentionPattern.bd3(block_size)).last_hidden_state
        assert torch.allclose(logits, model.lm_head(hidden[:, :length]), atol=1e-6)

        maskable = int((labels != -100).sum())
        normaliser = maskable * expected_masked_weight(weighting, complementary=False)
        expected = hand_loss(logits, input_ids, noised.masked, levels, block_size, weighting=weighting, shift=shift,
                             normaliser=normaliser)
        got = masked_token_loss_sum(logits, noised, shift_logits=shift).item() / normaliser
        assert got == pytest.approx(expected, rel=1e-5)

        # The trainer's compute_loss, with the same noise, gives the same number.
        trainer = DlmConversionTrainer(model, quiet_config(tmp_path, weighting=weighting))
        trainer.noise_inputs = lambda inputs, generator: noised
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                 "block_offset": torch.zeros(2, dtype=torch.long)}
        loss = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(maskable))
        assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_complementary_copy_doubles_the_rows_and_scores_every_token_once():
    input_ids, attention_mask, labels = tiny_batch()
    noised = noise_batch(input_ids, labels, mask_token_id=MASK, block_size=4, attention_mask=attention_mask,
                         complementary=True, weighting="none", generator=torch.Generator().manual_seed(1))
    assert noised.input_ids.shape == (4, 16) and noised.attention_mask.shape == (4, 8)
    first, second = noised.masked[:2], noised.masked[2:]
    assert torch.equal(first | second, labels != -100) and not (first & second).any()
    assert expected_masked_weight("none", complementary=True) == 1.0
    # The complementary copy's noise level is 1 - t: its 1/t weights go with its own masked fraction.
    assert torch.allclose(noised.noise_levels[2:], 1 - noised.noise_levels[:2])


@pytest.mark.parametrize("attention, pattern, width", [
    ("bd3", AttentionPattern.bd3(4), 16),
    ("noisy_context", AttentionPattern.noisy_context(4), 8),
    ("bidirectional", AttentionPattern.bidirectional(), 8),
])
def test_attention_ablations_feed_the_model_their_layout(attention, pattern, width):
    input_ids, attention_mask, labels = tiny_batch()
    noised = noise_batch(input_ids, labels, mask_token_id=MASK, block_size=4, attention_mask=attention_mask,
                         attention=attention, generator=torch.Generator().manual_seed(2))
    assert noised.attention_pattern == pattern
    assert noised.input_ids.shape == (2, width)
    with torch.no_grad():
        logits = tiny_dlm(4)(**noised.model_inputs()).logits
    assert logits.shape[:2] == (2, 8)


def test_elbo_loss_estimates_a_per_token_quantity_whatever_the_noise():
    """Averaged over many draws, sum(w * CE) / N with c = 1 approaches the per-token bound; a sanity check that the
    expected masked weight per maskable token is ~1 for elbo and ~1/2 for none."""
    block_size, rows, length = 16, 2000, 64
    labels = torch.ones(rows, length, dtype=torch.long)
    generator = torch.Generator().manual_seed(3)
    for weighting, expected in (("elbo", 1.0), ("none", 0.5)):
        noised = noise_batch(labels, labels, mask_token_id=MASK, block_size=block_size, weighting=weighting,
                             generator=generator)
        per_token = noised.weights.sum().item() / labels.numel()
        assert per_token == pytest.approx(expected, rel=0.05)
        assert per_token == pytest.approx(expected_masked_weight(weighting, False), rel=0.05)


def test_noise_levels_shape_is_checked():
    input_ids, attention_mask, labels = tiny_batch()
    with pytest.raises(ValueError, match="noise_levels must have shape"):
        noise_batch(input_ids, labels, mask_token_id=MASK, block_size=4, noise_levels=torch.ones(2, 2))
    assert num_grid_blocks(8, 4) == 3

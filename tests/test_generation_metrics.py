"""generate()'s tokens-per-forward is a property of each row's decoding, not of the batch it was decoded in."""

import pytest
import torch
from conftest import left_padded_batch, tiny_ar_model

from efficient_dlm.conversion import dlm_from_ar_model

MASK = 5


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_batched_tokens_per_forward_is_the_rows_own(cache_implementation):
    # Rows end (EOS) and finish blocks at different steps; a row waiting for the others must not be charged for
    # those forwards, so the batch's TPF equals sum(tokens) / sum(denoising steps) of the rows decoded alone.
    dlm = dlm_from_ar_model(tiny_ar_model("qwen3", seed=4), block_size=4, shift_logits=True, mask_token_id=MASK)
    lengths = [9, 4, 6, 7]
    ids, mask = left_padded_batch(lengths, seed=5)
    kwargs = dict(max_new_tokens=16, threshold=0.05, eos_token_id=[7, 9], return_dict_in_generate=True,
                  cache_implementation=cache_implementation)
    batched = dlm.generate(ids, attention_mask=mask, **kwargs)
    tokens, steps = 0, 0
    for row, length in enumerate(lengths):
        alone = dlm.generate(ids[row:row + 1, -length:], **kwargs)
        tokens += alone.tokens_per_forward * alone.nfe
        steps += alone.nfe
    assert tokens / steps == pytest.approx(batched.tokens_per_forward, rel=1e-9)
    # The batch took more forwards than its slowest row alone would, yet no row's TPF fell for it.
    assert batched.nfe >= max(dlm.generate(ids[r:r + 1, -n:], **kwargs).nfe for r, n in enumerate(lengths))
    assert torch.is_tensor(batched.sequences)

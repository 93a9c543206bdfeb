"""The converted model: AR equivalence at block size 1, attention-pattern semantics, backends, cache, bad input."""

import pytest
import torch
from conftest import left_padded_batch, tiny_ar_model
from transformers import DynamicCache

from efficient_dlm import AttentionPattern, EfficientDlmConfig, EfficientDlmForMaskedDiffusion
from efficient_dlm.conversion import dlm_from_ar_model
from efficient_dlm.modeling_efficient_dlm import TokenLayout, dense_attention_mask

FAMILIES = [
    ("qwen3", {}),
    ("qwen2", {}),
    ("llama", {}),
    ("llama", {"tie": True}),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}}),
    ("qwen3", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                   "original_max_position_embeddings": 128}}),
    ("qwen2", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}),
]


def converted(ar, block_size=1, shift_logits=True):
    return dlm_from_ar_model(ar, block_size=block_size, shift_logits=shift_logits, mask_token_id=5)


def tiny_dlm(block_size=4, seed=0, **overrides) -> EfficientDlmForMaskedDiffusion:
    torch.manual_seed(seed)
    config = EfficientDlmConfig(
        vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, qk_norm=True, block_size=block_size, mask_token_id=5,
        eos_token_id=2, pad_token_id=0, max_position_embeddings=128, **overrides,
    )
    return EfficientDlmForMaskedDiffusion(config).eval()


@pytest.mark.parametrize("family,options", FAMILIES, ids=lambda v: v if isinstance(v, str) else "-".join(
    f"{k}={v.get('rope_type', v) if isinstance(v, dict) else v}" for k, v in v.items()) or "plain")
def test_block_size_one_reproduces_the_ar_parent(family, options):
    ar = tiny_ar_model(family, **options)
    dlm = converted(ar)
    input_ids, attention_mask = left_padded_batch([11, 7, 3, 11])
    with torch.no_grad():
        ar_unpadded = ar(input_ids[:1]).logits
        dlm_unpadded = dlm(input_ids[:1]).logits
        ar_padded = ar(input_ids, attention_mask=attention_mask).logits
        dlm_padded = dlm(input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(dlm_unpadded, ar_unpadded, rtol=1e-5, atol=1e-5)
    real = attention_mask.bool()
    torch.testing.assert_close(dlm_padded[real], ar_padded[real], rtol=1e-5, atol=1e-5)
    # A left-padded row gives what the row gives alone.
    with torch.no_grad():
        alone = dlm(input_ids[1:2, -7:]).logits
    torch.testing.assert_close(dlm_padded[1, -7:], alone[0], rtol=1e-5, atol=1e-5)


def test_real_smollm2_at_block_size_one_reproduces_its_logits(smollm2_parent):
    ar, tokenizer = smollm2_parent
    dlm = converted(ar)
    batch = tokenizer(["Explicit is better than implicit.", "Hi there"], return_tensors="pt", padding=True,
                      padding_side="left")
    with torch.no_grad():
        expected = ar(**batch).logits
        got = dlm(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-4)


def test_plain_call_uses_the_config_block_size():
    model = tiny_dlm(block_size=4)
    ids = torch.randint(6, 96, (1, 12))
    with torch.no_grad():
        default = model(ids).logits
        explicit = model(ids, attention_pattern=AttentionPattern.block_causal(4)).logits
        causal = model(ids, attention_pattern=AttentionPattern.block_causal(1)).logits
    torch.testing.assert_close(default, explicit)
    assert not torch.allclose(default, causal)  # block 4 lets a token see the rest of its block


def reference_bd3_allowed(length: int, block: int) -> torch.Tensor:
    """The paper's bd3 mask over [x_t ; x_0] written from indices, independently of `AttentionPattern.allows`."""
    allowed = torch.zeros(2 * length, 2 * length, dtype=torch.bool)
    for q in range(2 * length):
        for k in range(2 * length):
            q_clean, k_clean = q >= length, k >= length
            q_block, k_block = (q % length) // block, (k % length) // block
            diagonal = not q_clean and not k_clean and q_block == k_block
            offset_causal = not q_clean and k_clean and q_block > k_block
            clean_causal = q_clean and k_clean and q_block >= k_block
            allowed[q, k] = diagonal or offset_causal or clean_causal
    return allowed


def test_bd3_dense_mask_matches_the_papers_definition():
    length, block = 8, 2
    blocks = (torch.arange(length) // block).repeat(2)[None]
    noisy = (torch.arange(2 * length) < length)[None]
    layout = TokenLayout(blocks, noisy, torch.ones_like(noisy))
    mask = dense_attention_mask(AttentionPattern.bd3(block), layout, layout)[0, 0]
    assert torch.equal(mask, reference_bd3_allowed(length, block))


def test_bd3_noisy_block_equals_plain_forward_over_clean_prefix_and_that_block():
    block, length = 4, 12
    model = tiny_dlm(block_size=block)
    x0 = torch.randint(6, 96, (2, length))
    xt = x0.clone()
    xt[torch.rand(xt.shape) < 0.5] = model.config.mask_token_id
    with torch.no_grad():
        noisy_logits = model(torch.cat([xt, x0], 1), attention_pattern=AttentionPattern.bd3(block)).logits
        assert noisy_logits.shape == (2, length, 96)
        for k in range(length // block):
            start, end = k * block, (k + 1) * block
            plain = model(torch.cat([x0[:, :start], xt[:, start:end]], 1),
                          attention_pattern=AttentionPattern.block_causal(block)).logits
            torch.testing.assert_close(noisy_logits[:, start:end], plain[:, start:end], rtol=1e-5, atol=1e-5)


def test_bd3_clean_half_ignores_the_noisy_half():
    block, length = 4, 12
    model = tiny_dlm(block_size=block)
    x0 = torch.randint(6, 96, (1, length))
    pattern = AttentionPattern.bd3(block)
    with torch.no_grad():
        a = model.model(torch.cat([torch.randint(6, 96, (1, length)), x0], 1), attention_pattern=pattern)
        b = model.model(torch.cat([torch.randint(6, 96, (1, length)), x0], 1), attention_pattern=pattern)
        clean_alone = model.model(x0, attention_pattern=AttentionPattern.block_causal(block))
    torch.testing.assert_close(a.last_hidden_state[:, length:], b.last_hidden_state[:, length:])
    torch.testing.assert_close(a.last_hidden_state[:, length:], clean_alone.last_hidden_state, rtol=1e-5, atol=1e-5)


def test_bd3_honours_left_padding_with_a_half_length_mask():
    block = 4
    model = tiny_dlm(block_size=block)
    x0 = torch.randint(6, 96, (1, 8))
    xt = x0.clone()
    xt[:, 5:] = model.config.mask_token_id
    pad = torch.zeros(1, 4, dtype=torch.long)
    padded = torch.cat([pad, xt, pad, x0], 1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 8)], 1).long()
    with torch.no_grad():
        alone = model(torch.cat([xt, x0], 1), attention_pattern=AttentionPattern.bd3(block)).logits
        got = model(padded, attention_mask=mask, attention_pattern=AttentionPattern.bd3(block)).logits
    torch.testing.assert_close(got[:, 4:], alone, rtol=1e-5, atol=1e-5)


def test_noisy_context_is_block_causal_and_bidirectional_sees_the_future():
    model = tiny_dlm(block_size=4)
    ids = torch.randint(6, 96, (1, 12))
    changed_tail = ids.clone()
    changed_tail[:, -1] = (changed_tail[:, -1] + 1 - 6) % 90 + 6
    with torch.no_grad():
        noisy_context = model(ids, attention_pattern=AttentionPattern.noisy_context(4)).logits
        block_causal = model(ids, attention_pattern=AttentionPattern.block_causal(4)).logits
        bidi = model(ids, attention_pattern=AttentionPattern.bidirectional()).logits
        bidi_changed = model(changed_tail, attention_pattern=AttentionPattern.bidirectional()).logits
        causal_changed = model(changed_tail, attention_pattern=AttentionPattern.block_causal(4)).logits
    torch.testing.assert_close(noisy_context, block_causal)
    assert not torch.allclose(bidi[:, 0], bidi_changed[:, 0])  # the first token sees the last one
    torch.testing.assert_close(block_causal[:, :8], causal_changed[:, :8])  # earlier blocks do not


@pytest.mark.parametrize("pattern", [AttentionPattern.block_causal(1), AttentionPattern.block_causal(4),
                                     AttentionPattern.bd3(4), AttentionPattern.bidirectional(),
                                     AttentionPattern.noisy_context(4)], ids=lambda p: f"{p.kind}{p.block_size}")
def test_padding_tokens_are_never_attended(pattern):
    model = tiny_dlm(block_size=4)
    ids, mask = left_padded_batch([7, 12], vocab=96)
    if pattern.doubles_sequence:  # [x_t ; x_0] with one padding mask for both halves
        ids = torch.cat([ids, ids], 1)
    other = ids.clone()
    other[mask.repeat(1, ids.shape[1] // mask.shape[1]) == 0] = 77  # different content in the padding slots
    with torch.no_grad():
        a = model(ids, attention_mask=mask, attention_pattern=pattern).logits
        b = model(other, attention_mask=mask, attention_pattern=pattern).logits
    keep = mask.bool()
    assert (~keep).any()
    torch.testing.assert_close(a[keep], b[keep])


PATTERNS = [AttentionPattern.block_causal(4), AttentionPattern.bd3(4), AttentionPattern.bidirectional(),
            AttentionPattern.noisy_context(4)]


@pytest.mark.parametrize("backend", ["eager", "flex_attention"])
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.kind)
def test_backends_agree_with_sdpa_on_cpu(backend, pattern):
    # flex_attention runs on the CPU for inference only (no backward there); the GPU run in test_gpu.py covers
    # compiled flex with gradients.
    model = tiny_dlm(block_size=4)
    ids, mask = left_padded_batch([16, 11], vocab=96)
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        reference = model(ids, attention_mask=mask, attention_pattern=pattern).logits
        model.set_attn_implementation(backend)
        assert model.config._attn_implementation == backend
        got = model(ids, attention_mask=mask, attention_pattern=pattern).logits
    keep = mask[:, : reference.shape[1]].bool()
    torch.testing.assert_close(got[keep], reference[keep], rtol=1e-5, atol=1e-5)


def test_cached_prefix_then_block_equals_one_forward():
    # Exact when every row's cached prefix ends on one of its blocks' boundaries (row 1: 4 real tokens cached).
    model = tiny_dlm(block_size=4)
    ids, mask = left_padded_batch([12, 8], vocab=96)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = DynamicCache(config=model.config)
        model(ids[:, :8], attention_mask=mask[:, :8], past_key_values=cache, use_cache=True)
        tail = model(ids[:, 8:], attention_mask=mask, past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(tail, full[:, 8:], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------------


def test_sequence_longer_than_the_model_positions_is_refused():
    model = tiny_dlm()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.randint(6, 96, (1, 129)))


@pytest.mark.parametrize("shape", [(2, 11), (1, 12), (2, 12, 1)])
def test_attention_mask_of_the_wrong_shape_is_refused(shape):
    model = tiny_dlm()
    with pytest.raises(ValueError, match="attention_mask must be a 2D padding mask of shape"):
        model(torch.randint(6, 96, (2, 12)), attention_mask=torch.ones(shape, dtype=torch.long))


def test_bd3_needs_an_even_length_and_no_cache():
    model = tiny_dlm()
    with pytest.raises(ValueError, match="even length"):
        model(torch.randint(6, 96, (1, 7)), attention_pattern=AttentionPattern.bd3(4))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_block_size_below_one_is_refused(bad):
    with pytest.raises(ValueError, match="block_size must be an integer >= 1"):
        EfficientDlmConfig(block_size=bad)
    with pytest.raises(ValueError, match="block_size must be an integer >= 1"):
        AttentionPattern.block_causal(bad)


def test_unknown_pattern_and_wrong_pattern_type_are_refused():
    with pytest.raises(ValueError, match="attention_pattern kind must be one of"):
        AttentionPattern("causal", 1)
    with pytest.raises(ValueError, match="attention_pattern must be an AttentionPattern"):
        tiny_dlm()(torch.randint(6, 96, (1, 4)), attention_pattern="bd3")


def test_config_refuses_a_mask_token_equal_to_eos_or_pad_or_outside_the_vocabulary():
    with pytest.raises(ValueError, match="must differ from eos_token_id"):
        EfficientDlmConfig(vocab_size=10, mask_token_id=2, eos_token_id=[7, 2])
    with pytest.raises(ValueError, match="must differ from pad_token_id"):
        EfficientDlmConfig(vocab_size=10, mask_token_id=0, pad_token_id=0, eos_token_id=2)
    with pytest.raises(ValueError, match=r"mask_token_id must be a token id in \[0, vocab_size=10\)"):
        EfficientDlmConfig(vocab_size=10, mask_token_id=10)

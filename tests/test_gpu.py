"""CUDA-only checks (run on a GPU machine with `make test-gpu` or `pytest -m gpu`): compiled flex_attention against
SDPA for every pattern, forward and backward, a converted Qwen3-0.6B-shaped model against its AR parent, and the
static CUDA-graph decoding path (with the Triton kernels and compiled layers) against the eager reference."""

import time

import pytest
import torch
from conftest import left_padded_batch

from efficient_dlm import AttentionPattern, EfficientDlmConfig, EfficientDlmForMaskedDiffusion

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (flex_attention compiles for GPU)"),
]

PATTERNS = [AttentionPattern.block_causal(1), AttentionPattern.block_causal(32), AttentionPattern.bd3(32),
            AttentionPattern.bidirectional(), AttentionPattern.noisy_context(32)]


def relative_error(got, expected):
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: f"{p.kind}{p.block_size}")
def test_compiled_flex_matches_sdpa_forward_and_backward(pattern, dtype):
    torch.manual_seed(0)
    config = EfficientDlmConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=32, qk_norm=True, block_size=32, mask_token_id=5, eos_token_id=2,
        pad_token_id=0, max_position_embeddings=1024,
    )
    model = EfficientDlmForMaskedDiffusion(config).to("cuda", dtype)
    ids, mask = left_padded_batch([256, 200, 131], vocab=512)
    ids, mask = ids.cuda(), mask.cuda()
    if pattern.doubles_sequence:
        ids = torch.cat([ids, ids], 1)
    results = {}
    for backend in ("sdpa", "flex_attention"):
        model.set_attn_implementation(backend)
        assert model.config._attn_implementation == backend
        model.zero_grad()
        logits = model(ids, attention_mask=mask, attention_pattern=pattern).logits
        real = mask.bool()
        logits[real].float().logsumexp(-1).mean().backward()
        results[backend] = (logits[real].detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    forward_error = relative_error(results["flex_attention"][0], results["sdpa"][0])
    grad_error = relative_error(results["flex_attention"][1], results["sdpa"][1])
    print(f"\n{pattern.kind}({pattern.block_size}) {dtype}: forward rel err {forward_error:.2e}, "
          f"q_proj grad rel err {grad_error:.2e}")
    assert forward_error < tolerance and grad_error < tolerance * 10


def qwen3_0_6b_config(**overrides):
    from transformers import Qwen3Config

    shape = dict(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, eos_token_id=151645,
        pad_token_id=151643, bos_token_id=151643,
    )
    return Qwen3Config(**{**shape, **overrides})


def test_converted_qwen3_0_6b_shape_matches_its_parent_and_times_a_block_forward():
    from transformers import Qwen3ForCausalLM

    from efficient_dlm.conversion import dlm_from_ar_model

    torch.manual_seed(0)
    parent = Qwen3ForCausalLM(qwen3_0_6b_config()).to("cuda", torch.bfloat16).eval()
    dlm = dlm_from_ar_model(parent, block_size=1, shift_logits=True, mask_token_id=151662).to("cuda")
    ids, mask = left_padded_batch([512, 300], vocab=151936)
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad():
        expected = parent(ids, attention_mask=mask).logits
        got = dlm(ids, attention_mask=mask).logits
    real = mask.bool()
    error = relative_error(got[real], expected[real])
    agreement = (got[real].argmax(-1) == expected[real].argmax(-1)).float().mean().item()
    print(f"\nQwen3-0.6B shape, bf16, block 1 + shift vs parent: logits rel err {error:.2e}, argmax agreement "
          f"{agreement:.4f}")
    assert error < 2e-2 and agreement > 0.98

    # A block-32 forward of one 32-token block after a 256-token prompt, as decoding will do it (uncached here).
    dlm.config.block_size = 32
    block = torch.randint(0, 151936, (1, 288), device="cuda")
    with torch.no_grad():
        for _ in range(3):
            dlm(block)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(10):
            dlm(block)
        torch.cuda.synchronize()
    print(f"eager forward of 288 tokens, block_causal(32), bf16: {(time.perf_counter() - started) / 10 * 1e3:.1f} ms")


@pytest.mark.parametrize("options", [{"kernels": "none"}, {"kernels": "all"}, {"compile": True, "kernels": "all"}],
                         ids=["graphs", "graphs+kernels", "graphs+compile+kernels"])
@pytest.mark.parametrize("shift_logits", [False, True])
def test_cuda_graph_static_path_matches_the_eager_reference(shift_logits, options):
    """fp32: static cache + CUDA graphs (+ Triton kernels, + compiled layers) give the eager tokens, single and batched
    with ragged left padding; a second call replays the kept graphs (no capture) and gives the same tokens."""
    from transformers import Qwen3ForCausalLM

    from efficient_dlm.conversion import dlm_from_ar_model
    from efficient_dlm.generation_efficient_dlm import _STATIC_STATES

    torch.manual_seed(0)
    parent = Qwen3ForCausalLM(qwen3_0_6b_config(num_hidden_layers=4)).to("cuda", torch.float32).eval()
    dlm = dlm_from_ar_model(parent, block_size=32, shift_logits=shift_logits, mask_token_id=151662).to("cuda")
    for lengths in ([40], [40, 77, 13, 64]):
        ids, mask = left_padded_batch(lengths, vocab=151936, seed=len(lengths))
        ids, mask = ids.cuda(), mask.cuda()
        kwargs = dict(attention_mask=mask, max_new_tokens=96, threshold=0.05, eos_token_id=[],
                      return_dict_in_generate=True)
        eager = dlm.generate(ids, cache_implementation="dynamic", **kwargs)
        graphed = dlm.generate(ids, cache_implementation="static", **options, **kwargs)
        assert torch.equal(eager.sequences, graphed.sequences), lengths
        assert eager.nfe == graphed.nfe
        assert "+graphs" in graphed.decode_path
        assert ("+kernels" in graphed.decode_path) == (options["kernels"] == "all")
        graphs = {id(g) for state in _STATIC_STATES[dlm].values() for g, _ in state.graphs.values()}
        again = dlm.generate(ids, cache_implementation="static", **options, **kwargs)
        assert torch.equal(again.sequences, eager.sequences)
        assert {id(g) for state in _STATIC_STATES[dlm].values() for g, _ in state.graphs.values()} == graphs
        print(f"\nshift={shift_logits} batch {len(lengths)}: NFE {eager.nfe}, tokens per forward "
              f"{eager.tokens_per_forward:.2f}, {graphed.decode_path} equal to eager")

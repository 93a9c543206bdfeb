"""Equivalence tests for the Triton kernels in `efficient_dlm/kernels_efficient_dlm.py` against their torch references.

Where there is no CUDA device, the kernels run through triton's interpreter on the CPU (`TRITON_INTERPRET=1`, set
below before triton is imported): slow, so the shapes stay small (B <= 2, T <= 70, V <= 4100) and the larger cases
are marked slow. On a CUDA machine the same tests run the compiled kernels, and the large cases are not slow there.

Conventions (METHOD.md): fresh random inputs per case (seeded from the case's parameters), outputs and unused cache
slots poisoned with NaN before each run, errors measured as ||out - ref|| / ||ref|| against a float64 reference.
"""

import logging
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

from efficient_dlm import kernels_efficient_dlm as K

INTERPRETED = K.triton_interpreting()
DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"
RUNNABLE = K.HAS_TRITON and (INTERPRETED or DEVICE == "cuda")
if not K.HAS_TRITON:
    _WHY = "triton is not installed (pip install the `triton` extra)"
else:
    _WHY = ("no CUDA device, and triton was imported without TRITON_INTERPRET=1 (set it in the environment, or "
            "before anything imports triton)")
needs_triton = pytest.mark.skipif(not RUNNABLE, reason=_WHY)
# Large shapes: seconds each in the interpreter (slow there), milliseconds on a GPU (run by default there). It must be
# a mark on both sides: it is used as a decorator and as `pytest.param(marks=...)`; an empty tuple (as it once was on
# CUDA) is not callable, so the module failed to collect exactly where CUDA is present. skipif(False) marks nothing.
slow_if_interpreted = pytest.mark.slow if DEVICE == "cpu" else pytest.mark.skipif(False, reason="fast on a GPU")

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
GROUPS = (1, 2, 4, 8)
BLOCKS = (1, 4, 32, 64)


def generator(*key) -> torch.Generator:
    """A generator seeded from the case's parameters: every case draws its own inputs, reproducibly."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def randn(shape, gen, dtype, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm()).item()


def assert_matches(out, ref, dtype):
    """Finite everywhere (every element written), close overall and in every query row."""
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    tol = TOL[dtype]
    err = relative_error(out, ref)
    assert err < tol, f"relative error {err:.3g} >= {tol}"
    rows = ((out.double().cpu() - ref.double().cpu()).norm(dim=-1) / ref.double().cpu().norm(dim=-1).clamp_min(1e-6))
    assert rows.max().item() < 5 * tol, f"worst query row relative error {rows.max().item():.3g}"


# ----------------------------------------------------------------------------------------------------------------------
# Block attention
# ----------------------------------------------------------------------------------------------------------------------


def make_attention_case(*, dtype, batch, kv_heads, group, n, head_dim, cache_len, capacity=None, key):
    """Random q, cache (filled up to cache_len), block K/V, and ragged left padding (row 0 unpadded, the last row
    padded over at least half the cache)."""
    gen = generator(*key)
    heads = kv_heads * group
    capacity = capacity if capacity is not None else cache_len + n + 3
    case = {
        "q": randn((batch, heads, n, head_dim), gen, dtype),
        "k_cache": randn((batch, kv_heads, capacity, head_dim), gen, dtype),
        "v_cache": randn((batch, kv_heads, capacity, head_dim), gen, dtype),
        "k_blk": randn((batch, kv_heads, n, head_dim), gen, dtype),
        "v_blk": randn((batch, kv_heads, n, head_dim), gen, dtype),
    }
    pad = torch.randint(0, cache_len + 1, (batch,), generator=gen)
    pad[0] = 0
    if batch > 1:
        pad[-1] = torch.randint(cache_len // 2, cache_len + 1, (1,), generator=gen)
    case["pad_len"] = pad.to(DEVICE)
    return case


def poison_cache(case, cache_len, *, padding: bool):
    """NaN into the unfilled slots [cache_len, T_cap) and (optionally) into each row's padding slots: a kernel that
    reads any of them, or writes the wrong slots, shows. Returns the poisoned copies for the kernel."""
    k_cache, v_cache = case["k_cache"].clone(), case["v_cache"].clone()
    for cache in (k_cache, v_cache):
        cache[:, :, cache_len:] = float("nan")
        if padding:
            for row, pad in enumerate(case["pad_len"].tolist()):
                cache[row, :, :pad] = float("nan")
    return k_cache, v_cache


def reference64(case, cache_len, **kwargs):
    """The float64 reference on the CPU (from the clean, unpoisoned cache)."""
    kw = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    return K.block_attention_reference(
        case["q"].double().cpu(), case["k_cache"].double().cpu(), case["v_cache"].double().cpu(),
        case["k_blk"].double().cpu(), case["v_blk"].double().cpu(), cache_len, **kw,
    )


def check_cache_write(k_after, v_after, k_before, v_before, case, cache_len, n, written: bool):
    """Exactly the block's K/V in [cache_len, cache_len + n) when written, every other slot (NaN ones too) unchanged."""
    for after, before, block in ((k_after, k_before, case["k_blk"]), (v_after, v_before, case["v_blk"])):
        expected = before.clone()
        if written:
            expected[:, :, cache_len:cache_len + n] = block
        torch.testing.assert_close(after, expected, rtol=0, atol=0, equal_nan=True)


def run_attention_case(dtype, group, n, head_dim, *, batch=2, kv_heads=1, cache_len=37, write_cache=True,
                       num_splits=None, key_extra=()):
    key = ("attn", str(dtype), group, n, head_dim, batch, kv_heads, cache_len, write_cache, num_splits, *key_extra)
    case = make_attention_case(dtype=dtype, batch=batch, kv_heads=kv_heads, group=group, n=n, head_dim=head_dim,
                               cache_len=cache_len, key=key)
    k_cache, v_cache = poison_cache(case, cache_len, padding=True)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    out = torch.full_like(case["q"], float("nan"))
    result = K.block_attention_triton(case["q"], k_cache, v_cache, case["k_blk"], case["v_blk"], cache_len,
                                      pad_len=case["pad_len"], write_cache=write_cache, out=out,
                                      num_splits=num_splits)
    assert result is out
    assert_matches(out, reference64(case, cache_len, pad_len=case["pad_len"]), dtype)
    check_cache_write(k_cache, v_cache, k_before, v_before, case, cache_len, n, write_cache)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", BLOCKS)
@pytest.mark.parametrize("group", GROUPS)
def test_block_attention_matrix(dtype, group, n):
    """GQA 1/2/4/8 x block 1/4/32/64 x fp32/bf16, ragged left padding; head dim alternates 64/128 over the matrix
    (both head dims meet every ratio and every block size) and so does the cache write."""
    index = GROUPS.index(group) + BLOCKS.index(n)
    run_attention_case(dtype, group, n, head_dim=(64, 128)[index % 2], write_cache=bool(index // 2 % 2 == 0))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_block_attention_head_dims_two_kv_heads(dtype, head_dim):
    """Both head dims with two KV heads per row (the KV-head index in the grid) and a cache longer than one tile."""
    run_attention_case(dtype, group=2, n=4, head_dim=head_dim, kv_heads=2, cache_len=70)


@needs_triton
@pytest.mark.parametrize("clean", [0, 32])
def test_block_attention_smollm2_heads(clean):
    """SmolLM2's layout: 9 query heads over 3 KV heads (a group of 3, not a power of two, so the packed rows of a
    tile straddle heads), head dim 64, a 32-token block (64 with the previous block carried in front)."""
    n = 32 + clean
    key = ("smollm2", clean)
    case = make_attention_case(dtype=torch.float32, batch=2, kv_heads=3, group=3, n=n, head_dim=64, cache_len=45,
                               key=key)
    k_cache, v_cache = poison_cache(case, 45, padding=True)
    out = K.block_attention_triton(case["q"], k_cache, v_cache, case["k_blk"], case["v_blk"], 45,
                                   pad_len=case["pad_len"], clean_prefix_len=clean)
    assert_matches(out, reference64(case, 45, pad_len=case["pad_len"], clean_prefix_len=clean), torch.float32)


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 2, 3, 5])
def test_block_attention_cache_splits(num_splits):
    """Flash-decoding splits merge to the same result, including splits left empty by the padding or the split
    rounding (5 splits of 70 keys in 64-key tiles: most hold nothing) and splits not a power of two."""
    run_attention_case(torch.float32, group=4, n=4, head_dim=64, cache_len=70, num_splits=num_splits)


@needs_triton
@pytest.mark.parametrize("write_cache", [False, True])
def test_block_attention_empty_cache(write_cache):
    """cache_len = 0: the block attends only to itself (the first block after an empty prompt)."""
    run_attention_case(torch.float32, group=2, n=4, head_dim=64, cache_len=0, write_cache=write_cache,
                       num_splits=2)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_block_attention_key_mask(dtype):
    """A [B, T] key mask with arbitrary holes (not only left padding), as bool and as 0/1 integers; hidden slots hold
    NaN for the kernel."""
    cache_len, n = 45, 4
    case = make_attention_case(dtype=dtype, batch=2, kv_heads=2, group=2, n=n, head_dim=64, cache_len=cache_len,
                               key=("mask", str(dtype)))
    gen = generator("mask-bits", str(dtype))
    key_mask = torch.rand(2, cache_len + n, generator=gen) < 0.7  # wider than the cache, as an attention_mask is
    key_mask[1, :] = False  # a row with no visible cache key: it attends to its block only
    key_mask = key_mask.to(DEVICE)
    ref = reference64(case, cache_len, key_mask=key_mask)
    for mask in (key_mask, key_mask.long()):
        k_cache, v_cache = poison_cache(case, cache_len, padding=False)
        hidden = ~key_mask[:, :cache_len]
        k_cache[:, :, :cache_len][hidden[:, None, :].expand(-1, 2, -1)] = float("nan")
        v_cache[:, :, :cache_len][hidden[:, None, :].expand(-1, 2, -1)] = float("nan")
        out = torch.full_like(case["q"], float("nan"))
        K.block_attention_triton(case["q"], k_cache, v_cache, case["k_blk"], case["v_blk"], cache_len,
                                 key_mask=mask, out=out, num_splits=2)
        assert_matches(out, ref, dtype)


@needs_triton
def test_block_attention_pad_len_equals_key_mask():
    """pad_len and the equivalent left-padding key mask give the same output."""
    cache_len = 40
    case = make_attention_case(dtype=torch.float32, batch=2, kv_heads=1, group=4, n=4, head_dim=64,
                               cache_len=cache_len, key=("pad-vs-mask",))
    key_mask = torch.arange(cache_len, device=DEVICE)[None, :] >= case["pad_len"][:, None]
    args = (case["q"], case["k_cache"], case["v_cache"], case["k_blk"], case["v_blk"], cache_len)
    by_pad = K.block_attention_triton(*args, pad_len=case["pad_len"])
    by_mask = K.block_attention_triton(*args, key_mask=key_mask)
    torch.testing.assert_close(by_pad, by_mask, rtol=1e-6, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_block_attention_tensor_cache_len(dtype):
    """cache_len as a one-element device tensor (no host read: CUDA-graph friendly), with the cache write."""
    cache_len, n = 33, 32
    case = make_attention_case(dtype=dtype, batch=2, kv_heads=2, group=2, n=n, head_dim=64, cache_len=cache_len,
                               capacity=cache_len + n + 5, key=("tensor-len", str(dtype)))
    k_cache, v_cache = poison_cache(case, cache_len, padding=True)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    out = torch.full_like(case["q"], float("nan"))
    length = torch.tensor([cache_len], device=DEVICE)
    K.block_attention_triton(case["q"], k_cache, v_cache, case["k_blk"], case["v_blk"], length,
                             pad_len=case["pad_len"], write_cache=True, out=out)
    assert_matches(out, reference64(case, cache_len, pad_len=case["pad_len"]), dtype)
    check_cache_write(k_cache, v_cache, k_before, v_before, case, cache_len, n, True)
    # The reference takes the tensor too (masking the unfilled slots instead of slicing): same answer.
    ref_tensor = reference64(case, torch.tensor([cache_len]), pad_len=case["pad_len"])
    assert_matches(out, ref_tensor, dtype)


@needs_triton
@pytest.mark.parametrize("clean", [1, 4, 8])
def test_block_attention_clean_prefix(clean):
    """clean_prefix_len P: a finished block carried in front of the masked one; its queries must not see the masked
    keys (block-causal), the masked queries see everything."""
    cache_len, n = 20, 12
    case = make_attention_case(dtype=torch.float32, batch=2, kv_heads=1, group=2, n=n, head_dim=64,
                               cache_len=cache_len, key=("clean", clean))
    k_cache, v_cache = poison_cache(case, cache_len, padding=True)
    out = torch.full_like(case["q"], float("nan"))
    K.block_attention_triton(case["q"], k_cache, v_cache, case["k_blk"], case["v_blk"], cache_len,
                             pad_len=case["pad_len"], clean_prefix_len=clean, out=out)
    assert_matches(out, reference64(case, cache_len, pad_len=case["pad_len"], clean_prefix_len=clean),
                   torch.float32)
    # The clean rows equal plain attention over cache + clean tokens only (an independent statement of the rule).
    k_clean = case["k_blk"][:, :, :clean]
    v_clean = case["v_blk"][:, :, :clean]
    q_clean = case["q"][:, :, :clean]
    sub = K.block_attention_reference(q_clean.double().cpu(), case["k_cache"].double().cpu(),
                                      case["v_cache"].double().cpu(), k_clean.double().cpu(),
                                      v_clean.double().cpu(), cache_len, pad_len=case["pad_len"].cpu())
    assert relative_error(out[:, :, :clean], sub) < 1e-5


@needs_triton
def test_block_attention_strided_views():
    """The layouts a model hands over: q a transpose of [B, n, H, D], the caches one layer of a
    [layers, B, H_kv, T_cap, D] buffer, the output written into a transposed [B, n, H, D] buffer, a custom scale."""
    batch, kv_heads, group, n, head_dim, cache_len = 2, 2, 2, 4, 64, 30
    gen = generator("strided")
    heads, capacity = kv_heads * group, 40
    q = randn((batch, n, heads, head_dim), gen, torch.float32).transpose(1, 2)
    k_all = randn((3, batch, kv_heads, capacity, head_dim), gen, torch.float32)
    v_all = randn((3, batch, kv_heads, capacity, head_dim), gen, torch.float32)
    k_blk = randn((batch, n, kv_heads, head_dim), gen, torch.float32).transpose(1, 2)
    v_blk = randn((batch, n, kv_heads, head_dim), gen, torch.float32).transpose(1, 2)
    pad = torch.tensor([0, 7], device=DEVICE)
    ref = K.block_attention_reference(q.double().cpu(), k_all[1].double().cpu(), v_all[1].double().cpu(),
                                      k_blk.double().cpu(), v_blk.double().cpu(), cache_len, pad_len=pad.cpu(),
                                      scale=0.2)
    untouched = (k_all[[0, 2]].clone(), v_all[[0, 2]].clone())
    out_buffer = torch.full((batch, n, heads, head_dim), float("nan"), device=DEVICE)
    K.block_attention_triton(q, k_all[1], v_all[1], k_blk, v_blk, cache_len, pad_len=pad, scale=0.2,
                             write_cache=True, out=out_buffer.transpose(1, 2))
    assert_matches(out_buffer.transpose(1, 2), ref, torch.float32)
    torch.testing.assert_close(k_all[1, :, :, cache_len:cache_len + n], k_blk, rtol=0, atol=0)
    torch.testing.assert_close(v_all[1, :, :, cache_len:cache_len + n], v_blk, rtol=0, atol=0)
    torch.testing.assert_close((k_all[[0, 2]], v_all[[0, 2]]), untouched, rtol=0, atol=0)  # other layers


@needs_triton
def test_block_attention_head_dim_not_power_of_two():
    """head_dim 80 (padded to a 128 tile inside the kernel, masked)."""
    run_attention_case(torch.float32, group=2, n=4, head_dim=80, cache_len=20)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("group,n,head_dim", [pytest.param(8, 64, 128, marks=slow_if_interpreted),
                                              pytest.param(4, 32, 128, marks=slow_if_interpreted)])
def test_block_attention_large(dtype, group, n, head_dim):
    """Qwen3-8B-like: several KV heads, a cache of several hundred tokens, batch 3, auto splits."""
    run_attention_case(dtype, group, n, head_dim, batch=3, kv_heads=4, cache_len=300)


def test_block_attention_reference_matches_explicit_softmax():
    """The reference itself, against a float64 softmax written out per row (no SDPA, no concatenation)."""
    gen = generator("explicit")
    batch, kv_heads, group, n, head_dim, cache_len = 2, 2, 2, 3, 8, 6
    q = torch.randn(batch, kv_heads * group, n, head_dim, generator=gen, dtype=torch.float64)
    k_cache = torch.randn(batch, kv_heads, 10, head_dim, generator=gen, dtype=torch.float64)
    v_cache = torch.randn(batch, kv_heads, 10, head_dim, generator=gen, dtype=torch.float64)
    k_blk = torch.randn(batch, kv_heads, n, head_dim, generator=gen, dtype=torch.float64)
    v_blk = torch.randn(batch, kv_heads, n, head_dim, generator=gen, dtype=torch.float64)
    pad = torch.tensor([0, 4])
    out = K.block_attention_reference(q, k_cache, v_cache, k_blk, v_blk, cache_len, pad_len=pad,
                                      clean_prefix_len=1)
    for b in range(batch):
        for h in range(kv_heads * group):
            kvh = h // group
            for i in range(n):
                keys = [k_cache[b, kvh, t] for t in range(pad[b], cache_len)]
                values = [v_cache[b, kvh, t] for t in range(pad[b], cache_len)]
                visible = range(n) if i >= 1 else range(1)
                keys += [k_blk[b, kvh, j] for j in visible]
                values += [v_blk[b, kvh, j] for j in visible]
                scores = torch.stack([q[b, h, i] @ k for k in keys]) / head_dim ** 0.5
                expected = scores.softmax(0) @ torch.stack(values)
                torch.testing.assert_close(out[b, h, i], expected, rtol=1e-12, atol=1e-12)


def test_block_attention_reference_writes_cache():
    gen = generator("ref-write")
    q = torch.randn(1, 2, 3, 8, generator=gen)
    k_cache, v_cache = torch.randn(1, 1, 9, 8, generator=gen), torch.randn(1, 1, 9, 8, generator=gen)
    k_blk, v_blk = torch.randn(1, 1, 3, 8, generator=gen), torch.randn(1, 1, 3, 8, generator=gen)
    k_before = k_cache.clone()
    K.block_attention_reference(q, k_cache, v_cache, k_blk, v_blk, torch.tensor(5), write_cache=True)
    expected = k_before.clone()
    expected[:, :, 5:8] = k_blk
    torch.testing.assert_close(k_cache, expected, rtol=0, atol=0)
    torch.testing.assert_close(v_cache[:, :, 5:8], v_blk, rtol=0, atol=0)


def test_block_attention_rejects_bad_arguments():
    q = torch.randn(1, 3, 2, 8)
    cache = torch.randn(1, 2, 6, 8)
    blk = torch.randn(1, 2, 2, 8)
    with pytest.raises(ValueError, match="multiple"):
        K.block_attention_reference(q, cache, cache, blk, blk, 2)
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="capacity"):
        K.block_attention_reference(q, cache, cache, blk, blk, 5, write_cache=True)
    with pytest.raises(ValueError, match="either"):
        K.block_attention_reference(q, cache, cache, blk, blk, 2, pad_len=torch.zeros(1, dtype=torch.long),
                                    key_mask=torch.ones(1, 2, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------------------------------
# Confidence / argmax
# ----------------------------------------------------------------------------------------------------------------------


def check_confidence(logits, exclude, **kwargs):
    """Kernel vs the float64 reference on the same values: identical tokens, confidence within 1e-5 relative. The
    outputs are poisoned buffers (-1, NaN): an unwritten row shows."""
    lead = logits.shape[:-1]
    out = (torch.full(lead, -1, dtype=torch.int64, device=DEVICE),
           torch.full(lead, float("nan"), dtype=torch.float32, device=DEVICE))
    tokens, confidence = K.confidence_argmax_triton(logits, exclude, out=out, **kwargs)
    assert tokens.data_ptr() == out[0].data_ptr() and confidence.data_ptr() == out[1].data_ptr()
    ref_tokens, ref_confidence = K.confidence_argmax_reference(logits.double().cpu(), exclude)
    assert tokens.dtype == torch.int64 and confidence.dtype == torch.float32
    assert tokens.shape == logits.shape[:-1] and confidence.shape == logits.shape[:-1]
    assert torch.equal(tokens.cpu(), ref_tokens)
    torch.testing.assert_close(confidence.double().cpu(), ref_confidence, rtol=1e-5, atol=0)
    return tokens, confidence


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("vocab,exclude", [(1, None), (100, None), (100, "max"), (1000, None), (1000, "max"),
                                           (1024, None), (1024, "max")])
@pytest.mark.parametrize("num_splits,block_v", [(None, None), (1, 128), (3, 128), (None, 128)])
def test_confidence_argmax_matrix(dtype, vocab, exclude, num_splits, block_v):
    """Random logits of several scales (peaked and flat rows); bf16 rounding makes ties common, which must resolve
    to the lowest index. `exclude="max"`: the mask token is the row 0 argmax, so excluding it changes the answer.
    128-wide tiles put several tiles (and splits) in a row, as the real vocabulary does with 4096-wide ones; 1000 is
    not a multiple of the tile (a ragged end), 1024 is."""
    gen = generator("conf", str(dtype), vocab, exclude, num_splits, block_v)
    rows = 6
    scale = torch.tensor([0.1, 1.0, 3.0, 10.0, 30.0, 1.0])[:, None]
    logits = (torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE)
    exclude_id = None if exclude is None else int(logits[0].float().argmax())
    config = None if block_v is None else {"BLOCK_V": block_v}
    tokens, _ = check_confidence(logits, exclude_id, num_splits=num_splits, config=config)
    if exclude_id is not None:
        assert (tokens != exclude_id).all()


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 2, 4])
def test_confidence_argmax_ties_lowest_index(num_splits):
    """Equal maxima in one tile, in different tiles and in different splits: the lowest index wins (torch.argmax).
    128-wide tiles; with 2 splits the boundary is at 1536, with 4 at 768, 1536 and 2304."""
    vocab = 3000
    logits = torch.zeros(6, vocab)
    logits[0, [17, 18, 2500]] = 5.0  # same tile, then a later tile and split
    logits[1, [2999, 1024, 1500]] = 5.0  # declared out of order; 1024 starts a tile
    logits[2, :] = 1.0  # the whole row ties
    logits[3, [0, 2999]] = 2.0  # both ends
    logits[4, [7, 8]] = 3.0
    logits[4, 7] = float("-inf")  # a -inf entry (a banned token) is just never chosen
    logits[5, [1536, 1535, 2400]] = 6.0  # either side of a tile and split boundary
    tokens, confidence = check_confidence(logits.to(DEVICE), None, num_splits=num_splits, config={"BLOCK_V": 128})
    assert tokens.tolist() == [17, 1024, 0, 0, 8, 1535]
    assert confidence[2].item() == pytest.approx(1 / vocab, rel=1e-6)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_confidence_argmax_exclusion(dtype):
    """The excluded token can neither win (even when it is the unique maximum or tied lowest) nor carry mass."""
    vocab, mask_id = 3000, 1234
    logits = torch.zeros(3, vocab)
    logits[0, mask_id] = 100.0  # the mask token dominates: without it the row is flat
    logits[1, [mask_id, 2000]] = 4.0  # tied with a later token: the later one wins
    logits[2, [5, 2999]] = 1.0
    tokens, confidence = check_confidence(logits.to(dtype).to(DEVICE), mask_id, num_splits=2,
                                          config={"BLOCK_V": 256})
    assert tokens.tolist() == [0, 2000, 5]
    assert confidence[0].item() == pytest.approx(1 / (vocab - 1), rel=1e-5)


@needs_triton
def test_confidence_argmax_strided_3d():
    """[B, L, V] logits sliced along L (strided rows, read in place) keep their leading shape; 1-D and 4-D too."""
    gen = generator("conf-3d")
    logits = torch.randn(2, 7, 500, generator=gen).to(DEVICE)[:, 2:6]
    tokens, _ = check_confidence(logits, 3)
    assert tokens.shape == (2, 4)
    check_confidence(logits[0, 0], 3)  # one row, [V]
    check_confidence(logits.reshape(2, 2, 2, 500)[:, :, 1:], None)  # [2, 2, 1, V]
    empty_tokens, empty_conf = K.confidence_argmax_triton(logits[:, :0])
    assert empty_tokens.shape == (2, 0) and empty_conf.shape == (2, 0)


@needs_triton
@slow_if_interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_confidence_argmax_qwen_vocab(dtype):
    """The Qwen vocabulary (151,936), a block of rows, the mask token excluded, automatic splits."""
    gen = generator("conf-large", str(dtype))
    logits = (torch.randn(8, 151936, generator=gen) * 4).to(dtype).to(DEVICE)
    check_confidence(logits, 151669)


def test_confidence_argmax_reference_semantics():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 1.0, 9.0]])
    tokens, confidence = K.confidence_argmax_reference(logits, exclude_token_id=3)
    assert tokens.tolist() == [1, 0]
    expected = torch.tensor([[1.0, 3.0, 3.0]]).softmax(-1)[0, 1]
    torch.testing.assert_close(confidence[0], expected)


# ----------------------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------------------


def test_dispatch_falls_back_to_reference_with_one_log_line(caplog, monkeypatch):
    """CPU tensors (or no triton) take the reference path, logging the reason once, not per call."""
    monkeypatch.setattr(K, "_LOGGED_FALLBACKS", set())
    gen = generator("dispatch")
    logits = torch.randn(3, 50, generator=gen)
    q, cache, blk = torch.randn(1, 2, 3, 16), torch.randn(1, 1, 8, 16), torch.randn(1, 1, 3, 16)
    with caplog.at_level(logging.WARNING, logger=K.__name__):
        for _ in range(3):
            tokens, confidence = K.confidence_argmax(logits, 1)
            out = K.block_attention(q, cache, cache.clone(), blk, blk, 5)
    ref_tokens, ref_confidence = K.confidence_argmax_reference(logits, 1)
    assert torch.equal(tokens, ref_tokens) and torch.equal(confidence, ref_confidence)
    torch.testing.assert_close(out, K.block_attention_reference(q, cache, cache.clone(), blk, blk, 5))
    lines = [r for r in caplog.records if r.name == K.__name__]
    assert len(lines) == 1 and "reference" in lines[0].getMessage()


@needs_triton
def test_dispatch_can_force_triton():
    logits = torch.randn(2, 300, generator=generator("force")).to(DEVICE)
    tokens, _ = K.confidence_argmax(logits, use_triton=True)
    assert torch.equal(tokens.cpu(), logits.cpu().argmax(-1))


@pytest.mark.skipif(not (K.HAS_TRITON and torch.cuda.is_available() and DEVICE == "cuda"), reason="needs CUDA")
def test_cuda_graph_capture_with_device_cache_len():
    """Both kernels captured in a CUDA graph with cache_len on the device: replays follow the new length and write
    where it points."""
    dtype, batch, kv_heads, group, n, head_dim, capacity = torch.bfloat16, 2, 2, 4, 32, 128, 256
    case = make_attention_case(dtype=dtype, batch=batch, kv_heads=kv_heads, group=group, n=n, head_dim=head_dim,
                               cache_len=100, capacity=capacity, key=("graph",))
    length = torch.tensor([100], device="cuda")
    logits = torch.randn(batch * n, 5000, device="cuda", dtype=dtype)
    k_cache, v_cache = case["k_cache"], case["v_cache"]
    args = (case["q"], k_cache, v_cache, case["k_blk"], case["v_blk"], length)
    kwargs = {"pad_len": case["pad_len"], "write_cache": True}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compile) outside the capture
        K.block_attention_triton(*args, **kwargs)
        K.confidence_argmax_triton(logits, 7)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = K.block_attention_triton(*args, **kwargs)
        tokens, confidence = K.confidence_argmax_triton(logits, 7)
    for cache_len in (40, 150):
        length.fill_(cache_len)
        logits.normal_()
        k_before = k_cache.clone()
        graph.replay()
        torch.cuda.synchronize()
        ref = K.block_attention_reference(case["q"].double(), k_before.double(), v_cache.double(),
                                          case["k_blk"].double(), case["v_blk"].double(), cache_len,
                                          pad_len=case["pad_len"])
        assert_matches(out, ref, dtype)
        torch.testing.assert_close(k_cache[:, :, cache_len:cache_len + n], case["k_blk"], rtol=0, atol=0)
        ref_tokens, ref_confidence = K.confidence_argmax_reference(logits.double(), 7)
        assert torch.equal(tokens, ref_tokens)
        torch.testing.assert_close(confidence.double(), ref_confidence, rtol=1e-5, atol=0)

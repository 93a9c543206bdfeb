"""Triton kernels for block-diffusion decoding, each with a plain-torch reference.

Decoding a block is one forward of `n` query tokens (the block being denoised, 1..64 tokens) against a KV cache of
finished blocks. Two pieces of that step are worth a kernel:

1. `block_attention`: the block's queries attend to the filled part of the cache (minus each row's left padding) and
   bidirectionally to the block's own keys. No `[B, 1, n, T + n]` mask is built, the cache and the block are not
   concatenated, the GQA query heads that share a KV head are packed into one tile (K/V read once per KV head), and
   the block's K/V can be written into the cache in the same pass (`write_cache=True`).
2. `confidence_argmax`: per row of logits `[N, V]`, the argmax token and its softmax probability, in one pass over the
   vocabulary (running max, running sum of exp, running argmax) without materialising the softmax; optionally one
   token id (the mask token) is excluded from both.

Each has a reference (`*_reference`, plain torch, structured differently from the kernel: concatenation, a boolean
mask and SDPA; a float32 softmax), a Triton launcher (`*_triton`) and a dispatcher (the bare name) that uses Triton for
CUDA tensors when triton is installed and the reference otherwise, saying so once in the log.

This file also ships inside checkpoint folders as remote code, so it imports only torch, the standard library and,
optionally, triton (inside `try`, which transformers' remote-code import check skips).

On the CPU the Triton launchers run through triton's interpreter when `TRITON_INTERPRET=1` was set before triton was
first imported (torch._dynamo imports it early): slow, but it checks the kernels' logic without a GPU, which is what
the CI tests do. The interpreter's `tl.dot` mishandles bf16 (it multiplies the raw bits), so there the kernel upcasts
dot operands that are already rounded to the input dtype: the same numbers a GPU's bf16 tensor cores see.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

try:  # optional: everything below works without it, through the torch references
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = tl = InterpretedFunction = None
    HAS_TRITON = False

logger = logging.getLogger(__name__)

__all__ = [
    "HAS_TRITON",
    "block_attention",
    "block_attention_reference",
    "block_attention_triton",
    "confidence_argmax",
    "confidence_argmax_reference",
    "confidence_argmax_triton",
    "cached_block_attention",
    "triton_available_for",
    "triton_interpreting",
    "triton_usable",
]


# ----------------------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------------------

_LOGGED_FALLBACKS: set[str] = set()


def triton_available_for(tensor: torch.Tensor) -> bool:
    """True when the compiled Triton kernels can run on this tensor (triton installed, tensor on a CUDA device)."""
    return HAS_TRITON and tensor.is_cuda


def _use_triton(tensor: torch.Tensor, use_triton: bool | None, what: str) -> bool:
    if use_triton is not None:
        return use_triton
    return triton_usable(tensor.device, what)


def triton_usable(device: torch.device, what: str, *, allow_interpreter: bool = False) -> bool:
    """Whether the Triton kernels can run on `device` (compiled on CUDA; with `allow_interpreter`, also through
    triton's interpreter on the CPU). When not, says so once per reason and process, naming `what` falls back."""
    device = torch.device(device)
    if HAS_TRITON and (device.type == "cuda" or (allow_interpreter and triton_interpreting())):
        return True
    reason = "triton is not installed" if not HAS_TRITON else f"tensors are on {device.type}, not CUDA"
    if reason not in _LOGGED_FALLBACKS:  # one line per reason and process, not one per layer and step
        _LOGGED_FALLBACKS.add(reason)
        logger.warning("efficient_dlm kernels: %s; %s (and the other kernels) run the torch reference path",
                       reason, what)
    return False


def _for_device(kernel, device: torch.device):
    """The kernel, after checking it can run on this device: compiled for CUDA tensors, interpreted for CPU ones.

    `triton.jit` (triton's own `tl.zeros`, `tl.max`... too) picks compiled or interpreted once, when triton is
    imported, from `TRITON_INTERPRET`; CPU tensors need the interpreted kind."""
    if device.type == "cuda" or triton_interpreting():
        return kernel
    raise RuntimeError(
        f"the Triton kernels run on {device.type} tensors only through triton's interpreter: set TRITON_INTERPRET=1 "
        "before triton is first imported (or call the dispatcher, which uses the torch reference there)"
    )


def triton_interpreting() -> bool:
    """True when triton is installed and was imported in interpreter mode (`TRITON_INTERPRET=1`): the launchers then
    accept CPU tensors."""
    if not HAS_TRITON:
        return False
    # triton's own jitted helpers (tl.zeros, tl.max...) were decorated when triton was first imported, ours when this
    # module was: both must be the interpreted kind.
    return isinstance(tl.zeros, InterpretedFunction) and isinstance(_block_attention_kernel, InterpretedFunction)


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


_NUM_SMS: dict = {}


def _num_sms(device: torch.device) -> int:
    """Multiprocessors of the device (the grid should cover them); a nominal 132 (an H100) for the interpreter."""
    if device.type != "cuda":
        return 132
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


# ----------------------------------------------------------------------------------------------------------------------
# (a) Block attention over the KV cache + the block itself
# ----------------------------------------------------------------------------------------------------------------------


def _check_attention_args(q, k_cache, v_cache, k_blk, v_blk, cache_len, pad_len, key_mask, write_cache,
                          clean_prefix_len):
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.dim() != 4 or k_blk.dim() != 4 or v_blk.dim() != 4:
        raise ValueError("block_attention expects 4-D q [B, H, n, D], caches [B, H_kv, T_cap, D], "
                         "block K/V [B, H_kv, n, D]")
    batch, heads, n, head_dim = q.shape
    kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    if tuple(v_cache.shape) != tuple(k_cache.shape) or k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
        raise ValueError(f"cache shapes {tuple(k_cache.shape)} / {tuple(v_cache.shape)} do not fit q {tuple(q.shape)}")
    if tuple(k_blk.shape) != (batch, kv_heads, n, head_dim) or tuple(v_blk.shape) != tuple(k_blk.shape):
        raise ValueError(f"block K/V must be {(batch, kv_heads, n, head_dim)}, got {tuple(k_blk.shape)} / "
                         f"{tuple(v_blk.shape)}")
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
    if pad_len is not None and key_mask is not None:
        raise ValueError("give either pad_len or key_mask, not both")
    if pad_len is not None and tuple(pad_len.shape) != (batch,):
        raise ValueError(f"pad_len must be [batch={batch}], got {tuple(pad_len.shape)}")
    if key_mask is not None and (key_mask.dim() != 2 or key_mask.shape[0] != batch):
        raise ValueError(f"key_mask must be [batch={batch}, T >= cache_len], got {tuple(key_mask.shape)}")
    if not 0 <= clean_prefix_len <= n:
        raise ValueError(f"clean_prefix_len {clean_prefix_len} outside [0, n={n}]")
    if isinstance(cache_len, torch.Tensor):
        if cache_len.numel() != 1 or cache_len.dtype.is_floating_point:
            raise ValueError("a tensor cache_len must hold one integer")
    else:
        need = cache_len + (n if write_cache else 0)
        if cache_len < 0 or need > capacity:
            raise ValueError(f"cache_len {cache_len} (+ {n} written) does not fit the cache capacity {capacity}")
        if key_mask is not None and key_mask.shape[1] < cache_len:
            raise ValueError(f"key_mask covers {key_mask.shape[1]} keys, fewer than cache_len {cache_len}")


def block_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_blk: torch.Tensor,
    v_blk: torch.Tensor,
    cache_len: int | torch.Tensor,
    *,
    pad_len: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    write_cache: bool = False,
    scale: float | None = None,
    clean_prefix_len: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of a block of queries over `cache[:cache_len]` + the block, in plain torch (SDPA + a boolean mask).

    Args:
        q: `[B, H, n, D]` the block's queries (any strides).
        k_cache, v_cache: `[B, H_kv, T_cap, D]`; slots `[0, cache_len)` are filled. Row r's slots before
            `pad_len[r]` (or where `key_mask[r]` is False) are left padding and invisible.
        k_blk, v_blk: `[B, H_kv, n, D]` the block's own keys/values, seen by every query of the block (bidirectional).
        cache_len: filled slots, one for the batch (left padding aligns the rows). A Python int, or a one-element
            integer tensor on the device (nothing then reads it on the host: CUDA-graph friendly).
        pad_len: `[B]` integer, optional: row r's keys at cache positions `< pad_len[r]` are invisible.
        key_mask: `[B, T]` bool or 0/1 integers, `T >= cache_len` (`T_cap` for a tensor `cache_len`), optional:
            False = invisible. Only cache keys are masked; the block's keys are always visible.
        write_cache: also write `k_blk`/`v_blk` into cache slots `[cache_len, cache_len + n)` (in place).
        scale: softmax scale, default `1/sqrt(D)`.
        clean_prefix_len: P, default 0. The block's first P tokens are a finished block carried in front of the
            masked one (block-causal): block query i sees block key j iff `i >= P or j < P`.
        out: optional `[B, H, n, D]` output buffer (any strides).

    Returns:
        `[B, H, n, D]` in q's dtype.
    """
    _check_attention_args(q, k_cache, v_cache, k_blk, v_blk, cache_len, pad_len, key_mask, write_cache,
                          clean_prefix_len)
    batch, _, n, _head_dim = q.shape
    device = q.device
    # A tensor cache_len stays on the device: attend over every slot and mask the unfilled ones (no host sync).
    if isinstance(cache_len, torch.Tensor):
        cache_len = cache_len.to(device).reshape(())
    width = k_cache.shape[2] if isinstance(cache_len, torch.Tensor) else cache_len
    position = torch.arange(width, device=device)
    visible = (position < cache_len).expand(batch, width)  # [B, width]
    if pad_len is not None:
        visible = visible & (position[None, :] >= pad_len.to(device)[:, None])
    if key_mask is not None:
        km = key_mask[:, :width].to(device=device, dtype=torch.bool)
        if km.shape[1] < width:  # a tensor cache_len: slots past the mask's width are unfilled anyway
            km = F.pad(km, (0, width - km.shape[1]), value=False)
        visible = visible & km
    query_idx = torch.arange(n, device=device)
    block_visible = (query_idx[:, None] >= clean_prefix_len) | (query_idx[None, :] < clean_prefix_len)  # [n, n]
    mask = torch.cat([visible[:, None, None, :].expand(batch, 1, n, width),
                      block_visible[None, None].expand(batch, 1, n, n)], dim=-1)  # [B, 1, n, width + n]
    keys = torch.cat([k_cache[:, :, :width], k_blk], dim=2)  # [B, H_kv, width + n, D]
    values = torch.cat([v_cache[:, :, :width], v_blk], dim=2)
    result = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale,
                                            enable_gqa=q.shape[1] != keys.shape[1])
    if write_cache:
        slots = cache_len + torch.arange(n, device=device)  # a tensor either way: index_copy_ needs no host value
        k_cache.index_copy_(2, slots, k_blk)
        v_cache.index_copy_(2, slots, v_blk)
    if out is not None:
        out.copy_(result)
        return out
    return result


if HAS_TRITON:

    @triton.jit
    def _tile_mask(row_valid, d_valid, FULL_D: tl.constexpr):
        # [rows, D] load/store mask. The head dimension is masked only when it is not a power of two: a mask along
        # the contiguous dimension would keep the loads from being vectorised.
        if FULL_D:
            return row_valid[:, None]
        else:
            return row_valid[:, None] & d_valid[None, :]

    @triton.jit
    def _block_attention_kernel(
        Q, K_cache, V_cache, K_blk, V_blk, Out, Part_O, Part_LSE, cache_len_arg, Pad, KeyMask,
        stride_qb, stride_qh, stride_qn,
        stride_kcb, stride_kch, stride_kct,
        stride_vcb, stride_vch, stride_vct,
        stride_kbb, stride_kbh, stride_kbn,
        stride_vbb, stride_vbh, stride_vbn,
        stride_ob, stride_oh, stride_on,
        stride_mb,
        num_kv_heads, n_blk, clean_prefix_len, qk_scale,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
        LEN_FROM_PTR: tl.constexpr,  # cache_len_arg is a pointer to one integer (else the integer itself)
        KEY_MODE: tl.constexpr,  # 0: all cache keys valid, 1: pad_len per row, 2: [B, T] key mask
        WRITE_CACHE: tl.constexpr,
        DOT_PRECISION: tl.constexpr,  # float32 inputs: "tf32x3" (about float32 accuracy on tensor cores), not "tf32"
        DOT_F32: tl.constexpr,  # the interpreter's dot cannot do bf16/fp16: upcast the (already rounded) operands
    ):
        # One program: BLOCK_M rows of the packed (GQA head, query) matrix of one (batch row, KV head), over one
        # split of the cache; the last split also covers the block's own keys. Packing the GROUP query heads of a KV
        # head into the rows reads each K/V tile once for all of them.
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)  # b * num_kv_heads + kv_head
        split = tl.program_id(2)
        b = (pid_bh // num_kv_heads).to(tl.int64)  # 64-bit offsets: a large cache's batch stride times b can pass 2^31
        kvh = pid_bh % num_kv_heads

        if LEN_FROM_PTR:
            cache_len = tl.load(cache_len_arg).to(tl.int32)
        else:
            cache_len = cache_len_arg

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # packed row = g * n_blk + i
        row_valid = rows < GROUP * n_blk
        g = rows // n_blk
        qi = rows % n_blk
        head = kvh * GROUP + g  # [BLOCK_M] query head of each row
        offs_d = tl.arange(0, BLOCK_D)
        d_valid = offs_d < HEAD_DIM

        q_ptrs = Q + b * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_qn + offs_d[None, :]
        q = tl.load(q_ptrs, mask=_tile_mask(row_valid, d_valid, BLOCK_D == HEAD_DIM), other=0.0)  # [BLOCK_M, BLOCK_D]
        if DOT_F32:
            q = q.to(tl.float32)

        # Online softmax state, in log2 units (qk_scale carries log2(e)): running max, running sum, accumulator.
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        # --- cache keys of this split: [split * chunk, (split + 1) * chunk) ∩ [first visible, cache_len)
        chunk = tl.cdiv(tl.cdiv(cache_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(lo + chunk, cache_len)
        if KEY_MODE == 1:
            pad = tl.load(Pad + b).to(tl.int32)
            lo = tl.maximum(lo, pad)  # tiles of pure left padding are never loaded
        else:
            pad = 0
        kc_base = K_cache + b * stride_kcb + kvh * stride_kch
        vc_base = V_cache + b * stride_vcb + kvh * stride_vch
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            key_valid = offs_n < hi
            if KEY_MODE == 1:
                key_valid = key_valid & (offs_n >= pad)
            if KEY_MODE == 2:
                key_valid = key_valid & (tl.load(KeyMask + b * stride_mb + offs_n, mask=offs_n < hi, other=0) != 0)
            # Invisible keys load as zeros: whatever the padding slots hold (even NaN) cannot leak into the output.
            kv_mask = _tile_mask(key_valid, d_valid, BLOCK_D == HEAD_DIM)
            k = tl.load(kc_base + offs_n[:, None] * stride_kct + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(vc_base + offs_n[:, None] * stride_vct + offs_d[None, :], mask=kv_mask, other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            s = tl.where(key_valid[None, :], s * qk_scale, float("-inf"))  # [BLOCK_M, BLOCK_N]
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: avoid -inf - -inf
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            p = p.to(v.dtype)
            if DOT_F32:
                p = p.to(tl.float32)
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
            m_i = m_new

        # --- the block's own keys (last split only), and the optional cache write of the block's K/V
        if split == NUM_SPLITS - 1:
            kb_base = K_blk + b * stride_kbb + kvh * stride_kbh
            vb_base = V_blk + b * stride_vbb + kvh * stride_vbh
            for start in range(0, n_blk, BLOCK_N):
                offs_n = start + tl.arange(0, BLOCK_N)
                key_valid = offs_n < n_blk
                kv_mask = _tile_mask(key_valid, d_valid, BLOCK_D == HEAD_DIM)
                k = tl.load(kb_base + offs_n[:, None] * stride_kbn + offs_d[None, :], mask=kv_mask, other=0.0)
                v = tl.load(vb_base + offs_n[:, None] * stride_vbn + offs_d[None, :], mask=kv_mask, other=0.0)
                if WRITE_CACHE:  # noqa: SIM102 - a compile-time branch around a run-time one
                    # Only the first row tile writes; the slots [cache_len, cache_len + n) are read by no program.
                    if pid_m == 0:
                        slot = cache_len + offs_n
                        tl.store(kc_base + slot[:, None] * stride_kct + offs_d[None, :], k, mask=kv_mask)
                        tl.store(vc_base + slot[:, None] * stride_vct + offs_d[None, :], v, mask=kv_mask)
                if DOT_F32:
                    k = k.to(tl.float32)
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
                # Block-causal clean prefix: query i sees block key j iff i >= P or j < P (P = 0: bidirectional).
                visible = (qi[:, None] >= clean_prefix_len) | (offs_n[None, :] < clean_prefix_len)
                visible = visible & key_valid[None, :]
                s = tl.where(visible, s * qk_scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_use)
                p = tl.exp2(s - m_use[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                p = p.to(v.dtype)
                if DOT_F32:
                    p = p.to(tl.float32)
                    v = v.to(tl.float32)
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
                m_i = m_new

        out_mask = _tile_mask(row_valid, d_valid, BLOCK_D == HEAD_DIM)
        if NUM_SPLITS == 1:
            # Every query sees at least one block key, so l_i > 0.
            o = acc / l_i[:, None]
            o_ptrs = Out + b * stride_ob + head[:, None] * stride_oh + qi[:, None] * stride_on + offs_d[None, :]
            tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=out_mask)
        else:
            # Partial result of this split: normalised output and log2-sum-exp; an empty split has l = 0, lse = -inf
            # and a zero output, which the combine weighs by exp2(-inf) = 0.
            o = acc / tl.maximum(l_i, 1e-30)[:, None]
            lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("-inf"))
            part_row = ((b * num_kv_heads * GROUP + head) * NUM_SPLITS + split) * n_blk + qi  # [B, H, S, n]
            tl.store(Part_O + part_row[:, None] * BLOCK_D + offs_d[None, :], o, mask=row_valid[:, None])
            tl.store(Part_LSE + part_row, lse, mask=row_valid)

    @triton.jit
    def _block_attention_combine_kernel(
        Part_O, Part_LSE, Out,
        stride_ob, stride_oh, stride_on,
        num_heads, n_blk,
        NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # One program per (b, h) and BLOCK_Q query rows: merge the splits' partial softmaxes, weighting each split's
        # normalised output by exp2(lse_split - lse_max).
        bh = tl.program_id(0)
        qi = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        q_valid = qi < n_blk
        b = (bh // num_heads).to(tl.int64)
        h = bh % num_heads
        offs_d = tl.arange(0, BLOCK_D)
        lse_max = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
        for s in tl.static_range(NUM_SPLITS):
            lse = tl.load(Part_LSE + (bh * NUM_SPLITS + s) * n_blk + qi, mask=q_valid, other=0.0)
            lse_max = tl.maximum(lse_max, lse)  # finite: the last split holds the block keys
        total = tl.zeros([BLOCK_Q], dtype=tl.float32)
        acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
        for s in tl.static_range(NUM_SPLITS):
            row = (bh * NUM_SPLITS + s) * n_blk + qi
            w = tl.exp2(tl.load(Part_LSE + row, mask=q_valid, other=0.0) - lse_max)
            o = tl.load(Part_O + row[:, None] * BLOCK_D + offs_d[None, :], mask=q_valid[:, None], other=0.0)
            total += w
            acc += o * w[:, None]
        result = acc / total[:, None]
        o_ptrs = Out + b * stride_ob + h * stride_oh + qi[:, None] * stride_on + offs_d[None, :]
        tl.store(o_ptrs, result.to(Out.dtype.element_ty),
                 mask=_tile_mask(q_valid, offs_d < HEAD_DIM, BLOCK_D == HEAD_DIM))


def _attention_config(group: int, n: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes: rows cover the packed (GQA head, query) matrix up to 64, 64 keys a tile. float32 keeps float32
    accuracy through "tf32x3" tensor-core dots (three tf32 products per element) on small tiles."""
    block_d = max(16, _next_pow2(head_dim))
    block_m = min(64, max(16, _next_pow2(group * n)))
    if dtype == torch.float32:  # a correctness path more than a fast one: tf32x3 needs many registers
        block_m = min(block_m, 32 if block_d >= 128 else 64)
        num_warps = 8 if block_m * block_d >= 32 * 128 else 4
        return {"BLOCK_M": block_m, "BLOCK_N": 32, "num_warps": num_warps, "num_stages": 2, "dot_precision": "tf32x3"}
    num_warps = 8 if block_m * block_d >= 64 * 128 else 4  # 4 warps at 64 x 128 need ~245 registers a thread
    return {"BLOCK_M": block_m, "BLOCK_N": 64, "num_warps": num_warps, "num_stages": 2, "dot_precision": None}


def _attention_splits(programs: int, keys: int, device: torch.device) -> int:
    """How many splits of the cache (flash-decoding): enough programs to fill the GPU twice, at least two 64-key
    tiles each (a program walks its tiles one after the other: at batch 1 a single split would leave most of the GPU
    idle and serialise the cache's latency)."""
    target = 2 * _num_sms(device)
    if programs >= target // 2:
        return 1
    splits = min(-(-target // programs), max(1, keys // 128), 16)
    return max(1, splits)


def block_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_blk: torch.Tensor,
    v_blk: torch.Tensor,
    cache_len: int | torch.Tensor,
    *,
    pad_len: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    write_cache: bool = False,
    scale: float | None = None,
    clean_prefix_len: int = 0,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """`block_attention_reference` as one Triton kernel (plus a small combine kernel when the cache is split).

    Same arguments and result as the reference; in addition `num_splits` (cache splits, flash-decoding style; default:
    enough to fill the GPU) and `config` (tile overrides: BLOCK_M, BLOCK_N, num_warps, num_stages). Accumulates in
    float32. With a tensor `cache_len` nothing is read on the host and the launch is CUDA-graph capturable; the
    capacity check is then the caller's (`cache_len + n <= T_cap` when writing).
    """
    if not HAS_TRITON:
        raise RuntimeError("block_attention_triton needs triton (pip install triton)")
    _check_attention_args(q, k_cache, v_cache, k_blk, v_blk, cache_len, pad_len, key_mask, write_cache,
                          clean_prefix_len)
    batch, heads, n, head_dim = q.shape
    kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    dtype = q.dtype
    if not (k_cache.dtype == v_cache.dtype == k_blk.dtype == v_blk.dtype == dtype):
        raise ValueError(f"dtypes differ: q {q.dtype}, caches {k_cache.dtype}/{v_cache.dtype}, "
                         f"block {k_blk.dtype}/{v_blk.dtype}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the caches' last dimension must be contiguous (they are written in place)")
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_blk = k_blk if k_blk.stride(-1) == 1 else k_blk.contiguous()
    v_blk = v_blk if v_blk.stride(-1) == 1 else v_blk.contiguous()
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif tuple(out.shape) != tuple(q.shape) or out.dtype != dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {dtype} with a contiguous last dimension")

    cfg = {**_attention_config(group, n, head_dim, dtype), **(config or {})}
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    block_d = max(16, _next_pow2(head_dim))
    m_tiles = -(-(group * n) // block_m)
    if num_splits is None:
        # From the capacity when cache_len lives on the device: the launch shape must not depend on it.
        keys = capacity if isinstance(cache_len, torch.Tensor) else cache_len
        num_splits = _attention_splits(m_tiles * batch * kv_heads, keys, q.device)

    if isinstance(cache_len, torch.Tensor):
        len_arg, len_from_ptr = cache_len.reshape(1).to(device=q.device), True
    else:
        len_arg, len_from_ptr = int(cache_len), False
    if pad_len is not None:
        key_mode, pad_arg, mask_arg, stride_mb = 1, pad_len.to(q.device), q, 0
    elif key_mask is not None:
        mask_arg = key_mask.to(q.device)
        if mask_arg.dtype == torch.bool:
            mask_arg = mask_arg.view(torch.uint8)  # same bytes; a plain integer pointer for the kernel
        if mask_arg.stride(-1) != 1:
            mask_arg = mask_arg.contiguous()
        key_mode, pad_arg, stride_mb = 2, q, mask_arg.stride(0)
    else:
        key_mode, pad_arg, mask_arg, stride_mb = 0, q, q, 0  # unused pointers (any tensor will do)

    if num_splits > 1:
        part_o = torch.empty(batch, heads, num_splits, n, block_d, device=q.device, dtype=torch.float32)
        part_lse = torch.empty(batch, heads, num_splits, n, device=q.device, dtype=torch.float32)
    else:
        part_o = part_lse = out  # unused

    sm_scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    on_cuda = q.is_cuda
    kernel = _for_device(_block_attention_kernel, q.device)
    kernel[(m_tiles, batch * kv_heads, num_splits)](
        q, k_cache, v_cache, k_blk, v_blk, out, part_o, part_lse, len_arg, pad_arg, mask_arg,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_blk.stride(0), k_blk.stride(1), k_blk.stride(2),
        v_blk.stride(0), v_blk.stride(1), v_blk.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        stride_mb,
        kv_heads, n, clean_prefix_len, sm_scale * 1.4426950408889634,  # log2(e): exp2 in the kernel
        GROUP=group, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, NUM_SPLITS=num_splits,
        LEN_FROM_PTR=len_from_ptr, KEY_MODE=key_mode, WRITE_CACHE=bool(write_cache),
        DOT_PRECISION=cfg["dot_precision"], DOT_F32=not on_cuda,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if num_splits > 1:
        combine = _for_device(_block_attention_combine_kernel, q.device)
        block_q = min(16, _next_pow2(n))
        combine[(batch * heads, -(-n // block_q))](
            part_o, part_lse, out, out.stride(0), out.stride(1), out.stride(2), heads, n,
            NUM_SPLITS=num_splits, HEAD_DIM=head_dim, BLOCK_Q=block_q, BLOCK_D=block_d, num_warps=4,
        )
    return out


def block_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_blk: torch.Tensor,
    v_blk: torch.Tensor,
    cache_len: int | torch.Tensor,
    *,
    pad_len: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    write_cache: bool = False,
    scale: float | None = None,
    clean_prefix_len: int = 0,
    out: torch.Tensor | None = None,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """Attention of a block of queries over the KV cache + the block: the Triton kernel for CUDA tensors when triton
    is installed, `block_attention_reference` otherwise (`use_triton` forces either). Arguments as the reference's."""
    kwargs = {"pad_len": pad_len, "key_mask": key_mask, "write_cache": write_cache, "scale": scale,
                  "clean_prefix_len": clean_prefix_len, "out": out}
    if _use_triton(q, use_triton, "block_attention"):
        return block_attention_triton(q, k_cache, v_cache, k_blk, v_blk, cache_len, **kwargs)
    return block_attention_reference(q, k_cache, v_cache, k_blk, v_blk, cache_len, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# (b) Fused confidence / argmax over the vocabulary
# ----------------------------------------------------------------------------------------------------------------------


def confidence_argmax_reference(
    logits: torch.Tensor,
    exclude_token_id: int | None = None,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `logits [..., V]`: the argmax token (int64, lowest index on ties, like `torch.argmax`) and its
    softmax probability, computed in float32 (float64 for float64 logits, as the tests' reference).
    `exclude_token_id` (the mask token, say) takes part in neither: it can never be chosen and its probability mass
    is left out of the softmax. `out`: optional (tokens, confidence) buffers of shape `logits.shape[:-1]`."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    if exclude_token_id is not None:
        x = x.index_fill(-1, torch.tensor([exclude_token_id], device=x.device), float("-inf"))
    tokens = x.argmax(-1)  # on the logits, not the probabilities: rounding could tie distinct logits after softmax
    confidence = x.softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    if out is not None:
        out[0].copy_(tokens)
        out[1].copy_(confidence)
        return out
    return tokens, confidence


if HAS_TRITON:

    @triton.jit
    def _online_max_sum_argmax(x, cols, start, m, s, idx, exclude_id, HAS_EXCLUDE: tl.constexpr):
        # Fold one tile of logits x [BLOCK_V] (float32, -inf where absent) into the running max m, sum of exp(x - m)
        # s and index of the first maximum idx. A tile takes over idx only when its max is strictly larger, and
        # tl.max breaks ties to the left, so the lowest index wins, as in torch.argmax.
        if HAS_EXCLUDE:
            x = tl.where(cols == exclude_id, float("-inf"), x)
        tile_max, tile_arg = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
        m_new = tl.maximum(m, tile_max)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: avoid -inf - -inf
        s = s * tl.exp2((m - m_use) * 1.4426950408889634) + tl.sum(tl.exp2((x - m_use) * 1.4426950408889634), 0)
        idx = tl.where(tile_max > m, start + tile_arg, idx)
        return m_new, s, idx

    @triton.jit
    def _confidence_argmax_kernel(
        X, stride_outer, stride_inner, inner_len, vocab, exclude_id, Tokens, Confidence, Part_M, Part_S, Part_I,
        HAS_EXCLUDE: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        # One program: one row over one split of the vocabulary, one pass, tile by tile. Row r of the flattened
        # [outer, inner] leading dims sits at (r // inner_len) * stride_outer + (r % inner_len) * stride_inner, so a
        # strided [B, L, V] slice needs no copy.
        row = tl.program_id(0)
        split = tl.program_id(1)
        chunk = tl.cdiv(tl.cdiv(vocab, NUM_SPLITS), BLOCK_V) * BLOCK_V  # whole tiles, so only the end is ragged
        lo = split * chunk
        hi = tl.minimum(lo + chunk, vocab)
        full_hi = lo + tl.maximum(hi - lo, 0) // BLOCK_V * BLOCK_V
        row64 = row.to(tl.int64)
        x_row = X + (row64 // inner_len) * stride_outer + (row64 % inner_len) * stride_inner
        m = tl.full([], float("-inf"), dtype=tl.float32)
        s = tl.zeros([], dtype=tl.float32)
        idx = tl.zeros([], dtype=tl.int32)
        # Whole tiles without a mask: a mask against a run-time bound would keep the loads from being vectorised.
        for start in range(lo, full_hi, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(x_row + cols).to(tl.float32)
            m, s, idx = _online_max_sum_argmax(x, cols, start, m, s, idx, exclude_id, HAS_EXCLUDE)
        # The ragged end of the vocabulary (last split only).
        if full_hi < hi:
            cols = full_hi + tl.arange(0, BLOCK_V)
            x = tl.load(x_row + cols, mask=cols < hi, other=float("-inf")).to(tl.float32)
            m, s, idx = _online_max_sum_argmax(x, cols, full_hi, m, s, idx, exclude_id, HAS_EXCLUDE)
        if NUM_SPLITS == 1:
            tl.store(Tokens + row, idx.to(tl.int64))
            tl.store(Confidence + row, 1.0 / s)  # p(argmax) = exp(m - m) / sum exp(x - m)
        else:
            tl.store(Part_M + row * NUM_SPLITS + split, m)
            tl.store(Part_S + row * NUM_SPLITS + split, s)
            tl.store(Part_I + row * NUM_SPLITS + split, idx)

    @triton.jit
    def _confidence_argmax_combine_kernel(
        Part_M, Part_S, Part_I, Tokens, Confidence, NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
    ):
        row = tl.program_id(0)
        offs = tl.arange(0, SPLITS_P2)
        valid = offs < NUM_SPLITS
        m = tl.load(Part_M + row * NUM_SPLITS + offs, mask=valid, other=float("-inf"))
        s = tl.load(Part_S + row * NUM_SPLITS + offs, mask=valid, other=0.0)
        idx = tl.load(Part_I + row * NUM_SPLITS + offs, mask=valid, other=2147483647)
        m_max = tl.max(m, 0)
        m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
        total = tl.sum(s * tl.exp2((m - m_use) * 1.4426950408889634), 0)
        # Splits are in vocabulary order and each holds its first maximum: the lowest index attaining m_max wins.
        token = tl.min(tl.where(valid & (m == m_max), idx, 2147483647), 0)
        tl.store(Tokens + row, token.to(tl.int64))
        tl.store(Confidence + row, 1.0 / total)


def _confidence_config(vocab: int) -> dict:
    return {"BLOCK_V": min(4096, max(128, _next_pow2(vocab))), "num_warps": 8, "num_stages": 2}


def confidence_argmax_triton(
    logits: torch.Tensor,
    exclude_token_id: int | None = None,
    *,
    num_splits: int | None = None,
    config: dict | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`confidence_argmax_reference` in one pass over the logits (plus a tiny combine kernel when the vocabulary is
    split across programs): tokens int64 and confidence float32, shaped `logits.shape[:-1]`, or written into `out`
    (contiguous int64 and float32 buffers of that shape: static outputs for a CUDA graph). `num_splits` defaults to
    enough programs to fill the GPU; `config` overrides BLOCK_V, num_warps, num_stages. Rows may be strided (e.g. a
    slice of `[B, L, V]` logits); the last dim must be contiguous (else it is copied)."""
    if not HAS_TRITON:
        raise RuntimeError("confidence_argmax_triton needs triton (pip install triton)")
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    x = logits if logits.dim() == 3 else logits.reshape(1, -1, vocab)  # [outer, inner, V]; 3-D slices stay views
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows = x.shape[0] * x.shape[1]
    if exclude_token_id is not None and not 0 <= exclude_token_id < vocab:
        raise ValueError(f"exclude_token_id {exclude_token_id} outside the vocabulary [0, {vocab})")
    if out is not None:
        tokens_out, confidence_out = out
        if (tuple(tokens_out.shape) != tuple(lead) or tuple(confidence_out.shape) != tuple(lead)
                or tokens_out.dtype != torch.int64 or confidence_out.dtype != torch.float32
                or not tokens_out.is_contiguous() or not confidence_out.is_contiguous()):
            raise ValueError(f"out must be contiguous int64 and float32 tensors of shape {tuple(lead)}")
        tokens, confidence = tokens_out.view(-1), confidence_out.view(-1)
    else:
        tokens = torch.empty(rows, dtype=torch.int64, device=x.device)
        confidence = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows == 0:
        return tokens.reshape(lead), confidence.reshape(lead)
    cfg = {**_confidence_config(vocab), **(config or {})}
    block_v = cfg["BLOCK_V"]
    if num_splits is None:
        # Fill the GPU twice over, but give each split at least 4 tiles so that the combine stays negligible.
        target = 2 * _num_sms(x.device)
        num_splits = max(1, min(-(-target // rows), -(-vocab // (4 * block_v)), 64))
    if num_splits > 1:
        part_m = torch.empty(rows, num_splits, dtype=torch.float32, device=x.device)
        part_s = torch.empty(rows, num_splits, dtype=torch.float32, device=x.device)
        part_i = torch.empty(rows, num_splits, dtype=torch.int32, device=x.device)
    else:
        part_m = part_s = part_i = confidence  # unused
    kernel = _for_device(_confidence_argmax_kernel, x.device)
    kernel[(rows, num_splits)](
        x, x.stride(0), x.stride(1), x.shape[1], vocab, -1 if exclude_token_id is None else int(exclude_token_id),
        tokens, confidence,
        part_m, part_s, part_i,
        HAS_EXCLUDE=exclude_token_id is not None, NUM_SPLITS=num_splits, BLOCK_V=block_v,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if num_splits > 1:
        combine = _for_device(_confidence_argmax_combine_kernel, x.device)
        combine[(rows,)](part_m, part_s, part_i, tokens, confidence, NUM_SPLITS=num_splits,
                         SPLITS_P2=_next_pow2(num_splits), num_warps=1)
    return tokens.reshape(lead), confidence.reshape(lead)


def confidence_argmax(
    logits: torch.Tensor,
    exclude_token_id: int | None = None,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    use_triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax token (int64) and its softmax probability (float32) per row of `logits [..., V]`, lowest index on ties,
    `exclude_token_id` left out of both: the Triton kernel for CUDA tensors when triton is installed, the reference
    otherwise (`use_triton` forces either). `out`: optional (tokens, confidence) buffers."""
    if _use_triton(logits, use_triton, "confidence_argmax"):
        return confidence_argmax_triton(logits, exclude_token_id, out=out)
    return confidence_argmax_reference(logits, exclude_token_id, out=out)


# ----------------------------------------------------------------------------------------------------------------------
# The attention kernel as an opaque op for torch.compile
# ----------------------------------------------------------------------------------------------------------------------


def _cached_block_attention_impl(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_blk: torch.Tensor,
                                 v_blk: torch.Tensor, cache_len: torch.Tensor, pad_len: torch.Tensor, scale: float,
                                 clean_prefix_len: int) -> torch.Tensor:
    return block_attention_triton(q, k_cache, v_cache, k_blk, v_blk, cache_len, pad_len=pad_len, scale=scale,
                                  clean_prefix_len=clean_prefix_len)


def _register_cached_block_attention():
    """`block_attention_triton` (device-side `cache_len`, `pad_len`, no cache write) as a torch custom op, so that a
    compiled decoder layer calls it as one opaque kernel: torch.compile neither traces the launcher's Python nor
    breaks the graph around it. The op is pure (the caller writes the cache), so functionalisation has nothing to
    copy. Registered once per process: this file may be imported twice (the package and a checkpoint's remote-code
    copy); the second import reuses the first's op, which runs the same code."""
    namespace = getattr(torch.ops, "efficient_dlm", None)
    existing = getattr(namespace, "cached_block_attention", None) if namespace is not None else None
    if existing is not None:
        return existing
    if not hasattr(torch.library, "custom_op"):  # torch < 2.4: plain call (a graph break under torch.compile)
        return torch.compiler.disable(_cached_block_attention_impl)
    op = torch.library.custom_op("efficient_dlm::cached_block_attention", mutates_args=())(
        _cached_block_attention_impl)

    @op.register_fake
    def _(q, k_cache, v_cache, k_blk, v_blk, cache_len, pad_len, scale, clean_prefix_len):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    return op


cached_block_attention = _register_cached_block_attention()
cached_block_attention.__doc__ = """Triton block attention over a static cache for the decoding step:
`cached_block_attention(q, k_cache, v_cache, k_blk, v_blk, cache_len, pad_len, scale, clean_prefix_len)`, arguments
as `block_attention_triton`'s (`cache_len` a one-element device tensor, `pad_len` `[B]`); never writes the cache."""

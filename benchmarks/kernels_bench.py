"""Time the Triton kernels of `efficient_dlm/kernels_efficient_dlm.py` against their torch/SDPA counterparts.

    python benchmarks/kernels_bench.py [--quick] [--no-sweep] [--no-compile] [--json PATH]

Needs a CUDA GPU and triton; about 1-2 minutes on an H100. For every case it checks the kernel against the reference
first (the `err` column: ||kernel - ref|| / ||ref||, float32 reference), then times with `triton.testing.do_bench`
(median; L2 flushed before every call; launched from Python, so launch overhead is in) and, for the main columns,
`do_bench_cudagraph` (median of graph replays: no launch overhead, as inside the CUDA-graph denoising step; back-to-
back replays keep small working sets in L2). GB/s = the fewest bytes the operation must move (each input read once,
each output written once) / time, next to a measured device copy bandwidth (read + write bytes of a 1 GiB copy).

Attention cases: one layer's attention of a 32-token block (n) over a cache of L tokens, with ragged left padding and
the block's K/V written into the cache (as a denoising step needs). Baselines:
  sdpa+mask   the model's eager path: write the block into the cache, then SDPA over cache[:L+n] with a boolean
              [B, 1, n, L+n] mask (built outside the timed region: the model builds it once per forward, not per layer)
  sdpa        the same without a mask (only valid without padding: a lower bound; flash/cuDNN may take it)
  ref         `block_attention_reference` (concatenation + mask + SDPA)
Confidence cases: argmax and max-softmax-probability of [N, V] logits (N = batch x 32 block tokens), the mask token
excluded. Baselines: `confidence_argmax_reference` eager and under torch.compile.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "cuda"  # "cpu" only for --cpu-smoke (TRITON_INTERPRET=1): checks this script's plumbing, times nothing real


def load_kernels():
    """The kernels module by path: no need for the package (and transformers) to be importable."""
    path = os.path.join(ROOT, "efficient_dlm", "kernels_efficient_dlm.py")
    spec = importlib.util.spec_from_file_location("kernels_efficient_dlm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


K = load_kernels()

# (name, query heads, kv heads, head dim)
MODELS = {
    "qwen3-0.6b": (16, 8, 128),
    "qwen3-8b": (32, 8, 128),
    "qwen2.5-7b": (28, 4, 128),  # GQA 7: not a power of two
    "llama3.2-1b": (32, 8, 64),
    "smollm2-135m": (9, 3, 64),
}
QWEN_VOCAB, QWEN_MASK_ID = 151936, 151669


def bench(fn, graph: bool = False) -> float:
    """Median microseconds; nan when the call (or its graph capture) fails."""
    import triton.testing

    if DEVICE == "cpu":  # --cpu-smoke: one call, wall clock
        if graph:
            return float("nan")
        start = time.perf_counter()
        fn()
        return 1e6 * (time.perf_counter() - start)
    try:
        if graph:
            return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
        return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")
    except Exception as error:  # noqa: BLE001 - a baseline that cannot be captured, say: report, go on
        print(f"    (timing failed: {type(error).__name__}: {str(error)[:100]})", file=sys.stderr)
        return float("nan")


def copy_bandwidth_gbs() -> float:
    """Device copy bandwidth in GB/s, counting bytes read + bytes written."""
    src = torch.empty(1 << (29 if DEVICE == "cuda" else 20), dtype=torch.int16, device=DEVICE).random_()
    dst = torch.empty_like(src)
    us = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (us * 1e-6) / 1e9


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def fmt(x: float, width: int = 7, digits: int = 1, suffix: str = "") -> str:
    return f"{x:{width}.{digits}f}{suffix}" if math.isfinite(x) else f"{'n/a':>{width + len(suffix)}}"


# ----------------------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------------------


def attention_inputs(heads, kv_heads, head_dim, batch, cache_len, n, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    capacity = cache_len + n + 64

    def r(*shape):
        return torch.randn(*shape, generator=gen, device=DEVICE, dtype=torch.float32).to(dtype)

    q = r(batch, n, heads, head_dim).transpose(1, 2)  # as a model's projection hands it over
    k_cache, v_cache = r(batch, kv_heads, capacity, head_dim), r(batch, kv_heads, capacity, head_dim)
    k_blk = r(batch, n, kv_heads, head_dim).transpose(1, 2)
    v_blk = r(batch, n, kv_heads, head_dim).transpose(1, 2)
    # Ragged left padding: row r padded by up to a quarter of the cache; row 0 unpadded.
    pad = (torch.arange(batch, device=DEVICE) * 37) % max(1, cache_len // 4)
    pad[0] = 0
    return q, k_cache, v_cache, k_blk, v_blk, pad


def attention_bytes(heads, kv_heads, head_dim, batch, cache_len, n, elem=2, write=True):
    q_and_out = 2 * batch * heads * n * head_dim
    cache = 2 * batch * kv_heads * cache_len * head_dim
    block = 2 * batch * kv_heads * n * head_dim * (2 if write else 1)  # read, and written into the cache
    return elem * (q_and_out + cache + block)


def attention_row(name, batch, cache_len, n, copy_gbs, clean_prefix_len=0, graphs=True):
    heads, kv_heads, head_dim = MODELS[name]
    q, k_cache, v_cache, k_blk, v_blk, pad = attention_inputs(heads, kv_heads, head_dim, batch, cache_len, n)
    kw = {"pad_len": pad, "write_cache": True, "clean_prefix_len": clean_prefix_len}

    # Correctness first (float32 reference on the same bf16 values).
    out = K.block_attention_triton(q, k_cache, v_cache, k_blk, v_blk, cache_len, **kw)
    ref = K.block_attention_reference(q.float(), k_cache.float(), v_cache.float(), k_blk.float(), v_blk.float(),
                                      cache_len, pad_len=pad, clean_prefix_len=clean_prefix_len)
    err = rel_err(out, ref)

    out_buf = torch.empty_like(q)
    triton_fn = lambda: K.block_attention_triton(q, k_cache, v_cache, k_blk, v_blk, cache_len, out=out_buf, **kw)

    end = cache_len + n
    position = torch.arange(end, device=DEVICE)
    visible = position[None, :] >= pad[:, None]
    block_idx = torch.arange(n, device=DEVICE)
    in_block = (block_idx[:, None] >= clean_prefix_len) | (block_idx[None, :] < clean_prefix_len)
    mask = visible[:, None, None, :].repeat(1, 1, n, 1)
    mask[..., cache_len:] = in_block
    gqa = heads != kv_heads

    def sdpa_mask_fn():
        k_cache[:, :, cache_len:end] = k_blk
        v_cache[:, :, cache_len:end] = v_blk
        return F.scaled_dot_product_attention(q, k_cache[:, :, :end], v_cache[:, :, :end], attn_mask=mask,
                                              enable_gqa=gqa)

    def sdpa_fn():
        k_cache[:, :, cache_len:end] = k_blk
        v_cache[:, :, cache_len:end] = v_blk
        return F.scaled_dot_product_attention(q, k_cache[:, :, :end], v_cache[:, :, :end], enable_gqa=gqa)

    ref_fn = lambda: K.block_attention_reference(q, k_cache, v_cache, k_blk, v_blk, cache_len, **kw)

    nbytes = attention_bytes(heads, kv_heads, head_dim, batch, cache_len, n)
    t = {
        "triton": bench(triton_fn),
        "sdpa_mask": bench(sdpa_mask_fn),
        "sdpa": bench(sdpa_fn),
        "ref": bench(ref_fn),
        "triton_graph": bench(triton_fn, graph=True) if graphs else float("nan"),
        "sdpa_mask_graph": bench(sdpa_mask_fn, graph=True) if graphs else float("nan"),
    }
    gbs = nbytes / (t["triton"] * 1e-6) / 1e9
    gbs_graph = nbytes / (t["triton_graph"] * 1e-6) / 1e9
    row = dict(kernel="attention", model=name, batch=batch, cache_len=cache_len, n=n, clean_prefix_len=clean_prefix_len,
               heads=heads, kv_heads=kv_heads, head_dim=head_dim, bytes=nbytes, err=err,
               **{f"{k}_us": v for k, v in t.items()}, triton_gbs=gbs, triton_graph_gbs=gbs_graph)
    label = f"{name}{'+P' if clean_prefix_len else ''}"
    print(f"{label:<15} {batch:>3} {cache_len:>5} {n:>3} {nbytes / 1e6:>8.2f} | {fmt(t['triton'])} "
          f"{fmt(gbs, 6, 0)} {fmt(100 * gbs / copy_gbs, 4, 0)}% | {fmt(t['sdpa_mask'])} {fmt(t['sdpa'])} "
          f"{fmt(t['ref'])} | {fmt(t['sdpa_mask'] / t['triton'], 5, 2, 'x')} | {fmt(t['triton_graph'])} "
          f"{fmt(gbs_graph, 6, 0)} {fmt(t['sdpa_mask_graph'])} "
          f"{fmt(t['sdpa_mask_graph'] / t['triton_graph'], 5, 2, 'x')}"
          f" | {err:.1e}", flush=True)
    return row


ATTN_HEADER = (f"{'model':<15} {'B':>3} {'L':>5} {'n':>3} {'MB':>8} | {'triton':>7} {'GB/s':>6} {'%cp':>5} | "
               f"{'sdpa+m':>7} {'sdpa':>7} {'ref':>7} | {'gain':>6} | {'tri-g':>7} {'GB/s':>6} {'sdpa+m-g':>7} "
               f"{'gain-g':>6} | err")


# ----------------------------------------------------------------------------------------------------------------------
# Confidence / argmax
# ----------------------------------------------------------------------------------------------------------------------

_COMPILED = {}


def compiled_reference():
    if "fn" not in _COMPILED:
        # dynamic=True: one compilation per dtype serves every shape (a bench run cannot wait for one per shape)
        _COMPILED["fn"] = torch.compile(K.confidence_argmax_reference, dynamic=True)
    return _COMPILED["fn"]


def confidence_row(rows, vocab, dtype, copy_gbs, use_compile=True, graphs=True):
    gen = torch.Generator(device=DEVICE).manual_seed(rows + vocab)
    logits = (torch.randn(rows, vocab, generator=gen, device=DEVICE) * 4).to(dtype)
    mask_id = QWEN_MASK_ID if vocab > QWEN_MASK_ID else vocab - 1
    tokens, conf = K.confidence_argmax_triton(logits, mask_id)
    ref_tokens, ref_conf = K.confidence_argmax_reference(logits, mask_id)
    token_match = (tokens == ref_tokens).float().mean().item()
    err = ((conf - ref_conf).abs() / ref_conf).max().item()

    triton_fn = lambda: K.confidence_argmax_triton(logits, mask_id)
    eager_fn = lambda: K.confidence_argmax_reference(logits, mask_id)
    t = {"triton": bench(triton_fn), "eager": bench(eager_fn)}
    t["compiled"] = float("nan")
    if use_compile:
        compiled = compiled_reference()
        try:
            compiled(logits, mask_id)  # compile outside the timing
            t["compiled"] = bench(lambda: compiled(logits, mask_id))
        except Exception as error:  # noqa: BLE001 - the baseline failing to compile must not stop the table
            print(f"    (torch.compile failed: {type(error).__name__}: {str(error)[:100]})", file=sys.stderr)
    t["triton_graph"] = bench(triton_fn, graph=True) if graphs else float("nan")
    t["eager_graph"] = bench(eager_fn, graph=True) if graphs else float("nan")
    nbytes = rows * vocab * logits.element_size() + rows * 12
    gbs = nbytes / (t["triton"] * 1e-6) / 1e9
    gbs_graph = nbytes / (t["triton_graph"] * 1e-6) / 1e9
    best_torch = min(t["eager"], t["compiled"]) if math.isfinite(t["compiled"]) else t["eager"]
    dt = "bf16" if dtype == torch.bfloat16 else "fp32"
    print(f"{rows:>5} {vocab:>7} {dt:>5} {nbytes / 1e6:>8.2f} | {fmt(t['triton'])} {fmt(gbs, 6, 0)} "
          f"{fmt(100 * gbs / copy_gbs, 4, 0)}% | {fmt(t['eager'])} {fmt(t['compiled'])} | "
          f"{fmt(best_torch / t['triton'], 5, 2, 'x')} | {fmt(t['triton_graph'])} {fmt(gbs_graph, 6, 0)} "
          f"{fmt(t['eager_graph'])} | tokens {100 * token_match:.0f}% conf {err:.1e}", flush=True)
    return dict(kernel="confidence", rows=rows, vocab=vocab, dtype=dt, bytes=nbytes, token_match=token_match,
                conf_rel_err=err, **{f"{k}_us": v for k, v in t.items()}, triton_gbs=gbs, triton_graph_gbs=gbs_graph)


CONF_HEADER = (f"{'N':>5} {'V':>7} {'dtype':>5} {'MB':>8} | {'triton':>7} {'GB/s':>6} {'%cp':>5} | {'eager':>7} "
               f"{'compld':>7} | {'gain':>6} | {'tri-g':>7} {'GB/s':>6} {'eager-g':>7} | check")


# ----------------------------------------------------------------------------------------------------------------------
# Config sweeps (to tune the defaults in the kernels module)
# ----------------------------------------------------------------------------------------------------------------------


def sweep_attention(name, batch, cache_len, n, budget_s):
    heads, kv_heads, head_dim = MODELS[name]
    q, k_cache, v_cache, k_blk, v_blk, pad = attention_inputs(heads, kv_heads, head_dim, batch, cache_len, n)
    out_buf = torch.empty_like(q)
    rows_needed = (heads // kv_heads) * n
    default = K._attention_config(heads // kv_heads, n, head_dim, q.dtype)
    configs = [dict(default)]
    for block_m in (32, 64, 128):
        if block_m > max(16, 1 << (rows_needed - 1).bit_length()):
            continue
        for block_n, warps, stages in ((32, 4, 2), (64, 4, 2), (64, 8, 2), (64, 4, 3), (128, 8, 2), (64, 8, 3)):
            configs.append({"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages,
                                "dot_precision": None})
    splits_options = [None, 1, 2, 4, 8] if batch * kv_heads < 64 else [None, 1]
    results, start = [], time.time()
    for cfg in configs:
        for splits in splits_options:
            if time.time() - start > budget_s:
                break
            def fn(splits=splits, cfg=cfg):
                return K.block_attention_triton(q, k_cache, v_cache, k_blk, v_blk, cache_len, pad_len=pad,
                                                write_cache=True, out=out_buf, num_splits=splits, config=cfg)

            try:
                fn()
            except Exception as error:  # noqa: BLE001 - a config out of resources: skip it
                print(f"    config {cfg} splits {splits}: {type(error).__name__}", file=sys.stderr)
                continue
            results.append((bench(fn, graph=True), bench(fn), cfg, splits))
    results.sort(key=lambda r: r[0])
    print(f"attention sweep {name} B={batch} L={cache_len} n={n} (default {default}, "
          f"auto splits): best of {len(results)} by graph time")
    for graph_us, us, cfg, splits in results[:6]:
        cfg_s = ", ".join(f"{k}={v}" for k, v in cfg.items() if k != "dot_precision")
        print(f"  graph {graph_us:7.1f} us  plain {us:7.1f} us  splits={splits}  {cfg_s}")
    return [{"graph_us": g, "us": u, "config": c, "splits": s} for g, u, c, s in results]


def sweep_confidence(rows, budget_s):
    logits = (torch.randn(rows, QWEN_VOCAB, device=DEVICE) * 4).to(torch.bfloat16)
    results, start = [], time.time()
    for block_v in (1024, 2048, 4096, 8192):
        for warps in (4, 8, 16):
            for splits in (None, 1, 4, 16):
                if time.time() - start > budget_s:
                    break
                cfg = {"BLOCK_V": block_v, "num_warps": warps, "num_stages": 2}
                def fn(splits=splits, cfg=cfg):
                    return K.confidence_argmax_triton(logits, QWEN_MASK_ID, num_splits=splits, config=cfg)

                fn()
                results.append((bench(fn, graph=True), bench(fn), cfg, splits))
    results.sort(key=lambda r: r[0])
    print(f"confidence sweep N={rows} V={QWEN_VOCAB} bf16 (default {K._confidence_config(QWEN_VOCAB)}, auto splits):"
          f" best of {len(results)} by graph time")
    for graph_us, us, cfg, splits in results[:6]:
        print(f"  graph {graph_us:7.1f} us  plain {us:7.1f} us  splits={splits}  {cfg}")
    return [{"graph_us": g, "us": u, "config": c, "splits": s} for g, u, c, s in results]


# ----------------------------------------------------------------------------------------------------------------------


def smoke() -> int:
    if not K.triton_interpreting():
        print("--cpu-smoke needs TRITON_INTERPRET=1 in the environment", file=sys.stderr)
        return 1
    copy_gbs = copy_bandwidth_gbs()
    MODELS["tiny"] = (4, 2, 64)
    print(ATTN_HEADER)
    attention_row("tiny", 2, 40, 4, copy_gbs, graphs=False)
    attention_row("tiny", 1, 40, 8, copy_gbs, clean_prefix_len=4, graphs=False)
    print(CONF_HEADER)
    confidence_row(4, 3000, torch.bfloat16, copy_gbs, use_compile=False, graphs=False)
    sweep_attention("tiny", 1, 40, 4, budget_s=3)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few cases only")
    parser.add_argument("--no-sweep", action="store_true", help="skip the tile-config sweeps")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph timings")
    parser.add_argument("--json", default=None, help="also write every number to this JSON file")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny cases on the CPU through triton's interpreter (TRITON_INTERPRET=1): checks the "
                             "script runs, times nothing meaningful")
    args = parser.parse_args()
    global DEVICE
    if args.cpu_smoke:
        DEVICE = "cpu"
        return smoke()
    if not torch.cuda.is_available() or not K.HAS_TRITON:
        print("kernels_bench needs a CUDA GPU and triton", file=sys.stderr)
        return 1
    import triton

    started = time.time()
    torch.backends.cuda.matmul.allow_tf32 = False
    props = torch.cuda.get_device_properties(0)
    copy_gbs = copy_bandwidth_gbs()
    print(f"device {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, triton "
          f"{triton.__version__}; copy bandwidth {copy_gbs:.0f} GB/s (read + write of a 1 GiB copy)")
    print("times in microseconds (median); -g = CUDA-graph replay; gain = baseline / triton; bf16")
    graphs = not args.no_graphs
    report = {"device": props.name, "torch": torch.__version__, "triton": triton.__version__, "copy_gbs": copy_gbs,
                  "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "rows": []}

    print("\nblock attention: one layer, block of n queries over L cached tokens + the block, ragged padding, "
          "cache write (+P: clean prefix of 32)")
    print(ATTN_HEADER)
    cases = [("qwen3-8b", 1, 512, 32), ("qwen3-8b", 8, 512, 32), ("qwen3-8b", 32, 512, 32)]
    if not args.quick:
        cases += [
            ("qwen3-0.6b", 1, 512, 32), ("qwen3-0.6b", 8, 512, 32), ("qwen3-0.6b", 32, 512, 32),
            ("qwen2.5-7b", 1, 512, 32), ("qwen2.5-7b", 32, 512, 32),
            ("llama3.2-1b", 1, 512, 32), ("llama3.2-1b", 32, 512, 32),
            ("smollm2-135m", 1, 512, 32), ("smollm2-135m", 32, 512, 32),
            ("qwen3-8b", 1, 4096, 32), ("qwen3-8b", 8, 4096, 32), ("qwen3-8b", 1, 512, 4), ("qwen3-8b", 8, 512, 4),
        ]
    for name, batch, cache_len, n in cases:
        report["rows"].append(attention_row(name, batch, cache_len, n, copy_gbs, graphs=graphs))
    if not args.quick:
        report["rows"].append(attention_row("qwen3-8b", 1, 512, 64, copy_gbs, clean_prefix_len=32, graphs=graphs))

    print("\nconfidence/argmax: N rows of logits, mask token excluded")
    print(CONF_HEADER)
    conf_cases = [(32, QWEN_VOCAB, torch.bfloat16), (256, QWEN_VOCAB, torch.bfloat16),
                  (1024, QWEN_VOCAB, torch.bfloat16)]
    if not args.quick:
        conf_cases += [(32, QWEN_VOCAB, torch.float32), (256, QWEN_VOCAB, torch.float32),
                       (4, QWEN_VOCAB, torch.bfloat16), (32, 49152, torch.bfloat16)]
    for rows, vocab, dtype in conf_cases:
        report["rows"].append(confidence_row(rows, vocab, dtype, copy_gbs, use_compile=not args.no_compile,
                                             graphs=graphs))

    if not args.no_sweep and not args.quick:
        print()
        report["sweep_attention_b1"] = sweep_attention("qwen3-8b", 1, 512, 32, budget_s=20)
        report["sweep_attention_b32"] = sweep_attention("qwen3-8b", 32, 512, 32, budget_s=15)
        report["sweep_confidence"] = sweep_confidence(32, budget_s=10)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print(f"\ndone in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`efficient-dlm bench`: block-diffusion decoding vs the AR parent's compiled `generate`, per model shape and batch.

For each model shape (random weights: speed does not depend on them) and batch size, in one process:

* the AR parent through transformers `generate` with a static cache (and transformers' automatic `torch.compile` of
  the decoding step on CUDA), greedy, exactly `--new-tokens` new tokens: `ar_tok_s`, `ar_step_ms`;
* the converted diffusion model (same weights) with a fixed number of tokens committed per step (`steps=K`, so
  TPF = K whatever the weights) and with each confidence threshold tau (TPF as the random weights give it, ~1):
  `dlm_tok_s`, `tpf`, `nfe`, `step_ms`. On CUDA through the static path (CUDA graphs) with compiled decoder layers
  and the Triton kernels (`--dlm-compile`, `--kernels`); `--variants` adds rows with other settings (e.g. without
  compilation, without kernels) at the given batches and models, K rules only;
* `--gguf FILE`: the smollm2-135m rows use that GGUF's real weights (the converted SmolLM2-135M-Instruct);
* the weight-read floor of one forward from a device-to-device copy bandwidth measured in the same run (and a
  compute floor from a measured bf16 matrix-product rate).

Definitions (all times wall-clock with the device synchronised, after one warm-up call of the same config):

* `ar_tok_s` / `dlm_tok_s` = batch x new tokens / seconds of the whole `generate` call (prompt prefill included);
* `ar_prefill_ms` = a `generate(max_new_tokens=1)` call; `ar_step_ms` = (AR seconds - prefill) / (new tokens - 1);
* `dlm_prefill_ms` = a `generate(max_new_tokens=block, steps=block)` call (NFE 1: the prompt plus the first masked
  block); `step_ms` = (dLM seconds - prefill) / (NFE - 1), the cost of one denoising step (`step_excludes_prefill`
  false: seconds / NFE, where no prefill time fits); `step_ms_total` = seconds / NFE;
* `floor_ms` = (bytes of the weights one forward reads + the K/V read at the mean context) / copy bandwidth;
  `compute_floor_ms` = 2 x read parameters x tokens in the forward / matmul rate; `roofline_ms` = the larger;
* `speedup` = dlm_tok_s / ar_tok_s; `step_speedup` = TPF x ar_step_ms / step_ms (decoding only).

Work runs batch-major (every model at the first batch size, then the next) and stops starting new work when the
time budget would be exceeded (those rows are written with `skipped`). The JSON is rewritten after every row, so an
interrupted run still leaves its rows; the table is printed last.

    python benchmarks/bench.py --out DIR [--models ...] [--batches 1,8,32] [--time-budget-s 480] [--gguf FILE]
        [--variants off:auto,on:none]
"""

import argparse
import datetime
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch

# ----------------------------------------------------------------------------------------------------------------------
# Model shapes
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    family: str  # "qwen3" or "llama"
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    shift_logits: bool  # the converted model's prediction mode (no effect on speed; as the project converts them)


# Real configs (config.json of each Hub checkpoint); the weights are random.
MODEL_SHAPES = {
    "qwen3-0.6b": ModelShape("qwen3", 1024, 3072, 28, 16, 8, 128, 151936, True, 1e6, 1e-6, 40960, False),
    "qwen3-1.7b": ModelShape("qwen3", 2048, 6144, 28, 16, 8, 128, 151936, True, 1e6, 1e-6, 40960, False),
    # Qwen/Qwen3-4B's config.json has tie_word_embeddings=true (only 8B and larger are untied).
    "qwen3-4b": ModelShape("qwen3", 2560, 9728, 36, 32, 8, 128, 151936, True, 1e6, 1e-6, 40960, False),
    "qwen3-8b": ModelShape("qwen3", 4096, 12288, 36, 32, 8, 128, 151936, False, 1e6, 1e-6, 40960, False),
    "smollm2-135m": ModelShape("llama", 576, 1536, 30, 9, 3, 64, 49152, True, 1e5, 1e-5, 8192, True),
    # Tiny shapes for the CPU smoke test.
    "tiny-qwen3": ModelShape("qwen3", 64, 128, 2, 4, 2, 16, 256, True, 1e6, 1e-6, 1024, False),
    "tiny-llama": ModelShape("llama", 48, 96, 2, 3, 1, 16, 256, True, 1e5, 1e-5, 1024, True),
}
DEFAULT_MODELS = "qwen3-0.6b,qwen3-1.7b,qwen3-4b,qwen3-8b,smollm2-135m"


def ar_config(shape: ModelShape, dtype: torch.dtype):
    from transformers import LlamaConfig, Qwen3Config

    common = dict(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings, rms_norm_eps=shape.rms_norm_eps,
        tie_word_embeddings=shape.tie_word_embeddings, hidden_act="silu", attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    config = Qwen3Config(**common) if shape.family == "qwen3" else LlamaConfig(**common)
    config.dtype = dtype
    return config


class _default_dtype:
    """Build modules directly in `dtype` (no float32 copy first: an 8B model is built in place on the GPU)."""

    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.saved = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.saved)


def build_models(shape: ModelShape, *, block_size: int, dtype: torch.dtype, device: torch.device, seed: int,
                 gguf: str | None = None):
    """(AR parent, converted dLM, mask token id): random weights (or, with `gguf`, the weights of that GGUF file, as
    `efficient-dlm convert` would take them), built on `device` in `dtype`, the same weights for both."""
    from transformers import LlamaForCausalLM, Qwen3ForCausalLM

    from ..conversion import dlm_from_ar_model

    if gguf is not None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, name = os.path.split(gguf)
        tokenizer = AutoTokenizer.from_pretrained(folder or ".", gguf_file=name)
        ar = AutoModelForCausalLM.from_pretrained(folder or ".", gguf_file=name, dtype=dtype).to(device).eval()
        mask_token_id = tokenizer.convert_tokens_to_ids("<empty_output>")  # SmolLM2's unused special token
        dlm = dlm_from_ar_model(ar, block_size=block_size, shift_logits=shape.shift_logits,
                                mask_token_id=mask_token_id).to(device).eval()
        if ar.generation_config.pad_token_id is None:
            ar.generation_config.pad_token_id = tokenizer.eos_token_id
        return ar, dlm, mask_token_id

    config = ar_config(shape, dtype)
    cls = Qwen3ForCausalLM if shape.family == "qwen3" else LlamaForCausalLM
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        ar = cls(config).eval()
        mask_token_id = shape.vocab_size - 1
        dlm = dlm_from_ar_model(ar, block_size=block_size, shift_logits=shape.shift_logits,
                                mask_token_id=mask_token_id)
    dlm = dlm.to(device).eval()
    ar.generation_config.pad_token_id = config.pad_token_id
    ar.generation_config.eos_token_id = config.eos_token_id
    return ar, dlm, mask_token_id


def read_bytes_per_forward(model) -> tuple[int, int]:
    """(bytes, parameters) one decoding forward reads: every weight once, the LM head included, the input embedding
    matrix not (a lookup reads a few rows) unless it is the tied LM head."""
    total_bytes, total_params = 0, 0
    for parameter in model.parameters():  # each shared (tied) parameter once
        total_bytes += parameter.numel() * parameter.element_size()
        total_params += parameter.numel()
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding
    if not tied:
        total_bytes -= embedding.numel() * embedding.element_size()
        total_params -= embedding.numel()
    return total_bytes, total_params


def kv_bytes_per_token(shape: ModelShape, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return shape.num_hidden_layers * 2 * shape.num_key_value_heads * shape.head_dim * element


# ----------------------------------------------------------------------------------------------------------------------
# Device ceilings
# ----------------------------------------------------------------------------------------------------------------------


def _median_seconds(fn, device: torch.device, repeats: int) -> float:
    times = []
    if device.type == "cuda":
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure_copy_bandwidth(device: torch.device, megabytes: int, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written), median over `repeats` copies."""
    numel = megabytes * 2**20 // 2
    source = torch.empty(numel, dtype=torch.bfloat16, device=device).normal_()  # random data, never zeros
    target = torch.empty_like(source).normal_()
    for _ in range(3):
        target.copy_(source)
    seconds = _median_seconds(lambda: target.copy_(source), device, repeats)
    return 2 * numel * 2 / seconds


def measure_matmul_flops(device: torch.device, size: int, dtype: torch.dtype, repeats: int = 10) -> float:
    """Matrix-product rate in FLOP/s (`size`^3 product in `dtype`), median over `repeats`."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    seconds = _median_seconds(lambda: a @ b, device, repeats)
    return 2 * size**3 / seconds


# ----------------------------------------------------------------------------------------------------------------------
# Timed runs
# ----------------------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _timed(fn, device: torch.device):
    _sync(device)
    started = time.perf_counter()
    output = fn()
    _sync(device)
    return output, time.perf_counter() - started


def ar_generate_kwargs(args, new_tokens: int, pad_token_id: int) -> dict:
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_token_id)
    if args.ar_cache == "static":
        kwargs["cache_implementation"] = "static"
        if args.ar_compile == "none":
            kwargs["disable_compile"] = True
        elif args.ar_compile == "cudagraphs":
            from transformers import CompileConfig

            kwargs["compile_config"] = CompileConfig(backend="cudagraphs", mode=None)
    return kwargs


def run_ar(ar, input_ids, attention_mask, args, device) -> dict:
    """Prefill-only call, then warm-up (compiles on CUDA) and timed calls of the full decode."""
    batch, new = input_ids.shape[0], args.new_tokens
    pad = ar.generation_config.pad_token_id
    result = {}
    prefill_kwargs = ar_generate_kwargs(args, 1, pad)
    prefill_kwargs.pop("compile_config", None)
    prefill_kwargs["disable_compile"] = True  # nothing to decode: keep the compiled graph for the full runs
    ar.generate(input_ids, attention_mask=attention_mask, **prefill_kwargs)
    prefill = statistics.median(
        _timed(lambda: ar.generate(input_ids, attention_mask=attention_mask, **prefill_kwargs), device)[1]
        for _ in range(3)
    )
    kwargs = ar_generate_kwargs(args, new, pad)
    output, first = _timed(lambda: ar.generate(input_ids, attention_mask=attention_mask, **kwargs), device)
    wants_compile = device.type == "cuda" and args.ar_cache == "static" and args.ar_compile == "auto"
    if wants_compile and getattr(ar, "_compiled_call", None) is None:
        # This transformers version did not compile the static-cache decode by itself: ask for it explicitly.
        from transformers import CompileConfig

        kwargs["compile_config"] = CompileConfig()
        output, more = _timed(lambda: ar.generate(input_ids, attention_mask=attention_mask, **kwargs), device)
        first += more
    output, seconds = _timed(lambda: ar.generate(input_ids, attention_mask=attention_mask, **kwargs), device)
    generated = output.shape[1] - input_ids.shape[1]
    if generated != new:
        raise RuntimeError(f"AR generate produced {generated} new tokens, expected {new}")
    compiled = getattr(ar, "_compiled_call", None) is not None and not kwargs.get("disable_compile", False)
    result.update(
        ar_path=f"{args.ar_cache}" + ("+compile" if compiled else "") + (
            f"({args.ar_compile})" if compiled and args.ar_compile != "auto" else ""),
        ar_seconds=seconds,
        ar_first_call_s=first,
        ar_prefill_ms=prefill * 1e3,
        ar_tok_s=batch * new / seconds,
        ar_step_ms=(seconds - prefill) / (new - 1) * 1e3 if new > 1 and seconds > prefill else seconds / new * 1e3,
    )
    return result


def _output_path(output, asked_static: bool, device) -> str:
    """The decode path `generate` reports (`output.decode_path`, e.g. "static" / "eager"); without one, what was asked
    for, marked unconfirmed (a generate that does not know the static path may accept the argument and ignore it)."""
    for name in ("decode_path", "path", "cache_implementation", "implementation"):
        value = getattr(output, name, None)
        if isinstance(value, str) and value:
            return value
    return "static(asked)" if asked_static and device.type == "cuda" else "eager"


def dlm_generate(dlm, input_ids, attention_mask, device, static: bool, static_options=None, **kwargs):
    """One timed `generate`; with `static`, ask for the static-cache/CUDA-graph path (with `static_options`, e.g.
    compile and kernels) and fall back to the eager one if that is refused or fails. Returns (output, seconds,
    dlm_path, static_error)."""
    base = dict(eos_token_id=[], return_dict_in_generate=True, **kwargs)
    if static:
        try:
            output, seconds = _timed(
                lambda: dlm.generate(input_ids, attention_mask=attention_mask, cache_implementation="static",
                                     **(static_options or {}), **base),
                device,
            )
            return output, seconds, _output_path(output, True, device), None
        except Exception as error:  # noqa: BLE001 - unknown argument, unsupported config, anything: fall back
            if isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower():
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            static_error = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    else:
        static_error = None
    output, seconds = _timed(lambda: dlm.generate(input_ids, attention_mask=attention_mask, **base), device)
    return output, seconds, "eager" if static_error is None else "eager (static failed)", static_error


def run_dlm(dlm, input_ids, attention_mask, args, device, *, steps=None, threshold=None, static: bool,
            prefill_s: dict | None = None, static_options=None) -> dict:
    """Warm-up and timed `generate` of one rule; `prefill_s` maps a decode path's base ("static", "eager") to its
    one-forward time (the prefill runs the same way whatever the options of the repeating steps)."""
    batch, new = input_ids.shape[0], args.new_tokens
    rule = dict(steps=steps) if steps is not None else dict(threshold=threshold)
    kwargs = dict(max_new_tokens=new, block_size=args.block_size, **rule)
    # Warm-up (compilation, graph capture; later calls of these shapes reuse both); a static path that failed there
    # is not tried again for the timed call.
    _, first_call_s, _, warmup_error = dlm_generate(dlm, input_ids, attention_mask, device, static, static_options,
                                                    **kwargs)
    output, seconds, path, static_error = dlm_generate(dlm, input_ids, attention_mask, device,
                                                       static and warmup_error is None, static_options, **kwargs)
    if warmup_error is not None:
        path, static_error = "eager (static failed)", warmup_error
    generated = output.sequences.shape[1] - input_ids.shape[1]
    if generated != new:
        raise RuntimeError(f"dLM generate produced {generated} new tokens, expected {new}")
    nfe = int(output.nfe)
    prefill = (prefill_s or {}).get(_path_base(path))
    excludes_prefill = prefill is not None and nfe > 1 and seconds > prefill
    # Without a prefill time for this path (or with timing noise beyond it): the mean over every forward.
    step = (seconds - prefill) / (nfe - 1) if excludes_prefill else seconds / nfe
    return dict(
        dlm_path=path,
        dlm_static_error=static_error,
        dlm_first_call_s=first_call_s,
        dlm_seconds=seconds,
        dlm_prefill_ms=None if prefill is None else prefill * 1e3,
        step_excludes_prefill=excludes_prefill,
        dlm_tok_s=batch * new / seconds,
        tpf=float(output.tokens_per_forward) if output.tokens_per_forward is not None else new / nfe,
        nfe=nfe,
        step_ms=step * 1e3,
        step_ms_total=seconds / nfe * 1e3,
    )


def _path_base(path: str) -> str:
    return path.split("+")[0]


def measure_dlm_prefill(dlm, input_ids, attention_mask, args, device, static: bool, static_options=None) -> dict:
    """Seconds of a one-forward generate (the prompt + the first masked block), per decode path base that ran."""
    kwargs = dict(max_new_tokens=args.block_size, block_size=args.block_size, steps=args.block_size)
    _, _, _, warmup_error = dlm_generate(dlm, input_ids, attention_mask, device, static, static_options, **kwargs)
    runs = [dlm_generate(dlm, input_ids, attention_mask, device, static and warmup_error is None, static_options,
                         **kwargs) for _ in range(3)]
    output, path = runs[0][0], runs[0][2]
    if warmup_error is not None:
        path = "eager (static failed)"
    return {_path_base(path): statistics.median(run[1] for run in runs)} if int(output.nfe) == 1 else {}


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------


def _ints(text: str) -> list:
    return [int(x) for x in str(text).split(",") if x.strip()]


def _floats(text: str) -> list:
    return [float(x) for x in str(text).split(",") if x.strip()]


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", required=True, help="folder for bench.json and bench.png")
    parser.add_argument("--models", default=DEFAULT_MODELS,
                        help=f"comma list of shapes among {', '.join(MODEL_SHAPES)} (default: {DEFAULT_MODELS})")
    parser.add_argument("--batches", default="1,8,32", help="comma list of batch sizes, run in this order")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--tokens-per-step", default="4",
                        help="comma list: fixed tokens committed per denoising step (TPF = K); empty for none")
    parser.add_argument("--thresholds", default="0.9", help="comma list of confidence thresholds; empty for none")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--dlm-cache", default=None, choices=["static", "dynamic"],
                        help="dLM decode path: static (cache_implementation='static', CUDA graphs; default on CUDA) "
                        "or dynamic (the eager reference; default on CPU)")
    parser.add_argument("--dlm-compile", default="on", choices=["on", "off"],
                        help="static path: torch.compile the decoder layers of the repeating steps (generate(compile=))")
    parser.add_argument("--kernels", default="auto",
                        help="static path: Triton kernels for the repeating steps (generate(kernels=)): auto, none, all "
                        "or names")
    parser.add_argument("--variants", default="",
                        help="extra dLM rows (fixed tokens per step only) with other static options, as a comma list "
                        "of COMPILE:KERNELS, e.g. 'off:auto,on:none'; at --variant-batches for --variant-models")
    parser.add_argument("--variant-batches", default="1")
    parser.add_argument("--variant-models", default="qwen3-0.6b,qwen3-8b")
    parser.add_argument("--gguf", default=None,
                        help="smollm2-135m rows use this GGUF's real weights (the converted SmolLM2-135M-Instruct)")
    parser.add_argument("--ar-cache", default="static", choices=["static", "dynamic"],
                        help="AR generate cache (static: transformers compiles the decoding step on CUDA)")
    parser.add_argument("--ar-compile", default="auto", choices=["auto", "cudagraphs", "none"],
                        help="with the static AR cache: transformers' automatic torch.compile (inductor, "
                        "reduce-overhead), the cudagraphs backend (faster to compile), or no compilation")
    parser.add_argument("--time-budget-s", type=float, default=480.0,
                        help="start no work predicted to end past this many seconds; skipped rows are recorded")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--bandwidth-mb", type=int, default=None,
                        help="copy buffer for the bandwidth measurement (default 2048 MB on CUDA, 64 on CPU)")
    parser.add_argument("--matmul-size", type=int, default=None, help="default 8192 on CUDA, 256 on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plot", action="store_true")
    return parser


@dataclass
class _Budget:
    limit_s: float
    started: float = field(default_factory=time.perf_counter)
    observed: dict = field(default_factory=dict)  # (stage, model) -> seconds; stage -> [seconds]

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def predict(self, stage: str, model: str) -> float:
        """The longest time `stage` took for `model` so far (at a smaller batch), else for any model, else 0."""
        if (stage, model) in self.observed:
            return self.observed[(stage, model)]
        return max(self.observed.get(stage, [0.0]))

    def fits(self, stages, model: str) -> bool:
        stages = [stages] if isinstance(stages, str) else stages
        return self.elapsed() + sum(self.predict(stage, model) for stage in stages) <= self.limit_s

    def record(self, stage: str, model: str, seconds: float) -> None:
        self.observed[(stage, model)] = max(seconds, self.observed.get((stage, model), 0.0))
        self.observed.setdefault(stage, []).append(seconds)


def _versions() -> dict:
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                            timeout=10, check=False).stdout.strip() or None
    except Exception:  # noqa: BLE001
        info["git_commit"] = None
    return info


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return f"cpu: {platform.processor() or platform.machine()} ({os.cpu_count()} threads)"


def _free(device: torch.device) -> None:
    gc.collect()
    try:
        torch._dynamo.reset()  # compiled graphs and their CUDA-graph pools belong to the freed model
    except Exception:  # noqa: BLE001
        pass
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


_STARTED = [time.perf_counter()]


def _log(message: str) -> None:
    if message.startswith("[bench]"):
        message = f"[bench {time.perf_counter() - _STARTED[0]:4.0f}s]" + message[len("[bench]"):]
    print(message, flush=True)


def run_bench(args) -> int:
    """Run the benchmark described by `args` (see `add_bench_arguments`); writes DIR/bench.json and DIR/bench.png."""
    budget = _Budget(args.time_budget_s)
    _STARTED[0] = budget.started
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    static = (args.dlm_cache or ("static" if device.type == "cuda" else "dynamic")) == "static"
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODEL_SHAPES]
    if unknown:
        raise ValueError(f"unknown model shapes {unknown}; known: {', '.join(MODEL_SHAPES)}")
    batches = _ints(args.batches)
    ks, thresholds = _ints(args.tokens_per_step), _floats(args.thresholds)
    main_options = {"compile": args.dlm_compile == "on", "kernels": args.kernels}
    main = [(kind, value, _variant_name(main_options), main_options)
            for kind, values in (("K", ks), ("tau", thresholds)) for value in values]
    if not main:
        raise ValueError("nothing to run: give --tokens-per-step and/or --thresholds")
    extra = [_parse_variant(spec) for spec in args.variants.split(",") if spec.strip()]
    variant_batches, variant_models = _ints(args.variant_batches), set(args.variant_models.split(","))

    def configs_for(name, batch):
        """(rule kind, value, variant name, static options) to run for this model and batch, the main variant first."""
        if batch not in variant_batches or name not in variant_models:
            return main
        return main + [("K", k, _variant_name(options), options) for options in extra for k in ks]
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "bench.json")

    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except Exception:  # noqa: BLE001
        pass
    try:
        from torch import _dynamo

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(_dynamo.config, name):
                setattr(_dynamo.config, name, max(getattr(_dynamo.config, name), 64))
    except Exception:  # noqa: BLE001
        pass

    on_cuda = device.type == "cuda"
    bandwidth = measure_copy_bandwidth(device, args.bandwidth_mb or (2048 if on_cuda else 64))
    matmul_dtype = dtype if dtype != torch.float32 or not on_cuda else torch.bfloat16
    flops = measure_matmul_flops(device, args.matmul_size or (8192 if on_cuda else 256), matmul_dtype)
    _free(device)  # give the measurement buffers back before the models' CUDA-graph pools want memory
    _log(f"[bench] {_device_name(device)}: copy bandwidth {bandwidth / 1e9:.0f} GB/s, {args.dtype} matmul "
         f"{flops / 1e12:.1f} TFLOP/s; dLM path asked: {'static' if static else 'dynamic'}; budget "
         f"{args.time_budget_s:.0f}s")

    record = {
        "device": _device_name(device),
        **_versions(),
        "command": shlex.join([os.path.basename(sys.argv[0]) if sys.argv else "bench"] + sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "bandwidth_gb_s": bandwidth / 1e9,
        "matmul_tflop_s": flops / 1e12,
        "settings": {
            "models": models, "batches": batches, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "block_size": args.block_size, "tokens_per_step": ks, "thresholds": thresholds, "dtype": args.dtype,
            "dlm_cache": "static" if static else "dynamic", "dlm_compile": args.dlm_compile, "kernels": args.kernels,
            "variants": args.variants, "variant_batches": args.variant_batches, "variant_models": args.variant_models,
            "gguf": args.gguf, "ar_cache": args.ar_cache, "ar_compile": args.ar_compile,
            "time_budget_s": args.time_budget_s, "seed": args.seed,
        },
        "definitions": (__doc__ or "Definitions Work runs").split("Definitions", 1)[1].split("Work runs", 1)[0].strip(),
        "rows": [],
    }
    rows = record["rows"]

    def save():
        record["elapsed_s"] = budget.elapsed()
        with open(json_path, "w") as handle:
            json.dump(record, handle, indent=1)

    def base_row(name, batch, kind, value, variant):
        return {"model": name, "batch": batch, "tokens_per_step": value if kind == "K" else None,
                "threshold": value if kind == "tau" else None, "variant": variant,
                "weights": "gguf" if name == "smollm2-135m" and args.gguf else "random", "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens, "block_size": args.block_size}

    def skip_all(name, batch, reason):
        for kind, value, variant, _ in configs_for(name, batch):
            rows.append({**base_row(name, batch, kind, value, variant), "skipped": reason})
        save()

    for batch in batches:
        for name in models:
            shape = MODEL_SHAPES[name]
            label = f"{name} batch {batch}"
            if not budget.fits(("build", "ar", "dlm-prefill"), name):
                _log(f"[bench] skip {label}: time budget ({budget.elapsed():.0f}s elapsed)")
                skip_all(name, batch, "time budget")
                continue
            ar = dlm = None
            try:
                started = time.perf_counter()
                if on_cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                configs = configs_for(name, batch)
                ar, dlm, mask_id = build_models(shape, block_size=args.block_size, dtype=dtype, device=device,
                                                seed=args.seed, gguf=args.gguf if name == "smollm2-135m" else None)
                budget.record("build", name, time.perf_counter() - started)
                generator = torch.Generator().manual_seed(args.seed + batch)
                input_ids = torch.randint(2, shape.vocab_size - 1, (batch, args.prompt_len), generator=generator)
                input_ids = input_ids.masked_fill(input_ids == mask_id, 2).to(device)  # never the mask token
                attention_mask = torch.ones_like(input_ids)
                weight_bytes, read_params = read_bytes_per_forward(ar)
                kv_token = kv_bytes_per_token(shape, dtype)
                mean_context = args.prompt_len + args.new_tokens / 2
                kv_read = kv_token * (mean_context + args.block_size) * batch
                common = {
                    "params": sum(p.numel() for p in ar.parameters()),
                    "weight_bytes": weight_bytes,
                    "weight_floor_ms": weight_bytes / bandwidth * 1e3,
                    "floor_ms": (weight_bytes + kv_read) / bandwidth * 1e3,
                    "compute_floor_ms": 2 * read_params * batch * args.block_size / flops * 1e3,
                    "ar_floor_ms": (weight_bytes + kv_token * mean_context * batch) / bandwidth * 1e3,
                    "ar_compute_floor_ms": 2 * read_params * batch / flops * 1e3,
                }
                common["roofline_ms"] = max(common["floor_ms"], common["compute_floor_ms"])
                common["ar_roofline_ms"] = max(common["ar_floor_ms"], common["ar_compute_floor_ms"])
                _log(f"[bench] {label}: built {common['params'] / 1e9:.2f}B params "
                     f"({common['weight_floor_ms']:.2f} ms weight floor) in {time.perf_counter() - started:.1f}s")

                started = time.perf_counter()
                try:
                    ar_result = run_ar(ar, input_ids, attention_mask, args, device)
                    _log(f"[bench] {label}: AR {ar_result['ar_path']} {ar_result['ar_tok_s']:.1f} tok/s, "
                         f"{ar_result['ar_step_ms']:.2f} ms/step (first call {ar_result['ar_first_call_s']:.1f}s)")
                except Exception as error:  # noqa: BLE001
                    ar_result = {"ar_error": f"{type(error).__name__}: {str(error)[:300]}"}
                    _log(f"[bench] {label}: AR failed: {ar_result['ar_error']}")
                    traceback.print_exc(limit=3)
                budget.record("ar", name, time.perf_counter() - started)
                ar = None
                _free(device)  # the AR model's compiled graphs and static cache go before the dLM runs

                prefill_s = {}
                try:
                    started = time.perf_counter()
                    prefill_s = measure_dlm_prefill(dlm, input_ids, attention_mask, args, device, static, main_options)
                    budget.record("dlm-prefill", name, time.perf_counter() - started)
                except Exception as error:  # noqa: BLE001
                    _log(f"[bench] {label}: dLM prefill measurement failed: {type(error).__name__}: {error}")

                for kind, value, variant, options in configs:
                    row = {**base_row(name, batch, kind, value, variant), **common, **ar_result}
                    stage = f"dlm-{kind}{value}-{variant}"
                    if not budget.fits(stage, name):
                        row["skipped"] = "time budget"
                        _log(f"[bench] skip {label} {kind}={value} {variant}: time budget")
                        rows.append(row)
                        save()
                        continue
                    started = time.perf_counter()
                    try:
                        result = run_dlm(dlm, input_ids, attention_mask, args, device, static=static,
                                         steps=value if kind == "K" else None,
                                         threshold=value if kind == "tau" else None, prefill_s=prefill_s,
                                         static_options=options)
                        row.update(result)
                        _derive(row)
                        _log(f"[bench] {label} {kind}={value} {variant}: dLM {row['dlm_path']} {row['dlm_tok_s']:.1f} tok/s "
                             f"TPF {row['tpf']:.2f} NFE {row['nfe']} step {row['step_ms']:.2f} ms "
                             f"(floor {row['floor_ms']:.2f}) speed-up {_fmt(row.get('speedup'), 2)}")
                    except Exception as error:  # noqa: BLE001
                        row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
                        _log(f"[bench] {label} {kind}={value} {variant}: dLM failed: {row['error']}")
                        traceback.print_exc(limit=3)
                    budget.record(stage, name, time.perf_counter() - started)
                    rows.append(row)
                    save()
                if on_cuda:
                    peak = torch.cuda.max_memory_allocated(device) / 2**30
                    for row in rows[-len(configs):]:
                        row["peak_memory_gib"] = peak
            except Exception as error:  # noqa: BLE001 - e.g. out of memory while building: record and go on
                _log(f"[bench] {label} failed: {type(error).__name__}: {str(error)[:300]}")
                traceback.print_exc(limit=3)
                done = {(r["model"], r["batch"], r["tokens_per_step"], r["threshold"], r["variant"]) for r in rows}
                for kind, value, variant, _ in configs_for(name, batch):
                    key = (name, batch, value if kind == "K" else None, value if kind == "tau" else None, variant)
                    if key not in done:
                        rows.append({**base_row(name, batch, kind, value, variant),
                                     "error": f"{type(error).__name__}: {str(error)[:300]}"})
                save()
            finally:
                ar = dlm = None
                _free(device)

    save()
    if not args.no_plot:
        try:
            plot_path = plot_results(record, os.path.join(args.out, "bench.png"))
            _log(f"[bench] plot: {plot_path}")
        except Exception as error:  # noqa: BLE001
            _log(f"[bench] plot failed: {type(error).__name__}: {error}")
    _log(f"[bench] {len(rows)} rows -> {json_path} ({budget.elapsed():.0f}s)")
    print(format_table(record), flush=True)
    return 0


def _variant_name(options: dict) -> str:
    return f"{'compile' if options['compile'] else 'nocompile'}+kernels={options['kernels']}"


def _parse_variant(spec: str) -> dict:
    compile_flag, _, kernels = spec.strip().partition(":")
    if compile_flag not in ("on", "off") or not kernels:
        raise ValueError(f"--variants entries are COMPILE:KERNELS with COMPILE on or off, got {spec!r}")
    return {"compile": compile_flag == "on", "kernels": kernels}


def _derive(row: dict) -> None:
    if row.get("ar_tok_s") and row.get("dlm_tok_s"):
        row["speedup"] = row["dlm_tok_s"] / row["ar_tok_s"]
    if row.get("ar_step_ms") and row.get("step_ms") and row.get("tpf"):
        row["step_speedup"] = row["tpf"] * row["ar_step_ms"] / row["step_ms"]
    if row.get("step_ms") and row.get("floor_ms"):
        row["step_over_floor"] = row["step_ms"] / row["floor_ms"]
        row["step_over_roofline"] = row["step_ms"] / row["roofline_ms"]
    if row.get("step_ms") and row.get("ar_step_ms"):
        row["step_over_ar_step"] = row["step_ms"] / row["ar_step_ms"]


# ----------------------------------------------------------------------------------------------------------------------
# Table and plot
# ----------------------------------------------------------------------------------------------------------------------


def _fmt(value, digits=1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def format_table(record: dict) -> str:
    header = (f"{'model':<13} {'bs':>3} {'rule':>6} {'AR tok/s':>9} {'dLM tok/s':>9} {'x':>5} {'TPF':>5} {'NFE':>4} "
              f"{'step ms':>8} {'AR ms':>7} {'floor':>7} {'roof':>7} {'/floor':>6} {'/AR':>5}  path")
    lines = [
        (f"# {record['device']} | torch {record['torch']} | transformers {record['transformers']} | cuda "
         f"{record['cuda']} | copy {record['bandwidth_gb_s']:.0f} GB/s | matmul {record['matmul_tflop_s']:.3g} "
         f"TFLOP/s | {record['date']}"),
        f"# {record['command']}",
        ("# x = dLM/AR tok/s (prefill incl.); step ms = one denoising step (prefill excl.); AR ms = one AR decode "
         "step; floor = weight+KV read at copy bandwidth; roof = max(floor, compute); /floor = step/floor; "
         "/AR = step/AR step"),
        header,
        "-" * len(header),
    ]
    for row in record["rows"]:
        rule = f"K={row['tokens_per_step']}" if row["tokens_per_step"] is not None else f"t={row['threshold']}"
        start = f"{row['model']:<13} {row['batch']:>3} {rule:>6} "
        if row.get("skipped"):
            lines.append(start + f"skipped ({row['skipped']})")
            continue
        if row.get("error") and not row.get("ar_tok_s"):
            lines.append(start + f"error: {row['error'][:90]}")
            continue
        path = row.get("dlm_path") or "-"
        if row.get("ar_path"):
            path += f" / AR {row['ar_path']}"
        if row.get("error"):
            path += f" dLM error: {row['error'][:60]}"
        if row.get("ar_error"):
            path += f" AR error: {row['ar_error'][:60]}"
        lines.append(
            start + f"{_fmt(row.get('ar_tok_s')):>9} {_fmt(row.get('dlm_tok_s')):>9} {_fmt(row.get('speedup'), 2):>5} "
            f"{_fmt(row.get('tpf'), 2):>5} {row.get('nfe') if row.get('nfe') is not None else '-':>4} "
            f"{_fmt(row.get('step_ms'), 2):>8} {_fmt(row.get('ar_step_ms'), 2):>7} {_fmt(row.get('floor_ms'), 2):>7} "
            f"{_fmt(row.get('roofline_ms'), 2):>7} {_fmt(row.get('step_over_floor'), 2):>6} "
            f"{_fmt(row.get('step_over_ar_step'), 2):>5}  {path}"
        )
    return "\n".join(lines)


def plot_results(record: dict, path: str) -> str:
    """Per model: dLM/AR speed-up vs batch (a line per rule), and ms per step vs batch next to the floors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The main variant only (every model and batch has it); the extra variants are in the table and the JSON.
    main_variant = record["rows"][0].get("variant") if record["rows"] else None
    rows = [r for r in record["rows"] if not r.get("skipped") and r.get("variant") == main_variant]
    models = list(dict.fromkeys(r["model"] for r in record["rows"]))
    if not models:
        raise ValueError("no rows to plot")
    fig, axes = plt.subplots(2, len(models), figsize=(3.6 * len(models), 6.6), squeeze=False)
    rules = list(dict.fromkeys((r["tokens_per_step"], r["threshold"]) for r in rows))
    for col, model in enumerate(models):
        top, bottom = axes[0][col], axes[1][col]
        mine = [r for r in rows if r["model"] == model]
        for k, tau in rules:
            label = f"K={k}" if k is not None else f"tau={tau}"
            pts = sorted((r["batch"], r) for r in mine if r["tokens_per_step"] == k and r["threshold"] == tau)
            sp = [(b, r["speedup"]) for b, r in pts if r.get("speedup")]
            if sp:
                top.plot(*zip(*sp), marker="o", label=label)
            st = [(b, r["step_ms"]) for b, r in pts if r.get("step_ms")]
            if st:
                bottom.plot(*zip(*st), marker="o", label=f"dLM step {label}")
        by_batch = {}
        for r in mine:
            by_batch.setdefault(r["batch"], r)
        batches = sorted(by_batch)
        for key, label, style in (("ar_step_ms", "AR step", "k-"), ("floor_ms", "read floor", "k--"),
                                  ("roofline_ms", "roofline (block)", "k:")):
            pts = [(b, by_batch[b][key]) for b in batches if by_batch[b].get(key)]
            if pts:
                bottom.plot(*zip(*pts), style, label=label, linewidth=1)
        top.axhline(1.0, color="grey", linewidth=0.8)
        top.set_title(model)
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            if batches:
                ax.set_xticks(batches)
                ax.set_xticklabels([str(b) for b in batches])
            ax.set_xlabel("batch")
            ax.grid(True, alpha=0.3)
        bottom.set_yscale("log")
        if col == 0:
            top.set_ylabel("dLM tok/s / AR tok/s")
            bottom.set_ylabel("ms per forward")
        for ax, size in ((top, 7), (bottom, 6)):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=size)
            elif ax is top:
                ax.text(0.5, 0.5, "no rows (skipped)", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"{record['device']} | block {record['settings']['block_size']}, prompt "
                 f"{record['settings']['prompt_len']}, {record['settings']['new_tokens']} new | copy "
                 f"{record['bandwidth_gb_s']:.0f} GB/s", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_bench(args)
    except ValueError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

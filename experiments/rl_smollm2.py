"""RL fine-tuning of the converted SmolLM2-135M-Instruct on a verifiable task: the likelihood estimators compared.

One self-contained GPU run (issue 7). The start:
- with `--adapter DIR` (a LoRA adapter from `efficient-dlm train --lora`, e.g. the chat-trained conversion): the
  GGUF converted with the settings the adapter's conversion.json records, the adapter merged in;
- without: the GGUF converted with --block-size (in-place prediction), then taught the task's answer format by a
  short SFT run of the conversion trainer (`--sft-steps`), so that it starts right sometimes but rarely.
Then, from that same start for each run of `--runs` with the same budget (steps, rollouts, lr, seed): held-out
accuracy, mean reward and tokens per forward, greedy and at the rollout temperature (what RL optimises), before,
every --eval-every steps and after RL. A run is an estimator (`elbo`, `d1`, `trace`), optionally `@B` for another
decode/scoring block size: `trace@1` decodes one token per step and scores the exact autoregressive likelihood of
the same weights — plain GRPO, the control that tells an estimator's failure from the setup's. Prints a table;
writes rl_smollm2.json (with versions, device, the exact command) and rl_smollm2.png (training reward and held-out
accuracy over steps, every run) into --out.

    python experiments/rl_smollm2.py --gguf PATH [--adapter DIR] --out DIR [--steps 80] [--runs elbo,d1,trace]

Earlier H100 runs (ELBO and d1 only; experiments/results/rl_smollm2_run1.json, rl_smollm2.json,
rl_smollm2_run3.json): at lr 1e-5, 3e-6 and 1e-6 both lowered held-out accuracy while tokens per forward rose.
    python experiments/rl_smollm2.py --out /tmp/smoke --steps 2 --eval-n 4 --sft-steps 2   # CPU smoke run
    python experiments/rl_smollm2.py --out DIR --merge A/rl_smollm2.json B/rl_smollm2.json   # runs of two calls
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import TrainerCallback  # noqa: E402

from efficient_dlm.conversion import convert, embedded_gguf_path  # noqa: E402
from efficient_dlm.training import (  # noqa: E402
    DiffusionGRPOConfig,
    DiffusionGRPOTrainer,
    DlmConversionConfig,
    DlmConversionTrainer,
    TokenRowsDataset,
    evaluate_on_task,
    get_task,
    sft_row,
)
from efficient_dlm.training.grpo import LIKELIHOOD_ESTIMATORS, encode_prompts  # noqa: E402
from efficient_dlm.training.rl_cli import parse_task_options  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DEFAULT_RUNS = "elbo,d1,trace,trace@1"


def load_start(args):
    """(model, tokenizer, description) of the starting point, before any task SFT."""
    gguf = args.gguf or str(embedded_gguf_path())
    if args.adapter:
        from peft import PeftModel
        from transformers import AutoTokenizer

        record = json.loads((Path(args.adapter) / "conversion.json").read_text())
        result = convert(gguf, block_size=int(record["block_size"]), shift_logits=bool(record["shift_logits"]),
                         mask_token=record.get("mask_token"))
        if result.model.config.mask_token_id != record.get("mask_token_id", result.model.config.mask_token_id):
            raise ValueError(f"converting {gguf} gave mask token id {result.model.config.mask_token_id}; the adapter "
                             f"was trained with {record['mask_token_id']}")
        model = PeftModel.from_pretrained(result.model, args.adapter).merge_and_unload()
        model.requires_grad_(True)  # peft froze the base for the adapter; the merged weights train in full
        tokenizer = AutoTokenizer.from_pretrained(args.adapter) if (
            Path(args.adapter) / "tokenizer_config.json").is_file() else result.tokenizer
        return model, tokenizer, f"{gguf} + adapter {args.adapter} (merged), block {record['block_size']}"
    result = convert(gguf, block_size=args.block_size, shift_logits=False, mask_token=args.mask_token)
    return result.model, result.tokenizer, f"{gguf} converted, block {args.block_size}"


def teach_format(model, tokenizer, task, args, out: Path) -> float:
    """A short SFT run (conversion trainer, prompt never masked) on the task's reference answers."""
    rows = task.make_rows(args.sft_steps * args.sft_batch, seed=args.seed + 7, style="chat")
    prompt_ids = encode_prompts(tokenizer, [row["prompt"] for row in rows])
    block = model.config.block_size
    sft = TokenRowsDataset([sft_row(p, tokenizer(row["answer"], add_special_tokens=False)["input_ids"],
                                    block_size=block, eos_token_id=tokenizer.eos_token_id)
                            for p, row in zip(prompt_ids, rows)])
    longest = max(len(row["input_ids"]) for row in sft)
    config = DlmConversionConfig(
        output_dir=str(out / "sft"), max_steps=args.sft_steps, per_device_train_batch_size=args.sft_batch,
        learning_rate=args.sft_lr, warmup_steps=max(1, args.sft_steps // 10), bf16=DEVICE == "cuda",
        seq_len=longest + (-longest % block), logging_steps=max(1, args.sft_steps // 5), save_strategy="no",
        report_to=[], seed=args.seed, disable_tqdm=True, dataloader_pin_memory=False,
    )
    started = time.time()
    trainer = DlmConversionTrainer(model, config, train_dataset=sft)
    trainer.train()
    return time.time() - started


class HeldOutCurve(TrainerCallback):
    """Held-out accuracy every `every` optimiser steps (and at the last one)."""

    def __init__(self, measure, every: int):
        self.measure, self.every, self.points = measure, every, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            result = self.measure(model)
            self.points.append({"step": state.global_step, **{k: v for k, v in result.items() if k != "examples"}})
            print(f"  step {state.global_step}: held-out accuracy {result['accuracy']:.3f} (sampled "
                  f"{result['sampled']['accuracy']:.3f}), reward {result['mean_reward']:.3f}, TPF "
                  f"{result['tokens_per_forward']:.2f}", flush=True)


def parse_runs(text: str, default_block: int) -> list[tuple[str, str, int]]:
    """`elbo,trace@1` -> [(name, estimator, block size)]."""
    runs = []
    for name in text.split(","):
        estimator, _, block = name.strip().partition("@")
        if estimator not in LIKELIHOOD_ESTIMATORS or (block and not block.isdigit()):
            raise SystemExit(f"--runs: {name!r} is not ESTIMATOR[@BLOCK] with ESTIMATOR in {LIKELIHOOD_ESTIMATORS}")
        runs.append((name.strip(), estimator, int(block) if block else default_block))
    return runs


def run_rl(name, estimator, block_size, start_state, model, tokenizer, task, train_rows, measure, base_point, args,
           out):
    model.load_state_dict(start_state)
    model.train()
    rollouts = args.prompts_per_step * args.num_generations
    if rollouts % args.micro_batch or args.micro_batch % args.num_generations:
        raise SystemExit(f"--micro-batch {args.micro_batch} must divide the {rollouts} rollouts of a step and be a "
                         f"multiple of --num-generations {args.num_generations}")
    config = DiffusionGRPOConfig(
        output_dir=str(out / f"grpo-{name}"), max_steps=args.steps, learning_rate=args.lr,
        lr_scheduler_type="constant_with_warmup", warmup_steps=max(1, args.steps // 10),
        # The step's rollouts are generated at once and scored in micro-batches (TRL's steps_per_generation follows
        # the accumulation): one optimiser step per rollout batch, as on-policy as one big batch.
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=rollouts // args.micro_batch,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length, temperature=args.temperature, threshold=args.threshold,
        block_size=block_size, likelihood_estimator=estimator, beta=0.0, bf16=DEVICE == "cuda",
        logging_steps=1, save_strategy="no", report_to=[], seed=args.seed, disable_tqdm=True,
        dataloader_pin_memory=False, use_cpu=DEVICE == "cpu", gradient_checkpointing=False,
    )
    curve = HeldOutCurve(lambda m: measure(m, block_size), args.eval_every)
    curve.points.append(dict(base_point, step=0))
    trainer = DiffusionGRPOTrainer(model, reward_funcs=task.reward, args=config, train_dataset=train_rows,
                                   processing_class=tokenizer, callbacks=[curve])
    started = time.time()
    trainer.train()
    seconds = time.time() - started
    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    final = measure(trainer.accelerator.unwrap_model(trainer.model), block_size)
    return {
        "estimator": estimator, "block_size": block_size, "train_seconds": seconds,
        "reward": [{"step": e["step"], "reward": e["reward"], "reward_std": e.get("reward_std"),
                    "tokens_per_forward": e.get("diffusion/tokens_per_forward"),
                    "completion_length": e.get("completions/mean_length"), "entropy": e.get("entropy")}
                   for e in logs],
        "held_out_curve": curve.points,
        "start": base_point,
        "final": final,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default=None, help="SmolLM2 GGUF (default: the embedded one)")
    parser.add_argument("--adapter", default=None, help="LoRA adapter folder to merge into the converted base")
    parser.add_argument("--out", required=True)
    parser.add_argument("--task", default="addition")
    parser.add_argument("--task-option", action="append", default=None, metavar="KEY=VALUE",
                        help="task option (default for addition: digits=3, well below saturation after the SFT)")
    parser.add_argument("--block-size", type=int, default=8, help="conversion block without --adapter")
    parser.add_argument("--mask-token", default=None, help="mask token without --adapter (default: conversion's)")
    parser.add_argument("--sft-steps", type=int, default=None,
                        help="task-format SFT steps before RL (default: 0 with --adapter, else 150)")
    parser.add_argument("--sft-batch", type=int, default=32)
    parser.add_argument("--sft-lr", type=float, default=5e-5)
    parser.add_argument("--steps", type=int, default=80, help="RL optimiser steps per run")
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="comma-separated ESTIMATOR[@BLOCK] (default: %(default)s)")
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=32,
                        help="rollouts per scoring forward (the trace estimator forwards up to block-size copies)")
    parser.add_argument("--max-completion-length", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-6,
                        help="RL learning rate (full fine-tuning; 1e-5 made held-out accuracy fall on the H100)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--eval-n", type=int, default=256, help="held-out problems")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--eval-batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                        help="run nothing: merge the rl_smollm2.json of calls that differ only in --runs into --out")
    args = parser.parse_args()
    if args.merge:
        print_table(merge(args.merge, Path(args.out)))
        return 0
    if args.task_option is None:
        args.task_option = ["digits=3"] if args.task == "addition" else []
    if args.sft_steps is None:
        args.sft_steps = 0 if args.adapter else 150
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    torch.manual_seed(args.seed)

    task = get_task(args.task, **parse_task_options(args.task_option))
    model, tokenizer, description = load_start(args)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(DEVICE)
    print(f"start: {description}; task {task.name} {parse_task_options(args.task_option)}", flush=True)
    sft_seconds = teach_format(model, tokenizer, task, args, out) if args.sft_steps else 0.0
    model = model.float().to(DEVICE)  # the SFT trainer may leave it wrapped or in another dtype
    start_state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}

    held_out = task.make_rows(args.eval_n, seed=args.seed + 1_000_003, style="chat")
    train_rows = task.make_dataset(max(args.steps * args.prompts_per_step * 2, 64), seed=args.seed, style="chat")

    def measure(m, block_size):
        """Held-out accuracy, reward and TPF, greedy and at the rollout temperature (the policy RL optimises)."""
        greedy = evaluate_on_task(m, tokenizer, task, held_out, max_new_tokens=args.max_completion_length,
                                  block_size=block_size, threshold=args.threshold, batch_size=args.eval_batch)
        sampled = evaluate_on_task(m, tokenizer, task, held_out, max_new_tokens=args.max_completion_length,
                                   block_size=block_size, threshold=args.threshold, batch_size=args.eval_batch,
                                   temperature=args.temperature, seed=args.seed)
        greedy["sampled"] = {k: v for k, v in sampled.items() if k != "examples"}
        return greedy

    starts = {}
    runs = {}
    for name, estimator, block_size in parse_runs(args.runs, model.config.block_size):
        model.load_state_dict(start_state)
        if block_size not in starts:
            starts[block_size] = measure(model, block_size)
            base = starts[block_size]
            print(f"start (block {block_size}): held-out accuracy {base['accuracy']:.3f} (sampled "
                  f"{base['sampled']['accuracy']:.3f}), TPF {base['tokens_per_forward']:.2f}; e.g. "
                  f"{base['examples'][:2]}", flush=True)
        base_point = {k: v for k, v in starts[block_size].items() if k != "examples"}
        print(f"RL run {name}: {estimator} estimator, block {block_size}, {args.steps} steps", flush=True)
        runs[name] = run_rl(name, estimator, block_size, start_state, model, tokenizer, task, train_rows, measure,
                            base_point, args, out)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()

    import transformers
    import trl

    results = {
        "task": task.name, "task_options": parse_task_options(args.task_option), "start": description,
        "sft_steps": args.sft_steps, "sft_seconds": sft_seconds, "block_size": model.config.block_size,
        "start_eval": {str(block): point for block, point in starts.items()}, "runs": runs,
        "command": " ".join(["python", *sys.argv]), "args": vars(args),
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "cuda": torch.version.cuda, "seconds": time.time() - started,
    }
    (out / "rl_smollm2.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "rl_smollm2.png")
    print_table(results)
    return 0


def merge(paths: list[str], out: Path) -> dict:
    """One result from runs made by separate calls of this script with the same settings (each call must fit one
    10-minute GPU command): the runs side by side, every command recorded."""
    parts = [json.loads(Path(path).read_text()) for path in paths]
    settings = [{k: v for k, v in part["args"].items() if k not in ("runs", "out")} for part in parts]
    if any(setting != settings[0] for setting in settings[1:]):
        raise SystemExit("--merge: the results were made with different settings (only --runs and --out may differ)")
    merged = dict(parts[0], runs={}, start_eval={}, command=[part["command"] for part in parts],
                  seconds=sum(part["seconds"] for part in parts))
    for part in parts:
        for name in part["runs"]:
            if name in merged["runs"]:
                raise SystemExit(f"--merge: run {name!r} appears twice")
        merged["runs"].update(part["runs"])
        merged["start_eval"].update(part["start_eval"])
    merged["args"] = dict(merged["args"], runs=",".join(merged["runs"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "rl_smollm2.json").write_text(json.dumps(merged, indent=2))
    plot(merged, out / "rl_smollm2.png")
    return merged


def print_table(results):
    temperature = results["args"]["temperature"]
    print(f"\n{'run':<10} {'':<6} {'held-out acc':>12} {'mean reward':>12} {'TPF':>6} {f'acc T={temperature:g}':>10} "
          f"{f'reward T={temperature:g}':>12} {'RL seconds':>11}")
    for name, run in results["runs"].items():
        for label, point, seconds in (("start", run["start"], ""), ("after", run["final"],
                                                                   f"{run['train_seconds']:.0f}")):
            sampled = point.get("sampled", {})
            print(f"{name:<10} {label:<6} {point['accuracy']:>12.3f} {point['mean_reward']:>12.3f} "
                  f"{point['tokens_per_forward']:>6.2f} {sampled.get('accuracy', float('nan')):>10.3f} "
                  f"{sampled.get('mean_reward', float('nan')):>12.3f} {seconds:>11}")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(17, 4.5))
    temperature = results["args"]["temperature"]
    for name, run in results["runs"].items():
        rewards = [r["reward"] for r in run["reward"]]
        window = max(1, len(rewards) // 10)  # a running mean: one step's reward is a noisy 16-prompt sample
        smoothed = [sum(rewards[max(0, i - window + 1):i + 1]) / len(rewards[max(0, i - window + 1):i + 1])
                    for i in range(len(rewards))]
        left.plot([r["step"] for r in run["reward"]], smoothed, label=name)
        steps = [p["step"] for p in run["held_out_curve"]]
        middle.plot(steps, [p["accuracy"] for p in run["held_out_curve"]], marker="o", label=name)
        right.plot(steps, [p["sampled"]["accuracy"] for p in run["held_out_curve"]], marker="o", label=name)
    left.set(title=f"training reward ({results['task']}, rollouts at T={temperature:g}; running mean)",
             xlabel="step", ylabel="mean reward")
    middle.set(title=f"held-out accuracy, greedy (threshold {results['args']['threshold']})", xlabel="step",
               ylabel="accuracy")
    right.set(title=f"held-out accuracy, sampled at T={temperature:g}", xlabel="step", ylabel="accuracy")
    for axis in (left, middle, right):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())

"""`efficient-dlm rl`: RL fine-tuning of an Efficient-DLM model on a verifiable task (diffusion GRPO).

    efficient-dlm rl --model DIR --task addition --output OUT [--max-steps 200] [--lora] ...

`--model` is an Efficient-DLM checkpoint folder (or an AR checkpoint, converted first, as `train --base` does).
The task generates its own training and held-out problems (`efficient_dlm.training.tasks`). Held-out accuracy,
mean reward and tokens per forward are measured before and after training (greedy decoding). The output is a full
checkpoint folder, or with `--lora` an adapter folder, with `rl.json` (the recipe, the measurements, the command)
and `train_log.jsonl`. It is an ordinary TRL/transformers Trainer run: CPU, one GPU, or `accelerate launch`.
"""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from .adapters import LORA_EXTRA_TRAINABLES

RL_RECORD = "rl.json"


def add_rl_arguments(parser: argparse.ArgumentParser) -> None:
    """The `rl` command's flags (efficient_dlm.cli wires them under `efficient-dlm rl`)."""
    # No TRL import here: building the parser of `efficient-dlm` must stay cheap (the config validates the names).
    from .tasks import PROMPT_STYLES, TASKS

    where = parser.add_argument_group("model and task")
    where.add_argument("--model", required=True,
                       help="Efficient-DLM checkpoint folder (an AR checkpoint or .gguf is converted first)")
    where.add_argument("--task", required=True, help=f"verifiable task, one of {sorted(TASKS)}")
    where.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                       help="task option, e.g. digits=3 (repeatable; see efficient_dlm.training.tasks)")
    where.add_argument("--prompt-style", default=None, choices=PROMPT_STYLES,
                       help="chat (the tokenizer's chat template) or plain text (default: chat when the tokenizer "
                            "has a chat template)")
    where.add_argument("--train-size", type=int, default=4096, help="generated training problems")
    where.add_argument("--eval-size", type=int, default=128, help="held-out problems, measured before and after "
                                                                   "(0 = skip)")
    where.add_argument("--output", required=True, help="folder to write (refused if it exists, unless --overwrite)")
    where.add_argument("--overwrite", action="store_true")
    where.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    where.add_argument("--block-size", type=int, default=None,
                       help="decode and scoring block (default: the checkpoint's)")

    rl = parser.add_argument_group("GRPO")
    rl.add_argument("--estimator", default="trace",
                    help="sequence likelihood: trace (each token in the decoder state it was committed from, "
                         "default), elbo (quadrature ELBO) or d1 (one-step estimate)")
    rl.add_argument("--quadrature-nodes", type=int, default=2)
    rl.add_argument("--num-generations", type=int, default=8, help="completions per prompt (>= 2)")
    rl.add_argument("--max-completion-length", type=int, default=64)
    rl.add_argument("--threshold", type=float, default=0.9, help="decoding confidence threshold tau in (0, 1]")
    rl.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    rl.add_argument("--beta", type=float, default=0.0, help="KL coefficient to the starting policy")
    rl.add_argument("--num-iterations", type=int, default=1, help="updates per generation batch")
    rl.add_argument("--epsilon", type=float, default=0.2, help="ratio clipping range")
    rl.add_argument("--scale-rewards", default="group", choices=["group", "batch", "none"])

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--max-steps", type=int, default=200)
    optim.add_argument("--batch-size", type=int, default=32,
                       help="completions per device per micro-batch (a multiple of --num-generations)")
    optim.add_argument("--grad-accum", type=int, default=1)
    optim.add_argument("--lr", type=float, default=1e-5)
    optim.add_argument("--warmup-steps", type=float, default=0)
    optim.add_argument("--max-grad-norm", type=float, default=1.0)
    optim.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")
    optim.add_argument("--seed", type=int, default=0)

    lora = parser.add_argument_group("LoRA (output: an adapter folder)")
    lora.add_argument("--lora", action="store_true", help="train a LoRA adapter on q/k/v/o/gate/up/down")
    lora.add_argument("--lora-r", type=int, default=16)
    lora.add_argument("--lora-alpha", type=int, default=None, help="default 2 * r")
    lora.add_argument("--lora-train", nargs="*", default=[], choices=sorted(LORA_EXTRA_TRAINABLES) + ["mask_token"],
                      help="also train these in full (default: none)")

    run = parser.add_argument_group("run")
    run.add_argument("--logging-steps", type=int, default=10)
    run.add_argument("--no-progress", action="store_true")


def parse_task_options(items: list[str]) -> dict:
    """`KEY=VALUE` strings -> {key: int, float or str}."""
    options = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--task-option must look like KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        for convert in (int, float):
            try:
                options[key] = convert(value)
                break
            except ValueError:
                continue
        else:
            options[key] = value
    return options


def _load_model(args):
    """(base, as training/cli.load_base gives it): an Efficient-DLM folder loaded, anything else converted."""
    from .cli import load_base

    train_like = argparse.Namespace(base=args.model, dtype=args.dtype, shift_logits=None, mask_token=None,
                                    block_size=args.block_size)
    return load_base(train_like)


def _grpo_config(args, checkpoint_dir: Path):
    import torch

    from .grpo import DiffusionGRPOConfig

    return DiffusionGRPOConfig(
        output_dir=str(checkpoint_dir), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm, bf16=args.bf16, seed=args.seed, logging_steps=args.logging_steps,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
        block_size=args.block_size, threshold=args.threshold, temperature=args.temperature, beta=args.beta,
        num_iterations=args.num_iterations, epsilon=args.epsilon, scale_rewards=args.scale_rewards,
        likelihood_estimator=args.estimator, quadrature_nodes=args.quadrature_nodes, report_to="none",
        save_strategy="no", disable_tqdm=args.no_progress, lr_scheduler_type="constant_with_warmup",
        dataloader_pin_memory=torch.cuda.is_available(),
    )


def run_rl(args) -> int:
    """Run `efficient-dlm rl` from parsed arguments (see `add_rl_arguments`); 0 on success."""
    import torch
    import transformers

    from ..evaluation.benchmark import _versions
    from .adapters import lora_config
    from .cli import _check_output, write_trained_output
    from .grpo import DiffusionGRPOTrainer, evaluate_on_task
    from .tasks import get_task

    started = time.perf_counter()
    task = get_task(args.task, **parse_task_options(args.task_option))  # bad names fail before anything loads
    output = _check_output(args)
    checkpoint_dir = Path(f"{output}.checkpoints")
    config = _grpo_config(args, checkpoint_dir)
    transformers.set_seed(args.seed)

    base = _load_model(args)
    model, tokenizer = base.model, base.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    style = args.prompt_style or ("chat" if getattr(tokenizer, "chat_template", None) else "plain")
    train_rows = task.make_dataset(args.train_size, seed=args.seed, style=style)
    held_out = task.make_rows(args.eval_size, seed=args.seed + 1_000_003, style=style) if args.eval_size else []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    measure = dict(max_new_tokens=args.max_completion_length, block_size=args.block_size, threshold=args.threshold)
    before = evaluate_on_task(model.to(device), tokenizer, task, held_out, **measure) if held_out else None
    if before:
        print(f"before: accuracy {before['accuracy']:.3f}, mean reward {before['mean_reward']:.3f}, "
              f"tokens per forward {before['tokens_per_forward']:.2f}", flush=True)

    peft_config = None
    if args.lora:
        peft_config = lora_config(r=args.lora_r, lora_alpha=args.lora_alpha, train=tuple(args.lora_train),
                                  mask_token_id=model.config.mask_token_id,
                                  tie_word_embeddings=bool(model.config.tie_word_embeddings))
    trainer = DiffusionGRPOTrainer(model, reward_funcs=task.reward, args=config, train_dataset=train_rows,
                                   processing_class=tokenizer, peft_config=peft_config)
    trainer.train()
    trained = trainer.accelerator.unwrap_model(trainer.model)
    after = evaluate_on_task(trained, tokenizer, task, held_out, **measure) if held_out else None
    if after:
        print(f"after:  accuracy {after['accuracy']:.3f}, mean reward {after['mean_reward']:.3f}, "
              f"tokens per forward {after['tokens_per_forward']:.2f}", flush=True)

    record = {
        "stage": "rl", "task": args.task, "task_options": parse_task_options(args.task_option),
        "prompt_style": style, "estimator": args.estimator, "quadrature_nodes": args.quadrature_nodes,
        "block_size": trainer.block_size, "threshold": args.threshold, "steps": int(trainer.state.global_step),
        "num_generations": args.num_generations, "learning_rate": args.lr, "lora": bool(args.lora),
        "held_out": {"size": len(held_out), "before": before, "after": after},
        "versions": _versions(), "seconds": round(time.perf_counter() - started, 1),
        "command": getattr(args, "command_line", None) or shlex.join(["efficient-dlm", "rl", *sys.argv[1:]]),
    }
    record_text = json.dumps(record, indent=2) + "\n"
    write_trained_output(trainer, base, output, lora=args.lora, base_output=None,
                         write_records=lambda folder: (folder / RL_RECORD).write_text(record_text))
    if trainer.is_world_process_zero():
        print(f"wrote {'adapter' if args.lora else 'checkpoint'} {output}: {trainer.state.global_step} steps, "
              f"{time.perf_counter() - started:.0f}s", flush=True)
    trainer.accelerator.wait_for_everyone()
    return 0

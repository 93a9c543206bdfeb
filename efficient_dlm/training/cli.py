"""`efficient-dlm train`: convert an AR checkpoint (or take an Efficient-DLM one), train it, write the result.

    efficient-dlm train --base SRC --data PATH [PATH ...] --output DIR [options]

The output is a complete checkpoint folder, as `convert` writes it (weights, config with auto_map, the model code,
tokenizer, generation_config.json, conversion.json), or with `--lora` a peft adapter folder; either way with
`training.json` (the recipe, read by the model card) and `train_log.jsonl` (the Trainer's log). The command is an
ordinary `transformers.Trainer` run, so it runs on a CPU, on one GPU, and under `accelerate launch` (DDP/FSDP)
unchanged.
"""

import argparse
import json
import logging
import shlex
import shutil
import sys
import time
from pathlib import Path

from .adapters import LORA_EXTRA_TRAINABLES
from .masking import MASKING_SCHEDULES
from .objective import ATTENTION_LAYOUTS, LOSS_WEIGHTINGS

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 32
TRAIN_LOG = "train_log.jsonl"


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The `train` command's flags (efficient_dlm.cli wires them under `efficient-dlm train`)."""
    where = parser.add_argument_group("model and data")
    where.add_argument("--base", default=None,
                       help="AR checkpoint to convert (transformers folder, Hub id or .gguf; default: the embedded "
                            "SmolLM2-135M-Instruct), or an Efficient-DLM checkpoint folder to train further")
    where.add_argument("--data", nargs="+", required=True,
                       help="training data: text files, folders (searched for .txt/.md/.rst/.py/.jsonl), glob "
                            "patterns, .jsonl files (`text` or chat `messages` rows) or hf:owner/name")
    where.add_argument("--eval-data", nargs="+", default=None, help="held-out data, same forms as --data")
    where.add_argument("--output", required=True, help="folder to write (refused if it exists, unless --overwrite)")
    where.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    where.add_argument("--text-field", default="text", help="field of JSONL/Hub rows holding the text (default text)")
    where.add_argument("--split", default="train", help="split of an hf: dataset (default train)")
    where.add_argument("--max-tokens", type=int, default=None, help="tokenise at most this many training tokens")

    conversion = parser.add_argument_group("conversion (when --base is an AR checkpoint)")
    conversion.add_argument("--block-size", type=int, default=None,
                            help=f"training block (default: {DEFAULT_BLOCK_SIZE}, or the checkpoint's own)")
    conversion.add_argument("--shift-logits", action="store_true", default=None,
                            help="Fast-dLLM v2 token shift (default: Efficient-DLM in-place prediction)")
    conversion.add_argument("--mask-token", default=None, help="mask token string or id already in the vocabulary")
    conversion.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                            help="weights' dtype (default float32; see --bf16 for mixed precision)")

    recipe = parser.add_argument_group("diffusion recipe")
    recipe.add_argument("--seq-len", type=int, default=512,
                        help="tokens per packed row, or the longest SFT row; a multiple of the block size")
    recipe.add_argument("--masking", default="position_dependent", choices=MASKING_SCHEDULES)
    recipe.add_argument("--lambda", dest="mask_lambda", type=float, default=0.1,
                        help="half-life ratio of position-dependent masking, in (0, 1] (default 0.1)")
    recipe.add_argument("--complementary", action="store_true", help="add the complementary-mask copy")
    recipe.add_argument("--weighting", default="elbo", choices=LOSS_WEIGHTINGS)
    recipe.add_argument("--attention", default="bd3", choices=ATTENTION_LAYOUTS,
                        help="training layout: bd3 (clean context), or the ablations noisy_context, bidirectional")
    recipe.add_argument("--eps", type=float, default=1e-3, help="noise levels t ~ U(eps, 1)")
    recipe.add_argument("--sft", action="store_true",
                        help="chat SFT: rows are conversations, the prompt is never masked")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--max-steps", type=int, default=-1, help="optimiser steps (default: --epochs over the data)")
    optim.add_argument("--epochs", type=float, default=1.0)
    optim.add_argument("--batch-size", type=int, default=8, help="rows per device per micro-batch")
    optim.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    optim.add_argument("--lr", type=float, default=1e-5, help="AdamW peak learning rate (paper: 1e-5)")
    optim.add_argument("--lr-scheduler", default="cosine")
    optim.add_argument("--warmup-steps", type=float, default=0,
                       help="warmup steps (a number below 1 is a fraction of the training steps)")
    optim.add_argument("--weight-decay", type=float, default=0.0)
    optim.add_argument("--max-grad-norm", type=float, default=1.0)
    optim.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")
    optim.add_argument("--gradient-checkpointing", action="store_true")
    optim.add_argument("--attn-implementation", default=None, choices=["sdpa", "eager", "flex_attention"],
                       help="attention backend (default: the model's, sdpa)")
    optim.add_argument("--seed", type=int, default=0)

    lora = parser.add_argument_group("LoRA (output: an adapter folder)")
    lora.add_argument("--lora", action="store_true", help="train a LoRA adapter on q/k/v/o/gate/up/down")
    lora.add_argument("--lora-r", type=int, default=16)
    lora.add_argument("--lora-alpha", type=int, default=None, help="default 2 * r")
    lora.add_argument("--lora-dropout", type=float, default=0.0)
    lora.add_argument("--lora-train", nargs="*", default=["norms", "mask_token"],
                      choices=sorted(LORA_EXTRA_TRAINABLES) + ["mask_token"],
                      help="also train these in full: embeddings, norms, head (large), or only the mask token's "
                           "embedding row (default: norms mask_token)")
    lora.add_argument("--base-output", default=None,
                      help="with --lora from an AR base: also write the converted base checkpoint here and point the "
                           "adapter at it (otherwise the adapter records how to convert its base again)")

    run = parser.add_argument_group("run")
    run.add_argument("--logging-steps", type=int, default=10)
    run.add_argument("--eval-steps", type=int, default=None,
                     help="evaluate --eval-data every N steps (default: once, at the end)")
    run.add_argument("--save-steps", type=int, default=0,
                     help="write a resumable Trainer checkpoint every N steps into --checkpoint-dir (0 = never)")
    run.add_argument("--checkpoint-dir", default=None, help="Trainer checkpoints (default: OUTPUT.checkpoints)")
    run.add_argument("--resume", nargs="?", const="latest", default=None,
                     help="resume from a Trainer checkpoint folder, or the latest in --checkpoint-dir")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")


# ----------------------------------------------------------------------------------------------------------------------


def _is_dlm_checkpoint(base) -> bool:
    if base is None:
        return False
    config = Path(base).expanduser() / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "efficient_dlm"
    except (OSError, json.JSONDecodeError):
        return False


class _Base:
    """What training starts from: the model, its tokenizer, and what the output folder must say about it."""

    def __init__(self, model, tokenizer, conversion: dict, previous_stages: list, folder: Path | None,
                 source_description: str, conversion_result=None):
        self.model, self.tokenizer = model, tokenizer
        self.conversion = conversion  # conversion.json of the result
        self.previous_stages = previous_stages
        self.folder = folder  # an Efficient-DLM checkpoint folder, when the base is one
        self.source_description = source_description
        self.conversion_result = conversion_result


def load_base(args) -> _Base:
    """Convert `--base`, or load it when it is already an Efficient-DLM checkpoint folder."""
    from ..conversion import CONVERSION_RECORD, conversion_record, convert
    from .trainer import read_training_record

    if _is_dlm_checkpoint(args.base):
        import torch
        from transformers import AutoTokenizer

        from ..modeling_efficient_dlm import EfficientDlmForMaskedDiffusion

        folder = Path(args.base).expanduser().resolve()
        model = EfficientDlmForMaskedDiffusion.from_pretrained(folder, dtype=getattr(torch, args.dtype))
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if args.shift_logits is not None and args.shift_logits != model.config.shift_logits:
            raise ValueError(f"--shift-logits conflicts with the checkpoint {folder} (shift_logits="
                             f"{model.config.shift_logits}); the token shift is fixed at conversion")
        if args.mask_token is not None:
            raise ValueError(f"--mask-token applies to conversion; the checkpoint {folder} has its mask token "
                             f"(id {model.config.mask_token_id})")
        record_path = folder / CONVERSION_RECORD
        conversion = json.loads(record_path.read_text()) if record_path.is_file() else conversion_record(
            model, tokenizer.convert_ids_to_tokens(model.config.mask_token_id), str(folder), "folder")
        return _Base(model, tokenizer, conversion, read_training_record(folder), folder,
                     f"Efficient-DLM checkpoint {folder}")
    result = convert(args.base, block_size=args.block_size or DEFAULT_BLOCK_SIZE,
                     shift_logits=bool(args.shift_logits), mask_token=args.mask_token, dtype=args.dtype)
    location = result.base.location
    if result.base.kind in ("folder", "gguf"):
        location = str(Path(location).expanduser().resolve())  # an adapter may be loaded from another folder
    conversion = conversion_record(result.model, result.mask_token, location, result.base.kind)
    return _Base(result.model, result.tokenizer, conversion, [], None, result.base.description, result)


def _training_config(args, checkpoint_dir: Path, has_eval: bool):
    import torch

    from .trainer import DlmConversionConfig

    save_steps = args.save_steps or 0
    evaluate = "steps" if (has_eval and args.eval_steps) else "no"  # without --eval-steps: once, at the end
    return DlmConversionConfig(
        output_dir=str(checkpoint_dir),
        block_size=args.block_size,
        seq_len=args.seq_len,
        masking=args.masking,
        mask_lambda=args.mask_lambda,
        complementary=args.complementary,
        weighting=args.weighting,
        attention=args.attention,
        eps=args.eps,
        sft=args.sft,
        max_steps=args.max_steps,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        bf16=args.bf16,
        seed=args.seed,
        logging_steps=args.logging_steps,
        eval_strategy=evaluate,
        eval_steps=args.eval_steps,
        save_strategy="steps" if save_steps > 0 else "no",
        save_steps=save_steps if save_steps > 0 else 500,
        report_to="none",
        disable_tqdm=args.no_progress,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        # Only when asked: transformers 5.23 renames the field and warns about the old name even when False.
        **({"gradient_checkpointing": True} if args.gradient_checkpointing else {}),
    )


def _command_line(args) -> str:
    given = getattr(args, "command_line", None)
    if given:
        return given
    argv = sys.argv[1:]
    if "train" in argv:
        argv = argv[argv.index("train") + 1:]
    return shlex.join(["efficient-dlm", "train", *argv])


def _check_output(args) -> Path:
    output = Path(args.output).expanduser()
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not args.overwrite:
        raise FileExistsError(f"output folder {output} exists and is not empty (pass --overwrite to replace it)")
    return output


def _replace_folder(partial: Path, output: Path) -> None:
    if output.exists():
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    partial.rename(output)


def _write_full_checkpoint(trainer, base: _Base, folder: Path) -> None:
    from ..conversion import CONVERSION_RECORD, SHIPPED_CODE_FILES

    trainer.save_model(str(folder))  # gathers FSDP shards; writes the tokenizer (processing_class) too
    if trainer.is_world_process_zero():
        package_dir = Path(__file__).resolve().parent.parent
        for name in SHIPPED_CODE_FILES:  # what trust_remote_code loads on a machine without this package
            if not (folder / name).exists():
                shutil.copyfile(package_dir / name, folder / name)
        record = dict(base.conversion, block_size=trainer.block_size)
        (folder / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def _write_adapter(trainer, base: _Base, folder: Path, base_output: Path | None) -> None:
    from ..conversion import CONVERSION_RECORD
    from .adapters import set_adapter_base

    trainer.save_model(str(folder))  # PeftModel.save_pretrained: the adapter only, plus the tokenizer
    if trainer.is_world_process_zero():
        if base.folder is not None:
            set_adapter_base(folder, str(base.folder))
        elif base_output is not None:
            set_adapter_base(folder, str(base_output.resolve()))
        else:
            set_adapter_base(folder, base.conversion["base"])
            record = dict(base.conversion, block_size=trainer.block_size)
            (folder / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def write_trained_output(trainer, base: _Base, output: Path, *, lora: bool, base_output: Path | None,
                         write_records) -> None:
    """Write what a run trained into `output`: the adapter (`lora`) or a complete checkpoint, `write_records(folder)`
    for the run's own records, and the Trainer's log. Built in a partial folder that replaces `output` only once
    complete. Every process calls it (saving may gather shards); the main process writes."""
    partial = output.parent / f".{output.name}.partial"
    if trainer.is_world_process_zero() and partial.exists():
        shutil.rmtree(partial)
    trainer.accelerator.wait_for_everyone()
    if lora:
        _write_adapter(trainer, base, partial, base_output)
    else:
        _write_full_checkpoint(trainer, base, partial)
    if trainer.is_world_process_zero():
        (partial / "training_args.bin").unlink(missing_ok=True)  # a pickle, of no use outside this run
        write_records(partial)
        with open(partial / TRAIN_LOG, "w") as log:
            for entry in trainer.state.log_history:
                log.write(json.dumps(entry) + "\n")
        _replace_folder(partial, output)


def run_train(args) -> int:
    """Run `efficient-dlm train` from parsed arguments (see `add_train_arguments`); 0 on success.

    Bad input raises ValueError / FileNotFoundError / FileExistsError with a message naming it.
    """
    import transformers

    from ..conversion import save_checkpoint
    from .adapters import lora_config
    from .data import build_training_dataset
    from .trainer import DlmConversionTrainer, write_training_record

    started = time.perf_counter()
    output = _check_output(args)
    if args.base_output is not None and not args.lora:
        raise ValueError("--base-output applies to --lora only (a full checkpoint is its own base)")
    base_output = Path(args.base_output).expanduser() if args.base_output else None
    if base_output is not None and base_output.exists() and any(base_output.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--base-output folder {base_output} exists and is not empty (pass --overwrite)")
    checkpoint_dir = Path(args.checkpoint_dir or f"{output}.checkpoints").expanduser()
    # Build the config first: it checks the recipe's ranges before anything slow is loaded.
    training_args = _training_config(args, checkpoint_dir, has_eval=bool(args.eval_data))
    transformers.set_seed(args.seed)

    base = load_base(args)
    model, tokenizer = base.model, base.tokenizer
    if args.attn_implementation:
        model.set_attn_implementation(args.attn_implementation)
    block_size = args.block_size or model.config.block_size
    show = not args.no_progress
    train_rows = build_training_dataset(args.data, tokenizer, seq_len=args.seq_len, block_size=block_size,
                                        sft=args.sft, text_field=args.text_field, split=args.split,
                                        max_tokens=args.max_tokens, show_progress=show)
    eval_rows = None
    if args.eval_data:
        eval_rows = build_training_dataset(args.eval_data, tokenizer, seq_len=args.seq_len, block_size=block_size,
                                           sft=args.sft, text_field=args.text_field, split=args.split,
                                           show_progress=show)
    peft_config = None
    if args.lora:
        peft_config = lora_config(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                  train=tuple(args.lora_train), mask_token_id=model.config.mask_token_id,
                                  tie_word_embeddings=bool(model.config.tie_word_embeddings))

    if base_output is not None and base.folder is None and training_args.process_index == 0:
        # The base stays frozen under LoRA: save it as converted, before peft wraps its layers in place.
        save_checkpoint(base.conversion_result, base_output, overwrite=args.overwrite)
    trainer = DlmConversionTrainer(model, training_args, train_dataset=train_rows, eval_dataset=eval_rows,
                                   processing_class=tokenizer, peft_config=peft_config)
    print(f"training {base.source_description}: {len(train_rows)} rows of <= {args.seq_len} tokens "
          f"({train_rows.num_tokens} tokens from {train_rows.num_documents} documents), block {trainer.block_size}, "
          f"{args.masking} masking, {args.weighting} weighting, {args.attention} attention"
          + (", LoRA" if args.lora else ""), flush=True)

    resume = args.resume
    if resume == "latest":
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(str(checkpoint_dir)) if checkpoint_dir.is_dir() else None
        if resume is None:
            raise FileNotFoundError(f"--resume: no Trainer checkpoint in {checkpoint_dir}")
    trainer.train(resume_from_checkpoint=resume)
    if eval_rows is not None:
        trainer.evaluate()

    record = trainer.training_record(stage="sft" if args.sft else "conversion", datasets=train_rows.sources,
                                     command=_command_line(args))
    write_trained_output(trainer, base, output, lora=args.lora, base_output=base_output,
                         write_records=lambda folder: write_training_record(folder, record, base.previous_stages))
    if trainer.is_world_process_zero():
        final_loss = record.get("final_loss")
        print(f"wrote {'adapter' if args.lora else 'checkpoint'} {output}: {trainer.state.global_step} steps, "
              f"final loss {final_loss if final_loss is not None else 'n/a'}, "
              f"{time.perf_counter() - started:.0f}s", flush=True)
    trainer.accelerator.wait_for_everyone()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m efficient_dlm.training.cli ...` (the same as `efficient-dlm train ...`)."""
    parser = argparse.ArgumentParser(prog="efficient-dlm train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["efficient-dlm", "train", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run_train(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"efficient-dlm train: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

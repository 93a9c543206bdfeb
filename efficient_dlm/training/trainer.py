"""Conversion training: an AR checkpoint, converted, learns to denoise blocks (Efficient-DLM recipe); also SFT.

`DlmConversionConfig` holds the recipe next to the usual `TrainingArguments`; `DlmConversionTrainer` is a
`transformers.Trainer` whose `compute_loss` noises the batch on the device and scores the masked tokens. Everything
else — optimiser, schedule, checkpoints and resume, logging, DDP/FSDP under `accelerate launch` — is the Trainer's.

The loss of one optimiser step is

    sum over masked tokens of w * CE(logit scoring the token, token)  /  (c * N)

with w = 1/t of the token's block (`weighting="elbo"`) or 1 (`"none"`), N the number of maskable tokens (labels
other than -100) in the whole step — every gradient-accumulation micro-batch on every device — and c =
`expected_masked_weight(...)` the expected masked weight per maskable token (1 for elbo: a block with k = round(t n)
of n tokens masked carries k / t ~ n; E[t] for none). This is the average over masked tokens the recipe asks for,
with the realised denominator (which varies with the noise) replaced by its expectation: the denominator is then known
before any noise is drawn, the Trainer counts N over the step (`num_items_in_batch`), and summing micro-batch losses
gives exactly the large-batch loss. With elbo it is also an estimate of the diffusion NLL bound per token.
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from .collator import DiffusionDataCollator
from .data import build_training_dataset, check_seq_len, is_token_rows
from .masking import DEFAULT_EPS, DEFAULT_MASK_LAMBDA, MASKING_SCHEDULES, check_masking_arguments
from .objective import (
    ATTENTION_LAYOUTS,
    LOSS_WEIGHTINGS,
    NoisedBatch,
    check_objective_arguments,
    expected_masked_weight,
    maskable_positions,
    masked_token_loss_sum,
    noise_batch,
)

logger = logging.getLogger(__name__)

TRAINING_RECORD = "training.json"  # read by efficient_dlm.hub for the model card
# transformers >= 5.19 asks the trainer whether its loss is already scaled for gradient accumulation; 5.17 decides
# from `model_accepts_loss_kwargs` and whether `num_items_in_batch` was given (see DlmConversionTrainer.__init__).
TRAINER_HAS_GA_SCALING_FLAG = hasattr(Trainer, "loss_is_scaled_for_ga")


@dataclass
class DlmConversionConfig(TrainingArguments):
    """`TrainingArguments` plus the block-diffusion recipe. Defaults are Efficient-DLM's: position-dependent
    masking with lambda = 0.1, 1/t (ELBO) weighting, the `bd3` clean-context layout, AdamW at 1e-5 with cosine decay.
    """

    block_size: int | None = field(
        default=None, metadata={"help": "Training block (default: the model's config.block_size)."}
    )
    seq_len: int = field(
        default=512, metadata={"help": "Tokens per training row (packing) or the longest SFT row; a multiple of the "
                                       "block size."}
    )
    masking: str = field(
        default="position_dependent", metadata={"help": f"Masking schedule, one of {MASKING_SCHEDULES}."}
    )
    mask_lambda: float = field(
        default=DEFAULT_MASK_LAMBDA,
        metadata={"help": "Half-life ratio lambda in (0, 1] of position-dependent masking (lower = masks crowd "
                          "more at the block's end at low noise)."},
    )
    complementary: bool = field(
        default=False, metadata={"help": "Add a copy with the complementary mask (Fast-dLLM v2), doubling the rows."}
    )
    weighting: str = field(default="elbo", metadata={"help": f"Loss weight, one of {LOSS_WEIGHTINGS}."})
    attention: str = field(
        default="bd3", metadata={"help": f"Training layout and attention pattern, one of {ATTENTION_LAYOUTS}."}
    )
    eps: float = field(default=DEFAULT_EPS, metadata={"help": "Noise levels are drawn from U(eps, 1)."})
    sft: bool = field(
        default=False, metadata={"help": "Raw chat rows are SFT rows: the prompt is never masked."}
    )
    # Defaults that differ from TrainingArguments'.
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW peak learning rate (paper: 1e-5)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    include_num_input_tokens_seen: str | bool = field(
        default="non_padding", metadata={"help": "Count the tokens trained on (recorded in training.json)."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Always False: the trainer, not the model's forward, reads the columns."}
    )

    def __post_init__(self):
        # The collator's `labels` and `block_offset` are read by compute_loss; dropping "unused" columns (the
        # Trainer's default) would silently train on nothing.
        self.remove_unused_columns = False
        if self.block_size is not None and (
            isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1
        ):
            raise ValueError(f"block_size must be an integer >= 1 or None, got {self.block_size!r}")
        if self.block_size is not None:
            check_seq_len(self.seq_len, self.block_size)
        else:
            check_seq_len(self.seq_len, 1)
        check_masking_arguments(self.masking, self.mask_lambda, self.eps)
        check_objective_arguments(self.weighting, self.attention)
        if not isinstance(self.complementary, bool):
            raise ValueError(f"complementary must be True or False, got {self.complementary!r}")
        super().__post_init__()

    def masking_description(self) -> str:
        """The masking recipe in one string, as training.json records it."""
        text = "uniform" if self.masking == "uniform" else f"position_dependent(lambda={self.mask_lambda})"
        return text + (" + complementary" if self.complementary else "")


class DlmConversionTrainer(Trainer):
    """Trains an `EfficientDlmForMaskedDiffusion` (or a peft model around one) with the block-diffusion objective.

    Args beyond `transformers.Trainer`'s:
        args: a `DlmConversionConfig`.
        train_dataset / eval_dataset: token rows (an `input_ids` column, e.g. from `build_training_dataset`), or raw
            rows (`text` / chat `messages`, a list or a `datasets.Dataset`), tokenised here with `processing_class`
            into rows of `args.seq_len` (packed, or one conversation per row with `args.sft`).
        peft_config: a peft config (e.g. `adapters.lora_config(...)`); the model is wrapped with `get_peft_model`.
    """

    # compute_loss divides by the whole step's token count (num_items_in_batch): the Trainer must not divide again.
    loss_is_scaled_for_ga = True

    def __init__(self, model=None, args: DlmConversionConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, peft_config=None, **kwargs):
        if args is None:
            args = DlmConversionConfig(output_dir="dlm_trainer_output")
        if not isinstance(args, DlmConversionConfig):
            raise TypeError(f"args must be a DlmConversionConfig, got {type(args).__name__}")
        if model is None:
            raise ValueError("pass the model to train (an EfficientDlmForMaskedDiffusion, e.g. from convert())")
        config = model.config
        if getattr(config, "mask_token_id", None) is None or not hasattr(config, "shift_logits"):
            raise ValueError("the model must be an Efficient-DLM model with a mask_token_id (convert the AR model "
                             "first)")
        if args.block_size is not None and args.block_size != config.block_size:
            logger.warning("training block %d differs from the model's config.block_size %d: the config is updated",
                           args.block_size, config.block_size)
            config.block_size = args.block_size
        self.block_size = config.block_size
        check_seq_len(args.seq_len, self.block_size)
        self.mask_token_id = config.mask_token_id
        self.shift_logits = bool(config.shift_logits)

        train_dataset = self._as_token_rows(train_dataset, processing_class, args)
        if isinstance(eval_dataset, dict):
            eval_dataset = {name: self._as_token_rows(d, processing_class, args) for name, d in eval_dataset.items()}
        else:
            eval_dataset = self._as_token_rows(eval_dataset, processing_class, args)
        if data_collator is None:
            pad_id = config.pad_token_id
            if pad_id is None:
                eos = config.eos_token_id
                pad_id = eos[0] if isinstance(eos, list) else eos
            data_collator = DiffusionDataCollator(pad_token_id=pad_id if pad_id is not None else 0,
                                                  block_size=self.block_size, shift_logits=self.shift_logits)
        if peft_config is not None:
            model = _wrap_with_peft(model, peft_config, args)

        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        # Both transformers lines count `num_items_in_batch` (labels != -100, over all micro-batches of a step and,
        # with average_tokens_across_devices, all processes) only when the model "accepts loss kwargs"; 5.17 also
        # skips its own division by the accumulation steps exactly then.
        self.model_accepts_loss_kwargs = True
        self._noise_draws = (-1, 0)  # (optimiser step, noise draws made in it)
        self._eval_noise_draws = 0

    def _as_token_rows(self, dataset, tokenizer, args):
        if dataset is None or is_token_rows(dataset):
            return dataset
        if tokenizer is None:
            raise ValueError("raw text or chat rows need processing_class=<the tokenizer> to be tokenised")
        return build_training_dataset(dataset, tokenizer, seq_len=args.seq_len, block_size=self.block_size,
                                      sft=args.sft)

    # ------------------------------------------------------------------------------------------------------------
    # The objective
    # ------------------------------------------------------------------------------------------------------------

    def noise_generator(self, device, training: bool) -> torch.Generator:
        """A generator seeded by (seed, optimiser step, draw within the step, process): the noise of every step is
        fixed by the run's seed, so a resumed run draws what the uninterrupted one drew, without saving RNG state.
        Evaluation draws restart at each `evaluate()`, so repeated evaluations see the same masks."""
        if training:
            step, draws = self._noise_draws
            if step != self.state.global_step:
                step, draws = self.state.global_step, 0
            self._noise_draws = (step, draws + 1)
            key = (self.args.seed, 0, step, draws, self.args.process_index)
        else:
            key = (self.args.seed, 1, self._eval_noise_draws, self.args.process_index)
            self._eval_noise_draws += 1
        generator = torch.Generator(device=device)
        generator.manual_seed(hash(key) & (2**63 - 1))
        return generator

    def noise_inputs(self, inputs: dict, generator: torch.Generator) -> NoisedBatch:
        """The step's model input: the collated clean batch, noised on its device with the config's recipe."""
        args = self.args
        return noise_batch(
            inputs["input_ids"], inputs["labels"], mask_token_id=self.mask_token_id, block_size=self.block_size,
            attention_mask=inputs.get("attention_mask"), block_offset=inputs.get("block_offset", 0),
            masking=args.masking, mask_lambda=args.mask_lambda, complementary=args.complementary, eps=args.eps,
            weighting=args.weighting, attention=args.attention, shift_logits=self.shift_logits, generator=generator,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "labels" not in inputs:
            raise ValueError("training batches need `labels` (-100 = never masked); use DiffusionDataCollator")
        generator = self.noise_generator(inputs["input_ids"].device, training=model.training)
        noised = self.noise_inputs(inputs, generator)
        outputs = model(**noised.model_inputs())
        loss_sum = masked_token_loss_sum(outputs.logits, noised, self.shift_logits)

        expected_weight = expected_masked_weight(self.args.weighting, self.args.complementary, self.args.eps)
        if num_items_in_batch is not None:
            loss = loss_sum / (expected_weight * torch.as_tensor(num_items_in_batch).clamp(min=1))
            if self.args.average_tokens_across_devices:
                # N counts every process's tokens and DDP averages gradients over processes: undo the average.
                loss = loss * self.accelerator.num_processes
        else:  # a single batch outside the Trainer's step loop: normalise by its own count
            local_items = maskable_positions(inputs["labels"], self.shift_logits).sum().clamp(min=1)
            loss = loss_sum / (expected_weight * local_items)
            if model.training and TRAINER_HAS_GA_SCALING_FLAG:
                loss = loss / self.current_gradient_accumulation_steps  # 5.17 divides by itself in this case
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, *args, **kwargs):
        self._eval_noise_draws = 0
        return super().evaluate(*args, **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # Records
    # ------------------------------------------------------------------------------------------------------------

    def training_record(self, *, stage: str = "conversion", datasets=None, command: str | None = None) -> dict:
        """One stage of `training.json` (the keys the model card reads, plus the rest of the recipe)."""
        args, state = self.args, self.state
        world = max(1, args.world_size)
        record = {
            "stage": stage,
            "masking": args.masking_description(),
            "weighting": args.weighting,
            "block_size": self.block_size,
            "attention": args.attention,
            "shift_logits": self.shift_logits,
            "sft": args.sft,
            "seq_len": args.seq_len,
            "datasets": list(datasets or []),
            "tokens": int(state.num_input_tokens_seen) if state.num_input_tokens_seen else None,
            "steps": int(state.global_step),
            "global_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world,
            "learning_rate": args.learning_rate,
            "lr_scheduler": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "eps": args.eps,
            "peft": _peft_summary(self.model),
            "final_loss": _last_logged(state.log_history, "loss"),
            "command": command,
        }
        return record


def _last_logged(history, key):
    values = [entry[key] for entry in history if key in entry]
    return values[-1] if values else None


def _peft_summary(model):
    peft_config = getattr(model, "peft_config", None)
    if not peft_config:
        return None
    config = next(iter(peft_config.values()))
    return {"type": str(config.peft_type.value if hasattr(config.peft_type, "value") else config.peft_type),
            "r": getattr(config, "r", None), "lora_alpha": getattr(config, "lora_alpha", None),
            "target_modules": sorted(config.target_modules) if getattr(config, "target_modules", None) else None,
            "modules_to_save": list(config.modules_to_save or []) if hasattr(config, "modules_to_save") else None}


def write_training_record(folder, record: dict, previous_stages: list | None = None) -> Path:
    """Write `training.json` in `folder`: earlier stages (e.g. the base checkpoint's record) then this one."""
    stages = list(previous_stages or []) + [record]
    path = Path(folder) / TRAINING_RECORD
    path.write_text(json.dumps(stages if len(stages) > 1 else stages[0], indent=2) + "\n")
    return path


def read_training_record(folder) -> list:
    """The stages recorded in a checkpoint folder's training.json ([] when it has none)."""
    path = Path(folder) / TRAINING_RECORD
    if not path.is_file():
        return []
    record = json.loads(path.read_text())
    return record if isinstance(record, list) else [record]


# ----------------------------------------------------------------------------------------------------------------------
# LoRA (the config is built by `adapters.lora_config`)
# ----------------------------------------------------------------------------------------------------------------------


def _wrap_with_peft(model, peft_config, args):
    from peft import PeftModel, get_peft_model
    from transformers import set_seed

    if isinstance(model, PeftModel):
        raise ValueError("the model is already a peft model: pass the base model together with peft_config")
    set_seed(args.seed)  # the adapter's random init happens here, before the Trainer seeds anything
    model = get_peft_model(model, peft_config)
    if args.gradient_checkpointing:
        # With frozen embeddings no input of the first checkpointed layer requires grad; recompute would then skip
        # the LoRA weights' gradients.
        model.enable_input_require_grads()
    return model


__all__ = [
    "DlmConversionConfig",
    "DlmConversionTrainer",
    "TRAINING_RECORD",
    "read_training_record",
    "write_training_record",
]

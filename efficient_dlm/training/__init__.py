"""Training: masking schedules, data and collator, the conversion/SFT trainer, LoRA adapters, the `train` command;
RL with verifiable tasks (`DiffusionGRPOTrainer`, `tasks.get_task`, the `rl` command).

    from efficient_dlm.conversion import convert
    from efficient_dlm.training import DlmConversionConfig, DlmConversionTrainer, build_training_dataset

    result = convert("path/or/hub-id", block_size=32)
    rows = build_training_dataset(["src/**/*.py"], result.tokenizer, seq_len=512, block_size=32)
    config = DlmConversionConfig(output_dir="run", max_steps=1000)
    trainer = DlmConversionTrainer(result.model, config, train_dataset=rows)
    trainer.train()

Names are imported on first use, so that `efficient-dlm` commands other than `train` / `rl` do not pay for the
Trainer (or need TRL).
"""

import importlib

# name -> submodule defining it
_EXPORTS = {
    "DiffusionDataCollator": "collator",
    "ChatDocument": "data",
    "TextDocument": "data",
    "TokenRowsDataset": "data",
    "build_training_dataset": "data",
    "pack_documents": "data",
    "read_documents": "data",
    "sft_row": "data",
    "sft_rows": "data",
    "MASKING_SCHEDULES": "masking",
    "complementary_mask": "masking",
    "draw_block_masks": "masking",
    "position_log_weights": "masking",
    "position_weights": "masking",
    "sample_noise_levels": "masking",
    "ATTENTION_LAYOUTS": "objective",
    "LOSS_WEIGHTINGS": "objective",
    "NoisedBatch": "objective",
    "attention_pattern_for": "objective",
    "expected_masked_weight": "objective",
    "lay_out_noised_batch": "objective",
    "masked_token_accuracy": "objective",
    "masked_token_loss_sum": "objective",
    "noise_batch": "objective",
    "TRAINING_RECORD": "trainer",
    "DlmConversionConfig": "trainer",
    "DlmConversionTrainer": "trainer",
    "read_training_record": "trainer",
    "write_training_record": "trainer",
    "LORA_TARGET_MODULES": "adapters",
    "load_adapter_model": "adapters",
    "lora_config": "adapters",
    "add_train_arguments": "cli",
    "run_train": "cli",
    "DiffusionGRPOConfig": "grpo",
    "DiffusionGRPOTrainer": "grpo",
    "evaluate_on_task": "grpo",
    "sequence_log_likelihood": "grpo",
    "TASKS": "tasks",
    "VerifiableTask": "tasks",
    "get_task": "tasks",
    "add_rl_arguments": "rl_cli",
    "run_rl": "rl_cli",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = sorted(_EXPORTS)

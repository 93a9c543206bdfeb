"""The Trainer integration: gradient accumulation, resume, LoRA round trips, config validation."""

import copy
from pathlib import Path

import pytest
import torch
from training_helpers import MASK, copy_task_rows, quiet_config, random_token_rows, single_threaded, tiny_dlm
from transformers import TrainerCallback

from efficient_dlm.training import DiffusionDataCollator, DlmConversionConfig, DlmConversionTrainer, lora_config
from efficient_dlm.training.masking import num_grid_blocks
from efficient_dlm.training.objective import lay_out_noised_batch


@pytest.fixture(autouse=True)
def _one_thread():
    yield from single_threaded()


class ContentKeyedNoiseTrainer(DlmConversionTrainer):
    """Masks and noise levels fixed by each row's tokens, so that a row is noised alike whatever batch it is in."""

    def noise_inputs(self, inputs, generator):
        ids, labels = inputs["input_ids"], inputs["labels"]
        rows, length = ids.shape
        positions = torch.arange(length)
        masked = (labels != -100) & ((ids * 7 + positions) % 3 == 0)
        blocks = torch.arange(num_grid_blocks(length, self.block_size))
        levels = (0.2 + 0.15 * ((blocks + ids[:, :1]) % 5)).float()  # per row, per block
        return lay_out_noised_batch(ids, masked, levels, mask_token_id=MASK, block_size=self.block_size,
                                    attention_mask=inputs["attention_mask"], block_offset=inputs["block_offset"],
                                    weighting=self.args.weighting, attention=self.args.attention)


def one_sgd_step(model, rows, tmp_path, *, batch_size, accumulation):
    args = quiet_config(tmp_path / f"bs{batch_size}-ga{accumulation}", per_device_train_batch_size=batch_size,
                        gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=1.0,
                        lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0)
    trainer = ContentKeyedNoiseTrainer(model, args, train_dataset=rows)
    trainer.train()
    return trainer


@pytest.mark.parametrize("weighting", ["elbo", "none"])
def test_two_accumulated_micro_batches_make_the_same_update_as_one_batch_of_two(tmp_path, weighting):
    """GA=2 x batch 1 vs GA=1 x batch 2, one SGD step at lr 1: the update is minus the gradient, so equal updates
    mean equal gradients. The rows have different numbers of maskable tokens (12 and 7), so averaging each
    micro-batch on its own, or dividing by the accumulation steps twice, would show."""
    rows = random_token_rows(2, lengths=(12, 7))
    start = tiny_dlm(4)
    updated = []
    for batch_size, accumulation in ((2, 1), (1, 2)):
        model = copy.deepcopy(start)
        trainer = one_sgd_step(model, rows, tmp_path, batch_size=batch_size, accumulation=accumulation)
        updated.append((dict(model.named_parameters()), trainer.state.log_history[0]["loss"]))
    (big, big_loss), (accumulated, accumulated_loss) = updated
    moved = 0.0
    for name, before in start.named_parameters():
        assert torch.allclose(big[name], accumulated[name], atol=1e-6, rtol=1e-5), name
        moved = max(moved, (big[name] - before).abs().max().item())
    assert moved > 1e-3  # the step did something
    assert big_loss == pytest.approx(accumulated_loss, rel=1e-5)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


class CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def step_losses(trainer):
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def test_resumed_run_continues_with_the_uninterrupted_runs_losses(tmp_path):
    rows = random_token_rows(16, lengths=(16, 11))
    options = dict(max_steps=6, save_strategy="steps", save_steps=3, learning_rate=3e-3, warmup_steps=2,
                   per_device_train_batch_size=2)
    start = tiny_dlm(4)

    uninterrupted = DlmConversionTrainer(copy.deepcopy(start), quiet_config(tmp_path / "full", **options),
                                         train_dataset=rows)
    uninterrupted.train()
    expected = step_losses(uninterrupted)

    stopped = DlmConversionTrainer(copy.deepcopy(start), quiet_config(tmp_path / "split", **options),
                                   train_dataset=rows, callbacks=[StopAt(3)])
    stopped.train()
    assert max(step_losses(stopped)) == 3
    assert (tmp_path / "split" / "checkpoint-3").is_dir()

    counter = CountSteps()
    resumed = DlmConversionTrainer(tiny_dlm(4, seed=5), quiet_config(tmp_path / "split", **options),
                                   train_dataset=rows, callbacks=[counter])  # other initial weights: the
    resumed.train(resume_from_checkpoint=str(tmp_path / "split" / "checkpoint-3"))  # checkpoint's must win
    assert counter.steps == [4, 5, 6]
    got = step_losses(resumed)  # the log history of steps 1-3 comes back with the checkpoint's state
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-7), step
    assert len({expected[step] for step in expected}) > 3  # the losses do change from step to step


def lora_logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


@pytest.mark.parametrize("train", [("norms", "mask_token"), ("embeddings", "norms", "head")])
def test_lora_adapter_round_trips_and_merges(tmp_path, train):
    from peft import PeftModel

    tie = "embeddings" not in train  # the default (mask-token row only) on a tied model, as SmolLM2 is
    base_seed = 2
    model = tiny_dlm(4, tie=tie, seed=base_seed)
    config = lora_config(r=4, train=train, mask_token_id=MASK, tie_word_embeddings=tie)
    args = quiet_config(tmp_path / "run", max_steps=4, learning_rate=2e-2, lr_scheduler_type="constant",
                        per_device_train_batch_size=4)
    trainer = DlmConversionTrainer(model, args, train_dataset=copy_task_rows(16), peft_config=config)
    trainer.train()
    adapter = tmp_path / "adapter"
    trainer.save_model(str(adapter))
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()

    trained = trainer.model.eval()
    probe = torch.tensor([[1, 11, 12, 13, 20, MASK, MASK, MASK, MASK, 14]])
    expected = lora_logits(trained, probe)
    assert not torch.allclose(expected, lora_logits(tiny_dlm(4, tie=tie, seed=base_seed), probe), atol=1e-4)

    reloaded = PeftModel.from_pretrained(tiny_dlm(4, tie=tie, seed=base_seed), adapter).eval()
    assert torch.allclose(lora_logits(reloaded, probe), expected, atol=1e-5)
    merged = reloaded.merge_and_unload()
    assert type(merged).__name__ == "EfficientDlmForMaskedDiffusion"
    assert torch.allclose(lora_logits(merged, probe), expected, atol=1e-5)


def test_lora_trains_only_the_adapter_and_the_chosen_extras(tmp_path):
    trainer = DlmConversionTrainer(tiny_dlm(4), quiet_config(tmp_path, max_steps=2, learning_rate=1e-2),
                                   train_dataset=copy_task_rows(8), peft_config=lora_config(r=2, train=("norms",)))
    parameters = dict(trainer.model.named_parameters())
    trainable = {name for name, p in parameters.items() if p.requires_grad}
    assert any("lora_A" in name for name in trainable) and any("layernorm" in name for name in trainable)
    assert not any("embed_tokens" in name or "lm_head" in name or "base_layer" in name for name in trainable)
    frozen = {name: p.detach().clone() for name, p in parameters.items() if not p.requires_grad}
    trainer.train()
    for name, before in frozen.items():
        assert torch.equal(parameters[name], before), name


def test_raw_text_rows_are_tokenised_and_packed_by_the_trainer(tmp_path):
    from training_helpers import chat_tokenizer

    tokenizer = chat_tokenizer()
    texts = [{"text": " ".join(f"w{(i * 7 + j) % 90 + 10}" for j in range(30))} for i in range(6)]
    trainer = DlmConversionTrainer(tiny_dlm(4), quiet_config(tmp_path, max_steps=1), train_dataset=texts,
                                   processing_class=tokenizer)
    rows = trainer.train_dataset
    assert all(len(row["input_ids"]) == 16 for row in rows.rows[:-1])
    assert rows.num_tokens == 6 * 31  # 30 words + EOS per document
    trainer.train()


def test_collator_pads_to_whole_blocks_and_marks_what_is_never_scored():
    collate = DiffusionDataCollator(pad_token_id=0, block_size=4, shift_logits=True)
    batch = collate([{"input_ids": [5, 6, 7, 8, 9], "block_offset": 0},
                     {"input_ids": [5, 6, 7], "labels": [-100, -100, 7], "block_offset": 2}])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["labels"].tolist() == [[-100, 6, 7, 8, 9, -100, -100, -100], [-100, -100, 7] + [-100] * 5]
    assert batch["attention_mask"].sum(-1).tolist() == [5, 3]
    assert batch["block_offset"].tolist() == [0, 2]


@pytest.mark.parametrize("field, value, message", [
    ("mask_lambda", 0.0, "mask_lambda"),
    ("mask_lambda", 1.5, "mask_lambda"),
    ("eps", 0.0, "eps"),
    ("masking", "random", "masking must be one of"),
    ("weighting", "inverse", "weighting must be one of"),
    ("attention", "causal", "attention must be one of"),
    ("block_size", 0, "block_size"),
])
def test_config_refuses_out_of_range_fields_by_name(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        DlmConversionConfig(output_dir=str(tmp_path), **{field: value})


def test_config_refuses_a_sequence_length_that_is_not_a_multiple_of_the_block(tmp_path):
    with pytest.raises(ValueError, match=r"seq_len \(30\) must be a multiple of the block size \(8\)"):
        DlmConversionConfig(output_dir=str(tmp_path), block_size=8, seq_len=30)
    with pytest.raises(ValueError, match=r"seq_len \(18\) must be a multiple of the block size \(4\)"):
        DlmConversionTrainer(tiny_dlm(4), quiet_config(tmp_path, seq_len=18))  # block size from the model


def test_config_keeps_the_collators_columns_and_the_papers_defaults(tmp_path):
    config = DlmConversionConfig(output_dir=str(tmp_path), remove_unused_columns=True)
    assert config.remove_unused_columns is False
    assert config.learning_rate == 1e-5 and config.lr_scheduler_type == "cosine"
    assert (config.masking, config.mask_lambda, config.weighting, config.attention) == (
        "position_dependent", 0.1, "elbo", "bd3")


def test_a_model_without_a_mask_token_is_refused(tmp_path):
    from conftest import tiny_ar_model

    with pytest.raises(ValueError, match="mask_token_id"):
        DlmConversionTrainer(tiny_ar_model("llama"), quiet_config(tmp_path))


def test_evaluation_draws_the_same_noise_every_time(tmp_path):
    rows = random_token_rows(6, lengths=(16, 12))
    trainer = DlmConversionTrainer(tiny_dlm(4), quiet_config(tmp_path, per_device_eval_batch_size=2),
                                   eval_dataset=rows)
    first, second = trainer.evaluate()["eval_loss"], trainer.evaluate()["eval_loss"]
    assert first == second
    # A random tiny model: the 1/t-weighted per-token loss sits near ln(vocab) = 4.85 nats.
    assert 3.0 < first < 8.0


def test_real_smollm2_trains_on_real_python_source_and_its_chat_template(smollm2_parent, tmp_path):
    """The real parent, its real tokenizer and chat template, real text: a few steps run and the numbers are sane."""
    import json

    from efficient_dlm.conversion import dlm_from_ar_model
    from efficient_dlm.training import ChatDocument, build_training_dataset, sft_rows

    ar, tokenizer = smollm2_parent
    dlm = dlm_from_ar_model(ar, block_size=8, shift_logits=False, mask_token_id=16)  # <empty_output>
    source = str(Path(json.__file__).parent)
    rows = build_training_dataset([source], tokenizer, seq_len=64, block_size=8, max_tokens=64 * 6,
                                  show_progress=False)
    assert len(rows) == 6 and rows.sources == [source]
    trainer = DlmConversionTrainer(dlm, quiet_config(tmp_path, max_steps=3, seq_len=64, learning_rate=1e-5),
                                   train_dataset=rows, eval_dataset=rows)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(0.5 < loss < 15 for loss in losses)
    assert 0.5 < before < 15  # nats per token, ELBO-weighted, of a converted but untrained model on real code

    chat = ChatDocument([{"role": "user", "content": "What is the capital of France?"},
                         {"role": "assistant", "content": "The capital of France is Paris."}], "chat:1")
    row = sft_rows([chat], tokenizer, seq_len=128, block_size=8, show_progress=False)[0]
    prompt_length = int((row["labels"] == -100).sum())
    prompt = tokenizer.decode(row["input_ids"][:prompt_length])
    answer = tokenizer.decode(row["input_ids"][prompt_length:])
    assert prompt.endswith("<|im_start|>assistant\n") and "What is the capital" in prompt
    assert answer.startswith("The capital of France is Paris.<|im_end|>")
    assert (prompt_length + row["block_offset"]) % 8 == 0

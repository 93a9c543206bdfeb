"""Training learns: a tiny random model, trained for under a minute on a CPU, reverses digit strings, and then decodes
the task with diffusion `generate()` several tokens per forward."""

import time

import pytest
import torch
from training_helpers import DIGITS, EOS, MASK, PAD, SEP, copy_task_rows, quiet_config, single_threaded, tiny_dlm

from efficient_dlm.training import DiffusionDataCollator, DlmConversionTrainer, masked_token_accuracy, noise_batch

DIGITS_PER_ROW = 8
BLOCK = 4
STEPS = 600
# Stated targets. Measured (seeded, so every run alike): masked-token accuracy 0.998 (answer digits and the EOS that
# ends and fills the answer's last block), exact match 0.97, 1.8 tokens per forward at threshold 0.9; the 600 steps
# take 15-40 s on a 2-core CPU.
MASKED_ACCURACY = 0.95
EXACT_MATCH = 0.90
MIN_TOKENS_PER_FORWARD = 1.5


@pytest.fixture(autouse=True)
def _one_thread():
    yield from single_threaded()


def test_a_tiny_model_learns_to_reverse_digits_and_decodes_it_in_parallel(tmp_path):
    torch.manual_seed(0)
    model = tiny_dlm(BLOCK, seed=0)
    args = quiet_config(tmp_path, max_steps=STEPS, per_device_train_batch_size=32, learning_rate=3e-3,
                        lr_scheduler_type="constant_with_warmup", warmup_steps=20, weight_decay=0.0,
                        logging_steps=50, seq_len=32)
    trainer = DlmConversionTrainer(model, args, train_dataset=copy_task_rows(STEPS * 32, seed=1, reverse=True))
    started = time.perf_counter()
    trainer.train()
    print(f"trained {STEPS} steps in {time.perf_counter() - started:.1f}s")
    model.eval()

    # Masked-token accuracy on held-out rows at fresh noise levels (the default recipe's masking).
    held_out = copy_task_rows(256, seed=2, reverse=True)
    batch = DiffusionDataCollator(pad_token_id=PAD, block_size=BLOCK)(list(held_out))
    noised = noise_batch(batch["input_ids"], batch["labels"], mask_token_id=MASK, block_size=BLOCK,
                         attention_mask=batch["attention_mask"], block_offset=batch["block_offset"],
                         generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        correct, total = masked_token_accuracy(model(**noised.model_inputs()).logits, noised)
    assert total > 500
    assert correct / total >= MASKED_ACCURACY, f"masked-token accuracy {correct / total:.3f}"

    # Decoding: the prompt ends on its own; generate() starts the answer on a block, as training laid it out.
    prompts = torch.stack([row["input_ids"][: DIGITS_PER_ROW + 1] for row in held_out])
    assert (prompts[:, -1] == SEP).all() and prompts[:, :-1].ge(DIGITS[0]).all()
    with torch.no_grad():
        out = model.generate(prompts, max_new_tokens=DIGITS_PER_ROW + 1, threshold=0.9, eos_token_id=EOS,
                             pad_token_id=PAD, return_dict_in_generate=True)
    answers = out.sequences[:, DIGITS_PER_ROW + 1: 2 * DIGITS_PER_ROW + 1]
    exact = (answers == prompts[:, :DIGITS_PER_ROW].flip(-1)).all(-1).float().mean().item()
    print(f"masked-token accuracy {correct / total:.3f}, exact match {exact:.3f}, "
          f"tokens per forward {out.tokens_per_forward:.2f}, NFE {out.nfe}")
    assert exact >= EXACT_MATCH
    assert out.tokens_per_forward >= MIN_TOKENS_PER_FORWARD

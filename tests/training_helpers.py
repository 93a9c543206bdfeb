"""Shared pieces of the training tests: tiny converted models, a generated task, a tiny chat tokenizer."""

import json
from pathlib import Path

import torch
from conftest import tiny_ar_model, tiny_tokenizer

from efficient_dlm.conversion import dlm_from_ar_model
from efficient_dlm.training import DlmConversionConfig, TokenRowsDataset, sft_row

MASK = 3  # tiny_tokenizer(("<|mask|>",)) puts the mask token at id 3, after <pad> <s> </s>
PAD, EOS = 0, 2
DIGITS = list(range(10, 20))  # ten word tokens standing for digits
SEP = 20
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)


def tiny_dlm(block_size=4, shift_logits=False, *, family="llama", tie=False, seed=0):
    ar = tiny_ar_model(family, tie=tie, seed=seed)
    return dlm_from_ar_model(ar, block_size=block_size, shift_logits=shift_logits, mask_token_id=MASK)


def chat_tokenizer():
    tokenizer = tiny_tokenizer(("<|mask|>",))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def copy_task_rows(count: int, *, digits: int = 8, block_size: int = 4, seed: int = 0,
                   reverse: bool = False) -> TokenRowsDataset:
    """SFT rows `d1 .. dn SEP -> d1 .. dn EOS` (or `dn .. d1 EOS`): the prompt is never masked, the answer starts a
    block."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        number = (torch.randint(0, 10, (digits,), generator=generator) + DIGITS[0]).tolist()
        answer = number[::-1] if reverse else number
        rows.append(sft_row(number + [SEP], answer, block_size=block_size, eos_token_id=EOS))
    return TokenRowsDataset(rows)


def random_token_rows(count: int, lengths=(12, 7), seed: int = 0) -> TokenRowsDataset:
    """Packed-style rows of random tokens (every token a target), of the given lengths in turn."""
    generator = torch.Generator().manual_seed(seed)
    rows = [{"input_ids": torch.randint(4, 128, (lengths[i % len(lengths)],), generator=generator), "block_offset": 0}
            for i in range(count)]
    return TokenRowsDataset(rows)


def quiet_config(output_dir, **overrides) -> DlmConversionConfig:
    """A CPU training config without progress bars, reports or checkpoints unless asked for."""
    options = dict(output_dir=str(output_dir), use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="no",
                   logging_steps=1, seq_len=16, per_device_train_batch_size=2, dataloader_num_workers=0, seed=0,
                   dataloader_pin_memory=False)
    options.update(overrides)
    return DlmConversionConfig(**options)


def write_tiny_base(folder: Path, *, tie: bool = True) -> Path:
    """A tiny Llama AR checkpoint with a chat-template tokenizer, as `--base` takes it."""
    folder = Path(folder)
    tiny_ar_model("llama", tie=tie, seed=1).save_pretrained(folder)
    chat_tokenizer().save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def single_threaded():
    """A fixture body: run with one intra-op thread. Tiny models gain nothing from two, and on a busy 2-core
    machine two threads spin against each other (measured: 20x slower per training step)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

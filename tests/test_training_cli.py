"""`efficient-dlm train`: end to end on a tiny model (full checkpoint, LoRA adapter, resume) and its bad input."""

import argparse
import json

import pytest
import torch
from training_helpers import single_threaded, write_jsonl, write_tiny_base
from transformers import AutoModel, AutoTokenizer

from efficient_dlm.training.cli import add_train_arguments, main, run_train


@pytest.fixture(autouse=True)
def _one_thread():
    yield from single_threaded()


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return parser.parse_args(list(map(str, argv)))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-cli")
    base = write_tiny_base(root / "base")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(" ".join(f"w{10 + (i * 13 + j) % 80}" for j in range(40)))
    chats = write_jsonl(root / "chat.jsonl", [
        {"messages": [{"role": "user", "content": f"w{20 + i} w{30 + i}"},
                      {"role": "assistant", "content": f"w{30 + i} w{20 + i}"}]} for i in range(8)])
    return root, base, corpus, chats


def tiny_run(base, data, output, *extra):
    return parse("--base", base, "--data", data, "--output", output, "--block-size", 4, "--seq-len", 16,
                 "--max-steps", 2, "--batch-size", 2, "--lr", 1e-3, "--logging-steps", 1, "--no-progress", *extra)


def test_train_writes_a_complete_checkpoint_that_loads_with_remote_code(workspace):
    root, base, corpus, _ = workspace
    output = root / "full"
    assert run_train(tiny_run(base, corpus, output)) == 0
    names = {p.name for p in output.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_efficient_dlm.py", "configuration_efficient_dlm.py",
            "generation_efficient_dlm.py", "tokenizer.json", "conversion.json", "training.json",
            "train_log.jsonl", "generation_config.json"} <= names
    assert "training_args.bin" not in names and not (root / ".full.partial").exists()
    record = json.loads((output / "training.json").read_text())
    assert record["stage"] == "conversion" and record["steps"] == 2 and record["block_size"] == 4
    assert record["masking"] == "position_dependent(lambda=0.1)" and record["weighting"] == "elbo"
    assert record["tokens"] > 0 and record["command"].startswith("efficient-dlm train")
    assert record["datasets"] == [str(corpus)]
    log = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log if "loss" in entry] == [1, 2]

    model = AutoModel.from_pretrained(output, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert model.config.block_size == 4 and model.config.mask_token_id == tokenizer.mask_token_id
    prompt = tokenizer("w10 w11 w12", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=8, return_dict_in_generate=True)
    assert out.sequences.shape == (1, 11)


def test_continued_training_of_a_checkpoint_appends_a_stage(workspace):
    root, _, corpus, chats = workspace
    first = root / "stage1"
    run_train(tiny_run(workspace[1], corpus, first))
    second = root / "stage2"
    assert run_train(tiny_run(first, chats, second, "--sft", "--seq-len", 32)) == 0
    stages = json.loads((second / "training.json").read_text())
    assert [stage["stage"] for stage in stages] == ["conversion", "sft"]
    assert json.loads((second / "conversion.json").read_text()) == json.loads((first / "conversion.json").read_text())


def test_lora_writes_an_adapter_folder_that_rebuilds_its_base(workspace):
    from efficient_dlm.training.adapters import load_adapter_model

    root, base, _, chats = workspace
    output = root / "adapter"
    assert run_train(tiny_run(base, chats, output, "--sft", "--seq-len", 32, "--lora", "--lora-r", 2,
                              "--lr", 5e-2)) == 0
    names = {p.name for p in output.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "conversion.json", "training.json",
            "tokenizer.json"} <= names
    assert "model.safetensors" not in names
    assert json.loads((output / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    record = json.loads((output / "training.json").read_text())
    assert record["stage"] == "sft" and record["peft"]["r"] == 2

    model, tokenizer = load_adapter_model(output)
    merged, _ = load_adapter_model(output, merge=True)
    ids = torch.tensor([[1, 30, 31, 3, 3, 3, 3]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, merged(ids).logits, atol=1e-5)


def test_lora_with_base_output_points_the_adapter_at_the_saved_base(workspace):
    root, base, corpus, _ = workspace
    output, base_output = root / "adapter2", root / "adapter2-base"
    assert run_train(tiny_run(base, corpus, output, "--lora", "--base-output", base_output)) == 0
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_output.resolve())
    assert (base_output / "model.safetensors").is_file() and not (output / "conversion.json").exists()


def test_resume_from_the_latest_trainer_checkpoint(workspace):
    root, base, corpus, _ = workspace
    output = root / "resumed"
    run_train(tiny_run(base, corpus, output, "--save-steps", 1))
    assert (root / "resumed.checkpoints" / "checkpoint-2").is_dir()
    assert run_train(tiny_run(base, corpus, output, "--resume", "--overwrite", "--max-steps", 3)) == 0
    log = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    assert max(entry["step"] for entry in log) == 3


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: each a clear error (the command prints it and exits 2)
# ---------------------------------------------------------------------------------------------------------------------


def test_an_existing_output_folder_is_refused_without_overwrite(workspace, capsys):
    root, base, corpus, _ = workspace
    output = root / "taken"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty .*--overwrite"):
        run_train(tiny_run(base, corpus, output))
    assert (output / "keep.txt").read_text() == "mine"
    argv = ["--base", str(base), "--data", str(corpus), "--output", str(output), "--block-size", "4",
            "--seq-len", "16"]
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_a_sequence_length_not_a_multiple_of_the_block_is_refused(workspace):
    root, base, corpus, _ = workspace
    with pytest.raises(ValueError, match=r"seq_len \(18\) must be a multiple of the block size \(4\)"):
        run_train(tiny_run(base, corpus, root / "x", "--seq-len", 18))


@pytest.mark.parametrize("value", [0, -0.5, 1.01])
def test_lambda_outside_zero_one_is_refused(workspace, value):
    root, base, corpus, _ = workspace
    with pytest.raises(ValueError, match=r"mask_lambda .* must be in \(0, 1\]"):
        run_train(tiny_run(base, corpus, root / "x", "--lambda", value))


def test_empty_or_unreadable_data_is_refused(workspace, tmp_path):
    root, base, _, _ = workspace
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="no text found"):
        run_train(tiny_run(base, tmp_path / "empty.txt", root / "x"))
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00w10")
    with pytest.raises(ValueError, match="bad.txt is not UTF-8 text"):
        run_train(tiny_run(base, tmp_path / "bad.txt", root / "x"))
    with pytest.raises(FileNotFoundError, match="data source"):
        run_train(tiny_run(base, tmp_path / "absent", root / "x"))


def test_a_chat_row_without_an_assistant_turn_is_refused(workspace, tmp_path):
    root, base, _, _ = workspace
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "w2"}]}])
    with pytest.raises(ValueError, match="no assistant turn"):
        run_train(tiny_run(base, path, root / "x", "--sft"))

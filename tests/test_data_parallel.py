"""Data-parallel runs of `efficient-dlm train` and `efficient-dlm rl`, unchanged: two CPU processes over gloo, each on
its own shard of the batch, the main process writing the output.

`accelerate launch --multi_gpu` starts its processes with torch's elastic launcher (torchrun); on a machine without
GPUs that launcher with ACCELERATE_USE_CPU=true gives the Trainer the same multi-process setup on CPUs (accelerate's
own `--cpu` launch is one process unless MPI is installed)."""

import json
import os
import subprocess
import sys

import pytest
from training_helpers import write_tiny_base

pytest.importorskip("accelerate")
trl = pytest.importorskip("trl")

PROCESSES = 2
TIMEOUT_S = 600


def launch(*argv, cwd):
    """The efficient-dlm command line in PROCESSES data-parallel CPU processes; the finished launcher."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(PROCESSES),
               "-m", "efficient_dlm.cli", *map(str, argv)]
    # One thread per process: two processes on a 2-core machine, tiny models.
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def test_data_parallel_train_shards_the_batch_over_processes(tmp_path):
    base = write_tiny_base(tmp_path / "base")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(" ".join(f"w{10 + (i * 13 + j) % 80}" for j in range(40)))
    common = ["--base", base, "--data", corpus, "--block-size", 4, "--seq-len", 16, "--max-steps", 2,
              "--batch-size", 2, "--lr", 1e-3, "--logging-steps", 1, "--no-progress"]
    launch("train", *common, "--output", tmp_path / "launched", cwd=tmp_path)
    record = json.loads((tmp_path / "launched" / "training.json").read_text())
    assert record["steps"] == 2 and record["global_batch_size"] == PROCESSES * 2
    from efficient_dlm.cli import main

    assert main(["train", *map(str, common), "--output", str(tmp_path / "single")]) == 0
    single = json.loads((tmp_path / "single" / "training.json").read_text())
    # Each process takes its own batch of 2 rows: two processes see twice the tokens in the same steps.
    assert record["tokens"] == PROCESSES * single["tokens"] > 0
    assert not (tmp_path / ".launched.partial").exists()


def test_data_parallel_rl_writes_one_checkpoint(tmp_path):
    from test_grpo import tiny_task_model

    from efficient_dlm.modeling_efficient_dlm import EfficientDlmForMaskedDiffusion
    from efficient_dlm.training.tasks import character_tokenizer

    folder = tmp_path / "tiny"
    tiny_task_model().save_pretrained(folder)
    character_tokenizer().save_pretrained(folder)
    result = launch("rl", "--model", folder, "--task", "addition", "--task-option", "digits=1", "--train-size", 64,
                    "--eval-size", 4, "--max-steps", 2, "--batch-size", 8, "--num-generations", 4,
                    "--max-completion-length", 12, "--block-size", 4, "--lr", 1e-3, "--logging-steps", 1,
                    "--no-progress", "--output", tmp_path / "out", cwd=tmp_path)
    record = json.loads((tmp_path / "out" / "rl.json").read_text())
    assert record["steps"] == 2 and record["estimator"] == "trace"
    assert result.stdout.count("before: accuracy") == PROCESSES  # every process measured, rolled out and trained
    assert result.stdout.count("wrote checkpoint") == 1  # the main process writes
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log if "reward" in entry] == [1, 2]
    EfficientDlmForMaskedDiffusion.from_pretrained(tmp_path / "out")

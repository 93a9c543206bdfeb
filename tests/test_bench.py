"""CPU smoke test of the benchmark script's logic (`benchmarks/bench.py`, `efficient-dlm bench`) on tiny shapes."""

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from efficient_dlm.evaluation import benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--models", "tiny-qwen3,tiny-llama", "--prompt-len", "6", "--new-tokens", "8", "--block-size", "4",
        "--dtype", "float32", "--device", "cpu", "--bandwidth-mb", "8", "--matmul-size", "64"]
REQUIRED = ["model", "batch", "tokens_per_step", "threshold", "ar_tok_s", "dlm_tok_s", "tpf", "nfe", "step_ms",
            "ar_step_ms", "floor_ms", "dlm_path"]


def _args(argv):
    return benchmark.add_bench_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_bench_rows_table_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    code = benchmark.run_bench(_args(["--out", str(out), "--batches", "1,2", "--tokens-per-step", "2,4",
                                      "--thresholds", "0.9", *TINY]))
    assert code == 0
    record = json.loads((out / "bench.json").read_text())
    for key in ("device", "torch", "transformers", "cuda", "command", "date", "bandwidth_gb_s"):
        assert key in record
    assert record["bandwidth_gb_s"] > 0
    rows = record["rows"]
    assert len(rows) == 2 * 2 * 3  # models x batches x (K=2, K=4, tau=0.9)
    assert [r["batch"] for r in rows[:6]] == [1] * 6  # batch-major: every model at batch 1 first
    for row in rows:
        assert not row.get("skipped") and not row.get("error"), row
        for key in REQUIRED:
            assert row.get(key) is not None or key in ("tokens_per_step", "threshold"), (key, row)
        assert row["dlm_path"] == "eager"
        assert row["step_ms"] > 0 and row["ar_step_ms"] > 0 and row["floor_ms"] > 0  # (CPU timings are noisy)
        assert row["roofline_ms"] >= row["floor_ms"] and row["speedup"] > 0
        if row["tokens_per_step"] is not None:  # a fixed K commits exactly K tokens per forward
            assert row["threshold"] is None
            assert row["tpf"] == pytest.approx(row["tokens_per_step"])
            assert row["nfe"] == 8 // row["tokens_per_step"]
        else:
            assert row["threshold"] == 0.9 and 1 <= row["tpf"] <= 4 and row["nfe"] >= 2
    assert (out / "bench.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    table = printed[printed.index("# cpu"):]
    assert "tiny-llama" in table and "K=4" in table and "t=0.9" in table
    assert printed.rstrip().endswith(table.rstrip())  # the table comes last


def test_time_budget_skips_and_records(tmp_path, capsys):
    out = tmp_path / "out"
    benchmark.run_bench(_args(["--out", str(out), "--batches", "1", "--tokens-per-step", "4", "--thresholds", "",
                               "--time-budget-s", "0", "--no-plot", *TINY]))
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert len(rows) == 2 and all(r["skipped"] == "time budget" for r in rows)
    assert "skipped (time budget)" in capsys.readouterr().out


def test_budget_prediction():
    budget = benchmark._Budget(limit_s=100.0)
    assert budget.fits("ar", "m")  # nothing observed: try it
    budget.record("ar", "a", 40.0)
    budget.started -= 70  # 70 s elapsed
    assert budget.predict("ar", "b") == 40.0 and not budget.fits("ar", "b")
    budget.record("ar", "b", 10.0)
    assert budget.fits("ar", "b") and not budget.fits(("ar", "ar", "ar", "ar"), "b")


class _FakeOutput:
    def __init__(self, nfe):
        self.sequences = torch.zeros(1, 4, dtype=torch.long)
        self.nfe, self.tokens_per_forward = nfe, 1.0


class _RefusesStatic:
    def __init__(self):
        self.calls = []

    def generate(self, input_ids, attention_mask=None, **kwargs):
        self.calls.append(kwargs)
        if "cache_implementation" in kwargs:
            raise ValueError("generate() got unknown arguments ['cache_implementation']")
        return _FakeOutput(nfe=3)


def test_static_request_falls_back_to_eager():
    model = _RefusesStatic()
    ids = torch.zeros(1, 2, dtype=torch.long)
    output, seconds, path, error = benchmark.dlm_generate(model, ids, None, torch.device("cpu"), True, steps=2)
    assert path == "eager (static failed)" and "cache_implementation" in error and output.nfe == 3 and seconds >= 0
    assert [("cache_implementation" in c) for c in model.calls] == [True, False]
    assert model.calls[1]["eos_token_id"] == [] and model.calls[1]["return_dict_in_generate"] is True
    _, _, path, error = benchmark.dlm_generate(model, ids, None, torch.device("cpu"), False, steps=2)
    assert path == "eager" and error is None


def test_floor_bytes_count_the_head_once():
    ar, dlm, mask_id = benchmark.build_models(benchmark.MODEL_SHAPES["tiny-qwen3"], block_size=8,
                                              dtype=torch.float32, device=torch.device("cpu"), seed=0)
    weight_bytes, params = benchmark.read_bytes_per_forward(ar)
    assert ar.lm_head.weight is ar.model.embed_tokens.weight
    assert params == sum(p.numel() for p in ar.parameters())  # tied: the embedding is the head, read once
    assert params == 256 * 64 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64 + 2 * 16) + 64
    assert weight_bytes == 4 * params
    assert mask_id == 255 and dlm.config.mask_token_id == 255
    dlm_state = dlm.state_dict()
    shared = [name for name in ar.state_dict() if name in dlm_state]
    assert len(shared) > 10  # the same names: the converted decoder has the parent's weights
    for name in shared:
        assert torch.equal(ar.state_dict()[name], dlm_state[name]), name


def test_script_help_runs():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench.py"), "--help"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and "--time-budget-s" in result.stdout


def test_static_compiled_rows_and_variants(tmp_path):
    """The static path with compiled layers on the CPU (no graphs there), plus an extra variant row at batch 1:
    each row names its variant and the decode path generate reports; the prefill (eager in every variant) is
    subtracted from each variant's step time."""
    out = tmp_path / "out"
    code = benchmark.run_bench(_args(["--out", str(out), "--batches", "1,2", "--tokens-per-step", "2",
                                      "--thresholds", "", "--dlm-cache", "static", "--dlm-compile", "on",
                                      "--kernels", "none", "--variants", "off:none", "--variant-batches", "1",
                                      "--variant-models", "tiny-qwen3", "--ar-cache", "dynamic", "--no-plot", *TINY]))
    assert code == 0
    record = json.loads((out / "bench.json").read_text())
    assert record["settings"]["dlm_compile"] == "on" and record["settings"]["variants"] == "off:none"
    rows = {(r["model"], r["batch"], r["variant"]): r for r in record["rows"]}
    assert set(rows) == {("tiny-qwen3", 1, "compile+kernels=none"), ("tiny-qwen3", 1, "nocompile+kernels=none"),
                         ("tiny-llama", 1, "compile+kernels=none"), ("tiny-qwen3", 2, "compile+kernels=none"),
                         ("tiny-llama", 2, "compile+kernels=none")}
    for (_, _, variant), row in rows.items():
        assert not row.get("error") and not row.get("dlm_static_error"), row
        assert row["dlm_path"] == ("static+compile" if variant.startswith("compile") else "static")
        # The prefill time was found for every variant (whether it could be subtracted depends on CPU timing noise).
        assert row["dlm_prefill_ms"] is not None and row["step_ms"] > 0 and row["nfe"] == 4
        assert row["weights"] == "random"


def test_variant_specs_are_checked():
    assert benchmark._parse_variant("on:all") == {"compile": True, "kernels": "all"}
    with pytest.raises(ValueError, match="COMPILE:KERNELS"):
        benchmark._parse_variant("yes")

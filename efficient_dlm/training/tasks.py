"""Verifiable tasks for RL: each generates its own problems, checks answers exactly and scores completions.

    from efficient_dlm.training.tasks import get_task

    task = get_task("addition", digits=2)
    train = task.make_dataset(2048, seed=0, style="chat")   # a datasets.Dataset: prompt, problem, answer
    task.reward(prompts, completions, problem=rows["problem"])  # TRL's reward-function signature
    task.accuracy(completions, rows["problem"])

Every completion ends with a final answer line, `Answer: <answer>`; the last such line counts. Rewards: 1 for a
correct answer, `format_reward` (0.1 by default) for a well-formed but wrong one (it teaches a small model the
format before it can be right), 0 otherwise. Accuracy counts correct answers only.

Tasks (name -> options):
- `addition` (digits=2): the sum of two numbers of `digits` digits.
- `sorting` (min_length=3, max_length=5): a list of digits in ascending order.
- `countdown` (count=3, largest=9): an expression that uses each given number exactly once, with + - * / and
  parentheses, and equals the target (any correct expression counts).

Rows carry `problem` (the problem as JSON, which the reward reads back), `answer` (one reference solution, the
completion SFT teaches) and `prompt`: plain text (`style="plain"`: the question and a newline, for models without a
chat template) or a one-message conversation (`style="chat"`), as TRL takes them.
"""

import ast
import json
import random
import re
from fractions import Fraction

PROMPT_STYLES = ("plain", "chat")
ANSWER_LINE = re.compile(r"^[ \t]*answer[ \t]*:[ \t]*(.*?)[ \t]*$", re.IGNORECASE | re.MULTILINE)
DEFAULT_FORMAT_REWARD = 0.1


def final_answer(completion) -> str | None:
    """The text of the completion's last `Answer:` line, or None. A completion is a string or a list of chat
    messages (the assistant's reply is the last one)."""
    if isinstance(completion, list):
        completion = completion[-1]["content"] if completion else ""
    if not isinstance(completion, str):
        raise ValueError(f"a completion must be a string or a list of chat messages, got {type(completion).__name__}")
    matches = ANSWER_LINE.findall(completion)
    return matches[-1] if matches else None


class VerifiableTask:
    """A family of problems with exactly checkable answers. Subclasses define `draw_problem`, `question`,
    `solution` and `is_correct`; everything else (datasets, reward, accuracy) is shared."""

    name = ""
    format_hint = "End your reply with a line of the form 'Answer: <answer>'."

    def __init__(self, format_reward: float = DEFAULT_FORMAT_REWARD):
        if isinstance(format_reward, bool) or not isinstance(format_reward, (int, float)) or not 0 <= format_reward < 1:
            raise ValueError(f"format_reward must be a number in [0, 1), got {format_reward!r}")
        self.format_reward = float(format_reward)

    # -- what a task defines -------------------------------------------------------------------------------------

    def draw_problem(self, rng: random.Random) -> dict:
        raise NotImplementedError

    def question(self, problem: dict) -> str:
        raise NotImplementedError

    def solution(self, problem: dict) -> str:
        """One correct answer (the text after `Answer: `)."""
        raise NotImplementedError

    def is_correct(self, problem: dict, answer: str) -> bool:
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------------------------

    def reference_completion(self, problem: dict) -> str:
        """The completion SFT teaches: the answer line alone."""
        return f"Answer: {self.solution(problem)}"

    def prompt(self, problem: dict, style: str = "plain"):
        if style not in PROMPT_STYLES:
            raise ValueError(f"style must be one of {PROMPT_STYLES}, got {style!r}")
        if style == "plain":
            return self.question(problem) + "\n"
        return [{"role": "user", "content": f"{self.question(problem)} {self.format_hint}"}]

    def make_rows(self, n: int, seed: int = 0, style: str = "plain") -> list[dict]:
        """`n` problems drawn with `random.Random(seed)`: rows of prompt, problem (JSON) and answer."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n (the number of problems) must be an integer >= 1, got {n!r}")
        rng = random.Random(seed)
        rows = []
        for _ in range(n):
            problem = self.draw_problem(rng)
            rows.append({"prompt": self.prompt(problem, style), "problem": json.dumps(problem),
                         "answer": self.reference_completion(problem)})
        return rows

    def make_dataset(self, n: int, seed: int = 0, style: str = "plain"):
        """`make_rows` as a `datasets.Dataset`, the form `GRPOTrainer` takes."""
        from datasets import Dataset

        return Dataset.from_list(self.make_rows(n, seed, style))

    def correct(self, completions, problems) -> list[bool]:
        problems = _as_problems(problems, len(completions))
        verdicts = []
        for completion, problem in zip(completions, problems):
            answer = final_answer(completion)
            verdicts.append(answer is not None and self.is_correct(problem, answer))
        return verdicts

    def reward(self, prompts=None, completions=None, problem=None, **kwargs) -> list[float]:
        """TRL's reward-function signature: `problem` is the dataset column of the same name."""
        if completions is None or problem is None:
            raise ValueError("reward needs completions= and problem= (the dataset's `problem` column)")
        verdicts = self.correct(completions, problem)
        return [1.0 if right else (self.format_reward if final_answer(c) is not None else 0.0)
                for right, c in zip(verdicts, completions)]

    def accuracy(self, completions, problems) -> float:
        """The fraction of completions whose final answer is correct."""
        verdicts = self.correct(completions, problems)
        return sum(verdicts) / len(verdicts) if verdicts else 0.0

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r})"


def _as_problems(problems, count: int) -> list[dict]:
    if len(problems) != count:
        raise ValueError(f"got {count} completions but {len(problems)} problems")
    return [json.loads(p) if isinstance(p, str) else p for p in problems]


def _check_int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _parse_int(text: str) -> int | None:
    text = text.replace(",", "").replace(" ", "").rstrip(".")
    return int(text) if re.fullmatch(r"-?\d+", text) else None


class AdditionTask(VerifiableTask):
    name = "addition"
    format_hint = "End your reply with a line of the form 'Answer: <number>'."

    def __init__(self, digits: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.digits = _check_int("digits", digits, 1, 18)

    def draw_problem(self, rng):
        low = 0 if self.digits == 1 else 10 ** (self.digits - 1)
        return {"a": rng.randint(low, 10**self.digits - 1), "b": rng.randint(low, 10**self.digits - 1)}

    def question(self, problem):
        return f"What is {problem['a']} + {problem['b']}?"

    def solution(self, problem):
        return str(problem["a"] + problem["b"])

    def is_correct(self, problem, answer):
        return _parse_int(answer) == problem["a"] + problem["b"]


class SortingTask(VerifiableTask):
    name = "sorting"
    format_hint = "End your reply with a line of the form 'Answer: <the digits in order, separated by spaces>'."

    def __init__(self, min_length: int = 3, max_length: int = 5, **kwargs):
        super().__init__(**kwargs)
        self.min_length = _check_int("min_length", min_length, 1, 64)
        self.max_length = _check_int("max_length", max_length, self.min_length, 64)

    def draw_problem(self, rng):
        return {"digits": [rng.randint(0, 9) for _ in range(rng.randint(self.min_length, self.max_length))]}

    def question(self, problem):
        return "Sort in ascending order: " + " ".join(map(str, problem["digits"]))

    def solution(self, problem):
        return " ".join(map(str, sorted(problem["digits"])))

    def is_correct(self, problem, answer):
        # Separators do not matter ("1 2 5", "1, 2, 5", "125"): the digits and their order do.
        return [int(d) for d in re.findall(r"\d", answer)] == sorted(problem["digits"])


class CountdownTask(VerifiableTask):
    name = "countdown"
    format_hint = "End your reply with a line of the form 'Answer: <expression>'."

    def __init__(self, count: int = 3, largest: int = 9, **kwargs):
        super().__init__(**kwargs)
        self.count = _check_int("count", count, 2, 6)
        self.largest = _check_int("largest", largest, 2, 100)

    def draw_problem(self, rng):
        # The target is the value of a random left-to-right expression over the numbers, so every problem has a
        # solution; drawn again until that value is a positive integer.
        while True:
            numbers = [rng.randint(1, self.largest) for _ in range(self.count)]
            order = rng.sample(numbers, len(numbers))
            expression = str(order[0])
            for number in order[1:]:
                operator = rng.choice("+-*/")
                expression = f"({expression}{operator}{number})" if operator in "+-" else f"{expression}{operator}{number}"
            value = _evaluate(expression)
            if value is not None and value.denominator == 1 and value > 0:
                return {"numbers": numbers, "target": int(value), "solution": _strip_outer(expression)}

    def question(self, problem):
        numbers = ", ".join(map(str, problem["numbers"]))
        return f"Use {numbers} once each, with + - * / and parentheses, to make {problem['target']}."

    def solution(self, problem):
        return problem["solution"]

    def is_correct(self, problem, answer):
        used = _numbers_in(answer)
        if used is None or sorted(used) != sorted(problem["numbers"]):
            return False
        value = _evaluate(answer)
        return value is not None and value == problem["target"]


_OPERATORS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
              ast.Div: lambda a, b: a / b}


def _parse_expression(text: str):
    text = text.strip().rstrip(".")
    if not text or len(text) > 200 or not re.fullmatch(r"[\d\s+\-*/()]+", text):
        return None
    try:
        return ast.parse(text, mode="eval").body
    except SyntaxError:
        return None


def _numbers_in(text: str) -> list[int] | None:
    tree = _parse_expression(text)
    if tree is None:
        return None
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)]


def _evaluate(text: str) -> Fraction | None:
    """The exact value of an arithmetic expression of integers, + - * / and parentheses; None if it is anything
    else (names, calls, powers, unary signs) or divides by zero. Never `eval`."""
    tree = _parse_expression(text)

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ZeroDivisionError
            return _OPERATORS[type(node.op)](left, right)
        raise ValueError("not an arithmetic expression")

    if tree is None:
        return None
    try:
        return value(tree)
    except (ValueError, ZeroDivisionError):
        return None


def _strip_outer(expression: str) -> str:
    if expression.startswith("(") and expression.endswith(")") and _evaluate(expression[1:-1]) == _evaluate(expression):
        # Only when the outer pair encloses the whole expression ("(1+2)*(3+4)" must keep its parentheses).
        depth = 0
        for index, char in enumerate(expression):
            depth += char == "("
            depth -= char == ")"
            if depth == 0 and index < len(expression) - 1:
                return expression
        return expression[1:-1]
    return expression


TASKS = {task.name: task for task in (AdditionTask, SortingTask, CountdownTask)}


def get_task(name: str, **options) -> VerifiableTask:
    """The task called `name`, built with its options (see the module docstring)."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    try:
        return TASKS[name](**options)
    except TypeError as error:  # an option the task does not have
        raise ValueError(f"task {name!r} got an unknown option: {error}") from None


def character_tokenizer(extra_special_tokens: tuple[str, ...] = ("<|mask|>",)):
    """A character-level fast tokenizer over the characters every task's text uses (ids 0-2: pad, bos, eos; then
    `extra_special_tokens`). Text round-trips exactly, so a tiny model trained from scratch reads and writes the
    same prompts and answers as a real one. Used by the tests and toy runs."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", *extra_special_tokens]
    characters = sorted(set(string.ascii_letters + string.digits + " \n.,:;?!'<>()+-*/="))
    vocab = {token: index for index, token in enumerate(specials + characters)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=list(extra_special_tokens))


__all__ = [
    "PROMPT_STYLES",
    "TASKS",
    "AdditionTask",
    "CountdownTask",
    "SortingTask",
    "VerifiableTask",
    "character_tokenizer",
    "final_answer",
    "get_task",
]

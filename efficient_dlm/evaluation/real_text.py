"""Real text that nobody in this project wrote, available on every machine: the Python standard library."""

import codecs
import contextlib
import importlib
import inspect
import io
import re

# Modules whose docstrings open with a paragraph of ordinary English prose.
DOCSTRING_MODULES = ("json", "collections", "heapq", "difflib", "textwrap", "shlex")


def zen_of_python() -> list[str]:
    """The Zen of Python, line by line (stored rot13-encoded in the `this` module)."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the poem
        import this
    return [line for line in codecs.decode(this.s, "rot13").splitlines() if line and not line.startswith("The Zen")]


def real_text_samples(count: int = 4) -> list[str]:
    """`count` short real texts: the Zen of Python's first lines, then the opening paragraphs of stdlib docstrings."""
    samples = [" ".join(zen_of_python()[:6])]
    for name in DOCSTRING_MODULES:
        doc = inspect.getdoc(importlib.import_module(name)) or ""
        paragraph = re.sub(r"\s+", " ", doc.split("\n\n")[0]).strip()
        if len(paragraph.split()) >= 8:
            samples.append(paragraph)
    if count > len(samples):
        raise ValueError(f"count must be at most {len(samples)}, got {count}")
    return samples[:count]

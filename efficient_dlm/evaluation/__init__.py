"""Evaluation: likelihoods, task suites, throughput."""

from .likelihood import causal_token_nll, next_token_nll
from .real_text import real_text_samples, zen_of_python
from .throughput import GenerationRun, completion_tokens, timed_generate, timed_generate_each

__all__ = [
    "GenerationRun",
    "causal_token_nll",
    "completion_tokens",
    "next_token_nll",
    "real_text_samples",
    "timed_generate",
    "timed_generate_each",
    "zen_of_python",
]

"""Evaluation: likelihoods, task suites, throughput."""

from .likelihood import causal_token_nll, next_token_nll
from .real_text import real_text_samples, zen_of_python

__all__ = ["causal_token_nll", "next_token_nll", "real_text_samples", "zen_of_python"]

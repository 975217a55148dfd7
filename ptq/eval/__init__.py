"""Evaluation: perplexity on strided windows, task accuracy through lm-eval."""

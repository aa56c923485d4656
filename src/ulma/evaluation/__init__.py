"""Evaluation: perplexity, implicit-reward accuracy (and, later, generation and judges)."""

"""Evaluation: held-out metrics for training (:mod:`.metrics`), and ``ulma eval`` / ``ulma report``:
perplexity, generation, judges (API, local LLM, reward model), win rates with confidence
intervals, judge agreement with human labels, and reports (see :mod:`.cli`)."""

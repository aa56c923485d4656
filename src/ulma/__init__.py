"""ulma: align language models with demonstrations and point-wise human feedback."""

__version__ = "0.1.0"

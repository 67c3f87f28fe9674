"""fairforget: measure social bias in language models and remove it by machine unlearning."""

__version__ = "0.1.0"

"""The GPT of ablate: every attention geometry, positional scheme and register setting as configuration."""

from model.config import GPTConfig
from model.gpt import GPT

__all__ = ["GPT", "GPTConfig"]

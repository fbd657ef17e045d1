"""The GPT of ablate: every attention geometry, positional scheme and register setting as configuration."""

from model.config import LOSSES, GPTConfig

__all__ = ["GPT", "LOSSES", "GPTConfig"]


def __getattr__(name: str):
    # the network (torch, kernels, torch._dynamo) loads on first use: code that only reads or validates
    # configs, such as a study's driver process, does not pay for it
    if name == "GPT":
        from model.gpt import GPT

        return GPT
    raise AttributeError(f"module 'model' has no attribute {name!r}")

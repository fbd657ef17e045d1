"""The one small logging interface the training loop reports through (no Ray or MLflow here)."""

from __future__ import annotations

import sys
from typing import Any, Protocol

from ablate.responses import TRAIN_LOSS_CURVE, VAL_LOSS_CURVE


class MetricLogger(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


class NullLogger:
    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass


class ConsoleLogger:
    """Prints train/val progress lines to stderr (used by `ablate train`)."""

    KEYS = (TRAIN_LOSS_CURVE, VAL_LOSS_CURVE, "lr", "grad_norm", "tokens_per_s", "mfu")

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        shown = [f"{k} {metrics[k]:.4g}" for k in self.KEYS if k in metrics]
        if shown:
            print(f"step {step:>6} | " + " | ".join(shown), file=sys.stderr, flush=True)


class RecordingLogger:
    """Keeps everything in memory (tests, and callers that want the curves back)."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.history: list[tuple[int, dict[str, float]]] = []

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.history.append((step, dict(metrics)))

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(step, m[key]) for step, m in self.history if key in m]

"""Measured training throughput per GPU (rates.json), for `ablate plan`'s cost of a GPU study.

Each row is one measurement: the vocabulary, how many trials shared a GPU, the tokens per trial (none for
one long trial's steady rate, where a trial's fixed costs no longer count) and the aggregate tokens/s
per GPU, with the command, GPU and date that produced it, and whether its trials were clients of an
NVIDIA MPS daemon (`mps`, false where absent). A study gets the nearest row, by the same log-distance rule
as the kernel table: vocabulary, trials per GPU, tokens per trial, then MPS as the study would run.

A study's measured rate includes what its trials spend besides training; a long trial's steady rate does
not. For those, `fixed_costs` holds what a study was measured to spend per trial (first window, setup,
run bookkeeping, idle slots) and per launch (before the first trial and after the last).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

TABLE_PATH = Path(__file__).with_name("rates.json")
LONG_TRIAL = 1e9  # the tokens per trial a steady (long-trial) row stands for in the distance


@dataclass(frozen=True)
class Rate:
    tokens_per_s_per_gpu: float
    row: dict

    def describe(self) -> str:
        r = self.row
        size = (
            f"{r['tokens_per_trial'] / 1e6:g}M tokens per trial" if r["tokens_per_trial"] else "long trials"
        )
        return (
            f"measured {r['tokens_per_s_per_gpu'] / 1e6:.2f}M tokens/s per GPU: {r['what']}; vocab "
            f"{r['vocab']}, {r['trials_per_gpu']} trial(s) per GPU{', MPS' if r.get('mps') else ''}, {size} "
            f"({r['command']}; {r['gpu']}, {r['date']})"
        )

    @property
    def steady(self) -> bool:
        """A long trial's steady rate: a trial's fixed costs are not in it."""
        return self.row["tokens_per_trial"] is None


@dataclass(frozen=True)
class FixedCosts:
    per_trial_s: float  # slot seconds a trial spends besides training and evaluation
    start_s: float  # wall seconds a launch spends before its first trial and after its last
    row: dict

    def describe(self) -> str:
        r = self.row
        return (
            f"{self.per_trial_s:g} s per trial and {self.start_s:g} s per launch, measured: {r['what']} "
            f"({r['command']}; {r['gpu']}, {r['date']})"
        )


def load_rows(path: Path = TABLE_PATH) -> list[dict]:
    return json.loads(path.read_text())["rows"] if path.exists() else []


def fixed_costs(path: Path = TABLE_PATH) -> FixedCosts | None:
    """The measured fixed costs of a study on the fast path; None without a table."""
    row = json.loads(path.read_text()).get("fixed_costs") if path.exists() else None
    return FixedCosts(float(row["per_trial_s"]), float(row["start_s"]), row) if row else None


def nearest(
    vocab: int,
    trials_per_gpu: float,
    tokens_per_trial: float,
    rows: list[dict] | None = None,
    mps: bool = False,
):
    """The measured rate closest to a study's vocabulary, packing, trial length and MPS; None without rows."""
    rows = load_rows() if rows is None else rows
    if not rows:
        return None

    def distance(row: dict) -> tuple[float, float, float, bool]:
        length = row["tokens_per_trial"] or LONG_TRIAL
        return (
            abs(math.log(row["vocab"] / vocab)),
            abs(math.log(row["trials_per_gpu"] / trials_per_gpu)),
            abs(math.log(length / tokens_per_trial)),
            bool(row.get("mps")) != mps,
        )

    row = min(rows, key=distance)
    return Rate(float(row["tokens_per_s_per_gpu"]), row)


def study_vocab(data: dict) -> tuple[int, bool]:
    """A study's vocabulary from its data settings: (size, whether it is assumed).

    `random:N` and `bpe:N` say it; a hub or local tokenizer is taken as GPT-2's 50257 (the published runs'
    GPT-Neo tokenizer), which is then an assumption."""
    source, tokenizer = str(data.get("source", "")), str(data.get("tokenizer", ""))
    for text, prefix in ((source, "random:"), (tokenizer, "bpe:")):
        if text.startswith(prefix) and text[len(prefix) :].isdigit():
            return int(text[len(prefix) :]), False
    return 50257, True

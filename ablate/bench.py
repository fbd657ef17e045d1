"""Training throughput of one trial on a GPU: `python -m ablate.bench`.

Runs `ablate.train.train` on random tokens at the seed-size model (4 layers, d_model 256, 4 heads,
context 256, batch 64, vocab 50257, bf16, compiled) for every metric, with the plain loss and with
the fused chunked loss, and prints steady-state tokens/s, MFU and peak memory as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ablate.config import RunConfig, from_dict
from ablate.logger import RecordingLogger
from ablate.train import train

SEED_MODEL = {"n_layers": 4, "d_model": 256, "n_heads": 4, "context": 256}


def bench_config(metric: str, loss_chunks: int, steps: int, backend: str) -> RunConfig:
    tree = {
        # the backend applies to rbf and penalty; sdpa always runs torch's SDPA (the baseline)
        "model": {
            **SEED_MODEL,
            "metric": metric,
            "position": "rope",
            "attn_backend": "auto" if metric == "sdpa" else backend,
        },
        "data": {"source": "random:50257", "val_tokens": 64 * 256},
        "train": {
            "tokens": steps * 64 * 256,
            "batch_size": 64,
            "eval_every": 10 * steps,
            "eval_batches": 1,
            "log_every": 20,
            "compile": True,
            "loss_chunks": loss_chunks,
        },
    }
    return from_dict(RunConfig, tree)


def run_one(metric: str, loss_chunks: int, steps: int, backend: str) -> dict:
    log = RecordingLogger()
    result = train(bench_config(metric, loss_chunks, steps, backend), log)
    return {
        "metric": metric,
        "loss": "fused chunked" if loss_chunks > 1 else "plain",
        "tokens_per_s": steady_median(log, "tokens_per_s"),
        "mfu": steady_median(log, "mfu"),
        "peak_mem_gb": log.series("peak_mem_gb")[-1][1],
        "status": result.status,
    }


def steady_median(log: RecordingLogger, key: str) -> float:
    """Median over the logging windows after the first two (which include compilation)."""
    values = sorted(v for _, v in log.series(key)[2:])
    return values[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--loss-chunks", type=int, default=8, help="fused loss chunks (1: plain loss only)")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("ablate.bench measures GPU throughput; no CUDA device is available")
    rows = []
    for loss_chunks in sorted({1, args.loss_chunks}):
        for metric in ("sdpa", "rbf", "penalty"):
            rows.append(run_one(metric, loss_chunks, args.steps, args.backend))
            print(json.dumps(rows[-1]), flush=True)
    print(
        f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.steps} steps, backend {args.backend}\n"
    )
    print("| metric | loss | tokens/s | vs sdpa (same loss) | MFU | peak memory |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        base = next(r for r in rows if r["metric"] == "sdpa" and r["loss"] == row["loss"])
        print(
            f"| {row['metric']} | {row['loss']} | {row['tokens_per_s'] / 1e6:.2f}M | "
            f"{row['tokens_per_s'] / base['tokens_per_s']:.3f}x | {row['mfu']:.1%} | {row['peak_mem_gb']:.1f} GB |"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

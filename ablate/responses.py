"""The responses a trial reports, each named once, here, and produced under that name by `ablate.train`.

Torch-free, so that checking a study file (`ablate.spec`) loads no model. The record keeps a response
as the `final/<name>` metric of the trial's run, and the loss curves as the per-step metrics `val/loss`
and `train/loss` (`ablate.tracking` writes and reads both).
"""

RESPONSES = {
    "val_loss": "validation loss at the end of training (nats per token)",
    "train_loss": "training loss of the last step (nats per token)",
    "tokens_per_s": "median training tokens/s over logging windows after the first (compilation excluded)",
    "mfu": "model FLOP utilisation at that rate (CUDA devices of known peak only)",
    # attention diagnostics of the final evaluation, means over layers (model/diagnostics.py)
    "key_norm_mean": "mean norm of the text keys",
    "key_norm_p99": "99th percentile of the text keys' norms",
    "key_norm_max_over_median": "largest text key norm over the median",
    "sink_first_token": "share of text queries' attention on the first text token",
    "sink_registers": "share of text queries' attention on the registers (models with registers only)",
    "attn_entropy": "mean entropy of text queries' attention (nats)",
}
DIAGNOSTICS = (
    "key_norm_mean",
    "key_norm_p99",
    "key_norm_max_over_median",
    "sink_first_token",
    "sink_registers",
    "attn_entropy",
)
CUDA_ONLY = ("mfu",)
VAL_LOSS_CURVE, TRAIN_LOSS_CURVE = "val/loss", "train/loss"  # per-step metrics: the loss curves

"""Measurement scripts, apart from the product: `python -m ablate.bench.<name>`.

throughput: one trial's training tokens/s on a GPU. packing: several trials packed on one GPU.
study: how well a whole study uses its GPUs. analysis: the time of the analysis and report of a large
simulated study. calibrate: the error rates and coverage of the verdict on simulated studies.
"""

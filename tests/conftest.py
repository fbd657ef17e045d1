"""Shared test set-up: `gpu` tests are skipped where CUDA is absent, and each one's garbage is collected
when it ends."""

import gc

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _collect_gpu_garbage(request):
    """After a `gpu` test, collect its reference cycles (compiled graphs, CUDA graphs, kernels) there.

    Left to the collector, they are freed whenever a later test allocates enough: once, an xdist worker
    died with a segmentation fault inside Triton's compiler, garbage-collecting, in an unrelated test. If
    freeing some test's objects crashes, it now crashes in that test's teardown, which names it.
    """
    yield
    if "gpu" in request.keywords and torch.cuda.is_available():
        torch.cuda.synchronize()
        gc.collect()

"""One BLAS thread for the analysis: it solves many small least-squares problems, where BLAS threads
only add overhead and, on a machine busy with training, stall (measured: 3 s vs 7-14 s for a
1000-trial study on 2 loaded cores). threadpoolctl ships with scikit-learn; without it, BLAS keeps
its own thread count."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - depends on the environment
    threadpool_limits = None


def one_blas_thread() -> AbstractContextManager:
    """A context in which BLAS uses one thread (a no-op without threadpoolctl)."""
    return threadpool_limits(limits=1, user_api="blas") if threadpool_limits else nullcontext()

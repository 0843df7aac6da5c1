r"""Batching over individuals: one `vmap`, or on CPU a sequence of `vmap`ped chunks.

Why chunks on CPU: jaxlib's LAPACK kernels (LU, QR, triangular solves) split a batch
of matrices over the CPU's intra-op thread pool once the batch holds more than
$2\times10^5$ flops of work, and wait for the pieces *on a thread of that same pool*.
When as many such kernels run at once as the pool has threads (two, on a 2-core
machine, e.g. the independent linear solves of a stiff solver's stages for all lanes
of a population), every thread waits for work that no thread is free to run, and
the program hangs with all threads idle. It is reproducible with two batched
`jnp.linalg.solve` calls of 1000 9×9 systems in a `while_loop`. Keeping each kernel's
batch below the threshold keeps it on the calling thread, so the individuals are
processed in chunks small enough for that (`lax.map(..., batch_size=chunk)`); lanes
in one chunk no longer wait for the slowest lane of another, either. GPUs batch
LAPACK-type work on the device and take the whole population in one `vmap`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax


# jaxlib (lapack_kernels.cc, GetLapackBatchChunkSize): a batched kernel runs on the
# calling thread while batch × flops per matrix stays below this.
LAPACK_SERIAL_WORK = 200_000


def safe_chunk_size(*flops_per_matrix: int, lanes_per_individual: int = 1) -> int:
    """Individuals per chunk such that every batched LAPACK kernel, of the given
    flops per matrix as jaxlib counts them ($n^3$ for an $n\\times n$ LU, about
    $2mn^2$ for an $m\\times n$ QR, $n^2 k$ for a triangular solve with $k$ right-hand
    sides), stays below jaxlib's threshold for splitting over threads."""
    worst = max(1, *(int(f) for f in flops_per_matrix)) * max(1, lanes_per_individual)
    return max(1, (LAPACK_SERIAL_WORK - 1) // worst)


def fit_kernel_flops(n_states: int, n_residuals: int, n_unknowns: int) -> tuple[int, ...]:
    """Flops per matrix (as jaxlib counts them) of the batched LAPACK kernels in a fit
    of one lane: the stiff solver's $n\\times n$ LU, the least-squares QR of the
    residual Jacobian ($m \\times n_u$) and the forward-sensitivity triangular solves
    with one right-hand side per unknown."""
    return n_states**3, 2 * n_residuals * n_unknowns**2, n_states**2 * (n_unknowns + 1)


def default_chunk_size(n_individuals: int, *flops_per_matrix: int,
                       lanes_per_individual: int = 1) -> int | None:
    """`None` (one `vmap` of everything) off CPU or when the batch is small enough;
    otherwise `safe_chunk_size`."""
    if jax.default_backend() != "cpu":
        return None
    chunk = safe_chunk_size(*flops_per_matrix, lanes_per_individual=lanes_per_individual)
    return None if chunk >= n_individuals else chunk


def map_individuals(fn: Callable, args: Sequence, in_axes: Sequence[int | None],
                    chunk_size: int | None):
    """`jax.vmap(fn, in_axes)(*args)`, or with `chunk_size` the same computed
    `chunk_size` individuals at a time (`jax.lax.map` with `batch_size`). `in_axes`
    entries are 0 (mapped over the leading axis) or `None` (shared)."""
    args, in_axes = tuple(args), tuple(in_axes)
    if any(axis not in (0, None) for axis in in_axes):
        raise ValueError(f"in_axes must be 0 or None, got {in_axes}")
    if chunk_size is None:
        return jax.vmap(fn, in_axes=in_axes)(*args)
    mapped = [i for i, axis in enumerate(in_axes) if axis == 0]

    def body(xs):
        full = list(args)
        for i, x in zip(mapped, xs):
            full[i] = x
        return fn(*full)

    return jax.lax.map(body, tuple(args[i] for i in mapped), batch_size=chunk_size)

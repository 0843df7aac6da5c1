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

import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


INDIVIDUALS = "individuals"
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


def fit_kernel_flops(n_states: int, n_residuals: int, n_unknowns: int,
                     tangent_solves: bool = True) -> tuple[int, ...]:
    """Flops per matrix (as jaxlib counts them) of the batched LAPACK kernels in a fit
    of one lane: the stiff solver's $n\\times n$ LU or inverse, the least-squares QR
    of the residual Jacobian ($m \\times n_u$) and, with `tangent_solves` (an
    implicit solver's Newton solves; not `Rodas5`, whose forward tangents are
    products with its explicit inverse), the forward-sensitivity triangular solves
    with one right-hand side per unknown."""
    flops = (n_states**3, 2 * n_residuals * n_unknowns**2)
    return (*flops, n_states**2 * (n_unknowns + 1)) if tangent_solves else flops


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
    entries are 0 (mapped over the leading axis) or `None` (shared); every output leaf
    has the individuals on its leading axis.

    With `CALIBRATE_SHARD=1` in the environment and several devices, the individual
    axis is split over `jax.devices()` (see `_sharded`). It is opt-in because XLA's
    partitioner all-reduces the stop condition of every vmapped while loop (each ODE
    and optimiser step) across devices: on two CPU devices of one machine an
    enzyme-kinetics population evaluation took 7x longer than on one.
    """
    args, in_axes = tuple(args), tuple(in_axes)
    if any(axis not in (0, None) for axis in in_axes):
        raise ValueError(f"in_axes must be 0 or None, got {in_axes}")
    devices = jax.devices()
    if len(devices) > 1 and os.environ.get("CALIBRATE_SHARD", "") == "1":
        return _sharded(fn, args, in_axes, chunk_size, devices)
    if chunk_size is None:
        return jax.vmap(fn, in_axes=in_axes)(*args)
    mapped = [i for i, axis in enumerate(in_axes) if axis == 0]
    n = jax.tree.leaves(args[mapped[0]])[0].shape[0]
    # Equal chunks of at most `chunk_size`, the last padded with copies of the last
    # individual: `lax.map` would otherwise compile a second vmap of `fn` for the
    # remainder, doubling the compile time of a large population for nothing.
    chunks = -(-n // chunk_size)
    width = -(-n // chunks)
    total = chunks * width

    def body(xs):
        return fn(*_with_mapped(args, mapped, xs))

    out = jax.lax.map(body, tuple(jax.tree.map(lambda a: _padded(a, total), args[i])
                                  for i in mapped), batch_size=width)
    return jax.tree.map(lambda a: a[:n], out) if total > n else out


def _padded(a, total: int):
    """`a` with its leading axis extended to `total` by copies of its last entry."""
    extra = total - a.shape[0]
    return jnp.concatenate([a, jnp.repeat(a[-1:], extra, axis=0)]) if extra else a


def _with_mapped(args, mapped, xs):
    """`args` with the entries at positions `mapped` replaced by `xs`."""
    full = list(args)
    for i, x in zip(mapped, xs):
        full[i] = x
    return full


def _sharded(fn, args, in_axes, chunk_size, devices):
    """`map_individuals` with the individual axis split over `devices` by XLA's SPMD
    partitioner: each chunk of `len(devices) * chunk_size` individuals is laid out
    across the devices (sharding constraints on the vmapped axis). `devices` may span
    the processes of `jax.distributed`; results come back replicated."""
    mesh = Mesh(np.array(devices), (INDIVIDUALS,))
    mapped = [i for i, axis in enumerate(in_axes) if axis == 0]
    n = jax.tree.leaves(args[mapped[0]])[0].shape[0]
    width = len(devices) * (chunk_size or -(-n // len(devices)))
    total = -(-n // width) * width

    def spread(tree):
        return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(
            a, NamedSharding(mesh, P(INDIVIDUALS))), tree)

    def chunk(xs):
        return spread(jax.vmap(fn, in_axes=in_axes)(*_with_mapped(args, mapped, spread(xs))))

    stacked = tuple(jax.tree.map(lambda a: _padded(a, total).reshape(total // width, width,
                                                               *a.shape[1:]), args[i])
                    for i in mapped)
    out = jax.lax.map(chunk, stacked)
    # Replicated results: every process of a multi-host run can read all of them.
    everywhere = NamedSharding(mesh, P())
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(
        a.reshape(total, *a.shape[2:])[:n], everywhere), out)

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

With several devices (several GPUs, or CPU devices from `jax_num_cpu_devices`, one per
core in the CLI) the individuals are split over them with `jax.shard_map`, and each
device maps its share as above. Its loops stop when its own lanes are done: XLA's
SPMD partitioner, given the same split as a sharding constraint, kept one program
whose every while loop all-reduced its stop condition across devices.
"""

from __future__ import annotations

import functools
import os
import sys
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
                     tangent_solves: bool = True, least_squares: bool = True
                     ) -> tuple[int, ...]:
    """Flops per matrix (as jaxlib counts them) of the batched LAPACK kernels in a fit
    of one lane: the stiff solver's $n\\times n$ LU or inverse; with `least_squares`
    the QR of the residual Jacobian ($m \\times n_u$), else a minimiser's
    $n_u \\times n_u$ solve (BFGS without its inverse, Newton steps); and, with
    `tangent_solves` (an implicit solver's Newton solves; not `Rodas5`, whose forward
    tangents are products with its explicit inverse), the forward-sensitivity
    triangular solves with one right-hand side per unknown. The diagnostics'
    symmetric eigendecomposition does not count: two loops of 400 batched 33 × 33
    ones ran where two such batched solves hang."""
    step = 2 * n_residuals * n_unknowns**2 if least_squares else n_unknowns**3
    flops = (n_states**3, step)
    return (*flops, n_states**2 * (n_unknowns + 1)) if tangent_solves else flops


def default_chunk_size(n_individuals: int, *flops_per_matrix: int,
                       lanes_per_individual: int = 1) -> int | None:
    """`None` (one `vmap` of everything) off CPU or when the batch is small enough;
    otherwise `safe_chunk_size`."""
    if jax.default_backend() != "cpu":
        return None
    chunk = safe_chunk_size(*flops_per_matrix, lanes_per_individual=lanes_per_individual)
    return None if chunk >= n_individuals else chunk


def lanes_per_map(n_individuals: int, chunk_size: int | None,
                  lanes_per_individual: int = 1) -> int:
    """The lanes one `vmap` of `map_individuals` runs together: an equal share of the
    individuals per device, at most `chunk_size` of them, times each individual's
    own lanes (starts, simulation conditions)."""
    share = -(-n_individuals // len(individual_devices()))
    return max(1, lanes_per_individual) * min(share, chunk_size or share)


def map_individuals(fn: Callable, args: Sequence, in_axes: Sequence[int | None],
                    chunk_size: int | None):
    """`jax.vmap(fn, in_axes)(*args)`, or with `chunk_size` the same computed
    `chunk_size` individuals at a time (`jax.lax.map` with `batch_size`). `in_axes`
    entries are 0 (mapped over the leading axis) or `None` (shared); every output leaf
    has the individuals on its leading axis.

    With several devices (`individual_devices`) the individual axis is split over them
    (see `_sharded`), each device mapping its share in the same way.
    """
    args, in_axes = tuple(args), tuple(in_axes)
    if any(axis not in (0, None) for axis in in_axes):
        raise ValueError(f"in_axes must be 0 or None, got {in_axes}")
    devices = individual_devices()
    if len(devices) > 1:
        return _sharded(fn, args, in_axes, chunk_size, devices)
    return _mapped_here(fn, args, in_axes, chunk_size)


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def individual_devices() -> list:
    """The devices a batch of individuals is split over: every device of the default
    backend (on CPU, `jax.config.update("jax_num_cpu_devices", k)` before first use
    makes k; the CLI takes one per core), or only the first with
    `CALIBRATE_SHARD=0`."""
    devices = jax.devices()
    return devices[:1] if os.environ.get("CALIBRATE_SHARD", "") == "0" else devices


def on_individual_devices(tree):
    """`tree` with its arrays replicated over `individual_devices()` (unchanged on one
    device, inside a trace, or across processes). The results of a split computation
    come back replicated over the devices; a compiled function called with them once
    and with fresh arrays (on the default device) another time would compile twice,
    so its callers pass every array this way."""
    devices = individual_devices()
    if len(devices) == 1 or jax.process_count() > 1:
        return tree
    everywhere = NamedSharding(Mesh(np.array(devices), (INDIVIDUALS,)), P())

    def replicated(leaf):
        if isinstance(leaf, jax.core.Tracer) or not isinstance(leaf, jax.Array | np.ndarray):
            return leaf
        return jax.device_put(leaf, everywhere)

    return jax.tree.map(replicated, tree)


def with_individual_devices(fn: Callable) -> Callable:
    """`fn` with its arguments passed through `on_individual_devices` first: for a
    compiled function that takes results of a split computation, so it compiles once.
    Its arguments must not reach `map_individuals` by closure (a replicated array
    closed over inside `shard_map` is refused); `map_individuals`'s own arguments
    may be replicated."""

    @functools.wraps(fn)
    def with_replicated_arguments(*args, **kwargs):
        args, kwargs = on_individual_devices((args, kwargs))
        return fn(*args, **kwargs)

    return with_replicated_arguments


def _n_individuals(args, in_axes) -> int:
    mapped = [i for i, axis in enumerate(in_axes) if axis == 0]
    return jax.tree.leaves(args[mapped[0]])[0].shape[0]


def _mapped_here(fn, args, in_axes, chunk_size):
    """`map_individuals` on one device."""
    n = _n_individuals(args, in_axes)
    if chunk_size is None or chunk_size >= n:
        return jax.vmap(fn, in_axes=in_axes)(*args)
    mapped = [i for i, axis in enumerate(in_axes) if axis == 0]
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
    """`map_individuals` with the individual axis split over `devices` by
    `jax.shard_map`: each device maps its own share (padded with copies of the last
    individual to equal shares) with `_mapped_here`, so its ODE, Newton and
    optimiser loops stop when its own lanes are done, with no collective inside
    them. `devices` may span the processes of `jax.distributed`; results come back
    replicated, so every process can read all of them."""
    _structures_compared_without_sharding()
    mesh = Mesh(np.array(devices), (INDIVIDUALS,))
    n = _n_individuals(args, in_axes)
    share = -(-n // len(devices))
    total = share * len(devices)
    padded = tuple(jax.tree.map(lambda a: _padded(a, total), arg) if axis == 0 else arg
                   for arg, axis in zip(args, in_axes))
    specs = tuple(P(INDIVIDUALS) if axis == 0 else P() for axis in in_axes)

    def on_one_device(*local):
        return _mapped_here(fn, local, in_axes, chunk_size)

    # check_vma=False: equinox and lineax internals (error_if, closure conversion)
    # do not annotate which values vary across devices.
    out = jax.shard_map(on_one_device, mesh=mesh, in_specs=specs,
                        out_specs=P(INDIVIDUALS), check_vma=False)(*padded)
    everywhere = NamedSharding(mesh, P())
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a[:n], everywhere), out)


def _structures_compared_without_sharding() -> None:
    """Inside `shard_map` every traced value's shape carries the manual mesh as its
    sharding, while lineax builds operators' input and output structures, and
    equinox the example arguments of its closure conversions (under diffrax's
    checkpointed reverse mode), without one. Their structure checks
    (`eqx.tree_equal` of `ShapeDtypeStruct`s) then reject every linear solve,
    symmetric operator and checkpointed loop there (lineax issue 185, open in lineax
    0.1.1). This makes those checks compare shapes and dtypes without the sharding,
    which is what they mean to compare: each lineax module gets an `eqx` whose
    `tree_equal` does so (everything else is equinox itself), and so does equinox's
    closure conversion."""
    import equinox
    import equinox._ad

    if getattr(equinox._ad.tree_equal, "ignores_sharding", False):
        return
    equinox._ad.tree_equal = _tree_equal_without_sharding
    for name, module in list(sys.modules.items()):
        if (name == "lineax" or name.startswith("lineax.")) and \
                getattr(module, "eqx", None) is equinox:
            module.eqx = _EquinoxComparingUnshardedStructures(equinox)


def _tree_equal_without_sharding(*trees, **kwargs):
    """`eqx.tree_equal`, with every `ShapeDtypeStruct` compared without its sharding."""
    import equinox

    def unsharded(leaf):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, weak_type=leaf.weak_type) \
            if isinstance(leaf, jax.ShapeDtypeStruct) else leaf

    return equinox.tree_equal(*(jax.tree.map(unsharded, tree) for tree in trees), **kwargs)


_tree_equal_without_sharding.ignores_sharding = True


class _EquinoxComparingUnshardedStructures:
    """`equinox`, with `tree_equal` ignoring the sharding of `ShapeDtypeStruct`s."""

    def __init__(self, equinox):
        self._equinox = equinox

    def __getattr__(self, name):
        return getattr(self._equinox, name)

    tree_equal = staticmethod(_tree_equal_without_sharding)

"""Vector fields whose components XLA computes in one kernel.

A vector field written as `jnp.stack([f_0, ..., f_{n-1}])` of scalar expressions is a
`stack` (or a `concatenate` of one-element pieces) in its jaxpr. XLA's CPU backend never
fuses a concatenation of more than 8 operands, so inside a solver's step loop each
component gets a kernel of its own and the concatenation another, and on a small model
every kernel launch costs more than its arithmetic: in a Rodas5 step of the 9-state MAPK
cascade with forward sensitivities these were 160 of the step's 300 kernels. The same
vector as a select chain,

$$ y_j = f_0 \\text{ if } j = 0 \\text{ else } (f_1 \\text{ if } j = 1 \\text{ else }
(\\dots)), $$

is elementwise in $j$, so XLA fuses it, with the expressions feeding it, into one
kernel. `fuse_components` evaluates a function's jaxpr again with every such
concatenation of more than 8 pieces written that way. Values are identical (a select
copies); derivatives and batching go through the rewritten program like any other.
Concatenations of at most 8 pieces are left to XLA, which fuses them without computing
every piece for every element, as a select chain does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jax_core


# XLA's CPU instruction fusion refuses concatenations with more operands than this.
_FUSED_CONCATENATE_LIMIT = 8
# A select chain computes each of its pieces for every element, so a long vector is
# selected in groups and the groups concatenated: n·32 piece evaluations, not n².
_PIECES_PER_SELECT = 32


def fuse_components(function: Callable[..., Any]) -> Callable[..., Any]:
    """`function` with each concatenation of more than 8 one-element pieces computed as
    a select chain (module docstring). Arguments may be any pytree; arrays are traced,
    everything else is passed through as is."""

    @functools.wraps(function)
    def fused(*args):
        dynamic, static = eqx.partition(args, eqx.is_array)
        closed, out_shape = jax.make_jaxpr(
            lambda d: function(*eqx.combine(d, static)), return_shape=True
        )(dynamic)
        out = _evaluate(closed.jaxpr, closed.consts, jax.tree.leaves(dynamic))
        return jax.tree.unflatten(jax.tree.structure(out_shape), out)

    return fused


def _evaluate(jaxpr: jax_core.Jaxpr, consts, args) -> list:
    env: dict = {}

    def read(atom):
        return atom.val if isinstance(atom, jax_core.Literal) else env[atom]

    for var, value in zip(jaxpr.constvars, consts):
        env[var] = value
    for var, value in zip(jaxpr.invars, args):
        env[var] = value
    for eqn in jaxpr.eqns:
        inputs = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name == "stack" and len(inputs) > _FUSED_CONCATENATE_LIMIT:
            axis = eqn.params["axis"]
            pieces = [jnp.expand_dims(p, axis) for p in inputs]
            outputs = [_select_chain(pieces, axis, eqn.outvars[0].aval.dtype)]
        elif name == "concatenate" and _many_unit_pieces(eqn):
            outputs = [_select_chain(inputs, eqn.params["dimension"],
                                     eqn.outvars[0].aval.dtype)]
        elif name in ("pjit", "jit") and not eqn.effects:
            # A jitted helper (jnp functions are) may build the vector itself.
            inner = eqn.params["jaxpr"]
            outputs = _evaluate(inner.jaxpr, inner.consts, inputs)
        else:
            params = eqn.primitive.get_bind_params(eqn.params)
            subfunctions, params = params if isinstance(params, tuple) else ((), params)
            with eqn.ctx.manager:
                result = eqn.primitive.bind(*subfunctions, *inputs, **params)
            outputs = result if eqn.primitive.multiple_results else [result]
        for var, value in zip(eqn.outvars, outputs):
            env[var] = value
    return [read(v) for v in jaxpr.outvars]


def _many_unit_pieces(eqn) -> bool:
    axis = eqn.params["dimension"]
    return len(eqn.invars) > _FUSED_CONCATENATE_LIMIT and all(
        v.aval.shape[axis] == 1 for v in eqn.invars
    )


def _select_chain(pieces: list, axis: int, dtype):
    """Pieces of size 1 along `axis`, joined along it by one elementwise select chain."""
    if len(pieces) > _PIECES_PER_SELECT:
        groups = [
            _select_chain(pieces[i : i + _PIECES_PER_SELECT], axis, dtype)
            for i in range(0, len(pieces), _PIECES_PER_SELECT)
        ]
        return lax.concatenate(groups, axis)
    shape = list(jnp.shape(pieces[0]))
    shape[axis] = len(pieces)
    index = lax.broadcasted_iota(jnp.int32, shape, axis)

    def spread(piece):
        return jnp.broadcast_to(jnp.asarray(piece, dtype), shape)

    out = spread(pieces[-1])
    for i in range(len(pieces) - 2, -1, -1):
        out = lax.select(index == i, spread(pieces[i]), out)
    return out

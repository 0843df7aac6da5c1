"""Time-dependent inputs u(t): doses, stimuli, ligand concentrations."""

from __future__ import annotations

import abc

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float


class AbstractInput(eqx.Module):
    """A scalar function of time. Arrays are fields, so inputs batch with `vmap`."""

    @abc.abstractmethod
    def __call__(self, t) -> Float[Array, ""]: ...

    @property
    def discontinuities(self) -> Float[Array, " k"]:
        """Times where u jumps; the ODE solver steps exactly onto them."""
        return jnp.zeros((0,))


class _TabulatedInput(AbstractInput):
    times: Float[Array, " k"]
    values: Float[Array, " k"]

    def __init__(self, times, values):
        self.times = jnp.asarray(times, dtype=float)
        self.values = jnp.asarray(values, dtype=float)
        if self.times.ndim != 1 or self.times.shape != self.values.shape:
            raise ValueError(
                f"{type(self).__name__} needs 1-d `times` and `values` of one length"
            )


class PiecewiseConstant(_TabulatedInput):
    """$u(t) = v_i$ for $t_i \\le t < t_{i+1}$; $v_0$ before $t_0$, $v_{k-1}$ after.

    **Arguments:** `times` (increasing, shape k), `values` (shape k).
    """

    def __call__(self, t):
        index = jnp.clip(jnp.searchsorted(self.times, t, side="right") - 1, 0, None)
        return self.values[index]

    @property
    def discontinuities(self):
        return self.times


class Interpolated(_TabulatedInput):
    """Linear interpolation through `(times, values)`, constant beyond the ends."""

    def __call__(self, t):
        return jnp.interp(t, self.times, self.values)


class Constant(AbstractInput):
    """$u(t) = v$."""

    value: Float[Array, ""]

    def __init__(self, value):
        self.value = jnp.asarray(value, dtype=float)

    def __call__(self, t):
        return self.value

"""Named parameters with bounds and scales, and their unconstrained coordinates.

A parameter value $v$ lives on its *natural* scale. Optimisers see an unconstrained
coordinate $z \\in \\mathbb{R}$ built in two stages: the *scaled* value
$s = \\sigma(v)$ with $\\sigma \\in \\{\\mathrm{id}, \\log, \\log_{10}\\}$, then the bounded
interval $[\\sigma(\\ell), \\sigma(u)]$ mapped onto $\\mathbb{R}$ by a logistic map,

$$ s = a + (b - a)\\,\\mathrm{sigmoid}(z), $$

(or $s = a + \\mathrm{softplus}(z)$ / $s = b - \\mathrm{softplus}(z)$ for a one-sided bound,
and $s = z$ with no bound), so that any step an optimiser takes stays inside the bounds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


Scale = Literal["lin", "log", "log10"]
_SCALES = ("lin", "log", "log10")


class ParameterError(ValueError):
    """Invalid parameter specification or values (names the parameter)."""


class Parameter(eqx.Module):
    """One model parameter.

    **Arguments:**

    - `name`: identifier used in data files, results and `params[name]`.
    - `default`: nominal value on the natural scale (used when not estimated).
    - `lower`, `upper`: bounds on the natural scale (may be infinite for `scale="lin"`).
    - `scale`: `"lin"`, `"log"` or `"log10"`; the scale optimisers and priors work on.
    - `estimate`: whether fits estimate it by default (else it stays at `default`).
    - `description`, `unit`: free text shown in tables and reports.
    """

    name: str = eqx.field(static=True)
    default: float = eqx.field(static=True)
    lower: float = eqx.field(static=True, default=-math.inf)
    upper: float = eqx.field(static=True, default=math.inf)
    scale: Scale = eqx.field(static=True, default="lin")
    estimate: bool = eqx.field(static=True, default=True)
    description: str = eqx.field(static=True, default="")
    unit: str = eqx.field(static=True, default="")

    def __check_init__(self):
        if not self.name.isidentifier():
            raise ParameterError(f"parameter name {self.name!r} is not an identifier")
        if self.scale not in _SCALES:
            raise ParameterError(
                f"parameter {self.name!r}: scale {self.scale!r} is not one of {_SCALES}"
            )
        if not self.lower < self.upper:
            raise ParameterError(
                f"parameter {self.name!r}: lower bound {self.lower} is not below "
                f"upper bound {self.upper}"
            )
        if self.scale != "lin" and self.lower <= 0:
            raise ParameterError(
                f"parameter {self.name!r}: {self.scale} scale needs a positive lower "
                f"bound, got {self.lower}"
            )
        if not self.lower <= self.default <= self.upper:
            raise ParameterError(
                f"parameter {self.name!r}: default {self.default} lies outside its "
                f"bounds [{self.lower}, {self.upper}]"
            )

    def to_scaled(self, value):
        if self.scale == "log":
            return jnp.log(value)
        if self.scale == "log10":
            return jnp.log10(value)
        return value

    def from_scaled(self, scaled):
        if self.scale == "log":
            return jnp.exp(scaled)
        if self.scale == "log10":
            return 10.0**scaled
        return scaled

    @property
    def scaled_bounds(self) -> tuple[float, float]:
        return _scale_float(self.lower, self.scale), _scale_float(self.upper, self.scale)

    def to_unconstrained(self, value):
        a, b = self.scaled_bounds
        s = self.to_scaled(value)
        if math.isfinite(a) and math.isfinite(b):
            frac = jnp.clip((s - a) / (b - a), 1e-15, 1 - 1e-15)
            return jnp.log(frac) - jnp.log1p(-frac)
        if math.isfinite(a):
            return _inverse_softplus(jnp.maximum(s - a, 1e-300))
        if math.isfinite(b):
            return _inverse_softplus(jnp.maximum(b - s, 1e-300))
        return s

    def from_unconstrained(self, z):
        a, b = self.scaled_bounds
        if math.isfinite(a) and math.isfinite(b):
            s = a + (b - a) * jax.nn.sigmoid(z)
        elif math.isfinite(a):
            s = a + jax.nn.softplus(z)
        elif math.isfinite(b):
            s = b - jax.nn.softplus(z)
        else:
            s = z
        # exp(log(u)) can exceed u by an ulp; keep bounds exact.
        return jnp.clip(self.from_scaled(s), self.lower, self.upper)


def _scale_float(value: float, scale: str) -> float:
    if math.isinf(value) or scale == "lin":
        return value
    return math.log(value) if scale == "log" else math.log10(value)


def _inverse_softplus(y):
    # log(expm1(y)) overflows for large y; y + log1p(-exp(-y)) does not.
    return y + jnp.log(-jnp.expm1(-y))


Params = dict[str, Float[Array, ""]]


class ParameterSpace(eqx.Module):
    """An ordered set of parameters, some estimated and the rest fixed.

    `to_vector`/`from_vector` map a natural-scale `dict` of the estimated parameters to
    the unconstrained vector $z$ optimisers work on, and back. Fixed parameters keep
    their values (from `fixed`, else their defaults).
    """

    parameters: tuple[Parameter, ...] = eqx.field(static=True)
    estimated: tuple[str, ...] = eqx.field(static=True)

    def __init__(
        self, parameters: Sequence[Parameter], estimated: Sequence[str] | None = None
    ):
        self.parameters = tuple(parameters)
        names = [p.name for p in self.parameters]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ParameterError(f"duplicate parameter names: {', '.join(duplicates)}")
        if estimated is None:
            estimated = [p.name for p in self.parameters if p.estimate]
        unknown = [n for n in estimated if n not in names]
        if unknown:
            raise ParameterError(
                f"unknown parameter(s) to estimate: {', '.join(unknown)}; the model has "
                f"{', '.join(names)}"
            )
        # Keep the model's order so vectors are reproducible whatever order users pass.
        self.estimated = tuple(n for n in names if n in set(estimated))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters)

    def __getitem__(self, name: str) -> Parameter:
        for p in self.parameters:
            if p.name == name:
                return p
        raise ParameterError(f"unknown parameter {name!r}; known: {', '.join(self.names)}")

    def defaults(self) -> dict[str, float]:
        return {p.name: p.default for p in self.parameters}

    def with_estimated(self, estimated: Sequence[str]) -> ParameterSpace:
        return ParameterSpace(self.parameters, estimated)

    def complete(self, values: Mapping[str, object] | None = None) -> Params:
        """All parameters as a dict of float arrays: `values` where given, else defaults."""
        values = {} if values is None else dict(values)
        unknown = [n for n in values if n not in self.names]
        if unknown:
            raise ParameterError(
                f"unknown parameter(s): {', '.join(unknown)}; known: {', '.join(self.names)}"
            )
        out = {}
        for p in self.parameters:
            v = values.get(p.name, p.default)
            if isinstance(v, (int, float, np.floating, np.integer)):
                v = float(v)
                if not p.lower <= v <= p.upper:
                    raise ParameterError(
                        f"parameter {p.name!r}: value {v} lies outside its bounds "
                        f"[{p.lower}, {p.upper}]"
                    )
            out[p.name] = jnp.asarray(v, dtype=float)
        return out

    def to_vector(self, params: Mapping[str, object]) -> Float[Array, " n"]:
        """Natural-scale values of the estimated parameters -> unconstrained vector."""
        return jnp.stack(
            [
                self[n].to_unconstrained(jnp.asarray(params[n], dtype=float))
                for n in self.estimated
            ]
        ) if self.estimated else jnp.zeros((0,))

    def from_vector(
        self, z: Float[Array, " n"], fixed: Mapping[str, object] | None = None
    ) -> Params:
        """Unconstrained vector -> full natural-scale parameter dict (fixed ones filled)."""
        fixed = {} if fixed is None else fixed
        out = {}
        index = {n: i for i, n in enumerate(self.estimated)}
        for p in self.parameters:
            if p.name in index:
                out[p.name] = p.from_unconstrained(z[index[p.name]])
            else:
                out[p.name] = jnp.asarray(fixed.get(p.name, p.default), dtype=float)
        return out

    def scaled_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Bounds of the estimated parameters on their scale (for start points)."""
        lo = np.array([self[n].scaled_bounds[0] for n in self.estimated])
        hi = np.array([self[n].scaled_bounds[1] for n in self.estimated])
        return lo, hi

    def from_scaled_vector(self, s: np.ndarray) -> dict[str, float]:
        return {
            n: float(self[n].from_scaled(s[i])) for i, n in enumerate(self.estimated)
        }

r"""ODE models: $\dot x = f(t, x, p, u(t))$, $x(t_0) = x_0(p)$, observables $h(t, x, p)$."""


import abc
from collections.abc import Mapping

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._fusion import fuse_components
from ._inputs import AbstractInput
from ._noise import AbstractNoiseModel, Gaussian
from ._parameters import Parameter, ParameterError, ParameterSpace, Params


class Observable(eqx.Module):
    """A measured quantity: a name, its noise model and a description."""

    name: str = eqx.field(static=True)
    noise: AbstractNoiseModel = eqx.field(static=True, default=Gaussian(1.0))
    description: str = eqx.field(static=True, default="")


class AbstractODEModel(eqx.Module):
    """An ODE model of a biological system.

    Subclasses set the class attributes and implement `rhs`, `initial_state` and
    `observe`. A model instance holds only structure; parameter values, inputs and data
    are arguments, so one compiled function serves every individual and `vmap` batches
    over them.

    **Class attributes:**

    - `states`: names of the state variables, in the order of the state vector.
    - `parameters`: the model's `Parameter`s (including initial-condition and noise
      parameters).
    - `observables`: the measured `Observable`s, in the order `observe` returns them.
    - `inputs`: names of time-dependent inputs $u(t)$ the vector field reads.
    - `t0`: the time at which `initial_state` holds.
    """

    states: eqx.AbstractClassVar[tuple[str, ...]]
    parameters: eqx.AbstractClassVar[tuple[Parameter, ...]]
    observables: eqx.AbstractClassVar[tuple[Observable, ...]]
    inputs: eqx.AbstractClassVar[tuple[str, ...]]
    t0: eqx.AbstractClassVar[float]

    @abc.abstractmethod
    def rhs(
        self,
        t: Float[Array, ""],
        x: Float[Array, " n_states"],
        params: Params,
        inputs: Mapping[str, Float[Array, ""]],
    ) -> Float[Array, " n_states"]:
        """The vector field $f(t, x, p, u(t))$; `inputs` holds $u(t)$ by name."""

    @abc.abstractmethod
    def initial_state(self, params: Params) -> Float[Array, " n_states"]:
        """$x_0(p)$: initial conditions may depend on (estimated) parameters."""

    @abc.abstractmethod
    def observe(
        self, t: Float[Array, ""], x: Float[Array, " n_states"], params: Params
    ) -> Float[Array, " n_observables"]:
        """Observables $h(t, x, p)$ in the order of `observables`."""

    def discontinuities(self, params: Params) -> Float[Array, " k"]:
        """Times where the vector field jumps (e.g. a piecewise switch at a
        parameter-dependent time); the solver steps exactly onto them."""
        return jnp.zeros((0,))

    def default_inputs(self) -> dict[str, AbstractInput]:
        """Inputs used when a simulation or dataset gives none."""
        if self.inputs:
            raise NotImplementedError(
                f"{type(self).__name__} reads inputs {self.inputs} but defines no "
                "`default_inputs`; pass `inputs=` explicitly"
            )
        return {}

    # Derived conveniences (not overridden).

    @property
    def parameter_space(self) -> ParameterSpace:
        return ParameterSpace(self.parameters)

    @property
    def observable_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.observables)

    @property
    def noise_models(self) -> tuple[AbstractNoiseModel, ...]:
        return tuple(o.noise for o in self.observables)

    @property
    def name(self) -> str:
        return type(self).__name__

    def check_inputs(self, inputs: Mapping[str, AbstractInput]) -> None:
        missing = [n for n in self.inputs if n not in inputs]
        unknown = [n for n in inputs if n not in self.inputs]
        if missing or unknown:
            raise ParameterError(
                f"model {self.name}: inputs {sorted(inputs)} do not match the model's "
                f"inputs {list(self.inputs)}"
                + (f" (missing: {', '.join(missing)})" if missing else "")
                + (f" (unknown: {', '.join(unknown)})" if unknown else "")
            )

    def vector_field(self, t, x, args):
        """diffrax-style `(t, y, args)` vector field with `args = (params, inputs)`."""
        params, inputs = args
        u = {name: inputs[name](t) for name in self.inputs}
        return fuse_components(self.rhs)(t, x, params, u)

    def describe(self) -> str:
        doc = (type(self).__doc__ or "").strip().splitlines()
        return doc[0] if doc else self.name


def check_state_shape(model: AbstractODEModel, x0) -> None:
    if jnp.shape(x0) != (len(model.states),):
        raise ValueError(
            f"model {model.name}: initial_state returned shape {jnp.shape(x0)}, expected "
            f"({len(model.states)},) for states {model.states}"
        )

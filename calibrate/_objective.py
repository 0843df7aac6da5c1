r"""The likelihood of one individual's measurements, as a scalar and as residuals.

With predictions $\hat y_{tk} = h_k(t, x(t; p), p)$ and per-measurement noise,

$$ L(p) = \sum_{t,k:\,m_{tk}} \tfrac12 r_{tk}^2 + \log\sigma_{tk} + \tfrac12\log 2\pi
          + \log\lvert g_k'(y_{tk})\rvert, \qquad r_{tk} = \frac{g_k(y_{tk}) - g_k(\hat y_{tk})}{\sigma_{tk}}, $$

where $g_k$ is the noise model's transform (identity, or log for log-normal) and
$m$ the mask of real measurements. `residuals` returns $r$ (plus $\sqrt{2\log\sigma + C}$
terms where $\sigma$ depends on parameters) with $L = \tfrac12\lVert r\rVert^2 + \text{const}$.
"""

from __future__ import annotations

from collections.abc import Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._data import Measurements
from ._inputs import AbstractInput
from ._model import AbstractODEModel
from ._noise import SIGMA_RESIDUAL_SHIFT
from ._parameters import Params, ParameterSpace
from ._results import RESULTS
from ._sensitivity import AbstractSensitivity, ForwardMode
from ._simulate import Integrator, Trajectory, simulate


# Residual entries returned for a failed solve: large, finite and parameter-independent,
# so trust-region solvers reject the step instead of receiving NaN.
FAILED_RESIDUAL = 1e6


class Objective(eqx.Module):
    """The negative log-likelihood of one individual as a function of the
    unconstrained vector `z` of the estimated parameters.

    **Arguments:**

    - `model`: the ODE model.
    - `estimate`: names of the estimated parameters (default: those marked `estimate`).
    - `fixed`: values of the parameters that are not estimated (default: defaults).
    - `integrator`, `sensitivity`: how to solve and differentiate.
    """

    model: AbstractODEModel
    space: ParameterSpace
    fixed: dict[str, Float[Array, ""]]
    integrator: Integrator
    sensitivity: AbstractSensitivity

    def __init__(
        self,
        model: AbstractODEModel,
        *,
        estimate=None,
        fixed: Mapping[str, object] | None = None,
        integrator: Integrator = Integrator(),
        sensitivity: AbstractSensitivity = ForwardMode(),
    ):
        self.model = model
        self.space = (
            model.parameter_space
            if estimate is None
            else model.parameter_space.with_estimated(estimate)
        )
        complete = model.parameter_space.complete(fixed)
        self.fixed = {n: v for n, v in complete.items() if n not in self.space.estimated}
        self.integrator = integrator
        self.sensitivity = sensitivity

    @property
    def n_parameters(self) -> int:
        return len(self.space.estimated)

    def params(self, z) -> Params:
        return self.space.from_vector(z, self.fixed)

    def trajectory(
        self, z, data: Measurements, inputs: Mapping[str, AbstractInput] | None = None
    ) -> Trajectory:
        return self.simulate(self.params(z), data, inputs)

    def simulate(self, params: Params, data: Measurements, inputs=None) -> Trajectory:
        """The model at natural-scale `params`, observed at the measurement times."""
        return simulate(
            self.model, params, data.times, inputs=inputs, integrator=self.integrator,
            sensitivity=self.sensitivity,
        )

    def _terms(self, params, data: Measurements, inputs):
        traj = self.simulate(params, data, inputs)
        predictions = traj.observables
        mask = data.mask
        # Masked entries get harmless stand-ins so no NaN leaks into derivatives.
        y = jnp.where(mask, data.values, 1.0)
        y_pred = jnp.where(mask, predictions, 1.0)
        columns = []
        for k, noise in enumerate(self.model.noise_models):
            sigma_model = noise.model_sigma(y_pred[:, k], params)
            sigma = jnp.where(jnp.isfinite(data.sigma[:, k]), data.sigma[:, k], sigma_model)
            sigma = jnp.where(mask[:, k], sigma, 1.0)
            columns.append((noise, y[:, k], y_pred[:, k], sigma))
        return traj, columns

    def evaluate(
        self, z, data: Measurements, inputs=None
    ) -> tuple[Float[Array, " m"], Float[Array, ""], RESULTS]:
        r"""Residuals $r$, likelihood $L$ and the solve's result, from one solve.

        On failure $L = +\infty$ and $r$ is a large constant (zero derivative), so
        trust-region solvers reject the step instead of receiving NaN.
        """
        return self.evaluate_params(self.params(z), data, inputs)

    def evaluate_params(
        self, params: Params, data: Measurements, inputs=None
    ) -> tuple[Float[Array, " m"], Float[Array, ""], RESULTS]:
        """`evaluate` at a natural-scale parameter dict instead of `z`."""
        traj, columns = self._terms(params, data, inputs)
        parts = []
        total = 0.0
        for k, (noise, y, y_pred, sigma) in enumerate(columns):
            mask = data.mask[:, k]
            nll = noise.negative_log_likelihood(y, y_pred, sigma)
            total = total + jnp.sum(jnp.where(mask, nll, 0.0))
            parts.append(jnp.where(mask, noise.residual(y, y_pred, sigma), 0.0))
            if noise.sigma_varies:
                extra = jnp.sqrt(2 * jnp.log(sigma) + SIGMA_RESIDUAL_SHIFT)
                parts.append(jnp.where(mask, extra, 0.0))
        r = jnp.concatenate(parts)
        solved = traj.result == RESULTS.successful
        ok = solved & jnp.all(jnp.isfinite(r)) & jnp.isfinite(total)
        result = RESULTS.where(solved & ~ok, RESULTS.nonfinite_likelihood, traj.result)
        failed = jnp.full_like(r, FAILED_RESIDUAL / jnp.sqrt(r.size))
        r = jnp.where(ok, r, jax.lax.stop_gradient(failed))
        return r, jnp.where(ok, total, jnp.inf), result

    def negative_log_likelihood(
        self, z, data: Measurements, inputs=None
    ) -> tuple[Float[Array, ""], RESULTS]:
        """$L(p(z))$ and the solve's result; `+inf` when the solve failed."""
        _, nll, result = self.evaluate(z, data, inputs)
        return nll, result

    def residuals(self, z, data: Measurements, inputs=None) -> tuple[Float[Array, " m"], RESULTS]:
        """Residual vector $r$ with $L = \\tfrac12\\lVert r\\rVert^2 + $ const."""
        r, _, result = self.evaluate(z, data, inputs)
        return r, result

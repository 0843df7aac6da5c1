r"""Noise models: how a measurement $y$ scatters around the prediction $\hat y$.

Each noise model gives a standard deviation $\sigma(\hat y, p)$ and the negative
log-likelihood of one measurement,

- `Gaussian`: $y \sim N(\hat y, \sigma^2)$, $\sigma$ fixed or an estimated parameter;
- `Proportional`: $y \sim N(\hat y, a^2 + b^2 \hat y^2)$ (combined additive and
  proportional error; $a = 0$ gives pure proportional noise);
- `LogNormal`: $\log y \sim N(\log \hat y, \sigma^2)$.

For least-squares solvers the likelihood is written as $\tfrac12\lVert r\rVert^2$ up to a
constant: standardised residuals $(y - \hat y)/\sigma$ and, when $\sigma$ depends on the
parameters, one extra residual $\sqrt{2\log\sigma + C}$ per measurement.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping

import equinox as eqx
import jax
import jax.numpy as jnp


# Shifts 2 log(sigma) to positive values for every sigma > exp(-SIGMA_RESIDUAL_SHIFT/2),
# i.e. sigma > 1e-22, so the extra least-squares residual sqrt(2 log sigma + C) is real.
SIGMA_RESIDUAL_SHIFT = 100.0
_LOG_2PI = math.log(2 * math.pi)


def _resolve(spec: float | str, params: Mapping[str, jax.Array]):
    return params[spec] if isinstance(spec, str) else jnp.asarray(spec, dtype=float)


class AbstractNoiseModel(eqx.Module):
    """Measurement noise of one observable."""

    @abc.abstractmethod
    def model_sigma(self, y_pred, params: Mapping[str, jax.Array]):
        """Standard deviation of the noise at prediction `y_pred` (on the noise scale)."""

    @property
    @abc.abstractmethod
    def parameter_names(self) -> tuple[str, ...]:
        """Names of estimated noise parameters this model reads from `params`."""

    @property
    def sigma_varies(self) -> bool:
        """Whether sigma depends on the parameters or prediction (not a constant)."""
        return bool(self.parameter_names)

    def transform(self, y):
        """Map to the scale on which the noise is Gaussian."""
        return y

    def log_jacobian(self, y):
        """log |d transform / dy| at the measurement; enters the likelihood only."""
        return jnp.zeros_like(y)

    def residual(self, y, y_pred, sigma):
        return (self.transform(y) - self.transform(y_pred)) / sigma

    def negative_log_likelihood(self, y, y_pred, sigma):
        r = self.residual(y, y_pred, sigma)
        return 0.5 * r**2 + jnp.log(sigma) + 0.5 * _LOG_2PI + self.log_jacobian(y)

    def sample(self, key, y_pred, sigma):
        noise = sigma * jax.random.normal(key, jnp.shape(y_pred))
        return self.inverse_transform(self.transform(y_pred) + noise)

    def inverse_transform(self, s):
        return s


class _FixedOrEstimatedSigma(AbstractNoiseModel):
    sigma: eqx.AbstractVar[float | str]

    def model_sigma(self, y_pred, params):
        return jnp.broadcast_to(_resolve(self.sigma, params), jnp.shape(y_pred))

    @property
    def parameter_names(self):
        return (self.sigma,) if isinstance(self.sigma, str) else ()


class Gaussian(_FixedOrEstimatedSigma):
    """Additive normal noise with standard deviation `sigma` (a number, or the name of
    an estimated parameter)."""

    sigma: float | str = eqx.field(static=True)


class Proportional(AbstractNoiseModel):
    """Normal noise with $\\sigma = \\sqrt{a^2 + (b\\,\\hat y)^2}$: `relative` b,
    `absolute` a (numbers or names of estimated parameters)."""

    relative: float | str = eqx.field(static=True)
    absolute: float | str = eqx.field(static=True, default=0.0)

    def model_sigma(self, y_pred, params):
        a = _resolve(self.absolute, params)
        b = _resolve(self.relative, params)
        # A floor keeps sigma > 0 where a prediction is exactly zero.
        return jnp.sqrt(a**2 + (b * y_pred) ** 2 + 1e-300) + 1e-12

    @property
    def parameter_names(self):
        return tuple(s for s in (self.relative, self.absolute) if isinstance(s, str))

    @property
    def sigma_varies(self):
        return True


class LogNormal(_FixedOrEstimatedSigma):
    """Multiplicative noise: $\\log y \\sim N(\\log \\hat y, \\sigma^2)$ (needs y > 0)."""

    sigma: float | str = eqx.field(static=True)

    def transform(self, y):
        # Predictions can touch zero or go slightly negative within solver tolerance.
        return jnp.log(jnp.maximum(y, 1e-300))

    def inverse_transform(self, s):
        return jnp.exp(s)

    def log_jacobian(self, y):
        return jnp.log(y)

r"""Penalties on parameter vectors, with a strength the outer problem can learn.

| penalty | $R_\lambda(w)$ |
|---|---|
| `L2` | $\tfrac\lambda2 \sum_j w_j^2$ |
| `SmoothedL1(ε)` | $\lambda \sum_j \bigl(\sqrt{w_j^2 + \varepsilon^2} - \varepsilon\bigr)$ |
| `ElasticNet(α, ε)` | $\lambda \sum_j \bigl[\alpha(\sqrt{w_j^2+\varepsilon^2}-\varepsilon) + \tfrac{1-\alpha}2 w_j^2\bigr]$ |

The L1 term is smoothed so the inner optimum is twice differentiable and the implicit
function theorem applies. As $\varepsilon \to 0$ the hypergradient converges to that of
the exact lasso *away from kinks*; at a kink (a component on the boundary between
zero and non-zero, where $|\partial_j L_{\text{data}}| = \lambda$) it has no limit.
`kink_curvature` lets the hypergradient engine detect that situation: there the
smoothed term's curvature $\lambda\varepsilon^2/(w^2+\varepsilon^2)^{3/2}$ is neither
negligible against the rest of the Hessian (an active, non-zero component) nor
dominant (a component pinned at zero), but comparable to it.
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, ArrayLike


class AbstractPenalty(eqx.Module):
    """A penalty $R_\\lambda(w)$ with strength $\\lambda \\ge 0$."""

    @abc.abstractmethod
    def __call__(self, w: Float[Array, " n"], strength: Float[ArrayLike, ""]) -> Float[Array, ""]:
        """The penalty value."""

    def kink_curvature(
        self, w: Float[Array, " n"], strength: Float[ArrayLike, ""]
    ) -> Float[Array, " n"]:
        """Curvature each component gets from smoothed non-smooth terms (zero for a
        smooth penalty)."""
        return jnp.zeros_like(w)


class L2(AbstractPenalty):
    """Ridge: $\\tfrac\\lambda2\\lVert w\\rVert^2$."""

    def __call__(self, w, strength):
        return 0.5 * strength * jnp.sum(w**2)


def _smoothed_abs(w, smoothing):
    return jnp.sqrt(w**2 + smoothing**2) - smoothing


def _smoothed_abs_curvature(w, smoothing):
    return smoothing**2 / (w**2 + smoothing**2) ** 1.5


class SmoothedL1(AbstractPenalty):
    """Lasso smoothed at width `smoothing`: $\\lambda\\sum_j(\\sqrt{w_j^2+\\varepsilon^2}-\\varepsilon)$."""

    smoothing: float = 1e-4

    def __check_init__(self):
        if not self.smoothing > 0:
            raise ValueError(f"SmoothedL1 needs smoothing > 0, got {self.smoothing}")

    def __call__(self, w, strength):
        return strength * jnp.sum(_smoothed_abs(w, self.smoothing))

    def kink_curvature(self, w, strength):
        return strength * _smoothed_abs_curvature(w, self.smoothing)


class ElasticNet(AbstractPenalty):
    """$\\lambda\\,[\\alpha\\,\\mathrm{L1}_\\varepsilon(w) + \\tfrac{1-\\alpha}2\\lVert w\\rVert^2]$
    with mixing `l1_ratio` $= \\alpha \\in [0, 1]$."""

    l1_ratio: float = 0.5
    smoothing: float = 1e-4

    def __check_init__(self):
        if not 0.0 <= self.l1_ratio <= 1.0:
            raise ValueError(f"ElasticNet needs 0 <= l1_ratio <= 1, got {self.l1_ratio}")
        if not self.smoothing > 0:
            raise ValueError(f"ElasticNet needs smoothing > 0, got {self.smoothing}")

    def __call__(self, w, strength):
        l1 = jnp.sum(_smoothed_abs(w, self.smoothing))
        return strength * (self.l1_ratio * l1 + 0.5 * (1 - self.l1_ratio) * jnp.sum(w**2))

    def kink_curvature(self, w, strength):
        return strength * self.l1_ratio * _smoothed_abs_curvature(w, self.smoothing)

r"""Rosenbrock (linearly implicit) stiff solvers for diffrax.

A Rosenbrock–Wanner method replaces the Newton iterations of an implicit
Runge–Kutta method by one linear solve per stage with the same matrix
$W = (h\gamma)^{-1} I - J$, $J = \partial f/\partial y(t_0, y_0)$ (here from `jax.jacfwd`
once per step, inverted once). In the transformed form of Hairer & Wanner,

$$ W k_i = f\Big(t_0 + c_i h,\; y_0 + \sum_{j<i} a_{ij} k_j\Big)
          + d_i h\, \partial_t f(t_0, y_0) + \sum_{j<i} \frac{C_{ij}}{h} k_j, $$

and for the stiffly accurate methods here the solution is the last stage value plus
$k_s$, whose size is the embedded error estimate. No iteration means no convergence
failures to reject and a fixed cost per step: $n$ Jacobian-vector products, one
$n\times n$ inverse and $s$ matrix-vector products.

The stage solves are `lax.custom_linear_solve`s whose matrix is $W$ and whose solver is
the explicit $W^{-1}$: a derivative of a stage is $\dot k = W^{-1}(\dot b - \dot W k)$,
one product with the same inverse, where differentiating an LU factorisation
differentiates its triangular factors as well (2.4x the per-step cost of a 10-parameter
forward-mode gradient on the MAPK cascade). The models here have few states, for
which an explicit inverse is as accurate as the stage equations need and one
product per stage is the cheapest solve XLA offers on a CPU.

Dense output is Rodas5's own continuous extension (order 4): with $\theta = (t -
t_0)/h$, $y(t) = (1-\theta) y_0 + \theta\,(y_1 + (1-\theta)(q_1 + \theta(q_2 +
\theta q_3)))$, where each $q_j = \sum_i H_{ji} k_i$ combines the stages already
computed, so it costs no evaluation of $f$ at the new point (a cubic Hermite
interpolant needs $f(t_1, y_1)$, one more vector field and its tangents per step).
"""

from __future__ import annotations

from typing import ClassVar

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import ArrayLike, PyTree, Real


def _lower(rows: list[list[float]], s: int) -> np.ndarray:
    matrix = np.zeros((s, s))
    for i, row in enumerate(rows, start=1):
        matrix[i, : len(row)] = row
    return matrix


# Rodas5 (Di Marzo 1993; Hairer & Wanner's transformed coefficients): order 5 with an
# embedded order-4 estimate, 8 stages, stiffly accurate and L-stable.
_RODAS5_GAMMA = 0.19
_RODAS5_A = _lower([
    [2.0],
    [3.040894194418781, 1.041747909077569],
    [2.576417536461461, 1.622083060776640, -0.9089668560264532],
    [2.760842080225597, 1.446624659844071, -0.3036980084553738, 0.2877498600325443],
    [-14.09640773051259, 6.925207756232704, -41.47510893210728, 2.343771018586405,
     24.13215229196062],
    [-14.09640773051259, 6.925207756232704, -41.47510893210728, 2.343771018586405,
     24.13215229196062, 1.0],
    [-14.09640773051259, 6.925207756232704, -41.47510893210728, 2.343771018586405,
     24.13215229196062, 1.0, 1.0],
], 8)
_RODAS5_C = _lower([
    [-10.31323885133993],
    [-21.04823117650003, -7.234992135176716],
    [32.22751541853323, -4.943732386540191, 19.44922031041879],
    [-20.69865579590063, -8.816374604402768, 1.260436877740897, -0.7495647613787146],
    [-46.22004352711257, -17.49534862857472, -289.6389582892057, 93.60855400400906,
     318.3822534212147],
    [34.20013733472935, -14.15535402717690, 57.82335640988400, 25.83362985412365,
     1.408950972071624, -6.551835421242162],
    [42.57076742291101, -13.80770672017997, 93.98938432427124, 18.77919633714503,
     -31.58359187223370, -6.685968952921985, -5.810979938412932],
], 8)
_RODAS5_NODES = np.array([0.0, 0.38, 0.3878509998321533, 0.4839718937873840,
                          0.4570477008819580, 1.0, 1.0, 1.0])
_RODAS5_TIME_WEIGHTS = np.array([0.19, -0.1823079225333714636, -0.319231832186874912,
                                 0.3449828624725343, -0.377417564392089818, 0.0, 0.0, 0.0])


# Rodas5's dense-output coefficients (as in OrdinaryDiffEq.jl's Rodas5 tableau): row j
# gives q_{j+1} = sum_i H[j, i] k_i.
_RODAS5_DENSE = np.array([
    [27.354592673333357, -6.925207756232857, 26.40037733258859, 0.5635230501052979,
     -4.699151156849391, -1.6008677469422725, -1.5306074446748028, -1.3929872940716344],
    [44.19024239501722, 1.3677947663381929e-13, 202.93261852171622, -35.5669339789154,
     -181.91095152160645, 3.4116351403665033, 2.5793540257308067, 2.2435122582734066],
    [-44.0988150021747, -5.755396159656812e-13, -181.26175034586677, 56.99302194811676,
     183.21182741427398, -7.480257918273637, -5.792426076169686, -5.32503859794143],
])


class Rodas5Interpolation(dfx.AbstractLocalInterpolation):
    r"""Rodas5's continuous extension on one step $[t_0, t_1]$:
    $y(t) = (1-\theta) y_0 + \theta\,(y_1 + (1-\theta)(q_1 + \theta(q_2 + \theta q_3)))$,
    $\theta = (t - t_0)/(t_1 - t_0)$."""

    t0: Real[ArrayLike, ""]
    t1: Real[ArrayLike, ""]
    y0: PyTree
    y1: PyTree
    q: PyTree  # each leaf stacks q_1, q_2, q_3 on a leading axis

    def evaluate(self, t0, t1=None, left: bool = True):
        del left
        if t1 is not None:
            return jax.tree.map(jnp.subtract, self.evaluate(t1), self.evaluate(t0))
        length = self.t1 - self.t0
        # A finished lane's zero-length step interpolates to its end point.
        theta = jnp.where(length == 0, 0.0, (t0 - self.t0) / jnp.where(length == 0, 1.0,
                                                                       length))
        rest = 1 - theta

        def at(y0, y1, q):
            return rest * y0 + theta * (y1 + rest * (q[0] + theta * (q[1] + theta * q[2])))

        return jax.tree.map(at, self.y0, self.y1, self.q)


class Rodas5(dfx.AbstractAdaptiveSolver):
    """Rodas5: a stiffly accurate, L-stable Rosenbrock method of order 5(4).

    `Integrator`'s default solver (`[ode] solver = "rodas5"`). Each step costs one
    Jacobian (`jax.jacfwd`), one small inverse, and eight vector-field evaluations and
    products with the inverse, with no Newton iterations. Its accuracy relies on an
    exact Jacobian, which JAX provides.
    """

    term_structure: ClassVar = dfx.AbstractTerm
    interpolation_cls: ClassVar = Rodas5Interpolation

    def order(self, terms):
        return 5

    def init(self, terms, t0, t1, y0, args):
        return None

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del solver_state, made_jump
        flat0, unravel = ravel_pytree(y0)
        step_size = t1 - t0
        # Under `vmap`, a lane whose solve has finished still takes (discarded) steps of
        # length zero, where W would be infinite. Its NaN stages never reach the primal,
        # but reverse mode multiplies them by zero cotangents: NaN gradients. A tiny
        # stand-in step keeps every intermediate finite.
        empty = step_size == 0
        h = jnp.where(empty, 1e-12, step_size)

        # The ten evaluations of the field below share one traced program: JAX then
        # differentiates and batches it once per transformation, not once per call,
        # which halves the tracing of a forward-over-forward population evaluation.
        dynamic, static = eqx.partition((terms, args), eqx.is_array)

        @jax.jit
        def field_of(t, flat, dynamic):
            terms_, args_ = eqx.combine(dynamic, static)
            return ravel_pytree(terms_.vf(t, unravel(flat), args_))[0]

        def field(t, flat):
            return field_of(t, flat, dynamic)

        f0 = field(t0, flat0)
        jacobian = jax.jacfwd(lambda y: field(t0, y))(flat0)
        time_derivative = jax.jvp(lambda t: field(t, flat0), (t0,),
                                  (jnp.ones_like(t0),))[1]
        # One division per step: XLA keeps each scalar division in a kernel of its own
        # (it will not duplicate an expensive operation into its consumers), and the
        # stages below would otherwise divide 28 coefficients by h.
        inverse_h = 1 / h
        w = jnp.eye(flat0.size) * (inverse_h / _RODAS5_GAMMA) - jacobian
        w_inverse = jnp.linalg.inv(jax.lax.stop_gradient(w))

        def solve(rhs):
            return jax.lax.custom_linear_solve(
                lambda x: w @ x, rhs,
                solve=lambda _, b: w_inverse @ b,
                transpose_solve=lambda _, b: w_inverse.T @ b)

        stages: list = []
        stage_value = flat0
        for i in range(_RODAS5_A.shape[0]):
            if i == 0:
                slope = f0
            else:
                stage_value = flat0 + sum(a * k for a, k in zip(_RODAS5_A[i, :i], stages)
                                          if a != 0.0)
                slope = field(t0 + _RODAS5_NODES[i] * h, stage_value)
            rhs = slope + sum(c * inverse_h * k for c, k in zip(_RODAS5_C[i, :i], stages))
            if _RODAS5_TIME_WEIGHTS[i] != 0.0:
                rhs = rhs + _RODAS5_TIME_WEIGHTS[i] * h * time_derivative
            stages.append(solve(rhs))
        flat1 = jnp.where(empty, flat0, stage_value + stages[-1])
        error = jnp.where(empty, 0.0, stages[-1])
        q = jnp.stack([sum(c * k for c, k in zip(row, stages)) for row in _RODAS5_DENSE])
        y1 = unravel(flat1)
        dense_info = dict(y0=y0, y1=y1, q=jax.vmap(unravel)(q))
        return y1, unravel(error), dense_info, None, dfx.RESULTS.successful

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)

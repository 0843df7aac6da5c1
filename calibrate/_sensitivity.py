r"""Sensitivity methods: how derivatives of a loss are taken through the ODE solve.

| strategy | diffrax adjoint | derivative modes | cost of $\nabla L$ |
|---|---|---|---|
| `ForwardMode` | `ForwardMode` | forward (and forward-over-forward) | ~ one solve carrying $n_p$ tangents |
| `DiscreteAdjoint` | `RecursiveCheckpointAdjoint` | reverse (first order only) | ~ 3 solves, memory $O(\log n_{steps})$ |
| `ContinuousAdjoint` | `InterpolatedAdjoint` (`_adjoint.py`) | reverse (first order only) | ~ 2 forward solves + 1 backward adjoint ODE, memory $O(n_{steps})$ |
| `DirectDifferentiation` | `DirectAdjoint` | all orders, forward and reverse | slowest; needed for exact second order |
| `Automatic` | one of the above, by what is differentiated | as chosen | the cheaper of forward and adjoint |

Discrete methods differentiate the solver's own arithmetic (exact gradient of the
computed loss). The continuous adjoint solves the adjoint ODE
$\dot\lambda = -(\partial f/\partial x)^\top \lambda$,
$\dot\mu = -(\partial f/\partial p)^\top \lambda$ backwards with its own solver
(against the dense forward solution, see `_adjoint.py`) and is exact only up to the
solver tolerance.
"""

from __future__ import annotations

import abc
import numbers
from typing import ClassVar, Literal

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from ._adjoint import AdjointStageRoot, InterpolatedAdjoint


FORWARD_OVER_FORWARD = "forward-over-forward"
FORWARD_OVER_REVERSE = "forward-over-reverse"
REVERSE_OVER_REVERSE = "reverse-over-reverse"
ALL_SECOND_ORDER = frozenset({FORWARD_OVER_FORWARD, FORWARD_OVER_REVERSE, REVERSE_OVER_REVERSE})


def nested_mode(sensitivity: "AbstractSensitivity") -> str:
    """How a derivative of a derivative is taken in `sensitivity`'s own mode."""
    return FORWARD_OVER_FORWARD if sensitivity.mode == "forward" else REVERSE_OVER_REVERSE


class AbstractSensitivity(eqx.Module):
    """How gradients are computed through `diffrax.diffeqsolve`.

    `second_order` lists the compositions of derivative modes the solve survives
    (measured with diffrax 0.7: the checkpointed and backsolve adjoints support none,
    `ForwardMode` only forward-over-forward, `DirectAdjoint` all).
    """

    second_order: ClassVar[frozenset[str]] = frozenset()

    @abc.abstractmethod
    def adjoint(self) -> dfx.AbstractAdjoint:
        """The diffrax adjoint the ODE solve is run with."""

    @property
    @abc.abstractmethod
    def mode(self) -> Literal["forward", "reverse"]:
        """The derivative mode this strategy supports through the solve."""

    def for_gradient(self, n_parameters: int, lanes: int = 1) -> "AbstractSensitivity":
        """The strategy that takes gradients of a scalar w.r.t. `n_parameters`
        parameters, in `lanes` batched lanes (starts, individuals): this one (see
        `Automatic` for a strategy that chooses)."""
        return self

    def for_jacobian(self) -> "AbstractSensitivity":
        """The strategy that takes Jacobians of vector-valued functions: this one."""
        return self

    def grad_fn(self, fn, argnums=0):
        """`∇fn` w.r.t. `argnums` for scalar `fn`, in this strategy's mode."""
        return jax.jacfwd(fn, argnums) if self.mode == "forward" else jax.grad(fn, argnums)

    def value_and_grad_fn(self, fn, argnums=0):
        """`(fn, ∇fn)` w.r.t. `argnums` for scalar `fn`, from one pass in this mode."""
        if self.mode == "reverse":
            return jax.value_and_grad(fn, argnums)

        def both(*args):
            grad, value = jax.jacfwd(lambda *a: (fn(*a),) * 2, argnums, has_aux=True)(*args)
            return value, grad

        return both

    def jacobian_fn(self, fn, argnums=0, has_aux: bool = False):
        """Jacobian of a vector-valued `fn` w.r.t. `argnums`, in this strategy's mode."""
        jacobian = jax.jacfwd if self.mode == "forward" else jax.jacrev
        return jacobian(fn, argnums, has_aux=has_aux)

    def value_and_grad(self, fn, x, *args):
        """`(fn(x, *args), ∇_x fn(x, *args))` for scalar `fn`, in this strategy's mode."""
        return self.value_and_grad_fn(fn)(x, *args)

    def jacobian(self, fn, x, *args, has_aux: bool = False):
        """Jacobian of a vector-valued `fn` in this strategy's mode."""
        return self.jacobian_fn(fn, has_aux=has_aux)(x, *args)

    def reverse_differentiable(self, fn):
        """Wrap scalar `fn(x, *args)` so `jax.grad` gives this strategy's gradient.

        Gradient-based minimisers (BFGS) linearise and transpose the objective. Here
        the gradient is computed once, in this strategy's mode, inside a custom VJP:
        forward sensitivities become usable, and a checkpointed adjoint is not
        re-linearised inside the minimiser's batched loop (which equinox's
        checkpointed loop does not support under `vmap`).
        """

        @jax.custom_vjp
        def wrapped(x, *args):
            return fn(x, *args)

        def forward(x, *args):
            value, grad = self.value_and_grad(fn, x, *args)
            return value, (grad, args)

        def backward(residuals, cotangent):
            grad, args = residuals
            zero_args = jax.tree.map(jnp.zeros_like, args)
            return (cotangent * grad, *zero_args)

        wrapped.defvjp(forward, backward)
        return wrapped


def for_optimiser(holder, n_parameters: int, gradients: bool, lanes: int = 1):
    """`holder` (an objective or problem with a `sensitivity` field) with the strategy
    an optimiser's derivatives w.r.t. `n_parameters` parameters, in `lanes` batched
    lanes, are taken by: scalar gradients (a minimiser) if `gradients`, Jacobians of
    residuals otherwise."""
    sensitivity = holder.sensitivity
    chosen = (sensitivity.for_gradient(n_parameters, lanes) if gradients
              else sensitivity.for_jacobian())
    if chosen is sensitivity:
        return holder
    return eqx.tree_at(lambda h: h.sensitivity, holder, chosen)


def with_materialised_jacobian(fn):
    r"""Wrap vector-valued `fn(x, args)` so that its linearisation is its Jacobian,
    computed once by `jax.jacfwd` and applied as a matrix.

    `jax.linearize` of a function containing a `while_loop` (an adaptive ODE solve)
    cannot keep the loop's primal values: every application of the linear map re-runs
    the whole loop, primal included. Gauss–Newton-type solvers apply it many times per
    step (materialising the Jacobian column by column for a QR, again for a damped
    retry, again for a termination test), so each step would cost several solves
    carrying tangents. Here one solve carrying $n_x$ tangents gives $r$ and $J$, and
    the linear map is $J\,\dot x$. Tangents of `args`, rarely present, are pushed
    through `fn` as usual.
    """

    @jax.custom_jvp
    def wrapped(x, args):
        return fn(x, args)

    def jvp(primals, tangents):
        x, args = primals
        dx, dargs = tangents
        jacobian, value = jax.jacfwd(lambda y: (fn(y, args),) * 2, has_aux=True)(x)
        if isinstance(dx, SymbolicZero):
            tangent = jnp.zeros_like(value)
        else:
            tangent = jacobian @ dx
        if not all(isinstance(t, SymbolicZero) for t in jax.tree.leaves(
                dargs, is_leaf=lambda t: isinstance(t, SymbolicZero))):
            dargs = jax.tree.map(lambda t, a: jnp.zeros_like(a) if isinstance(t, SymbolicZero)
                                 else t, dargs, args,
                                 is_leaf=lambda t: isinstance(t, SymbolicZero))
            tangent = tangent + jax.jvp(lambda a: fn(x, a), (args,), (dargs,))[1]
        return value, tangent

    wrapped.defjvp(jvp, symbolic_zeros=True)
    return wrapped


class ForwardMode(AbstractSensitivity):
    """Forward sensitivities through the solver steps (best for few parameters, and
    the only fast route to Jacobians of residuals for Gauss–Newton/LM)."""

    second_order: ClassVar[frozenset[str]] = frozenset({FORWARD_OVER_FORWARD})

    def adjoint(self):
        return dfx.ForwardMode()

    @property
    def mode(self):
        return "forward"


class DiscreteAdjoint(AbstractSensitivity):
    """Reverse mode through the solver steps with recursive checkpointing
    (`checkpoints=None`: diffrax's choice)."""

    checkpoints: int | None = eqx.field(static=True, default=None)

    def adjoint(self):
        return dfx.RecursiveCheckpointAdjoint(checkpoints=self.checkpoints)

    @property
    def mode(self):
        return "reverse"


class ContinuousAdjoint(AbstractSensitivity):
    r"""Continuous adjoint: integrate the adjoint ODE backwards in time.

    $\dot\lambda = -(\partial f/\partial x)^\top\lambda$ and
    $\dot\mu = -(\partial f/\partial p)^\top\lambda$ run from the last observation
    back to $t_0$, with $x(t)$ read from a dense forward solve rather than re-integrated
    backwards (which is unstable for stiff dissipative models such as `mapk_cascade`);
    see `InterpolatedAdjoint`. Exact only to the solver tolerance; memory grows with the
    number of forward steps.

    `backward_solver` integrates the adjoint system, which is as stiff as the model: the
    default is `Kvaerno5` with `AdjointStageRoot`, which solves its (linear) stage
    equations exactly in one step. A failed backward solve is never a silent wrong
    gradient: it gives NaN, for the failing individual only under `vmap`.
    """

    backward_solver: dfx.AbstractSolver = dfx.Kvaerno5(root_finder=AdjointStageRoot())

    def adjoint(self):
        return InterpolatedAdjoint(solver=self.backward_solver)

    @property
    def mode(self):
        return "reverse"


class DirectDifferentiation(AbstractSensitivity):
    """Differentiate the unrolled solver loop; supports every order and mode (needed
    for exact Hessian–vector products through the solve), at higher cost. Also the
    right choice for losses that contain no ODE solve at all."""

    second_order: ClassVar[frozenset[str]] = ALL_SECOND_ORDER

    def adjoint(self):
        return dfx.DirectAdjoint()

    @property
    def mode(self):
        return "reverse"


# Where the discrete adjoint's gradient overtakes forward sensitivities, measured by
# `benchmarks/bench_sensitivity.py` (RESULTS_sensitivity.md) on a 2-core CPU, as
# (lanes vmapped together, from this many on; most parameters taken forward): one lane
# breaks even at about 65 parameters, 8 lanes at about 40, 32 lanes between 17 and 40
# and 128 lanes between 10 and 35 (by model), where forward tangents of many lanes
# outgrow the caches while the adjoint's fixed cost per step is shared; 16 is the limit
# whose worst wrong pick there costs least. `bench_core.py` measured the adjoint faster
# from 3 parameters at 1,000 lanes.
MAX_FORWARD_PARAMETERS: tuple[tuple[int, int], ...] = (
    (1, 64), (2, 40), (128, 16), (1000, 2))


def _whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _forward_limits(max_forward) -> tuple[tuple[int, int], ...]:
    """`max_forward` as ((lanes from, limit), ...) sorted by lanes, from one lane on."""
    if _whole(max_forward):
        return ((1, int(max_forward)),)
    usage = ("Automatic(max_forward=...) takes an int or ((1, limit), (lanes, limit), "
             f"...) with whole numbers and distinct lanes from one on; got {max_forward!r}")
    try:
        pairs = [tuple(pair) for pair in max_forward]
    except TypeError:
        raise TypeError(usage) from None
    if not all(len(pair) == 2 and all(map(_whole, pair)) for pair in pairs):
        raise TypeError(usage)
    limits = tuple(sorted((int(start), int(limit)) for start, limit in pairs))
    lanes = [start for start, _ in limits]
    if not limits or lanes[0] != 1 or len(set(lanes)) != len(lanes):
        raise ValueError(usage)
    return limits


class Automatic(AbstractSensitivity):
    r"""Forward sensitivities or the discrete adjoint, chosen by what is differentiated.

    A forward-mode gradient carries one tangent per parameter through every solver
    step, $O(n_p)$ extra work on top of the solve; the discrete adjoint costs about
    three solves whatever $n_p$ is, but more per step (checkpointing, a reverse
    sweep). So:

    | derivative | chosen |
    |---|---|
    | gradient of a scalar (minimisers such as BFGS) w.r.t. at most the `max_forward` limit of parameters for the number of lanes | `forward` |
    | gradient of a scalar w.r.t. more parameters | `reverse` |
    | Jacobian of residuals (least squares) | `forward`: a reverse Jacobian costs one adjoint sweep per residual |
    | second order (Laplace objectives, implicit hypergradients) | `forward`: forward-over-forward is the order the adjoints do not survive |

    `max_forward` is an int (one limit) or ((lanes, limit), ...): from `lanes` lanes
    vmapped together (the starts and individuals of one chunk on one device) on,
    gradients w.r.t. at most `limit` parameters are taken forward. The default,
    from `benchmarks/bench_sensitivity.py` on a 2-core CPU, is 64 for one lane, 40
    from 2 lanes, 16 from 128 and 2 from 1,000: wide batches make forward tangents
    dearer (they outgrow the caches) and share the adjoint's fixed cost per step.
    The adjoint compiles 2–3 times longer than forward sensitivities.
    Fitting functions resolve the choice once they know the parameters, the lanes
    and the optimiser (`for_gradient`, `for_jacobian`) and report the strategy they
    used; used unresolved, it behaves as `forward`.
    """

    forward: AbstractSensitivity = ForwardMode()
    reverse: AbstractSensitivity = DiscreteAdjoint()
    max_forward: tuple[tuple[int, int], ...] = eqx.field(
        static=True, default=MAX_FORWARD_PARAMETERS, converter=_forward_limits)
    second_order: ClassVar[frozenset[str]] = ForwardMode.second_order

    def __check_init__(self):
        if self.forward.mode != "forward":
            raise ValueError(f"Automatic(forward=...) must take forward-mode derivatives; "
                             f"{type(self.forward).__name__} is {self.forward.mode}-mode")

    def forward_limit(self, lanes: int = 1) -> int:
        """The most parameters whose gradient is taken forward in `lanes` lanes."""
        return [limit for start, limit in self.max_forward if start <= max(lanes, 1)][-1]

    def for_gradient(self, n_parameters: int, lanes: int = 1) -> AbstractSensitivity:
        return self.reverse if n_parameters > self.forward_limit(lanes) else self.forward

    def for_jacobian(self) -> AbstractSensitivity:
        return self.forward

    def adjoint(self):
        return self.forward.adjoint()

    @property
    def mode(self):
        return self.forward.mode

"""The Newton-step stopping test for Gauss–Newton-type solvers (warm-started fits)."""

import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest

import calibrate as cal


TIMES = jnp.linspace(0.0, 4.0, 40)
DATA = 2.0 * jnp.exp(-0.7 * TIMES) + 0.05 * jnp.asarray(
    np.random.default_rng(0).normal(size=40))
LM = optx.LevenbergMarquardt(rtol=1e-12, atol=1e-12)


def residuals(p, args):
    return (DATA - p[0] * jnp.exp(-p[1] * TIMES)) / 0.05


def solve(solver, start):
    return optx.least_squares(residuals, solver, start, max_steps=200, throw=False)


def test_stops_within_its_tolerance_of_the_optimum_and_at_once_when_restarted():
    tight = solve(LM, jnp.array([1.0, 1.0]))
    tol = 1e-5
    stopped = solve(cal.NewtonStepTermination(LM, tol), jnp.array([1.0, 1.0]))
    assert stopped.stats["num_steps"] < tight.stats["num_steps"]
    # Near the optimum the Gauss–Newton step is the distance to it (to first order).
    distance = float(jnp.linalg.norm(stopped.value - tight.value))
    assert distance <= 2 * tol * float(jnp.linalg.norm(tight.value))
    restarted = solve(cal.NewtonStepTermination(LM, tol), stopped.value)
    assert int(restarted.stats["num_steps"]) == 1
    np.testing.assert_array_equal(restarted.value, stopped.value)
    assert restarted.result == optx.RESULTS.successful


def test_refuses_a_solver_without_gauss_newton_steps():
    with pytest.raises(TypeError, match="BFGS"):
        cal.NewtonStepTermination(optx.BFGS(rtol=1e-8, atol=1e-8))


def test_a_looser_tolerance_applies_once_the_solver_stalls():
    # Ripples of 1e-7 (in residual units) over 1e-6 in p, like an adaptive ODE solve's
    # error: the Gauss–Newton step never gets below a tight `tol`, and LM rejects step
    # after step near the optimum.
    def jagged(p, args):
        return residuals(p, args) + 1e-7 * jnp.sin(1e6 * p[0])

    lm = optx.LevenbergMarquardt(rtol=1e-14, atol=1e-14)
    tight_only = cal.NewtonStepTermination(lm, 1e-12)
    with_stall = cal.NewtonStepTermination(lm, 1e-12, stalled_tol=1e-5, stalled_steps=2)
    start = optx.least_squares(jagged, lm, jnp.array([1.0, 1.0]), max_steps=200,
                               throw=False).value
    run = lambda solver: optx.least_squares(jagged, solver, start, max_steps=200, throw=False)
    assert int(run(tight_only).stats["num_steps"]) > 10
    # One accepted step, then two rejected ones.
    stalled = run(with_stall)
    assert int(stalled.stats["num_steps"]) <= 3
    assert float(jnp.linalg.norm(stalled.value - start)) <= 1e-5 * float(jnp.linalg.norm(start))


def test_minimum_norm_step_is_the_pseudo_inverse_step():
    """The Newton-step test's least-squares step (from the Gram matrix's
    eigendecomposition, not a batched SVD) is J⁺r: the least-squares solution for a
    full-rank Jacobian and the minimum-norm one when a direction is undetermined."""
    from calibrate._termination import _minimum_norm_step

    rng = np.random.default_rng(0)
    jacobian = rng.standard_normal((12, 4))
    residual = rng.standard_normal(12)
    np.testing.assert_allclose(_minimum_norm_step(jnp.asarray(jacobian), jnp.asarray(residual)),
                               np.linalg.lstsq(jacobian, residual, rcond=None)[0], rtol=1e-10)
    deficient = np.column_stack([jacobian[:, :3], jacobian[:, 0]])  # 4th column = 1st
    step = _minimum_norm_step(jnp.asarray(deficient), jnp.asarray(residual))
    np.testing.assert_allclose(step, np.linalg.pinv(deficient) @ residual, rtol=1e-8)
    assert abs(step[0] - step[3]) < 1e-10  # split evenly: the minimum-norm choice

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

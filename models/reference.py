"""Reference model: x' = -x + p u(t), x(0) = q, with a step input u.

The smallest model with a closed form: for u = 1 on [0, t_off) and 0 after,
x(t) = q e^{-t} + p (1 - e^{-t}) for t < t_off and
x(t) = q e^{-t} + p (1 - e^{-t_off}) e^{-(t - t_off)} after.
"""

import jax.numpy as jnp

import calibrate as cal


class Reference(cal.AbstractODEModel):
    """x' = -x + p u(t), x(0) = q: linear decay driven by a step input."""

    states = ("x",)
    parameters = (
        cal.Parameter("p", 1.5, 1e-3, 1e3, scale="log", description="input gain"),
        cal.Parameter("q", 2.0, 0.0, 10.0, description="initial condition x(0)"),
    )
    observables = (cal.Observable("x", cal.Gaussian(0.05), "the state itself"),)
    inputs = ("u",)
    t0 = 0.0

    def rhs(self, t, x, params, inputs):
        return -x + params["p"] * inputs["u"]

    def initial_state(self, params):
        return jnp.stack([params["q"]])

    def observe(self, t, x, params):
        return x

    def default_inputs(self):
        return {"u": cal.PiecewiseConstant([0.0, STEP_OFF], [1.0, 0.0])}


STEP_OFF = 5.0
MODEL = Reference
TRUE_PARAMETERS = {"p": 1.5, "q": 2.0}
OBSERVATION_TIMES = jnp.linspace(0.25, 10.0, 40)


def closed_form(times, p, q, t_off=STEP_OFF):
    """x(t) for the default step input."""
    times = jnp.asarray(times)
    before = q * jnp.exp(-times) + p * (1 - jnp.exp(-times))
    after = q * jnp.exp(-times) + p * (1 - jnp.exp(-t_off)) * jnp.exp(-(times - t_off))
    return jnp.where(times < t_off, before, after)


def synthetic_data(key, n_individuals=1, variability=0.0):
    """Noisy measurements of x; with `variability` > 0 each individual's log p and q
    are perturbed by that relative standard deviation."""
    import jax

    keys = jax.random.split(key, 2)
    eta = variability * jax.random.normal(keys[0], (n_individuals, 2))
    params = [
        {"p": TRUE_PARAMETERS["p"] * float(jnp.exp(e[0])),
         "q": TRUE_PARAMETERS["q"] * float(1 + e[1])}
        for e in eta
    ]
    return cal.synthetic_dataset(MODEL(), params, OBSERVATION_TIMES, key=keys[1])

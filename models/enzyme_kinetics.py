"""Enzyme kinetics (Michaelis–Menten mechanism with explicit complex).

S + E <-> C -> E + P, mass action:
  S' = -kf S E + kr C,   E' = -kf S E + (kr + kcat) C,
  C' =  kf S E - (kr + kcat) C,   P' = kcat C.
Substrate and product are measured; the enzyme load E0 is comparable to S0 so the
pre-steady-state transient carries information on kf and kr separately.
"""

import jax
import jax.numpy as jnp

import calibrate as cal


class EnzymeKinetics(cal.AbstractODEModel):
    """Michaelis–Menten mechanism S + E <-> C -> E + P (4 states, 5 parameters)."""

    states = ("S", "E", "C", "P")
    parameters = (
        cal.Parameter("kf", 2.0, 1e-3, 1e3, scale="log", description="binding rate"),
        cal.Parameter("kr", 1.0, 1e-3, 1e3, scale="log", description="unbinding rate"),
        cal.Parameter("kcat", 0.5, 1e-3, 1e3, scale="log", description="catalytic rate"),
        cal.Parameter("S0", 1.0, 1e-2, 1e2, scale="log", estimate=False,
                      description="initial substrate"),
        cal.Parameter("E0", 0.5, 1e-2, 1e2, scale="log", estimate=False,
                      description="total enzyme"),
    )
    observables = (
        cal.Observable("S", cal.Gaussian(0.01), "substrate"),
        cal.Observable("P", cal.Proportional(relative=0.02, absolute=0.01), "product"),
    )
    inputs = ()
    t0 = 0.0

    def rhs(self, t, x, params, inputs):
        S, E, C, P = x
        binding = params["kf"] * S * E - params["kr"] * C
        catalysis = params["kcat"] * C
        return jnp.stack([-binding, -binding + catalysis, binding - catalysis, catalysis])

    def initial_state(self, params):
        zero = jnp.zeros_like(params["S0"])
        return jnp.stack([params["S0"], params["E0"], zero, zero])

    def observe(self, t, x, params):
        return jnp.stack([x[0], x[3]])


MODEL = EnzymeKinetics
TRUE_PARAMETERS = {"kf": 2.0, "kr": 1.0, "kcat": 0.5, "S0": 1.0, "E0": 0.5}
OBSERVATION_TIMES = jnp.concatenate([jnp.linspace(0.1, 1.0, 10), jnp.linspace(1.5, 12.0, 22)])


def synthetic_data(key, n_individuals=1, variability=0.0):
    """Noisy S and P; `variability` is the sd of log-normal individual rate constants."""
    keys = jax.random.split(key, 2)
    eta = variability * jax.random.normal(keys[0], (n_individuals, 3))
    params = [
        {**TRUE_PARAMETERS,
         **{n: TRUE_PARAMETERS[n] * float(jnp.exp(e[j]))
            for j, n in enumerate(("kf", "kr", "kcat"))}}
        for e in eta
    ]
    return cal.synthetic_dataset(MODEL(), params, OBSERVATION_TIMES, key=keys[1])

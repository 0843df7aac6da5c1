"""A signalling chain of n tiers with Michaelis–Menten kinetics and negative feedback.

Each tier i has an active fraction X_i (total 1). A ligand L(t) activates tier 1,
tier i-1 activates tier i, and the last tier inhibits the first:

  X_1' = ka_1 L (1 - X_1) / ((Ka_1 + 1 - X_1)(1 + f X_n)) - kd_1 X_1 / (Kd_1 + X_1)
  X_i' = ka_i X_{i-1} (1 - X_i) / (Ka_i + 1 - X_i) - kd_i X_i / (Kd_i + X_i)

Four parameters per tier and the feedback strength f: 4n + 1 parameters for n states,
all estimated. Rates spread over three decades from tier to tier make it stiff.
`chain_model(n)` builds the chain for any n (the benchmark of sensitivity methods
grows it to find where the adjoint overtakes forward sensitivities); `MODEL` has 8
tiers (33 parameters).
"""

import functools

import jax
import jax.numpy as jnp

import calibrate as cal


TIERS = 8


def _tier_defaults(i):
    """Rates 0.15–50 and Michaelis constants 0.2–0.6, varied from tier to tier; each
    tier's activation outweighs its deactivation, so the signal reaches the last tier."""
    activation = 10.0 ** (i % 3 - 1) * 5.0
    return {
        f"ka{i}": activation,
        f"kd{i}": activation * 0.3,
        f"Ka{i}": 0.2 + 0.1 * (i % 4),
        f"Kd{i}": 0.3 + 0.1 * (i % 3),
    }


def _parameters(tiers):
    descriptions = {"ka": "activation rate", "kd": "deactivation rate",
                    "Ka": "activation Michaelis constant",
                    "Kd": "deactivation Michaelis constant"}
    parameters = []
    for i in range(1, tiers + 1):
        for name, value in _tier_defaults(i).items():
            parameters.append(cal.Parameter(
                name, value, value * 1e-3, value * 1e3, scale="log10",
                description=f"tier {i} {descriptions[name[:2]]}"))
    parameters.append(cal.Parameter("f", 1.0, 1e-3, 1e3, scale="log10",
                                    description="feedback of the last tier on the first"))
    return tuple(parameters)


@functools.cache
def chain_model(tiers: int) -> type[cal.AbstractODEModel]:
    """The model class of a chain of `tiers` tiers (one class per size)."""
    if tiers < 2:
        raise ValueError(f"a signalling chain needs at least 2 tiers, got {tiers}")

    def rhs(self, t, x, params, inputs):
        rates = []
        for i in range(tiers):
            tier = i + 1
            upstream = inputs["L"] if i == 0 else x[i - 1]
            activation = (params[f"ka{tier}"] * upstream * (1 - x[i])
                          / (params[f"Ka{tier}"] + 1 - x[i]))
            if i == 0:
                activation = activation / (1 + params["f"] * x[-1])
            deactivation = params[f"kd{tier}"] * x[i] / (params[f"Kd{tier}"] + x[i])
            rates.append(activation - deactivation)
        return jnp.stack(rates)

    def initial_state(self, params):
        return jnp.zeros(tiers, dtype=jnp.result_type(params["f"]))

    def observe(self, t, x, params):
        return x

    def default_inputs(self):
        # Ligand on at t = 0, washed out at t = 20.
        return {"L": cal.PiecewiseConstant([0.0, 20.0], [1.0, 0.0])}

    return type(f"SignallingChain{tiers}", (cal.AbstractODEModel,), {
        "__doc__": (f"Signalling chain of {tiers} Michaelis–Menten tiers with negative "
                    f"feedback ({tiers} states, {4 * tiers + 1} parameters)."),
        "__module__": __name__,
        "states": tuple(f"X{i}" for i in range(1, tiers + 1)),
        "parameters": _parameters(tiers),
        "observables": tuple(cal.Observable(f"X{i}", cal.Gaussian(0.01),
                                            f"active fraction of tier {i}")
                             for i in range(1, tiers + 1)),
        "inputs": ("L",),
        "t0": 0.0,
        "rhs": rhs,
        "initial_state": initial_state,
        "observe": observe,
        "default_inputs": default_inputs,
    })


MODEL = chain_model(TIERS)
TRUE_PARAMETERS = {p.name: p.default for p in MODEL.parameters}
OBSERVATION_TIMES = jnp.concatenate([jnp.geomspace(0.1, 20.0, 12), jnp.linspace(22.0, 60.0, 12)])


def synthetic_data(key, n_individuals=1, variability=0.0, tiers=TIERS):
    """Noisy active fractions of every tier; `variability` is the sd of log-normal
    individual rates."""
    model = chain_model(tiers)()
    truth = {p.name: p.default for p in model.parameters}
    keys = jax.random.split(key, 2)
    rates = [n for n in truth if n[:2] in ("ka", "kd")]
    eta = variability * jax.random.normal(keys[0], (n_individuals, len(rates)))
    params = [
        {**truth, **{n: truth[n] * float(jnp.exp(e[j])) for j, n in enumerate(rates)}}
        for e in eta
    ]
    return cal.synthetic_dataset(model, params, OBSERVATION_TIMES, key=keys[1])

"""Regenerate measurements.csv: synthetic enzyme-kinetics data for 4 individuals.

    python examples/enzyme_kinetics/make_data.py

Each individual's rate constants kf, kr, kcat are the zoo's true values (2, 1, 0.5)
times exp(0.2 * N(0, 1)); S (substrate) and P (product) are measured at 32 times with
the model's noise. The individuals' true parameters are printed.
"""

from pathlib import Path

import jax
import numpy as np

import calibrate as cal


KEY = 2026
N_INDIVIDUALS = 4
VARIABILITY = 0.2


def true_parameters(key, n_individuals, variability):
    """The per-individual rate constants `synthetic_data` draws (same random stream)."""
    module = cal.zoo_module("enzyme_kinetics")
    eta = variability * jax.random.normal(jax.random.split(key, 2)[0], (n_individuals, 3))
    return [
        {n: module.TRUE_PARAMETERS[n] * float(np.exp(e[j]))
         for j, n in enumerate(("kf", "kr", "kcat"))}
        for e in np.asarray(eta)
    ]


def main():
    module = cal.zoo_module("enzyme_kinetics")
    key = jax.random.key(KEY)
    dataset = module.synthetic_data(
        key, n_individuals=N_INDIVIDUALS, variability=VARIABILITY
    )
    frame = dataset.to_frame()
    # Cosmetic: 0.19999999999999998 -> 0.2 (linspace round-off in the zoo's times).
    frame["time"] = frame["time"].round(10)
    out = Path(__file__).with_name("measurements.csv")
    frame.to_csv(out, index=False)
    print(f"wrote {len(frame)} rows to {out}")
    for individual, params in zip(dataset.individuals, true_parameters(key, N_INDIVIDUALS,
                                                                        VARIABILITY)):
        print(individual, {n: round(v, 4) for n, v in params.items()})


if __name__ == "__main__":
    main()

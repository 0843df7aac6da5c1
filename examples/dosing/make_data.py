"""Regenerate measurements.csv and conditions.csv of the dosing example.

    python examples/dosing/make_data.py

Twelve individuals of the zoo model `reference` (x' = -x + p u(t), x(0) = q), each
given its own infusion: u = dose from t = 0 until a stop time, then 0 (the long
layout of the conditions table). The gain p is log-normal across individuals
(median 1.5, sd 0.2 on the log scale) and the initial condition q is normal
(mean 2, sd 0.3): both population-distributed, so the population fit learns the
distribution of an initial condition. x is measured at 20 times with the model's
noise (sd 0.05). The individuals' true parameters are printed.
"""

from pathlib import Path

import jax
import numpy as np
import pandas as pd

import calibrate as cal


KEY = 7
N_INDIVIDUALS = 12
TIMES = np.round(np.linspace(0.5, 10.0, 20), 10)
MEDIAN_P, SD_LOG_P = 1.5, 0.2
MEAN_Q, SD_Q = 2.0, 0.3


def design(n):
    """Dose levels 0.5-2 and stop times 2-6, spread over the individuals."""
    doses = np.round(np.tile([0.5, 1.0, 1.5, 2.0], n // 4 + 1)[:n], 3)
    stops = np.round(np.linspace(2.0, 6.0, n), 3)
    return doses, stops


def true_parameters(key, n):
    eta = jax.random.normal(key, (n, 2))
    return [{"p": MEDIAN_P * float(np.exp(SD_LOG_P * e[0])), "q": MEAN_Q + SD_Q * float(e[1])}
            for e in np.asarray(eta)]


def main():
    model = cal.zoo_model("reference")
    keys = jax.random.split(jax.random.key(KEY), N_INDIVIDUALS + 1)
    params = true_parameters(keys[0], N_INDIVIDUALS)
    doses, stops = design(N_INDIVIDUALS)
    measurements, conditions = [], []
    for i in range(N_INDIVIDUALS):
        name = f"subject{i + 1:02d}"
        infusion = cal.PiecewiseConstant([0.0, stops[i]], [doses[i], 0.0])
        frame = cal.synthetic_dataset(model, params[i], TIMES, key=keys[i + 1],
                                      inputs={"u": infusion}).to_frame()
        measurements.append(frame.assign(individual=name))
        conditions += [(name, "u", 0.0, doses[i]), (name, "u", stops[i], 0.0)]
        print(name, {k: round(v, 4) for k, v in params[i].items()},
              f"dose {doses[i]} until t = {stops[i]}")
    here = Path(__file__).parent
    pd.concat(measurements).to_csv(here / "measurements.csv", index=False)
    pd.DataFrame(conditions, columns=["individual", "input", "time", "value"]).to_csv(
        here / "conditions.csv", index=False)
    print(f"wrote {here / 'measurements.csv'} and {here / 'conditions.csv'}")


if __name__ == "__main__":
    main()

"""Synthetic data: simulate individuals and add noise from each observable's noise model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from ._data import Dataset, dataset_for_model
from ._inputs import AbstractInput
from ._model import AbstractODEModel
from ._results import RESULTS
from ._simulate import Integrator, simulate


def synthetic_dataset(
    model: AbstractODEModel,
    parameters: Mapping[str, object] | Sequence[Mapping[str, object]],
    times,
    *,
    key: jax.Array,
    observables: Sequence[str] | None = None,
    inputs: Mapping[str, AbstractInput] | None = None,
    individual_prefix: str = "ind",
    integrator: Integrator = Integrator(rtol=1e-10, atol=1e-12),
) -> Dataset:
    """Simulate each parameter set (one per individual) at `times` and add noise.

    Noise is drawn from each observable's noise model with its `sigma` evaluated at
    the true parameters. Measurements are made of every observable in `observables`
    (default: all) at every time.
    """
    if isinstance(parameters, Mapping):
        parameters = [parameters]
    space = model.parameter_space
    times = jnp.asarray(times, dtype=float)
    observables = tuple(observables or model.observable_names)
    rows = []
    keys = jax.random.split(key, len(parameters))
    for i, (values, subkey) in enumerate(zip(parameters, keys)):
        params = space.complete(values)
        traj = simulate(model, params, times, inputs=inputs, integrator=integrator)
        if traj.result != RESULTS.successful:
            raise RuntimeError(f"simulation of individual {i} failed: {traj.result}")
        obs_keys = jax.random.split(subkey, len(model.observables))
        for k, obs in enumerate(model.observables):
            if obs.name not in observables:
                continue
            y_pred = traj.observables[:, k]
            sigma = obs.noise.model_sigma(y_pred, params)
            y = obs.noise.sample(obs_keys[k], y_pred, sigma)
            for t, v in zip(np.asarray(times), np.asarray(y)):
                rows.append((f"{individual_prefix}{i:04d}", float(t), obs.name, float(v)))
    frame = pd.DataFrame(rows, columns=["individual", "time", "observable", "value"])
    return dataset_for_model(model, frame, source="<synthetic>")

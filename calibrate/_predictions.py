"""Model predictions next to the observations they explain."""

from __future__ import annotations

from collections.abc import Mapping

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pandas as pd

from ._batching import default_chunk_size, map_individuals
from ._data import Dataset
from ._model import AbstractODEModel
from ._objective import Objective
from ._results import result_name
from ._simulate import Integrator


@eqx.filter_jit
def _predict_batch(objective: Objective, params, measurements, inputs, chunk_size):
    def one(params, measurements, inputs):
        traj, columns = objective._terms(params, measurements, inputs)
        sigma = jnp.stack([c[3] for c in columns], axis=-1)
        weighted = jnp.stack([noise.residual(y, y_pred, s) for noise, y, y_pred, s in columns],
                             axis=-1)
        return traj.observables, sigma, weighted, traj.result._value

    return map_individuals(one, (params, measurements, inputs),
                           (0, 0, None if inputs is None else 0), chunk_size)


def predictions_frame(
    model: AbstractODEModel,
    data: Dataset,
    parameters: Mapping[str, object],
    *,
    integrator: Integrator = Integrator(),
) -> pd.DataFrame:
    r"""One row per measurement: `individual, time, observable, observed, predicted,
    sigma, residual, weighted_residual, status`.

    `parameters` maps every model parameter to one value per individual (natural
    scale) or one value for all; `sigma` is the measurement's standard deviation (from
    the data or the noise model at the prediction) and `weighted_residual` is the
    noise model's standardised residual, $(y - \hat y)/\sigma$ (on the log scale for
    log-normal noise). `status` is the ODE solve's result for the individual.
    """
    n = len(data)
    space = model.parameter_space
    values = {name: jnp.broadcast_to(jnp.asarray(parameters[name], float), (n,))
              for name in space.names}
    inputs = data.batched_inputs(model)
    objective = Objective(model, integrator=integrator)
    n_states = len(model.states)
    predicted, sigma, weighted, codes = _predict_batch(
        objective, values, data.measurements, inputs,
        default_chunk_size(n, n_states**3))
    m = data.measurements
    mask = np.asarray(m.mask)
    i, t, k = np.nonzero(mask)
    observed = np.asarray(m.values)[i, t, k]
    yhat = np.asarray(predicted)[i, t, k]
    s = np.asarray(sigma)[i, t, k]
    status = np.array([result_name(c) for c in np.asarray(codes)], dtype=object)
    return pd.DataFrame({
        "individual": np.asarray(data.individuals, dtype=object)[i],
        "time": np.asarray(m.times)[i, t],
        "observable": np.asarray(data.observables, dtype=object)[k],
        "observed": observed,
        "predicted": yhat,
        "sigma": s,
        "residual": observed - yhat,
        "weighted_residual": np.asarray(weighted)[i, t, k],
        "status": status[i],
    })

r"""Populations from PEtab: a small extension of PEtab v1 for mixed-effects problems.

PEtab describes one system; it has no individuals. Two optional columns add them:

- measurement table, `individualId`: the individual (subject, cell line, patient)
  each measurement belongs to. Individuals may share simulation conditions or have
  their own; each is simulated under the conditions its measurements name.
- parameter table, `populationDistribution`, for every estimated parameter:
  `fixed` (the default when empty: one value shared by all individuals),
  `individual` (fitted per individual, no population model),
  `normal` ($p_i = \mu + \eta_i$) or `logNormal` ($\log p_i = \log\mu + \eta_i$), with
  $\eta_i \sim N(0, \omega^2)$; and `populationSd`, the start of $\omega$ on that scale
  (default 0.3 for `logNormal`, 0.3·|nominalValue| for `normal`).
  `nominalValue` is the start of the fixed effect or of the population mean/median.
  Bounds constrain fixed and individual parameters, not the individual values of a
  distributed one.

A problem with both columns runs through the hierarchical calibrator
(`calibrate_population(load_petab(yaml))`): every individual's MAP fit of its own
measurements is the inner problem, the Laplace approximation of the marginal
likelihood (or a held-out loss) the outer one. Without them a problem fits as
before. Objective priors and Laplace noise are refused with the extension.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax.numpy as jnp

from ._data import Issue
from ._parameters import Parameter, ParameterSpace
from ._petab import MeasurementSet, PEtabError, PEtabProblem


class PEtabLikelihood(eqx.Module):
    """The likelihood of one individual's measurements of a PEtab problem, as the
    population calibrator evaluates it: natural-scale values of the estimated
    parameters in, residuals, negative log-likelihood and solve result out."""

    problem: PEtabProblem

    @property
    def sensitivity(self):
        return self.problem.sensitivity

    def theta(self, params) -> jnp.ndarray:
        values = jnp.stack([jnp.asarray(params[n], dtype=float)
                            for n in self.problem.estimated_ids])
        return self.problem.nominal.at[self.problem.estimated_index].set(values)

    def evaluate_params(self, params, data: MeasurementSet, inputs=None):
        return self.problem.residuals_of(self.theta(params), data)


def require_population(problem: PEtabProblem) -> None:
    if not problem.is_population:
        raise PEtabError([Issue(
            problem.source, "the problem has no individuals: add the population "
            "extension's individualId column to the measurement table and "
            "populationDistribution to the parameter table, or fit it with fit_petab")])


def population_space(problem: PEtabProblem) -> ParameterSpace:
    """The estimated parameters with the scale of their role: a distributed
    parameter's scale is its distribution's (`logNormal`: log), unbounded."""
    space = problem.parameter_space
    parameters = []
    for role in problem.population_roles:
        p = space[role.parameter]
        if role.role == "random":
            log = role.distribution == "logNormal"
            p = Parameter(p.name, p.default, math.ulp(0.0) if log else -math.inf,
                          math.inf, "log" if log else "lin")
        parameters.append(p)
    return ParameterSpace(parameters)


def population_roles(problem: PEtabProblem) -> dict[str, list[str]]:
    """Parameter ids by role: `random`, `fixed`, `individual`."""
    roles: dict[str, list[str]] = {"random": [], "fixed": [], "individual": []}
    for role in problem.population_roles:
        roles[role.role].append(role.parameter)
    return roles


def population_start_sd(problem: PEtabProblem) -> dict[str, float]:
    return {r.parameter: r.sd for r in problem.population_roles if r.role == "random"}

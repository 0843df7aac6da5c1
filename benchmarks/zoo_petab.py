"""The zoo's `mapk_cascade` written as a PEtab problem, so that AMICI can take the same
gradient as calibrate (the issue-7 target "per-individual gradient on the zoo cascade no
slower than AMICI's forward sensitivities").

The SBML model has one rate rule per state, equal to `MAPKCascade.rhs`, and the ligand
input as an assignment rule `L = piecewise(1, time < 60, 0)` (the zoo's default input).
Measurements are the zoo's `synthetic_data(key(7))` of one individual; the ten rate
constants are estimated on log10 scale within the zoo's bounds, the noise σ = 0.01 is
known. `check_against_zoo` asserts that the imported problem's likelihood and gradient
equal the zoo model's, so the two sides compute the same thing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

RATES = [f"k{i}" for i in range(1, 11)]
STATES = ("R", "RL", "RAF", "RAFp", "MEK", "MEKp", "ERK", "ERKp", "F")
FLUXES = {
    "v1": "k1 * L * R", "v2": "k2 * RL", "v3": "k3 * RL * RAF", "v4": "k4 * RAFp * (1 + F)",
    "v5": "k5 * RAFp * MEK", "v6": "k6 * MEKp", "v7": "k7 * MEKp * ERK", "v8": "k8 * ERKp",
    "v9": "k9 * ERKp", "v10": "k10 * F",
}
RATE_RULES = {
    "R": "-v1 + v2", "RL": "v1 - v2", "RAF": "-v3 + v4", "RAFp": "v3 - v4",
    "MEK": "-v5 + v6", "MEKp": "v5 - v6", "ERK": "-v7 + v8", "ERKp": "v7 - v8",
    "F": "v9 - v10",
}
INITIAL = {"R": 1.0, "RAF": 1.0, "MEK": 1.0, "ERK": 1.0}
OBSERVED = ("RAFp", "MEKp", "ERKp", "F")
SIGMA = 0.01


def _sbml() -> str:
    import libsbml

    from calibrate import zoo_module

    defaults = zoo_module("mapk_cascade").TRUE_PARAMETERS
    document = libsbml.SBMLDocument(3, 1)
    model = document.createModel()
    model.setId("mapk_cascade")
    compartment = model.createCompartment()
    compartment.setId("cell")
    compartment.setSize(1.0)
    compartment.setConstant(True)
    for name in STATES:
        species = model.createSpecies()
        species.setId(name)
        species.setCompartment("cell")
        species.setInitialConcentration(INITIAL.get(name, 0.0))
        species.setHasOnlySubstanceUnits(False)
        species.setBoundaryCondition(False)
        species.setConstant(False)
    for name in RATES:
        parameter = model.createParameter()
        parameter.setId(name)
        parameter.setValue(float(defaults[name]))
        parameter.setConstant(True)
    for name in ("L", *FLUXES):
        parameter = model.createParameter()
        parameter.setId(name)
        parameter.setConstant(False)
    rules = {"L": "piecewise(1, lt(time, 60), 0)", **FLUXES}
    for name, formula in rules.items():
        rule = model.createAssignmentRule()
        rule.setVariable(name)
        rule.setMath(libsbml.parseL3Formula(formula))
    for name, formula in RATE_RULES.items():
        rule = model.createRateRule()
        rule.setVariable(name)
        rule.setMath(libsbml.parseL3Formula(formula))
    if document.checkInternalConsistency():
        raise RuntimeError(document.getErrorLog().toString())
    return libsbml.writeSBMLToString(document)


def write_mapk_cascade(folder: Path) -> Path:
    """Writes the PEtab problem to `folder`; returns its YAML file."""
    import jax
    import pandas as pd

    from calibrate import zoo_module

    cascade = zoo_module("mapk_cascade")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.xml").write_text(_sbml())
    data = cascade.synthetic_data(jax.random.key(7))
    times = np.asarray(data.measurements.times)[0]
    values = np.asarray(data.measurements.values)[0]
    rows = [{"observableId": f"obs_{name}", "simulationConditionId": "ligand_pulse",
             "time": repr(float(t)), "measurement": repr(float(values[i, k]))}
            for k, name in enumerate(OBSERVED) for i, t in enumerate(times)]
    pd.DataFrame(rows).to_csv(folder / "measurements.tsv", sep="\t", index=False)
    pd.DataFrame({"conditionId": ["ligand_pulse"]}).to_csv(
        folder / "conditions.tsv", sep="\t", index=False)
    pd.DataFrame({"observableId": [f"obs_{n}" for n in OBSERVED],
                  "observableFormula": list(OBSERVED),
                  "noiseFormula": [repr(SIGMA)] * len(OBSERVED)}).to_csv(
        folder / "observables.tsv", sep="\t", index=False)
    space = cascade.MODEL().parameter_space
    pd.DataFrame({
        "parameterId": RATES, "parameterScale": ["log10"] * len(RATES),
        "lowerBound": [repr(space[n].lower) for n in RATES],
        "upperBound": [repr(space[n].upper) for n in RATES],
        "nominalValue": [repr(float(cascade.TRUE_PARAMETERS[n])) for n in RATES],
        "estimate": [1] * len(RATES),
    }).to_csv(folder / "parameters.tsv", sep="\t", index=False)
    yaml = folder / "mapk_cascade.yaml"
    yaml.write_text(
        "format_version: 1\n"
        "parameter_file: parameters.tsv\n"
        "problems:\n"
        "  - sbml_files: [model.xml]\n"
        "    condition_files: [conditions.tsv]\n"
        "    measurement_files: [measurements.tsv]\n"
        "    observable_files: [observables.tsv]\n")
    return yaml


def zoo_nll(integrator):
    """The zoo model's own negative log-likelihood of the same data, as a function of
    the log10 rates (the PEtab problem's x), and its nominal point."""
    import jax
    import jax.numpy as jnp

    import calibrate as cal

    cascade = cal.zoo_module("mapk_cascade")
    model = cascade.MODEL()
    data = jax.tree.map(lambda a: a[0], cascade.synthetic_data(jax.random.key(7)).measurements)
    objective = cal.Objective(model, integrator=integrator)
    fixed = model.parameter_space.complete(cascade.TRUE_PARAMETERS)

    def nll(x):
        values = {**fixed, **{n: 10.0**x[i] for i, n in enumerate(RATES)}}
        return objective.evaluate_params(values, data)[1]

    x = jnp.log10(jnp.asarray([cascade.TRUE_PARAMETERS[n] for n in RATES]))
    return nll, objective.sensitivity, x


def check_against_zoo(problem, integrator) -> tuple[float, float]:
    """Relative differences of the imported problem's NLL and ForwardMode gradient from
    the zoo model's at the nominal point; raises if either exceeds 1e-6."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    nll, sensitivity, x = zoo_nll(integrator)
    zoo_value, zoo_gradient = jax.jit(sensitivity.value_and_grad_fn(nll))(x)
    np.testing.assert_allclose(np.asarray(problem.nominal_x()), np.asarray(x), rtol=1e-12)
    value, gradient = eqx.filter_jit(lambda p, x: p.value_and_gradient(x))(problem, x)
    value_error = abs(float(value) - float(zoo_value)) / abs(float(zoo_value))
    gradient_error = float(jnp.max(jnp.abs(gradient - zoo_gradient))
                           / jnp.max(jnp.abs(zoo_gradient)))
    if value_error > 1e-6 or gradient_error > 1e-6:
        raise AssertionError(f"PEtab cascade differs from the zoo model: NLL {value_error:.1e}, "
                             f"gradient {gradient_error:.1e}")
    return value_error, gradient_error

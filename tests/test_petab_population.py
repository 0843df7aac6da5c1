"""The PEtab population extension (individualId, populationDistribution): the same
numbers as the native population calibrator, ground truth recovered end to end from
the command line, and clear errors for inconsistent tables."""

import importlib.util
import json
import shutil
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import calibrate as cal
from helpers import edited_copy, invoke_cli, replace_once


EXAMPLE = Path(__file__).parent.parent / "examples" / "petab_population"


def _generator():
    spec = importlib.util.spec_from_file_location("generate", EXAMPLE / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _copy(tmp_path, edit=None):
    return edited_copy(EXAMPLE, tmp_path, edit, ignore=shutil.ignore_patterns("*.py"))


def _edit_table(name, change):
    def edit(folder):
        frame = pd.read_csv(folder / name, sep="\t", dtype=str, keep_default_na=False)
        change(frame).to_csv(folder / name, sep="\t", index=False)
    return edit


def _without_population_columns(frame):
    return frame.drop(columns=["populationDistribution", "populationSd"])


def _single_dose_only(frame):
    return frame[frame.simulationConditionId == "single"]


def test_matches_the_native_population_calibrator(tmp_path, zoo):
    """The example's model is the zoo's reference model (x' = -x + p u(t), x(0) = q,
    with dose 1): the PEtab route and the native one give the same outer objective,
    hypergradient and inner solutions at the start."""
    path = _copy(tmp_path, _edit_table("measurements.tsv", _single_dose_only))
    problem = cal.load_petab(path)
    method = cal.Implicit(curvature=cal.ForwardHessian())
    petab = cal.population_setup(problem)
    from_petab = petab.evaluate(method, petab.theta, petab.starts)

    rows = pd.read_csv(path.parent / "measurements.tsv", sep="\t")
    data = cal.dataset_from_frame(pd.DataFrame({
        "individual": rows.individualId, "time": rows.time, "observable": "x",
        "value": rows.measurement}), observables=["x"])
    native = cal.population_setup(zoo["reference"].MODEL(), data,
                                  hierarchy=cal.Hierarchy(random=["p"], fixed=["q"]))
    from_native = native.evaluate(method, native.theta, native.starts)

    assert petab.individuals == native.individuals
    for key in ("fixed", "mean", "omega"):
        np.testing.assert_allclose(petab.theta[key], native.theta[key], rtol=1e-14)
        np.testing.assert_allclose(from_petab.gradient[key], from_native.gradient[key],
                                   rtol=1e-7)
    np.testing.assert_allclose(from_petab.value, from_native.value, rtol=1e-10)
    np.testing.assert_allclose(from_petab.hypergradients.inner_solution,
                               from_native.hypergradients.inner_solution, atol=1e-8)
    assert float(from_native.value) < 0  # a real likelihood, not a stand-in


@eqx.filter_jit
def _individual_nll(likelihood, params, data):
    return likelihood.evaluate_params(params, data)[1]


@pytest.mark.parametrize("subject, conditions, rows", [
    ("subject07", [0, 1], 20),  # a single and a double dose: no padding
    ("subject02", [0, 0], 10),  # a single dose: rows and condition padded to subject 7's
])
def test_an_individual_sees_only_its_own_measurements_and_conditions(tmp_path, subject,
                                                                      conditions, rows):
    """An individual's population likelihood equals the plain PEtab likelihood of its
    rows alone, whether or not its share of the table is padded."""
    problem = cal.load_petab(_copy(tmp_path))
    index = problem.individual_ids.index(subject)
    one = jax.tree.map(lambda a: a[index], problem.individual_measurements)
    assert sorted(np.asarray(one.conditions).tolist()) == conditions
    assert int(np.sum(np.asarray(one.mask))) == rows
    value = _individual_nll(cal.PEtabLikelihood(problem),
                            {"p": jnp.asarray(1.9), "q": jnp.asarray(2.1)}, one)

    def alone(frame):
        return frame[frame.individualId == subject].drop(columns="individualId")

    def plain(folder):
        _edit_table("measurements.tsv", alone)(folder)
        _edit_table("parameters.tsv", _without_population_columns)(folder)

    reference = cal.load_petab(_copy(tmp_path / "plain", plain))
    assert not reference.is_population and reference.n_measurements == rows
    x = jnp.asarray([np.log(1.9), 2.1])  # p on its log scale, q linear
    np.testing.assert_allclose(value, reference.negative_log_likelihood(x), rtol=1e-12)


def test_cli_fit_recovers_the_simulated_population(tmp_path):
    out = tmp_path / "fit"
    run = invoke_cli("fit", EXAMPLE / "problem.yaml", "--out", out)
    assert run.exit_code == 0, run.output
    generator = _generator()
    population = pd.read_csv(out / "population.csv").set_index(["parameter", "kind"])
    truth = {("q", "fixed"): generator.X0, ("p", "mean"): generator.MEDIAN_GAIN,
             ("p", "sd"): generator.GAIN_SD}
    for key, value in truth.items():
        estimate, se = population.loc[key, ["estimate", "se"]]
        assert 0 < se < 0.2 * abs(value)
        assert abs(estimate - value) < 3 * se, (key, estimate, se)
    record = json.loads((out / "population.json").read_text())
    assert record["converged"] and record["n_stationary"] == 12
    individuals = pd.read_csv(out / "individuals.csv")
    gains, _ = generator.subjects()
    np.testing.assert_allclose(individuals["p"], gains, rtol=0.06)
    # The simulation table: every measurement predicted at its subject's estimates.
    simulations = pd.read_csv(out / "simulations.tsv", sep="\t")
    measurements = pd.read_csv(EXAMPLE / "measurements.tsv", sep="\t")
    assert list(simulations.individualId) == list(measurements.individualId)
    p = simulations.individualId.map(individuals.set_index("individual")["p"])
    dose = simulations.simulationConditionId.map(generator.DOSES)
    q = float(population.loc[("q", "fixed"), "estimate"])
    np.testing.assert_allclose(
        simulations.simulation,
        generator.closed_form(simulations.time.to_numpy(float), p, q, dose), rtol=1e-5)
    residuals = (measurements.measurement - simulations.simulation) / generator.SIGMA
    assert 0.7 < np.std(residuals) < 1.3
    for name in ("report.html", "parameters.png", "run.json", "diagnostics.csv"):
        assert (out / name).stat().st_size > 0


@pytest.mark.parametrize("edit, expected", [
    (lambda f: replace_once(f / "parameters.tsv", "logNormal", "lognormal"),
     "parameters.tsv, row 2, column 'populationDistribution': populationDistribution "
     "'lognormal' is not one of fixed, individual, normal, logNormal (did you mean "
     "'logNormal'?)"),
    (lambda f: replace_once(f / "parameters.tsv", "logNormal\t0.3", "logNormal\t-1"),
     "parameters.tsv, row 2, column 'populationSd': populationSd '-1' is not a positive "
     "number"),
    (lambda f: replace_once(f / "parameters.tsv", "logNormal\t0.3", "fixed\t"),
     "parameters.tsv, column 'populationDistribution': no estimated parameter is normal, "
     "logNormal or individual"),
    (lambda f: replace_once(f / "parameters.tsv", "\t0\t\t\n", "\t0\tnormal\t\n"),
     "parameters.tsv, row 4, column 'estimate': populationDistribution 'normal' needs "
     "estimate = 1"),
    (lambda f: replace_once(f / "measurements.tsv", "subject03\t", "\t"),
     "measurements.tsv, row 22, column 'individualId': individualId is empty"),
    (lambda f: replace_once(f / "measurements.tsv", "individualId\t", "subject\t"),
     "measurements.tsv: the parameter table has a populationDistribution column, so each "
     "measurement needs an individualId column"),
    (_edit_table("parameters.tsv", _without_population_columns),
     "parameters.tsv: the measurement table names individuals (individualId), so the "
     "parameter table needs a populationDistribution column"),
    (lambda f: replace_once(f / "observables.tsv", "sigma_x\n", "sigma_x\tlaplace\n")
     or replace_once(f / "observables.tsv", "noiseFormula", "noiseFormula\tnoiseDistribution"),
     "observables.tsv, row 2, column 'noiseDistribution': Laplace noise is not "
     "supported with the population extension"),
])
def test_inconsistent_population_tables_are_reported(tmp_path, edit, expected):
    with pytest.raises(cal.PEtabError) as info:
        cal.load_petab(_copy(tmp_path, edit))
    assert expected in str(info.value)


def test_population_needs_the_extension(tmp_path):
    def plain(folder):
        _edit_table("measurements.tsv", lambda f: f.drop(columns="individualId"))(folder)
        _edit_table("parameters.tsv", _without_population_columns)(folder)

    path = _copy(tmp_path, plain)
    problem = cal.load_petab(path)
    with pytest.raises(cal.PEtabError, match="the problem has no individuals"):
        cal.calibrate_population(problem)
    run = invoke_cli("fit", path, "--out", tmp_path / "o", "--resume")
    assert run.exit_code == 2 and "--resume: only a population" in run.output

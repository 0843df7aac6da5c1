"""PEtab v2: the benchmark problems converted to v2 (tests/data/petab_v2, BSD-3 licence)
give AMICI's reference likelihoods and gradients of their v1 originals, and bad v2
tables are reported with file, row and column."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import calibrate as cal
from calibrate._petab import problem_files
from helpers import edited_copy, invoke_cli, replace_once
from test_petab import (
    DATA,
    REFERENCE,
    SLOW,
    TOLERANCES,
    _evaluate,
    _max_relative,
    _value_and_gradient,
    _vector,
)


DATA_V2 = Path(__file__).parent / "data" / "petab_v2"
SCALE_DERIVATIVE = {"lin": lambda v: np.ones_like(v), "log": lambda v: 1 / v,
                    "log10": lambda v: 1 / (v * np.log(10))}
SCALE_OF = {"lin": lambda v: v, "log": np.log, "log10": np.log10}


def yaml_of(name):
    return next((DATA_V2 / name).glob("*.yaml"))


def load_v2(name):
    return load_v2_from(name, yaml_of(name))


def load_v2_from(name, path):
    rtol, atol = TOLERANCES[name]
    return cal.load_petab(
        path,
        integrator=cal.Integrator(rtol=rtol, atol=atol,
                                  max_steps=100_000),
        steady_state_tolerances=(1e-12, 1e-14),
    )


def v1_scales(name):
    (path,) = problem_files(DATA / REFERENCE[name]["yaml"])["parameter_file"]
    table = pd.read_csv(path, sep="\t").set_index("parameterId")["parameterScale"]
    return [table[p] for p in REFERENCE[name]["par_ids_estimated"]]


def on_v2_scale(problem, name, x_v1, gradient_v1):
    """A point and gradient of the v1 problem, moved to the v2 problem's scales."""
    from_scale = {"lin": lambda x: x, "log": np.exp, "log10": lambda x: 10.0 ** x}
    v1 = v1_scales(name)
    v2 = [("lin", "log", "log10")[int(s)] for s in np.asarray(problem.estimated_scale)]
    value = np.array([from_scale[s](x) for s, x in zip(v1, x_v1, strict=True)])
    d_value = gradient_v1 * np.array([SCALE_DERIVATIVE[s](v) for s, v in zip(v1, value,
                                                                             strict=True)])
    x = np.array([SCALE_OF[s](v) for s, v in zip(v2, value, strict=True)])
    gradient = d_value / np.array([SCALE_DERIVATIVE[s](v) for s, v in zip(v2, value,
                                                                          strict=True)])
    return x, gradient


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in TOLERANCES
])
def test_v2_problem_matches_amici_reference(name):
    reference = REFERENCE[name]
    problem = load_v2(name)
    assert list(problem.estimated_ids) == reference["par_ids_estimated"]
    for point in (reference, reference["perturbed"]):
        x_v1 = _vector(reference, point.get("x_scaled", reference["x_nominal_scaled"]))
        gradient_v1 = _vector(reference, point.get("grad", reference.get("grad_nominal")))
        x, expected = on_v2_scale(problem, name, x_v1, gradient_v1)
        value, gradient = _value_and_gradient(problem, jnp.asarray(x))
        np.testing.assert_allclose(float(value), point.get("nllh", reference.get(
            "nllh_nominal")), rtol=1e-6)
        assert _max_relative(gradient, expected) < 1e-4


def test_v2_scales_and_starts_follow_the_bounds(tmp_path):
    """Without parameterScale, estimated parameters with positive bounds spanning two
    decades are fitted on log10, the rest on their value; an estimated parameter
    without nominalValue starts at the midpoint of its bounds on that scale."""
    cases = (  # problem, scale, parameter, its row's nominalValue blanked, midpoint
        ("Bertozzi_PNAS2020", 0, "R0_NY", ("R0_NY\t1.5\t5.0\t1.5\t", "R0_NY\t1.5\t5.0\t\t"),
         3.25),
        ("Boehm_JProteomeRes2014", 2, "Epo_degradation_BaF3",
         ("100000\t0.026982514033029\t", "100000\t\t"), 1.0),
    )
    for name, scale, pid, (old, new), midpoint in cases:
        path = edited_copy(DATA_V2 / name, tmp_path, lambda f, old=old, new=new:
                           replace_once(next(f.glob("parameters*.tsv")), old, new))
        problem = cal.load_petab(path)
        assert set(np.asarray(problem.estimated_scale)) == {scale}
        theta = np.asarray(problem.theta(problem.nominal_x()))
        np.testing.assert_allclose(theta[problem.parameter_ids.index(pid)], midpoint,
                                   rtol=1e-12)


def _copy(tmp_path, name, edit):
    return edited_copy(DATA_V2 / name, tmp_path, edit)


def test_preequilibration_parameters_carry_over_into_the_main_period(tmp_path):
    """A parameter the pre-equilibration condition sets and the main condition leaves
    alone keeps its value in the main period (v2 semantics)."""
    name = "Brannmark_JBC2010"
    path = _copy(tmp_path, name, lambda f: replace_once(
        next(f.glob("experimentalCondition_*.tsv")), "Dose_1\tinsulin_dose_1\t0.3\n", ""))
    problem = cal.load_petab(path)
    names = list(problem.model_parameter_names)
    k = names.index("insulin_dose_1")
    values = np.asarray(problem.condition_parameters.value)[:, k]
    conditions = list(problem.condition_ids)
    assert values[conditions.index("experiment__Dose_0___Dose_1")] == 0.0
    assert values[conditions.index("experiment__Dose_0___Dose_3")] == 1.0
    original = load_v2(name)
    np.testing.assert_array_equal(
        np.asarray(original.condition_parameters.value)[:, k][
            list(original.condition_ids).index("experiment__Dose_0___Dose_1")], 0.3)


def test_named_placeholders_are_filled_in_their_order(tmp_path):
    """Placeholders named freely in observablePlaceholders/noisePlaceholders take the
    measurement table's values in the order they are listed."""
    name = "Elowitz_Nature2000"
    table = f"observables_{name}.tsv"

    def rename(folder):
        for old, new in (("observableParameter1_fluorescence", "offset"),
                         ("observableParameter2_fluorescence", "gain"),
                         ("noiseParameter1_fluorescence", "spread")):
            text = (folder / table).read_text()
            assert old in text
            (folder / table).write_text(text.replace(old, new))

    renamed = load_v2_from(name, edited_copy(DATA_V2 / name, tmp_path, rename))
    original = load_v2(name)
    x = original.nominal_x()
    np.testing.assert_allclose(float(_evaluate(renamed, x)[0]),
                               float(_evaluate(original, x)[0]), rtol=1e-12)


@pytest.mark.parametrize("edit, expected", [
    (lambda f: (f / "experiments.tsv").write_text(
        (f / "experiments.tsv").read_text() + "experiment____u_CA\tu_NY\t10\n"),
     "experiments.tsv, row 2, column 'time': experiment 'experiment____u_CA' has periods "
     "starting at 0.0, 10.0; supported are one period from time 0"),
    (lambda f: replace_once(f / "experiments.tsv", "u_NY\t0", "u_NY\t5"),
     "experiment 'experiment____u_NY' has periods starting at 5.0"),
    (lambda f: replace_once(f / "measurements.tsv", "experiment____u_CA\t", "experiment_u_CA\t"),
     "measurements.tsv, row 2, column 'experimentId': experiment 'experiment_u_CA' is not "
     "in the experiment table (did you mean 'experiment____u_CA'?)"),
    (lambda f: replace_once(f / "conditions.tsv", "\t39560000", "\t2 * N_NY"),
     "conditions.tsv, row 2, column 'targetValue': targetValue '2 * N_NY' must be a number "
     "or a parameter of the parameter table (math expressions are not supported)"),
    (lambda f: (replace_once(f / "observables.tsv", "noisePlaceholders\n",
                             "noisePlaceholders\tnoiseDistribution\n"),
                replace_once(f / "observables.tsv", "sd_I_NY\t\t\n", "sd_I_NY\t\t\tlognormal\n"),
                replace_once(f / "observables.tsv", "sd_I_CA\t\t\n", "sd_I_CA\t\t\tnormal\n")),
     "observables.tsv, row 2, column 'noiseDistribution': noiseDistribution 'lognormal' is "
     "not one of normal, laplace, log-normal, log-laplace, log10-normal (did you mean "
     "'log-normal'?)"),
    (lambda f: replace_once(f / "parameters.tsv", "\ttrue", "\tyes"),
     "parameters.tsv, row 2, column 'estimate': estimate must be true or false, got 'yes'"),
    (lambda f: replace_once(f / "parameters.tsv", "R0_NY\t1.5\t5.0\t1.5\t", "R0_NY\t1.5\t\t\t"),
     "parameters.tsv, row 2, column 'nominalValue': nominalValue is missing and the bounds "
     "[1.5, inf] have no midpoint to start from"),
    (lambda f: replace_once(f / "problem.yaml", "mapping_files: []", "mapping_files: [m.tsv]"),
     "problem.yaml, mapping_files: mapping tables are not supported"),
])
def test_bad_v2_tables_are_reported_with_file_row_and_column(tmp_path, edit, expected):
    with pytest.raises(cal.PEtabError) as info:
        cal.load_petab(_copy(tmp_path, "Bertozzi_PNAS2020", edit))
    assert expected in " ".join(str(info.value).split())


def test_cli_checks_and_simulates_a_v2_problem(tmp_path):
    """`calibrate check` sees the v2 problem as its v1 original; `calibrate simulate`
    writes the v2 measurement table with its simulations, equal to the v1 ones."""
    check = invoke_cli("check", yaml_of("Brannmark_JBC2010"))
    assert check.exit_code == 0, check.output
    assert ("8 simulation condition(s) (8 pre-equilibrated), 3 observable(s), 43 "
            "measurements, 22 of 22 parameters estimated") in " ".join(check.output.split())
    tables = {}
    for version, path in (("v1", DATA / REFERENCE["Bertozzi_PNAS2020"]["yaml"]),
                          ("v2", yaml_of("Bertozzi_PNAS2020"))):
        out = tmp_path / f"{version}.tsv"
        run = invoke_cli("simulate", path, "--out", out, "--rtol", "1e-10", "--atol", "1e-12")
        assert run.exit_code == 0, run.output
        tables[version] = pd.read_csv(out, sep="\t")
    assert "experimentId" in tables["v2"].columns
    np.testing.assert_allclose(tables["v2"]["simulation"], tables["v1"]["simulation"],
                               rtol=1e-12)

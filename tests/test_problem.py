"""Problem files (calibrate/_problem.py), conditions tables (calibrate/_conditions.py),
predictions (calibrate/_predictions.py) and `calibrate check`.

Every bad input is caught before any ODE is solved, so these tests compile nothing
but the batched prediction of the reference model.
"""

import io
import json
import shutil
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st
from typer.testing import CliRunner

import calibrate as cal
from calibrate.cli import app


ROOT = Path(__file__).parent.parent
DOSING = ROOT / "examples" / "dosing"
runner = CliRunner()

GOOD = """\
model = "reference"
measurements = "measurements.csv"
conditions = "conditions.csv"
seed = 3

[parameters.p]
role = "random"
start = 1.0
sd = 0.3

[parameters.q]
role = "random"
start = 1.0
"""
MEASUREMENTS = "individual,time,observable,value\na,1,x,1.5\na,2,x,1.2\nb,1,x,0.9\n"
CONDITIONS = "individual,input,time,value\na,u,0,1\na,u,3,0\nb,u,0,2\n"


def write_problem(directory: Path, toml=GOOD, measurements=MEASUREMENTS,
                  conditions=CONDITIONS) -> Path:
    (directory / "problem.toml").write_text(textwrap.dedent(toml))
    if measurements is not None:
        (directory / "measurements.csv").write_text(measurements)
    if conditions is not None:
        (directory / "conditions.csv").write_text(conditions)
    return directory / "problem.toml"


def issues_of(path) -> list[str]:
    return [str(i) for i in cal.check_problem(path)]


def test_valid_problem_loads_with_its_settings(tmp_path):
    problem = cal.load_problem(write_problem(tmp_path))
    assert problem.hierarchical
    assert problem.roles == {"p": "random", "q": "random"}
    assert problem.start == {"p": 1.0, "q": 1.0}
    assert problem.start_sd["p"] == 0.3
    assert problem.seed == 3
    assert problem.settings["population"]["objective"] == "laplace"
    assert problem.settings["ode"]["rtol"] == 1e-8
    assert problem.integrator.solver is None  # the default, Rodas5
    arguments = problem.population_arguments()
    assert arguments["hierarchy"].random == ("p", "q")
    assert isinstance(arguments["objective"], cal.Laplace)
    assert isinstance(arguments["hypergradient"].curvature, cal.ForwardHessian)
    # Schedules become piecewise-constant inputs, padded to one shape.
    u = problem.data.inputs["u"]
    assert isinstance(u, cal.PiecewiseConstant)
    np.testing.assert_allclose(np.asarray(u.times), [[0, 3], [0, 0]])
    np.testing.assert_allclose(np.asarray(u.values), [[1, 0], [2, 2]])


@pytest.mark.parametrize("name, expected", [("bfgs", "QuasiNewton"), ("bhhh", "BHHH"),
                                            ("adam", "FirstOrder")])
def test_optimiser_setting_builds_the_outer_optimiser(tmp_path, name, expected):
    toml = GOOD + f'\n[population]\noptimiser = "{name}"\nmax_steps = 7\n'
    outer = cal.load_problem(write_problem(tmp_path, toml)).population_arguments()["outer"]
    assert type(outer).__name__ == expected
    assert getattr(outer, "max_steps", getattr(outer, "steps", None)) == 7


def test_bounds_scale_and_start_override_the_model(tmp_path):
    toml = GOOD.replace('start = 1.0\nsd = 0.3', 'start = 1.0\nsd = 0.3\nlower = 0.1\n'
                        'upper = 20\nscale = "log10"')
    problem = cal.load_problem(write_problem(tmp_path, toml))
    p = problem.model.parameter_space["p"]
    assert (p.lower, p.upper, p.scale, p.default) == (0.1, 20.0, "log10", 1.0)
    assert problem.model.name == "Reference"


@pytest.mark.parametrize(
    "edit, fragments",
    [
        (lambda t: t.replace('model = "reference"', 'model = "referense"'),
         ["problem.toml, model", "did you mean 'reference'"]),
        (lambda t: t.replace('model = "reference"\n', ''),
         ["problem.toml, model", "missing"]),
        (lambda t: t.replace('measurements = "measurements.csv"\n', ''),
         ["problem.toml, measurements", "missing"]),
        (lambda t: t.replace('seed = 3', 'sed = 3'),
         ["problem.toml, sed", "did you mean 'seed'"]),
        (lambda t: t.replace('seed = 3', 'seed = -1'),
         ["problem.toml, seed", "non-negative integer"]),
        (lambda t: t.replace('role = "random"\nstart = 1.0\nsd', 'role = "randm"\nstart = 1.0\nsd'),
         ["parameters.p.role", "did you mean 'random'"]),
        (lambda t: t + '\n[parameters.k]\nrole = "fixed"\n',
         ["parameters.k", "no parameter 'k'"]),
        (lambda t: t.replace('sd = 0.3', 'sd = 0.3\nlower = 5\nupper = 2'),
         ["parameters.p", "lower bound 5.0 is not below upper bound 2.0"]),
        (lambda t: t.replace('start = 1.0\nsd = 0.3', 'start = 5000.0\nsd = 0.3'),
         ["parameters.p", "start 5000.0 lies outside its bounds"]),
        (lambda t: t.replace('sd = 0.3', 'sd = -0.3'), ["parameters.p.sd", "positive"]),
        (lambda t: t.replace('sd = 0.3', 'sd = "wide"'), ["parameters.p.sd", "not a number"]),
        (lambda t: t.replace('sd = 0.3', 'sd = 0.3\nlowr = 1'),
         ["parameters.p.lowr", "did you mean 'lower'"]),
        (lambda t: t + '\n[population]\nobjective = "laplase"\n',
         ["population.objective", "did you mean 'laplace'"]),
        (lambda t: t + '\n[population]\nmax_steps = 0\n',
         ["population.max_steps", "positive integer"]),
        (lambda t: t + '\n[population]\nholdout = 1.5\n',
         ["population.holdout", "between 0 and 1"]),
        (lambda t: t + '\n[population]\npenalty = "l2"\n',
         ["population.penalty", "held-out data"]),
        (lambda t: t + '\n[population]\nobjective = "validation"\noptimiser = "bhhh"\n',
         ["population.optimiser", "laplace"]),
        (lambda t: t + '\n[ode]\nrtol = -1\n', ["ode.rtol", "positive number"]),
        (lambda t: t + '\n[ode]\nsolver = "tsit"\n', ["ode.solver", "did you mean 'tsit5'"]),
        (lambda t: t + '\n[sensitivity]\nmethod = "discrete-adjoint"\n',
         ["sensitivity.method", "ForwardMode"]),
        (lambda t: t + '\n[individual]\nstarts = 4\n', ["individual", "hierarchical"]),
        (lambda t: t.replace('role = "random"', 'role = "constant"'),
         ["parameters", "nothing varies"]),
        (lambda t: t.replace('[parameters.q]\nrole = "random"', '[parameters.q]\nrole = "individual"')
         .replace('role = "random"', 'role = "individual"') + '\n[population]\n',
         ["population", "no parameter is random or fixed"]),
        (lambda t: t + "\nthis is not toml", ["problem.toml", "not valid TOML"]),
    ],
)
def test_problem_file_errors(tmp_path, edit, fragments):
    messages = issues_of(write_problem(tmp_path, edit(GOOD)))
    assert messages, "expected a problem"
    text = "\n".join(messages)
    for fragment in fragments:
        assert fragment in text, (fragment, text)


@pytest.mark.parametrize(
    "conditions, fragments",
    [
        ("individual,input,time,value\na,u,0,1\n", ["conditions.csv", "individual 'b' has "
                                                   "measurements but no conditions"]),
        (CONDITIONS + "c,u,0,1\n", ["conditions.csv, row 5, column 'individual'",
                                    "'c' has no measurements"]),
        (CONDITIONS + "b,v,0,1\n", ["row 5, column 'input'", "unknown input 'v'"]),
        (CONDITIONS + "b,u,x,1\n", ["row 5, column 'time'", "'x' is not a number"]),
        (CONDITIONS + "b,u,4,inf\n", ["row 5, column 'value'", "not finite"]),
        (CONDITIONS + "b,u,-1,1\n", ["row 5, column 'time'", "before the model's t0"]),
        (CONDITIONS + "b,u,0,3\n", ["row 5", "already changes at time 0 (row 4)"]),
        ("individual,input,time\na,u,0\n", ["missing column 'value'"]),
        ("patient,input,time,value\na,u,0,1\n", ["missing required column 'individual'"]),
        ("individual,u\na,1\nb,\n", ["row 3, column 'u'", "empty or NaN"]),
        ("individual,u\na,1\na,2\nb,1\n", ["row 3", "already has a row (row 2)"]),
        ("individual,dose\na,1\nb,1\n", ["column 'dose'", "model Reference has inputs u"]),
        ("", ["conditions.csv", "empty"]),
    ],
)
def test_conditions_errors(tmp_path, conditions, fragments):
    messages = issues_of(write_problem(tmp_path, conditions=conditions))
    text = "\n".join(messages)
    for fragment in fragments:
        assert fragment in text, (fragment, text)


def test_every_problem_at_once(tmp_path):
    """Problems in the file, the measurements and the conditions, all in one report."""
    toml = GOOD.replace("seed = 3", "seed = 3\ncolour = 1").replace("sd = 0.3", "sd = -1")
    path = write_problem(tmp_path, toml,
                         measurements="individual,time,observable,value\na,1,x,1\na,x,y,2\n",
                         conditions="individual,input,time,value\na,w,0,1\n")
    text = "\n".join(issues_of(path))
    for fragment in ["colour", "parameters.p.sd", "measurements.csv, row 3, column 'time'",
                     "measurements.csv, row 3, column 'observable'",
                     "conditions.csv, row 2, column 'input'"]:
        assert fragment in text, (fragment, text)


def test_missing_problem_and_data_files(tmp_path):
    assert "problem file not found" in issues_of(tmp_path / "none.toml")[0]
    path = write_problem(tmp_path, measurements=None)
    assert any("measurements.csv: file not found" in m for m in issues_of(path))


def test_model_from_a_file_relative_to_the_problem(tmp_path):
    shutil.copy(ROOT / "models" / "reference.py", tmp_path / "mymodel.py")
    path = write_problem(tmp_path, GOOD.replace('"reference"', '"mymodel.py:Reference"'))
    assert cal.load_problem(path).model.name == "Reference"
    (tmp_path / "broken.py").write_text("import calibrate\nraise RuntimeError('boom')\n")
    path = write_problem(tmp_path, GOOD.replace('"reference"', '"broken.py:Reference"'))
    text = "\n".join(issues_of(path))
    assert "broken.py, line 2" in text and "boom" in text


def test_wide_conditions_and_defaults(tmp_path):
    problem = cal.load_problem(write_problem(tmp_path, conditions="individual,u\nb,2\na,0.5\n"))
    u = problem.data.inputs["u"]
    assert isinstance(u, cal.Constant)
    np.testing.assert_allclose(np.asarray(u.value), [0.5, 2.0])  # measurement order
    # No conditions: every individual gets the model's default step input.
    toml = GOOD.replace('conditions = "conditions.csv"\n', "")
    problem = cal.load_problem(write_problem(tmp_path, toml, conditions=None))
    assert problem.data.inputs is None


def test_predictions_follow_each_individuals_schedule():
    """The dosing example at its true parameters: predictions equal the closed form
    x(t) = q e^{-t} + p d (1 - e^{-min(t, t_stop)}) e^{-(t - t_stop)_+}."""
    problem = cal.load_problem(DOSING / "problem.toml")
    conditions = pd.read_csv(DOSING / "conditions.csv")
    n = len(problem.data)
    rng = np.random.default_rng(0)
    p, q = 1.5 * np.exp(0.2 * rng.normal(size=n)), 2 + 0.3 * rng.normal(size=n)
    frame = cal.predictions_frame(problem.model, problem.data, {"p": p, "q": q},
                                  integrator=cal.Integrator(rtol=1e-10, atol=1e-12))
    assert len(frame) == int(np.sum(np.asarray(problem.data.measurements.mask)))
    assert (frame["status"] == "successful").all()
    for i, ind in enumerate(problem.data.individuals):
        rows = frame[frame.individual == ind]
        schedule = conditions[conditions.individual == ind].sort_values("time")
        dose, stop = schedule["value"].iloc[0], schedule["time"].iloc[1]
        t = rows["time"].to_numpy()
        plateau = p[i] * dose * (1 - np.exp(-np.minimum(t, stop)))
        exact = q[i] * np.exp(-t) + plateau * np.exp(-np.maximum(t - stop, 0))
        np.testing.assert_allclose(rows["predicted"], exact, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(rows["weighted_residual"],
                                   (rows["observed"] - exact) / 0.05, rtol=1e-5, atol=1e-5)


def test_check_command(tmp_path):
    result = runner.invoke(app, ["check", str(DOSING / "problem.toml")])
    assert result.exit_code == 0, result.output
    assert "valid; hierarchical" in result.stdout and "12 individual(s)" in result.stdout
    bad = write_problem(tmp_path, GOOD.replace("sd = 0.3", "sd = -1"),
                        conditions=CONDITIONS + "c,u,0,1\n")
    result = runner.invoke(app, ["check", str(bad)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines)
    assert "Traceback" not in result.stderr


def test_fit_problem_rejects_mixed_arguments(tmp_path):
    path = DOSING / "problem.toml"
    result = runner.invoke(app, ["fit", str(path), "data.csv", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "names its data itself" in result.stderr
    result = runner.invoke(app, ["fit", str(path), "--starts", "3", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--starts" in result.stderr
    result = runner.invoke(app, ["fit", "reference", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "give the measurements file" in result.stderr


# --------------------------------------------------------------------------------------
# `calibrate fit PROBLEM.toml` end to end on the bundled hierarchical example

# Sample values of the twelve subjects drawn by examples/dosing/make_data.py: the
# geometric mean of p and the mean of q are what the population means estimate.
DOSING_P = [1.6093, 1.4862, 1.7225, 1.599, 1.1193, 1.3154, 1.4051, 1.5924, 1.2952,
            1.2906, 1.3673, 1.0498]
DOSING_Q = [1.6537, 2.1844, 2.3354, 1.7071, 1.6912, 2.2748, 2.4281, 2.3967, 2.3117,
            1.4508, 1.7629, 2.1322]


@pytest.fixture(scope="module")
def dosing_runs(tmp_path_factory):
    """The example fitted twice: straight through, and with Ctrl-C during outer step 5
    (after the checkpoint of step 4) followed by `--resume`. The second run reuses the
    first's compiled functions."""
    import calibrate.cli as cli

    outs = [tmp_path_factory.mktemp("dosing") for _ in range(2)]
    args = lambda out: ["fit", str(DOSING / "problem.toml"), "--out", str(out)]
    straight = runner.invoke(app, args(outs[0]))
    (outs[1] / "notes.txt").write_text("kept")
    original = cli._progress

    class InterruptedProgress(type(original())):
        def update(self, task, **kwargs):
            if kwargs.get("completed") == 5:
                raise KeyboardInterrupt
            super().update(task, **kwargs)

    cli._progress = lambda: InterruptedProgress(console=cli._stderr())
    try:
        interrupted = runner.invoke(app, args(outs[1]))
    finally:
        cli._progress = original
    files_after_interrupt = sorted(p.name for p in outs[1].iterdir())
    resumed = runner.invoke(app, [*args(outs[1]), "--resume"])
    return outs, (straight, interrupted, resumed), files_after_interrupt


def test_fit_problem_recovers_the_dosing_population(dosing_runs):
    (out, _), (result, _, _), _ = dosing_runs
    assert result.exit_code == 0, (result.output, result.exception)
    population = pd.read_csv(out / "population.csv")
    row = lambda name, kind: population[(population.parameter == name)
                                        & (population.kind == kind)].iloc[0]
    # Population means within 2 standard errors of the sample's values.
    mean_log_p = row("p", "mean_scaled")
    assert abs(mean_log_p.estimate - np.mean(np.log(DOSING_P))) < 2 * mean_log_p.se
    mean_q = row("q", "mean")
    assert abs(mean_q.estimate - np.mean(DOSING_Q)) < 2 * mean_q.se
    # Spreads within 2.5 standard errors of the sample spreads (sd of an sd: ω/√(2N)).
    for name, sample in (("p", np.std(np.log(DOSING_P), ddof=1)),
                         ("q", np.std(DOSING_Q, ddof=1))):
        sd = row(name, "sd")
        assert abs(sd.estimate - sample) < 2.5 * sd.se, (name, sd.estimate, sample, sd.se)
    report = json.loads((out / "population.json").read_text())
    assert report["converged"] and report["n_successful"] == report["n_stationary"] == 12
    assert 0.0 <= report["score_decrement"] < 1e-2  # no "stopped short" warning
    assert report["aic"] == pytest.approx(report["minus_two_log_likelihood"] + 2 * 4)
    # Individual estimates follow the subjects' true values.
    individuals = pd.read_csv(out / "individuals.csv")
    assert list(individuals.individual) == [f"subject{i:02d}" for i in range(1, 13)]
    assert np.corrcoef(individuals.q, DOSING_Q)[0, 1] > 0.9
    assert np.corrcoef(np.log(individuals.p), np.log(DOSING_P))[0, 1] > 0.9
    # Predictions sit next to every observation, with residuals of the noise's size.
    predictions = pd.read_csv(out / "predictions.csv")
    assert len(predictions) == 240
    assert 0.7 < np.std(predictions.weighted_residual) < 1.3
    diagnostics = pd.read_csv(out / "diagnostics.csv")
    assert diagnostics.stationary.all()
    history = pd.read_csv(out / "history.csv")
    assert history.objective.iloc[-1] < history.objective.iloc[0]
    run = json.loads((out / "run.json").read_text())
    assert run["seed"] == 0 and run["settings"]["population"]["objective"] == "laplace"
    assert run["files"]["conditions"]["sha256"] and run["versions"]["jax"]
    assert "population.csv" in run["outputs"]
    # Plots and the report that gathers them.
    for name in ("fits.png", "observed_vs_predicted.png", "residuals.png", "convergence.png",
                 "parameters.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"src='{name}'" in (out / "report.html").read_text()
        assert name in run["outputs"]
    page = (out / "report.html").read_text()
    assert f"{mean_q.estimate:.6g}" in page and "subject12" in page


def test_interrupted_fit_resumes_to_the_uninterrupted_result(dosing_runs):
    """Same inputs and seed: the interrupted-and-resumed run writes the same files,
    byte for byte, as the run that went straight through."""
    outs, (straight, interrupted, resumed), files_after_interrupt = dosing_runs
    assert straight.exit_code == 0
    assert interrupted.exit_code == 130, interrupted.output
    assert "after outer step 4" in interrupted.stderr and "--resume" in interrupted.stderr
    assert files_after_interrupt == ["checkpoint.bin", "notes.txt"]
    assert resumed.exit_code == 0, (resumed.output, resumed.exception)
    for name in ("population.csv", "individuals.csv", "predictions.csv", "history.csv",
                 "diagnostics.csv"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    assert json.loads((outs[1] / "run.json").read_text())["resumed"] is True
    assert (outs[1] / "notes.txt").read_text() == "kept"
    assert not (outs[1] / "checkpoint.bin").exists()  # finished: nothing left to resume
    again = runner.invoke(app, ["fit", str(DOSING / "problem.toml"), "--out", str(outs[1]),
                                "--resume"])
    assert again.exit_code == 2 and "no checkpoint to resume from" in again.stderr


def test_fit_problem_without_hierarchy_fits_each_individual(tmp_path):
    """The dosing data with p and q per subject (no population model)."""
    for name in ("measurements.csv", "conditions.csv"):
        shutil.copy(DOSING / name, tmp_path / name)
    toml = GOOD.replace('role = "random"', 'role = "individual"').replace("sd = 0.3\n", "")
    path = write_problem(tmp_path, toml + "\n[individual]\nmax_steps = 100\n",
                         measurements=None, conditions=None)
    out = tmp_path / "out"
    result = runner.invoke(app, ["fit", str(path), "--out", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    estimates = pd.read_csv(out / "parameters.csv")
    assert (estimates.status == "successful").all()
    # Every subject's estimates within 3.5 standard errors of its true values (the
    # error of p is on its log scale).
    assert np.all(np.abs(estimates.q - DOSING_Q) < 3.5 * estimates.se_q), estimates
    assert np.all(np.abs(np.log(estimates.p / DOSING_P)) < 3.5 * estimates.se_p), estimates
    assert np.all(estimates.se_q < 0.2) and np.all(estimates.se_p < 0.2)
    predictions = pd.read_csv(out / "predictions.csv")
    assert len(predictions) == 240 and 0.7 < np.std(predictions.weighted_residual) < 1.3
    run = json.loads((out / "run.json").read_text())
    assert {"parameters.csv", "fits.png", "report.html"} <= set(run["outputs"])
    assert (out / "fits.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "convergence.png").exists()


def test_checkpoint_of_another_problem_is_refused(tmp_path):
    checkpoint = cal.Checkpoint(tmp_path / "c.bin", fingerprint="a")
    checkpoint.save(3, {"x": jnp.ones(2)}, {"y": jnp.zeros(1)}, {"scale": 0.5})
    assert checkpoint.meta()["step"] == 3 and checkpoint.meta()["scale"] == 0.5
    np.testing.assert_array_equal(checkpoint.position({"x": jnp.zeros(2)})["x"], [1, 1])
    with pytest.raises(cal.CheckpointError, match="another problem"):
        cal.Checkpoint(tmp_path / "c.bin", fingerprint="b").meta()
    (tmp_path / "c.bin").write_bytes((tmp_path / "c.bin").read_bytes()[:-3])
    with pytest.raises(cal.CheckpointError, match="truncated"):
        checkpoint.meta()


# --------------------------------------------------------------------------------------
# Property-based: malformed conditions tables and problem files never crash the loader

REFERENCE_MODEL = cal.zoo_model("reference")
_CELLS = st.one_of(st.sampled_from(["", "nan", "inf", "-1", "0", "2.5", "x", "1e400"]),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr))


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.tuples(st.sampled_from(["a", "b", "c", ""]),
                               st.sampled_from(["u", "v", ""]), _CELLS, _CELLS),
                     max_size=6),
       columns=st.permutations(["individual", "input", "time", "value"]))
def test_conditions_loader_reports_or_accepts_any_table(rows, columns):
    frame = pd.DataFrame(rows, columns=["individual", "input", "time", "value"])[columns]
    try:
        inputs = cal.conditions_from_frame(frame, REFERENCE_MODEL, ["a", "b"],
                                           source="c.csv")
    except cal.DataError as error:
        assert error.issues
        for issue in error.issues:
            assert issue.file == "c.csv" and issue.message
            assert issue.row is not None or issue.column is not None or not rows
    else:
        assert np.asarray(inputs["u"].times).shape[0] == 2
        assert np.all(np.isfinite(np.asarray(inputs["u"].values)))


_TOML_VALUES = st.one_of(st.integers(-3, 5).map(str), st.sampled_from(
    ['"laplace"', '"bfgs"', '"random"', '"x"', "true", "0.5", "-1.0", "1e-8", '""',
     "[1, 2]", "{ role = \"fixed\" }", "nan", "inf"]))
_TOML_KEYS = st.sampled_from(
    ["seed", "population.objective", "population.max_steps", "population.holdout",
     "population.penalty", "ode.rtol", "ode.max_steps", "parameters.p.role",
     "parameters.p.start", "parameters.p.sd", "parameters.q.lower", "parameters.q.upper",
     "parameters.q.scale", "parameters.z.role", "hypergradient.linear_solver",
     "sensitivity.method", "individual.starts", "colour", "inner.max_steps"])


@settings(max_examples=60, deadline=None)
@given(entries=st.dictionaries(_TOML_KEYS, _TOML_VALUES, max_size=6))
def test_problem_loader_reports_or_accepts_any_settings(tmp_path_factory, entries):
    directory = tmp_path_factory.mktemp("problem")
    lines = ['model = "reference"', 'measurements = "measurements.csv"']
    tables: dict[str, list[str]] = {}
    for key, value in entries.items():
        table, _, name = key.rpartition(".")
        if table:
            tables.setdefault(table, []).append(f"{name} = {value}")
        else:
            lines.append(f"{name} = {value}")
    for table, body in tables.items():
        lines += [f"[{table}]", *body]
    path = write_problem(directory, "\n".join(lines) + "\n", conditions=None)
    try:
        problem = cal.load_problem(path)
    except cal.DataError as error:
        assert error.issues and all(i.message for i in error.issues)
        assert all(i.file.endswith(("problem.toml", ".csv")) for i in error.issues)
    else:
        assert set(problem.roles) == {"p", "q"}
        assert problem.hierarchical or problem.fit_arguments()["estimate"]


def test_simulate_problem_uses_each_individuals_conditions():
    result = runner.invoke(app, ["simulate", str(DOSING / "problem.toml"), "--param", "p=2",
                                 "--times", "0:10:5", "--no-states"])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(io.StringIO(result.stdout))
    assert list(frame.columns) == ["individual", "time", "kind", "name", "value"]
    conditions = pd.read_csv(DOSING / "conditions.csv")
    for ind in ("subject01", "subject12"):
        schedule = conditions[conditions.individual == ind].sort_values("time")
        dose, stop = schedule["value"].iloc[0], schedule["time"].iloc[1]
        t = np.linspace(0, 10, 5)
        exact = 1.0 * np.exp(-t) + 2 * dose * (1 - np.exp(-np.minimum(t, stop))) * np.exp(
            -np.maximum(t - stop, 0))  # q starts at 1 in the problem file
        np.testing.assert_allclose(frame[frame.individual == ind]["value"], exact,
                                   rtol=1e-6, atol=1e-8)


def test_ode_settings_build_the_integrator(tmp_path):
    import diffrax

    toml = GOOD + '\n[ode]\nsolver = "tsit5"\nrtol = 1e-6\natol = 1e-9\nmax_steps = 500\n'
    integrator = cal.load_problem(write_problem(tmp_path, toml)).integrator
    assert isinstance(integrator.solver, diffrax.Tsit5)
    assert (integrator.rtol, integrator.atol, integrator.max_steps) == (1e-6, 1e-9, 500)
    assert integrator.settings() == {"solver": "Tsit5", "rtol": 1e-6, "atol": 1e-9,
                                     "max_steps": 500}
    toml = GOOD + '\n[ode]\nsolver = "kvaerno5"\nrtol = 1e-7\n'
    integrator = cal.load_problem(write_problem(tmp_path, toml)).integrator
    assert integrator.settings()["solver"] == "Kvaerno5 (chord Newton)"
    # The chord iterations stop at 1% of the step tolerances.
    assert integrator.solver.root_finder.rtol == 1e-9
    assert cal.Integrator().settings()["solver"] == "Rodas5"

"""The `calibrate` command line (calibrate/cli.py) and atomic writers (calibrate/_io.py).

JAX compilations are the cost here: every fit test shares one fit of the reference
model on one dataset shape (the `fitted` fixture); error cases fail before any solve.
"""

import io
import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import calibrate as cal
from calibrate._io import (
    to_jsonable,
    write_csv_atomic,
    write_json_atomic,
    write_text_atomic,
)
from calibrate.cli import CLIError, app, parse_assignments, parse_times


runner = CliRunner()
TRUTH = {"p": 1.5, "q": 2.0}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_input_error(result, *fragments):
    """Exit status 2, messages on stderr only, no traceback, each fragment present."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)
    return result.stderr.strip().splitlines()


# --------------------------------------------------------------------------------------
# models, help


def test_models_lists_the_zoo():
    result = invoke("models")
    assert result.exit_code == 0, result.output
    for name in cal.zoo_names():
        assert name in result.stdout
    assert {"enzyme_kinetics", "mapk_cascade", "reference"} <= set(cal.zoo_names())
    assert "kcat" in result.stdout and "RAFp" in result.stdout
    # The 33 parameters of the signalling chain are summarised, not listed.
    assert "(33)" in result.stdout and "Kd5" not in result.stdout


@pytest.mark.parametrize("command", ["models", "simulate", "fit", "check"])
def test_help_has_an_example(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert "Example" in result.stdout
    assert f"calibrate {command}" in result.stdout


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert cal.__version__ in result.stdout


# --------------------------------------------------------------------------------------
# simulate


def test_simulate_reference_matches_closed_form_on_stdout():
    module = cal.zoo_module("reference")
    result = invoke("simulate", "reference")
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(io.StringIO(result.stdout))
    assert list(frame.columns) == ["time", "kind", "name", "value"]
    assert set(frame["kind"]) == {"observable", "state"}
    for kind in ("observable", "state"):
        rows = frame[(frame["kind"] == kind) & (frame["name"] == "x")]
        np.testing.assert_allclose(rows["time"], np.asarray(module.OBSERVATION_TIMES))
        expected = module.closed_form(rows["time"].to_numpy(), **TRUTH)
        np.testing.assert_allclose(rows["value"], expected, rtol=0, atol=1e-6)


def test_simulate_with_params_and_times_to_file(tmp_path):
    module = cal.zoo_module("reference")
    out = tmp_path / "sub" / "x.csv"
    result = invoke("simulate", "reference", "--param", "p=0.7", "-p", "q=3",
                    "--times", "0:10:41", "--no-states", "--out", out)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    frame = pd.read_csv(out)
    assert set(frame["kind"]) == {"observable"}
    np.testing.assert_allclose(frame["time"], np.linspace(0, 10, 41))
    expected = module.closed_form(frame["time"].to_numpy(), p=0.7, q=3.0)
    np.testing.assert_allclose(frame["value"], expected, rtol=0, atol=1e-6)
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.csv"]  # no temp files


MODEL_FILE = textwrap.dedent(
    '''
    import jax.numpy as jnp
    import calibrate as cal


    class Decay(cal.AbstractODEModel):
        """x' = -k x, x(0) = 1."""

        states = ("x",)
        parameters = (cal.Parameter("k", 1.0, 1e-3, 1e3, scale="log"),)
        observables = (cal.Observable("x", cal.Gaussian(0.1)),)
        inputs = ()
        t0 = 0.0

        def rhs(self, t, x, params, inputs):
            return -params["k"] * x

        def initial_state(self, params):
            return jnp.ones(1)

        def observe(self, t, x, params):
            return x
    '''
)


def test_simulate_model_from_file(tmp_path):
    path = tmp_path / "decay.py"
    path.write_text(MODEL_FILE)
    result = invoke("simulate", f"{path}:Decay", "--param", "k=2", "--times", "0,0.5,1,3")
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(io.StringIO(result.stdout))
    x = frame[frame["kind"] == "observable"]
    np.testing.assert_allclose(x["value"], np.exp(-2 * x["time"]), atol=1e-6)


def test_model_file_errors(tmp_path):
    path = tmp_path / "decay.py"
    path.write_text(MODEL_FILE)
    assert_input_error(invoke("simulate", f"{path}:Decai"), "no class 'Decai'", "Decay")
    broken = tmp_path / "broken.py"
    broken.write_text("import calibrate\n\nraise RuntimeError('boom')\n")
    lines = assert_input_error(invoke("simulate", f"{broken}:Model"), "line 3", "boom")
    assert len(lines) == 1
    assert_input_error(invoke("simulate", f"{tmp_path / 'nope.py'}:Model"), "not found")
    # A file without OBSERVATION_TIMES needs --times.
    assert_input_error(invoke("simulate", str(path)), "--times")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--param", "p1.5"], ["--param 'p1.5'", "NAME=VALUE"]),
        (["--param", "p=abc"], ["'abc' is not a number"]),
        (["--param", "z=1"], ["no parameter 'z'", "p, q"]),
        (["--param", "p=-1"], ["'p'", "bounds"]),
        (["--times", "0:10"], ["--times '0:10'", "START:STOP:N"]),
        (["--times", "3,1"], ["non-decreasing"]),
        (["--rtol", "0"], ["--rtol"]),
    ],
)
def test_simulate_bad_options(args, fragments):
    lines = assert_input_error(invoke("simulate", "reference", *args), *fragments)
    assert len(lines) == 1


def test_unknown_zoo_model():
    lines = assert_input_error(invoke("simulate", "refrence"), "refrence", "reference")
    assert len(lines) == 1


# --------------------------------------------------------------------------------------
# fit


@pytest.fixture(scope="module")
def reference_csv(tmp_path_factory):
    """Two individuals of the reference model at the true parameters."""
    dataset = cal.zoo_module("reference").synthetic_data(jax.random.key(7), n_individuals=2)
    path = tmp_path_factory.mktemp("data") / "reference.csv"
    dataset.to_frame().to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def fitted(reference_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit") / "results"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    result = invoke("fit", "reference", reference_csv, "--out", out)
    return result, out


def test_fit_writes_parameters(fitted):
    result, out = fitted
    assert result.exit_code == 0, (result.output, result.exception)
    assert "successful" in result.stdout
    assert "2 of 2 fits successful" in result.stderr
    frame = pd.read_csv(out / "parameters.csv")
    assert list(frame["individual"]) == ["ind0000", "ind0001"]
    assert list(frame["status"]) == ["successful"] * 2
    space = cal.zoo_model("reference").parameter_space
    for name, truth in TRUTH.items():
        p = space[name]
        error = np.asarray(p.to_scaled(frame[name].to_numpy())) - float(p.to_scaled(truth))
        assert np.all(np.abs(error) < 5 * frame[f"se_{name}"]), (name, frame)

    report = json.loads((out / "parameters.json").read_text())
    assert report["model"] == "Reference"
    assert report["estimated"] == ["p", "q"]
    assert report["calibrate_version"] == cal.__version__
    assert report["settings"]["starts"] == 0
    assert report["scales"] == {"p": "log", "q": "lin"}
    assert len(report["individuals"]) == 2
    for row, entry in zip(frame.itertuples(), report["individuals"]):
        assert entry["individual"] == row.individual
        assert entry["status"] == "successful" and entry["message"] == "ok"
        assert set(entry) >= {"estimates", "standard_errors", "loss", "grad_norm", "steps"}
        assert math.isclose(entry["estimates"]["p"], row.p, rel_tol=1e-12)
        assert math.isclose(entry["standard_errors"]["q"], row.se_q, rel_tol=1e-12)


def test_fit_leaves_other_files_alone(fitted):
    _, out = fitted
    assert (out / "notes.txt").read_text() == "keep me\n"
    assert sorted(p.name for p in out.iterdir()) == [
        "notes.txt", "parameters.csv", "parameters.json"
    ]


def test_fit_non_numeric_time(tmp_path):
    data = tmp_path / "bad.csv"
    data.write_text("individual,time,observable,value\nA,0.5,x,1.0\nA,abc,x,1.2\n")
    out = tmp_path / "out"
    lines = assert_input_error(
        invoke("fit", "reference", data, "--out", out), "bad.csv", "row 3", "time", "abc"
    )
    assert len(lines) == 1
    assert not out.exists()  # validated before anything is created


def test_fit_missing_column(tmp_path):
    data = tmp_path / "missing.csv"
    data.write_text("individual,observable,value\nA,x,1.0\n")
    assert_input_error(invoke("fit", "reference", data, "--out", tmp_path / "out"),
                       "missing.csv", "'time'")


def test_fit_reports_every_problem_one_per_line(tmp_path):
    data = tmp_path / "bad.csv"
    data.write_text("individual,time,observable,value\nA,-1,x,1\nA,2,y,1\nA,3,x,\n")
    lines = assert_input_error(invoke("fit", "reference", data, "--out", tmp_path / "o"),
                               "row 2", "row 3", "row 4")
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines)


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--estimate", "p,z"], ["--estimate z", "no parameter 'z'"]),
        (["--fix", "p"], ["--fix 'p'", "NAME=VALUE"]),
        (["--fix", "p=1", "--estimate", "p"], ["p is given both"]),
        (["--fix", "p=1,q=2"], ["nothing to estimate"]),
    ],
)
def test_fit_bad_options(reference_csv, tmp_path, args, fragments):
    result = invoke("fit", "reference", reference_csv, "--out", tmp_path / "o", *args)
    assert_input_error(result, *fragments)


def test_fit_missing_data_and_bad_out(reference_csv, tmp_path):
    assert_input_error(invoke("fit", "reference", tmp_path / "none.csv", "--out", tmp_path),
                       "none.csv", "not found")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    assert_input_error(invoke("fit", "reference", reference_csv, "--out", not_a_dir),
                       "not a directory")


def test_console_script_exit_code_and_no_traceback(tmp_path):
    """The real entry point (not CliRunner): status 2 and one clean line."""
    run = subprocess.run(
        [sys.executable, "-m", "calibrate.cli", "simulate", "reference", "--param", "p"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 2
    assert run.stdout == ""
    assert run.stderr.strip().splitlines() == [
        "error: --param 'p': expected NAME=VALUE (e.g. --param kf=2.0)"
    ]


def test_console_script_splits_individuals_over_cpu_devices(fitted, reference_csv,
                                                            tmp_path):
    """`CALIBRATE_CPU_DEVICES=2`: the console script makes two CPU devices and splits
    the individuals over them, with the one-device fit's numbers; a count that is not
    a positive integer is refused before anything runs."""
    from conftest import _CACHE

    env = {**os.environ, "CALIBRATE_CPU_DEVICES": "2", "CALIBRATE_CACHE_DIR": str(_CACHE)}
    run = subprocess.run(
        [sys.executable, "-m", "calibrate.cli", "fit", "reference", str(reference_csv),
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "parameters.json").read_text())
    assert report["devices"] == ["cpu:0", "cpu:1"]
    one_device = pd.read_csv(fitted[1] / "parameters.csv")
    two_devices = pd.read_csv(tmp_path / "parameters.csv")
    for column in ("p", "q", "se_p", "se_q", "loss"):
        np.testing.assert_allclose(two_devices[column], one_device[column], rtol=1e-8)
    for bad in ("0", "two"):
        run = subprocess.run(
            [sys.executable, "-m", "calibrate.cli", "simulate", "reference"],
            capture_output=True, text=True, timeout=300,
            env={**env, "CALIBRATE_CPU_DEVICES": bad})
        assert run.returncode == 2 and run.stdout == ""
        assert run.stderr.strip().splitlines() == [
            f"error: CALIBRATE_CPU_DEVICES='{bad}': expected a positive integer (CPU "
            "devices to split the individuals over)"]


# --------------------------------------------------------------------------------------
# option parsing and atomic writes (no JAX)


def test_parse_times_and_assignments():
    np.testing.assert_allclose(parse_times("0:10:5"), [0, 2.5, 5, 7.5, 10])
    np.testing.assert_allclose(parse_times(" 0, 1.5 ,2 "), [0, 1.5, 2])
    np.testing.assert_allclose(parse_times("3:3:1"), [3])
    for bad in ("", "a,b", "0:1:0", "1:0:3", "0:1:2.5", "1,nan", "-1,2"):
        with pytest.raises(CLIError):
            parse_times(bad)
    assert parse_assignments(["a=1", "b=2e-3, c = 4"], "--param") == {
        "a": 1.0, "b": 2e-3, "c": 4.0
    }
    with pytest.raises(CLIError) as info:
        parse_assignments(["a=1", "a=2", "b", "=3", "1x=2", "c=inf"], "--fix")
    assert len(info.value.messages) == 5


def test_atomic_writers(tmp_path):
    target = tmp_path / "new" / "a.txt"
    write_text_atomic(target, "one")
    write_text_atomic(target, "two")
    assert target.read_text() == "two"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask

    frame = pd.DataFrame({"a": [1.0, 1 / 3], "b": ["x", "y"]})
    write_csv_atomic(tmp_path / "f.csv", frame)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "f.csv"), frame)

    obj = {"inf": np.inf, "arr": np.array([1.0, np.nan]), "n": np.int64(3),
           "b": np.bool_(True), "jax": jax.numpy.float64(2.5), "t": (1, "s")}
    write_json_atomic(tmp_path / "o.json", obj)
    assert json.loads((tmp_path / "o.json").read_text()) == {
        "inf": None, "arr": [1.0, None], "n": 3, "b": True, "jax": 2.5, "t": [1, "s"]
    }
    with pytest.raises(TypeError):
        to_jsonable(object())
    with pytest.raises(IsADirectoryError):
        write_text_atomic(tmp_path / "new", "x")
    assert sorted(p.name for p in tmp_path.rglob("*")) == [
        "a.txt", "f.csv", "new", "o.json"
    ]

"""Shared test helpers."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np


def central_difference_gradient(fn, x, step=1e-5):
    """Central finite differences of scalar `fn` at `x`, h = step * max(1, |x_i|).

    Truncation error is O(h^2 f'''), round-off O(eps |f| / h): with float64 and
    h ~ 1e-5 both are ~1e-10 relative, well below the 1e-5 the tests ask for, as long
    as the ODE is solved to ~1e-10 (noise in the solve enters as tol / h).
    """
    x = np.asarray(x, dtype=float)
    grad = np.zeros_like(x)
    for i in range(x.size):
        h = step * max(1.0, abs(x[i]))
        e = np.zeros_like(x)
        e[i] = h
        grad[i] = (float(fn(jnp.asarray(x + e))) - float(fn(jnp.asarray(x - e)))) / (2 * h)
    return grad


def first_individual(dataset):
    return jax.tree.map(lambda a: a[0], dataset.measurements)


def relative_error(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def invoke_cli(*args):
    """Run the `calibrate` command line in-process; arguments may be paths."""
    from typer.testing import CliRunner

    from calibrate.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def replace_once(path, old, new):
    """Replace the first `old` in the file at `path`, which must contain it."""
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def edited_copy(source, destination, edit=None, ignore=None):
    """Copy the problem folder `source` into `destination`, apply `edit(folder)` and
    return the copy's YAML file."""
    folder = destination / source.name
    shutil.copytree(source, folder, ignore=ignore)
    if edit is not None:
        edit(folder)
    (yaml,) = folder.glob("*.yaml")
    return yaml

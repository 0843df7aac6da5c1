"""The persistent compilation cache that `import calibrate` switches on."""

import json
import os
import subprocess
import sys

import pytest


# A fresh interpreter per case: the cache directory is settled at import. It reports the
# directory JAX was given and the files in it after compiling one function (every
# compile is cached here, however short).
_CHILD = """
import json, os, jax, jax.numpy as jnp
import calibrate
directory = jax.config.jax_compilation_cache_dir
jax.jit(lambda x: jnp.sin(x) * 3.0)(jnp.arange(4.0)).block_until_ready()
print(json.dumps({"directory": directory,
                  "entries": sorted(os.listdir(directory)) if directory else None}))
"""


def _child(tmp_path, **env) -> dict:
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("CALIBRATE_CACHE_DIR", "JAX_COMPILATION_CACHE_DIR")}
    environment.update(HOME=str(tmp_path / "home"),
                       JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                       JAX_PLATFORMS="cpu", **env)
    done = subprocess.run([sys.executable, "-c", _CHILD], env=environment,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "stderr": done.stderr}


@pytest.mark.parametrize("case", ["default", "calibrate_dir", "jax_dir", "both", "off",
                                  "unwritable_home", "unusable_calibrate_dir"])
def test_import_switches_the_persistent_cache_on_where_the_user_allows(tmp_path, case):
    home_cache = tmp_path / "home" / ".cache" / "calibrate" / "jax"
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    env, expected = {
        "default": ({}, home_cache),
        "calibrate_dir": ({"CALIBRATE_CACHE_DIR": str(ours)}, ours),
        "jax_dir": ({"JAX_COMPILATION_CACHE_DIR": str(theirs)}, theirs),
        "both": ({"CALIBRATE_CACHE_DIR": str(ours), "JAX_COMPILATION_CACHE_DIR": str(theirs)},
                 ours),
        "off": ({"CALIBRATE_CACHE_DIR": "off"}, None),
        "unwritable_home": ({}, None),
        "unusable_calibrate_dir": ({"CALIBRATE_CACHE_DIR": str(ours)}, None),
    }[case]
    if case in ("unwritable_home", "unusable_calibrate_dir"):
        blocker = tmp_path / ("home" if case == "unwritable_home" else "ours")
        blocker.write_text("a file where a directory should be")
    report = _child(tmp_path, **env)
    # Only a directory the user named is worth a warning.
    named = case == "unusable_calibrate_dir"
    assert (f"CALIBRATE_CACHE_DIR={str(ours)!r}: cannot create" in report["stderr"]) == named
    if expected is None:
        assert report["directory"] is None
        return
    assert report["directory"] == str(expected)
    # The compiled function landed in that directory.
    assert any(name.startswith("jit_") for name in report["entries"]), report["entries"]

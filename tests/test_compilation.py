"""What `import calibrate` switches on: the persistent compilation cache and XLA's
faster-compiling CPU emitters."""

import json
import math
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


# A fresh interpreter per case: XLA reads `XLA_FLAGS` once, at the first computation.
# `before` runs before `import calibrate`; the child reports the flags after it and
# checks that XLA, having read them, compiles and runs a function.
_FLAGS_CHILD = """
import json, os, sys
import jax, jax.numpy as jnp
exec(sys.argv[1])
import calibrate
flags = os.environ.get("XLA_FLAGS", "")
value = float(jax.jit(lambda x: jnp.sum(jnp.sin(x) * 3.0))(jnp.arange(4.0)))
print(json.dumps({"flags": flags, "value": value}))
"""


@pytest.mark.parametrize("case", ["default", "user_flag", "off", "backend_running",
                                  "unknown_setting"])
def test_import_prefers_the_faster_compiling_cpu_emitters_where_the_user_allows(case):
    from calibrate._compilation import CPU_EMITTER_FLAG, flag_is_known

    user = "--xla_cpu_use_fusion_emitters=true --xla_cpu_enable_fast_math=false"
    env, before, expected = {
        # Another jaxlib release than those measured keeps XLA's defaults.
        "default": ({}, "", CPU_EMITTER_FLAG if flag_is_known() else ""),
        "user_flag": ({"XLA_FLAGS": user}, "", user),
        "off": ({"CALIBRATE_XLA_FLAGS": "off"}, "", ""),
        # Flags set after XLA has read them would do nothing.
        "backend_running": ({}, "jnp.ones(2).block_until_ready()", ""),
        # A value other than on/off is named in a warning and taken as on.
        "unknown_setting": ({"CALIBRATE_XLA_FLAGS": "fast"}, "",
                            CPU_EMITTER_FLAG if flag_is_known() else ""),
    }[case]
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("XLA_FLAGS", "CALIBRATE_XLA_FLAGS")}
    environment.update(JAX_PLATFORMS="cpu", CALIBRATE_CACHE_DIR="off", **env)
    done = subprocess.run([sys.executable, "-c", _FLAGS_CHILD, before], env=environment,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["flags"] == expected
    warned = "CALIBRATE_XLA_FLAGS='fast': expected 'on' or 'off'" in done.stderr
    assert warned == (case == "unknown_setting"), done.stderr
    assert report["value"] == pytest.approx(3.0 * sum(math.sin(k) for k in range(4)),
                                            rel=1e-14)


def test_the_emitter_flag_goes_only_to_the_jaxlib_releases_it_was_measured_with():
    """XLA aborts the process on a flag it does not know."""
    code = """
import json, os
import calibrate
from calibrate._compilation import prefer_fast_cpu_compile
del os.environ["CALIBRATE_XLA_FLAGS"]
unknown = prefer_fast_cpu_compile(release=(0, 99))
after_unknown = os.environ.get("XLA_FLAGS", "")
measured = prefer_fast_cpu_compile(release=(0, 10))
print(json.dumps([unknown, after_unknown, measured, os.environ.get("XLA_FLAGS", "")]))
"""
    environment = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    environment.update(JAX_PLATFORMS="cpu", CALIBRATE_CACHE_DIR="off",
                       CALIBRATE_XLA_FLAGS="off")
    done = subprocess.run([sys.executable, "-c", code], env=environment,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    from calibrate._compilation import CPU_EMITTER_FLAG

    assert json.loads(done.stdout.strip().splitlines()[-1]) == [
        False, "", True, CPU_EMITTER_FLAG]

"""Problem files: one TOML file binding a model, data files and every setting of a fit.

```toml
model = "reference"                 # zoo name or "path/to/file.py:ClassName"
measurements = "measurements.csv"   # long format (see `calibrate.load_measurements`)
conditions = "conditions.csv"       # optional: per-individual inputs
seed = 0

[parameters.p]                      # one table per parameter the problem changes
role = "random"                     # random | fixed | individual | constant
start = 1.0                         # start value (natural scale); a constant's value
sd = 0.3                            # random: start sd of the random effect (its scale)
lower = 1e-3                        # optional: bounds and scale override the model's
upper = 1e3
scale = "log"                       # lin | log | log10

[population]                        # hierarchical problems only
objective = "laplace"               # laplace | validation
holdout = 0.2                       # validation: fraction of measurements held out
covariance = "diagonal"             # diagonal | full
penalty = "none"                    # none | l2 | elastic-net (learned strength)
optimiser = "bfgs"                  # bfgs | bhhh (laplace only) | adam
max_steps = 100
learning_rate = 0.05                # adam
standard_errors = true
checkpoint_every = 1                # outer steps between checkpoints (`fit --resume`)

[individual]                        # problems without random or fixed effects
starts = 0                          # extra Sobol start points per individual
max_steps = 256

[ode]
solver = "rodas5"                   # rodas5 | kvaerno5 | kencarp4 (stiff) | tsit5 | dopri5 (non-stiff)
rtol = 1e-8
atol = 1e-10
max_steps = 20000

[inner]                             # hierarchical: per-individual MAP fits
max_steps = 64

[sensitivity]
method = "auto"                     # auto | forward | direct | discrete-adjoint | continuous-adjoint

[hypergradient]
curvature = "forward-hessian"       # forward-hessian | gauss-newton | exact
linear_solver = "direct"            # direct | cg | neumann
stationarity_tol = 1e-5
```

Parameters not listed keep their model defaults: estimated ones are fitted per
individual (`role = "individual"`), the others are constants. A problem with a
`random` or `fixed` parameter is hierarchical and runs the population calibrator;
otherwise each individual is fitted on its own. Paths are relative to the problem
file.
"""

from __future__ import annotations

import hashlib
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffrax as dfx
import optax

from . import __version__
from ._conditions import conditions_from_frame, with_conditions
from ._data import DataError, Dataset, Issue, dataset_for_model, read_table
from ._fit import SobolStarts
from ._hypergrad import (
    ConjugateGradient,
    DirectSolve,
    ExactHessian,
    ForwardHessian,
    GaussNewton,
    Implicit,
    NeumannSeries,
    check_supported,
)
from ._model import AbstractODEModel
from ._modelspec import ModelSpecError, did_you_mean, resolve_model
from ._parameters import Parameter, ParameterError
from ._penalty import L2, ElasticNet
from ._population import (
    BHHH,
    DiagonalCovariance,
    FirstOrder,
    FullCovariance,
    Hierarchy,
    Laplace,
    QuasiNewton,
    ValidationLoss,
)
from ._sensitivity import (
    Automatic,
    ContinuousAdjoint,
    DirectDifferentiation,
    DiscreteAdjoint,
    ForwardMode,
)
from ._simulate import Integrator, kvaerno5_chord


ROLES = ("random", "fixed", "individual", "constant")
_SECTIONS = {
    "population": {"objective", "holdout", "covariance", "penalty", "optimiser",
                   "max_steps", "learning_rate", "standard_errors", "checkpoint_every"},
    "individual": {"starts", "max_steps"},
    "ode": {"solver", "rtol", "atol", "max_steps"},
    "inner": {"max_steps"},
    "sensitivity": {"method"},
    "hypergradient": {"curvature", "linear_solver", "stationarity_tol"},
}
_TOP = {"model", "measurements", "conditions", "seed", "parameters", *_SECTIONS}
_PARAMETER_KEYS = {"role", "start", "sd", "lower", "upper", "scale"}
_CHOICES = {
    ("population", "objective"): ("laplace", "validation"),
    ("population", "covariance"): ("diagonal", "full"),
    ("population", "penalty"): ("none", "l2", "elastic-net"),
    ("population", "optimiser"): ("bfgs", "bhhh", "adam"),
    ("ode", "solver"): ("rodas5", "kvaerno5", "kencarp4", "tsit5", "dopri5"),
    ("sensitivity", "method"): ("auto", "forward", "direct", "discrete-adjoint",
                                "continuous-adjoint"),
    ("hypergradient", "curvature"): ("forward-hessian", "gauss-newton", "exact"),
    ("hypergradient", "linear_solver"): ("direct", "cg", "neumann"),
}
_DEFAULTS = {
    ("population", "objective"): "laplace",
    ("population", "holdout"): 0.2,
    ("population", "covariance"): "diagonal",
    ("population", "penalty"): "none",
    ("population", "optimiser"): "bfgs",
    ("population", "max_steps"): 100,
    ("population", "learning_rate"): 0.05,
    ("population", "standard_errors"): True,
    ("population", "checkpoint_every"): 1,
    ("individual", "starts"): 0,
    ("individual", "max_steps"): 256,
    ("ode", "solver"): "rodas5",
    ("ode", "rtol"): 1e-8,
    ("ode", "atol"): 1e-10,
    ("ode", "max_steps"): 20_000,
    ("inner", "max_steps"): 64,
    ("sensitivity", "method"): "auto",
    ("hypergradient", "curvature"): "forward-hessian",
    ("hypergradient", "linear_solver"): "direct",
    ("hypergradient", "stationarity_tol"): 1e-5,
}
_POSITIVE_INTEGERS = {("population", "max_steps"), ("population", "checkpoint_every"), ("individual", "max_steps"),
                      ("ode", "max_steps"), ("inner", "max_steps")}
_POSITIVE_NUMBERS = {("ode", "rtol"), ("ode", "atol"), ("population", "learning_rate"),
                     ("hypergradient", "stationarity_tol")}


class ProblemError(DataError):
    """An invalid problem file or one of its inputs; `issues` lists every problem."""


@dataclass
class Problem:
    """A calibration problem read from a problem file.

    `model` carries the problem's bounds and scales; `data` its measurements (and
    conditions); `roles` maps every parameter to its role; `settings` holds every
    setting with defaults filled in (as written to `run.json`).
    """

    path: Path
    model_spec: str
    model: AbstractODEModel
    data: Dataset
    roles: dict[str, str]
    start: dict[str, float]
    start_sd: dict[str, float]
    seed: int
    settings: dict[str, dict[str, Any]]
    files: dict[str, str] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """SHA-256 of the problem file, every file it names and the version: a
        checkpoint of one problem is never resumed for another."""
        digest = hashlib.sha256(__version__.encode())
        for role in sorted(self.files):
            digest.update(role.encode() + b"\0" + Path(self.files[role]).read_bytes())
        return digest.hexdigest()

    @property
    def hierarchical(self) -> bool:
        return any(r in ("random", "fixed") for r in self.roles.values())

    def names(self, role: str) -> tuple[str, ...]:
        return tuple(n for n, r in self.roles.items() if r == role)

    @property
    def constants(self) -> dict[str, float]:
        return {n: self.start[n] for n in self.names("constant")}

    @property
    def integrator(self) -> Integrator:
        ode = self.settings["ode"]
        # None is `Integrator`'s default, Rodas5.
        solver = {"rodas5": None, "kvaerno5": kvaerno5_chord(ode["rtol"], ode["atol"]),
                  "kencarp4": dfx.KenCarp4(), "tsit5": dfx.Tsit5(),
                  "dopri5": dfx.Dopri5()}[ode["solver"]]
        return Integrator(solver=solver, rtol=ode["rtol"], atol=ode["atol"],
                          max_steps=ode["max_steps"])

    @property
    def sensitivity(self):
        return _sensitivity(self.settings)

    @property
    def hypergradient(self) -> Implicit:
        return _hypergradient(self.settings)

    def population_arguments(self) -> dict[str, Any]:
        """Keyword arguments of `calibrate_population` for this problem."""
        p = self.settings["population"]
        penalty = {"none": None, "l2": L2(), "elastic-net": ElasticNet()}[p["penalty"]]
        covariance = {"diagonal": DiagonalCovariance(),
                      "full": FullCovariance()}[p["covariance"]]
        objective = _population_objective(self.settings, self.seed)
        outer = {"bhhh": lambda: BHHH(max_steps=p["max_steps"]),
                 "bfgs": lambda: QuasiNewton(max_steps=p["max_steps"]),
                 "adam": lambda: FirstOrder(optax.adam(p["learning_rate"]),
                                            steps=p["max_steps"])}[p["optimiser"]]()
        hierarchy = Hierarchy(random=self.names("random"), fixed=self.names("fixed"),
                              individual=self.names("individual"), covariance=covariance,
                              penalty=penalty)
        start = {n: self.start[n] for n in (*hierarchy.random, *hierarchy.fixed,
                                             *hierarchy.individual)}
        return dict(
            hierarchy=hierarchy, objective=objective, start=start,
            start_sd={n: self.start_sd[n] for n in hierarchy.random},
            constants=self.constants, hypergradient=self.hypergradient,
            sensitivity=self.sensitivity, integrator=self.integrator,
            inner_max_steps=self.settings["inner"]["max_steps"], outer=outer,
            standard_errors=p["standard_errors"],
        )

    def fit_arguments(self) -> dict[str, Any]:
        """Keyword arguments of `calibrate.fit` for a problem without a hierarchy."""
        i = self.settings["individual"]
        estimate = list(self.names("individual"))
        return dict(
            estimate=estimate,
            fixed=self.constants,
            start={n: self.start[n] for n in estimate},
            starts=SobolStarts(i["starts"]) if i["starts"] > 0 else None,
            integrator=self.integrator, sensitivity=self.sensitivity,
            max_steps=i["max_steps"], seed=self.seed,
        )


def _sensitivity(settings):
    return {
        "auto": Automatic(),
        "forward": ForwardMode(),
        "direct": DirectDifferentiation(),
        "discrete-adjoint": DiscreteAdjoint(),
        "continuous-adjoint": ContinuousAdjoint(),
    }[settings["sensitivity"]["method"]]


def _hypergradient(settings) -> Implicit:
    h = settings["hypergradient"]
    curvature = {"forward-hessian": ForwardHessian(), "gauss-newton": GaussNewton(),
                 "exact": ExactHessian()}[h["curvature"]]
    solver = {"direct": DirectSolve(), "cg": ConjugateGradient(),
              "neumann": NeumannSeries()}[h["linear_solver"]]
    return Implicit(curvature=curvature, linear_solver=solver,
                    stationarity_tol=h["stationarity_tol"])


def _population_objective(settings, seed: int):
    p = settings["population"]
    return Laplace() if p["objective"] == "laplace" else ValidationLoss(p["holdout"],
                                                                       seed=seed)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read_toml(path: Path) -> dict:
    source = str(path)
    if not path.exists():
        raise ProblemError([Issue(source, "problem file not found")])
    if path.is_dir():
        raise ProblemError([Issue(source, "is a directory, not a problem file")])
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise ProblemError([Issue(source, f"not valid TOML: {error}")]) from None
    except UnicodeDecodeError:
        raise ProblemError([Issue(source, "not a text file")]) from None


def _report_unknown(given, known, source: str, prefix: str, issues: list[Issue]) -> None:
    for key in given:
        if key not in known:
            issues.append(Issue(source, f"unknown setting{did_you_mean(key, known)}; "
                                f"known: {', '.join(sorted(known))}", key=f"{prefix}{key}"))


def _settings(raw: dict, source: str, issues: list[Issue]) -> dict[str, dict[str, Any]]:
    settings: dict[str, dict[str, Any]] = {}
    for section, keys in _SECTIONS.items():
        given = raw.get(section, {})
        if not isinstance(given, dict):
            issues.append(Issue(source, f"must be a table ([{section}])", key=section))
            given = {}
        _report_unknown(given, keys, source, f"{section}.", issues)
        values = {}
        for key in sorted(keys):
            default = _DEFAULTS[(section, key)]
            value = given.get(key, default)
            where = f"{section}.{key}"
            choices = _CHOICES.get((section, key))
            if choices is not None:
                if not isinstance(value, str) or value not in choices:
                    hint = did_you_mean(value, choices) if isinstance(value, str) else ""
                    issues.append(Issue(source, f"{value!r} is not one of "
                                        f"{', '.join(choices)}{hint}", key=where))
                    value = default
            elif isinstance(default, bool):
                if not isinstance(value, bool):
                    issues.append(Issue(source, f"{value!r} is not true or false", key=where))
                    value = default
            elif isinstance(default, int):
                positive = (section, key) in _POSITIVE_INTEGERS
                if (not isinstance(value, int) or isinstance(value, bool)
                        or value < (1 if positive else 0)):
                    need = "a positive" if positive else "a non-negative"
                    issues.append(Issue(source, f"{value!r} is not {need} integer",
                                        key=where))
                    value = default
            else:
                if not _is_number(value) or not math.isfinite(value) or (
                        (section, key) in _POSITIVE_NUMBERS and value <= 0):
                    issues.append(Issue(source, f"{value!r} is not a positive number"
                                        if (section, key) in _POSITIVE_NUMBERS
                                        else f"{value!r} is not a number", key=where))
                    value = default
            values[key] = value
        settings[section] = values
    holdout = settings["population"]["holdout"]
    if not 0 < holdout < 1:
        issues.append(Issue(source, f"{holdout!r} must lie strictly between 0 and 1",
                            key="population.holdout"))
    return settings


def _parameters(raw: Any, model: AbstractODEModel, source: str, issues: list[Issue]):
    """Roles, starts, start sds and the model's parameters with the problem's bounds."""
    if not isinstance(raw, dict):
        issues.append(Issue(source, "must be a table of tables ([parameters.NAME])",
                            key="parameters"))
        raw = {}
    known = model.parameter_space.names
    for name in raw:
        if name not in known:
            issues.append(Issue(source, f"model {model.name} has no parameter {name!r}"
                                f"{did_you_mean(name, known)}; its parameters are "
                                f"{', '.join(known)}", key=f"parameters.{name}"))
    roles, start, start_sd, parameters = {}, {}, {}, []
    invalid_role = False
    for p in model.parameters:
        spec = raw.get(p.name, {})
        where = f"parameters.{p.name}"
        if not isinstance(spec, dict):
            issues.append(Issue(source, "must be a table, e.g. { role = \"random\" }",
                                key=where))
            spec = {}
        _report_unknown(spec, _PARAMETER_KEYS, source, f"{where}.", issues)
        role = spec.get("role", "individual" if p.estimate else "constant")
        if role not in ROLES:
            issues.append(Issue(source, f"{role!r} is not one of {', '.join(ROLES)}"
                                f"{did_you_mean(str(role), ROLES)}", key=f"{where}.role"))
            role, invalid_role = None, True
        changes = {}
        for key in ("lower", "upper", "start", "sd"):
            if key in spec and (not _is_number(spec[key]) or math.isnan(spec[key])
                                or (key in ("start", "sd") and math.isinf(spec[key]))):
                issues.append(Issue(source, f"{spec[key]!r} is not a number",
                                    key=f"{where}.{key}"))
                spec = {k: v for k, v in spec.items() if k != key}
        if "lower" in spec:
            changes["lower"] = float(spec["lower"])
        if "upper" in spec:
            changes["upper"] = float(spec["upper"])
        if "scale" in spec:
            if spec["scale"] not in ("lin", "log", "log10"):
                issues.append(Issue(source, f"{spec['scale']!r} is not one of lin, log, "
                                    "log10", key=f"{where}.scale"))
            else:
                changes["scale"] = spec["scale"]
        value = float(spec.get("start", p.default))
        try:
            parameter = Parameter(
                p.name, value, changes.get("lower", p.lower), changes.get("upper", p.upper),
                scale=changes.get("scale", p.scale), estimate=role != "constant",
                description=p.description, unit=p.unit,
            )
        except ParameterError as error:
            message = str(error)
            if "start" in spec:
                message = message.replace(" default ", " start ")
            issues.append(Issue(source, message, key=where))
            parameter = p
        sd = spec.get("sd", 0.3)
        if "sd" in spec and role != "random":
            issues.append(Issue(source, f"sd is only for random parameters (this one is "
                                f"{role})", key=f"{where}.sd"))
        elif _is_number(sd) and not sd > 0:
            issues.append(Issue(source, f"{sd!r} must be positive", key=f"{where}.sd"))
        roles[p.name] = role
        start[p.name] = parameter.default
        start_sd[p.name] = float(sd) if _is_number(sd) else 0.3
        parameters.append(parameter)
    if invalid_role:
        return roles, start, start_sd, tuple(parameters)
    if not any(r in ("random", "individual") for r in roles.values()):
        issues.append(Issue(source, "nothing varies between individuals: give at least one "
                            "parameter role \"random\" or \"individual\"", key="parameters"))
    return roles, start, start_sd, tuple(parameters)


def _with_parameters(model: AbstractODEModel, parameters: tuple[Parameter, ...]):
    """An instance of a subclass of the model's class whose parameters carry the
    problem's bounds, scales and starts."""
    if parameters == tuple(model.parameters):
        return model
    cls = type(model)
    subclass = type(cls.__name__, (cls,), {"parameters": parameters,
                                           "__module__": cls.__module__,
                                           "__doc__": cls.__doc__})
    return subclass()


def _file(raw: dict, key: str, base: Path, source: str, issues, required: bool):
    value = raw.get(key)
    if value is None:
        if required:
            issues.append(Issue(source, f"missing: name the {key} file, e.g. "
                                f"{key} = \"{key}.csv\"", key=key))
        return None
    if not isinstance(value, str) or not value.strip():
        issues.append(Issue(source, f"{value!r} is not a file name", key=key))
        return None
    path = Path(value)
    return path if path.is_absolute() else base / path


def load_problem(path: str | Path) -> Problem:
    """Read and validate a problem file and everything it names (model, measurements,
    conditions).

    **Raises:** `ProblemError` listing every problem found, each with its file and the
    setting's key or the table's row and column.
    """
    path = Path(path)
    source = str(path)
    raw = _read_toml(path)
    base = path.parent
    issues: list[Issue] = []
    _report_unknown(raw, _TOP, source, "", issues)
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        issues.append(Issue(source, f"{seed!r} is not a non-negative integer", key="seed"))
        seed = 0
    settings = _settings(raw, source, issues)

    model = None
    spec = raw.get("model")
    if not isinstance(spec, str) or not spec.strip():
        issues.append(Issue(source, "missing: name a zoo model (`calibrate models`) or "
                            "path/to/file.py:ClassName", key="model"))
    else:
        try:
            model = resolve_model(spec, base=base).model
        except ModelSpecError as error:
            issues.append(Issue(source, str(error), key="model"))
    measurements = _file(raw, "measurements", base, source, issues, required=True)
    conditions = _file(raw, "conditions", base, source, issues, required=False)
    if model is None:
        raise ProblemError(issues)

    roles, start, start_sd, parameters = _parameters(raw.get("parameters", {}), model,
                                                     source, issues)
    model = _with_parameters(model, parameters)
    hierarchical = any(r in ("random", "fixed") for r in roles.values())
    if None in roles.values():  # an invalid role: which checks apply is unknown
        pass
    elif hierarchical:
        for section in ("individual",):
            if section in raw:
                issues.append(Issue(source, "settings of individual fits, but the problem "
                                    "is hierarchical (it has random or fixed parameters)",
                                    key=section))
        population = settings["population"]
        if population["penalty"] != "none" and population["objective"] != "validation":
            issues.append(Issue(source, "a learned penalty strength needs held-out data: "
                                "set objective = \"validation\"", key="population.penalty"))
        if population["optimiser"] == "bhhh" and population["objective"] != "laplace":
            issues.append(Issue(source, "bhhh takes its curvature from a likelihood's "
                                "scores: use it with objective = \"laplace\"",
                                key="population.optimiser"))
        try:
            sensitivity = _sensitivity(settings)
            check_supported(_hypergradient(settings), sensitivity)
            reason = _population_objective(settings, seed).missing(sensitivity)
            if reason is not None:
                raise ValueError(f"{reason}; use forward or direct")
        except ValueError as error:
            issues.append(Issue(source, str(error), key="sensitivity.method"))
    else:
        for section in ("population", "inner", "hypergradient"):
            if section in raw:
                issues.append(Issue(source, "a hierarchical setting, but no parameter is "
                                    "random or fixed", key=section))

    data = None
    if measurements is not None:
        try:
            data = dataset_for_model(model, measurements)
        except DataError as error:
            issues.extend(error.issues)
    if data is not None and conditions is not None:
        try:
            data = with_conditions(data, model, conditions)
        except DataError as error:
            issues.extend(error.issues)
    elif conditions is not None:  # still report the table's own problems
        try:
            conditions_from_frame(read_table(conditions), model, None,
                                  source=str(conditions))
        except DataError as error:
            issues.extend(error.issues)
    elif data is not None and model.inputs:
        try:
            model.default_inputs()
        except NotImplementedError as error:
            issues.append(Issue(source, f"{error}; or give a conditions table",
                                key="conditions"))
    if issues:
        raise ProblemError(issues)
    files = {"problem": str(path), "measurements": str(measurements)}
    if conditions is not None:
        files["conditions"] = str(conditions)
    return Problem(path=path, model_spec=spec.strip(), model=model, data=data, roles=roles,
                   start=start, start_sd=start_sd, seed=seed, settings=settings,
                   files=files)


def check_problem(path: str | Path) -> list[Issue]:
    """Every problem of a problem file and its inputs (empty if it is valid)."""
    try:
        load_problem(path)
    except DataError as error:
        return list(error.issues)
    return []

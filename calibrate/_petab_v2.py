r"""PEtab v2 tables, read into the v1 layout that `_petab` checks and assembles.

What changes from v1, and how each is read:

- **Conditions** are long (`conditionId`, `targetId`, `targetValue`): one row per
  change. They become one v1 condition row per simulated period.
- **Experiments** (`experimentId`, `time`, `conditionId`) replace the measurement
  table's `simulationConditionId` and `preequilibrationConditionId`. An experiment
  may have one period starting at 0, optionally preceded by a pre-equilibration
  period at `-inf`. Changes stay in effect until changed, so parameters set by the
  pre-equilibration condition carry over into the main period unless it sets them
  again. A measurement with an empty `experimentId` simulates the model as it is.
- **Observables** name their placeholders (`observablePlaceholders`,
  `noisePlaceholders`, in order) and take `noiseDistribution` normal, laplace,
  log-normal or log-laplace (log-normal = v1's log transformation with normal noise).
- **Parameters** have `estimate` true/false, priors as `priorDistribution` and
  `priorParameters` on the parameter's own value, and no `parameterScale`. Fits
  then run on $\log_{10}$ for estimated parameters whose positive bounds span at
  least two decades, and on the linear value otherwise; an explicit
  `parameterScale` column is honoured. An estimated parameter without
  `nominalValue` starts from the midpoint of its bounds on that scale.

Experiments with more periods, periods that start at other times, math expressions
as condition values and mapping tables are refused by name.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from ._modelspec import did_you_mean
from ._petab import _float, _listed_files, _Table, _yaml_error


NOISE_DISTRIBUTIONS = {
    "normal": ("lin", "normal"),
    "laplace": ("lin", "laplace"),
    "log-normal": ("log", "normal"),
    "log-laplace": ("log", "laplace"),
    "log10-normal": ("log10", "normal"),
}
PRIOR_DISTRIBUTIONS = {
    "uniform": "uniform",
    "normal": "normal",
    "laplace": "laplace",
    "log-normal": "logNormal",
    "log-laplace": "logLaplace",
}
# The condition a measurement with no experiment is simulated under.
MODEL_AS_IS = "__model_as_is"
PREEQUILIBRATION_SUFFIX = "__preequilibration"
_LOG_SCALE_SPAN = 100.0


def problem_files_v2(path: Path, content: dict) -> dict[str, list[Path]]:
    """The files of a v2 problem by role, under the v1 role names where one exists."""
    if isinstance(content.get("problems"), list):  # drafts nested the file lists
        if len(content["problems"]) != 1:
            raise _yaml_error(path, "expected exactly one entry in 'problems'", "problems")
        content = {**content, **content["problems"][0]}
    if content.get("mapping_files"):
        raise _yaml_error(path, "mapping tables are not supported; use the model's own ids",
                          "mapping_files")
    required = [name for name, spec in (content.get("extensions") or {}).items()
                if isinstance(spec, dict) and spec.get("required")]
    if required:
        raise _yaml_error(path, f"required extension(s) {', '.join(required)} are not "
                                "supported", "extensions")
    models = content.get("model_files")
    if not isinstance(models, dict) or len(models) != 1:
        raise _yaml_error(path, "expected exactly one entry in 'model_files'",
                          "model_files")
    (model_id, model), = models.items()
    language = str((model or {}).get("language", "")).lower()
    if language != "sbml" or not model.get("location"):
        raise _yaml_error(path, f"model {model_id!r}: only SBML models (language: sbml, "
                                "with a location) are supported, got language "
                                f"{language!r}", f"model_files.{model_id}")

    def listed(key, required=True):
        if required and not content.get(key):
            raise _yaml_error(path, f"{key} is missing", key)
        return _listed_files(path, content.get(key) or [])

    return {
        "sbml_files": _listed_files(path, model["location"]),
        "parameter_file": listed("parameter_files") if "parameter_files" in content
        else listed("parameter_file"),
        "condition_files": listed("condition_files", required=False),
        "experiment_files": listed("experiment_files", required=False),
        "measurement_files": listed("measurement_files"),
        "observable_files": listed("observable_files"),
    }


class V2Reader:
    """Reads the v2 tables of `files` and returns them in v1 layout; problems go to
    `issues`, located in the v2 files."""

    def __init__(self, files, states, issues):
        self.files = files
        self.states = set(states)
        self.issues = issues

    def tables(self, read):
        """`read(files, required)` reads and concatenates tables (`_Loader.read`); None
        when one cannot be read (the reason is in `issues`)."""
        unread = len(self.issues)
        parameters = read(self.files["parameter_file"], (
            "parameterId", "lowerBound", "upperBound", "estimate"))
        observables = read(self.files["observable_files"], (
            "observableId", "observableFormula", "noiseFormula"))
        measurements = read(self.files["measurement_files"], (
            "observableId", "experimentId", "measurement", "time"))
        conditions = (read(self.files["condition_files"], (
            "conditionId", "targetId", "targetValue"))
            if self.files["condition_files"] else None)
        experiments = (read(self.files["experiment_files"], (
            "experimentId", "time", "conditionId"))
            if self.files["experiment_files"] else None)
        if len(self.issues) > unread:
            return None
        parameters = self.parameters(parameters)
        changes = self.conditions(conditions, set(parameters.frame["parameterId"]))
        periods = self.experiments(experiments, changes)
        return (parameters, self.condition_rows(periods, changes, conditions),
                self.observables(observables), self.measurements(measurements, periods))

    # -- parameters -----------------------------------------------------------------------

    def parameters(self, table):
        frame = table.frame.copy()
        has_scale = "parameterScale" in frame.columns
        scales, estimates, nominals, prior_types = [], [], [], []
        for i, row in frame.iterrows():
            estimate = {"true": "1", "false": "0", "1": "1", "0": "0"}.get(
                row["estimate"].lower())
            if estimate is None:
                self.issues.append(table.issue(
                    f"estimate must be true or false, got {row['estimate']!r}", i,
                    "estimate"))
                estimate = "0"
            lo = _float(row["lowerBound"] or "-inf")
            hi = _float(row["upperBound"] or "inf")
            if has_scale and row["parameterScale"]:
                scale = row["parameterScale"]
            elif estimate == "1" and lo is not None and hi is not None and 0 < lo and (
                    hi / lo >= _LOG_SCALE_SPAN):
                scale = "log10"
            else:
                scale = "lin"
            # The v1 assembly starts such a parameter mid-range.
            nominal = row.get("nominalValue", "") or ("nan" if estimate == "1" else "")
            kind = row.get("priorDistribution", "")
            if kind and kind not in PRIOR_DISTRIBUTIONS:
                self.issues.append(table.not_one_of(kind, PRIOR_DISTRIBUTIONS, i,
                                                    "priorDistribution"))
                kind = ""
            scales.append(scale)
            estimates.append(estimate)
            nominals.append(nominal)
            prior_types.append(PRIOR_DISTRIBUTIONS.get(kind, ""))
        frame["parameterScale"] = scales
        frame["estimate"] = estimates
        frame["nominalValue"] = nominals
        frame["objectivePriorType"] = prior_types
        frame["objectivePriorParameters"] = frame.get("priorParameters", "")
        return _Table(frame, table.path)

    # -- conditions and experiments -------------------------------------------------------

    def conditions(self, table, parameter_ids) -> dict[str, dict[str, str]]:
        """conditionId -> {targetId: targetValue}."""
        changes: dict[str, dict[str, str]] = {}
        if table is None:
            return changes
        for i, row in table.frame.iterrows():
            cid, target, value = row["conditionId"], row["targetId"], row["targetValue"]
            targets = changes.setdefault(cid, {})
            if not target:  # a condition that changes nothing
                continue
            if target in targets:
                self.issues.append(table.issue(
                    f"condition {cid!r} changes {target!r} twice", i, "targetId"))
            if _float(value) is None and not (
                    value.isidentifier() and value in parameter_ids):
                self.issues.append(table.issue(
                    f"targetValue {value!r} must be a number or a parameter of the "
                    "parameter table (math expressions are not supported)"
                    f"{did_you_mean(value, parameter_ids) if value.isidentifier() else ''}",
                    i, "targetValue"))
            targets[target] = value
        return changes

    def experiments(self, table, changes) -> dict[str, tuple[str | None, str]]:
        """experimentId -> (pre-equilibration conditionId or None, main conditionId)."""
        periods: dict[str, tuple[str | None, str]] = {MODEL_AS_IS: (None, "")}
        if table is None:
            return periods
        rows: dict[str, list[tuple[float, str, int]]] = {}
        for i, row in table.frame.iterrows():
            time = _float(row["time"])
            if time is None or time == math.inf:
                self.issues.append(table.issue(
                    f"time {row['time']!r} is not a number or -inf", i, "time"))
                continue
            cid = row["conditionId"]
            if cid and cid not in changes:
                self.issues.append(table.issue(
                    f"condition {cid!r} is not in the condition table"
                    f"{did_you_mean(cid, list(changes))}", i, "conditionId"))
            rows.setdefault(row["experimentId"], []).append((time, cid, i))
        for eid, entries in rows.items():
            entries.sort()
            times = [t for t, _, _ in entries]
            first = entries[0][2]
            if len(set(times)) != len(times):
                self.issues.append(table.issue(
                    f"experiment {eid!r} applies two conditions at the same time", first,
                    "time"))
            elif [t for t in times if t != -math.inf] != [0.0]:
                self.issues.append(table.issue(
                    f"experiment {eid!r} has periods starting at "
                    f"{', '.join(str(t) for t in times)}; supported are one period from "
                    "time 0, optionally after a pre-equilibration period (-inf)", first,
                    "time"))
            else:
                pre = entries[0][1] if times[0] == -math.inf else None
                periods[eid] = (pre, entries[-1][1])
        return periods

    def condition_rows(self, periods, changes, table):
        """v1 conditions: one row per experiment's main period (named by the
        experiment) and one per pre-equilibration condition."""
        pre_ids = {pre for pre, _ in periods.values() if pre is not None}
        rows = {}
        for pre in sorted(pre_ids):
            rows[self.preequilibration_id(periods, pre)] = dict(changes.get(pre, {}))
        for eid, (pre, main) in periods.items():
            carried = {target: value for target, value in changes.get(pre, {}).items()
                       if target not in self.states} if pre is not None else {}
            rows[eid] = {**carried, **changes.get(main, {})}
        targets = list(dict.fromkeys(t for r in rows.values() for t in r))
        frame = pd.DataFrame(
            [{"conditionId": cid, **{t: r.get(t, "") for t in targets}}
             for cid, r in rows.items()], columns=["conditionId", *targets], dtype=str)
        return _Table(frame, table.path if table is not None else "(no condition table)")

    def preequilibration_id(self, periods, pre):
        return pre if pre not in periods else pre + PREEQUILIBRATION_SUFFIX

    # -- observables and measurements -----------------------------------------------------

    def observables(self, table):
        frame = table.frame.copy()
        transformations, distributions = [], []
        for i, row in frame.iterrows():
            oid = row["observableId"]
            kind = row.get("noiseDistribution", "") or "normal"
            if kind not in NOISE_DISTRIBUTIONS:
                self.issues.append(table.not_one_of(kind, NOISE_DISTRIBUTIONS, i,
                                                    "noiseDistribution"))
                kind = "normal"
            transformation, distribution = NOISE_DISTRIBUTIONS[kind]
            if row.get("observableTransformation", ""):  # draft column, kept if given
                transformation = row["observableTransformation"]
            transformations.append(transformation)
            distributions.append(distribution)
            for column, kind_name, targets in (
                    ("observablePlaceholders", "observableParameter",
                     ("observableFormula", "noiseFormula")),
                    ("noisePlaceholders", "noiseParameter", ("noiseFormula",))):
                names = [n.strip() for n in row.get(column, "").split(";") if n.strip()]
                for k, name in enumerate(names, start=1):
                    if not name.isidentifier():
                        self.issues.append(table.issue(
                            f"placeholder {name!r} is not a valid identifier", i, column))
                        continue
                    pattern = re.compile(
                        rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])")
                    for target in targets:
                        frame.at[i, target] = pattern.sub(f"{kind_name}{k}_{oid}",
                                                          frame.at[i, target])
        frame["observableTransformation"] = transformations
        frame["noiseDistribution"] = distributions
        return _Table(frame, table.path)

    def measurements(self, table, periods):
        frame = table.frame.copy()
        simulation, preequilibration = [], []
        known = [e for e in periods if e != MODEL_AS_IS]
        for i, eid in enumerate(frame["experimentId"]):
            key = eid or MODEL_AS_IS
            if key not in periods:
                self.issues.append(table.issue(
                    f"experiment {eid!r} is not in the experiment table"
                    f"{did_you_mean(eid, known)}", i, "experimentId"))
                key = MODEL_AS_IS
            pre = periods[key][0]
            simulation.append(key)
            preequilibration.append(
                "" if pre is None else self.preequilibration_id(periods, pre))
        frame["simulationConditionId"] = simulation
        frame["preequilibrationConditionId"] = preequilibration
        return _Table(frame, table.path)


"""Loading and validating long-format measurement tables (`calibrate._data`).

No JAX function is compiled here: the loader only builds small arrays.
"""

import itertools
import math
import re
import string

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import calibrate as cal


HEADER = "individual,time,observable,value"
SIGMA_HEADER = HEADER + ",sigma"


def write(directory, name, text):
    path = directory / name
    path.write_text(text)
    return path


def csv(*lines, header=HEADER):
    return "\n".join([header, *lines]) + "\n"


def load_issues(path, **kwargs):
    """Load `path`, expect a DataError, return its issues."""
    with pytest.raises(cal.DataError) as info:
        cal.load_measurements(path, **kwargs)
    issues = info.value.issues
    assert issues, "a DataError must list at least one issue"
    assert all(isinstance(i, cal.Issue) for i in issues)
    return issues


def find(issues, row, column, pattern):
    """The issues at (row, column) whose message matches `pattern`."""
    return [
        i for i in issues
        if i.row == row and i.column == column and re.search(pattern, i.message)
    ]


# --------------------------------------------------------------------------------------
# 1. Bad input: one problem per case, located by file, row and column.
# --------------------------------------------------------------------------------------

# (id, file name, file text, loader options, expected row, expected column, message regex)
BAD_INPUTS = [
    ("missing column", "t.csv", csv("a,0,1", header="individual,time,value"), {},
     None, "observable", r"missing required column 'observable'"),
    ("misspelled column", "t.csv", csv("a,0,x,1", header="individual,tme,observable,value"),
     {}, None, "tme", r"did you mean 'time'\?"),
    ("empty file", "t.csv", "", {}, None, None, r"empty"),
    ("header only", "t.csv", csv(), {}, None, None, r"header but no measurements"),
    ("non-numeric time", "t.csv", csv("a,0,x,1", "a,soon,x,2"), {},
     3, "time", r"'soon' is not a number"),
    ("non-numeric value", "t.csv", csv("a,0,x,1", "a,1,x,high"), {},
     3, "value", r"'high' is not a number"),
    ("NaN value", "t.csv", csv("a,0,x,1", "a,1,x,NaN"), {}, 3, "value", r"NaN"),
    ("empty value", "t.csv", csv("a,0,x,1", "a,1,x,"), {}, 3, "value", r"empty"),
    ("inf value", "t.csv", csv("a,0,x,1", "a,1,x,inf"), {},
     3, "value", r"'inf' is not finite"),
    ("negative time", "t.csv", csv("a,0,x,1", "a,-1.5,x,2"), {},
     3, "time", r"negative time \(-1\.5\)"),
    ("time before t0", "t.csv", csv("a,5,x,1", "a,2,x,2"), {"t0": 5.0},
     3, "time", r"time before the model's t0=5"),
    ("negative sigma", "t.csv", csv("a,0,x,1,0.1", "a,1,x,2,-0.5", header=SIGMA_HEADER),
     {}, 3, "sigma", r"sigma must be positive.*-0\.5"),
    ("zero sigma", "t.csv", csv("a,0,x,1,0.1", "a,1,x,2,0", header=SIGMA_HEADER),
     {}, 3, "sigma", r"sigma must be positive"),
    ("non-numeric sigma", "t.csv", csv("a,0,x,1,0.1", "a,1,x,2,big", header=SIGMA_HEADER),
     {}, 3, "sigma", r"'big' is not a number"),
    ("unknown observable, close", "t.csv", csv("a,0,glucose,1", "a,1,glucos,2"),
     {"observables": ["glucose", "insulin"]},
     3, "observable",
     r"unknown observable 'glucos'.*glucose, insulin.*did you mean 'glucose'"),
    ("empty individual", "t.csv", csv("a,0,x,1", ",1,x,2"), {}, 3, "individual", r"empty"),
    ("exact duplicate", "t.csv", csv("a,0,x,1", "a,1,x,2", "a,0,x,1"), {},
     4, None, r"duplicate of row 2"),
    ("non-positive value, log-normal", "t.csv", csv("a,0,x,1", "a,1,x,0"),
     {"positive_observables": ["x"]}, 3, "value", r"must be positive.*'x'"),
    ("unparsable parquet", "t.parquet", "this is not parquet\n", {},
     None, None, r"cannot be read as a table"),
]


@pytest.mark.parametrize(
    "name, text, options, row, column, pattern",
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_is_located(tmp_path, name, text, options, row, column, pattern):
    path = write(tmp_path, name, text)
    issues = load_issues(path, **options)
    assert all(i.file == str(path) for i in issues), issues
    assert find(issues, row, column, pattern), [str(i) for i in issues]
    # The message shown to the user carries the location.
    shown = str(cal.DataError(issues))
    assert str(path) in shown
    if row is not None:
        assert f"row {row}" in shown
    if column is not None:
        assert f"column '{column}'" in shown


def test_misspelled_column_also_reported_as_missing(tmp_path):
    path = write(tmp_path, "t.csv",
                 csv("a,0,x,1", header="individual,tme,observable,value"))
    issues = load_issues(path)
    missing = find(issues, None, "time", r"missing required column 'time'")
    assert missing and "tme" in missing[0].message


def test_unknown_observable_without_close_match_has_no_hint(tmp_path):
    path = write(tmp_path, "t.csv", csv("a,0,glucose,1", "a,1,zzzz,2"))
    issues = load_issues(path, observables=["glucose", "insulin"])
    (issue,) = find(issues, 3, "observable", r"unknown observable 'zzzz'")
    assert "did you mean" not in issue.message


def test_file_not_found(tmp_path):
    path = tmp_path / "nowhere.csv"
    (issue,) = load_issues(path)
    assert issue.file == str(path) and "not found" in issue.message
    assert issue.row is None and issue.column is None


def test_unparsable_csv(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"\xff\xfe\x00\x01garbage\x00\n\x80\x81")
    (issue,) = load_issues(path)
    assert issue.file == str(path) and "cannot be read" in issue.message


def test_row_with_too_many_fields(tmp_path):
    path = write(tmp_path, "t.csv", csv("a,0,x,1,7,8", "a,1,x,2"))
    issues = load_issues(path)
    assert find(issues, 2, None, r"6 fields.*header has 4"), [str(i) for i in issues]


def test_blank_lines_count_as_spreadsheet_rows(tmp_path):
    path = write(tmp_path, "t.csv", csv("a,0,x,1", "", "a,soon,x,2"))
    issues = load_issues(path)
    assert find(issues, 4, "time", r"'soon'"), [str(i) for i in issues]


def test_quoted_fields_and_byte_order_mark(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('\ufeff' + csv('"a, left",0,x,1', '"b\nright",1,x,2', "c,zz,x,3"),
                    encoding="utf-8")
    issues = load_issues(path)
    # The quoted line break keeps "b\nright" in one spreadsheet row (row 3).
    assert [(i.row, i.column) for i in issues] == [(4, "time")]
    path.write_text('\ufeff' + csv('"a, left",0,x,1', '"b\nright",1,x,2'), encoding="utf-8")
    assert cal.load_measurements(path).individuals == ("a, left", "b\nright")


def test_read_table_rows_survive_filtering(tmp_path):
    path = write(tmp_path, "t.csv", csv("a,0,x,1", "", "b,1,x,2", "c,-1,x,3"))
    frame = cal.read_table(path)
    assert frame.index.name == "row" and list(frame.index) == [2, 4, 5]
    subset = frame[frame["individual"] != "b"].sort_values("individual", ascending=False)
    with pytest.raises(cal.DataError) as info:
        cal.dataset_from_frame(subset, source=str(path))
    assert [(i.row, i.column) for i in info.value.issues] == [(5, "time")]


def test_repeated_column_is_an_error(tmp_path):
    path = write(tmp_path, "t.csv", csv("a,0,x,1,2", header=HEADER + ",value"))
    issues = load_issues(path)
    assert find(issues, None, "value", r"2 times|more than once"), [str(i) for i in issues]


def test_all_problems_reported_at_once_in_row_order(tmp_path):
    path = write(
        tmp_path,
        "t.csv",
        csv(
            "a,0,x,1,0.1",      # 2: fine
            "a,-1,x,2,",        # 3: negative time
            ",1,x,3,",          # 4: empty individual
            "a,2,y,abc,",       # 5: unknown observable and non-numeric value
            "b,1,x,4,0",        # 6: zero sigma
            "a,0,x,1,0.1",      # 7: duplicate of row 2
            "b,2,x,inf,",       # 8: inf value
            header=SIGMA_HEADER,
        ),
    )
    issues = load_issues(path, observables=["x"])
    located = [(i.row, i.column) for i in issues]
    assert located == [
        (3, "time"),
        (4, "individual"),
        (5, "observable"),
        (5, "value"),
        (6, "sigma"),
        (7, None),
        (8, "value"),
    ], [str(i) for i in issues]
    text = str(cal.DataError(issues))
    assert text.count(str(path)) == len(issues)


def test_many_issues_are_summarised(tmp_path):
    lines = [f"a,{t},x,bad" for t in range(40)]
    issues = load_issues(write(tmp_path, "t.csv", csv(*lines)))
    assert len(issues) == 40
    assert "and 15 more" in str(cal.DataError(issues))


def test_dataset_from_frame_uses_source_and_positions():
    frame = pd.DataFrame(
        {"individual": ["a", "a"], "time": [0.0, np.nan], "observable": ["x", "x"],
         "value": [1.0, 2.0]}
    )
    with pytest.raises(cal.DataError) as info:
        cal.dataset_from_frame(frame, source="mine")
    (issue,) = info.value.issues
    assert (issue.file, issue.row, issue.column) == ("mine", 3, "time")


def test_missing_cells_in_a_frame_are_reported_not_crashed():
    frame = pd.DataFrame(
        {"individual": ["a", None, "a"], "time": [0.0, 1.0, 2.0],
         "observable": ["x", "x", "x"], "value": [1.0, 2.0, None],
         "sigma": [0.1, None, None]}
    )
    with pytest.raises(cal.DataError) as info:
        cal.dataset_from_frame(frame)
    located = [(i.row, i.column) for i in info.value.issues]
    assert located == [(3, "individual"), (4, "value")]


def test_empty_observable_reported_once():
    frame = pd.DataFrame(
        {"individual": ["a"], "time": ["0"], "observable": ["NaN"], "value": ["1"]}
    )
    for observables in (None, ["x"]):
        with pytest.raises(cal.DataError) as info:
            cal.dataset_from_frame(frame, observables=observables)
        assert [(i.row, i.column) for i in info.value.issues] == [(2, "observable")]


# --------------------------------------------------------------------------------------
# 2. Good input: layout.
# --------------------------------------------------------------------------------------


def test_ragged_individuals_are_padded_with_last_time(tmp_path):
    path = write(tmp_path, "t.csv", csv("a,0,x,1", "a,2,x,3", "a,1,x,2", "b,0.5,x,7"))
    data = cal.load_measurements(path)
    m = data.measurements
    assert data.individuals == ("a", "b") and data.observables == ("x",)
    assert len(data) == 2 and data.source == str(path)
    np.testing.assert_array_equal(m.times, [[0, 1, 2], [0.5, 0.5, 0.5]])
    np.testing.assert_array_equal(m.mask[..., 0], [[True] * 3, [True, False, False]])
    np.testing.assert_array_equal(m.values[0, :, 0], [1, 2, 3])
    assert m.values[1, 0, 0] == 7
    assert np.isnan(np.asarray(m.sigma)).all()
    assert m.times.shape == (2, 3) and m.values.shape == m.mask.shape == (2, 3, 1)


def test_replicates_get_their_own_slots(tmp_path):
    path = write(tmp_path, "t.csv", csv("a,1,x,1.0", "a,0,x,5", "a,1,x,1.1", "a,1,y,9"))
    m = cal.load_measurements(path).measurements
    np.testing.assert_array_equal(m.times[0], [0, 1, 1])
    np.testing.assert_array_equal(m.mask[0], [[True, False], [True, True], [True, False]])
    assert sorted(np.asarray(m.values[0, 1:, 0])) == [1.0, 1.1]
    assert m.values[0, 1, 1] == 9


def test_observable_missing_at_a_time_is_masked(tmp_path):
    path = write(tmp_path, "t.csv", csv("a,0,x,1", "a,0,y,2", "a,1,x,3"))
    data = cal.load_measurements(path, observables=["y", "x"])
    assert data.observables == ("y", "x")
    m = data.measurements
    np.testing.assert_array_equal(m.mask[0], [[True, True], [False, True]])
    np.testing.assert_array_equal(m.values[0, :, 1], [1, 3])
    assert m.values[0, 0, 0] == 2


def test_observables_default_to_sorted_names(tmp_path):
    path = write(tmp_path, "t.csv", csv("a,0,zeta,1", "a,0,alpha,2"))
    assert cal.load_measurements(path).observables == ("alpha", "zeta")


def test_sigma_partly_empty_is_nan_where_empty(tmp_path):
    path = write(tmp_path, "t.csv", csv("a,0,x,1,0.5", "a,1,x,2,", "a,2,x,3,NaN",
                                        header=SIGMA_HEADER))
    sigma = np.asarray(cal.load_measurements(path).measurements.sigma[0, :, 0])
    assert sigma[0] == 0.5 and np.isnan(sigma[1:]).all()


def test_individuals_in_order_of_first_appearance(tmp_path):
    path = write(tmp_path, "t.csv", csv("c,0,x,1", "a,0,x,2", "c,1,x,3", "b,0,x,4"))
    data = cal.load_measurements(path)
    assert data.individuals == ("c", "a", "b")
    np.testing.assert_array_equal(data.measurements.values[:, 0, 0], [1, 2, 4])


def test_whitespace_around_cells_is_ignored(tmp_path):
    path = write(tmp_path, "t.csv", "individual, time ,observable,value\n a , 1 , x , 2 \n")
    data = cal.load_measurements(path)
    assert data.individuals == ("a",) and data.observables == ("x",)
    assert data.measurements.values[0, 0, 0] == 2


def sorted_records(frame):
    """Rows as comparable tuples (NaN sigma -> None), sorted."""
    frame = frame.copy()
    if "sigma" not in frame:
        frame["sigma"] = np.nan
    return sorted(
        (str(i), float(t), str(o), float(v), None if pd.isna(s) else float(s))
        for i, t, o, v, s in frame[["individual", "time", "observable", "value", "sigma"]]
        .itertuples(index=False)
    )


def test_to_frame_round_trips(tmp_path):
    text = csv("b,0,x,1,0.5", "b,1,x,2,", "a,0,y,3,", "a,0,y,3.5,0.1", "a,2,x,4,",
               header=SIGMA_HEADER)
    data = cal.load_measurements(write(tmp_path, "t.csv", text))
    original = pd.read_csv(tmp_path / "t.csv")
    assert sorted_records(data.to_frame()) == sorted_records(original)
    assert list(data.to_frame().columns) == ["individual", "time", "observable", "value",
                                             "sigma"]


def test_to_frame_without_sigma_has_no_sigma_column(tmp_path):
    data = cal.load_measurements(write(tmp_path, "t.csv", csv("a,0,x,1", "a,1,x,2")))
    assert list(data.to_frame().columns) == ["individual", "time", "observable", "value"]


def assert_same_dataset(a, b):
    assert a.individuals == b.individuals and a.observables == b.observables
    for name in ("times", "values", "sigma", "mask"):
        np.testing.assert_array_equal(getattr(a.measurements, name),
                                      getattr(b.measurements, name))


def test_tsv_and_parquet_read_like_csv(tmp_path):
    frame = pd.DataFrame(
        {"individual": ["p1", "p1", "p2", "p2"], "time": [0.0, 1.5, 0.0, 0.0],
         "observable": ["x", "y", "x", "x"], "value": [1.25, -2.0, 3.0, 3.5],
         "sigma": [0.1, np.nan, np.nan, 0.2]}
    )
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_csv(tmp_path / "t.tsv", index=False, sep="\t")
    frame.to_parquet(tmp_path / "t.parquet", index=False)
    from_csv = cal.load_measurements(tmp_path / "t.csv")
    assert_same_dataset(from_csv, cal.load_measurements(tmp_path / "t.tsv"))
    assert_same_dataset(from_csv, cal.load_measurements(tmp_path / "t.parquet"))
    assert_same_dataset(from_csv, cal.dataset_from_frame(frame))
    assert sorted_records(from_csv.to_frame()) == sorted_records(frame)


def test_parquet_errors_are_located(tmp_path):
    frame = pd.DataFrame({"individual": ["a", "a"], "time": [0.0, -1.0],
                          "observable": ["x", "x"], "value": [1.0, None]})
    frame.to_parquet(tmp_path / "t.parquet", index=False)
    issues = load_issues(tmp_path / "t.parquet")
    assert [(i.row, i.column) for i in issues] == [(3, "time"), (3, "value")]


def test_select_by_name_and_index(tmp_path):
    path = write(tmp_path, "t.csv", csv("a,0,x,1", "b,0,x,2", "b,1,x,3", "c,0,x,4"))
    data = cal.load_measurements(path)
    picked = data.select(["c", "a"])
    assert picked.individuals == ("c", "a") and picked.observables == data.observables
    np.testing.assert_array_equal(picked.measurements.values[:, 0, 0], [4, 1])
    assert picked.measurements.times.shape == (2, 2)
    by_index = data.select([1])
    assert by_index.individuals == ("b",)
    np.testing.assert_array_equal(by_index.measurements.times[0], [0, 1])
    assert data.index("b") == 1
    with pytest.raises(KeyError, match="no individual 'zz'"):
        data.select(["zz"])


# --------------------------------------------------------------------------------------
# 3. Properties.
# --------------------------------------------------------------------------------------

OBSERVABLES = ("A", "B", "C")
NAMES = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=4).filter(
    lambda s: s.lower() not in ("nan", "inf")
)
TIMES = st.one_of(
    st.integers(0, 100).map(float),
    st.floats(0.0, 1e6, allow_nan=False, allow_infinity=False),
)
VALUES = st.one_of(
    st.integers(-5, 5).map(float),
    st.floats(allow_nan=False, allow_infinity=False),
)
SIGMAS = st.one_of(st.none(), st.floats(1e-12, 1e12))
ROW = st.tuples(NAMES, TIMES, st.sampled_from(OBSERVABLES), VALUES, SIGMAS)


@st.composite
def valid_tables(draw, min_rows=1):
    rows = draw(
        st.lists(ROW, min_size=min_rows, max_size=25, unique_by=lambda r: r[:4])
    )
    frame = pd.DataFrame(rows,
                         columns=["individual", "time", "observable", "value", "sigma"])
    if not draw(st.booleans()):
        frame = frame.drop(columns="sigma")
    return frame


def as_text(frame):
    """Cells as the text a file would hold (`repr` keeps floats exact, None -> "")."""
    return frame.apply(
        lambda column: column.map(lambda v: "" if v is None or v != v else repr(v)
                                  if isinstance(v, float) else str(v))
    ).astype(object)


FORMATS = st.sampled_from(["csv", "tsv", "parquet"])


def save(directory, frame, fmt):
    path = directory / f"table.{fmt}"
    if fmt == "parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False, sep="\t" if fmt == "tsv" else ",")
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("property")


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame=valid_tables(), fmt=st.sampled_from(["frame", "text frame", "csv", "tsv",
                                                  "parquet"]))
def test_valid_tables_load_and_round_trip(workdir, frame, fmt):
    if fmt == "frame":
        data = cal.dataset_from_frame(frame, observables=OBSERVABLES)
    elif fmt == "text frame":
        data = cal.dataset_from_frame(as_text(frame), observables=OBSERVABLES)
    else:
        data = cal.load_measurements(save(workdir, as_text(frame), fmt),
                                     observables=OBSERVABLES)
    assert sorted_records(data.to_frame()) == sorted_records(frame)
    assert data.individuals == tuple(dict.fromkeys(frame["individual"]))
    m = data.measurements
    times = np.asarray(m.times)
    assert (np.diff(times, axis=1) >= 0).all()
    assert int(np.asarray(m.mask).sum()) == len(frame)
    # Every slot of an individual before its padding holds at least one measurement.
    n_real = np.asarray(m.mask).any(axis=2).sum(axis=1)
    for i, n in enumerate(n_real):
        assert np.asarray(m.mask)[i, :n].any(axis=1).all()
        assert (times[i, n:] == times[i, n - 1]).all()


def non_numbers():
    def is_number(text):
        return not math.isnan(pd.to_numeric(pd.Series([text.strip()], dtype=object),
                                             errors="coerce").iloc[0])

    return st.text(string.ascii_letters + string.punctuation + " ", min_size=1,
                   max_size=6).filter(lambda s: s.strip() and not is_number(s))


@st.composite
def corrupted_tables(draw):
    """A valid table (as text) with one corruption; returns (frame, row, column)."""
    frame = as_text(draw(valid_tables()))
    kind = draw(st.sampled_from(
        ["non-numeric", "nan", "inf", "negative time", "unknown observable", "duplicate",
         "delete column", "bad sigma"]
    ))
    i = draw(st.integers(0, len(frame) - 1))
    numeric = ["time", "value"] + (["sigma"] if "sigma" in frame else [])
    column = None
    if kind == "non-numeric":
        column = draw(st.sampled_from(numeric))
        frame.iloc[i, frame.columns.get_loc(column)] = draw(non_numbers())
    elif kind == "nan":
        column = draw(st.sampled_from(["time", "value"]))
        frame.iloc[i, frame.columns.get_loc(column)] = draw(st.sampled_from(
            ["NaN", "nan", "", " "]))
    elif kind == "inf":
        column = draw(st.sampled_from(numeric))
        frame.iloc[i, frame.columns.get_loc(column)] = draw(st.sampled_from(
            ["inf", "-inf", "Infinity", "1e999"]))
    elif kind == "negative time":
        column = "time"
        magnitude = draw(st.floats(1e-300, 1e300))
        frame.iloc[i, frame.columns.get_loc(column)] = repr(-magnitude)
    elif kind == "unknown observable":
        column = "observable"
        frame.iloc[i, frame.columns.get_loc(column)] = draw(
            NAMES.filter(lambda s: s not in OBSERVABLES))
    elif kind == "bad sigma":
        if "sigma" not in frame:
            frame["sigma"] = ""
        column = "sigma"
        frame.iloc[i, frame.columns.get_loc(column)] = draw(st.sampled_from(
            ["0", "-1", "-0.0", "-1e-300", "inf"]))
    elif kind == "duplicate":
        j = draw(st.integers(i, len(frame) - 1))  # the copy goes after row j
        frame = pd.concat([frame.iloc[: j + 1], frame.iloc[[i]], frame.iloc[j + 1:]],
                          ignore_index=True)
        i = j + 1
    else:
        column = draw(st.sampled_from(["individual", "time", "observable", "value"]))
        frame = frame.drop(columns=column)
        i = None
    return frame, (None if i is None else i + 2), column, kind


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=corrupted_tables(), fmt=st.one_of(st.just("frame"), FORMATS))
def test_corrupted_tables_raise_located_data_errors(workdir, case, fmt):
    frame, row, column, kind = case
    try:
        if fmt == "frame":
            cal.dataset_from_frame(frame, observables=OBSERVABLES)
        else:
            cal.load_measurements(save(workdir, frame, fmt), observables=OBSERVABLES)
    except cal.DataError as error:
        issues = error.issues
    else:
        pytest.fail(f"{kind}: no DataError")
    assert any(i.row == row and i.column == column for i in issues), (
        kind, row, column, [str(i) for i in issues]
    )
    if kind == "duplicate":
        assert any(i.row == row and "duplicate of row" in i.message for i in issues)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 3)),
                min_size=1, max_size=20))
def test_replicate_slots_property(keys):
    """n replicates at one (individual, time) take n slots at that time, in order."""
    frame = pd.DataFrame(
        [(ind, float(t), "A", float(n)) for n, (ind, t) in enumerate(keys)],
        columns=["individual", "time", "observable", "value"],
    )
    data = cal.dataset_from_frame(frame)
    times = np.asarray(data.measurements.times)
    mask = np.asarray(data.measurements.mask)[..., 0]
    for i, ind in enumerate(data.individuals):
        counts = {t: c for (who, t), c in
                  ((k, len(list(g))) for k, g in itertools.groupby(sorted(keys)))
                  if who == ind}
        real = times[i][mask[i]]
        assert list(real) == sorted(float(t) for t, c in counts.items() for _ in range(c))

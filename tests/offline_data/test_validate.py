"""Corrupted inputs: every one gets an error naming what is wrong, and nothing is written."""

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from envs.spec import ACTION_NAMES, FEATURE_BOUNDS, FEATURE_INDEX, FEATURE_NAMES, MASK_PREFIX, Action
from offline_data.dataset import load_dataset
from offline_data.importer import import_log
from offline_data.io import DataFileError, write_table
from offline_data.schema import COLUMN_BY_NAME, IMPORT_REQUIRED_COLUMNS, Kind
from offline_data.validate import ValidationError
from tests.offline_data.conftest import KEY, raw_log

FORMATS = ["csv", "parquet"]
HYPOTHESIS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NUMERIC = [c for c in ("t", *FEATURE_NAMES, "action", "behavior_prob", "reward")]
BOUNDED = [c for c in ("t", *FEATURE_NAMES, "action", "behavior_prob") if COLUMN_BY_NAME[c].high is not None]


@pytest.fixture(scope="module")
def base(small_frame):
    df = raw_log(small_frame, identifiers=False)
    df.insert(df.columns.get_loc("action_name"), "action", small_frame.action)
    return df


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("corrupt")


def write_raw(df: pd.DataFrame, folder: Path, fmt: str) -> Path:
    path = folder / f"raw.{fmt}"
    if fmt == "csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path, index=False)
    return path


def import_fails(raw: Path, folder: Path) -> str:
    """Import ``raw``; it must fail, name the file and leave the output folder empty."""
    out_dir = folder / "out"
    out_dir.mkdir()
    out = out_dir / "clean.parquet"
    with pytest.raises((ValidationError, DataFileError)) as info:
        import_log(raw, out, key=KEY, report=lambda _: None, warn=lambda _: None)
    message = str(info.value)
    assert message.startswith(str(raw)), message
    assert not out.exists() and list(out_dir.iterdir()) == []
    return message


def fresh(workdir: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=workdir))


@pytest.mark.parametrize("fmt", FORMATS)
@HYPOTHESIS
@given(data=st.data())
def test_wrong_type_names_row_and_column(base, workdir, fmt, data):
    row = data.draw(st.integers(0, len(base) - 1), label="row")
    column = data.draw(st.sampled_from(NUMERIC), label="column")
    text = data.draw(st.sampled_from(["abc", "1,5", "seven", "12 weeks", "0x1F", "--3", "true?"]), label="text")
    df = base.copy()
    df[column] = df[column].astype(str)
    df.loc[row, column] = text
    folder = fresh(workdir)
    message = import_fails(write_raw(df, folder, fmt), folder)
    assert f"row {row + 1}, column {column}: expected" in message and repr(text) in message
    assert "1 problem:" in message


@pytest.mark.parametrize("fmt", FORMATS)
@HYPOTHESIS
@given(data=st.data())
def test_out_of_range_names_row_column_and_range(base, workdir, fmt, data):
    row = data.draw(st.integers(0, len(base) - 1), label="row")
    column = data.draw(st.sampled_from(BOUNDED), label="column")
    spec = COLUMN_BY_NAME[column]
    above = data.draw(st.booleans(), label="above")
    if spec.kind == Kind.INT:
        value: float = spec.high + data.draw(st.integers(1, 50)) if above else spec.low - data.draw(st.integers(1, 50))
    else:
        step = data.draw(st.floats(0.01, 1000, allow_nan=False))
        value = spec.high + step if above else (spec.low - step if not spec.low_open else spec.low - step + 0.001)
        if spec.low_open and not above:
            value = min(value, spec.low)
    df = base.copy()
    df[column] = df[column].astype(float)
    df.loc[row, column] = value
    folder = fresh(workdir)
    message = import_fails(write_raw(df, folder, fmt), folder)
    assert f"row {row + 1}, column {column}: expected {spec.expected()}, got" in message


@pytest.mark.parametrize("fmt", FORMATS)
@HYPOTHESIS
@given(data=st.data())
def test_missing_columns_are_named(base, workdir, fmt, data):
    candidates = [c for c in IMPORT_REQUIRED_COLUMNS if c != "action"]  # action can come from action_name
    dropped = data.draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=3, unique=True), label="dropped")
    folder = fresh(workdir)
    message = import_fails(write_raw(base.drop(columns=dropped), folder, fmt), folder)
    for column in dropped:
        assert f"column {column}: missing column" in message


@pytest.mark.parametrize("fmt", FORMATS)
@HYPOTHESIS
@given(data=st.data())
def test_duplicate_weeks_are_named(base, workdir, fmt, data):
    row = data.draw(st.integers(0, len(base) - 1), label="row")
    df = pd.concat([base.iloc[: row + 1], base.iloc[row: row + 1], base.iloc[row + 1:]], ignore_index=True)
    folder = fresh(workdir)
    message = import_fails(write_raw(df, folder, fmt), folder)
    assert f"row {row + 2}, column t: duplicate week {base.t[row]} of this episode (also in row {row + 1})" in message


@HYPOTHESIS
@given(data=st.data())
def test_truncated_csv_is_named(base, workdir, data):
    folder = fresh(workdir)
    full = write_raw(base, folder, "csv").read_bytes()
    header_end = full.index(b"\n") + 1
    cut = data.draw(st.integers(header_end + 1, len(full) - 1).filter(lambda c: full[c - 1:c] != b"\n"), label="cut")
    raw = folder / "cut.csv"
    raw.write_bytes(full[:cut])
    message = import_fails(raw, folder)
    complete_lines = full[:cut].count(b"\n")  # the header and the complete data rows
    assert "truncated" in message and f"data row {complete_lines}" in message


@HYPOTHESIS
@given(data=st.data())
def test_truncated_parquet_is_named(base, workdir, data):
    folder = fresh(workdir)
    full = write_raw(base, folder, "parquet").read_bytes()
    cut = data.draw(st.integers(1, len(full) - 1), label="cut")
    raw = folder / "cut.parquet"
    raw.write_bytes(full[:cut])
    assert "not a readable Parquet file" in import_fails(raw, folder)


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=40, deadline=None)
@given(garbage=st.binary(min_size=1, max_size=3000))
def test_garbage_bytes_are_refused(workdir, fmt, garbage):
    folder = fresh(workdir)
    raw = folder / f"garbage.{fmt}"
    raw.write_bytes(garbage)
    import_fails(raw, folder)


@pytest.mark.parametrize("fmt", FORMATS)
def test_garbage_after_a_valid_header_names_the_row(base, workdir, fmt):
    folder = fresh(workdir)
    good = write_raw(base, folder, fmt).read_bytes()
    raw = folder / f"mixed.{fmt}"
    if fmt == "csv":
        lines = good.split(b"\n")
        lines[5] = b"\xff\xfe\x00garbage,,"
        raw.write_bytes(b"\n".join(lines))
        assert "data row 5" in import_fails(raw, folder)
    else:
        raw.write_bytes(b"PAR1" + b"\x00" * 64 + good[-1000:])
        assert "not a readable Parquet file" in import_fails(raw, folder)


def test_a_flipped_byte_in_a_clean_file_is_detected(workdir, small_frame):
    path = fresh(workdir) / "clean.parquet"
    write_table(path, small_frame.to_arrow({}))
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside a data page: the page checksum catches it
    path.write_bytes(bytes(data))
    with pytest.raises(DataFileError, match="not a readable Parquet file"):
        load_dataset(path)


def test_first_twenty_problems_then_a_count(base, workdir):
    df = base.copy()
    df.loc[10:39, "phq9"] = 99  # 30 rows
    df.loc[3, "reward"] = np.inf
    folder = fresh(workdir)
    message = import_fails(write_raw(df, folder, "csv"), folder)
    lines = message.splitlines()
    assert lines[0].endswith("31 problems; the first 20:")
    assert lines[1].strip() == "row 4, column reward: expected a number in [-1e+30, 1e+30], got 'inf'"
    assert lines[2].strip() == "row 11, column phq9: expected a number in [0, 27], got '99.0'"
    assert len(lines) == 22 and lines[-1].strip() == "... and 11 more"


def test_weeks_must_increase_within_an_episode(base, workdir):
    df = base.copy()
    first = df.index[df.patient_id == df.patient_id[0]]
    df.loc[first[1]], df.loc[first[2]] = df.loc[first[2]].copy(), df.loc[first[1]].copy()
    folder = fresh(workdir)
    message = import_fails(write_raw(df, folder, "csv"), folder)
    assert f"row {first[2] + 1}, column t: week 1 comes after week 2 of this episode (row {first[1] + 1})" in message


def test_actions_must_be_allowed(base, small_frame, workdir):
    dose = FEATURE_INDEX["dose_level"]
    row = int(np.flatnonzero(small_frame.obs[:, dose] == 0)[0]) if (small_frame.obs[:, dose] == 0).any() else None
    df = base.copy()
    # raise_dose where the dose changed less than 2 weeks ago (every intake week)
    intake = int(np.flatnonzero(small_frame.t == 0)[0])
    df.loc[intake, "action"] = int(Action.RAISE_DOSE)
    df.loc[intake, "action_name"] = "raise_dose"
    folder = fresh(workdir)
    message = import_fails(write_raw(df, folder, "csv"), folder)
    assert f"row {intake + 1}, column action: action 1 (raise_dose) is not allowed by the clinical rules" in message
    assert "the dose changed less than 2 weeks ago" in message
    del row

    # with an allowed_actions column, that is what counts
    df = raw_log(small_frame, identifiers=False, with_allowed=True)
    df.loc[7, "allowed_actions"] = 1 << int(Action.REFER_SPECIALIST)
    df.loc[7, "action_name"] = "continue"
    folder = fresh(workdir)
    message = import_fails(write_raw(df, folder, "csv"), folder)
    assert "row 8, column action: action 0 (continue) is not allowed by allowed_actions=512" in message


def test_action_and_action_name_must_agree(base, workdir):
    df = base.copy()
    df.loc[2, "action_name"] = ACTION_NAMES[(int(df.action[2]) + 1) % len(ACTION_NAMES)]
    df.loc[4, "action_name"] = "electroconvulsive"
    folder = fresh(workdir)
    message = import_fails(write_raw(df, folder, "csv"), folder)
    assert f"row 3, column action_name: expected {ACTION_NAMES[int(base.action[2])]!r}" in message
    assert "row 5, column action_name: expected one of continue, raise_dose" in message


def test_missing_measurements_are_carried_forward_only_when_masked(small_frame, workdir, tmp_path):
    df = raw_log(small_frame, identifiers=False)
    mask_col = MASK_PREFIX + "phq9"
    unobserved = np.flatnonzero((df[mask_col] == 0) & (df.t > 0))[:5]
    expected = df.phq9[unobserved].to_numpy()  # the simulator carries the last observed value forward
    df.loc[unobserved, "phq9"] = np.nan
    raw = tmp_path / "gaps.csv"
    df.to_csv(raw, index=False)
    out = tmp_path / "out" / "clean.parquet"
    import_log(raw, out, key=KEY, report=lambda _: None, warn=lambda _: None)
    clean = load_dataset(out)
    assert not np.isnan(clean.frame.obs).any()
    # rows are re-sorted by pseudonym: find the same (t, reward) rows back
    for i, value in zip(unobserved, expected, strict=True):
        hit = (clean.frame.t == df.t[i]) & (clean.frame.reward == np.float32(df.reward[i]))
        assert set(clean.frame.obs[hit, FEATURE_INDEX["phq9"]]) == {value}

    observed = int(np.flatnonzero(df[mask_col] == 1)[0])
    df.loc[observed, "phq9"] = np.nan
    df.to_csv(raw, index=False)
    folder = fresh(workdir)
    message = import_fails(raw, folder)
    assert f"row {observed + 1}, column phq9: missing value while mask_phq9 is 1" in message


def test_clean_files_need_every_column(small_frame, workdir):
    folder = fresh(workdir)
    path = folder / "clean.csv"
    write_table(path, small_frame.to_arrow({}).drop_columns(["allowed_actions", "behavior_prob"]))
    with pytest.raises(ValidationError) as info:
        load_dataset(path)
    assert "column behavior_prob: missing column" in str(info.value)
    assert "column allowed_actions: missing column" in str(info.value)
    assert str(info.value).startswith(str(path))


def test_feature_bounds_are_the_spec_bounds():
    for name in FEATURE_NAMES:
        assert (COLUMN_BY_NAME[name].low, COLUMN_BY_NAME[name].high) == FEATURE_BOUNDS[name]

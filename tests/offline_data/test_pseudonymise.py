import hashlib
import hmac
import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from envs.spec import FEATURE_INDEX
from offline_data import pseudonymise as P
from offline_data.dataset import load_dataset
from offline_data.importer import check_key_location, import_log, plan_columns
from offline_data.io import read_metadata
from tests.offline_data.conftest import KEY, OTHER_KEY, raw_log, simulated_frame


def quiet(**kwargs):
    return {"report": lambda _: None, "warn": lambda _: None, **kwargs}


def test_pseudonyms_are_keyed_hmac_sha256_and_deterministic():
    assert P.pseudonym(KEY, "MRN-1") == hmac.new(KEY, b"MRN-1", hashlib.sha256).hexdigest()
    assert P.pseudonym(KEY, "MRN-1") == P.pseudonym(KEY, "MRN-1")
    assert P.pseudonym(KEY, "MRN-1") != P.pseudonym(OTHER_KEY, "MRN-1")
    assert P.pseudonym(KEY, "MRN-1") != P.pseudonym(KEY, "MRN-2")
    assert re.fullmatch(r"[0-9a-f]{64}", P.pseudonym(KEY, "MRN-1"))


def test_identifier_columns_are_matched_case_insensitively():
    for name in ("Name", "EMAIL", "e-mail", "Phone Number", "MRN", "Date of Birth", "DOB", "SSN", "NHS_Number",
                 "Address", "postcode"):
        assert P.is_direct_identifier(name), name
    for name in ("action_name", "phq9", "sex", "age_band", "visit_date", "t"):
        assert not P.is_direct_identifier(name), name
    assert P.is_date_column("visit_date") and P.is_date_column("Date") and not P.is_date_column("date_of_birth")


def test_key_is_required_and_must_be_long_enough(tmp_path):
    with pytest.raises(ValueError, match=f"no pseudonymisation key.*{P.KEY_ENV_VAR}"):
        P.load_key(None, environ={})
    assert P.load_key(None, environ={P.KEY_ENV_VAR: KEY.decode()}) == KEY
    short = tmp_path / "short.key"
    short.write_text("tiny\n")
    with pytest.raises(ValueError, match="at least 16"):
        P.load_key(short, environ={})
    good = tmp_path / "good.key"
    good.write_bytes(KEY + b"\n")
    assert P.load_key(good, environ={}) == KEY  # a trailing newline is not part of the key
    with pytest.raises(FileNotFoundError, match="key file not found"):
        P.load_key(tmp_path / "missing.key", environ={})
    with pytest.raises(ValueError, match="apart from the data"):
        check_key_location(good, tmp_path / "clean.parquet")


@pytest.fixture(scope="module")
def imported(tmp_path_factory, small_frame):
    folder = tmp_path_factory.mktemp("pseudo")
    raw = raw_log(small_frame, with_t=False)  # identifiers, visit dates instead of weeks
    raw["ethnicity"] = np.where(small_frame.patient_code % 2 == 0, "group a", "group b")
    raw["free_text_notes"] = "patient said something"
    path = folder / "raw.csv"
    raw.to_csv(path, index=False)
    out = folder / "out" / "clean.parquet"
    result = import_log(path, out, key=KEY, k=2, **quiet())
    return raw, out, result


def test_no_raw_identifier_survives_in_the_output_bytes(imported):
    raw, out, result = imported
    data = out.read_bytes()
    table = pq.read_table(out)
    as_text = table.to_pandas().to_csv() + json.dumps(read_metadata(out))
    for column in ("patient_id", "Name", "email", "Phone", "date_of_birth", "visit_date"):
        for value in raw[column].unique():
            assert str(value).encode() not in data, (column, value)
            assert str(value) not in as_text, (column, value)
    assert b"example.org" not in data and b"MRN" not in data and b"Jane" not in data
    assert b"2022-" not in data and b"2023-" not in data and b"1961-" not in data
    assert "patient said something" not in as_text
    assert {"Name", "email", "Phone", "date_of_birth", "visit_date", "free_text_notes"}.isdisjoint(table.column_names)
    assert result.plan.identifiers == ["Name", "email", "Phone", "date_of_birth"]
    assert result.plan.unknown == ["free_text_notes"] and result.plan.subgroups == ["ethnicity"]


def test_ids_are_the_hmac_of_the_raw_ids_and_rows_keep_their_patient(imported, small_frame):
    raw, out, _ = imported
    data = load_dataset(out)
    expected = {P.pseudonym(KEY, r) for r in raw.patient_id.unique()}
    assert set(data.patient_ids()) == expected
    # each patient's rows are intact: per pseudonym, the same rewards as the raw patient
    by_raw = raw.groupby("patient_id").reward.apply(lambda r: sorted(np.float32(r)))
    for raw_id, rewards in by_raw.items():
        code = int(np.flatnonzero(data.frame.patient_ids == P.pseudonym(KEY, raw_id))[0])
        assert sorted(data.frame.reward[data.frame.patient_code == code]) == rewards
    # rows are ordered by pseudonym, not in the raw (record-number) order
    first_rows = data.frame.patient_ids[data.frame.patient_code[data.starts[:-1]]]
    assert list(first_rows) == sorted(first_rows)


def test_dates_become_weeks_since_the_patients_first_date(imported, small_frame):
    _, out, result = imported
    data = load_dataset(out)
    assert result.plan.date_column == "visit_date"
    # weeks in care (a feature) and t agree, as they did in the simulated log
    assert np.array_equal(data.frame.t, data.frame.obs[:, FEATURE_INDEX["weeks_in_care"]])
    assert sorted(data.frame.t.tolist()) == sorted(small_frame.t.tolist())
    meta = read_metadata(out)
    assert meta["import"]["t_from_date_column"] == "visit_date"
    assert meta["import"]["dropped_date_columns"] == ["visit_date"]
    assert meta["import"]["pseudonymisation"]["method"].startswith("HMAC-SHA256")


def test_another_key_gives_other_ids(tmp_path, small_frame):
    raw = raw_log(small_frame)
    path = tmp_path / "raw.csv"
    raw.to_csv(path, index=False)
    a = import_log(path, tmp_path / "a" / "a.parquet", key=KEY, **quiet())
    b = import_log(path, tmp_path / "b" / "b.parquet", key=OTHER_KEY, **quiet())
    again = import_log(path, tmp_path / "c" / "c.parquet", key=KEY, **quiet())
    ids_a, ids_b = set(load_dataset(a.out).patient_ids()), set(load_dataset(b.out).patient_ids())
    assert ids_a.isdisjoint(ids_b) and len(ids_a) == len(ids_b) == 60
    assert a.out.read_bytes() == again.out.read_bytes()  # deterministic for a key
    assert a.metadata["import"]["pseudonymisation"]["key_fingerprint"] != (
        b.metadata["import"]["pseudonymisation"]["key_fingerprint"])


def test_k_anonymity_warns_about_small_groups(tmp_path):
    frame = simulated_frame(patients=12, horizon=3, seed=8)
    raw = raw_log(frame)
    path = tmp_path / "raw.csv"
    raw.to_csv(path, index=False)
    warnings: list[str] = []
    result = import_log(path, tmp_path / "out" / "k.parquet", key=KEY, k=5, report=lambda _: None,
                        warn=warnings.append)
    assert not result.k_anonymity.ok and result.k_anonymity.groups_below_k > 0
    assert len(warnings) == 1 and "WARNING" in warnings[0] and "smaller than k=5" in warnings[0]
    assert "sex" in warnings[0] and "age_band" in warnings[0]
    meta = read_metadata(result.out)["k_anonymity"]
    assert meta["k"] == 5 and meta["groups_below_k"] == result.k_anonymity.groups_below_k
    assert meta["quasi_identifiers"] == ["sex", "age_band", "digital_access"]

    quiet_warnings: list[str] = []
    result = import_log(path, tmp_path / "out2" / "k.parquet", key=KEY, k=1, report=lambda _: None,
                        warn=quiet_warnings.append)
    assert result.k_anonymity.ok and quiet_warnings == []


def test_k_anonymity_counts_patients_not_rows():
    codes = np.array([0, 0, 0, 1, 2, 2])
    report = P.k_anonymity(codes, {"sex": np.array([0, 0, 0, 1, 0, 0]), "age_band": np.array([2, 2, 2, 1, 2, 2])}, 2)
    assert report.groups == 2 and report.smallest_group == 1 and report.groups_below_k == 1
    assert report.small_groups == [{"values": {"sex": "1", "age_band": "1"}, "patients": 1}]


def test_an_identifier_column_can_be_the_patient_id(tmp_path, small_frame):
    raw = raw_log(small_frame).rename(columns={"patient_id": "MRN"})
    path = tmp_path / "raw.csv"
    raw.to_csv(path, index=False)
    result = import_log(path, tmp_path / "o" / "c.parquet", key=KEY, id_column="MRN", **quiet())
    assert set(load_dataset(result.out).patient_ids()) == {P.pseudonym(KEY, r) for r in raw.MRN.unique()}
    assert b"MRN-7" not in result.out.read_bytes()
    with pytest.raises(ValueError, match="no patient id column 'mrn_number'"):
        plan_columns(list(raw.columns), id_column="mrn_number")


def test_windows_csv_and_parquet_date_columns_import(tmp_path, small_frame):
    raw = raw_log(small_frame, with_t=False)
    crlf = tmp_path / "excel.csv"
    crlf.write_bytes(b"\xef\xbb\xbf" + raw.to_csv(index=False, lineterminator="\r\n").encode())
    a = import_log(crlf, tmp_path / "a" / "a.parquet", key=KEY, **quiet())
    typed = raw.assign(visit_date=raw.visit_date.astype("datetime64[s]"))  # a real date column
    pq_raw = tmp_path / "typed.parquet"
    typed.to_parquet(pq_raw, index=False)
    b = import_log(pq_raw, tmp_path / "b" / "b.parquet", key=KEY, **quiet())
    ta, tb = load_dataset(a.out).frame, load_dataset(b.out).frame
    assert np.array_equal(ta.t, tb.t) and np.array_equal(ta.obs, tb.obs)
    assert sorted(ta.t.tolist()) == sorted(small_frame.t.tolist())


def test_weeks_count_from_each_patients_earliest_date():
    codes = np.array([0, 0, 0, 1, 1])
    days = np.array(["2024-03-13", "2024-03-04", "2024-03-10", "2023-12-30", "2024-01-06"], dtype="datetime64[D]")
    assert P.weeks_since_first_date(codes, days).tolist() == [1, 0, 0, 0, 1]

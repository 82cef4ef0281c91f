import numpy as np
import pyarrow as pa
import pytest

from envs.spec import ACTION_NAMES, FEATURE_BOUNDS, FEATURE_NAMES, MASK_PREFIX, MASKABLE_FEATURES, N_ACTIONS
from offline_data import schema
from offline_data.schema import COLUMN_BY_NAME, COLUMNS, Kind


def test_feature_columns_are_the_spec_features_in_order():
    names = [c.name for c in COLUMNS]
    assert names[:3] == ["patient_id", "episode_id", "t"]
    assert tuple(names[3:3 + len(FEATURE_NAMES)]) == FEATURE_NAMES
    for name in MASKABLE_FEATURES:  # mask columns are features already, not added twice
        assert names.count(MASK_PREFIX + name) == 1
    for name in ("sex", "age_band", "digital_access"):
        assert names.count(name) == 1


def test_ranges_come_from_the_spec_and_probabilities_exclude_zero():
    for name, (low, high) in FEATURE_BOUNDS.items():
        assert (COLUMN_BY_NAME[name].low, COLUMN_BY_NAME[name].high) == (low, high)
    assert (COLUMN_BY_NAME["phq9"].low, COLUMN_BY_NAME["phq9"].high) == (0, 27)
    assert (COLUMN_BY_NAME["phq9_item9"].low, COLUMN_BY_NAME["phq9_item9"].high) == (0, 3)
    assert (COLUMN_BY_NAME["gad7"].low, COLUMN_BY_NAME["gad7"].high) == (0, 21)
    prob = COLUMN_BY_NAME["behavior_prob"]
    assert prob.low_open and prob.expected() == "a number in (0, 1]"
    assert COLUMN_BY_NAME["action"].high == N_ACTIONS - 1
    assert COLUMN_BY_NAME[MASK_PREFIX + "phq9"].kind == Kind.INT
    assert COLUMN_BY_NAME[MASK_PREFIX + "phq9"].expected() == "0 or 1"


def test_true_phq9_is_optional_and_documented_as_evaluation_only():
    column = COLUMN_BY_NAME["true_phq9"]
    assert not column.required and "evaluation" in column.description
    assert "true_phq9" not in schema.REQUIRED_COLUMNS


def test_bits_round_trip():
    rng = np.random.default_rng(0)
    mask = rng.random((500, N_ACTIONS)) < 0.5
    bits = schema.mask_to_bits(mask)
    assert bits.max() <= schema.ALL_ACTIONS_BITS
    assert np.array_equal(schema.bits_to_mask(bits), mask)
    assert schema.mask_to_bits(np.eye(N_ACTIONS, dtype=bool)).tolist() == [1 << a for a in range(N_ACTIONS)]


def test_metadata_round_trips_and_refuses_other_feature_lists():
    meta = schema.base_metadata(source="simulator", behavior_policy={"name": "stard", "epsilon": 0.1}, seed=7,
                                behavior_prob_estimated=False)
    encoded = schema.encode_metadata(meta)
    assert all(key.startswith(b"carepath.") for key in encoded)
    decoded = schema.decode_metadata({**encoded, b"ARROW:schema": b"\x00binary"})
    assert decoded == meta
    assert decoded["features"] == list(FEATURE_NAMES) and decoded["actions"] == list(ACTION_NAMES)
    schema.check_compatible(decoded, "f.parquet")
    try:
        schema.check_compatible({**decoded, "features": ["phq9"]}, "f.parquet")
    except ValueError as err:
        assert "f.parquet" in str(err) and "feature list" in str(err)
    else:
        raise AssertionError("a different feature list must be refused")


def test_arrow_schema_follows_column_order():
    arrow = schema.arrow_schema(["t", "patient_id", "reward"], {"seed": 1}, {"ethnicity": pa.string()})
    assert arrow.names == ["patient_id", "t", "reward", "ethnicity"]
    assert schema.decode_metadata(arrow.metadata) == {"seed": 1}


def test_a_log_of_an_older_spec_version_is_refused_naming_the_version():
    from envs.spec import SPEC_VERSION
    from offline_data.schema import META_SPEC_VERSION, check_compatible

    with pytest.raises(ValueError, match=rf"log\.parquet: written for spec version 1, this carepath reads spec "
                                         rf"version {SPEC_VERSION} \(.*taper_antidepressant.*\); regenerate"):
        check_compatible({META_SPEC_VERSION: 1}, "log.parquet")

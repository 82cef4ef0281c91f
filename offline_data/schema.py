"""The logged-data schema: one row per patient-week.

This module is the one place that says which columns a logged-data file has,
their types and their valid ranges; the generator, the importer, the
validator, the loader and ``describe`` all read it. Feature and action names
come from :mod:`envs.spec` (never spelled here), and feature ranges from
``envs.spec.FEATURE_BOUNDS``.

A row is the patient's week ``t``: the observation at the start of the week,
the action taken then, the reward for the week, and whether the patient left
care during it (``terminated``) or the log ends there at the horizon
(``truncated``). The observation the last action led to is not a row of its
own (no action was taken there), so the last transition of an episode has no
successor: it is always ``done``.

``true_phq9`` (hidden severity at the start of the week) exists only in
simulated data and is for evaluation only: no agent may read it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import numpy as np
import pyarrow as pa

from envs.spec import (
    ACTION_NAMES,
    FEATURE_BOUNDS,
    FEATURE_NAMES,
    MASK_PREFIX,
    N_ACTIONS,
    SPEC_CHANGES,
    SPEC_VERSION,
    SUBGROUP_FEATURES,
)

#: Bump when a column is added, removed or changes meaning.
SCHEMA_VERSION: Final = 1

#: Weeks are bounded as envs.spec bounds its week counters (ten years).
MAX_WEEK: Final = 520
#: Bits 0..N_ACTIONS-1 of ``allowed_actions``.
ALL_ACTIONS_BITS: Final = (1 << N_ACTIONS) - 1
#: The PHQ-9 total's range, for the hidden ``true_phq9``.
PHQ9_RANGE: Final = (0.0, 27.0)


class Kind(StrEnum):
    """How a column's values are read and checked."""

    STRING = "string"
    INT = "int"  # whole numbers
    FLOAT = "float"
    BOOL = "bool"


@dataclass(frozen=True)
class Column:
    """A column: its storage type, range and whether it must be present.

    ``low_open`` makes the lower bound exclusive (probabilities are in (0, 1]).
    ``derived`` says how the importer fills the column when a raw log lacks it
    (empty: the column is required in raw logs too).
    """

    name: str
    kind: Kind
    arrow_type: pa.DataType
    description: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    required: bool = True
    derived: str = ""

    def expected(self) -> str:
        """What a valid value looks like, for error messages."""
        what = {Kind.STRING: "a non-empty text", Kind.INT: "a whole number", Kind.FLOAT: "a number",
                Kind.BOOL: "true or false"}[self.kind]
        if self.low is None:
            return what
        low, high = _number(self.low), _number(self.high)
        if self.high is None:
            return f"{what} {'>' if self.low_open else '>='} {low}"
        if self.kind == Kind.INT and self.high - self.low == 1:
            return f"{low} or {high}"
        return f"{what} in {'(' if self.low_open else '['}{low}, {high}]"


def _number(value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() and abs(value) <= 2**53 else f"{value:g}"


def _feature_column(name: str) -> Column:
    low, high = FEATURE_BOUNDS[name]
    # Missingness indicators and subgroup codes are categorical: whole numbers only.
    discrete = name.startswith(MASK_PREFIX) or name in SUBGROUP_FEATURES
    return Column(name, Kind.INT if discrete else Kind.FLOAT, pa.float32(), f"observation feature {name}", low, high)


ID_COLUMNS: Final[tuple[Column, ...]] = (
    Column("patient_id", Kind.STRING, pa.dictionary(pa.int32(), pa.string()),
           "pseudonymous patient id (simulated: 'sim-' + hex; imported: HMAC-SHA256 hex)"),
    Column("episode_id", Kind.INT, pa.int64(), "episode of care; an episode is (patient_id, episode_id)",
           0, 2**53, derived="0 for every row (one episode per patient)"),
    Column("t", Kind.INT, pa.int16(), "week since the patient's intake (0 = intake)", 0, MAX_WEEK,
           derived="from a calendar date column: whole weeks since the patient's first date"),
)
FEATURE_COLUMNS: Final[tuple[Column, ...]] = tuple(_feature_column(name) for name in FEATURE_NAMES)
ACTION_COLUMNS: Final[tuple[Column, ...]] = (
    Column("action", Kind.INT, pa.int8(), "index of the action taken this week (envs.spec.ACTION_NAMES)",
           0, N_ACTIONS - 1, derived="from action_name"),
    Column("action_name", Kind.STRING, pa.dictionary(pa.int8(), pa.string()), "name of the action taken",
           derived="from action"),
    Column("behavior_prob", Kind.FLOAT, pa.float64(),
           "probability the logging policy gave the logged action", 0.0, 1.0, low_open=True,
           derived="estimated with a multinomial logistic model (behavior_prob_estimated in the metadata)"),
    Column("allowed_actions", Kind.INT, pa.int16(), "bit mask of the actions allowed this week (bit a = action a)",
           1, ALL_ACTIONS_BITS, derived="from the features with envs.rules.action_mask"),
)
OUTCOME_COLUMNS: Final[tuple[Column, ...]] = (
    # bounded only to fit its float32 storage
    Column("reward", Kind.FLOAT, pa.float32(), "reward for the week", -1e30, 1e30),
    Column("terminated", Kind.BOOL, pa.bool_(), "the patient left care during this week",
           derived="false"),
    Column("truncated", Kind.BOOL, pa.bool_(), "the log ends after this week without the patient leaving care",
           derived="true on the last row of each episode"),
)
EVALUATION_COLUMNS: Final[tuple[Column, ...]] = (
    Column("true_phq9", Kind.FLOAT, pa.float32(),
           "hidden true severity (simulator only): for evaluation, never for training", *PHQ9_RANGE,
           required=False),
)

#: Every column of a clean file, in file order.
COLUMNS: Final[tuple[Column, ...]] = ID_COLUMNS + FEATURE_COLUMNS + ACTION_COLUMNS + OUTCOME_COLUMNS + (
    EVALUATION_COLUMNS)
COLUMN_BY_NAME: Final[dict[str, Column]] = {c.name: c for c in COLUMNS}
REQUIRED_COLUMNS: Final[tuple[str, ...]] = tuple(c.name for c in COLUMNS if c.required)
#: Columns a raw log must have (the rest can be derived on import).
IMPORT_REQUIRED_COLUMNS: Final[tuple[str, ...]] = tuple(c.name for c in COLUMNS if c.required and not c.derived)
#: Subgroup columns are observation features already (envs.spec.SUBGROUP_FEATURES).
SUBGROUP_COLUMNS: Final[tuple[str, ...]] = SUBGROUP_FEATURES
assert set(SUBGROUP_COLUMNS) <= set(FEATURE_NAMES)
assert len(COLUMN_BY_NAME) == len(COLUMNS), "column names must be unique"


def arrow_schema(names: tuple[str, ...] | list[str], metadata: Mapping[str, Any] | None = None,
                 extra: Mapping[str, pa.DataType] | None = None) -> pa.Schema:
    """The Arrow schema of a clean file holding ``names`` (schema columns in schema
    order, then ``extra`` subgroup columns), with the key-value ``metadata``."""
    fields = [pa.field(c.name, c.arrow_type, nullable=False) for c in COLUMNS if c.name in names]
    fields += [pa.field(name, dtype) for name, dtype in (extra or {}).items()]
    return pa.schema(fields, metadata=encode_metadata(metadata or {}))


# ------------------------------------------------------------------ metadata

#: Key-value metadata keys are ``carepath.<key>`` with JSON values.
META_PREFIX: Final = "carepath."
#: Keys every clean file has.
META_SCHEMA_VERSION: Final = "schema_version"
META_SPEC_VERSION: Final = "spec_version"
META_FEATURES: Final = "features"
META_ACTIONS: Final = "actions"
META_SOURCE: Final = "source"  # "simulator" or "import"
META_ENV_SETTINGS: Final = "env_settings"  # EnvSettings as a dict (simulator) or null
META_SIM_PARAMS: Final = "sim_params"  # {"path", "sha256", "overrides"} (simulator) or null
META_BEHAVIOR_POLICY: Final = "behavior_policy"  # {"name", "epsilon"}
META_SEED: Final = "seed"
META_BEHAVIOR_PROB_ESTIMATED: Final = "behavior_prob_estimated"
META_CAREPATH_VERSION: Final = "carepath_version"
#: Keys only some files have.
META_GENERATION: Final = "generation"  # patients, chunk size, horizon, ...
META_IMPORT: Final = "import"  # source hash, dropped columns, pseudonymisation method
META_K_ANONYMITY: Final = "k_anonymity"
META_BEHAVIOR_MODEL: Final = "behavior_model"  # calibration of estimated probabilities


def base_metadata(*, source: str, behavior_policy: Mapping[str, Any], seed: int | None,
                  behavior_prob_estimated: bool, env_settings: Mapping[str, Any] | None = None,
                  sim_params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The metadata every clean file carries."""
    return {
        META_SCHEMA_VERSION: SCHEMA_VERSION,
        META_SPEC_VERSION: SPEC_VERSION,
        META_FEATURES: list(FEATURE_NAMES),
        META_ACTIONS: list(ACTION_NAMES),
        META_SOURCE: source,
        META_ENV_SETTINGS: dict(env_settings) if env_settings is not None else None,
        META_SIM_PARAMS: dict(sim_params) if sim_params is not None else None,
        META_BEHAVIOR_POLICY: dict(behavior_policy),
        META_SEED: seed,
        META_BEHAVIOR_PROB_ESTIMATED: behavior_prob_estimated,
        META_CAREPATH_VERSION: carepath_version(),
    }


def carepath_version() -> str:
    """The installed carepath version (read from the distribution: offline_data
    does not import the ``carepath`` dispatcher package)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("carepath")
    except PackageNotFoundError:
        return "0+unknown"


def encode_metadata(metadata: Mapping[str, Any]) -> dict[bytes, bytes]:
    return {(META_PREFIX + key).encode(): json.dumps(value, sort_keys=True, default=str).encode()
            for key, value in metadata.items()}


def decode_metadata(raw: Mapping[bytes, bytes] | None) -> dict[str, Any]:
    """Our keys from Arrow key-value metadata, prefix removed, values decoded."""
    out: dict[str, Any] = {}
    for key, value in (raw or {}).items():
        name = key.decode("utf-8", "replace")
        if name.startswith(META_PREFIX):
            try:
                out[name[len(META_PREFIX):]] = json.loads(value)
            except json.JSONDecodeError:
                out[name[len(META_PREFIX):]] = value.decode("utf-8", "replace")
    return out


def check_compatible(metadata: Mapping[str, Any], where: str) -> None:
    """Refuse a file written for other feature or action lists (or a newer schema)."""
    if not metadata:
        return  # CSV files carry no metadata; their columns are checked instead
    version = metadata.get(META_SCHEMA_VERSION)
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise ValueError(f"{where}: schema version {version} is newer than this carepath reads ({SCHEMA_VERSION})")
    spec = metadata.get(META_SPEC_VERSION)
    if isinstance(spec, int) and spec != SPEC_VERSION:
        raise ValueError(f"{where}: written for spec version {spec}, this carepath reads spec version {SPEC_VERSION} "
                         f"({SPEC_CHANGES.get(SPEC_VERSION, 'features or actions changed')}); regenerate the log "
                         "(carepath data generate) or re-import the raw data (carepath data import)")
    features = metadata.get(META_FEATURES)
    if features is not None and list(features) != list(FEATURE_NAMES):
        raise ValueError(f"{where}: its feature list differs from envs.spec.FEATURE_NAMES; expected "
                         f"{list(FEATURE_NAMES)}, got {features}")
    actions = metadata.get(META_ACTIONS)
    if actions is not None and list(actions) != list(ACTION_NAMES):
        raise ValueError(f"{where}: its action list differs from envs.spec.ACTION_NAMES; expected "
                         f"{list(ACTION_NAMES)}, got {actions}")


def mask_to_bits(mask: np.ndarray) -> np.ndarray:
    """(n, N_ACTIONS) bool -> int64 bit masks (bit a = action a allowed)."""
    return (np.asarray(mask, dtype=np.int64) << np.arange(N_ACTIONS, dtype=np.int64)).sum(axis=1)


def bits_to_mask(bits: np.ndarray) -> np.ndarray:
    """int bit masks (0..2**N_ACTIONS-1) -> (n, N_ACTIONS) bool."""
    as_bytes = np.asarray(bits).astype("<u2").view(np.uint8).reshape(-1, 2)
    return np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :N_ACTIONS].astype(bool)

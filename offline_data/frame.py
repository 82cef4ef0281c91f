"""A validated log in memory: typed numpy columns, and its conversion to Arrow.

Generation, import and loading all meet here: whatever they read or
simulate becomes a :class:`LogFrame`, and only a ``LogFrame`` is written. The
observation features are held as one (rows, n_features) float32 matrix in
``envs.spec.FEATURE_NAMES`` order, as agents want them; patient ids are held
once each (``patient_ids``) with a per-row index into them, as the Parquet
dictionary encoding stores them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray

from envs.spec import ACTION_NAMES, FEATURE_NAMES
from offline_data.schema import COLUMN_BY_NAME, arrow_schema, mask_to_bits

IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]
ObjArray = NDArray[np.object_]


@dataclass(frozen=True)
class LogFrame:
    """One row per patient-week; every array has ``len(self)`` rows.

    ``behavior_prob`` is ``None`` only between reading a raw log that lacks it
    and estimating it; ``true_phq9`` only exists for simulated data (it is the
    hidden severity: evaluation only). ``extra`` holds kept subgroup columns
    that are not observation features (e.g. ``ethnicity`` from an import).
    """

    patient_ids: ObjArray
    patient_code: IntArray
    episode_id: IntArray
    t: IntArray
    obs: NDArray[np.float32]
    action: IntArray
    behavior_prob: NDArray[np.float64] | None
    allowed: BoolArray
    reward: NDArray[np.float32]
    terminated: BoolArray
    truncated: BoolArray
    true_phq9: NDArray[np.float32] | None = None
    extra: dict[str, ObjArray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.t)

    def take(self, rows: IntArray | BoolArray) -> LogFrame:
        """The rows selected (in the given order); patient ids are kept as they are."""
        return replace(
            self,
            patient_code=self.patient_code[rows],
            episode_id=self.episode_id[rows],
            t=self.t[rows],
            obs=self.obs[rows],
            action=self.action[rows],
            behavior_prob=None if self.behavior_prob is None else self.behavior_prob[rows],
            allowed=self.allowed[rows],
            reward=self.reward[rows],
            terminated=self.terminated[rows],
            truncated=self.truncated[rows],
            true_phq9=None if self.true_phq9 is None else self.true_phq9[rows],
            extra={name: values[rows] for name, values in self.extra.items()},
        )

    def row_patient_ids(self) -> ObjArray:
        return self.patient_ids[self.patient_code]

    def sort_order(self, by_id: bool = False) -> IntArray | None:
        """The order that groups rows by episode with weeks increasing (patients in
        order of first appearance, or of their ids with ``by_id``), or None when the
        rows already are so (the common case: no copy of every column)."""
        if by_id:
            rank = np.empty(len(self.patient_ids), dtype=np.int64)
            rank[np.argsort(self.patient_ids.astype(str), kind="stable")] = np.arange(len(self.patient_ids))
            patient = rank[self.patient_code]
        else:
            patient = self.patient_code
        if not by_id or bool(np.all(patient[1:] >= patient[:-1])):
            starts = self.episode_starts()
            first = np.zeros(len(self), dtype=bool)
            first[starts[:-1]] = True
            grouped = distinct_pairs(patient[starts[:-1]], self.episode_id[starts[:-1]]) == len(starts) - 1
            if grouped and bool(np.all(first[1:] | (self.t[1:] > self.t[:-1]))):
                return None
        if not by_id:  # rank patients by first appearance
            first_seen = np.full(len(self.patient_ids), len(self), dtype=np.int64)
            np.minimum.at(first_seen, self.patient_code, np.arange(len(self)))
            rank = np.empty(len(self.patient_ids), dtype=np.int64)
            rank[np.argsort(first_seen, kind="stable")] = np.arange(len(self.patient_ids))
            patient = rank[self.patient_code]
        return np.lexsort((self.t, self.episode_id, patient)).astype(np.int64)

    def sorted(self, by_id: bool = False) -> LogFrame:
        """Rows grouped by episode, weeks increasing (see :meth:`sort_order`)."""
        order = self.sort_order(by_id)
        return self if order is None else self.take(order)

    def episode_starts(self) -> IntArray:
        """Offsets of each episode's first row, plus ``len(self)`` at the end
        (rows must be grouped by episode, as :meth:`sorted` leaves them)."""
        n = len(self)
        change = np.ones(n, dtype=bool)
        if n:
            change[1:] = (self.patient_code[1:] != self.patient_code[:-1]) | (
                self.episode_id[1:] != self.episode_id[:-1])
        return np.append(np.flatnonzero(change), n).astype(np.int64)

    def with_patient_ids(self, patient_ids: ObjArray) -> LogFrame:
        """The same rows under new ids (one per current id, same order)."""
        if len(patient_ids) != len(self.patient_ids):
            raise ValueError(f"expected {len(self.patient_ids)} new patient ids, got {len(patient_ids)}")
        return replace(self, patient_ids=np.asarray(patient_ids, dtype=object))

    def to_arrow(self, metadata: Mapping[str, Any] | None = None) -> pa.Table:
        """The rows as an Arrow table in schema column order, with ``metadata``."""
        if self.behavior_prob is None:
            raise ValueError("behavior_prob is missing: estimate it before writing")
        code_type = COLUMN_BY_NAME["patient_id"].arrow_type.index_type
        name_type = COLUMN_BY_NAME["action_name"].arrow_type.index_type
        arrays: dict[str, pa.Array] = {
            "patient_id": pa.DictionaryArray.from_arrays(
                pa.array(self.patient_code, type=code_type), pa.array(list(self.patient_ids), type=pa.string())),
            "episode_id": pa.array(self.episode_id, type=pa.int64()),
            "t": pa.array(self.t.astype(COLUMN_BY_NAME["t"].arrow_type.to_pandas_dtype())),
        }
        obs = np.ascontiguousarray(self.obs, dtype=np.float32)
        for j, name in enumerate(FEATURE_NAMES):
            arrays[name] = pa.array(obs[:, j])
        arrays["action"] = pa.array(self.action.astype(np.int8))
        arrays["action_name"] = pa.DictionaryArray.from_arrays(
            pa.array(self.action.astype(np.int8), type=name_type), pa.array(list(ACTION_NAMES), type=pa.string()))
        arrays["behavior_prob"] = pa.array(self.behavior_prob.astype(np.float64))
        arrays["allowed_actions"] = pa.array(mask_to_bits(self.allowed).astype(np.int16))
        arrays["reward"] = pa.array(self.reward.astype(np.float32))
        arrays["terminated"] = pa.array(self.terminated.astype(bool))
        arrays["truncated"] = pa.array(self.truncated.astype(bool))
        if self.true_phq9 is not None:
            arrays["true_phq9"] = pa.array(self.true_phq9.astype(np.float32))
        extra_types = {name: pa.string() for name in self.extra}
        for name, values in self.extra.items():
            arrays[name] = pa.array(list(values), type=pa.string())
        schema = arrow_schema(list(arrays), metadata, extra_types)
        return pa.Table.from_arrays([arrays[f.name] for f in schema], schema=schema)


def distinct_pairs(a: IntArray, b: IntArray) -> int:
    """How many distinct (a, b) pairs (non-negative ints)."""
    if len(a) == 0:
        return 0
    span = int(b.max()) + 1
    if (int(a.max()) + 1) * span < 2**62:
        return len(np.unique(a * span + b))
    return len(np.unique(np.stack([a, b], axis=1), axis=0))

"""Logged data as training arrays: transitions, padded episodes, patient splits.

``load_dataset`` reads a clean Parquet (or CSV) file, validates every row as
the importer does, and returns a :class:`LoggedDataset`; its
:meth:`~LoggedDataset.transitions` and :meth:`~LoggedDataset.episodes` give
numpy arrays (float32 observations and rewards, int64 actions, bool masks and
flags) that agents and off-policy estimators consume directly.

Conventions agents rely on:

- ``mask`` is the set of actions allowed at ``obs`` (the logged
  ``allowed_actions``); ``next_mask`` the set allowed at ``next_obs``.
- The last transition of every episode is ``done`` (terminated: the patient
  left care; truncated: the log ends, e.g. at the horizon). Its ``next_obs``
  and ``next_mask`` are copies of ``obs`` and ``mask``: there is no logged
  successor, and a done transition must not bootstrap.
- Padded episode steps (beyond ``lengths``) have ``valid`` false, zero
  observations, rewards and masks, action 0 and behaviour probability 1 (so
  products of probability ratios are unaffected).
- ``true_phq9`` (simulated data only) is hidden severity, for evaluation only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from envs.spec import ACTION_NAMES, FEATURE_NAMES
from offline_data.frame import LogFrame
from offline_data.io import read_log_file
from offline_data.schema import COLUMN_BY_NAME, META_BEHAVIOR_PROB_ESTIMATED, check_compatible
from offline_data.validate import validate_table

F32 = NDArray[np.float32]
I64 = NDArray[np.int64]
B = NDArray[np.bool_]


@dataclass(frozen=True)
class Transitions:
    """One row per logged week, in episode order (``episode`` indexes the episodes)."""

    obs: F32  # (n, n_features)
    action: I64  # (n,)
    reward: F32  # (n,)
    next_obs: F32  # (n, n_features)
    terminated: B  # (n,) the patient left care this week
    truncated: B  # (n,) the log ends after this week without the patient leaving care
    done: B  # (n,) last week of its episode (no bootstrap)
    mask: B  # (n, n_actions) allowed at obs
    next_mask: B  # (n, n_actions) allowed at next_obs
    behavior_prob: F32  # (n,) logging policy's probability of the logged action
    episode: I64  # (n,) episode index
    t: I64  # (n,) week

    def __len__(self) -> int:
        return len(self.action)

    # What the columns and actions are (not fields: every field is a per-row array). Agents take
    # their sizes and names from these, not from the simulator's spec.
    @property
    def feature_names(self) -> tuple[str, ...]:
        return FEATURE_NAMES

    @property
    def action_names(self) -> tuple[str, ...]:
        return ACTION_NAMES


@dataclass(frozen=True)
class Episodes:
    """Episodes padded to the longest: arrays are (n_episodes, max_len, ...)."""

    obs: F32  # (E, L, n_features)
    action: I64  # (E, L)
    reward: F32  # (E, L)
    mask: B  # (E, L, n_actions)
    behavior_prob: F32  # (E, L)
    terminated: B  # (E, L)
    truncated: B  # (E, L)
    t: I64  # (E, L), -1 where padded
    valid: B  # (E, L)
    lengths: I64  # (E,)
    patient_id: NDArray[np.object_]  # (E,)
    episode_id: I64  # (E,)
    true_phq9: F32 | None = None  # (E, L), evaluation only

    def __len__(self) -> int:
        return len(self.lengths)


@dataclass(frozen=True)
class LoggedDataset:
    """A validated log, rows grouped by episode with weeks increasing."""

    frame: LogFrame
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"

    def __post_init__(self) -> None:
        if self.frame.behavior_prob is None:
            raise ValueError(f"{self.source}: behavior_prob is missing; import the log with `carepath data import` "
                             "to estimate it")

    @property
    def starts(self) -> I64:
        return self.frame.episode_starts()

    @property
    def n_rows(self) -> int:
        return len(self.frame)

    @property
    def n_episodes(self) -> int:
        return len(self.starts) - 1

    @property
    def n_patients(self) -> int:
        return len(np.unique(self.frame.patient_code))

    @property
    def behavior_prob_estimated(self) -> bool:
        return bool(self.metadata.get(META_BEHAVIOR_PROB_ESTIMATED, False))

    def patient_ids(self) -> NDArray[np.object_]:
        """The distinct patient ids, sorted."""
        return np.sort(self.frame.patient_ids[np.unique(self.frame.patient_code)].astype(str)).astype(object)

    def transitions(self) -> Transitions:
        f = self.frame
        assert f.behavior_prob is not None
        n = len(f)
        starts = self.starts
        last = np.zeros(n, dtype=bool)
        last[starts[1:] - 1] = True
        successor = np.arange(n) + 1
        successor[last] = np.flatnonzero(last)  # no logged successor: itself (done)
        episode = np.repeat(np.arange(len(starts) - 1, dtype=np.int64), np.diff(starts))
        return Transitions(
            obs=f.obs,
            action=f.action,
            reward=f.reward,
            next_obs=f.obs[successor],
            terminated=f.terminated,
            truncated=f.truncated,
            done=last | f.terminated | f.truncated,
            mask=f.allowed,
            next_mask=f.allowed[successor],
            behavior_prob=f.behavior_prob.astype(np.float32),
            episode=episode,
            t=f.t,
        )

    def episodes(self) -> Episodes:
        f = self.frame
        assert f.behavior_prob is not None
        starts = self.starts
        lengths = np.diff(starts).astype(np.int64)
        n_ep = len(lengths)
        max_len = int(lengths.max()) if n_ep else 0
        episode = np.repeat(np.arange(n_ep), lengths)
        step = np.arange(len(f)) - starts[:-1][episode]

        def pad(values: np.ndarray, fill: Any, dtype: Any) -> np.ndarray:
            out = np.full((n_ep, max_len, *values.shape[1:]), fill, dtype=dtype)
            out[episode, step] = values
            return out

        valid = np.zeros((n_ep, max_len), dtype=bool)
        valid[episode, step] = True
        return Episodes(
            obs=pad(f.obs, 0.0, np.float32),
            action=pad(f.action, 0, np.int64),
            reward=pad(f.reward, 0.0, np.float32),
            mask=pad(f.allowed, False, bool),
            behavior_prob=pad(f.behavior_prob, 1.0, np.float32),
            terminated=pad(f.terminated, False, bool),
            truncated=pad(f.truncated, False, bool),
            t=pad(f.t, -1, np.int64),
            valid=valid,
            lengths=lengths,
            patient_id=f.patient_ids[f.patient_code[starts[:-1]]],
            episode_id=f.episode_id[starts[:-1]],
            true_phq9=None if f.true_phq9 is None else pad(f.true_phq9, np.nan, np.float32),
        )

    def select_patients(self, patient_ids: NDArray[np.object_] | list[str], source: str = "") -> LoggedDataset:
        """The rows of the given patients (row order kept)."""
        wanted = np.isin(self.frame.patient_ids.astype(str), np.asarray(patient_ids, dtype=str))
        rows = wanted[self.frame.patient_code]
        return LoggedDataset(self.frame.take(rows), self.metadata, source or self.source)


def load_dataset(path: str | Path) -> LoggedDataset:
    """Read and validate a clean log (Parquet with metadata, or CSV) into arrays.

    Raises ``FileNotFoundError``, :class:`~offline_data.io.DataFileError` (not a
    readable file) or :class:`~offline_data.validate.ValidationError` (bad rows),
    each naming the file.
    """
    path = Path(path)
    table, metadata = read_log_file(path)
    check_compatible(metadata, str(path))
    # columns beyond the schema are subgroups kept by an import (e.g. ethnicity)
    extra = [name for name in table.column_names if name not in COLUMN_BY_NAME]
    frame = validate_table(table, str(path), keep_columns=extra)
    return LoggedDataset(frame, metadata, str(path))


DEFAULT_FRACTIONS: Mapping[str, float] = {"train": 0.8, "validation": 0.1, "test": 0.1}


def split_by_patient(
    dataset: LoggedDataset, fractions: Mapping[str, float] | None = None, seed: int = 0
) -> dict[str, LoggedDataset]:
    """Split by patient (every episode of a patient lands in one part).

    The sorted distinct patient ids are shuffled with ``seed`` and cut by
    ``fractions`` (which must sum to 1), so the split depends only on the set
    of patients and the seed, never on row order. Part sizes are rounded down,
    the remainder going to the first part.
    """
    fractions = dict(fractions if fractions is not None else DEFAULT_FRACTIONS)
    if not fractions:
        raise ValueError("expected at least one split fraction")
    for name, value in fractions.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"split fraction {name!r} must be in [0, 1], got {value}")
    if abs(sum(fractions.values()) - 1.0) > 1e-9:
        raise ValueError(f"split fractions must sum to 1, got {sum(fractions.values()):g} ({fractions})")
    ids = dataset.patient_ids()
    shuffled = ids[np.random.default_rng(seed).permutation(len(ids))]
    sizes = [int(np.floor(value * len(ids))) for value in fractions.values()]
    sizes[0] += len(ids) - sum(sizes)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return {name: dataset.select_patients(shuffled[bounds[i]:bounds[i + 1]], f"{dataset.source}[{name}]")
            for i, name in enumerate(fractions)}


__all__ = ["Episodes", "LoggedDataset", "Transitions", "load_dataset",
           "split_by_patient"]

"""Small simulated logs and raw-log builders shared by the offline_data tests."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from envs.params import EnvSettings
from envs.spec import ACTION_NAMES, FEATURE_NAMES
from offline_data.frame import LogFrame
from offline_data.generate import simulate
from policies.baselines import make_baseline

KEY = b"0123456789abcdef-test-key-not-secret"
OTHER_KEY = b"fedcba9876543210-another-test-key"


def simulated_frame(policy: str = "stard", epsilon: float = 0.2, patients: int = 60, seed: int = 3,
                    horizon: int = 12) -> LogFrame:
    return next(simulate(make_baseline(policy, epsilon), patients, seed=seed, settings=EnvSettings(horizon=horizon),
                         chunk_size=patients))


@pytest.fixture(scope="session")
def small_frame() -> LogFrame:
    """60 patients x 12 weeks under STAR*D with epsilon 0.2 (a few hundred rows)."""
    return simulated_frame()


def raw_log(frame: LogFrame, *, with_t: bool = True, with_prob: bool = True, identifiers: bool = True,
            with_allowed: bool = False, seed: int = 0) -> pd.DataFrame:
    """A real-world-looking log of ``frame``: raw record numbers as patient ids, names,
    emails, phone numbers, visit dates (or t), action names, no allowed_actions."""
    rng = np.random.default_rng(seed)
    n_patients = len(frame.patient_ids)
    raw_ids = np.array([f"MRN-{700000 + 37 * i}" for i in range(n_patients)], dtype=object)
    df = pd.DataFrame({"patient_id": raw_ids[frame.patient_code]})
    if identifiers:
        df["Name"] = [f"Jane Q. Patient{c:04d}" for c in frame.patient_code]
        df["email"] = [f"jane.patient{c:04d}@example.org" for c in frame.patient_code]
        df["Phone"] = [f"+44 7700 9{c:05d}" for c in frame.patient_code]
        df["date_of_birth"] = "1961-03-0" + pd.Series(frame.patient_code % 9 + 1).astype(str)
    if with_t:
        df["t"] = frame.t
    else:
        first_day = np.datetime64("2022-01-03") + rng.integers(0, 700, n_patients).astype("timedelta64[D]")
        jitter = rng.integers(0, 3, len(frame))  # visits on different weekdays, intake on the first day
        jitter[frame.t == 0] = 0
        jitter = jitter.astype("timedelta64[D]")
        df["visit_date"] = (first_day[frame.patient_code] + (frame.t * 7).astype("timedelta64[D]") + jitter).astype(
            str)
    for j, name in enumerate(FEATURE_NAMES):
        df[name] = frame.obs[:, j]
    df["action_name"] = np.asarray(ACTION_NAMES)[frame.action]
    if with_prob:
        assert frame.behavior_prob is not None
        df["behavior_prob"] = frame.behavior_prob
    if with_allowed:
        df["allowed_actions"] = (frame.allowed.astype(np.int64) << np.arange(frame.allowed.shape[1])).sum(axis=1)
    df["reward"] = frame.reward
    df["terminated"] = frame.terminated
    df["truncated"] = frame.truncated
    return df

"""Logged data made by the simulator under a behaviour policy.

Patients are simulated in chunks (all patients of a chunk step together
through the batched dynamics), so memory stays bounded by the chunk size
whatever the number of patients; each chunk becomes one Parquet row group.
The probability the behaviour policy gave each logged action is recorded
exactly as :func:`policies.base.sample_actions` returns it.

Reproducibility: the same (seed, chunk size, policy, settings, parameters)
give the same file, byte for byte. Chunk ``c`` draws its patients and its
actions from two generators spawned from ``SeedSequence(seed)`` for that
chunk, so the chunk size is part of the recipe and is stored in the metadata.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray
from tqdm import tqdm

from envs import dynamics as D
from envs.params import DEFAULT_PARAMS_PATH, EnvSettings, SimParams, load_params
from offline_data.frame import LogFrame
from offline_data.io import write_tables
from offline_data.schema import COLUMNS, META_GENERATION, arrow_schema, base_metadata
from policies.base import Policy, sample_actions
from policies.baselines import make_baseline

DEFAULT_CHUNK_SIZE = 25_000
SIM_ID_PREFIX = "sim-"


@dataclass(frozen=True)
class GenerationSummary:
    path: Path
    patients: int
    rows: int
    metadata: dict[str, Any]


def sim_patient_ids(seed: int, start: int, stop: int) -> NDArray[np.object_]:
    """Pseudonymous ids of simulated patients ``start..stop-1``: ``sim-`` and 16 hex
    digits of a hash of (seed, index), so ids reveal neither order nor seed."""
    return np.array([SIM_ID_PREFIX + hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).hexdigest()
                     for i in range(start, stop)], dtype=object)


def chunk_generators(seed: int, chunk: int) -> tuple[np.random.Generator, np.random.Generator]:
    """(dynamics generator, policy generator) of chunk number ``chunk``."""
    dynamics_seed, policy_seed = np.random.SeedSequence([seed, chunk]).spawn(2)
    return np.random.default_rng(dynamics_seed), np.random.default_rng(policy_seed)


def simulate_chunk(
    policy: Policy,
    n: int,
    *,
    params: SimParams,
    settings: EnvSettings,
    rng: np.random.Generator,
    policy_rng: np.random.Generator,
    kparams: NDArray[np.float64] | None = None,
    on_week: Callable[[int], object] | None = None,
) -> LogFrame:
    """Simulate ``n`` patients over the horizon; rows sorted by (patient, week).

    Patient ``i`` of the chunk has ``patient_code`` ``i`` and ``episode_id`` ``i``
    (the caller offsets ids and episodes). A row is written for every week the
    patient starts in care: observation, action, the policy's probability of
    it, allowed actions, reward; ``terminated`` when the patient leaves care
    during the week, ``truncated`` on the horizon's last week otherwise.
    """
    k = kparams if kparams is not None else D.kernel_params(params, settings)
    state = D.initial_state(n, params, settings, rng, k)
    obs, mask = D.observe_and_mask(state)
    horizon = settings.horizon
    parts: dict[str, list[np.ndarray]] = {name: [] for name in (
        "patient", "t", "obs", "action", "prob", "allowed", "reward", "terminated", "true_phq9")}
    for t in range(horizon):
        in_care = np.flatnonzero(state[:, D.S.DROPPED] == 0)
        if len(in_care) == 0:
            break
        # Patients who left care are frozen by the dynamics; only those in care act.
        actions = np.zeros(n, dtype=np.int64)
        act, prob = sample_actions(policy, obs[in_care], mask[in_care], policy_rng)
        actions[in_care] = act
        result = D.step(state, actions, params, settings, rng, k)
        parts["patient"].append(in_care)
        parts["t"].append(np.full(len(in_care), t, dtype=np.int64))
        parts["obs"].append(obs[in_care])
        parts["action"].append(act)
        parts["prob"].append(prob)
        parts["allowed"].append(mask[in_care])
        parts["reward"].append(result.reward[in_care].astype(np.float32))
        parts["terminated"].append(result.terminated[in_care])
        parts["true_phq9"].append(state[in_care, D.S.SEV].astype(np.float32))
        state, obs, mask = result.state, result.obs, result.mask
        if on_week is not None:
            on_week(n)
    patient = np.concatenate(parts["patient"])
    week = np.concatenate(parts["t"])
    terminated = np.concatenate(parts["terminated"])
    order = np.argsort(patient, kind="stable")  # rows were appended week by week
    return LogFrame(
        patient_ids=np.arange(n).astype(str).astype(object),
        patient_code=patient[order].astype(np.int64),
        episode_id=patient[order].astype(np.int64),
        t=week[order],
        obs=np.concatenate(parts["obs"])[order],
        action=np.concatenate(parts["action"])[order],
        behavior_prob=np.concatenate(parts["prob"])[order],
        allowed=np.concatenate(parts["allowed"])[order],
        reward=np.concatenate(parts["reward"])[order],
        terminated=terminated[order],
        truncated=((week == horizon - 1) & ~terminated)[order],
        true_phq9=np.concatenate(parts["true_phq9"])[order],
    )


def simulate(
    policy: Policy,
    patients: int,
    *,
    seed: int,
    params: SimParams | None = None,
    settings: EnvSettings | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    include_true_phq9: bool = True,
    progress: bool = False,
) -> Iterator[LogFrame]:
    """Simulated logs, one :class:`LogFrame` per chunk of patients, with their final
    pseudonymous ids and file-wide episode ids."""
    if patients < 1:
        raise ValueError(f"patients must be a positive integer, got {patients}")
    if chunk_size < 1:
        raise ValueError(f"chunk size must be a positive integer, got {chunk_size}")
    params = params if params is not None else load_params()
    settings = settings if settings is not None else EnvSettings()
    k = D.kernel_params(params, settings)
    seen: set[str] = set()
    with tqdm(total=patients * settings.horizon, desc=f"simulating {policy.name}", unit=" patient-weeks",
              unit_scale=True, disable=not progress, leave=False) as bar:
        for chunk, start in enumerate(range(0, patients, chunk_size)):
            n = min(chunk_size, patients - start)
            rng, policy_rng = chunk_generators(seed, chunk)
            frame = simulate_chunk(policy, n, params=params, settings=settings, rng=rng, policy_rng=policy_rng,
                                   kparams=k, on_week=bar.update)
            bar.update((start + n) * settings.horizon - bar.n)  # weeks skipped once everyone had left
            ids = sim_patient_ids(seed, start, start + n)
            if seen.intersection(ids) or len(set(ids)) != n:  # 64-bit hashes: never in practice
                raise RuntimeError("simulated patient ids collided; use another seed")
            seen.update(ids)
            frame = dataclasses.replace(frame, patient_ids=ids, episode_id=frame.episode_id + start,
                                        true_phq9=frame.true_phq9 if include_true_phq9 else None)
            yield frame


def params_provenance(params_path: str | Path | None, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Where the simulator parameters came from: path (package-relative for the
    calibrated default), the file's sha256 and any overrides."""
    path = Path(params_path) if params_path is not None else DEFAULT_PARAMS_PATH
    shown = "envs/params/default.yaml" if path.resolve() == DEFAULT_PARAMS_PATH.resolve() else str(path)
    return {"path": shown, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "overrides": dict(overrides or {}), "fingerprint": load_params(path, overrides).fingerprint()}


def generate(
    out: Path,
    *,
    policy: str,
    epsilon: float,
    patients: int,
    seed: int,
    settings: EnvSettings | None = None,
    params_path: str | Path | None = None,
    param_overrides: Mapping[str, Any] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    include_true_phq9: bool = True,
    progress: bool = False,
) -> GenerationSummary:
    """Simulate ``patients`` under baseline ``policy`` (with ``epsilon`` uniform
    exploration) and write them to ``out`` (Parquet, or CSV without metadata)."""
    behaviour = make_baseline(policy, epsilon)
    settings = settings if settings is not None else EnvSettings()
    params = load_params(params_path, param_overrides)
    metadata = base_metadata(
        source="simulator",
        behavior_policy={"name": behaviour.name, "epsilon": float(getattr(behaviour, "epsilon", epsilon))},
        seed=seed,
        behavior_prob_estimated=False,
        env_settings=dataclasses.asdict(settings),
        sim_params=params_provenance(params_path, param_overrides),
    )
    metadata[META_GENERATION] = {"patients": patients, "chunk_size": chunk_size, "horizon": settings.horizon,
                                 "true_phq9": include_true_phq9, "seeding": "SeedSequence([seed, chunk]).spawn(2)"}
    names = [c.name for c in COLUMNS if c.required or (include_true_phq9 and c.name == "true_phq9")]
    schema = arrow_schema(names, metadata)
    frames = simulate(behaviour, patients, seed=seed, params=params, settings=settings, chunk_size=chunk_size,
                      include_true_phq9=include_true_phq9, progress=progress)
    tables: Iterator[pa.Table] = (frame.to_arrow(metadata) for frame in frames)
    rows = write_tables(out, tables, schema)
    return GenerationSummary(Path(out), patients, rows, metadata)


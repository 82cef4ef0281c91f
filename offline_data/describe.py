"""``carepath data describe``: what a log holds, at a glance.

Patients, episodes and weeks; how often each action was taken; outcomes
(reward, who left care); how much of each maskable feature is missing; the
size of each subgroup; and where the data came from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from envs.spec import ACTION_NAMES, FEATURE_NAMES, MASK_PREFIX, MASKABLE_FEATURES, N_ACTIONS, SUBGROUP_FEATURES
from offline_data.dataset import LoggedDataset, load_dataset
from offline_data.pseudonymise import plain_value
from offline_data.schema import (
    META_BEHAVIOR_POLICY,
    META_BEHAVIOR_PROB_ESTIMATED,
    META_ENV_SETTINGS,
    META_K_ANONYMITY,
    META_SCHEMA_VERSION,
    META_SEED,
    META_SOURCE,
)


@dataclass(frozen=True)
class Description:
    path: str
    provenance: dict[str, Any]
    patients: int
    episodes: int
    weeks: int
    episode_length: dict[str, float]
    actions: list[dict[str, Any]]
    mean_reward: float
    mean_return: float
    share_terminated: float
    share_truncated: float
    missing_share: dict[str, float]
    subgroups: dict[str, dict[str, int]]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe(dataset: LoggedDataset) -> Description:
    f = dataset.frame
    starts = dataset.starts
    last = starts[1:] - 1
    counts = np.bincount(f.action, minlength=N_ACTIONS)
    lengths = np.diff(starts)
    returns = np.add.reduceat(f.reward.astype(np.float64), starts[:-1]) if len(f) else np.zeros(0)
    meta = dataset.metadata
    _, first_rows = np.unique(f.patient_code, return_index=True)
    subgroups: dict[str, dict[str, int]] = {}
    columns: dict[str, np.ndarray] = {name: f.obs[:, FEATURE_NAMES.index(name)] for name in SUBGROUP_FEATURES}
    columns.update(f.extra)
    for name, values in columns.items():
        patient_values = np.asarray(values)[first_rows].astype(str)
        uniq, n = np.unique(patient_values, return_counts=True)
        subgroups[name] = {plain_value(str(u)): int(c) for u, c in zip(uniq, n, strict=True)}
    return Description(
        path=dataset.source,
        provenance={key: meta.get(key) for key in (META_SCHEMA_VERSION, META_SOURCE, META_BEHAVIOR_POLICY, META_SEED,
                                                    META_BEHAVIOR_PROB_ESTIMATED)}
        | {"horizon": (meta.get(META_ENV_SETTINGS) or {}).get("horizon"),
           "k_anonymity_groups_below_k": (meta.get(META_K_ANONYMITY) or {}).get("groups_below_k")},
        patients=dataset.n_patients,
        episodes=dataset.n_episodes,
        weeks=len(f),
        episode_length={"mean": float(lengths.mean()), "min": int(lengths.min()), "max": int(lengths.max()),
                        "max_t": int(f.t.max())},
        actions=[{"action": name, "count": int(counts[a]), "share": float(counts[a] / len(f))}
                 for a, name in enumerate(ACTION_NAMES)],
        mean_reward=float(f.reward.mean()),
        mean_return=float(returns.mean()),
        share_terminated=float(f.terminated[last].mean()),
        share_truncated=float(f.truncated[last].mean()),
        missing_share={name: float((f.obs[:, FEATURE_NAMES.index(MASK_PREFIX + name)] == 0).mean())
                       for name in MASKABLE_FEATURES},
        subgroups=subgroups,
    )


def format_description(d: Description) -> str:
    p = d.provenance
    policy = p.get(META_BEHAVIOR_POLICY) or {}
    lines = [f"{d.path}"]
    source = p.get(META_SOURCE) or "unknown (no metadata: CSV?)"
    lines.append(f"  source {source}; behaviour policy {policy.get('name', 'unknown')}"
                 + (f" (epsilon {policy['epsilon']:g})" if policy.get("epsilon") is not None else "")
                 + (f"; seed {p[META_SEED]}" if p.get(META_SEED) is not None else "")
                 + (f"; horizon {p['horizon']} weeks" if p.get("horizon") else "")
                 + (f"; schema {p[META_SCHEMA_VERSION]}" if p.get(META_SCHEMA_VERSION) else ""))
    estimated = p.get(META_BEHAVIOR_PROB_ESTIMATED)
    lines.append("  behaviour probabilities: " + ("ESTIMATED (behaviour model)" if estimated else
                                                  "logged" if estimated is False else "unknown"))
    if p.get("k_anonymity_groups_below_k"):
        lines.append(f"  k-anonymity: {p['k_anonymity_groups_below_k']} quasi-identifier group(s) below k")
    el = d.episode_length
    lines += [
        "",
        f"{'patients':<24}{d.patients:>12,}",
        f"{'episodes':<24}{d.episodes:>12,}",
        f"{'patient-weeks':<24}{d.weeks:>12,}",
        f"{'weeks per episode':<24}{el['mean']:>12.1f}  (min {el['min']}, max {el['max']}; last week t={el['max_t']})",
        "",
        f"{'action':<24}{'count':>12}{'share':>9}",
    ]
    lines += [f"{a['action']:<24}{a['count']:>12,}{100 * a['share']:>8.1f}%" for a in d.actions]
    lines += [
        "",
        "outcomes",
        f"  {'mean reward per week':<34}{d.mean_reward:>10.3f}",
        f"  {'mean return per episode':<34}{d.mean_return:>10.3f}",
        f"  {'episodes ending: left care':<34}{100 * d.share_terminated:>9.1f}%",
        f"  {'episodes ending: log cut (horizon)':<34}{100 * d.share_truncated:>9.1f}%",
        "",
        "missing (share of weeks not measured)",
    ]
    lines += [f"  {name:<22}{100 * share:>8.1f}%" for name, share in d.missing_share.items()]
    lines += ["", "subgroups (patients)"]
    for name, groups in d.subgroups.items():
        total = sum(groups.values())
        cells = "   ".join(f"{value}: {count:,} ({100 * count / total:.1f}%)" for value, count in groups.items())
        lines.append(f"  {name:<16}{cells}")
    return "\n".join(lines)


def describe_file(path: str | Path) -> Description:
    return describe(load_dataset(path))

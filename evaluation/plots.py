"""Plots people would rather look at than read."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt
import numpy as np

from envs import dynamics as D
from envs.cohort import run_cohort
from envs.params import EnvSettings, SimParams, load_params
from policies.base import sample_actions
from policies.baselines import StardPolicy

S = D.S


def plot_trajectories_by_responder_type(
    path: Path, *, params: SimParams | None = None, n: int = 4000, weeks: int = 40, seed: int = 0
) -> Path:
    """True PHQ-9 under STAR*D care by hidden responder type: mean with an
    inter-quartile band, and a few individual patients."""
    params = params if params is not None else load_params()
    policy = StardPolicy()
    rng = np.random.default_rng([seed, 7])
    run = run_cohort(lambda o, m, t: sample_actions(policy, o, m, rng)[0], n, weeks, seed=seed, params=params,
                     settings=EnvSettings(horizon=weeks),
                     record=(S.SEV, S.TR, S.NS_RESP, S.R_DRUG, S.CHRON))
    sev = run.column(S.SEV)
    tr = run.column(S.TR)[0] > 0
    ns = run.column(S.NS_RESP)[0] > 0
    first_drug = run.column(S.R_DRUG)[1] > 0
    groups = {
        "responder to the first SSRI": ~tr & first_drug,
        "responder to care itself (non-specific)": ~tr & ~first_drug & ns,
        "non-responder to the first SSRI and to care alone": ~tr & ~first_drug & ~ns,
        "treatment-resistant": tr,
    }
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    weeks_axis = np.arange(weeks + 1)
    sample_rng = np.random.default_rng(seed)
    for (label, rows), colour in zip(groups.items(), ("tab:green", "tab:blue", "tab:orange", "tab:red"), strict=True):
        if not rows.any():
            continue
        # mask weeks after a patient left care
        traj = np.where(run.active[:, rows], sev[:, rows], np.nan)
        mean = np.nanmean(traj, axis=1)
        q25, q75 = np.nanpercentile(traj, [25, 75], axis=1)
        ax.plot(weeks_axis, mean, color=colour, lw=2.5, label=f"{label} ({100 * rows.mean():.0f} %)")
        ax.fill_between(weeks_axis, q25, q75, color=colour, alpha=0.12)
        for i in sample_rng.choice(np.flatnonzero(rows), size=min(3, int(rows.sum())), replace=False):
            ax.plot(weeks_axis, np.where(run.active[:, i], sev[:, i], np.nan), color=colour, lw=0.7, alpha=0.5)
    ax.axhline(params.course.remission_threshold, color="grey", ls="--", lw=1)
    ax.text(weeks - 0.5, params.course.remission_threshold + 0.3, "remission (PHQ-9 < 5)", ha="right",
            color="grey", fontsize=8)
    ax.set(xlabel="weeks in care", ylabel="true PHQ-9 (hidden severity)", ylim=(0, 27),
           title="Simulated patients under STAR*D measurement-based care, by hidden responder type")
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path

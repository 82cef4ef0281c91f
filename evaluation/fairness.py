"""Fairness of a target policy: its value per subgroup, and what it recommends to whom.

Two questions a reviewer asks of a candidate policy:

- **Does it serve every group equally well?** :func:`subgroup_values` runs the
  off-policy estimators on the episodes of each subgroup (a patient's group is
  the feature's value at the episode's first logged step: sex, age band and
  digital access are fixed over an episode) and reports, per subgroup column,
  the gap between the best- and worst-served groups, naming them. Groups with
  too few episodes are flagged and left out of the gap, since their estimates
  are too noisy to compare.
- **Does it steer groups to different kinds of care?** :func:`recommendation_parity`
  averages, over every valid logged step, the probability the policy puts on
  each class of care (:data:`envs.spec.ACTION_CARE_CLASS`) within each
  subgroup (demographic parity of recommendations), with the largest gap per
  class, beside what was logged and what the action mask allowed. In
  particular it states the share of digital-only care (guided and unguided
  digital CBT) recommended to patients without and with digital access: a
  policy that sends patients without access to digital-only care shows up
  there. (The simulator's action mask blocks digital therapy without access,
  and a policy must put zero probability on blocked actions, so on simulated
  data that share is exactly zero; imported data whose masks allow it may not be.)

Pure numpy: the estimators come from :mod:`evaluation.ope`, FQE's per-episode
values are passed in by the caller.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from envs.spec import ACTION_CARE_CLASS, ACTION_NAMES, FEATURE_INDEX, SUBGROUP_FEATURES
from evaluation.ope import RatioTerms, bootstrap_values, percentile_interval, refit_interval
from evaluation.ope.estimators import ESTIMATORS, Estimate, estimate_all

if TYPE_CHECKING:
    from offline_data.dataset import Episodes, LoggedDataset

#: Groups with fewer episodes are flagged and left out of gaps.
MIN_GROUP_EPISODES = 30
#: Readable names of the coded subgroup features (envs.spec documents the codes).
GROUP_LABELS: dict[str, dict[int, str]] = {
    "sex": {0: "female", 1: "male"},
    "age_band": {0: "18-29", 1: "30-44", 2: "45-59", 3: "60+"},
    "digital_access": {0: "no digital access", 1: "digital access"},
}
#: Classes of care in the order they first appear in the action list.
CARE_CLASSES: tuple[str, ...] = tuple(dict.fromkeys(ACTION_CARE_CLASS[a] for a in ACTION_NAMES))
DIGITAL_CLASS = "digital"
#: Digital-only care: the actions of the digital class (guided and unguided digital CBT).
DIGITAL_ACTIONS: tuple[str, ...] = tuple(a for a in ACTION_NAMES if ACTION_CARE_CLASS[a] == DIGITAL_CLASS)
MISSING_GROUP = "missing"


def _class_matrix() -> NDArray[np.float64]:
    """(A, C) one-hot: action a belongs to class c."""
    out = np.zeros((len(ACTION_NAMES), len(CARE_CLASSES)))
    for a, name in enumerate(ACTION_NAMES):
        out[a, CARE_CLASSES.index(ACTION_CARE_CLASS[name])] = 1.0
    return out


# ----------------------------------------------------------------------------- groups


@dataclass(frozen=True)
class Subgroups:
    """Each episode's group under each subgroup column: ``labels[column]`` is (E,) strings,
    ``order[column]`` the groups in display order (codes ascending, then text)."""

    labels: dict[str, NDArray[np.str_]]
    order: dict[str, tuple[str, ...]]

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self.labels)

    def members(self, column: str, group: str) -> NDArray[np.intp]:
        """Indices of the episodes in ``group`` of ``column``."""
        return np.flatnonzero(self.labels[column] == group)

    def take(self, index: NDArray[np.intp]) -> Subgroups:
        return Subgroups({c: v[index] for c, v in self.labels.items()}, dict(self.order))


def _code_label(column: str, value: float) -> str:
    if np.isnan(value):
        return MISSING_GROUP
    if float(value).is_integer() and int(value) in GROUP_LABELS.get(column, {}):
        return GROUP_LABELS[column][int(value)]
    return f"{column} {value:g}"


def episode_groups(
    data: LoggedDataset | Episodes,
    features: Sequence[str] = SUBGROUP_FEATURES,
    *,
    extra: bool = True,
) -> Subgroups:
    """The subgroup of each episode: observation ``features`` at its first step, plus
    (``extra``, for a :class:`~offline_data.dataset.LoggedDataset`) the kept subgroup
    columns of an import, such as ``ethnicity``, read at the episode's first row."""
    from offline_data.dataset import LoggedDataset

    episodes = data.episodes() if isinstance(data, LoggedDataset) else data
    labels: dict[str, NDArray[np.str_]] = {}
    order: dict[str, tuple[str, ...]] = {}
    first = np.asarray(episodes.obs)[:, 0, :] if len(episodes) else np.zeros((0, len(FEATURE_INDEX)))
    for column in features:
        if column not in FEATURE_INDEX:
            raise ValueError(f"unknown subgroup feature {column!r}; expected an observation feature such as "
                             f"{', '.join(SUBGROUP_FEATURES)}")
        values = first[:, FEATURE_INDEX[column]].astype(np.float64)
        codes = np.unique(values[~np.isnan(values)])
        names = {float(v): _code_label(column, float(v)) for v in codes}
        labels[column] = np.array([names.get(float(v), MISSING_GROUP) for v in values], dtype=str)
        order[column] = tuple(names[float(v)] for v in codes) + ((MISSING_GROUP,) if np.isnan(values).any() else ())
    if extra and isinstance(data, LoggedDataset):
        starts = data.starts[:-1]
        for column, kept in sorted(data.frame.extra.items()):
            raw = kept[starts]
            text = np.array([MISSING_GROUP if v is None or (isinstance(v, float) and np.isnan(v)) or str(v) == ""
                             else str(v) for v in raw], dtype=str)
            labels[column] = text
            order[column] = tuple(sorted(set(text.tolist()) - {MISSING_GROUP})) + (
                (MISSING_GROUP,) if MISSING_GROUP in text else ())
    return Subgroups(labels, order)


def take_episodes(episodes: Episodes, index: NDArray[np.intp]) -> Episodes:
    """The episodes at ``index`` (every per-episode array sliced on its first axis)."""
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(episodes):
        value = getattr(episodes, f.name)
        if value is not None:
            changes[f.name] = np.asarray(value)[index]
    return dataclasses.replace(episodes, **changes)


# ----------------------------------------------------------------------------- FQE as an estimate


def fqe_estimate(
    initial_values: NDArray[np.floating],
    *,
    interval: str | None = "bootstrap",
    level: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
    warnings: Iterable[str] = (),
    refits: NDArray[np.floating] | None = None,
) -> Estimate:
    """FQE's value on some episodes, the mean of their per-episode initial values, as an :class:`Estimate`.

    With ``refits`` (FQE's values refitted on bootstrap resamples, see
    :func:`evaluation.ope.fqe.refit_values`) the interval is
    :func:`~evaluation.ope.intervals.refit_interval`, which carries the
    sampling and fitting error of the Q-model. Without, the interval (whatever
    ``interval`` asks for, when it is not None) is the percentile bootstrap of
    the mean over episodes: it reflects the spread of initial states only and
    treats the fitted Q-function as exact, i.e. it ignores model (regression
    and extrapolation) error and is too narrow. ``ess`` is NaN: FQE has no
    importance weights.
    """
    x = np.asarray(initial_values, dtype=np.float64)
    n = len(x)
    notes = tuple(warnings)
    if n == 0:
        return Estimate("fqe", float("nan"), None, None, None, None, float("nan"), 0, False,
                        "no episodes", notes)
    low = high = None
    method = None
    if interval is not None and refits is not None:
        result = refit_interval(float(x.mean()), refits, level)
        low, high, method = result.low, result.high, "refit"
        notes += (f"interval from {len(refits)} FQE refits on bootstrap resamples of episodes",)
    elif interval is not None and n >= 2:
        boot = bootstrap_values([RatioTerms.mean(x)], n_boot, seed)[0]
        result = percentile_interval(boot, level)
        low, high, method = result.low, result.high, "bootstrap"
        notes += result.warnings
    elif interval is not None:
        notes += ("a single episode: no interval",)
    return Estimate("fqe", float(x.mean()), low, high, method, level if method else None, float("nan"), n, True,
                    None, notes)


# ----------------------------------------------------------------------------- values per subgroup


@dataclass(frozen=True)
class GroupValue:
    """The estimates on one subgroup's episodes."""

    column: str
    group: str
    n_episodes: int
    share: float  # of all episodes
    estimates: dict[str, Estimate]
    too_few: bool  # fewer than min_episodes: flagged, left out of gaps

    def to_json(self) -> dict[str, Any]:
        return {"column": self.column, "group": self.group, "n_episodes": self.n_episodes, "share": self.share,
                "too_few": self.too_few, "estimates": {k: e.as_dict() for k, e in self.estimates.items()}}


@dataclass(frozen=True)
class ValueGap:
    """Best- minus worst-served group of one column under one estimator (groups large enough and identifiable)."""

    column: str
    estimator: str
    gap: float | None  # None when fewer than two groups can be compared
    highest: str | None
    lowest: str | None
    intervals_overlap: bool | None  # the two groups' intervals overlap (None without intervals)
    excluded: tuple[str, ...] = ()  # groups left out, each with why
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SubgroupValues:
    """Values per subgroup and the gaps between them."""

    groups: list[GroupValue]
    gaps: list[ValueGap]
    estimators: tuple[str, ...]
    min_episodes: int
    warnings: tuple[str, ...] = ()

    def of(self, column: str) -> list[GroupValue]:
        return [g for g in self.groups if g.column == column]

    def gap(self, column: str, estimator: str) -> ValueGap:
        for g in self.gaps:
            if g.column == column and g.estimator == estimator:
                return g
        raise KeyError(f"no gap for column {column!r} and estimator {estimator!r}")

    def to_json(self) -> dict[str, Any]:
        return {"estimators": list(self.estimators), "min_episodes": self.min_episodes,
                "warnings": list(self.warnings), "groups": [g.to_json() for g in self.groups],
                "gaps": [g.to_json() for g in self.gaps]}


def subgroup_values(
    episodes: Episodes,
    target_probs: NDArray[np.floating],
    groups: Subgroups,
    *,
    estimators: Sequence[str] = ("wis",),
    q_hat: NDArray[np.floating] | None = None,
    fqe_initial_values: NDArray[np.floating] | None = None,
    interval: str | None = "bootstrap",
    level: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
    gamma: float = 1.0,
    clip: float | None = None,
    min_episodes: int = MIN_GROUP_EPISODES,
) -> SubgroupValues:
    """Each estimator on the episodes of each subgroup, with intervals, and the gap per column.

    ``estimators`` are names of :data:`evaluation.ope.estimators.ESTIMATORS` and
    ``fqe`` (which needs ``fqe_initial_values``, one per episode; DR and WDR need
    ``q_hat``). Every group uses the same bootstrap seed. A group of one episode
    gets no interval; groups below ``min_episodes`` are flagged (``too_few``) and
    left out of the gaps.
    """
    names = tuple(estimators)
    ope_names = tuple(n for n in names if n != "fqe")
    unknown = [n for n in ope_names if n not in ESTIMATORS]
    if unknown:
        raise ValueError(f"unknown estimator(s) {unknown}; expected some of {', '.join((*ESTIMATORS, 'fqe'))}")
    if "fqe" in names and fqe_initial_values is None:
        raise ValueError("the fqe estimator needs fqe_initial_values (FQEResult.initial_values)")
    n_total = len(episodes)
    for column in groups.columns:
        if len(groups.labels[column]) != n_total:
            raise ValueError(f"subgroup column {column!r} has {len(groups.labels[column])} labels for "
                             f"{n_total} episodes")
    probs = np.asarray(target_probs)
    q = None if q_hat is None else np.asarray(q_hat)
    fqe_x = None if fqe_initial_values is None else np.asarray(fqe_initial_values, dtype=np.float64)
    rows: list[GroupValue] = []
    warnings: list[str] = []
    for column in groups.columns:
        for group in groups.order[column]:
            index = groups.members(column, group)
            n = len(index)
            if n == 0:
                continue
            estimates: dict[str, Estimate] = {}
            if ope_names:
                part = take_episodes(episodes, index)
                options: dict[str, Any] = {"names": ope_names, "q_hat": None if q is None else q[index],
                                           "gamma": gamma, "clip": clip, "level": level, "n_boot": n_boot,
                                           "seed": seed}
                try:
                    estimates.update(estimate_all(part, probs[index], interval=interval if n >= 2 else None,
                                                  **options))
                except ValueError as err:  # e.g. a tiny group whose resamples are almost all undefined
                    if interval is None or n < 2:
                        raise
                    warnings.append(f"{column} = {group}: no interval ({err})")
                    estimates.update(estimate_all(part, probs[index], interval=None, **options))
            if fqe_x is not None and "fqe" in names:
                estimates["fqe"] = fqe_estimate(fqe_x[index], interval=interval, level=level, n_boot=n_boot,
                                                seed=seed)
            too_few = n < min_episodes
            if too_few:
                warnings.append(f"{column} = {group}: only {n} episode(s) (< {min_episodes}); its estimates are "
                                "flagged and left out of the gaps")
            rows.append(GroupValue(column, group, n, n / n_total if n_total else 0.0,
                                   {k: estimates[k] for k in names if k in estimates}, too_few))
    gaps = [_gap(column, name, [r for r in rows if r.column == column]) for column in groups.columns
            for name in names]
    return SubgroupValues(rows, gaps, names, min_episodes, tuple(warnings))


def _gap(column: str, name: str, rows: list[GroupValue]) -> ValueGap:
    usable: list[tuple[str, Estimate]] = []
    excluded: list[str] = []
    for r in rows:
        est = r.estimates.get(name)
        if est is None or not est.identifiable or not np.isfinite(est.value):
            excluded.append(f"{r.group} (not identifiable)")
        elif r.too_few:
            excluded.append(f"{r.group} (only {r.n_episodes} episodes)")
        else:
            usable.append((r.group, est))
    if len(usable) < 2:
        return ValueGap(column, name, None, None, None, None, tuple(excluded),
                        "fewer than two groups with enough episodes and an identifiable estimate")
    high_group, high = max(usable, key=lambda g: g[1].value)
    low_group, low = min(usable, key=lambda g: g[1].value)
    overlap = None if high.low is None or low.high is None else bool(high.low <= low.high)
    return ValueGap(column, name, float(high.value - low.value), high_group, low_group, overlap, tuple(excluded))


# ----------------------------------------------------------------------------- demographic parity


@dataclass(frozen=True)
class GroupRates:
    """Per class of care, over one group's valid logged steps: the policy's mean probability
    (``recommended``), the share of logged actions (``logged``) and of steps where the mask
    allowed some action of the class (``allowed``)."""

    column: str
    group: str
    n_episodes: int
    n_steps: int
    recommended: dict[str, float]
    logged: dict[str, float]
    allowed: dict[str, float]
    too_few: bool

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ClassGap:
    """Largest difference between groups of one column in the rate a class of care is recommended."""

    column: str
    care_class: str
    gap: float
    highest: str
    lowest: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DigitalShare:
    """Digital-only care recommended to patients without and with digital access.

    Shares are mean probabilities over valid logged steps (by the step's
    ``digital_access`` feature); ``*_allowed`` is the share of those steps on
    which the mask allowed a digital action (0 for no access in simulated data).
    None where the data have no step of that kind.
    """

    no_access: float | None
    access: float | None
    no_access_steps: int
    access_steps: int
    no_access_allowed: float | None
    access_allowed: float | None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Parity:
    """Demographic parity of recommendations by care class and subgroup."""

    classes: tuple[str, ...]
    rows: list[GroupRates]
    gaps: list[ClassGap]
    digital: DigitalShare
    warnings: tuple[str, ...] = ()

    def of(self, column: str) -> list[GroupRates]:
        return [r for r in self.rows if r.column == column]

    def rate(self, column: str, group: str, care_class: str) -> float:
        for r in self.rows:
            if r.column == column and r.group == group:
                return r.recommended[care_class]
        raise KeyError(f"no group {group!r} in column {column!r}")

    def to_json(self) -> dict[str, Any]:
        return {"classes": list(self.classes), "rows": [r.to_json() for r in self.rows],
                "gaps": [g.to_json() for g in self.gaps], "digital": self.digital.to_json(),
                "digital_actions": list(DIGITAL_ACTIONS), "warnings": list(self.warnings)}


def recommendation_parity(
    episodes: Episodes,
    target_probs: NDArray[np.floating],
    groups: Subgroups,
    *,
    min_episodes: int = MIN_GROUP_EPISODES,
    policy: str = "the policy",
) -> Parity:
    """How often each group is recommended each class of care (see the module docstring).

    ``target_probs`` is (E, L, A), the policy's probabilities on every logged
    step (:func:`evaluation.ope.target_probabilities`).
    """
    probs = np.asarray(target_probs, dtype=np.float64)
    valid = np.asarray(episodes.valid, dtype=bool)
    if probs.ndim != 3 or probs.shape[:2] != valid.shape or probs.shape[2] != len(ACTION_NAMES):
        raise ValueError(f"target probabilities must have shape {(*valid.shape, len(ACTION_NAMES))} for parity "
                         f"of recommendations, got {probs.shape}")
    to_class = _class_matrix()
    v = valid[..., None]
    # per-episode sums over valid steps, (E, C)
    recommended = np.einsum("ela,ac->ec", np.where(v, probs, 0.0), to_class)
    logged_onehot = np.zeros_like(probs)
    np.put_along_axis(logged_onehot, np.asarray(episodes.action)[..., None], 1.0, axis=2)
    logged = np.einsum("ela,ac->ec", np.where(v, logged_onehot, 0.0), to_class)
    mask = np.asarray(episodes.mask, dtype=np.float64)
    allowed = np.einsum("ela,ac->elc", mask, to_class) > 0
    allowed_steps = (allowed & v).sum(axis=1).astype(np.float64)
    steps = valid.sum(axis=1)

    rows: list[GroupRates] = []
    warnings: list[str] = []
    for column in groups.columns:
        for group in groups.order[column]:
            index = groups.members(column, group)
            if len(index) == 0:
                continue
            n_steps = int(steps[index].sum())
            denom = max(n_steps, 1)
            rows.append(GroupRates(
                column, group, len(index), n_steps,
                {c: float(recommended[index, k].sum() / denom) for k, c in enumerate(CARE_CLASSES)},
                {c: float(logged[index, k].sum() / denom) for k, c in enumerate(CARE_CLASSES)},
                {c: float(allowed_steps[index, k].sum() / denom) for k, c in enumerate(CARE_CLASSES)},
                len(index) < min_episodes))
    gaps: list[ClassGap] = []
    for column in groups.columns:
        part = [r for r in rows if r.column == column and r.n_steps > 0 and not r.too_few]
        if len(part) < 2:
            continue
        for c in CARE_CLASSES:
            high = max(part, key=lambda r: r.recommended[c])
            low = min(part, key=lambda r: r.recommended[c])
            gaps.append(ClassGap(column, c, high.recommended[c] - low.recommended[c], high.group, low.group))

    # digital-only care by each step's own digital access
    k = CARE_CLASSES.index(DIGITAL_CLASS)
    digital_prob = np.einsum("ela,a->el", probs, to_class[:, k])
    access = np.asarray(episodes.obs)[..., FEATURE_INDEX["digital_access"]] > 0
    shares: dict[bool, tuple[float | None, int, float | None]] = {}
    for has in (False, True):
        sel = valid & (access == has)
        n = int(sel.sum())
        shares[has] = ((float(digital_prob[sel].mean()), n, float(allowed[..., k][sel].mean())) if n
                       else (None, 0, None))
    digital = DigitalShare(shares[False][0], shares[True][0], shares[False][1], shares[True][1], shares[False][2],
                           shares[True][2])
    if digital.no_access is not None and digital.no_access > 0:
        warnings.append(f"{policy} recommends digital-only care ({', '.join(DIGITAL_ACTIONS)}) to patients without "
                        f"digital access: {digital.no_access:.1%} of their steps' probability"
                        + (f" (the logged masks allowed it on {digital.no_access_allowed:.1%} of those steps)"
                           if digital.no_access_allowed else ""))
    return Parity(CARE_CLASSES, rows, gaps, digital, tuple(warnings))


@dataclass(frozen=True)
class Fairness:
    """Both fairness views of one policy."""

    values: SubgroupValues | None
    parity: Parity
    warnings: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {"values": None if self.values is None else self.values.to_json(), "parity": self.parity.to_json(),
                "warnings": list(self.warnings)}


def fairness_report(
    episodes: Episodes,
    target_probs: NDArray[np.floating],
    groups: Subgroups,
    *,
    estimators: Sequence[str] = ("wis",),
    q_hat: NDArray[np.floating] | None = None,
    fqe_initial_values: NDArray[np.floating] | None = None,
    interval: str | None = "bootstrap",
    level: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
    gamma: float = 1.0,
    clip: float | None = None,
    min_episodes: int = MIN_GROUP_EPISODES,
    policy: str = "the policy",
) -> Fairness:
    """:func:`subgroup_values` (when ``estimators`` is not empty) and :func:`recommendation_parity` together."""
    values = subgroup_values(episodes, target_probs, groups, estimators=estimators, q_hat=q_hat,
                             fqe_initial_values=fqe_initial_values, interval=interval, level=level, n_boot=n_boot,
                             seed=seed, gamma=gamma, clip=clip, min_episodes=min_episodes) if estimators else None
    parity = recommendation_parity(episodes, target_probs, groups, min_episodes=min_episodes, policy=policy)
    return Fairness(values, parity, (values.warnings if values else ()) + parity.warnings)


__all__ = ["CARE_CLASSES", "DIGITAL_ACTIONS", "GROUP_LABELS", "MIN_GROUP_EPISODES", "ClassGap", "DigitalShare",
           "Fairness", "GroupRates", "GroupValue", "Parity", "SubgroupValues", "Subgroups", "ValueGap",
           "episode_groups", "fairness_report", "fqe_estimate", "recommendation_parity", "subgroup_values",
           "take_episodes"]

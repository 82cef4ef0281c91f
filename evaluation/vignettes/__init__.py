"""Guideline vignettes: does a policy's first suggestion match what guidance accepts?

A vignette is a synthetic textbook case (``cases.yaml`` beside this module) with
the next steps that NICE NG222, CANMAT 2023 or the APA guidelines would accept
first, and a citation. :func:`load_cases` reads and checks a case file (every
name, bound and type, and that each acceptable action is allowed by the safety
rules of :mod:`envs.rules` for that patient); :func:`score` ranks the allowed
actions of each case by a policy and reports how often the first suggestion,
or one of the first three, is acceptable, and which safety-critical cases fail.

The observation a policy reads is built here from the case's named features
(``serving.patient`` does the same for clinicians, but evaluation may not
import serving): every base feature has a value (the file's ``defaults`` plus
the case's own), a measurement counts as taken this week unless the case lists
it under ``not_measured``, and the wearables count as not recorded.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import yaml
from numpy.typing import NDArray

from carepath.jsontypes import is_number
from envs.rules import action_mask, blocking_rules
from envs.spec import (
    ACTION_NAMES,
    BASE_FEATURES,
    FEATURE_BOUNDS,
    FEATURE_INDEX,
    MASK_PREFIX,
    MASKABLE_FEATURES,
    N_FEATURES,
)
from policies.base import Policy

#: The case file shipped with carepath (package data, see pyproject.toml).
CASES_PATH: Final = Path(__file__).with_name("cases.yaml")
FORMAT: Final = "carepath-vignettes"
VERSION: Final = 1

#: Wearable features: not part of a textbook case, so 0 and "not recorded" unless a case gives them.
WEARABLES: Final = ("sleep_hours", "daily_steps")
#: Features that ``defaults`` must give (everything a clinician would know about the patient).
DEFAULT_FEATURES: Final = tuple(name for name in BASE_FEATURES if name not in WEARABLES)
#: Features that are counts or categories: a fractional value is a typing slip, refused.
INTEGER_FEATURES: Final = frozenset({
    "phq9", "phq9_item9", "gad7", "weeks_since_measurement", "phq9_change_4w", "phq9_at_intake",
    "treatment_level", "weeks_on_step", "dose_level", "weeks_on_dose", "on_psychotherapy", "on_digital",
    "on_augmentation", "in_specialist_care", "weeks_in_care", "age_band", "sex", "prior_episodes",
    "digital_access", "weeks_well",
})
#: Reported only by a patient on an antidepressant (as in the simulator's measurement model).
DRUG_REPORTS: Final = ("side_effect_burden", "adherence")

_ID = re.compile(r"[a-z0-9][a-z0-9_]*")
_TOP_KEYS: Final = frozenset({"format", "version", "defaults", "cases"})
_REQUIRED_CASE_KEYS: Final = ("id", "title", "features", "acceptable_first", "critical", "source")
_CASE_KEYS: Final = frozenset(_REQUIRED_CASE_KEYS) | {"unacceptable", "not_measured"}

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class Vignette:
    """One synthetic case: the patient's features and the first steps guidance accepts."""

    id: str
    title: str
    features: dict[str, float]  # every base feature (defaults filled in), wearables only if given
    acceptable_first: tuple[str, ...]
    critical: bool
    source: str
    unacceptable: tuple[str, ...] = ()
    not_measured: tuple[str, ...] = ()

    def observation(self) -> FloatArray:
        """The observation row (``envs.spec.FEATURE_NAMES`` order) a policy reads for this case."""
        return build_observation(self.features, self.not_measured)


def build_observation(features: Mapping[str, float], not_measured: Sequence[str] = ()) -> FloatArray:
    """Named base features -> observation row, with the missingness indicators set.

    A maskable measurement counts as taken this week (indicator 1) unless it is in
    ``not_measured``, is a wearable that was not given, or is a side-effect or adherence
    report of a patient on no antidepressant (nothing to report on, as in the simulator).
    """
    obs = np.zeros(N_FEATURES, dtype=np.float64)
    for name, value in features.items():
        obs[FEATURE_INDEX[name]] = value
    no_drug = features.get("dose_level", 0.0) <= 0
    for name in MASKABLE_FEATURES:
        measured = name in features and name not in not_measured and not (no_drug and name in DRUG_REPORTS)
        obs[FEATURE_INDEX[MASK_PREFIX + name]] = 1.0 if measured else 0.0
    return obs


# ----------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a key given twice (YAML would silently keep the last one)."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, str | int | float | bool | None):
            continue  # an unhashable key: construct_mapping refuses it with YAML's own message
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_cases(path: str | Path | None = None) -> list[Vignette]:
    """Read and check a case file (the shipped ``cases.yaml`` by default).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file,
    the case id and the problem for anything else (unknown feature or action names,
    values out of bounds, acceptable actions the safety rules block, a missing source...).
    """
    path = Path(path) if path is not None else CASES_PATH
    if not path.is_file():
        raise FileNotFoundError(f"vignette file not found: {path}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a safe loader)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping with keys {', '.join(sorted(_TOP_KEYS))}")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {', '.join(map(repr, unknown))}; "
                         f"expected {', '.join(sorted(_TOP_KEYS))}")
    if raw.get("format") != FORMAT or raw.get("version") != VERSION:
        raise ValueError(f"{path}: expected 'format: {FORMAT}' and 'version: {VERSION}', "
                         f"got {raw.get('format')!r} and {raw.get('version')!r}")
    defaults = _features(raw.get("defaults"), f"{path}: defaults")
    missing = [name for name in DEFAULT_FEATURES if name not in defaults]
    if missing:
        raise ValueError(f"{path}: defaults must give every feature but the wearables; missing {', '.join(missing)}")
    entries = raw.get("cases")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: 'cases' must be a non-empty list")
    cases: list[Vignette] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        case = _case(entry, defaults, f"{path}: case {i + 1}")
        if case.id in seen:
            raise ValueError(f"{path}: case {case.id!r}: id is used twice")
        seen.add(case.id)
        cases.append(case)
    return cases


def _case(entry: Any, defaults: dict[str, float], where: str) -> Vignette:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping with keys {', '.join(_REQUIRED_CASE_KEYS)}")
    case_id = entry.get("id")
    if not isinstance(case_id, str) or not _ID.fullmatch(case_id):
        raise ValueError(f"{where}: 'id' must be lower case letters, digits and underscores, got {case_id!r}")
    where = f"{where.rsplit(': ', 1)[0]}: case {case_id!r}"
    unknown = sorted(set(entry) - _CASE_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"expected some of {', '.join(sorted(_CASE_KEYS))}")
    for key in _REQUIRED_CASE_KEYS:
        if key not in entry:
            raise ValueError(f"{where}: missing {key!r}")
    for key in ("title", "source"):
        if not isinstance(entry[key], str) or not entry[key].strip():
            raise ValueError(f"{where}: {key!r} must be non-empty text, got {entry[key]!r}")
    if not isinstance(entry["critical"], bool):
        raise ValueError(f"{where}: 'critical' must be true or false, got {entry['critical']!r}")
    features = {**defaults, **_features(entry["features"], f"{where}: features")}
    acceptable = _actions(entry["acceptable_first"], f"{where}: acceptable_first")
    if not acceptable:
        raise ValueError(f"{where}: acceptable_first must name at least one action")
    unacceptable = _actions(entry.get("unacceptable", []), f"{where}: unacceptable")
    both = [a for a in acceptable if a in unacceptable]
    if both:
        raise ValueError(f"{where}: {', '.join(both)} listed as both acceptable and unacceptable")
    not_measured = entry.get("not_measured", [])
    if not isinstance(not_measured, list) or not all(isinstance(n, str) for n in not_measured):
        raise ValueError(f"{where}: 'not_measured' must be a list of feature names")
    bad = [n for n in not_measured if n not in MASKABLE_FEATURES]
    if bad:
        raise ValueError(f"{where}: not_measured names {', '.join(map(repr, bad))}, which are not measurements; "
                         f"expected some of {', '.join(MASKABLE_FEATURES)}")
    case = Vignette(id=case_id, title=entry["title"].strip(), features=features, acceptable_first=acceptable,
                    critical=entry["critical"], source=" ".join(entry["source"].split()),
                    unacceptable=unacceptable, not_measured=tuple(not_measured))
    blocked = blocking_rules(case.observation())
    for action in acceptable:
        if blocked[action]:
            rules = ", ".join(rule.name for rule in blocked[action])
            raise ValueError(f"{where}: acceptable action {action!r} is blocked by the safety rules for this "
                             f"patient ({rules}); remove it or change the features")
    return case


def _features(raw: Any, where: str) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping of feature names to numbers")
    out: dict[str, float] = {}
    for name, value in raw.items():
        if name not in BASE_FEATURES:
            raise ValueError(f"{where}: unknown feature {name!r}; expected some of {', '.join(BASE_FEATURES)}")
        if not is_number(value):
            raise ValueError(f"{where}: feature {name!r} must be a number, got {value!r}")
        low, high = FEATURE_BOUNDS[name]
        if not low <= value <= high:
            raise ValueError(f"{where}: feature {name!r} must be in [{low:g}, {high:g}], got {value!r}")
        if name in INTEGER_FEATURES and not float(value).is_integer():
            raise ValueError(f"{where}: feature {name!r} must be a whole number, got {value!r}")
        out[name] = float(value)
    return out


def _actions(raw: Any, where: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(a, str) for a in raw):
        raise ValueError(f"{where}: expected a list of action names")
    unknown = [a for a in raw if a not in ACTION_NAMES]
    if unknown:
        raise ValueError(f"{where}: unknown action {unknown[0]!r}; expected one of {', '.join(ACTION_NAMES)}")
    if len(set(raw)) != len(raw):
        raise ValueError(f"{where}: an action is listed twice")
    return tuple(raw)


def file_sha256(path: str | Path) -> str:
    """Hash of a case file, so that a report says exactly which cases it scored."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class CaseResult:
    """How a policy ranked one case.

    ``top3``, ``first_ok`` and ``top3_ok`` follow the shown order, in which action order
    settles ties. A tie is really a choice the policy would make at random, so the
    ``*_chance`` fields count it at its odds: the chance that the first suggestion (or
    one of the first three) is acceptable when tied actions come in random order. For a
    policy without ties they equal the booleans; the shares average them.
    """

    id: str
    title: str
    critical: bool
    acceptable_first: tuple[str, ...]
    top3: tuple[str, ...]  # the policy's first three allowed actions, best first
    first_ok: bool  # the first suggestion shown is acceptable
    top3_ok: bool  # an acceptable action is among the first three shown
    first_chance: float
    top3_chance: float
    first_unacceptable: bool  # the first suggestion shown is one the guidance advises against
    acceptable_probability: float  # the policy's probability of choosing an acceptable action
    tie_at_top: bool  # several allowed actions share the top place
    source: str

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "critical": self.critical,
                "acceptable_first": list(self.acceptable_first), "top3": list(self.top3),
                "first_ok": self.first_ok, "top3_ok": self.top3_ok, "first_chance": self.first_chance,
                "top3_chance": self.top3_chance, "first_unacceptable": self.first_unacceptable,
                "acceptable_probability": self.acceptable_probability, "tie_at_top": self.tie_at_top,
                "source": self.source}


@dataclass(frozen=True)
class VignetteResult:
    """A policy's score on a set of vignettes."""

    policy: str
    cases: list[CaseResult] = field(default_factory=list)

    @property
    def first_share(self) -> float:
        """Share of cases whose first suggestion is acceptable (ties at their odds)."""
        return _mean(c.first_chance for c in self.cases)

    @property
    def top3_share(self) -> float:
        """Share of cases with an acceptable action among the first three (ties at their odds)."""
        return _mean(c.top3_chance for c in self.cases)

    @property
    def expected_share(self) -> float:
        """Mean probability that the policy picks an acceptable action when it samples
        (what a stochastic policy actually does, rather than its most probable action)."""
        return _mean(c.acceptable_probability for c in self.cases)

    @property
    def critical_failures(self) -> list[str]:
        """Ids of critical cases whose first suggestion is not (certainly) acceptable."""
        return [c.id for c in self.cases if c.critical and c.first_chance < 1.0]

    def as_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "n_cases": len(self.cases),
                "n_critical": sum(c.critical for c in self.cases),
                "first_share": self.first_share, "top3_share": self.top3_share,
                "expected_share": self.expected_share, "critical_failures": self.critical_failures,
                "cases": [c.as_dict() for c in self.cases]}


def _mean(values: Iterable[float]) -> float:
    items = [float(v) for v in values]
    return sum(items) / len(items) if items else math.nan


def _tie_break_scores(policy: Policy, obs: FloatArray) -> FloatArray | None:
    """The policy's own scores per action (a bundle's Q-values or logits), if it has them:
    a greedy bundle gives all probability to one action, and these order the rest."""
    outputs = getattr(policy, "outputs", None)
    if not callable(outputs):
        return None
    scores = np.asarray(outputs(obs), dtype=np.float64)
    return scores if scores.shape == (len(obs), len(ACTION_NAMES)) else None


def rank_actions(policy: Policy, obs: FloatArray) -> tuple[list[list[list[int]]], FloatArray]:
    """For each observation row, the allowed actions best first, as groups of tied actions
    (by probability, then the policy's scores where it has them; action order within a
    group), and the policy's probabilities."""
    obs = np.atleast_2d(np.asarray(obs, dtype=np.float64))
    mask = action_mask(obs)
    probs = np.asarray(policy.action_probs(obs, mask), dtype=np.float64)
    scores = _tie_break_scores(policy, obs)
    if scores is None:
        scores = np.zeros_like(probs)
    rankings: list[list[list[int]]] = []
    for i in range(len(obs)):
        allowed = np.flatnonzero(mask[i])
        # np.lexsort sorts by its last key first: probability, then score, then action index
        order = allowed[np.lexsort((allowed, -scores[i, allowed], -probs[i, allowed]))]
        groups: list[list[int]] = []
        for a in order:
            key = (probs[i, a], scores[i, a])
            if groups and key == (probs[i, groups[-1][0]], scores[i, groups[-1][0]]):
                groups[-1].append(int(a))
            else:
                groups.append([int(a)])
        rankings.append(groups)
    return rankings, probs


def chance_in_top(groups: Sequence[Sequence[int]], acceptable: Collection[int], k: int) -> float:
    """Chance that an acceptable action is among the first ``k`` when each group of tied
    actions comes in a uniformly random order (groups themselves in the given order)."""
    slots = k
    for group in groups:
        if slots <= 0:
            break
        hits = sum(a in acceptable for a in group)
        if len(group) <= slots:
            if hits:
                return 1.0
            slots -= len(group)
        else:  # the cut falls inside this group: `slots` of its members drawn at random
            return 1.0 - math.comb(len(group) - hits, slots) / math.comb(len(group), slots)
    return 0.0


def score(policy: Policy, cases: Sequence[Vignette], name: str | None = None) -> VignetteResult:
    """Rank every case's allowed actions by ``policy`` and compare with what guidance accepts."""
    if not cases:
        raise ValueError("no vignettes to score")
    obs = np.stack([case.observation() for case in cases])
    rankings, probs = rank_actions(policy, obs)
    results = []
    for case, groups, p in zip(cases, rankings, probs, strict=True):
        shown = [a for group in groups for a in group]
        top3 = tuple(ACTION_NAMES[a] for a in shown[:3])
        acceptable = {ACTION_NAMES.index(a) for a in case.acceptable_first}
        results.append(CaseResult(
            id=case.id, title=case.title, critical=case.critical, acceptable_first=case.acceptable_first,
            top3=top3, first_ok=top3[0] in case.acceptable_first,
            top3_ok=any(a in case.acceptable_first for a in top3),
            first_chance=chance_in_top(groups, acceptable, 1), top3_chance=chance_in_top(groups, acceptable, 3),
            first_unacceptable=top3[0] in case.unacceptable,
            acceptable_probability=float(np.clip(p[sorted(acceptable)].sum(), 0.0, 1.0)),
            tie_at_top=len(groups[0]) > 1, source=case.source,
        ))
    return VignetteResult(policy=name if name is not None else str(getattr(policy, "name", "policy")), cases=results)


def resolve_policy(spec: str) -> Policy:
    """A policy from a spec: a bundle folder, or a baseline name with an optional
    exploration share (``stard``, ``usual_care:0.1``, ``random``), as ``carepath evaluate`` reads it."""
    from policies import load
    from policies.baselines import baseline_from_spec

    path = Path(spec)
    if path.exists():
        return load(path)  # BundleError (a ValueError) names the file and field
    try:
        return baseline_from_spec(spec)
    except ValueError as err:
        raise ValueError(f"--policy {spec}: {err} (and no policy bundle folder at {path})") from None


__all__ = [
    "CASES_PATH",
    "CaseResult",
    "Vignette",
    "VignetteResult",
    "build_observation",
    "chance_in_top",
    "file_sha256",
    "load_cases",
    "rank_actions",
    "resolve_policy",
    "score",
]

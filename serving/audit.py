"""The audit store: every recommendation served and every clinician choice.

Each answered request becomes a :class:`~serving.db.RecommendationRecord`
(what the policy saw, the request, the answer, which policy and token) and
each clinician choice a :class:`~serving.db.FeedbackRecord`; both are
committed before the call returns, so what the clinician was shown is on disk
before they see it.

Patient and clinician identifiers are stored only as keyed pseudonyms
(:func:`serving.db.pseudonymise`). The raw patient id is also replaced by its
pseudonym wherever it appears in the request or answer as a whole value or
at the end of a FHIR reference (``Patient/<id>``), and the identifying fields
of FHIR ``Patient``, ``Practitioner`` and ``RelatedPerson`` resources (name,
birth date, address, ...) are removed. Other identifiers the caller puts in
free text cannot be recognised: keep them out of what is recorded.

Clinician choices can be exported as logged data (:meth:`AuditStore.export_logged`)
for offline learning and evaluation.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from uuid import uuid4

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import Engine, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from envs.rules import action_mask
from envs.spec import ACTION_NAMES, FEATURE_BOUNDS, FEATURE_INDEX, FEATURE_NAMES, N_FEATURES
from offline_data.pseudonymise import key_fingerprint, load_key
from serving.db import FeedbackRecord, RecommendationRecord, Setting, pseudonymise, utc_now

if TYPE_CHECKING:  # the importer (behaviour models, scipy) loads on export only: it is not on the serving path
    from offline_data.importer import ImportResult

CHANNELS: Final[tuple[str, ...]] = ("rest", "cds-hooks", "page")
OUTCOMES: Final[tuple[str, ...]] = ("accepted", "overridden")
KEY_FINGERPRINT_SETTING: Final = "pseudonym_key_fingerprint"
#: FHIR resources about a person, and their fields that identify them.
_PERSON_RESOURCES: Final = frozenset({"Patient", "Practitioner", "RelatedPerson"})
_IDENTIFYING_FHIR_FIELDS: Final = frozenset({
    "identifier", "name", "telecom", "address", "birthDate", "photo", "contact", "link", "text"})
_REMOVED: Final = "[removed]"
_AUDIT_ID: Final = re.compile(r"[0-9a-f]{32}")
_WEEK: Final = timedelta(weeks=1)


class UnknownAuditId(ValueError):
    """Feedback names an audit id the store has no recommendation for."""

    def __init__(self, audit_id: str) -> None:
        self.audit_id = audit_id
        super().__init__(f"unknown audit id {audit_id!r}: no recommendation was recorded under it")


@dataclass(frozen=True)
class AuditedFeedback:
    id: int
    created_at: datetime
    token_name: str
    suggestion_id: str
    action: str
    outcome: str
    override_reason: str | None
    clinician_pseudonym: str | None
    chosen_action: str | None = None

    @property
    def taken_action(self) -> str | None:
        """What the clinician did: the suggestion when accepted, else the alternative if given."""
        return self.action if self.outcome == "accepted" else self.chosen_action


@dataclass(frozen=True)
class AuditedRecommendation:
    audit_id: str
    created_at: datetime
    token_name: str
    channel: str
    patient_pseudonym: str | None
    policy_name: str
    policy_version: str
    certificate_id: str | None
    features: dict[str, float]
    request: Any
    response: Any
    feedback: tuple[AuditedFeedback, ...]


@dataclass(frozen=True)
class AuditSummary:
    """Counts for ``carepath audit summary``."""

    recommendations: int
    by_channel: dict[str, int]
    by_policy: dict[str, int]  # "name version" -> count
    feedback: int
    by_outcome: dict[str, int]
    without_feedback: int  # recommendations nobody gave feedback on


@dataclass(frozen=True)
class ExportResult:
    """What :meth:`AuditStore.export_logged` wrote and what it left out, and why."""

    out: Path
    rows: int
    patients: int
    episodes: int
    decisions: int  # recommendations with feedback and a patient, before weekly de-duplication
    without_feedback: int  # skipped: no clinician choice recorded
    without_patient: int  # skipped: no patient id was given
    without_choice: int  # skipped: the suggestion was overridden and what was done instead is unknown
    bad_features: int  # skipped: features incomplete or out of range
    superseded: int  # skipped: a later record of the same patient in the same week was kept
    blocked: int  # skipped: the chosen action is blocked by the clinical rules (the episode is split there)
    imported: ImportResult = field(repr=False)


@dataclass(frozen=True)
class _Decision:
    """One exported week before it becomes a row: the record's time, features and the chosen action."""

    audit_id: str
    patient: str
    created_at: datetime
    features: dict[str, float]
    action: str


class AuditStore:
    """Recommendations and feedback in the audit database (see the module doc)."""

    def __init__(self, engine: Engine, pseudonym_key: bytes) -> None:
        self.engine = engine
        self._key = pseudonym_key
        self._key_checked = False

    # ------------------------------------------------------------------------- writing

    def record_recommendation(
        self,
        *,
        token_name: str,
        channel: str,
        patient_id: str | None,
        policy_name: str,
        policy_version: str,
        certificate_id: str | None = None,
        features: Mapping[str, float],
        request: Any,
        response: Any,
        audit_id: str | None = None,
    ) -> str:
        """Store one answered request (committed before returning); returns its audit id."""
        if channel not in CHANNELS:
            raise ValueError(f"unknown channel {channel!r}; expected one of {', '.join(CHANNELS)}")
        audit_id = uuid4().hex if audit_id is None else _check_audit_id(audit_id)
        patient = None if patient_id is None else pseudonymise(patient_id, self._key)
        row = dict(
            audit_id=audit_id, created_at=utc_now(), token_name=token_name, channel=channel,
            patient_pseudonym=patient, policy_name=policy_name, policy_version=str(policy_version),
            certificate_id=certificate_id, features_json=_to_json(_check_features(features), "features"),
            request_json=_to_json(scrub(request, patient_id, patient), "request"),
            response_json=_to_json(scrub(response, patient_id, patient), "response"),
        )
        self.check_key()
        # a Core insert in its own transaction: one row, committed (and, on SQLite, synced)
        # before the answer leaves; the ORM's unit of work would double the cost per request
        try:
            with self.engine.begin() as connection:
                connection.execute(insert(RecommendationRecord), [row])
        except IntegrityError:
            raise ValueError(f"audit id {audit_id!r} is recorded already; expected a new one") from None
        return audit_id

    def record_feedback(
        self,
        *,
        audit_id: str,
        token_name: str,
        suggestion_id: str,
        action: str,
        outcome: str,
        override_reason: str | None = None,
        clinician_id: str | None = None,
        chosen_action: str | None = None,
    ) -> int:
        """Store what the clinician did with suggestion ``action`` of recommendation ``audit_id``
        (``chosen_action``: what was done instead of an overridden one, when known); returns the
        feedback id."""
        for name, value in (("action", action), ("chosen_action", chosen_action)):
            if (value is not None or name == "action") and value not in ACTION_NAMES:
                raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(ACTION_NAMES)}")
        if chosen_action is not None and outcome != "overridden":
            raise ValueError("chosen_action is only for an overridden suggestion")
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; expected one of {', '.join(OUTCOMES)}")
        clinician = None if clinician_id is None else pseudonymise(clinician_id, self._key)
        self.check_key()
        with Session(self.engine) as session:
            if session.get(RecommendationRecord, audit_id) is None:
                raise UnknownAuditId(audit_id)
            row = FeedbackRecord(audit_id=audit_id, created_at=utc_now(), token_name=token_name,
                                 suggestion_id=str(suggestion_id), action=action, outcome=outcome,
                                 override_reason=override_reason, clinician_pseudonym=clinician,
                                 chosen_action=chosen_action)
            session.add(row)
            session.commit()
            return row.id

    def check_key(self) -> None:
        """Refuse to write under a different key than the store was written with: the
        same patient would silently get two pseudonyms. The key's fingerprint is kept
        in the store (as safe as any pseudonym)."""
        if self._key_checked:
            return
        fingerprint = key_fingerprint(self._key)
        with Session(self.engine) as session:
            if session.get(Setting, KEY_FINGERPRINT_SETTING) is None:
                session.add(Setting(key=KEY_FINGERPRINT_SETTING, value=fingerprint))
                try:
                    session.commit()
                except IntegrityError:  # another process set it first
                    session.rollback()
            stored = session.get(Setting, KEY_FINGERPRINT_SETTING, populate_existing=True)
            if stored is not None and stored.value != fingerprint:
                raise ValueError(
                    f"this audit store's pseudonyms were made with another key (fingerprint {stored.value}, "
                    f"given {fingerprint}); use the same key (--key-file or CAREPATH_PSEUDONYM_KEY, or the "
                    "store's .key file), or the same patient gets two pseudonyms")
        self._key_checked = True

    # ------------------------------------------------------------------------- reading

    def count_recommendations(self) -> int:
        with Session(self.engine) as session:
            return int(session.scalar(select(func.count()).select_from(RecommendationRecord)) or 0)

    def get(self, audit_id: str) -> AuditedRecommendation | None:
        with Session(self.engine) as session:
            row = session.get(RecommendationRecord, audit_id, options=[selectinload(RecommendationRecord.feedback)])
            return None if row is None else _audited(row)

    def iter_recommendations(self, batch: int = 500) -> Iterator[AuditedRecommendation]:
        """Every recommendation with its feedback, oldest first (read in batches)."""
        query = (select(RecommendationRecord).options(selectinload(RecommendationRecord.feedback))
                 .order_by(RecommendationRecord.created_at, RecommendationRecord.audit_id)
                 .execution_options(yield_per=batch))
        with Session(self.engine) as session:
            for row in session.scalars(query):
                yield _audited(row)

    def summary(self) -> AuditSummary:
        return audit_summary(self.engine)

    # ------------------------------------------------------------------------- export

    def export_logged(
        self,
        out: str | Path,
        *,
        key_file: str | Path | None = None,
        k: int = 5,
        estimate_seed: int = 0,
        warn: Callable[[str], None] | None = None,
        report: Callable[[str], None] | None = None,
    ) -> ExportResult:
        """Write the clinicians' choices as logged data (Parquet, the offline schema).

        One row per patient-week, from the recommendations that have feedback:
        the action is what the clinician did (the latest feedback: the accepted
        suggestion, or the step chosen instead of an overridden one; an override
        that does not say what was done instead, as CDS Hooks feedback, is left
        out); ``t`` is whole weeks since the patient's first such record (of
        several records in one week the last is kept); the
        observation is the features the policy saw; the reward is the PHQ-9
        fall to the patient's next record (0 on the last). Behaviour
        probabilities are unknown and are estimated.

        The rows go through :func:`offline_data.importer.import_log` (via a raw
        Parquet file in a temporary folder), so validation, the k-anonymity
        report, behaviour estimation, metadata (``source: import``) and the
        atomic write are the importer's. The importer pseudonymises again:
        the exported ids are ``HMAC(key, pseudonym)``, pseudonyms of the stored
        pseudonyms, under the key of ``key_file`` (else this store's key).

        A week whose chosen action the clinical rules block (an override of a
        hard rule) cannot be a logged transition: it is left out and the
        patient's episode is split there. Raises ValueError, writing nothing,
        when no row is left.
        """
        out = Path(out)
        from offline_data.importer import check_key_location, import_log

        key = self._key if key_file is None else load_key(key_file)
        check_key_location(key_file, out)
        counts, decisions = self._decisions()
        weeks, superseded = _last_per_week(decisions)
        if not weeks:
            raise ValueError(f"nothing to export to {out}: {_nothing_reason(counts)}")
        table, blocked = _raw_table(weeks)
        if table.num_rows == 0:
            raise ValueError(f"nothing to export to {out}: the chosen action of all {blocked} week(s) is blocked by "
                             "the clinical rules")
        with tempfile.TemporaryDirectory(prefix="carepath-audit-export-") as tmp:
            raw = Path(tmp) / "audit-decisions.parquet"
            pq.write_table(table, raw)
            imported = import_log(raw, out, key=key, k=k, estimate_seed=estimate_seed, warn=warn, report=report)
        return ExportResult(out, imported.rows, imported.patients, imported.episodes, len(decisions),
                            counts["without_feedback"], counts["without_patient"], counts["without_choice"],
                            counts["bad_features"],
                            superseded, blocked, imported)

    def _decisions(self) -> tuple[dict[str, int], list[_Decision]]:
        """Records usable for export (ordered by patient, then time) and counts of the others."""
        counts = {"without_feedback": 0, "without_patient": 0, "without_choice": 0, "bad_features": 0}
        decisions: list[_Decision] = []
        for record in self.iter_recommendations():
            if not record.feedback:
                counts["without_feedback"] += 1
            elif record.patient_pseudonym is None:
                counts["without_patient"] += 1
            elif record.feedback[-1].taken_action is None:
                counts["without_choice"] += 1
            elif not _complete(record.features):
                counts["bad_features"] += 1
            else:
                taken = record.feedback[-1].taken_action
                assert taken is not None
                decisions.append(_Decision(record.audit_id, record.patient_pseudonym, record.created_at,
                                           record.features, taken))
        decisions.sort(key=lambda d: (d.patient, d.created_at, d.audit_id))
        return counts, decisions


# ----------------------------------------------------------------------------- summary


def audit_summary(engine: Engine) -> AuditSummary:
    """Counts by channel, policy and feedback outcome (needs no pseudonymisation key)."""
    rec = RecommendationRecord
    with Session(engine) as session:
        by_channel = {channel: n for channel, n in session.execute(
            select(rec.channel, func.count()).group_by(rec.channel))}
        by_policy = {f"{name} {version}": n for name, version, n in session.execute(
            select(rec.policy_name, rec.policy_version, func.count()).group_by(rec.policy_name, rec.policy_version))}
        by_outcome = {outcome: n for outcome, n in session.execute(
            select(FeedbackRecord.outcome, func.count()).group_by(FeedbackRecord.outcome))}
        with_feedback = session.scalar(select(func.count(func.distinct(FeedbackRecord.audit_id)))) or 0
    total = sum(by_channel.values())
    return AuditSummary(
        recommendations=total,
        by_channel=dict(sorted(by_channel.items())),
        by_policy=dict(sorted(by_policy.items())),
        feedback=sum(by_outcome.values()),
        by_outcome=dict(sorted(by_outcome.items())),
        without_feedback=total - int(with_feedback),
    )


# ----------------------------------------------------------------------------- helpers


def _check_audit_id(audit_id: str) -> str:
    if not _AUDIT_ID.fullmatch(audit_id):
        raise ValueError(f"bad audit id {audit_id!r}: expected 32 lower-case hex digits (uuid4().hex)")
    return audit_id


def _check_features(features: Mapping[str, float]) -> dict[str, float]:
    """Known feature names with finite values, in envs.spec.FEATURE_NAMES order."""
    unknown = sorted(set(features) - set(FEATURE_INDEX))
    if unknown:
        raise ValueError(f"unknown feature {', '.join(map(repr, unknown))}; expected names from "
                         "envs.spec.FEATURE_NAMES")
    values = {name: float(features[name]) for name in FEATURE_NAMES if name in features}
    bad = [name for name, value in values.items() if not math.isfinite(value)]
    if bad:
        raise ValueError(f"feature {', '.join(bad)} is not a finite number; expected the value after imputation")
    return values


def _complete(features: Mapping[str, float]) -> bool:
    """Every feature present and within its bounds (what a logged row needs)."""
    return all(name in features and FEATURE_BOUNDS[name][0] <= features[name] <= FEATURE_BOUNDS[name][1]
               for name in FEATURE_NAMES)


def _to_json(value: Any, what: str) -> str:
    """Strict JSON (no NaN or infinity: other readers refuse them); pydantic models as their JSON form."""
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        value = dump(mode="json")
    try:
        return json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as err:
        raise ValueError(f"the {what} cannot be stored as JSON: {err}") from None


def scrub(value: Any, patient_id: str | None, pseudonym: str | None) -> Any:
    """A copy of ``value`` with the raw patient id replaced by its pseudonym
    (as a whole string or at the end of a reference such as ``Patient/<id>``)
    and identifying fields of FHIR person resources removed."""
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        value = dump(mode="json")
    if isinstance(value, Mapping):
        person = value.get("resourceType") in _PERSON_RESOURCES
        return {key: _REMOVED if person and key in _IDENTIFYING_FHIR_FIELDS else scrub(item, patient_id, pseudonym)
                for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(item, patient_id, pseudonym) for item in value]
    if isinstance(value, str) and patient_id and pseudonym:
        if value == patient_id:
            return pseudonym
        if value.endswith("/" + patient_id):
            return value[: -len(patient_id)] + pseudonym
    return value


def _audited(row: RecommendationRecord) -> AuditedRecommendation:
    return AuditedRecommendation(
        audit_id=row.audit_id, created_at=row.created_at, token_name=row.token_name, channel=row.channel,
        patient_pseudonym=row.patient_pseudonym, policy_name=row.policy_name, policy_version=row.policy_version,
        certificate_id=row.certificate_id, features=json.loads(row.features_json), request=json.loads(row.request_json),
        response=json.loads(row.response_json),
        feedback=tuple(AuditedFeedback(f.id, f.created_at, f.token_name, f.suggestion_id, f.action, f.outcome,
                                       f.override_reason, f.clinician_pseudonym, f.chosen_action)
                          for f in row.feedback),
    )


def _last_per_week(decisions: Sequence[_Decision]) -> tuple[list[tuple[int, _Decision]], int]:
    """(week, decision) pairs, the last decision of each patient-week; and how many were dropped.

    ``decisions`` are ordered by patient then time; weeks count from each patient's first.
    """
    kept: list[tuple[int, _Decision]] = []
    first: datetime | None = None
    for i, decision in enumerate(decisions):
        if i == 0 or decisions[i - 1].patient != decision.patient:
            first = decision.created_at
        assert first is not None
        week = (decision.created_at - first) // _WEEK
        if kept and kept[-1][1].patient == decision.patient and kept[-1][0] == week:
            kept[-1] = (week, decision)
        else:
            kept.append((week, decision))
    return kept, len(decisions) - len(kept)


def _raw_table(weeks: Sequence[tuple[int, _Decision]]) -> tuple[pa.Table, int]:
    """The raw log the importer reads, and how many blocked weeks were left out.

    Rewards use consecutive records, blocked ones included (the PHQ-9 at the
    next record is what followed the week's action); a blocked week is then
    dropped and the patient's next week starts a new episode.
    """
    n = len(weeks)
    patients = [d.patient for _, d in weeks]
    obs = np.array([[d.features[name] for name in FEATURE_NAMES] for _, d in weeks],
                   dtype=np.float64).reshape(n, N_FEATURES)
    action = np.array([ACTION_NAMES.index(d.action) for _, d in weeks], dtype=np.int64)
    phq9 = obs[:, FEATURE_INDEX["phq9"]]
    same_next = np.array([i + 1 < n and patients[i + 1] == patients[i] for i in range(n)], dtype=bool)
    reward = np.where(same_next, phq9 - np.roll(phq9, -1), 0.0)
    blocked = ~action_mask(obs)[np.arange(n), action]
    new_patient = np.array([i == 0 or patients[i - 1] != patients[i] for i in range(n)], dtype=bool)
    after_blocked = np.concatenate([[False], blocked[:-1]]) & ~new_patient
    episode = np.cumsum(after_blocked)  # only within-patient order matters to the importer
    keep = ~blocked
    columns: dict[str, Any] = {
        "patient_id": pa.array([p for p, k in zip(patients, keep, strict=True) if k], pa.string()),
        "episode_id": pa.array(episode[keep], pa.int64()),
        "t": pa.array(np.array([w for w, _ in weeks], dtype=np.int64)[keep], pa.int64()),
    }
    for j, name in enumerate(FEATURE_NAMES):
        columns[name] = pa.array(obs[keep, j], pa.float64())
    columns["action_name"] = pa.array([ACTION_NAMES[a] for a in action[keep]], pa.string())
    columns["reward"] = pa.array(reward[keep], pa.float64())
    return pa.table(columns), int(blocked.sum())


def _nothing_reason(counts: Mapping[str, int]) -> str:
    if not any(counts.values()):
        return "the audit store holds no recommendation"
    parts = {"without_feedback": "without clinician feedback", "without_patient": "without a patient id",
             "without_choice": "overridden without the step taken instead",
             "bad_features": "with incomplete or out-of-range features"}
    skipped = ", ".join(f"{n} {parts[name]}" for name, n in counts.items() if n)
    return f"no recommendation has clinician feedback, a patient and complete features ({skipped})"

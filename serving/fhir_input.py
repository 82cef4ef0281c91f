"""FHIR R4 prefetch (as a CDS Hooks client sends it) -> a patient's base features.

The CDS Hooks service (:mod:`serving.cds_hooks`) asks the EHR to prefetch the
Patient, the PHQ-9 totals (LOINC 44261-6), PHQ-9 item 9 (44260-8), GAD-7 totals
(70274-6) and the active MedicationRequests. Every resource is parsed and
validated with the ``fhir.resources`` R4B models, never by hand: a malformed
resource is refused (:class:`PrefetchError`, naming the prefetch key and the
field) rather than half-read, because a mis-read score would silently change
what is suggested.

What cannot be read from FHIR reliably is left out or set the conservative way,
and every such choice is written as a note the clinician sees in the card:

- The dose level of an antidepressant is not reliably comparable across drugs
  and free-text dosages, so an active antidepressant sets ``dose_level`` to the
  maximum (3): the rule "maximum dose" then blocks "raise the dose", which the
  clinician can still choose knowing the real dose.
- A medication that cannot be recognised as an antidepressant (or a missing
  medication prefetch) leaves ``dose_level`` absent; :mod:`serving.patient`
  then assumes "no antidepressant", which blocks the most medication steps.
- Features FHIR does not hold here (treatment step, psychotherapy, digital
  access, ...) are left absent and imputed by the recommender, which lists them.

Names, identifiers, addresses and dates of the patient are never copied into
the features, the notes or an error message: notes speak in weeks and bands.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Final, TypeVar

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.medication import Medication
from fhir.resources.R4B.medicationrequest import MedicationRequest
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.reference import Reference
from pydantic import BaseModel, ValidationError

from envs.spec import BASE_FEATURES, FEATURE_BOUNDS, MAX_DOSE_LEVEL

LOINC: Final = "http://loinc.org"
PHQ9_TOTAL: Final = "44261-6"
PHQ9_ITEM9: Final = "44260-8"
GAD7_TOTAL: Final = "70274-6"
ATC: Final = "http://www.whocc.no/atc"
#: ATC group of antidepressants (N06A).
ATC_ANTIDEPRESSANTS: Final = "N06A"

#: Prefetch keys without which no recommendation is made (the service answers 412).
REQUIRED_PREFETCH: Final[tuple[str, ...]] = ("patient", "phq9")
#: Prefetch keys holding searchset Bundles of Observations.
OBSERVATION_PREFETCH: Final[tuple[str, ...]] = ("phq9", "item9", "gad7")
MEDICATION_PREFETCH: Final = "medications"

#: LOINC answer codes of a PHQ-9 item, in case item 9 comes as a coded answer.
PHQ9_ITEM_ANSWERS: Final[dict[str, float]] = {"LA6568-5": 0.0, "LA6569-3": 1.0, "LA6570-1": 2.0, "LA6571-9": 3.0}

#: Generic and common brand names of antidepressants (ATC N06A), matched as words
#: in the medication's text, codings' displays and contained Medication.
ANTIDEPRESSANT_NAMES: Final[frozenset[str]] = frozenset({
    # SSRIs
    "citalopram", "escitalopram", "fluoxetine", "fluvoxamine", "paroxetine", "sertraline",
    "celexa", "cipramil", "lexapro", "cipralex", "prozac", "sarafem", "luvox", "paxil", "seroxat", "pexeva",
    "zoloft", "lustral",
    # SNRIs
    "venlafaxine", "desvenlafaxine", "duloxetine", "levomilnacipran", "milnacipran",
    "effexor", "pristiq", "cymbalta", "fetzima",
    # atypical and others
    "bupropion", "mirtazapine", "trazodone", "nefazodone", "vortioxetine", "vilazodone", "agomelatine",
    "reboxetine", "esketamine", "gepirone", "wellbutrin", "remeron", "desyrel", "trintellix", "brintellix",
    "viibryd", "valdoxan", "spravato", "auvelity",
    # tricyclics and MAOIs
    "amitriptyline", "nortriptyline", "imipramine", "desipramine", "clomipramine", "doxepin", "trimipramine",
    "protriptyline", "amoxapine", "maprotiline", "dosulepin", "lofepramine", "phenelzine", "tranylcypromine",
    "isocarboxazid", "moclobemide", "selegiline", "emsam", "nardil", "parnate", "marplan", "anafranil",
})

_WEEK: Final = timedelta(weeks=1)
#: "About 4 weeks before": the earlier PHQ-9 must be at least this much older.
CHANGE_MIN_GAP: Final = timedelta(weeks=3)
#: Sustained remission (feature weeks_well): from a PHQ-9 below 5 (Kroenke 2001) until one of 10 or more.
REMISSION_BELOW: Final = 5.0
REMISSION_LOST: Final = 10.0
_SKIPPED_STATUSES: Final = frozenset({"entered-in-error", "cancelled"})
_AGE_BAND_STARTS: Final = (18, 30, 45, 60)
_PATIENT_IN_REFERENCE: Final = re.compile(r"(?:^|/)Patient/([^/]+)(?:/_history/[^/]+)?$")

R = TypeVar("R", bound=BaseModel)


class PrefetchError(ValueError):
    """A prefetch entry that is not valid FHIR R4 (or not what its key asks for)."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"prefetch {key!r}: {message}")


@dataclass(frozen=True)
class Measurement:
    """One score read from an Observation (or one of its components)."""

    code: str
    value: float
    when: datetime
    imprecise: bool  # the date was given to the month or year only


@dataclass
class _Collected:
    measurements: list[Measurement]
    skipped_status: int = 0
    without_value: int = 0
    without_time: int = 0


def features_from_prefetch(prefetch: Mapping[str, Any], now: datetime, *,
                           patient_id: str | None = None) -> tuple[dict[str, float], list[str]]:
    """Base features (names from ``envs.spec.BASE_FEATURES``) and notes on how they were derived.

    ``prefetch`` maps the service's prefetch keys to FHIR JSON (``patient``: a
    Patient; ``phq9``, ``item9``, ``gad7``: searchset Bundles of Observations;
    ``medications``: a Bundle of MedicationRequests); missing or null keys are
    skipped. ``now`` (aware) is the moment "weeks since" counts to. When
    ``patient_id`` is given, a resource about another patient is refused: a
    mixed-up prefetch must not produce a recommendation.
    Raises :class:`PrefetchError` naming the key and field of invalid FHIR.
    """
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime (UTC)")
    features: dict[str, float] = {}
    notes: list[str] = []

    patient_json = prefetch.get("patient")
    if patient_json is not None:
        patient = _parse("patient", patient_json, Patient)
        if patient_id is not None and patient.id is not None and patient.id != patient_id:
            raise PrefetchError("patient", "the Patient's id is not context.patientId: the prefetch is about "
                                           "another patient")
        _patient_features(patient, now, features, notes)

    collected = _collect_observations(prefetch, patient_id)
    _score_features(collected, now, features, notes)

    meds_json = prefetch.get(MEDICATION_PREFETCH)
    if meds_json is None:
        notes.append("No medication prefetch: whether an antidepressant is prescribed is not known "
                      "(assumed none, which blocks the most medication steps).")
    else:
        bundle = _parse(MEDICATION_PREFETCH, meds_json, Bundle)
        requests = _bundle_resources(MEDICATION_PREFETCH, bundle, MedicationRequest, patient_id)
        _medication_features(requests, now, features, notes)

    ordered = {name: features[name] for name in BASE_FEATURES if name in features}
    return ordered, notes


# ----------------------------------------------------------------------------- parsing


def _parse(key: str, data: Any, model: type[R]) -> R:
    """Validate ``data`` as the FHIR resource ``model``; errors name the key and the fields.

    The offending values are never quoted: they may be names or identifiers.
    """
    expected = model.__name__
    if not isinstance(data, Mapping):
        raise PrefetchError(key, f"expected a FHIR {expected} (a JSON object), got {type(data).__name__}")
    kind = data.get("resourceType")
    if kind != expected:
        raise PrefetchError(key, f"expected a FHIR {expected}, got resourceType {kind!r}"[:200])
    try:
        return model.model_validate(dict(data))
    except ValidationError as err:
        raise PrefetchError(key, f"invalid FHIR R4 {expected}: {_describe_errors(err)}") from None
    except (TypeError, KeyError):  # fhir_core fails so on a nested resource whose resourceType is no FHIR type
        field = _bad_resource_type(data) or "(resource)"
        raise PrefetchError(key, f"invalid FHIR R4 {expected}: field {field}: not a FHIR resource type") from None


def _bad_resource_type(data: Any) -> str | None:
    """Where in ``data`` the first nested ``resourceType`` names no FHIR resource ("entry[0].resource")."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, Mapping):
            kind = value.get("resourceType")
            if path and "resourceType" in value and not (isinstance(kind, str) and _is_resource_type(kind)):
                return f"{path}.resourceType"
            stack.extend((item, f"{path}.{name}".lstrip(".")) for name, item in value.items())
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(value))
    return None


def _is_resource_type(name: str) -> bool:
    try:
        get_fhir_model_class(name)
    except (ValueError, KeyError):
        return False
    return True


def _describe_errors(err: ValidationError, limit: int = 3) -> str:
    parts = []
    for e in err.errors()[:limit]:
        field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".") or "(resource)"
        parts.append(f"field {field}: {e['msg']}")
    more = err.error_count() - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _bundle_resources(key: str, bundle: Bundle, model: type[R], patient_id: str | None) -> list[R]:
    """The resources of type ``model`` in a Bundle (others, e.g. OperationOutcome, are ignored)."""
    found: list[R] = []
    for i, entry in enumerate(bundle.entry or []):
        resource = entry.resource
        if not isinstance(resource, model):
            continue
        subject = getattr(resource, "subject", None)
        if patient_id is not None and isinstance(subject, Reference) and _other_patient(subject, patient_id):
            raise PrefetchError(key, f"entry[{i}].resource.subject is another patient than context.patientId")
        found.append(resource)
    return found


def _other_patient(subject: Reference, patient_id: str) -> bool:
    match = _PATIENT_IN_REFERENCE.search(subject.reference or "")
    return match is not None and match.group(1) != patient_id


def _instant(value: Any) -> tuple[datetime, bool] | None:
    """A FHIR date/dateTime/instant as an aware datetime, and whether it was imprecise.

    A partial date ("2024" or "2024-03") becomes its first day.
    """
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)), False
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC), False
    if isinstance(value, str):
        parts = value.split("-")
        try:
            year = int(parts[0])
            month = int(parts[1]) if len(parts) > 1 else 1
            return datetime(year, month, 1, tzinfo=UTC), True
        except ValueError:
            return None
    return None


def _weeks(later: datetime, earlier: datetime) -> float:
    return float((later - earlier) // _WEEK)


# ----------------------------------------------------------------------------- the patient


def _patient_features(patient: Patient, now: datetime, features: dict[str, float], notes: list[str]) -> None:
    gender = patient.gender
    if gender in ("female", "male"):
        features["sex"] = 0.0 if gender == "female" else 1.0
    else:
        notes.append(f"Sex not used: Patient.gender is {gender or 'not given'} "
                     "(the policy knows female and male only); imputed.")
    birth = patient.birthDate
    if birth is None:
        notes.append("No birth date: age band imputed.")
        return
    if isinstance(birth, date):
        earliest = latest = birth
    else:  # a partial date: the person was born somewhere in that year or month
        parts = [int(p) for p in str(birth).split("-")]
        if len(parts) == 1:
            earliest, latest = date(parts[0], 1, 1), date(parts[0], 12, 31)
        else:
            earliest = date(parts[0], parts[1], 1)
            latest = (date(parts[0] + parts[1] // 12, parts[1] % 12 + 1, 1) - timedelta(days=1))
    today = now.astimezone(UTC).date()
    ages = (_age(latest, today), _age(earliest, today))
    bands = {_age_band(age) for age in ages}
    if len(bands) > 1:
        notes.append("The birth date is given to the year or month only and the age band is not certain: imputed.")
        return
    band = bands.pop()
    if min(ages) < _AGE_BAND_STARTS[0]:
        notes.append("The patient is under 18; the policy was learned on adults: age band set to 18-29.")
    features["age_band"] = float(band)


def _age(birth: date, today: date) -> int:
    return today.year - birth.year - ((today.month, today.day) < (birth.month, birth.day))


def _age_band(age: int) -> int:
    return max(0, sum(age >= start for start in _AGE_BAND_STARTS) - 1)


# ----------------------------------------------------------------------------- scores


def _collect_observations(prefetch: Mapping[str, Any], patient_id: str | None) -> _Collected:
    """Every score in the observation prefetch, each Observation once even if two keys hold it."""
    collected = _Collected(measurements=[])
    seen: set[str] = set()
    for key in OBSERVATION_PREFETCH:
        data = prefetch.get(key)
        if data is None:
            continue
        bundle = _parse(key, data, Bundle)
        for obs in _bundle_resources(key, bundle, Observation, patient_id):
            if obs.id is not None:
                if obs.id in seen:
                    continue
                seen.add(obs.id)
            _read_observation(obs, collected)
    collected.measurements.sort(key=lambda m: m.when)
    return collected


def _read_observation(obs: Observation, collected: _Collected) -> None:
    if obs.status in _SKIPPED_STATUSES:
        collected.skipped_status += 1
        return
    entries: list[tuple[list[str], Any]] = [(_loinc_codes(obs.code), obs)]
    entries += [(_loinc_codes(c.code), c) for c in obs.component or []]
    wanted = [(codes, holder) for codes, holder in entries if {PHQ9_TOTAL, PHQ9_ITEM9, GAD7_TOTAL} & set(codes)]
    if not wanted:
        return
    when = (_instant(obs.effectiveDateTime) or _instant(obs.effectiveInstant)
            or (_instant(obs.effectivePeriod.end) or _instant(obs.effectivePeriod.start)
                if obs.effectivePeriod is not None else None)
            or _instant(obs.issued))
    if when is None:
        collected.without_time += 1
        return
    for codes, holder in wanted:
        value = _value(holder)
        if value is None:
            collected.without_value += 1
            continue
        for code in {PHQ9_TOTAL, PHQ9_ITEM9, GAD7_TOTAL} & set(codes):
            collected.measurements.append(Measurement(code, value, when[0], when[1]))


def _loinc_codes(concept: CodeableConcept | None) -> list[str]:
    if concept is None:
        return []
    return [c.code for c in concept.coding or [] if c.system == LOINC and c.code]


def _value(holder: Any) -> float | None:
    """The numeric value of an Observation or component: a Quantity, an integer or a coded item answer."""
    quantity = getattr(holder, "valueQuantity", None)
    if quantity is not None and quantity.value is not None:
        return float(Decimal(quantity.value))
    integer = getattr(holder, "valueInteger", None)
    if integer is not None:
        return float(integer)
    concept = getattr(holder, "valueCodeableConcept", None)
    if concept is not None:
        for coding in concept.coding or []:
            if coding.system == LOINC and coding.code in PHQ9_ITEM_ANSWERS:
                return PHQ9_ITEM_ANSWERS[coding.code]
    return None


def _score_features(collected: _Collected, now: datetime, features: dict[str, float], notes: list[str]) -> None:
    by_code: dict[str, list[Measurement]] = {PHQ9_TOTAL: [], PHQ9_ITEM9: [], GAD7_TOTAL: []}
    for m in collected.measurements:
        by_code[m.code].append(m)
    if collected.skipped_status:
        notes.append(f"{collected.skipped_status} Observation(s) marked entered-in-error or cancelled were ignored.")
    if collected.without_value:
        notes.append(f"{collected.without_value} score(s) without a numeric value were ignored.")
    if collected.without_time:
        notes.append(f"{collected.without_time} Observation(s) without an effective time were ignored.")
    if any(m.imprecise for m in collected.measurements):
        notes.append("Some scores are dated to the month or year only; their first day was used.")

    phq9 = by_code[PHQ9_TOTAL]
    if not phq9:
        notes.append(f"No PHQ-9 total (LOINC {PHQ9_TOTAL}) in the prefetch: PHQ-9 and its trend imputed.")
    else:
        latest, first = phq9[-1], phq9[0]
        _put(features, notes, "phq9", latest.value)
        _put(features, notes, "weeks_since_measurement", _weeks(now, latest.when))
        _put(features, notes, "phq9_at_intake", first.value)
        _put(features, notes, "weeks_in_care", _weeks(now, first.when))
        notes.append(f"PHQ-9 {_n(latest.value)} measured {_ago(now, latest.when)} (latest of {len(phq9)} totals, "
                     f"LOINC {PHQ9_TOTAL}); the earliest in the prefetch ({_n(first.value)}, {_ago(now, first.when)}) "
                     "is taken as intake and the start of care. The prefetch holds the latest 20 only.")
        earlier = [m for m in phq9 if latest.when - m.when >= CHANGE_MIN_GAP]
        if earlier:
            before = earlier[-1]
            _put(features, notes, "phq9_change_4w", latest.value - before.value)
            notes.append(f"PHQ-9 change {latest.value - before.value:+g} against the total "
                         f"{_weeks(latest.when, before.when):g} weeks earlier.")
        else:
            notes.append("No PHQ-9 total at least 3 weeks before the latest: the 4-week change is imputed.")
        _sustained_remission(phq9, now, features, notes)

    item9 = by_code[PHQ9_ITEM9]
    if item9:
        _put(features, notes, "phq9_item9", item9[-1].value)
        notes.append(f"PHQ-9 item 9 (self-harm) {_n(item9[-1].value)}, measured {_ago(now, item9[-1].when)}.")
    gad7 = by_code[GAD7_TOTAL]
    if gad7:
        _put(features, notes, "gad7", gad7[-1].value)
        notes.append(f"GAD-7 {_n(gad7[-1].value)}, measured {_ago(now, gad7[-1].when)}.")
    else:
        notes.append(f"No GAD-7 total (LOINC {GAD7_TOTAL}) in the prefetch: imputed.")


def _sustained_remission(phq9: Sequence[Measurement], now: datetime, features: dict[str, float],
                         notes: list[str]) -> None:
    """``weeks_well`` as the simulator's clinician reads it: weeks since the first PHQ-9
    below 5, a run ended only by a PHQ-9 of 10 or more. The prefetch holds the latest 20
    totals, so a run that began before them is counted from the earliest: too few weeks,
    the side on which the taper rule stays closed."""
    start: datetime | None = None
    for m in phq9:
        if m.value >= REMISSION_LOST:
            start = None
        elif m.value < REMISSION_BELOW and start is None:
            start = m.when
    weeks = max(_weeks(now, start), 0.0) if start is not None else 0.0
    _put(features, notes, "weeks_well", weeks)
    if start is not None:
        notes.append(f"In sustained remission for {weeks:g} weeks: PHQ-9 below {REMISSION_BELOW:g} since "
                     f"{_ago(now, start)}, never {REMISSION_LOST:g} or more after (counted within the prefetch).")


# ----------------------------------------------------------------------------- medications


def _medication_features(requests: Sequence[MedicationRequest], now: datetime, features: dict[str, float],
                         notes: list[str]) -> None:
    active = [r for r in requests if r.status == "active"]
    antidepressants = [r for r in active if _is_antidepressant(r)]
    unknown = len(active) - len(antidepressants)
    if not antidepressants:
        if unknown:
            notes.append(f"{unknown} active prescription(s) could not be recognised as antidepressants or not: "
                         "whether one is prescribed is not known (assumed none, which blocks the most medication "
                         "steps). Check the medication list.")
        else:
            _put(features, notes, "dose_level", 0.0)
            notes.append("No active antidepressant prescription: dose level 0.")
        return
    _put(features, notes, "dose_level", float(MAX_DOSE_LEVEL))
    notes.append(f"{len(antidepressants)} active antidepressant prescription(s). The dose level cannot be read "
                 f"reliably from a prescription, so it is set to the maximum ({MAX_DOSE_LEVEL}): 'raise the dose' "
                 "is therefore not suggested; judge it against the actual dose.")
    authored = [when for r in antidepressants if (when := _instant(r.authoredOn)) is not None]
    if not authored:
        notes.append("No prescription date (authoredOn): weeks on the dose and step imputed (too early to change).")
        return
    latest = max(authored, key=lambda w: w[0])[0]
    weeks = _weeks(now, latest)
    _put(features, notes, "weeks_on_dose", weeks)
    _put(features, notes, "weeks_on_step", weeks)
    notes.append(f"Weeks on the dose and on the step counted from the latest antidepressant prescription "
                 f"({_ago(now, latest)}).")


def _is_antidepressant(request: MedicationRequest) -> bool:
    concepts: list[CodeableConcept] = []
    if request.medicationCodeableConcept is not None:
        concepts.append(request.medicationCodeableConcept)
    reference = request.medicationReference.reference if request.medicationReference is not None else None
    if reference and reference.startswith("#"):
        for contained in request.contained or []:
            if isinstance(contained, Medication) and contained.id == reference[1:] and contained.code is not None:
                concepts.append(contained.code)
    return any(_names_antidepressant(concept) for concept in concepts)


def _names_antidepressant(concept: CodeableConcept) -> bool:
    if any(c.system == ATC and (c.code or "").upper().startswith(ATC_ANTIDEPRESSANTS) for c in concept.coding or []):
        return True
    texts: Iterable[str | None] = [concept.text, *(c.display for c in concept.coding or [])]
    words = {w for text in texts if text for w in re.findall(r"[a-z]+", text.lower())}
    return bool(words & ANTIDEPRESSANT_NAMES)


# ----------------------------------------------------------------------------- helpers


def _put(features: dict[str, float], notes: list[str], name: str, value: float) -> None:
    """Set a feature, clipped into ``envs.spec.FEATURE_BOUNDS`` (with a note when clipped)."""
    if not math.isfinite(value):
        notes.append(f"{name} is not a finite number in the record: imputed.")
        return
    low, high = FEATURE_BOUNDS[name]
    clipped = min(max(value, low), high)
    if clipped != value:
        notes.append(f"{name} {value:g} is outside [{low:g}, {high:g}]: clipped to {clipped:g}.")
    features[name] = float(clipped)


def _n(value: float) -> str:
    return f"{value:g}"


def _ago(now: datetime, when: datetime) -> str:
    weeks = _weeks(now, when)
    if weeks < 0:
        return "in the future (check the date)"
    return "this week" if weeks == 0 else f"{weeks:g} week{'s' if weeks != 1 else ''} ago"


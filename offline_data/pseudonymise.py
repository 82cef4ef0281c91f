"""Pseudonymisation of imported logs: keyed ids, no direct identifiers, no dates.

- Patient ids become ``HMAC-SHA256(key, id)`` in hex: deterministic for a
  key (the same patient links across imports), unlinkable without it. The
  key comes from a key file or ``CAREPATH_PSEUDONYM_KEY`` and is never
  written anywhere by carepath; keep it away from the data.
- Direct identifiers (:data:`DIRECT_IDENTIFIERS`, matched on normalised
  column names) are dropped, as is any column the schema does not know.
- Calendar dates become whole weeks since the patient's first date, then the
  date columns are dropped.
- A k-anonymity report counts patients per combination of quasi-identifiers
  and warns about groups smaller than k.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from envs.spec import SUBGROUP_FEATURES

KEY_ENV_VAR: Final = "CAREPATH_PSEUDONYM_KEY"
#: Shorter keys make the pseudonyms guessable by brute force over likely ids.
MIN_KEY_BYTES: Final = 16

#: Column names (normalised: lower case, runs of non-alphanumerics as "_") that
#: directly identify a person. They are dropped on import, whatever else happens.
DIRECT_IDENTIFIERS: Final[frozenset[str]] = frozenset({
    # names
    "name", "names", "full_name", "fullname", "first_name", "firstname", "given_name", "last_name", "lastname",
    "surname", "family_name", "middle_name", "patient_name", "maiden_name",
    # contact and address
    "address", "street", "street_address", "address_line_1", "address_line_2", "home_address", "city", "town",
    "postcode", "post_code", "zip", "zipcode", "zip_code", "phone", "phone_number", "telephone", "tel", "mobile",
    "mobile_number", "cell", "fax", "email", "e_mail", "email_address",
    # record numbers
    "mrn", "medical_record_number", "record_number", "hospital_number", "chart_number", "account_number",
    "insurance_number", "member_id", "health_plan_id",
    # birth
    "dob", "date_of_birth", "birth_date", "birthdate", "birthday",
    # national numbers
    "ssn", "social_security_number", "nhs_number", "nhs_no", "nhsnumber", "national_id", "national_insurance_number",
    "nino", "passport_number", "driver_license", "drivers_license",
    # network
    "ip_address", "ip", "device_id", "url",
})

#: Quasi-identifiers that are not observation features but may be kept as
#: subgroup columns (fairness reports need them); the subgroup features of
#: envs.spec are quasi-identifiers too.
EXTRA_QUASI_IDENTIFIERS: Final[tuple[str, ...]] = (
    "gender", "ethnicity", "race", "region", "language", "marital_status", "religion", "occupation",
)

#: Date columns that may give the week (first present wins): ``date`` or
#: names like ``visit_date``.
PREFERRED_DATE_COLUMNS: Final[tuple[str, ...]] = (
    "date", "visit_date", "encounter_date", "assessment_date", "appointment_date", "week_start", "week_date",
)


def normalise_name(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", name.strip().lower()).strip("_")


def is_direct_identifier(name: str) -> bool:
    return normalise_name(name) in DIRECT_IDENTIFIERS


def is_date_column(name: str) -> bool:
    """``date``, ``*_date``, ``date_*``, ``*_dt`` (birth dates are identifiers and go first)."""
    norm = normalise_name(name)
    if norm in DIRECT_IDENTIFIERS:
        return False
    return norm == "date" or norm.endswith(("_date", "_dt")) or norm.startswith("date_") or norm in (
        PREFERRED_DATE_COLUMNS)


def quasi_identifiers(columns: Sequence[str]) -> list[str]:
    """The quasi-identifier columns among ``columns`` (subgroup features, then extras)."""
    present = set(columns)
    extras = [c for c in columns if normalise_name(c) in EXTRA_QUASI_IDENTIFIERS]
    return [c for c in SUBGROUP_FEATURES if c in present] + extras


def weeks_since_first_date(patient_code: NDArray[np.int64], days: NDArray[np.datetime64]) -> NDArray[np.float64]:
    """Whole weeks since each patient's earliest date (the intake week is 0)."""
    day_number = days.astype("datetime64[D]").astype(np.int64)
    first = np.full(int(patient_code.max()) + 1, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, patient_code, day_number)
    return ((day_number - first[patient_code]) // 7).astype(np.float64)


# ----------------------------------------------------------------------------- the key


def load_key(key_file: str | Path | None, environ: Mapping[str, str] | None = None) -> bytes:
    """The pseudonymisation key, from ``key_file`` or the environment; refuse without one."""
    environ = os.environ if environ is None else environ
    if key_file is not None:
        path = Path(key_file)
        try:
            key = path.read_bytes().strip()
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: key file not found") from None
        source = f"key file {path}"
    elif environ.get(KEY_ENV_VAR):
        key = environ[KEY_ENV_VAR].strip().encode()
        source = f"environment variable {KEY_ENV_VAR}"
    else:
        raise ValueError(
            f"no pseudonymisation key: pass --key-file KEY or set {KEY_ENV_VAR}. The key turns patient ids into "
            "keyed hashes; keep it secret and apart from the data (e.g. `python -c \"import secrets; "
            "print(secrets.token_hex(32))\" > ~/.carepath/pseudonym.key`)")
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"the pseudonymisation key from {source} is {len(key)} bytes; expected at least "
                         f"{MIN_KEY_BYTES} (e.g. 64 hex digits from `secrets.token_hex(32)`)")
    return key


def pseudonym(key: bytes, raw_id: str) -> str:
    """``HMAC-SHA256(key, id)`` as 64 hex digits."""
    return hmac.new(key, raw_id.encode("utf-8"), hashlib.sha256).hexdigest()


def pseudonymise_ids(key: bytes, raw_ids: NDArray[np.object_]) -> NDArray[np.object_]:
    """One pseudonym per distinct raw id (called once per patient, not per row)."""
    return np.array([pseudonym(key, str(raw)) for raw in raw_ids], dtype=object)


def key_fingerprint(key: bytes) -> str:
    """A short keyed fingerprint, so two files can be checked for the same key
    without revealing it (as safe as any pseudonym)."""
    return pseudonym(key, "carepath key fingerprint")[:16]


# ----------------------------------------------------------------------------- k-anonymity


@dataclass(frozen=True)
class KAnonymityReport:
    """Patients per combination of quasi-identifier values."""

    k: int
    quasi_identifiers: list[str]
    groups: int
    smallest_group: int
    groups_below_k: int
    patients_in_groups_below_k: int
    patients: int
    small_groups: list[dict[str, Any]]  # up to 10: the values and the count

    @property
    def ok(self) -> bool:
        return self.groups_below_k == 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        names = ", ".join(self.quasi_identifiers) or "(none)"
        if not self.quasi_identifiers:
            return f"k-anonymity: no quasi-identifier columns; {self.patients} patients in one group"
        head = (f"k-anonymity over {names}: {self.groups} groups, smallest {self.smallest_group} patient"
                f"{'s' if self.smallest_group != 1 else ''}")
        if self.ok:
            return head + f"; every group has at least k={self.k}"
        shown = "; ".join(", ".join(f"{k}={v}" for k, v in g["values"].items()) + f": {g['patients']}"
                          for g in self.small_groups)
        return (f"WARNING: {head}; {self.groups_below_k} group(s) smaller than k={self.k} hold "
                f"{self.patients_in_groups_below_k} patient(s) who may be re-identifiable ({shown}). "
                "Consider coarser categories or dropping these patients before sharing.")


def k_anonymity(patient_code: NDArray[np.int64], columns: Mapping[str, NDArray[Any]], k: int) -> KAnonymityReport:
    """Group patients by their quasi-identifier values (each patient's first row)."""
    if k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    names = list(columns)
    _, first = np.unique(patient_code, return_index=True)
    patients = len(first)
    if not names:
        return KAnonymityReport(k, [], 1, patients, int(patients < k), patients if patients < k else 0, patients,
                                [])
    codes = []
    labels = []
    for name in names:
        values = np.asarray(columns[name])[first].astype(str)
        uniq, inverse = np.unique(values, return_inverse=True)
        codes.append(inverse)
        labels.append(uniq)
    combos, inverse, counts = np.unique(np.stack(codes, axis=1), axis=0, return_inverse=True, return_counts=True)
    small = np.flatnonzero(counts < k)
    small_sorted = small[np.argsort(counts[small], kind="stable")][:10]
    return KAnonymityReport(
        k=k,
        quasi_identifiers=names,
        groups=len(combos),
        smallest_group=int(counts.min()),
        groups_below_k=len(small),
        patients_in_groups_below_k=int(counts[small].sum()),
        patients=patients,
        small_groups=[{"values": {name: plain_value(labels[j][combos[g, j]]) for j, name in enumerate(names)},
                       "patients": int(counts[g])} for g in small_sorted],
    )


def plain_value(value: str) -> str:
    """Feature codes read back as "1.0" print as "1"."""
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:g}"

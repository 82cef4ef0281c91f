"""Import of real-world care logs: validate, pseudonymise, estimate, write.

``import_log`` reads a raw CSV or Parquet log, checks every row (nothing is
written when any row is bad), then

1. drops direct identifiers and every column the schema does not know
   (recognised quasi-identifiers such as ``ethnicity`` are kept as subgroup
   columns, text only);
2. turns a calendar date column into weeks since each patient's first date
   when the log has no ``t``, and drops all date columns;
3. replaces patient ids by ``HMAC-SHA256(key, id)`` and sorts rows by the
   pseudonym (the raw order could hint at record numbers);
4. reports k-anonymity over the quasi-identifiers;
5. estimates ``behavior_prob`` when the log lacks it;

and writes a clean Parquet file atomically, with provenance (never the key)
in its metadata.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from envs.spec import FEATURE_NAMES
from offline_data.behavior import CalibrationReport, estimate_behavior_probs
from offline_data.io import PARQUET_SUFFIXES, file_format, read_log_file, write_table
from offline_data.pseudonymise import (
    EXTRA_QUASI_IDENTIFIERS,
    PREFERRED_DATE_COLUMNS,
    KAnonymityReport,
    is_date_column,
    is_direct_identifier,
    k_anonymity,
    key_fingerprint,
    normalise_name,
    pseudonymise_ids,
    quasi_identifiers,
)
from offline_data.schema import (
    COLUMN_BY_NAME,
    META_BEHAVIOR_MODEL,
    META_IMPORT,
    META_K_ANONYMITY,
    base_metadata,
)
from offline_data.validate import validate_table


@dataclass(frozen=True)
class ColumnPlan:
    """What happens to each raw column."""

    schema: list[str]
    identifiers: list[str]
    dates: list[str]
    subgroups: list[str]
    unknown: list[str]
    id_column: str
    date_column: str | None


@dataclass(frozen=True)
class ImportResult:
    out: Path
    rows: int
    patients: int
    episodes: int
    plan: ColumnPlan
    k_anonymity: KAnonymityReport
    calibration: CalibrationReport | None
    metadata: dict[str, Any]

    @property
    def behavior_prob_estimated(self) -> bool:
        return self.calibration is not None


def plan_columns(columns: list[str], *, id_column: str | None = None, date_column: str | None = None) -> ColumnPlan:
    """Sort raw columns into kept, dropped and converted ones."""
    if id_column is not None and id_column not in columns:
        raise ValueError(f"no patient id column {id_column!r}; the columns are {', '.join(columns)}")
    id_column = id_column or "patient_id"  # when missing, validation reports it with the other problems
    schema, identifiers, dates, subgroups, unknown = [], [], [], [], []
    for name in columns:
        if name == id_column:
            continue
        if name in COLUMN_BY_NAME:
            schema.append(name)
        elif is_direct_identifier(name):
            identifiers.append(name)
        elif is_date_column(name):
            dates.append(name)
        elif normalise_name(name) in EXTRA_QUASI_IDENTIFIERS:
            subgroups.append(name)
        else:
            unknown.append(name)
    if id_column != "patient_id" and "patient_id" in schema:
        raise ValueError(f"both {id_column!r} and patient_id are present; keep one as the patient id")
    chosen: str | None = None
    if "t" not in schema:
        if date_column is not None:
            if date_column not in columns:
                raise ValueError(f"no date column {date_column!r}; the columns are {', '.join(columns)}")
            chosen = date_column
        elif dates:
            preferred = [d for d in dates if normalise_name(d) in PREFERRED_DATE_COLUMNS]
            if len(dates) == 1 or preferred:
                chosen = min(preferred, key=lambda d: PREFERRED_DATE_COLUMNS.index(normalise_name(d))) if (
                    preferred) else dates[0]
            else:
                raise ValueError(f"no t column and several date columns ({', '.join(dates)}); choose the one that "
                                 "gives the week with --date-column")
    if chosen is not None and chosen not in dates:  # named with --date-column
        for group in (identifiers, subgroups, unknown):
            if chosen in group:
                group.remove(chosen)
        dates.append(chosen)
    return ColumnPlan(schema, identifiers, dates, subgroups, unknown, id_column, chosen)


def check_key_location(key_file: str | Path | None, out: Path) -> None:
    """The key must not sit in the folder the data goes to."""
    if key_file is not None and Path(key_file).resolve().parent == Path(out).resolve().parent:
        raise ValueError(f"the key file {key_file} is in the output folder {Path(out).parent}; keep the "
                         "pseudonymisation key apart from the data")


def import_log(
    raw: str | Path,
    out: str | Path,
    *,
    key: bytes,
    k: int = 5,
    id_column: str | None = None,
    date_column: str | None = None,
    estimate_seed: int = 0,
    warn: Callable[[str], None] | None = None,
    report: Callable[[str], None] | None = None,
) -> ImportResult:
    """Validate, pseudonymise and write ``raw`` to ``out`` (Parquet); see the module doc."""
    raw, out = Path(raw), Path(out)
    warn = warn if warn is not None else (lambda text: print(text, file=sys.stderr))
    report = report if report is not None else print
    if out.suffix.lower() not in PARQUET_SUFFIXES:
        raise ValueError(f"{out}: expected a .parquet output (CSV cannot carry the provenance metadata)")
    if out.exists() and raw.exists() and out.resolve() == raw.resolve():
        raise ValueError(f"{out}: the output would overwrite the raw log")
    if k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")

    table, _ = read_log_file(raw)
    plan = plan_columns(table.column_names, id_column=id_column, date_column=date_column)
    keep = [*([plan.id_column] if plan.id_column in table.column_names else []), *plan.schema,
            *([plan.date_column] if plan.date_column else []), *plan.subgroups]
    table = table.select(keep)
    if plan.id_column != "patient_id":
        table = table.rename_columns(["patient_id" if name == plan.id_column else name for name in keep])
    frame = validate_table(table, str(raw), raw=True, date_column=plan.date_column, keep_columns=plan.subgroups)

    # pseudonyms replace raw ids; rows are re-sorted by pseudonym
    frame = frame.with_patient_ids(pseudonymise_ids(key, frame.patient_ids)).sorted(by_id=True)
    used = np.unique(frame.patient_code)
    episodes = len(frame.episode_starts()) - 1

    qi_names = quasi_identifiers([*FEATURE_NAMES, *plan.subgroups])
    qi_columns = {name: frame.obs[:, FEATURE_NAMES.index(name)] if name in FEATURE_NAMES else frame.extra[name]
                  for name in qi_names}
    anonymity = k_anonymity(frame.patient_code, qi_columns, k)
    (report if anonymity.ok else warn)(anonymity.summary())

    calibration: CalibrationReport | None = None
    if frame.behavior_prob is None:
        _, chosen, calibration = estimate_behavior_probs(frame.obs, frame.allowed, frame.action, seed=estimate_seed)
        frame = replace(frame, behavior_prob=chosen)
        report(calibration.table())

    metadata = base_metadata(source="import", behavior_policy={"name": "logged", "epsilon": None}, seed=None,
                             behavior_prob_estimated=calibration is not None)
    metadata[META_IMPORT] = {
        "source_sha256": _sha256(raw),
        "source_format": file_format(raw),
        "rows": len(frame),
        "patients": len(used),
        "episodes": episodes,
        "id_column": plan.id_column,
        "dropped_identifier_columns": plan.identifiers,
        "dropped_date_columns": plan.dates,
        "dropped_unknown_columns": plan.unknown,
        "t_from_date_column": plan.date_column,
        "kept_subgroup_columns": plan.subgroups,
        "pseudonymisation": {"method": "HMAC-SHA256(key, patient id), hex", "key_fingerprint": key_fingerprint(key)},
    }
    metadata[META_K_ANONYMITY] = anonymity.as_dict()
    if calibration is not None:
        metadata[META_BEHAVIOR_MODEL] = {"model": "masked multinomial logistic regression", "seed": estimate_seed,
                                         **calibration.as_dict()}
    write_table(out, frame.to_arrow(metadata))
    return ImportResult(out, len(frame), len(used), episodes, plan, anonymity, calibration, metadata)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

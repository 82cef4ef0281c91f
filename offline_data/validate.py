"""Row-by-row validation of a log, done column-wise (numpy, no Python loop per row).

:func:`validate_table` types every column of a table read by
:mod:`offline_data.io` (with :mod:`offline_data.parse`), checks every row against :mod:`offline_data.schema`
(required columns, types, ranges, weeks increasing within an episode,
actions allowed) and returns a :class:`~offline_data.frame.LogFrame`, or
raises :class:`ValidationError` listing the first problems by file, data
row (1-based, the header is not a row), column and what was expected, with a
count of the rest.

Each check computes a boolean array over all rows; only the few rows that are
reported are looked at one by one, to quote the bad value. A million rows
validate in a few seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray

from envs.rules import action_mask, blocking_rules
from envs.spec import ACTION_NAMES, FEATURE_NAMES, MASK_PREFIX, MASKABLE_FEATURES, N_ACTIONS
from offline_data.frame import LogFrame, distinct_pairs
from offline_data.parse import (
    Parsed,
    index_in,
    parse_bool,
    parse_dates,
    parse_number,
    parse_text,
    quote,
    stack_columns,
    text_of,
)
from offline_data.pseudonymise import weeks_since_first_date
from offline_data.schema import (
    COLUMN_BY_NAME,
    COLUMNS,
    IMPORT_REQUIRED_COLUMNS,
    REQUIRED_COLUMNS,
    Column,
    Kind,
    bits_to_mask,
)

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]
IntArray = NDArray[np.int64]

#: Problems listed in full; the rest are counted.
DEFAULT_LIMIT = 20
_COLUMN_ORDER = {c.name: i for i, c in enumerate(COLUMNS)}


@dataclass(frozen=True)
class Problem:
    """One thing wrong: where (data row, 1-based, and column) and what was expected."""

    row: int | None
    column: str | None
    message: str

    def __str__(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column is not None:
            where.append(f"column {self.column}")
        return f"{', '.join(where)}: {self.message}" if where else self.message


class ValidationError(ValueError):
    """Bad rows or columns; ``str()`` lists the first problems and counts the rest."""

    def __init__(self, where: str, problems: Sequence[Problem], total: int) -> None:
        self.where = where
        self.problems = list(problems)
        self.total = total
        super().__init__(self.render())

    def render(self) -> str:
        shown = len(self.problems)
        head = f"{self.where}: {self.total} problem{'s' if self.total != 1 else ''}"
        lines = [head + (f"; the first {shown}:" if self.total > shown else ":")]
        lines += [f"  {p}" for p in self.problems]
        if self.total > shown:
            lines.append(f"  ... and {self.total - shown} more")
        return "\n".join(lines)


class Problems:
    """Collects problems; per check only the first ``limit`` rows are kept."""

    def __init__(self, where: str, limit: int = DEFAULT_LIMIT) -> None:
        self.where = where
        self.limit = limit
        self.found: list[Problem] = []
        self.total = 0

    def add(self, column: str | None, message: str, row: int | None = None) -> None:
        self.total += 1
        self.found.append(Problem(row, column, message))

    def add_rows(self, bad: BoolArray, column: str | None, message: Callable[[int], str]) -> None:
        """Rows where ``bad`` is true; ``message(i)`` describes row index ``i``."""
        index = np.flatnonzero(bad)
        self.total += len(index)
        for i in index[: self.limit]:
            self.found.append(Problem(int(i) + 1, column, message(int(i))))

    def __bool__(self) -> bool:
        return self.total > 0

    def error(self) -> ValidationError:
        ordered = sorted(self.found, key=lambda p: (p.row is not None, p.row or 0,
                                                    _COLUMN_ORDER.get(p.column or "", len(_COLUMN_ORDER))))
        return ValidationError(self.where, ordered[: self.limit], self.total)

    def raise_if_any(self) -> None:
        if self:
            raise self.error()


# ----------------------------------------------------------------------------- the checks


def validate_table(
    table: pa.Table,
    where: str,
    *,
    raw: bool = False,
    date_column: str | None = None,
    keep_columns: Sequence[str] = (),
    limit: int = DEFAULT_LIMIT,
) -> LogFrame:
    """Check every row of ``table`` and return it typed, or raise :class:`ValidationError`.

    ``raw=False`` (a clean file): every required column must be there.
    ``raw=True`` (a log being imported): columns with a ``derived`` rule in the
    schema may be missing and are derived; missing values of a maskable
    feature are allowed in weeks its ``mask_`` column is 0 and are carried
    forward from the episode's last value (0 before the first), as the
    simulator does; ``t`` may come from ``date_column``. ``keep_columns`` are
    extra text columns kept as they are (subgroups). Rows come back grouped by
    episode (patients in order of first appearance), weeks increasing.
    """
    problems = Problems(where, limit)
    n = table.num_rows
    present = set(table.column_names)
    if n == 0:
        problems.add(None, "no data rows; expected at least one")
        problems.raise_if_any()

    required = set(IMPORT_REQUIRED_COLUMNS if raw else REQUIRED_COLUMNS)
    if raw and date_column is not None:
        required.discard("t")
    if raw and "action" not in present and "action_name" in present:
        required.discard("action")
    lower = {name.lower(): name for name in present}
    for name in [c.name for c in COLUMNS if c.name in required and c.name not in present]:
        hint = f" (found {lower[name.lower()]!r}: column names are case-sensitive)" if name.lower() in lower else ""
        if name == "t" and raw:
            hint += "; or give a calendar date column to derive it from"
        problems.add(name, f"missing column; expected {COLUMN_BY_NAME[name].description}{hint}")

    # ---- type every present schema column
    numbers: dict[str, Parsed] = {}
    for column in COLUMNS:
        if column.name not in present or column.kind == Kind.STRING:
            continue
        col = table.column(column.name)
        parsed = parse_bool(col) if column.kind == Kind.BOOL else parse_number(col)
        numbers[column.name] = parsed
        _type_problems(problems, column, col, parsed)

    patient_ids: NDArray[np.object_] = np.empty(0, dtype=object)
    patient_code = np.zeros(n, dtype=np.int64)
    if "patient_id" in present:
        patient_ids, patient_code, empty = parse_text(table.column("patient_id"))
        problems.add_rows(empty, "patient_id", lambda i: "missing value; expected a patient id")

    action_from_name: IntArray | None = None
    if "action_name" in present:
        col = table.column("action_name")
        action_from_name = index_in(col, ACTION_NAMES)
        problems.add_rows(action_from_name < 0, "action_name",
                          lambda i: f"expected one of {', '.join(ACTION_NAMES)}, got {quote(col, i)}")

    # ---- t, from a date column when needed
    if "t" not in present and raw and date_column is not None:
        if date_column not in present:
            problems.add(date_column, "missing date column")
        else:
            days, null, bad = parse_dates(table.column(date_column))
            col = table.column(date_column)
            problems.add_rows(null, date_column, lambda i: "missing value; expected a calendar date (YYYY-MM-DD)")
            problems.add_rows(bad, date_column,
                              lambda i: f"expected a calendar date (YYYY-MM-DD), got {quote(col, i)}")
            usable = ~null & ~bad & (patient_code >= 0)
            weeks = np.full(n, np.nan)
            if usable.any():
                weeks[usable] = weeks_since_first_date(patient_code[usable], days[usable])
            numbers["t"] = Parsed(weeks, null, bad)

    # ---- derive what a raw log may lack
    if "episode_id" not in numbers:
        numbers["episode_id"] = _constant(n, 0.0)
    if "action" not in numbers and action_from_name is not None:
        values = np.where(action_from_name >= 0, action_from_name, np.nan).astype(np.float64)
        numbers["action"] = Parsed(values, np.zeros(n, dtype=bool), action_from_name < 0)
    elif "action" in numbers and action_from_name is not None:
        given = numbers["action"]
        named = action_from_name
        in_space = ~given.null & ~given.bad & (given.values >= 0) & (given.values < N_ACTIONS)
        mismatch = (named >= 0) & in_space & (given.values != named)
        problems.add_rows(mismatch, "action_name", lambda i: (
            f"expected {ACTION_NAMES[int(given.values[i])]!r} (the name of action {int(given.values[i])}), "
            f"got {ACTION_NAMES[named[i]]!r}"))

    # ---- nulls and ranges
    mask_values: dict[str, Parsed] = {}
    for name in MASKABLE_FEATURES:
        if MASK_PREFIX + name in numbers:
            mask_values[name] = numbers[MASK_PREFIX + name]
    for column in COLUMNS:
        if column.name not in numbers or column.kind == Kind.STRING:
            continue
        parsed = numbers[column.name]
        missing = parsed.null.copy()
        if raw and column.name in mask_values:
            # not observed this week (mask 0): carried forward below; observed (mask 1): must have a value
            mask = mask_values[column.name]
            observed = ~mask.null & (mask.values == 1)
            flag = MASK_PREFIX + column.name
            problems.add_rows(missing & observed, column.name, _fixed(
                f"missing value while {flag} is 1 (observed this week); expected a number, or {flag} 0"))
            missing &= ~observed & ~(~mask.null & (mask.values == 0))
        if column.name == "t" and "t" not in present:
            missing[:] = False  # reported on the date column
        problems.add_rows(missing, column.name, _fixed(f"missing value; expected {column.expected()}"))
        _range_problems(problems, column, table, parsed, date_column)

    problems.raise_if_any()

    # ---- everything is typed and in range: cross-row and cross-column checks
    t = numbers["t"].values.astype(np.int64)
    episode_id = numbers["episode_id"].values.astype(np.int64)
    action = numbers["action"].values.astype(np.int64)
    obs = stack_columns([numbers[name].values for name in FEATURE_NAMES])
    order = group_order(patient_code, episode_id)  # stable: file order within an episode
    starts = _episode_starts(patient_code[order], episode_id[order])
    first_row = np.zeros(n, dtype=bool)
    first_row[starts[:-1]] = True
    last_row = np.zeros(n, dtype=bool)
    last_row[starts[1:] - 1] = True

    _week_order_problems(problems, t, order, first_row, "t" if "t" in present else date_column or "t")
    if raw:
        _carry_forward(obs, numbers, order, first_row)

    terminated = _flag(numbers, "terminated", n, default=np.zeros(n, dtype=bool))
    truncated = _flag(numbers, "truncated", n, default=_unsort(last_row, order) & ~terminated)
    both = terminated & truncated
    problems.add_rows(both, "truncated", lambda i: "terminated and truncated are both true; expected at most one "
                      "(a patient who left care was not cut off by the horizon)")
    early_end = _unsort(~last_row, order) & (terminated | truncated)
    problems.add_rows(early_end, "terminated" if "terminated" in present else "truncated", lambda i: (
        "the episode ends here (terminated or truncated) but has later weeks; expected the flag only on an "
        "episode's last week"))

    if "allowed_actions" in numbers:
        allowed = bits_to_mask(numbers["allowed_actions"].values.astype(np.int64))
        blocked = ~allowed[np.arange(n), action]
        problems.add_rows(blocked, "action", lambda i: (
            f"action {action[i]} ({ACTION_NAMES[action[i]]}) is not allowed by allowed_actions="
            f"{int(numbers['allowed_actions'].values[i])} (allowed: "
            f"{', '.join(ACTION_NAMES[a] for a in np.flatnonzero(allowed[i]))})"))
    else:
        allowed = action_mask(obs)
        blocked = ~allowed[np.arange(n), action]
        problems.add_rows(blocked, "action", lambda i: (
            f"action {action[i]} ({ACTION_NAMES[action[i]]}) is not allowed by the clinical rules this week: "
            + "; ".join(rule.description for rule in blocking_rules(obs[i])[ACTION_NAMES[action[i]]])))
    problems.raise_if_any()

    behavior_prob = numbers["behavior_prob"].values.astype(np.float64) if "behavior_prob" in numbers else None
    true_phq9 = numbers["true_phq9"].values.astype(np.float32) if "true_phq9" in numbers else None
    extra = {name: text_of(table.column(name)).to_numpy(zero_copy_only=False).astype(object)
             for name in keep_columns if name in present}
    frame = LogFrame(
        patient_ids=patient_ids,
        patient_code=patient_code,
        episode_id=episode_id,
        t=t,
        obs=obs,
        action=action,
        behavior_prob=behavior_prob,
        allowed=allowed,
        reward=numbers["reward"].values.astype(np.float32),
        terminated=terminated,
        truncated=truncated,
        true_phq9=true_phq9,
        extra=extra,
    )
    # weeks increase within each episode (checked above): grouping them is all that is left
    return frame if _is_identity(order) else frame.take(order)


def _is_identity(order: IntArray) -> bool:
    return bool(np.array_equal(order, np.arange(len(order))))


def _fixed(message: str) -> Callable[[int], str]:
    """The same message for every bad row."""
    return lambda i: message


def _constant(n: int, value: float) -> Parsed:
    return Parsed(np.full(n, value), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool))


def _flag(numbers: dict[str, Parsed], name: str, n: int, default: BoolArray) -> BoolArray:
    return numbers[name].values == 1.0 if name in numbers else default


def _unsort(values_in_order: BoolArray, order: IntArray) -> BoolArray:
    out = np.empty_like(values_in_order)
    out[order] = values_in_order
    return out


def group_order(patient_code: IntArray, episode_id: IntArray) -> IntArray:
    """A stable order that makes each (patient, episode) contiguous: the identity when
    the rows already are (the usual case, checked without sorting every row)."""
    starts = _episode_starts(patient_code, episode_id)[:-1]
    if distinct_pairs(patient_code[starts], episode_id[starts]) == len(starts):
        return np.arange(len(patient_code), dtype=np.int64)
    return np.lexsort((episode_id, patient_code)).astype(np.int64)


def _episode_starts(patient_code: IntArray, episode_id: IntArray) -> IntArray:
    n = len(patient_code)
    change = np.ones(n, dtype=bool)
    change[1:] = (patient_code[1:] != patient_code[:-1]) | (episode_id[1:] != episode_id[:-1])
    return np.append(np.flatnonzero(change), n).astype(np.int64)


def _type_problems(problems: Problems, column: Column, col: pa.ChunkedArray, parsed: Parsed) -> None:
    if column.kind == Kind.INT:
        fraction = ~parsed.bad & ~parsed.null & np.isfinite(parsed.values) & (
            parsed.values != np.round(parsed.values))
        parsed.bad |= fraction
    problems.add_rows(parsed.bad, column.name, lambda i: f"expected {column.expected()}, got {quote(col, i)}")


def _range_problems(problems: Problems, column: Column, table: pa.Table, parsed: Parsed,
                    date_column: str | None) -> None:
    v = parsed.values
    ok = ~parsed.null & ~parsed.bad
    out = ok & ~np.isfinite(v)
    if column.low is not None:
        out |= ok & ((v <= column.low) if column.low_open else (v < column.low))
    if column.high is not None:
        out |= ok & (v > column.high)
    if column.name in table.column_names:
        col = table.column(column.name)
        problems.add_rows(out, column.name, lambda i: f"expected {column.expected()}, got {quote(col, i)}")
    else:  # derived (t from dates): say so
        problems.add_rows(out, date_column, lambda i: f"gives week {v[i]:g}; expected {column.expected()}")


def _week_order_problems(problems: Problems, t: IntArray, order: IntArray, first_row: BoolArray,
                         column: str) -> None:
    """Within an episode, in file order, each week must come after the one before."""
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    t_sorted = t[order]
    previous = np.empty_like(t_sorted)
    previous[1:] = t_sorted[:-1]
    previous[0] = -1
    duplicate = _unsort(~first_row & (t_sorted == previous), order)
    backwards = _unsort(~first_row & (t_sorted < previous), order)

    def before(i: int) -> int:  # the row index of the same episode's previous row
        return int(order[position[i] - 1])

    problems.add_rows(duplicate, column, lambda i: (
        f"duplicate week {t[i]} of this episode (also in row {before(i) + 1}); expected one row per week"))
    problems.add_rows(backwards, column, lambda i: (
        f"week {t[i]} comes after week {t[before(i)]} of this episode (row {before(i) + 1}); expected weeks "
        "strictly increasing within an episode"))


def _carry_forward(obs: NDArray[np.float32], numbers: dict[str, Parsed], order: IntArray,
                   first_row: BoolArray) -> None:
    """Missing values of maskable features (mask 0) take the episode's last value, 0 before any."""
    n = len(order)
    positions = np.arange(n)
    episode_start = np.maximum.accumulate(np.where(first_row, positions, 0))
    for name in MASKABLE_FEATURES:
        parsed = numbers[name]
        missing = parsed.null[order]
        if not missing.any():
            continue
        j = FEATURE_NAMES.index(name)
        values = obs[order, j]
        last = np.maximum.accumulate(np.where(~missing, positions, -1))
        carried = np.where(last >= episode_start, values[np.maximum(last, 0)], 0.0)
        obs[order, j] = np.where(missing, carried, values)

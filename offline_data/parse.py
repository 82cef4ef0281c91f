"""Text and Arrow columns as typed numpy arrays, marking what does not parse.

Each parser returns the values together with which rows were empty and which
held something that is not a value of the column's kind, so the validator
can name those rows. CSV columns arrive as text (see :mod:`offline_data.io`);
Parquet columns arrive typed, and dictionary-encoded text (ids, action names)
is decoded once per dictionary entry, not once per row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]
IntArray = NDArray[np.int64]

_TRUE = ("true", "t", "yes", "y", "1", "1.0")
_FALSE = ("false", "f", "no", "n", "0", "0.0")


@dataclass
class Parsed:
    """A column as numbers: ``values`` (float32 or float64; NaN where null or bad),
    ``null``, ``bad`` (not a value of its kind)."""

    values: NDArray[np.floating]
    null: BoolArray
    bad: BoolArray


def text_of(col: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return pc.utf8_trim_whitespace(col)
    return col.cast(pa.string())


def quote(col: pa.ChunkedArray, i: int) -> str:
    value = col[i].as_py()
    return "an empty value" if value is None else repr(value) if isinstance(value, str) else str(value)


def parse_number(col: pa.ChunkedArray) -> Parsed:
    """Any numeric, boolean or text column as float64; text that is not a number is ``bad``."""
    n = len(col)
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    kind = col.type
    if pa.types.is_null(kind):
        return Parsed(np.full(n, np.nan), np.ones(n, dtype=bool), np.zeros(n, dtype=bool))
    null = col.is_null().to_numpy(zero_copy_only=False)
    if (pa.types.is_float32(kind) or pa.types.is_float64(kind)) and col.null_count == 0:
        # as stored (float32 features stay float32: no copy, and exact)
        return Parsed(np.asarray(col.to_numpy()), null, np.zeros(n, dtype=bool))
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind) or pa.types.is_decimal(
            kind):
        return Parsed(_float64(col.cast(pa.float64())), null, np.zeros(n, dtype=bool))
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        text = pc.utf8_trim_whitespace(col)
        try:
            return Parsed(_float64(text.cast(pa.float64())), null, np.zeros(n, dtype=bool))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            series = pd.Series(text.to_numpy(zero_copy_only=False), dtype=object)
            numbers = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            return Parsed(numbers, null, np.isnan(numbers) & ~null)
    return Parsed(np.full(n, np.nan), null, ~null)  # dates, lists, binary...


def _float64(col: pa.ChunkedArray) -> FloatArray:
    if col.null_count:
        col = col.fill_null(np.nan)
    return np.asarray(col.to_numpy(), dtype=np.float64)


def stack_columns(columns: Sequence[NDArray[np.floating]], dtype: type = np.float32) -> NDArray[np.float32]:
    """Columns -> one C-ordered (rows, columns) matrix. Writing column by column into
    a row-major matrix is strided and several times slower than stacking then
    transposing once."""
    return np.stack([np.asarray(c, dtype=dtype) for c in columns], axis=0).T.copy()


def parse_bool(col: pa.ChunkedArray) -> Parsed:
    """true/false, t/f, yes/no, 1/0 (any case) or a boolean or 0/1 numeric column."""
    n = len(col)
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if pa.types.is_boolean(col.type) or pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        parsed = parse_number(col)
        parsed.bad |= ~parsed.null & ~np.isin(parsed.values, (0.0, 1.0))
        return parsed
    if pa.types.is_null(col.type):
        return Parsed(np.full(n, np.nan), np.ones(n, dtype=bool), np.zeros(n, dtype=bool))
    null = col.is_null().to_numpy(zero_copy_only=False)
    text = pc.utf8_lower(text_of(col))
    true = pc.is_in(text, value_set=pa.array(_TRUE)).fill_null(False).to_numpy(zero_copy_only=False)
    false = pc.is_in(text, value_set=pa.array(_FALSE)).fill_null(False).to_numpy(zero_copy_only=False)
    values = np.where(true, 1.0, np.where(false, 0.0, np.nan))
    return Parsed(values, null, ~null & ~true & ~false)


def _map_dictionary(col: pa.ChunkedArray, word_code: Callable[[str], int]) -> IntArray:
    """A code per row of a dictionary column, computed once per dictionary entry:
    a clean file's ids and action names are dictionary-encoded, and decoding
    two million strings costs more than the rest of a column's checks."""
    parts = []
    for chunk in col.chunks:
        words = pc.utf8_trim_whitespace(chunk.dictionary.cast(pa.string())).to_pylist()
        mapping = np.array([word_code(w) if w else -1 for w in words] + [-1], dtype=np.int64)
        index = chunk.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        parts.append(mapping[index])  # -1 (null) picks the appended -1
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def index_in(col: pa.ChunkedArray, names: Sequence[str]) -> IntArray:
    """Position of each row's text (trimmed, any case) in ``names``, -1 when absent."""
    if pa.types.is_dictionary(col.type):
        position = {name: i for i, name in enumerate(names)}
        return _map_dictionary(col, lambda word: position.get(word.lower(), -1))
    text = pc.utf8_lower(text_of(col))
    return pc.index_in(text, value_set=pa.array(names)).fill_null(-1).to_numpy(zero_copy_only=False).astype(
        np.int64)


def parse_text(col: pa.ChunkedArray) -> tuple[NDArray[np.object_], IntArray, BoolArray]:
    """(unique values, per-row index into them (-1 where null or empty), null-or-empty rows)."""
    if pa.types.is_dictionary(col.type):
        seen: dict[str, int] = {}
        codes = _map_dictionary(col, lambda word: seen.setdefault(word, len(seen)))
        return np.array(list(seen), dtype=object), codes, codes < 0
    text = text_of(col).combine_chunks()
    empty = pc.equal(text, "").fill_null(True).to_numpy(zero_copy_only=False) | text.is_null().to_numpy(
        zero_copy_only=False)
    encoded = pc.dictionary_encode(text)
    codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    uniques = np.asarray(encoded.dictionary.to_pylist(), dtype=object)
    codes[empty] = -1
    return uniques, codes, empty


def parse_dates(col: pa.ChunkedArray) -> tuple[NDArray[np.datetime64], BoolArray, BoolArray]:
    """Calendar dates (ISO 8601 text, or a date/timestamp column) -> (day values, null, bad)."""
    n = len(col)
    null = col.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_date(col.type) or pa.types.is_timestamp(col.type):
        days = col.cast(pa.timestamp("s")).to_numpy().astype("datetime64[D]")
        return days, null, np.zeros(n, dtype=bool)
    text = text_of(col).to_numpy(zero_copy_only=False)
    parsed = pd.to_datetime(pd.Series(text, dtype=object), format="ISO8601", errors="coerce", utc=True)
    days = parsed.dt.tz_localize(None).to_numpy(dtype="datetime64[ns]").astype("datetime64[D]")
    bad = np.isnat(days) & ~null
    return days, null, bad

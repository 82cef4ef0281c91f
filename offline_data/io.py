"""Reading and writing log files: Parquet (with metadata) and CSV.

Reads turn every way a file can be unreadable (empty, truncated, garbage,
not UTF-8, ragged rows) into a :class:`DataFileError` that names the file and,
where it can, the row. Writes go to a temporary name in the destination
folder and are renamed into place only when complete, so a failed or
interrupted write leaves nothing behind.

CSV is read with every column as text: values are typed by
:mod:`offline_data.validate`, which can then say which row holds a bad value
(a typed CSV reader would stop at the first one with no row number).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from offline_data.schema import decode_metadata

PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv",)
_PARQUET_MAGIC = b"PAR1"


class DataFileError(ValueError):
    """A file that cannot be read as a log at all (before any row is checked)."""


def file_format(path: Path) -> str:
    """``"parquet"`` or ``"csv"``, from the suffix, else from the first bytes."""
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    if suffix in CSV_SUFFIXES:
        return "csv"
    with open(path, "rb") as f:
        return "parquet" if f.read(4) == _PARQUET_MAGIC else "csv"


def read_log_file(path: Path) -> tuple[pa.Table, dict[str, Any]]:
    """The table (CSV: every column as text) and our key-value metadata (CSV: none)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise DataFileError(f"{path}: is a folder; expected a .parquet or .csv file")
    if path.stat().st_size == 0:
        raise DataFileError(f"{path}: the file is empty; expected a header and data rows")
    if file_format(path) == "parquet":
        return read_parquet(path)
    return read_csv_text(path), {}


def read_parquet(path: Path) -> tuple[pa.Table, dict[str, Any]]:
    try:
        parquet = pq.ParquetFile(path, page_checksum_verification=True)
        table = parquet.read()
    except (pa.ArrowException, OSError, ValueError, IndexError, EOFError) as err:
        # truncation, garbage and flipped bytes surface as thrift, magic-byte,
        # checksum or decompression errors
        raise DataFileError(f"{path}: not a readable Parquet file (it may be truncated or corrupt): {err}") from None
    return table, decode_metadata(parquet.schema_arrow.metadata)


def read_csv_text(path: Path) -> pa.Table:
    """A CSV file with every column read as (nullable) text."""
    names = _csv_header(path)
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) not in (b"\n", b"\r"):
            rows = _count_lines(path)
            raise DataFileError(
                f"{path}: does not end with a line break, so the file looks truncated (cut in data row {rows}); "
                "a complete CSV ends with a newline")
    try:
        table = pcsv.read_csv(
            path,
            read_options=pcsv.ReadOptions(column_names=names, skip_rows=1, block_size=1 << 24),
            convert_options=pcsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()),
                                                strings_can_be_null=True),
        )
    except pa.ArrowException as err:
        raise DataFileError(f"{path}: {_locate_csv_problem(path, len(names)) or err}") from None
    if table.num_rows == 0:
        raise DataFileError(f"{path}: no data rows after the header")
    return table


def _csv_header(path: Path) -> list[str]:
    with open(path, "rb") as f:
        first = f.read(1 << 20).split(b"\n", 1)[0].rstrip(b"\r")
    try:
        text = first.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataFileError(f"{path}: the header line is not UTF-8 text; expected a CSV file with a header "
                            "of column names") from None
    if "\x00" in text:
        raise DataFileError(f"{path}: contains NUL bytes; expected a CSV text file")
    try:
        names = [name.strip() for name in next(csv.reader([text]))]
    except (csv.Error, StopIteration) as err:
        raise DataFileError(f"{path}: cannot read the header line: {err}") from None
    if not names or any(not name for name in names):
        raise DataFileError(f"{path}: the header has an empty column name; expected a name for every column")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataFileError(f"{path}: column {name!r} appears twice in the header")
        seen.add(name)
    return names


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 24), b""))


def _locate_csv_problem(path: Path, n_columns: int) -> str | None:
    """Find the first bad data row of a CSV the fast reader refused (error path only)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        row = data[: err.start].count(b"\n")
        return f"data row {row}: not UTF-8 text (byte {err.start}); expected a UTF-8 CSV file"
    reader = csv.reader(io.StringIO(text))
    try:
        next(reader)
        for fields in reader:
            if len(fields) != n_columns:
                return (f"data row {reader.line_num - 1}: expected {n_columns} fields as in the header, "
                        f"got {len(fields)}")
    except csv.Error as err:
        return f"data row {reader.line_num - 1}: {err}"
    return None


def read_metadata(path: Path) -> dict[str, Any]:
    """Our key-value metadata of a Parquet file (empty for CSV)."""
    path = Path(path)
    if file_format(path) != "parquet":
        return {}
    try:
        return decode_metadata(pq.read_schema(path).metadata)
    except (pa.ArrowException, OSError) as err:
        raise DataFileError(f"{path}: not a readable Parquet file: {err}") from None


# --------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed to ``path`` when the block ends
    without an error and removed when it raises (even on Ctrl-C)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_tables(path: Path, tables: Iterable[pa.Table], schema: pa.Schema | None = None) -> int:
    """Write tables (e.g. one per simulated chunk) to ``path`` atomically: Parquet
    (one row group each, page checksums on) or CSV by the suffix. Returns rows written.

    ``schema`` is the file's schema (with its key-value metadata); by default the
    first table's.
    """
    path = Path(path)
    fmt = "csv" if path.suffix.lower() in CSV_SUFFIXES else "parquet"
    if fmt == "parquet" and path.suffix.lower() not in PARQUET_SUFFIXES:
        raise ValueError(f"{path}: expected a .parquet or .csv file name")
    rows = 0
    with atomic_output(path) as tmp:
        parquet_writer: pq.ParquetWriter | None = None
        csv_writer: pcsv.CSVWriter | None = None
        try:
            for table in tables:
                if schema is None:
                    schema = table.schema
                table = table.replace_schema_metadata(schema.metadata)
                if fmt == "parquet":
                    if parquet_writer is None:
                        parquet_writer = pq.ParquetWriter(tmp, schema, compression="zstd", write_page_checksum=True)
                    parquet_writer.write_table(table, row_group_size=max(table.num_rows, 1))
                else:
                    plain = _decode_dictionaries(table)
                    if csv_writer is None:
                        csv_writer = pcsv.CSVWriter(tmp, plain.schema)
                    csv_writer.write_table(plain)
                rows += table.num_rows
            if schema is None:
                raise ValueError(f"{path}: nothing to write")
        finally:
            if parquet_writer is not None:
                parquet_writer.close()
            if csv_writer is not None:
                csv_writer.close()
    return rows


def write_table(path: Path, table: pa.Table) -> int:
    return write_tables(path, [table], table.schema)


def _decode_dictionaries(table: pa.Table) -> pa.Table:
    columns = [col.cast(col.type.value_type) if pa.types.is_dictionary(col.type) else col for col in table.columns]
    return pa.Table.from_arrays(columns, names=table.column_names)



def write_json(path: Path, payload: Any) -> None:
    """JSON written atomically (temporary name, then rename)."""
    with atomic_output(Path(path)) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=str))

"""``carepath data import`` against a fixed-seed batch of corrupt CSV and Parquet files, counted.

test_validate.py checks each kind of corruption and its exact message through ``import_log``;
this runs a hypothesis-generated batch of the same kinds through the command itself and counts
how many were refused cleanly: exit status 1 (the command's documented status for invalid input
data), an error whose first line names the file and which names the row and column where there is
one, no traceback, nothing written. The counts are printed (``pytest -s``) and written as JSON.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from carepath.cli import main
from offline_data.schema import COLUMN_BY_NAME, IMPORT_REQUIRED_COLUMNS, Kind
from tests.offline_data.conftest import KEY
from tests.offline_data.test_validate import BOUNDED, NUMERIC, base, write_raw  # noqa: F401 (base: a fixture)

KINDS = ["wrong type", "out of range", "missing column", "duplicate week", "truncated", "garbage"]
BATCH = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                 phases=(Phase.explicit, Phase.generate), suppress_health_check=[HealthCheck.too_slow])


def corrupt(data: st.DataObject, df: pd.DataFrame, folder: Path) -> tuple[str, Path, str]:
    """Draw one corruption of the clean log ``df``; returns its kind, the file and what the error must name."""
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    fmt = data.draw(st.sampled_from(["csv", "parquet"]), label="format")
    df = df.copy()
    if kind == "wrong type":
        row, column = data.draw(st.integers(0, len(df) - 1)), data.draw(st.sampled_from(NUMERIC))
        df[column] = df[column].astype(str)
        df.loc[row, column] = data.draw(st.sampled_from(["abc", "1,5", "seven", "12 weeks", "0x1F", "--3"]))
        return kind, write_raw(df, folder, fmt), f"row {row + 1}, column {column}: expected"
    if kind == "out of range":
        row, column = data.draw(st.integers(0, len(df) - 1)), data.draw(st.sampled_from(BOUNDED))
        spec = COLUMN_BY_NAME[column]
        assert spec.high is not None
        step = data.draw(st.integers(1, 50)) if spec.kind == Kind.INT else data.draw(st.floats(0.01, 1000))
        df[column] = df[column].astype(float)
        df.loc[row, column] = spec.high + step
        return kind, write_raw(df, folder, fmt), f"row {row + 1}, column {column}: expected"
    if kind == "missing column":
        column = data.draw(st.sampled_from([c for c in IMPORT_REQUIRED_COLUMNS if c != "action"]))
        return kind, write_raw(df.drop(columns=[column]), folder, fmt), f"column {column}: missing column"
    if kind == "duplicate week":
        row = data.draw(st.integers(0, len(df) - 1))
        df = pd.concat([df.iloc[: row + 1], df.iloc[row: row + 1], df.iloc[row + 1:]], ignore_index=True)
        return kind, write_raw(df, folder, fmt), f"row {row + 2}, column t: duplicate week"
    path = folder / f"raw.{fmt}"
    if kind == "truncated":
        full = write_raw(df, folder, fmt).read_bytes()
        start = full.index(b"\n") + 1 if fmt == "csv" else 1
        cut = data.draw(st.integers(start + 1, len(full) - 1).filter(lambda c: full[c - 1:c] != b"\n"))
        path.write_bytes(full[:cut])
        return kind, path, "truncated" if fmt == "csv" else "not a readable Parquet file"
    path.write_bytes(data.draw(st.binary(min_size=1, max_size=3000), label="garbage"))
    return kind, path, str(path)


def test_corrupt_files_through_the_command_are_all_refused_cleanly(base: pd.DataFrame, tmp_path: Path,  # noqa: F811
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    key_file = tmp_path / "secrets" / "pseudonym.key"
    key_file.parent.mkdir()
    key_file.write_bytes(KEY)
    tried: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    failures: list[str] = []

    @BATCH
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        folder = Path(tempfile.mkdtemp(dir=tmp_path))
        kind, raw, named = corrupt(data, base, folder)
        out = folder / "out" / "clean.parquet"
        capsys.readouterr()
        code = main(["data", "import", str(raw), "--out", str(out), "--key-file", str(key_file)])
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        tried[kind] += 1
        if code != 1:
            failures.append(f"{kind}: exit {code}: {captured.err[-500:]}")
        elif not lines or not lines[0].startswith(f"carepath data import: error: {raw}"):
            failures.append(f"{kind}: the first error line does not name {raw}: {captured.err[:500]!r}")
        elif named not in captured.err or "Traceback" in captured.err:
            failures.append(f"{kind}: the error does not name {named!r}: {captured.err[:500]!r}")
        elif out.exists() or (out.parent.exists() and any(out.parent.iterdir())) or "wrote" in captured.out:
            failures.append(f"{kind}: something was written")
        else:
            refused[kind] += 1

    run()
    counts = {kind: {"tried": tried[kind], "refused_cleanly": refused[kind]} for kind in KINDS}
    counts["total"] = {"tried": sum(tried.values()), "refused_cleanly": sum(refused.values())}
    (tmp_path / "import_fuzz_counts.json").write_text(json.dumps(counts, indent=2))
    with capsys.disabled():
        print("\ncarepath data import, corrupt files: tried / refused cleanly")
        for kind, row in counts.items():
            print(f"  {kind:<15} {row['tried']:>3} / {row['refused_cleanly']}")
    assert not failures, f"{len(failures)} of {sum(tried.values())} not refused cleanly:\n" + "\n".join(failures[:10])
    assert sum(tried.values()) >= 120 and len(+tried) == len(KINDS)

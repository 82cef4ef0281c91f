"""Logged-data throughput and memory.

Prints and writes ``benchmarks/results/data_throughput.json``:

- generating 100,000 patients x 26 weeks under STAR*D (epsilon 0.1) to Parquet
  (target <= 60 s, peak memory <= 4 GiB);
- loading that file into training arrays: read, validate every row, build
  the transitions (target <= 5 s); padded episodes are timed separately;
- validating a raw CSV of 1,000,000 rows (target <= 20 s): read, type and
  check every row, dates turned into weeks, actions checked against the
  clinical rules; the full import (pseudonymise and write too) is timed
  separately.

Each stage runs in its own process, so its peak resident memory
(``ru_maxrss``) is its own and imports or JIT caches of one stage do not
flatter the next. Times exclude interpreter start-up and imports.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
KEY = b"benchmark-key-not-a-secret-0123456789"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def stage_generate(path: Path, patients: int) -> dict[str, Any]:
    from offline_data.generate import generate

    started = time.perf_counter()
    summary = generate(path, policy="stard", epsilon=0.1, patients=patients, seed=0)
    seconds = time.perf_counter() - started
    return {"patients": patients, "weeks": 26, "rows": summary.rows, "seconds": seconds,
            "rows_per_s": summary.rows / seconds, "file_mib": path.stat().st_size / 2**20,
            "peak_rss_mib": peak_rss_mib()}


def stage_load(path: Path) -> dict[str, Any]:
    from offline_data.dataset import load_dataset

    started = time.perf_counter()
    data = load_dataset(path)
    loaded = time.perf_counter()
    transitions = data.transitions()
    done = time.perf_counter()
    episodes = data.episodes()
    padded = time.perf_counter()
    return {"rows": len(transitions), "episodes": len(episodes), "read_and_validate_s": loaded - started,
            "transitions_s": done - loaded, "seconds": done - started, "episodes_s": padded - done,
            "obs_mib": transitions.obs.nbytes / 2**20, "peak_rss_mib": peak_rss_mib()}


def make_raw_csv(source: Path, out: Path, rows: int) -> dict[str, Any]:
    """A real-world-looking CSV of ``rows`` rows from a simulated log: record numbers,
    names, emails and visit dates; action names; no allowed_actions (the rules decide)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    table = pq.read_table(source).slice(0, rows)
    if table.num_rows < rows:
        raise SystemExit(f"{source} has only {table.num_rows} rows; generate more patients")
    ids = table.column("patient_id").cast(pa.string())
    codes = pc.dictionary_encode(ids.combine_chunks()).indices.to_numpy()
    first = np.datetime64("2021-01-04") + (codes * 7919 % 900).astype("timedelta64[D]")
    dates = first + (table.column("t").to_numpy().astype(np.int64) * 7).astype("timedelta64[D]")
    raw = table.drop_columns(["patient_id", "t", "allowed_actions", "action", "true_phq9"])
    raw = raw.add_column(0, "patient_id", pa.array([f"MRN{900000 + c}" for c in codes]))
    raw = raw.add_column(1, "name", pa.array([f"Patient {c}" for c in codes]))
    raw = raw.add_column(2, "email", pa.array([f"patient{c}@example.org" for c in codes]))
    raw = raw.add_column(3, "visit_date", pa.array(dates.astype(str)))
    raw = pa.Table.from_arrays([c.cast(c.type.value_type) if pa.types.is_dictionary(c.type) else c
                                for c in raw.columns], names=raw.column_names)
    pcsv.write_csv(raw, out)
    return {"rows": raw.num_rows, "columns": raw.num_columns, "file_mib": out.stat().st_size / 2**20}


def stage_validate(raw: Path, out: Path) -> dict[str, Any]:
    from offline_data.importer import import_log, plan_columns
    from offline_data.io import read_log_file
    from offline_data.validate import validate_table

    started = time.perf_counter()
    table, _ = read_log_file(raw)
    read = time.perf_counter()
    plan = plan_columns(table.column_names)
    keep = [plan.id_column, *plan.schema, *([plan.date_column] if plan.date_column else [])]
    frame = validate_table(table.select(keep), str(raw), raw=True, date_column=plan.date_column)
    validated = time.perf_counter()
    del table, frame
    import_started = time.perf_counter()
    import_log(raw, out, key=KEY, k=5, report=lambda _: None, warn=lambda _: None)
    imported = time.perf_counter()
    return {"rows_read_s": read - started, "seconds": validated - started, "validate_only_s": validated - read,
            "full_import_s": imported - import_started, "peak_rss_mib": peak_rss_mib()}


def run_stage(*args: str) -> dict[str, Any]:
    """One stage in a fresh interpreter; its last stdout line is its JSON."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, __file__, "--stage", *args], capture_output=True, text=True,
                            check=False, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"stage {args[0]} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tenth of the sizes (a smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS / "data_throughput.json")
    parser.add_argument("--stage", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        name, *rest = args.stage
        stages = {"generate": lambda: stage_generate(Path(rest[0]), int(rest[1])),
                  "load": lambda: stage_load(Path(rest[0])),
                  "make_csv": lambda: make_raw_csv(Path(rest[0]), Path(rest[1]), int(rest[2])),
                  "validate": lambda: stage_validate(Path(rest[0]), Path(rest[1]))}
        print(json.dumps(stages[name]()))
        return

    patients = 10_000 if args.quick else 100_000
    csv_rows = 100_000 if args.quick else 1_000_000
    figures: dict[str, Any] = {"machine": platform.platform(), "cpu_count": os.cpu_count(), "quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="carepath-bench-") as tmp:
        folder = Path(tmp)
        log = folder / "stard.parquet"
        figures["generate"] = run_stage("generate", str(log), str(patients))
        figures["load"] = run_stage("load", str(log))
        if figures["generate"]["rows"] < csv_rows:  # need more rows for the CSV
            bigger = folder / "bigger.parquet"
            run_stage("generate", str(bigger), str(int(patients * 1.2 * csv_rows / figures["generate"]["rows"])))
            log = bigger
        raw = folder / "raw.csv"
        figures["raw_csv"] = run_stage("make_csv", str(log), str(raw), str(csv_rows))
        figures["validate_csv"] = run_stage("validate", str(raw), str(folder / "clean" / "clean.parquet"))
    figures["targets"] = {"generate_100k_x_26_s": "<= 60", "generate_peak_rss_gib": "<= 4",
                          "load_to_arrays_s": "<= 5", "validate_1m_rows_csv_s": "<= 20"}

    g, ld, v = figures["generate"], figures["load"], figures["validate_csv"]
    print(f"generate {g['patients']:,} patients x 26 weeks ({g['rows']:,} rows): {g['seconds']:.1f} s "
          f"({g['rows_per_s']:,.0f} rows/s), peak RSS {g['peak_rss_mib'] / 1024:.2f} GiB, "
          f"file {g['file_mib']:.0f} MiB                [target <= 60 s, <= 4 GiB]")
    print(f"load into training arrays: {ld['seconds']:.2f} s (read + validate {ld['read_and_validate_s']:.2f} s, "
          f"transitions {ld['transitions_s']:.2f} s; padded episodes +{ld['episodes_s']:.2f} s), "
          f"peak RSS {ld['peak_rss_mib'] / 1024:.2f} GiB   [target <= 5 s]")
    print(f"validate a raw CSV of {figures['raw_csv']['rows']:,} rows ({figures['raw_csv']['file_mib']:.0f} MiB): "
          f"{v['seconds']:.1f} s (read {v['rows_read_s']:.1f} s); full import with pseudonymisation and write "
          f"{v['full_import_s']:.1f} s   [target <= 20 s]")
    from evaluation.cli import write_json_atomic  # atomic: never a half-written result

    write_json_atomic(args.out, figures)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()

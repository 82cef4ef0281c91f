"""The calibration table at full size: simulated value, target band, source, in/out.

Prints the table, writes ``benchmarks/results/calibration.json`` and a plot of
simulated PHQ-9 trajectories by hidden responder type
(``benchmarks/results/trajectories_by_responder_type.png``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from evaluation.cli import configure_calibrate, run_calibrate

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    configure_calibrate(parser)
    parser.set_defaults(json=RESULTS / "calibration.json", plot=RESULTS / "trajectories_by_responder_type.png")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    code = run_calibrate(args)
    print(f"calibration ran in {time.perf_counter() - started:.1f} s")
    return code


if __name__ == "__main__":
    raise SystemExit(main())

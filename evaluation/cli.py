"""``carepath simulate`` and ``carepath calibrate``."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from envs.params import EnvSettings, load_params
from policies.baselines import BASELINES, make_baseline


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON under a temporary name, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


# ----------------------------------------------------------------------------- simulate


def configure_simulate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", action="append", choices=sorted(BASELINES),
                        help="baseline policy to simulate (repeat for several; default: all)")
    parser.add_argument("--epsilon", type=_probability, default=0.0,
                        help="share of uniformly random allowed actions mixed into each policy (default 0)")
    parser.add_argument("--patients", type=_positive_int, default=5000, help="simulated patients (default 5000)")
    parser.add_argument("--weeks", type=_positive_int, default=26, help="horizon in weeks (default 26)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--params", type=Path, default=None, help="simulator parameter YAML (default: calibrated)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")


def run_simulate(args: argparse.Namespace) -> int:
    from evaluation.ground_truth import rollout

    params = load_params(args.params)
    settings = EnvSettings(horizon=args.weeks)
    names = args.policy or ["stard", "usual_care", "random"]
    results = []
    for name in names:
        truth = rollout(make_baseline(name, args.epsilon), args.patients, seed=args.seed, params=params,
                        settings=settings, progress=True)
        results.append(truth)
    print(f"{args.patients} simulated patients per policy, {args.weeks} weeks, seed {args.seed} "
          f"(true severity; 95 % intervals)")
    header = f"{'policy':<12} {'remission':>22} {'PHQ-9 change':>24} {'left care':>22} {'return':>24}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.policy:<12} {_pct(r.remission):>22} {_num(r.phq9_change):>24} {_pct(r.dropout):>22} "
              f"{_num(r.value):>24}")
    blocked = sum(r.blocked_actions_chosen for r in results)
    print(f"blocked actions chosen: {blocked}; referral when item 9 >= 2: "
          + ", ".join(f"{r.policy} {100 * r.referrals_when_item9_high:.0f} %" for r in results))
    if args.json:
        write_json_atomic(args.json, [r.as_dict() for r in results])
        print(f"written {args.json}")
    return 0


def _pct(i: Any) -> str:
    return f"{100 * i.value:5.1f} % [{100 * i.low:4.1f}, {100 * i.high:4.1f}]"


def _num(i: Any) -> str:
    return f"{i.value:6.2f} [{i.low:6.2f}, {i.high:6.2f}]"


# ----------------------------------------------------------------------------- calibrate


def configure_calibrate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scale", type=float, default=1.0,
                        help="scale the simulated cohort sizes (default 1.0: 20,000 STAR*D patients)")
    parser.add_argument("--seed", type=int, default=2026, help="random seed (default 2026)")
    parser.add_argument("--params", type=Path, default=None, help="simulator parameter YAML (default: calibrated)")
    parser.add_argument("--json", type=Path, default=None, help="write the table as JSON here")
    parser.add_argument("--plot", type=Path, default=None,
                        help="write a PNG of PHQ-9 trajectories by responder type here")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any target is outside its band")


def run_calibrate(args: argparse.Namespace) -> int:
    from evaluation.calibration import CalibrationSizes, calibrate, format_table

    if not 0.01 <= args.scale <= 10:
        raise SystemExit("carepath calibrate: --scale must be in [0.01, 10]")
    params = load_params(args.params)
    base = CalibrationSizes()
    sizes = CalibrationSizes(*(max(200, int(getattr(base, f.name) * args.scale))
                               for f in dataclasses.fields(base)))
    targets = calibrate(params, sizes, args.seed)
    print(format_table(targets))
    if args.json:
        write_json_atomic(args.json, {"sizes": dataclasses.asdict(sizes), "seed": args.seed,
                                      "targets": [t.as_dict() for t in targets]})
        print(f"written {args.json}")
    if args.plot:
        from evaluation.plots import plot_trajectories_by_responder_type

        plot_trajectories_by_responder_type(args.plot, params=params, seed=args.seed)
        print(f"written {args.plot}")
    return 1 if args.strict and not all(t.inside for t in targets) else 0

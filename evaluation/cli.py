"""``carepath simulate`` and ``carepath calibrate``."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from carepath.argtypes import level, non_negative_int, positive_int, probability
from envs.params import EnvSettings, load_params
from policies.base import Policy
from policies.baselines import BASELINES, make_baseline
from policies.strategies import STRATEGIES


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON under a temporary name, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)




# ----------------------------------------------------------------------------- simulate


def configure_simulate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", action="append", choices=sorted(BASELINES) + sorted(STRATEGIES),
                        help="baseline policy, or a strategy kept to check the simulator (add_everything, "
                             "switch_every_2w), to simulate (repeat for several; default: the three baselines)")
    parser.add_argument("--epsilon", type=probability, default=0.0,
                        help="share of uniformly random allowed actions mixed into each policy (default 0)")
    parser.add_argument("--patients", type=positive_int, default=5000, help="simulated patients (default 5000)")
    parser.add_argument("--weeks", type=positive_int, default=26, help="horizon in weeks (default 26)")
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
        policy: Policy = STRATEGIES[name]() if name in STRATEGIES else make_baseline(name, args.epsilon)
        truth = rollout(policy, args.patients, seed=args.seed, params=params, settings=settings, progress=True)
        results.append(truth)
    print(f"{args.patients} simulated patients per policy, {args.weeks} weeks, seed {args.seed} "
          f"(true severity; 95 % intervals)")
    header = (f"{'policy':<15} {'remission':>22} {'PHQ-9 change':>24} {'left care':>22} {'return':>24} "
              f"{'cost/patient':>13} {'cost/remission':>15} {'side effects':>13}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.policy:<15} {_pct(r.remission):>22} {_num(r.phq9_change):>24} {_pct(r.dropout):>22} "
              f"{_num(r.value):>24} {r.cost.value:>9.0f} GBP {_gbp(r.cost_per_remission):>15} "
              f"{r.side_effects.value:>13.2f}")
    print("cost: GBP per patient over the horizon (envs/params/default.yaml, costs); side effects: mean weekly "
          "burden (0-10) in care")
    blocked = sum(r.blocked_actions_chosen for r in results)
    print(f"blocked actions chosen: {blocked}; referral when item 9 >= 2: "
          + ", ".join(f"{r.policy} {100 * r.referrals_when_item9_high:.0f} %" for r in results))
    if args.json:
        write_json_atomic(args.json, [r.as_dict() for r in results])
        print(f"written {args.json}")
    return 0


def _gbp(value: float | None) -> str:
    return "none remitted" if value is None else f"{value:.0f} GBP"


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


# ----------------------------------------------------------------------------- evaluate




#: As evaluation.compare's ALL_ESTIMATORS, DEFAULT_ESTIMATORS and COMPARE_INTERVALS (a test checks), spelled
#: here so that ``carepath evaluate --help`` does not import scipy and torch.
EVALUATE_ESTIMATORS = ("is", "wis", "pdis", "wpdis", "dr", "wdr", "fqe")
EVALUATE_DEFAULT_ESTIMATORS = ("wis", "wpdis", "dr", "wdr", "fqe")
EVALUATE_INTERVALS = ("bootstrap", "bca", "t")


def configure_evaluate(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Compare policies off-policy on logged data: estimates with intervals, optional simulator "
                          "ground truth, fairness by subgroup; writes report.json, report.md, report.html, plots "
                          "and TensorBoard scalars. Decision support for reviewers.")
    parser.add_argument("--data", type=Path, required=True,
                        help="logged data, Parquet or CSV in the offline_data schema (e.g. data/test.parquet)")
    parser.add_argument("--policy", action="append", required=True, metavar="POLICY",
                        help="a policy bundle folder, or a baseline name (stard, usual_care, random) with an "
                             "optional ':epsilon', e.g. stard:0.1; repeat to compare several")
    parser.add_argument("--estimators", default=",".join(EVALUATE_DEFAULT_ESTIMATORS),
                        help=f"comma list of {', '.join(EVALUATE_ESTIMATORS)}, or 'all' "
                             f"(default {','.join(EVALUATE_DEFAULT_ESTIMATORS)})")
    parser.add_argument("--interval", choices=EVALUATE_INTERVALS, default="bootstrap",
                        help="interval of the importance-sampling and DR estimates (default bootstrap; FQE always "
                             "gets a percentile bootstrap)")
    parser.add_argument("--level", type=level, default=0.95, help="interval level (default 0.95)")
    parser.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resamples and the simulator (default 0)")
    parser.add_argument("--truth-patients", type=non_negative_int, default=0,
                        help="simulated patients per policy for ground truth (default 0: no simulator truth)")
    parser.add_argument("--out", type=Path, required=True, help="report folder (replaces an earlier report there)")
    parser.add_argument("--no-fqe", action="store_true",
                        help="skip FQE, and with it DR and WDR (which use its Q-function)")
    parser.add_argument("--fqe-iterations", type=positive_int, default=None,
                        help="FQE iterations (default: FQEConfig's, at least the horizon)")
    parser.add_argument("--fqe-updates", type=positive_int, default=None,
                        help="FQE gradient updates per iteration (default: FQEConfig's)")
    parser.add_argument("--fqe-refits", type=non_negative_int, default=0, metavar="N",
                        help="FQE's interval from N refits on bootstrap resamples (N >= 2; N more fits per policy), "
                             "which carries the Q-model's error (default 0: a bootstrap of its initial values, "
                             "which ignores it)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or summary")


class _EvaluateError(Exception):
    """A bad input of ``carepath evaluate``: one line for the user, exit 1."""


def _evaluate_estimators(args: argparse.Namespace) -> tuple[str, ...]:
    from evaluation.compare import DEFAULT_ESTIMATORS, NEEDS_FQE, resolve_estimators

    try:
        names = resolve_estimators(args.estimators)
    except ValueError as err:
        raise _EvaluateError(f"--estimators: {err}") from None
    if args.no_fqe:
        explicit = args.estimators.strip() not in ("all", ",".join(DEFAULT_ESTIMATORS))
        dropped = [n for n in names if n in NEEDS_FQE]
        if explicit and dropped:
            raise _EvaluateError(f"--estimators {','.join(dropped)} need FQE, which --no-fqe turns off; "
                                 "remove them or drop --no-fqe")
        names = tuple(n for n in names if n not in NEEDS_FQE)
        if not names:
            raise _EvaluateError("--no-fqe leaves no estimator; add e.g. --estimators wis,wpdis")
    return names


def _evaluate_policies(specs: list[str]) -> dict[str, Any]:
    from policies import BundleError, load
    from policies.baselines import baseline_from_spec

    policies: dict[str, Any] = {}
    for spec in specs:
        policy: Any
        path = Path(spec)
        if path.exists():
            try:
                policy = load(path)
            except (BundleError, OSError, ValueError) as err:
                raise _EvaluateError(f"--policy {spec}: the bundle does not load: {err}") from None
            label = str(policy.name)
        else:
            try:
                policy = baseline_from_spec(spec)
            except ValueError as err:
                raise _EvaluateError(f"--policy {spec}: {err} (and no bundle folder at {path})") from None
            label = spec
        k, unique = 1, label
        while unique in policies:
            k += 1
            unique = f"{label}#{k}"
        policies[unique] = policy
    return policies


def run_evaluate(args: argparse.Namespace) -> int:
    import sys

    from evaluation.report import check_output_folder

    try:
        names = _evaluate_estimators(args)
        check_output_folder(args.out)
        policies = _evaluate_policies(args.policy)
        from offline_data.dataset import load_dataset

        if not args.data.exists():
            raise _EvaluateError(f"--data {args.data}: no such file")
        try:
            dataset = load_dataset(args.data)
        except (FileNotFoundError, ValueError) as err:  # DataFileError and ValidationError are ValueErrors
            raise _EvaluateError(f"--data {args.data}: {err}") from None
        fqe_config = None
        if any(n in names for n in ("fqe", "dr", "wdr")):
            from evaluation.ope.fqe import FQEConfig

            options = {"iterations": args.fqe_iterations, "updates_per_iteration": args.fqe_updates}
            fqe_config = FQEConfig(**{k: v for k, v in options.items() if v is not None})
        from evaluation.compare import compare_policies
        from evaluation.report import write_report

        try:
            result = compare_policies(dataset, policies, estimators=names, interval=args.interval, level=args.level,
                                      n_boot=args.n_boot, seed=args.seed, fqe_config=fqe_config,
                                      truth_patients=args.truth_patients, fqe_refits=args.fqe_refits,
                                      progress=not args.quiet)
            out = write_report(result, args.out)
        except ValueError as err:
            raise _EvaluateError(str(err)) from None
    except (_EvaluateError, ValueError) as err:
        print(f"carepath evaluate: error: {err}", file=sys.stderr)
        return 1
    if not args.quiet:
        headline = result.headline
        print(f"{len(result.policies)} policies on {result.data['episodes']} episodes ({args.data}); "
              f"{result.level:.0%} intervals; decision support")
        for p in result.policies:
            print(f"  {p.label:<30} {p.estimates[headline]}")
        print(f"written {out}/report.md, report.html, report.json, plots/, tensorboard/")
    return 0

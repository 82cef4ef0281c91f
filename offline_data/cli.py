"""``carepath data``: generate, import and describe logged data.

Exit status: 0 done; 1 the input data are invalid or unreadable (the message
names the file, row, column and what was expected; nothing is written);
2 a usage error (bad flag, missing key, unknown config).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from carepath.argtypes import non_negative_int, positive_int, probability
from policies.baselines import BASELINES

EPILOG = ("exit status: 0 done; 1 invalid or unreadable input data (nothing written); 2 usage error. "
          "Everything carepath simulates is synthetic; imported data are pseudonymised.")





def _scale(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 10.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 10], got {text}")
    return value


def configure_data(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")

    gen = sub.add_parser("generate", help="simulate logged data under a baseline behaviour policy",
                         description="Simulate patients under a baseline policy (with epsilon exploration) and "
                                     "write one row per patient-week, with the behaviour probability of each "
                                     "logged action. Flags override --config, which overrides the defaults.",
                         epilog=EPILOG)
    gen.add_argument("--config", help="data config: a YAML path or a name in configs/data/ (e.g. stard)")
    gen.add_argument("--policy", choices=sorted(BASELINES), default=None, help="behaviour policy (default stard)")
    gen.add_argument("--epsilon", type=probability, default=None,
                     help="share of uniformly random allowed actions mixed in (default 0.1)")
    gen.add_argument("--patients", type=positive_int, default=None, help="patients to simulate (default 10000)")
    gen.add_argument("--seed", type=non_negative_int, default=None, help="random seed (default 0)")
    gen.add_argument("--out", type=Path, default=None, help="output file, .parquet (or .csv, without metadata)")
    gen.add_argument("--env", default=None, help="simulator settings: a name in configs/env/ (e.g. stress)")
    gen.add_argument("--horizon", type=positive_int, default=None, help="weeks per patient (default 26)")
    gen.add_argument("--missingness", type=_scale, default=None, help="x calibrated share of missing measurements")
    gen.add_argument("--observation-noise", type=_scale, default=None, help="x calibrated measurement noise")
    gen.add_argument("--heterogeneity", type=_scale, default=None, help="x calibrated between-patient variation")
    gen.add_argument("--params", default=None, help="simulator parameter YAML (default: the calibrated one)")
    gen.add_argument("--chunk-size", type=positive_int, default=None,
                     help="patients simulated together (memory; part of the seed recipe; default 25000)")
    gen.add_argument("--true-phq9", action=argparse.BooleanOptionalAction, default=None,
                     help="include the hidden severity column, for evaluation only (default: yes)")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")

    imp = sub.add_parser("import", help="validate and pseudonymise a real-world log (CSV or Parquet)",
                         description="Validate every row of a raw log, pseudonymise it (keyed hash of patient ids, "
                                     "direct identifiers dropped, dates turned into weeks), report k-anonymity, "
                                     "estimate missing behaviour probabilities and write clean Parquet.",
                         epilog=EPILOG)
    imp.add_argument("raw", type=Path, help="raw log, .csv or .parquet")
    imp.add_argument("--out", type=Path, required=True, help="clean output, .parquet")
    imp.add_argument("--key-file", type=Path, default=None,
                     help="file holding the pseudonymisation key (else env CAREPATH_PSEUDONYM_KEY)")
    imp.add_argument("--k", type=positive_int, default=5, help="k-anonymity threshold (default 5)")
    imp.add_argument("--id-column", default=None, help="column identifying the patient (default patient_id)")
    imp.add_argument("--date-column", default=None, help="calendar date column that gives the week when there is no t")
    imp.add_argument("--seed", type=non_negative_int, default=0, help="seed of the behaviour model's sample")

    desc = sub.add_parser("describe", help="summarise a logged-data file", epilog=EPILOG)
    desc.add_argument("file", type=Path, help="a clean .parquet or .csv log")
    desc.add_argument("--json", type=Path, default=None, help="also write the summary as JSON here")
    parser.set_defaults(_parser=parser)


def run_data(args: argparse.Namespace) -> int:
    from offline_data.io import DataFileError
    from offline_data.validate import ValidationError

    commands = {"generate": run_generate, "import": run_import, "describe": run_describe}
    if args.data_command is None:
        args._parser.print_help()
        return 2
    try:
        return commands[args.data_command](args)
    except (ValidationError, DataFileError) as err:
        print(f"carepath data {args.data_command}: error: {err}", file=sys.stderr)
        return 1


def run_generate(args: argparse.Namespace) -> int:
    from offline_data.config import GenerateConfig, load_config, merge
    from offline_data.generate import generate

    config = load_config(args.config) if args.config else GenerateConfig()
    flags: dict[str, Any] = {name: getattr(args, name) for name in (
        "policy", "epsilon", "patients", "seed", "out", "chunk_size", "true_phq9") if getattr(args, name) is not None}
    if args.env is not None:
        config = merge(config, {"env": args.env}, "--env")
    env = {name: getattr(args, name) for name in ("horizon", "missingness", "observation_noise", "heterogeneity")
           if getattr(args, name) is not None}
    if args.params is not None:
        env["params_path"] = args.params
    if env:
        flags["env"] = env
    config = merge(config, flags, "command line")
    if config.out is None:
        raise ValueError("no output file: pass --out PATH (or set out: in the config)")
    started = time.perf_counter()
    summary = generate(config.out, policy=config.policy, epsilon=config.epsilon, patients=config.patients,
                       seed=config.seed, settings=config.settings(), params_path=config.params_path,
                       param_overrides=config.param_overrides, chunk_size=config.chunk_size,
                       include_true_phq9=config.true_phq9, progress=not args.quiet)
    print(f"wrote {summary.rows:,} patient-weeks of {summary.patients:,} simulated patients "
          f"({config.policy}, epsilon {config.epsilon:g}, seed {config.seed}) to {summary.path} "
          f"in {time.perf_counter() - started:.1f} s")
    if summary.path.suffix.lower() == ".csv":
        print("note: CSV keeps no metadata (provenance, settings); prefer .parquet", file=sys.stderr)
    return 0


def run_import(args: argparse.Namespace) -> int:
    from offline_data.importer import check_key_location, import_log
    from offline_data.pseudonymise import load_key

    key = load_key(args.key_file)
    check_key_location(args.key_file, args.out)
    result = import_log(args.raw, args.out, key=key, k=args.k, id_column=args.id_column,
                        date_column=args.date_column, estimate_seed=args.seed)
    plan = result.plan
    dropped = plan.identifiers + plan.dates + plan.unknown
    print(f"wrote {result.rows:,} patient-weeks of {result.patients:,} pseudonymised patients "
          f"({result.episodes:,} episodes) to {result.out}")
    print(f"  dropped columns: {', '.join(dropped) or 'none'}"
          + (f"; t from {plan.date_column}" if plan.date_column else "")
          + (f"; kept subgroups: {', '.join(plan.subgroups)}" if plan.subgroups else ""))
    print("  behaviour probabilities: " + ("ESTIMATED (behavior_prob_estimated=true in the metadata)"
                                           if result.behavior_prob_estimated else "as logged"))
    return 0


def run_describe(args: argparse.Namespace) -> int:
    from offline_data.describe import describe_file, format_description

    description = describe_file(args.file)
    print(format_description(description))
    if args.json is not None:
        from offline_data.io import write_json

        write_json(args.json, description.as_dict())
        print(f"written {args.json}")
    return 0

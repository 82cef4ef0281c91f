"""The ``carepath`` command: a thin dispatcher.

Each subcommand lives in the package it drives; this module only knows
their names and where they are, and imports a subcommand's module when it
runs, so ``carepath --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from carepath import __version__

#: name -> (module, configure function, run function, one-line help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "simulate": ("evaluation.cli", "configure_simulate", "run_simulate",
                 "simulate a cohort under baseline policies and summarise outcomes"),
    "calibrate": ("evaluation.cli", "configure_calibrate", "run_calibrate",
                  "check the simulator against the published calibration targets"),
    "evaluate": ("evaluation.cli", "configure_evaluate", "run_evaluate",
                 "compare policies off-policy on logged data: estimates, intervals, fairness, report"),
    "vignettes": ("evaluation.vignettes.cli", "configure_vignettes", "run_vignettes",
                  "score a policy on guideline vignettes: is its first suggestion one NICE, CANMAT or APA accept?"),
    "certify": ("evaluation.certify.cli", "configure_certify", "run_certify",
                "certify a policy against current care from logged data, with guideline vignettes; "
                "writes a certified bundle"),
    "data": ("offline_data.cli", "configure_data", "run_data",
             "logged data: generate under a behaviour policy, import (validate, pseudonymise), describe"),
    "prepare": ("serving.cli", "configure_prepare", "run_prepare",
                "prepare a policy bundle for serving: SHAP background, benefit ensemble with intervals"),
    "recommend": ("serving.cli", "configure_recommend", "run_recommend",
                  "ranked next steps for one patient (JSON file) with benefit, uncertainty and SHAP rationale"),
    "serve": ("serving.cli", "configure_serve", "run_serve",
              "serve policies: REST API, HL7 CDS Hooks, clinician page, audit trail"),
    "tokens": ("serving.admin_cli", "configure_tokens", "run_tokens",
               "API bearer tokens: create (shown once), list, revoke"),
    "audit": ("serving.admin_cli", "configure_audit", "run_audit",
              "audit store: summary of recommendations and feedback, export clinician choices as logged data"),
}

DESCRIPTION = (
    "carepath recommends the next step of depression care with reinforcement learning. "
    "It is decision support for clinicians: it never acts on a patient by itself."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carepath", description=DESCRIPTION,
                                     epilog="Run 'carepath COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"carepath {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, _, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2 if not argv else 0
    module_name, configure, run, help_text = COMMANDS[args.command]
    module = importlib.import_module(module_name)
    sub_parser = argparse.ArgumentParser(prog=f"carepath {args.command}", description=help_text)
    getattr(module, configure)(sub_parser)
    sub_args = sub_parser.parse_args(rest)
    try:
        return int(getattr(module, run)(sub_args))
    except (ValueError, FileNotFoundError) as err:
        # user errors get one clear line, not a traceback
        print(f"carepath {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

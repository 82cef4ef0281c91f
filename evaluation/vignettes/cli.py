"""``carepath vignettes``: score a policy on the guideline vignettes.

It is a report, so it exits 0 whatever the score; a critical case that fails is
printed on a line of its own ("critical case failed: ..."). ``--out`` writes the
JSON under a temporary name and renames it, and only once everything is scored.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from evaluation.cli import write_json_atomic
from evaluation.vignettes import CASES_PATH, VignetteResult, file_sha256, load_cases, resolve_policy, score


def configure_vignettes(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Score a policy on synthetic textbook cases of depression care: is its first suggestion "
                          "one that NICE NG222, CANMAT 2023 or APA guidance accepts? A report: exits 0 whatever "
                          "the score.")
    parser.add_argument("--policy", required=True, metavar="BUNDLE_OR_SPEC",
                        help="a policy bundle folder, or a baseline name (stard, usual_care, random) with an "
                             "optional ':epsilon', e.g. stard:0.1")
    parser.add_argument("--cases", type=Path, default=None, metavar="FILE",
                        help=f"a vignette file (default: the shipped {CASES_PATH.name}, format in its header)")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE.json",
                        help="also write the full result as JSON (written atomically)")
    parser.add_argument("--json", action="store_true", help="print the JSON instead of the table")


def run_vignettes(args: argparse.Namespace) -> int:
    cases_path = args.cases if args.cases is not None else CASES_PATH
    if args.out is not None and args.out.is_dir():
        raise ValueError(f"--out {args.out}: is a folder; give a file name such as vignettes.json")
    cases = load_cases(cases_path)
    policy = resolve_policy(args.policy)
    result = score(policy, cases)
    payload = {"policy_spec": args.policy, "cases_file": str(cases_path), "cases_sha256": file_sha256(cases_path),
               **result.as_dict()}
    if args.out is not None:
        try:
            write_json_atomic(args.out, payload)
        except OSError as err:
            raise ValueError(f"--out {args.out}: cannot be written ({err.strerror or err})") from None
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        print(format_table(result, cases_path))
        if args.out is not None:
            print(f"wrote {args.out}")
    return 0


def format_table(result: VignetteResult, cases_path: Path) -> str:
    """The readable report: one row per case, then the shares and any critical failure."""
    n = len(result.cases)
    n_critical = sum(c.critical for c in result.cases)
    width = max(len(c.id) for c in result.cases) + 2
    lines = [f"Guideline vignettes: policy {result.policy!r}, {n} cases ({n_critical} critical) from {cases_path}",
             "", f"{'case':<{width}}{'first suggestion':<24}{'ok?':<6}{'top-3 ok?':<10}"]
    for c in result.cases:
        tie = "*" if c.tie_at_top else ""
        flag = "(critical)" if c.critical else ""
        lines.append(f"{c.id:<{width}}{c.top3[0] + tie:<24}{_yes(c.first_ok):<6}{_yes(c.top3_ok):<10}{flag}".rstrip())
    lines.append("")
    if any(c.first_chance != c.first_ok or c.top3_chance != c.top3_ok for c in result.cases):
        # the columns follow the shown order; a tie is a choice the policy would make at random
        lines.append("* tied at the top. Actions of equal probability (and no score to split them) are shown in "
                     "action order; the shares below count each tie at its odds.")
    lines += [f"first suggestion acceptable:      {_pct(result.first_share)}",
              f"acceptable among the first three: {_pct(result.top3_share)}",
              f"probability of an acceptable action when the policy samples: {_pct(result.expected_share)}"]
    failures = [c for c in result.cases if c.id in result.critical_failures]
    if not failures:
        lines.append(f"critical cases failed: none of {n_critical}")
    for c in failures:
        first = c.top3[0] if not c.tie_at_top else f"{c.top3[0]} (tied at the top: {_pct(c.first_chance)} chance " \
                                                    "of an acceptable one)"
        lines.append(f"critical case failed: {c.id} ({c.title}): first suggestion {first}, "
                     f"guidance accepts {', '.join(c.acceptable_first)} [{c.source}]")
    return "\n".join(lines)


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def _pct(share: float) -> str:
    return f"{100 * share:.1f} %"

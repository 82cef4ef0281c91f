"""``carepath prepare``, ``carepath recommend`` and ``carepath serve``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from serving.db import DEFAULT_DB_URL


def configure_prepare(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Prepare a policy bundle for serving: SHAP background, typical feature values and the "
                          "benefit ensemble (expected PHQ-9 change with an interval), fitted on logged data.")
    parser.add_argument("--policy", required=True, help="policy bundle folder (rewritten in place, atomically)")
    parser.add_argument("--data", required=True, help="logged data (Parquet, offline schema)")
    parser.add_argument("--members", type=int, default=5, help="bootstrap refits in the benefit ensemble")
    parser.add_argument("--horizon", type=int, default=12, help="weeks over which benefit is expected")
    parser.add_argument("--updates", type=int, default=150, help="FQE updates per week of horizon")
    parser.add_argument("--background", type=int, default=16, help="k-means centres in the SHAP background")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run_prepare(args: argparse.Namespace) -> int:
    from offline_data.dataset import load_dataset
    from serving.benefit import BenefitConfig
    from serving.prepare import PrepareConfig, prepare_bundle

    config = PrepareConfig(background_size=args.background, seed=args.seed,
                           benefit=BenefitConfig(members=args.members, horizon_weeks=args.horizon,
                                                 updates_per_iteration=args.updates, seed=args.seed))
    started = time.perf_counter()
    policy = prepare_bundle(args.policy, load_dataset(args.data), config, source=str(args.data),
                            progress=not args.quiet)
    print(f"prepared {policy.name} for serving in {time.perf_counter() - started:.0f} s -> {args.policy}")
    return 0


def configure_recommend(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Ranked next steps for one patient, with expected benefit, uncertainty and the SHAP "
                          "rationale. Decision support only: the clinician decides.")
    parser.add_argument("--policy", required=True, help="prepared policy bundle folder")
    parser.add_argument("--patient", required=True,
                        help="JSON file with the patient's features by name (missing allowed), "
                             "either the features object or {\"features\": {...}}")
    parser.add_argument("--top-k", type=int, default=3, help="how many next steps to show (1-10)")
    parser.add_argument("--no-explain", action="store_true", help="skip the SHAP rationale")
    parser.add_argument("--json", action="store_true", help="print the full answer as JSON (for machines)")


def run_recommend(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from serving.recommender import Recommender
    from serving.schemas import PatientFeatures

    path = Path(args.patient)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such patient file") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if isinstance(raw, dict) and isinstance(raw.get("features"), dict):
        raw = raw["features"]
    try:
        features = PatientFeatures.model_validate(raw).model_dump(exclude_none=True)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'features'}: {e['msg']}" for e in err.errors())
        raise ValueError(f"{path}: {problems}") from None
    recommender = Recommender(args.policy, warm=False)
    answer = recommender.recommend(features, top_k=args.top_k, explain=not args.no_explain)
    if args.json:
        print(answer.model_dump_json(indent=2))
    else:
        print(format_recommendation(answer.model_dump()))
    return 0


def format_recommendation(answer: dict[str, Any]) -> str:
    """The answer as a readable table for a terminal."""
    lines = [f"carepath — {answer['decision_support']}", ""]
    for alert in answer["alerts"]:
        lines.append(f"!! {alert}")
    if answer["alerts"]:
        lines.append("")
    lines.append(f"{'#':>2}  {'next step':<44} {'prob':>5}  expected PHQ-9 change vs continuing")
    for s in answer["suggestions"]:
        b = s["benefit"]
        benefit = (f"{b['phq9_change_vs_continue']:+.1f} [{b['low']:+.1f}, {b['high']:+.1f}] "
                   f"over {b['horizon_weeks']} wk ({100 * b['level']:.0f} %)") if b else "n/a"
        flag = "  CRITICAL" if s["critical"] else ""
        lines.append(f"{s['rank']:>2}  {s['label']:<44} {s['probability']:>5.2f}  {benefit}{flag}")
        if s["rationale"]:
            reasons = ", ".join(f"{c['text']} ({c['shap']:+.2f})" for c in s["rationale"]["contributions"][:3])
            lines.append(f"    why: {reasons}")
    if answer["blocked"]:
        lines += ["", "blocked:"]
        for b in answer["blocked"]:
            lines.append(f"  {b['label']}: {'; '.join(r['description'] for r in b['rules'])}")
    if answer["imputed"]:
        lines += ["", "assumed (not given): " + ", ".join(f"{i['feature']}={i['value']:g}" for i in answer["imputed"])]
    lines += ["", f"policy {answer['policy']['name']} ({answer['policy']['version']})"]
    cert = answer["policy"]["certification"]
    lines += [f"  {cert['statement']}" + (f" [{cert['id']}]" if cert.get("id") else "")]
    if cert.get("first_choice"):
        lines += [f"  First-ranked step alone: {cert['first_choice']}."]
    lines += [f"  {line}" for line in answer["policy"]["evaluation_summary"]]
    lines += ["", answer["uncertainty"]]
    return "\n".join(lines)


def configure_serve(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Serve policies to clinicians: REST API, HL7 CDS Hooks and the clinician page, with an "
                          "audit trail. Requests need a bearer token (carepath tokens create NAME).")
    parser.add_argument("--policy", action="append", required=True,
                        help="prepared policy bundle folder (repeat to serve several; the first is the default)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--db", default=DEFAULT_DB_URL,
                        help=f"audit store, any SQLAlchemy URL (default {DEFAULT_DB_URL}; PostgreSQL: "
                             "postgresql+psycopg://user@host/db)")
    parser.add_argument("--key-file", help="pseudonymisation key file (default: CAREPATH_PSEUDONYM_KEY or a key "
                                           "kept beside a SQLite database)")
    parser.add_argument("--max-body-bytes", type=int, default=64 * 1024, help="larger request bodies get 413")
    parser.add_argument("--rate-limit", type=float, default=20.0,
                        help="requests a second per token on average, beyond which 429 (default 20; 0: off)")
    parser.add_argument("--rate-burst", type=int, default=60, help="requests a token may send at once (default 60)")
    parser.add_argument("--cors-origin", action="append", default=[],
                        help="an origin whose pages may call the API (repeat; default none: CORS closed)")
    parser.add_argument("--allow-uncertified", action="store_true",
                        help="serve a policy without a certificate (carepath certify); every answer then says so")
    parser.add_argument("--workers", type=int, default=None,
                        help="server processes (default: one per core); the rate limit is shared out among them")
    parser.add_argument("--explainer", choices=("deep", "permutation"), default="deep",
                        help="the SHAP rationale: 'deep' (DeepLIFT through the policy network, exact additivity, "
                             "well under 1 ms; default) or 'permutation' (shap's model-agnostic explainer)")


def run_serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from serving.app import ServeSettings, create_app
    from serving.workers import (
        FAILURE_ENV,
        PARENT_ENV,
        SETTINGS_ENV,
        check_workers,
        default_workers,
        per_worker,
        preflight,
        settings_to_env,
    )

    workers = check_workers(args.workers if args.workers is not None else default_workers())
    settings = ServeSettings(policies=args.policy, db_url=args.db, key_file=args.key_file,
                             max_body_bytes=args.max_body_bytes, rate_limit=args.rate_limit,
                             rate_burst=args.rate_burst, cors_origins=tuple(args.cors_origin),
                             allow_uncertified=args.allow_uncertified, warm_explainers="background",
                             explainer=args.explainer)
    started = time.perf_counter()
    # no "server: uvicorn" header: it tells an attacker which parser to aim at
    options: dict[str, Any] = {"host": args.host, "port": args.port, "log_level": "info", "access_log": True,
                               "server_header": False}
    if workers == 1:
        # small MLPs on one row gain nothing from intra-op threads, and they fight the server's own threads
        torch.set_num_threads(1)
        app = create_app(settings)
        warming = " warming in the background" if args.explainer == "permutation" else ""
        print(f"carepath: {len(args.policy)} policy(ies) loaded in {time.perf_counter() - started:.1f} s "
              f"({args.explainer} SHAP explainers{warming}); serving http://{args.host}:{args.port}/ "
              f"(decision support only)", file=sys.stderr, flush=True)
        uvicorn.run(app, workers=1, **options)
        return 0
    preflight(settings)  # one clear line now rather than every worker failing at its start
    os.environ[SETTINGS_ENV] = settings_to_env(per_worker(settings, workers))
    os.environ[PARENT_ENV] = str(os.getpid())
    print(f"carepath: settings checked in {time.perf_counter() - started:.1f} s; starting {workers} workers on "
          f"http://{args.host}:{args.port}/ (decision support only)", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="carepath-serve-") as tmp:
        failure = Path(tmp) / "worker-failure.txt"
        os.environ[FAILURE_ENV] = str(failure)
        uvicorn.run("serving.workers:app_from_env", factory=True, workers=workers, **options)
        if failure.exists():
            print(f"carepath serve: a worker failed to start: {failure.read_text()}", file=sys.stderr)
            return 1
    return 0

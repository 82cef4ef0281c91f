"""``carepath certify``: the gate between training and serving.

Reads a policy bundle and a log of patients the policy was not trained on,
runs the HCPI protocol (:mod:`evaluation.certify.core`) and the guideline
vignettes, and writes a new bundle holding the certificate, the behaviour
model the certified candidate mixes with, and everything the old bundle had.
Nothing is written on any error: the new bundle is built under a temporary
name and renamed.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from envs.spec import ACTION_NAMES, FEATURE_NAMES, SPEC_VERSION
from evaluation.certify.core import METHODS_HELP, Certificate, CertifyConfig, certify, store_certificate
from offline_data.dataset import LoggedDataset, load_dataset
from offline_data.schema import META_SPEC_VERSION
from policies.base import BoolArray, FloatArray
from policies.bundle import TRAINING_PATIENTS_FILE, BundlePolicy, load, patient_hashes

EPILOG = """\
examples:
  carepath certify --policy runs/cql/seed0/policy --data data/heldout.parquet --out runs/cql/seed0/certified
  carepath certify --policy P --data LOG --out P2 --confidence 0.9 --split 0.5 --method bernstein

The log must hold patients the policy never trained on: a bundle made by train.py records its
training patients and certification refuses any of them (or drops them with
--exclude-training-patients, and says so).
"""


class NetworkPolicy:
    """A bundle's trained network alone (a certified bundle otherwise serves its mix with current care)."""

    def __init__(self, bundle: BundlePolicy) -> None:
        self.bundle = bundle
        self.name = bundle.name

    def action_probs(self, obs: NDArray[np.floating], mask: BoolArray) -> FloatArray:
        return self.bundle.network_probs(obs, mask)


def configure_certify(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Certify a policy against current care from logged data alone (high-confidence policy "
                          "improvement with candidates that stay near current care), check it on the guideline "
                          "vignettes, and write a certified bundle. Decision support: a certificate is a "
                          "statement about logged patients like these, not a guarantee for one patient.")
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--policy", required=True, type=Path, metavar="BUNDLE", help="the trained policy bundle")
    parser.add_argument("--data", type=Path, metavar="LOG",
                        help="logged care (Parquet or CSV) of patients the policy was not trained on")
    parser.add_argument("--out", type=Path, metavar="DIR", help="where to write the certified bundle")
    parser.add_argument("--show", action="store_true",
                        help="print the certificate the bundle already holds (no --data or --out) and exit")
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence of the certificate (default 0.95)")
    parser.add_argument("--split", type=float, default=0.5,
                        help="share of the patients that choose the candidate; the rest test it (default 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split by patient (default 0)")
    parser.add_argument("--method", choices=["t", "bernstein"], default="t", help=METHODS_HELP)
    parser.add_argument("--exclude-training-patients", action="store_true",
                        help="drop the log's patients that trained the policy instead of refusing the log")
    parser.add_argument("--no-vignettes", action="store_true",
                        help="skip the guideline vignettes (a critical vignette failure otherwise blocks the "
                             "certificate)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--json", action="store_true", help="print the certificate as JSON")


def run_certify(args: argparse.Namespace) -> int:
    if args.show:
        return show_certificate(args.policy, as_json=args.json)
    missing = [flag for flag, value in (("--data", args.data), ("--out", args.out)) if value is None]
    if missing:
        raise ValueError(f"carepath certify needs {' and '.join(missing)} (or --show to print a bundle's certificate)")
    config = CertifyConfig(confidence=args.confidence, split=args.split, seed=args.seed, method=args.method)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"--out {out} already exists (pass --overwrite to replace it)")
    bundle = load(args.policy)
    dataset = load_dataset(args.data)
    check_agree(bundle, dataset, args.policy, args.data)
    dataset, dropped = _without_training_patients(bundle, dataset, args.exclude_training_patients, args.data)
    vignettes = None if args.no_vignettes else vignette_check()
    result = certify(NetworkPolicy(bundle), dataset, None, config, critical_vignettes=vignettes,
                     progress=lambda line: print(line, file=sys.stderr, flush=True))  # stdout: the result
    cert = result.certificate
    record = {**cert.as_dict(), "data": str(args.data), "training_patients_dropped": dropped}
    same = out.resolve() == Path(args.policy).resolve()
    store_certificate(args.policy, result, record, out=None if same else out)
    if args.json:
        print(json.dumps(record, indent=2, default=str))
    else:
        print(format_certificate(cert, dropped))
        print(f"wrote {out}")
    return 0


def show_certificate(bundle_path: Path, as_json: bool = False) -> int:
    """Print the certificate a bundle holds; exit status 1 when it holds none."""
    record = load(bundle_path).certificate
    if not record:
        print(f"{bundle_path}: no certificate (carepath certify --policy {bundle_path} --data LOG --out DIR "
              "writes one)")
        return 1
    if as_json:
        print(json.dumps(record, indent=2, default=str))
        return 0
    known = {f.name for f in fields(Certificate)}
    print(format_certificate(Certificate(**{k: v for k, v in record.items() if k in known}),
                             int(record.get("training_patients_dropped", 0) or 0)))
    print(f"logged data: {record.get('data', 'unknown')} (sha256 {str(record.get('data_sha256', ''))[:12]}...)")
    return 0


def check_agree(bundle: BundlePolicy, dataset: LoggedDataset, bundle_path: Path, data_path: Path) -> None:
    """Bundle and log describe the same features, actions and spec version, or an error names what differs."""
    problems = []
    log_spec = dataset.metadata.get(META_SPEC_VERSION, SPEC_VERSION)
    if bundle.manifest.spec_version != log_spec:
        problems.append(f"spec version (bundle {bundle.manifest.spec_version}, log {log_spec})")
    if bundle.manifest.feature_names != list(FEATURE_NAMES) or dataset.frame.obs.shape[1] != len(FEATURE_NAMES):
        problems.append("feature names")
    if bundle.manifest.action_names != list(ACTION_NAMES):
        problems.append("action set")
    if problems:
        raise ValueError(f"policy {bundle_path} and log {data_path} disagree on {', '.join(problems)}")


def _without_training_patients(bundle: BundlePolicy, dataset: LoggedDataset, exclude: bool,
                               data_path: Path) -> tuple[LoggedDataset, int]:
    if TRAINING_PATIENTS_FILE not in bundle.manifest.files:
        return dataset, 0
    trained = set(bundle.extra_tensors(TRAINING_PATIENTS_FILE)["hash"].numpy().tolist())
    ids = dataset.patient_ids()
    overlap = np.array([h in trained for h in patient_hashes(ids).tolist()], dtype=bool)
    if not overlap.any():
        return dataset, 0
    if not exclude:
        raise ValueError(f"{int(overlap.sum()):,} of the {len(ids):,} patients in {data_path} trained the policy: "
                         "certify on patients it never saw (or pass --exclude-training-patients to drop them)")
    return dataset.select_patients(ids[~overlap], f"{dataset.source} without training patients"), int(overlap.sum())


def vignette_check() -> Any:
    from evaluation.vignettes import load_cases, score

    cases = load_cases()

    def check(policy: Any) -> dict[str, Any]:
        result = score(policy, cases)
        return {"first_share": result.first_share, "top3_share": result.top3_share,
                "critical_failures": result.critical_failures}

    return check


def format_certificate(cert: Certificate, dropped: int = 0) -> str:
    weights = ("doubly robust, weights uncapped" if cert.candidate.get("estimator") == "dr"
               else f"weights truncated at {cert.candidate['truncation']:g}")
    lines = [cert.summary(), "",
             f"certificate {cert.id}",
             f"  candidate           {cert.candidate['description']} ({weights}; "
             f"effective sample size {cert.candidate['ess']:.0f})",
             f"  remission           {cert.improvement:+.2f} pp over current care "
             f"({cert.behaviour_value['remission']:.1f} %), lower bound {cert.lower_bound:+.2f} pp",
             f"  reward              {cert.reward_improvement:+.3f}, lower bound {cert.reward_lower_bound:+.3f}",
             f"  first choice only   {cert.first_choice['statement']}",
             f"  episodes            {cert.episodes['candidate']:,} chose the candidate, "
             f"{cert.episodes['safety']:,} tested it",
             f"  method              {cert.method}",
             f"  estimator           {cert.estimator}"]
    if cert.vignettes:
        lines.append(f"  vignettes           first suggestion acceptable {100 * cert.vignettes['first_share']:.0f} %, "
                     f"within top 3 {100 * cert.vignettes['top3_share']:.0f} %; critical failures: "
                     f"{', '.join(cert.vignettes['critical_failures']) or 'none'}")
    if cert.subgroups:
        lines.append("  subgroups           (descriptive, each at the stated confidence, no multiplicity correction)")
        for g in cert.subgroups:
            lines.append(f"    {g['feature']} = {g['value']:g}: {g['improvement']:+.1f} pp, lower bound "
                         f"{g['lower_bound']:+.1f} pp ({g['episodes']:,} patients)")
    if dropped:
        lines.append(f"  dropped             {dropped:,} patients of the log who trained the policy")
    for reason in cert.reasons:
        lines.append(f"  not certified:      {reason}")
    return "\n".join(lines)

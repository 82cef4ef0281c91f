"""Does certification keep its promise? Scored against the simulator's ground truth.

Over ``--logs`` logs of ``--patients`` patients each (STAR*D-style care with
10 % exploration, a new seed per log), every target policy is certified
(:func:`evaluation.certify.certify`, 95 % by default). A *violation* is a
certificate whose chosen candidate truly does worse than current care in
remission (simulator rollout of that candidate). The promise at 95 %
confidence: violations in at most 5 % of all logs; the violation rate is
reported with its Clopper-Pearson interval.

Targets:

- ``current care`` itself (a "trained" policy equal to the logging policy):
  every candidate equals current care, the true improvement is exactly 0, so any
  certificate is a violation. The strictest check of the bound.
- ``stard greedy`` (STAR*D-style care without exploration): a little better.
- each ``--bundle`` (a trained policy, e.g. ``runs/cql/seed0/policy``).

Also: the trade-off curve on the first log (every candidate of the grid: its
predicted bound on the selection half, its bound on the safety half, its true
improvement) and, with ``--default-size N``, one certificate per target on a
log of N patients (the default data size is 50,000) with its subgroups.

    python benchmarks/certify.py --logs 100 --patients 3000 --bundle runs/cql/seed0/policy --default-size 50000

Prints a table and writes ``benchmarks/results/certify.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from tqdm import tqdm

from evaluation.certify import Certificate, CertifyConfig, certify
from evaluation.certify.bounds import selection_score
from evaluation.certify.cli import NetworkPolicy
from evaluation.certify.core import LoggedPart, candidate_differences, remission_bound, trajectory_weights
from evaluation.certify.doubly_robust import OutcomeModel
from evaluation.ground_truth import rollout
from offline_data.dataset import LoggedDataset, load_dataset, split_by_patient
from offline_data.generate import generate
from policies import load, make_baseline
from policies.base import Policy
from policies.candidates import Candidate, CandidatePolicy, candidate_from_record, candidate_grid

RESULTS = Path(__file__).resolve().parent / "results"
BEHAVIOUR = ("stard", 0.1)


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    alpha = 1.0 - level
    low = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


class Truth:
    """True remission of candidate policies (cached: truncation does not change the policy)."""

    def __init__(self, patients: int, seed: int) -> None:
        self.patients, self.seed = patients, seed
        self.cache: dict[tuple[str, str, float, float, int], float] = {}
        self.behaviour = rollout(make_baseline(*BEHAVIOUR), patients, seed=seed).remission.value

    def improvement(self, name: str, policy: Policy, candidate: Candidate) -> float:
        key = (name, candidate.family, candidate.weight, candidate.threshold, candidate.weeks)
        if key not in self.cache:
            served = CandidatePolicy(policy, make_baseline(*BEHAVIOUR), candidate)
            self.cache[key] = rollout(served, self.patients, seed=self.seed).remission.value - self.behaviour
        return self.cache[key]


def certify_and_score(name: str, policy: Policy, data: LoggedDataset, config: CertifyConfig,
                      truth: Truth) -> tuple[Certificate, Candidate, float]:
    """The certificate on this log, its chosen candidate and that candidate's true gain (pp)."""
    cert = certify(policy, data, make_baseline(*BEHAVIOUR), config).certificate
    chosen = candidate_from_record(cert.candidate)
    return cert, chosen, 100 * truth.improvement(name, policy, chosen)


def trade_off(name: str, policy: Policy, data: LoggedDataset, config: CertifyConfig, truth: Truth) -> list[dict]:
    """Every candidate of the grid on one log: predicted bound, safety bound, true improvement (pp)."""
    parts = split_by_patient(data, {"candidate": config.split, "safety": 1 - config.split}, seed=config.seed)
    behaviour = make_baseline(*BEHAVIOUR)
    choose, test = LoggedPart(parts["candidate"], policy, behaviour), LoggedPart(parts["safety"], policy, behaviour)
    level = config.confidence
    outcome = OutcomeModel(choose.episodes, choose.remission, seed=config.seed)
    q_choose, q_test = outcome.predict_all(choose.episodes), outcome.predict_all(test.episodes)
    rows = []
    for c in candidate_grid(config.weights, config.thresholds, (20.0,), doubly_robust=True,
                            prefix_weeks=config.prefix_weeks):
        d_choose, _ = candidate_differences(c, choose, q_choose)
        predicted = selection_score(d_choose, level, len(test)).predicted_bound
        p_test = test.probs(c)
        safety = remission_bound(test, p_test, trajectory_weights(p_test, test.episodes), c, q_test, config.method,
                                 level)
        rows.append({"target": name, **c.as_dict(), "description": f"{c.describe()} [{c.estimator}]",
                     "predicted_lower_bound_pp": 100 * predicted,
                     "safety_lower_bound_pp": 100 * safety.lower_bound,
                     "safety_estimate_pp": 100 * safety.improvement,
                     "true_improvement_pp": 100 * truth.improvement(name, policy, c)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logs", type=int, default=100)
    parser.add_argument("--patients", type=int, default=3000, help="patients per log")
    parser.add_argument("--bundle", type=Path, action="append", default=[], help="a trained policy to certify")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--method", choices=["t", "bernstein"], default="t")
    parser.add_argument("--truth-patients", type=int, default=40_000)
    parser.add_argument("--default-size", type=int, default=0, help="also certify on one log of this many patients")
    parser.add_argument("--out", type=Path, default=RESULTS / "certify.json")
    args = parser.parse_args(argv)

    targets: dict[str, Policy] = {"current care": make_baseline(*BEHAVIOUR), "stard greedy": make_baseline("stard")}
    for path in args.bundle:
        targets[f"bundle {path}"] = NetworkPolicy(load(path))  # its network, not a certified mix
    config = CertifyConfig(confidence=args.confidence, method=args.method)
    truth = Truth(args.truth_patients, seed=777)
    started = time.perf_counter()
    per_log: list[dict[str, Any]] = []
    curve: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in tqdm(range(args.logs), desc="logs", unit="log"):
            path = Path(tmp) / f"log{i}.parquet"
            generate(path, policy=BEHAVIOUR[0], epsilon=BEHAVIOUR[1], patients=args.patients, seed=10_000 + i)
            data = load_dataset(path)
            for name, policy in targets.items():
                cert, chosen, true = certify_and_score(name, policy, data, config, truth)
                per_log.append({"log": i, "target": name, "certified": cert.certified,
                                "lower_bound_pp": cert.lower_bound, "estimate_pp": cert.improvement,
                                "true_improvement_pp": true, "candidate": chosen.describe(),
                                "violation": bool(cert.certified and true <= 0)})
            if i == 0:
                for name, policy in targets.items():
                    curve += trade_off(name, policy, data, config, truth)
            path.unlink()
        default_size = []
        if args.default_size:
            path = Path(tmp) / "default.parquet"
            generate(path, policy=BEHAVIOUR[0], epsilon=BEHAVIOUR[1], patients=args.default_size, seed=99_999)
            data = load_dataset(path)
            for name, policy in targets.items():
                cert, chosen, true = certify_and_score(name, policy, data, config, truth)
                default_size.append({"target": name, "patients": args.default_size, "certified": cert.certified,
                                     "lower_bound_pp": cert.lower_bound, "estimate_pp": cert.improvement,
                                     "true_improvement_pp": true,
                                     "true_relative_gain": true / (100 * truth.behaviour),
                                     "candidate": chosen.describe(), "subgroups": cert.subgroups})

    summary = []
    for name in targets:
        rows = [r for r in per_log if r["target"] == name]
        k = sum(r["violation"] for r in rows)
        low, high = clopper_pearson(k, len(rows))
        summary.append({"target": name, "logs": len(rows), "certified": sum(r["certified"] for r in rows),
                        "violations": k, "violation_rate": k / len(rows), "violation_ci95": [low, high],
                        "mean_lower_bound_pp": float(np.mean([r["lower_bound_pp"] for r in rows])),
                        "mean_true_improvement_pp": float(np.mean([r["true_improvement_pp"] for r in rows]))})
    result = {"logs": args.logs, "patients_per_log": args.patients, "confidence": args.confidence,
              "method": args.method, "behaviour": f"{BEHAVIOUR[0]} epsilon {BEHAVIOUR[1]}",
              "behaviour_true_remission": truth.behaviour, "wall_s": round(time.perf_counter() - started, 1),
              "summary": summary, "trade_off_first_log": curve, "default_size": default_size, "per_log": per_log}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(f".{args.out.name}.tmp")
    tmp_out.write_text(json.dumps(result, indent=2))
    tmp_out.replace(args.out)

    print(f"{args.logs} logs x {args.patients:,} patients, behaviour {result['behaviour']} "
          f"(true remission {100 * truth.behaviour:.1f} %), {args.confidence:.0%} {args.method} bound")
    print(f"{'target':<40} {'certified':>9} {'violations':>10} {'rate [95 % CI]':>22} {'mean bound':>11} "
          f"{'mean truth':>11}")
    for s in summary:
        print(f"{s['target'][:40]:<40} {s['certified']:>9} {s['violations']:>10} "
              f"{100 * s['violation_rate']:>6.1f} % [{100 * s['violation_ci95'][0]:.1f}, "
              f"{100 * s['violation_ci95'][1]:.1f}] {s['mean_lower_bound_pp']:>+10.2f} "
              f"{s['mean_true_improvement_pp']:>+10.2f}")
    print("\ntrade-off on the first log (pp of remission):")
    print(f"{'target':<28} {'candidate':<64} {'predicted':>9} {'bound':>7} {'truth':>7}")
    for r in curve:
        print(f"{r['target'][:28]:<28} {r['description'][-64:]:<64} {r['predicted_lower_bound_pp']:>+9.2f} "
              f"{r['safety_lower_bound_pp']:>+7.2f} {r['true_improvement_pp']:>+7.2f}")
    for d in default_size:
        print(f"\n{d['patients']:,} patients, {d['target']}: certified {d['certified']}, bound "
              f"{d['lower_bound_pp']:+.2f} pp, true {d['true_improvement_pp']:+.2f} pp "
              f"({100 * d['true_relative_gain']:+.1f} % relative), {d['candidate']}")
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()

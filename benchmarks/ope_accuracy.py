"""Accuracy of the off-policy estimators against simulator ground truth, over repeated datasets.

For each of ``--repeats`` datasets of ``--patients`` patients logged under
STAR*D with epsilon 0.1, every estimator evaluates every member of the policy
zoo (``evaluation.zoo``); each member's truth is a large simulator rollout. Per
estimator it reports, over all (dataset, candidate) pairs: median absolute
relative error, how often the 95 % interval covers the truth, the median
Spearman correlation between estimates and truths across the zoo, and
regret@1 (normalised). Targets for the best estimator: error <= 10 %,
coverage 90-98 %, Spearman >= 0.8.

The same figures are also given over the *supported* estimates only: those
where the log overlaps the candidate enough for the estimators to trust
themselves (WIS's effective sample size raises no warning: at least 30 and at
least 1 % of the episodes). Every estimate carries that warning for the
reader; a candidate the epsilon-0.1 log barely visits (a uniformly random
policy, for one) is flagged rather than scored as if it were known, and the
table says how many were.

FQE and the doubly robust estimators that use it train one Q-model per
(dataset, candidate), so they run on the first ``--model-repeats`` datasets only.

Prints one table and writes ``benchmarks/results/ope_accuracy.json``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from evaluation.ground_truth import rollout
from evaluation.ope import (
    estimate_all,
    regret_at_k,
    spearman,
    target_probabilities,
)
from evaluation.zoo import policy_zoo
from offline_data.dataset import load_dataset
from offline_data.generate import generate

RESULTS = Path(__file__).resolve().parent / "results"
IS_ESTIMATORS = ("is", "wis", "pdis", "wpdis")
Triple = tuple[float, float | None, float | None]  # value, low, high (no interval: None)


def model_estimates(episodes: Any, policy: Any, seed: int, n_boot: int, level: float,
                    fqe_updates: int | None) -> dict[str, Triple]:
    """FQE, DR and WDR for one candidate, as ``carepath evaluate`` computes them: one FQE fit feeds
    both doubly robust estimators, and FQE's own interval ignores the Q-model's error."""
    from evaluation.compare import compare_policies
    from evaluation.ope.fqe import FQEConfig

    options: dict[str, Any] = {"seed": seed, "device": "cpu"}
    if fqe_updates is not None:
        options["updates_per_iteration"] = fqe_updates
    result = compare_policies(episodes, {"candidate": policy}, estimators=("dr", "wdr", "fqe"), level=level,
                              n_boot=n_boot, seed=seed, fqe_config=FQEConfig(**options), fairness=False,
                              progress=False)
    return {name: (est.value, est.low, est.high) for name, est in result.policy("candidate").estimates.items()}


def score(mine: list[dict[str, Any]]) -> dict[str, Any]:
    """Error, coverage, rank correlation and regret of one estimator's rows (Spearman and regret per
    dataset over the candidates present, when at least three are)."""
    finite = [r for r in mine if np.isfinite(r["value"])]
    rel = [abs(r["value"] - r["truth"]) / abs(r["truth"]) for r in finite]
    covered = [r["low"] is not None and r["high"] is not None and r["low"] <= r["truth"] <= r["high"]
               for r in finite]
    spearmans, regrets = [], []
    for rep in sorted({r["repeat"] for r in mine}):
        these = [r for r in finite if r["repeat"] == rep]
        if len(these) >= 3:
            values, true_values = [r["value"] for r in these], [r["truth"] for r in these]
            spearmans.append(spearman(values, true_values))
            regrets.append(regret_at_k(values, true_values, k=1, normalise=True))
    return {
        "datasets": len({r["repeat"] for r in mine}), "estimates": len(mine),
        "unidentifiable": len(mine) - len(finite),
        "median_abs_rel_error": float(np.median(rel)) if rel else float("nan"),
        "coverage": float(np.mean(covered)) if covered else float("nan"),
        "median_spearman": float(np.median(spearmans)) if spearmans else float("nan"),
        "median_regret_at_1": float(np.median(regrets)) if regrets else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--model-repeats", type=int, default=3, help="datasets on which FQE/DR/WDR run (0: none)")
    parser.add_argument("--patients", type=int, default=5000)
    parser.add_argument("--truth-patients", type=int, default=20000)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--level", type=float, default=0.95)
    parser.add_argument("--fqe-updates", type=int, default=None, help="FQE updates per iteration (default: FQE's)")
    parser.add_argument("--out", type=Path, default=RESULTS / "ope_accuracy.json")
    args = parser.parse_args()

    started = time.perf_counter()
    zoo = policy_zoo()
    names = [p.name for p in zoo]
    truths = {}
    for policy in tqdm(zoo, desc="ground truth", unit="policy"):
        truths[policy.name] = rollout(policy, args.truth_patients, seed=10_000).value
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in tqdm(range(args.repeats), desc="datasets", unit="dataset"):
            path = Path(tmp) / f"log{rep}.parquet"
            generate(path, policy="stard", epsilon=0.1, patients=args.patients, seed=rep, include_true_phq9=False)
            data = load_dataset(path)
            episodes = data.episodes()
            path.unlink()
            for policy in zoo:
                probs = target_probabilities(policy, episodes)
                is_estimates = estimate_all(episodes, probs, names=IS_ESTIMATORS, interval="bootstrap",
                                            level=args.level, n_boot=args.n_boot, seed=rep)
                found: dict[str, Triple] = {name: (e.value, e.low, e.high) for name, e in is_estimates.items()}
                # supported: the log overlaps the candidate enough for the weights to be trusted
                wis = is_estimates["wis"]
                supported = wis.identifiable and not any("effective sample size" in w for w in wis.warnings)
                if rep < args.model_repeats:
                    found |= model_estimates(episodes, policy, rep, args.n_boot, args.level, args.fqe_updates)
                for name, (value, low, high) in found.items():
                    rows.append({"repeat": rep, "policy": policy.name, "estimator": name, "value": value,
                                 "low": low, "high": high, "truth": truths[policy.name].value,
                                 "wis_ess": wis.ess, "supported": supported})

    table = {estimator: score([r for r in rows if r["estimator"] == estimator])
             for estimator in dict.fromkeys(r["estimator"] for r in rows)}
    supported_only = {estimator: score([r for r in rows if r["estimator"] == estimator and r["supported"]])
                 for estimator in table}
    for title, scores in (("all estimates", table), ("supported estimates only (WIS ESS without warning)",
                                                     supported_only)):
        print(f"\n{title}")
        print(f"{'estimator':10s} {'datasets':>8s} {'estimates':>9s} {'MARE':>7s} {'coverage':>9s} {'Spearman':>9s} "
              f"{'regret@1':>9s}")
        for name, t in scores.items():
            print(f"{name:10s} {t['datasets']:8d} {t['estimates']:9d} {100 * t['median_abs_rel_error']:6.1f}% "
                  f"{100 * t['coverage']:8.1f}% {t['median_spearman']:9.2f} {t['median_regret_at_1']:9.3f}")
    flagged = sorted({r["policy"] for r in rows if not r["supported"]})
    print(f"\nflagged as weakly supported in at least one dataset: {', '.join(flagged) or 'none'}")
    result = {"setting": vars(args) | {"out": str(args.out)}, "zoo": names,
              "truth": {n: truths[n].__dict__ for n in names}, "estimators": table,
              "estimators_supported_only": supported_only, "rows": rows,
              "wall_s": round(time.perf_counter() - started, 1)}
    from evaluation.cli import write_json_atomic  # atomic: never a half-written result

    write_json_atomic(args.out, result)
    print(f"wrote {args.out} ({result['wall_s']} s)")


if __name__ == "__main__":
    main()

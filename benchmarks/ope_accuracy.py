"""Accuracy of the off-policy estimators against simulator ground truth, over repeated datasets.

For each of ``--repeats`` datasets of ``--patients`` patients logged under
STAR*D with epsilon 0.1, every estimator evaluates every member of each zoo
(``evaluation.zoo``); each member's truth is a large simulator rollout. Per
zoo and estimator it reports, over all (dataset, candidate) pairs: median
absolute relative error, how often the 95 % interval covers the truth, the
median Spearman correlation between estimates and truths across the zoo, and
regret@1 (normalised). Targets for the best estimator, on the identifiable
zoo: error <= 10 %, coverage 90-98 %, Spearman >= 0.8.

The stress zoo holds candidates the log barely visits (a uniformly random
policy, for one). There the figures are also given over the *supported*
estimates only: those where the log overlaps the candidate enough for the
estimators to trust themselves (WIS's effective sample size raises no
warning: at least 30 and at least 1 % of the episodes). Every estimate carries
that warning for the reader; the table says how many were flagged.

FQE and the doubly robust estimators that use it train one Q-model per
(dataset, candidate), so they run on the first ``--model-repeats`` datasets
only, and on the zoos named by ``--model-zoos``. ``--fqe-refits N`` adds
``fqe_refit``: FQE with the interval from N refits on bootstrap resamples of
patients, which carries model error (N more fits per candidate).

Prints one table and writes ``benchmarks/results/ope_accuracy.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from evaluation.ground_truth import Interval, rollout
from evaluation.ope import (
    estimate_all,
    refit_interval,
    regret_at_k,
    spearman,
    target_probabilities,
)
from evaluation.zoo import ZOOS
from offline_data.dataset import load_dataset
from offline_data.generate import generate

RESULTS = Path(__file__).resolve().parent / "results"
IS_ESTIMATORS = ("is", "wis", "pdis", "wpdis")
Triple = tuple[float, float | None, float | None]  # value, low, high (no interval: None)


def model_estimates(episodes: Any, policy: Any, seed: int, n_boot: int, level: float,
                    fqe_updates: int | None, fqe_refits: int) -> dict[str, Triple]:
    """FQE, DR and WDR for one candidate, as ``carepath evaluate`` computes them: one FQE fit feeds
    both doubly robust estimators; ``fqe`` has the interval that ignores the Q-model's error and, with
    ``fqe_refits``, ``fqe_refit`` the same value with the interval from that many refits."""
    from evaluation.compare import compare_policies
    from evaluation.ope.fqe import FQEConfig, refit_values

    options: dict[str, Any] = {"seed": seed, "device": "cpu"}
    if fqe_updates is not None:
        options["updates_per_iteration"] = fqe_updates
    config = FQEConfig(**options)
    result = compare_policies(episodes, {"candidate": policy}, estimators=("dr", "wdr", "fqe"), level=level,
                              n_boot=n_boot, seed=seed, fqe_config=config, fairness=False, progress=False)
    found = {name: (est.value, est.low, est.high) for name, est in result.policy("candidate").estimates.items()}
    if fqe_refits:
        refits = refit_values(policy, episodes, config, fqe_refits, seed=seed, progress=False)
        value = found["fqe"][0]  # the full-data fit's value; only the interval differs
        interval = refit_interval(value, refits, level)
        found["fqe_refit"] = (value, interval.low, interval.high)
    return found


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
    parser.add_argument("--zoo", choices=[*ZOOS, "both"], default="both", help="which zoo(s) to score")
    parser.add_argument("--model-repeats", type=int, default=3, help="datasets on which FQE/DR/WDR run (0: none)")
    parser.add_argument("--model-zoos", default="identifiable", help="comma list of zoos FQE/DR/WDR run on")
    parser.add_argument("--fqe-refits", type=int, default=0, help="also FQE with an interval from N refits (0: no)")
    parser.add_argument("--patients", type=int, default=5000)
    parser.add_argument("--truth-patients", type=int, default=20000)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--level", type=float, default=0.95)
    parser.add_argument("--fqe-updates", type=int, default=None, help="FQE updates per iteration (default: FQE's)")
    parser.add_argument("--bundle", type=Path, action="append", default=[], metavar="POLICY",
                        help="a trained policy bundle: joins the stress zoo as it is, and the identifiable zoo as "
                             "STAR*D leaning 10 %% towards it (repeatable)")
    parser.add_argument("--truth-json", type=Path, default=None,
                        help="reuse the ground truths of an earlier result of this script (roll out only the others)")
    parser.add_argument("--rescore", type=Path, default=None,
                        help="score the estimates of an earlier result against this run's truths (no estimation)")
    parser.add_argument("--out", type=Path, default=RESULTS / "ope_accuracy.json")
    args = parser.parse_args()
    if args.fqe_refits == 1 or args.fqe_refits < 0:
        parser.error("--fqe-refits must be 0 or at least 2")
    zoo_names = list(ZOOS) if args.zoo == "both" else [args.zoo]
    model_zoos = {z.strip() for z in args.model_zoos.split(",") if z.strip()}
    if unknown := model_zoos - set(ZOOS):
        parser.error(f"--model-zoos: unknown zoo(s) {sorted(unknown)}; expected {sorted(ZOOS)}")

    started = time.perf_counter()
    zoos = {name: ZOOS[name](args.bundle) for name in zoo_names}
    truths = ground_truths(zoos, args)
    rows: list[dict[str, Any]] = []
    if args.rescore is not None:
        rows = [r for r in json.loads(args.rescore.read_text())["rows"] if r["zoo"] in zoos]
        if unknown_policies := sorted({r["policy"] for r in rows} - set(truths)):
            parser.error(f"--rescore {args.rescore}: candidates not in these zoos: {', '.join(unknown_policies)} "
                         "(pass the --bundle options of that run)")
        for r in rows:
            r["truth"] = truths[r["policy"]].value
        zoos = {z: zoo for z, zoo in zoos.items() if any(r["zoo"] == z for r in rows)}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in tqdm(range(0 if args.rescore else args.repeats), desc="datasets", unit="dataset"):
            path = Path(tmp) / f"log{rep}.parquet"
            generate(path, policy="stard", epsilon=0.1, patients=args.patients, seed=rep, include_true_phq9=False)
            episodes = load_dataset(path).episodes()
            path.unlink()
            for zoo_name, zoo in zoos.items():
                for policy in zoo:
                    rows.extend(candidate_rows(episodes, policy, zoo_name, rep, truths[policy.name].value, args,
                                               models=rep < args.model_repeats and zoo_name in model_zoos))

    setting = {k: str(v) if isinstance(v, Path) else [str(b) for b in v] if k == "bundle" else v
               for k, v in vars(args).items()}
    result: dict[str, Any] = {"setting": setting,
                              "zoos": {z: [p.name for p in zoo] for z, zoo in zoos.items()},
                              "truth": {n: t.__dict__ for n, t in truths.items()}, "scores": {}, "rows": rows}
    for zoo_name in zoos:
        mine = [r for r in rows if r["zoo"] == zoo_name]
        estimators = list(dict.fromkeys(r["estimator"] for r in mine))
        table = {e: score([r for r in mine if r["estimator"] == e]) for e in estimators}
        supported = {e: score([r for r in mine if r["estimator"] == e and r["supported"]]) for e in estimators}
        # per candidate: which members an estimator gets wrong (error and coverage only; no ranks in one)
        per_candidate = {e: {p: score([r for r in mine if r["estimator"] == e and r["policy"] == p])
                             for p in dict.fromkeys(r["policy"] for r in mine)} for e in estimators}
        result["scores"][zoo_name] = {"all": table, "supported_only": supported, "per_candidate": per_candidate}
        print_table(f"{zoo_name} zoo: all estimates", table)
        print_table(f"{zoo_name} zoo: supported estimates only (WIS ESS without warning)", supported)
        best = min(table, key=lambda e: table[e]["median_abs_rel_error"])
        print_table(f"{zoo_name} zoo: {best} (lowest error) per candidate", per_candidate[best], first="candidate")
        flagged = sorted({r["policy"] for r in mine if not r["supported"]})
        print(f"{zoo_name} zoo, flagged as weakly supported in at least one dataset: {', '.join(flagged) or 'none'}")
    result["wall_s"] = round(time.perf_counter() - started, 1)
    from evaluation.cli import write_json_atomic  # atomic: never a half-written result

    write_json_atomic(args.out, result)
    print(f"wrote {args.out} ({result['wall_s']} s)")


def ground_truths(zoos: dict[str, list[Any]], args: argparse.Namespace) -> dict[str, Interval]:
    """Every candidate's simulator truth: one rollout per distinct name (the logger is in both zoos).

    With ``--truth-json`` the truths of an earlier run are reused (and its number of patients with
    them); only candidates it lacks are rolled out.
    """
    policies = {p.name: p for zoo in zoos.values() for p in zoo}
    truths: dict[str, Interval] = {}
    if args.truth_json is not None:
        earlier = json.loads(args.truth_json.read_text())
        args.truth_patients = earlier["setting"]["truth_patients"]
        truths = {n: Interval(**earlier["truth"][n]) for n in policies if n in earlier["truth"]}
    missing = [n for n in policies if n not in truths]
    for name in tqdm(missing, desc="ground truth", unit="policy"):
        truths[name] = rollout(policies[name], args.truth_patients, seed=10_000).value
    return truths


def candidate_rows(episodes: Any, policy: Any, zoo: str, rep: int, truth: float, args: argparse.Namespace,
                   models: bool) -> list[dict[str, Any]]:
    """Every estimator's estimate of one candidate on one dataset, as result rows."""
    probs = target_probabilities(policy, episodes)
    is_estimates = estimate_all(episodes, probs, names=IS_ESTIMATORS, interval="bootstrap", level=args.level,
                                n_boot=args.n_boot, seed=rep)
    found: dict[str, Triple] = {name: (e.value, e.low, e.high) for name, e in is_estimates.items()}
    # supported: the log overlaps the candidate enough for the weights to be trusted
    wis = is_estimates["wis"]
    supported = wis.identifiable and not any("effective sample size" in w for w in wis.warnings)
    if models:
        found |= model_estimates(episodes, policy, rep, args.n_boot, args.level, args.fqe_updates, args.fqe_refits)
    return [{"zoo": zoo, "repeat": rep, "policy": policy.name, "estimator": name, "value": value, "low": low,
             "high": high, "truth": truth, "wis_ess": wis.ess, "supported": supported}
            for name, (value, low, high) in found.items()]


def print_table(title: str, scores: dict[str, dict[str, Any]], first: str = "estimator") -> None:
    width = max(10, *(len(name) for name in scores))
    print(f"\n{title}")
    print(f"{first:{width}s} {'datasets':>8s} {'estimates':>9s} {'MARE':>7s} {'coverage':>9s} {'Spearman':>9s} "
          f"{'regret@1':>9s}")
    for name, t in scores.items():
        print(f"{name:{width}s} {t['datasets']:8d} {t['estimates']:9d} {100 * t['median_abs_rel_error']:6.1f}% "
              f"{100 * t['coverage']:8.1f}% {t['median_spearman']:9.2f} {t['median_regret_at_1']:9.3f}")


if __name__ == "__main__":
    main()

"""Offline training throughput and the wall time of the default training run.

Prints and writes ``benchmarks/results/train_throughput.json``:

- gradient updates per second of every offline agent in the registry (batch 256,
  two hidden layers of 256, our 31 observation features, 10 actions), through the
  agents' own ``fit`` loop, on the CPU and on CUDA when there is one;
- the same figure for a minimal hand-written torch loop of the discrete CQL update,
  measured side by side in this run: the ratio says how much our framework costs
  (target: discrete CQL >= 200 updates/s on a 2-core CPU, i.e. a ratio near 1);
- a seed sweep trained as one stacked model (``hydra/launcher=batched``,
  :class:`agents.offline.batched.BatchedQLearning`): aggregate updates per second
  of ``--members`` CQL members batched against the same members run as single
  agents, side by side in this run (issue target: >= 3x on 2 CPU cores, >= 20x
  on an H200 at 64 members against one single CUDA run);
- wall time of ``python train.py`` with no overrides, from a cold data cache;
- with ``--sweep-fraction F``, the wall time of the whole sweep ``train.py -m
  agent=cql seed=0..members-1 train_fraction=F`` under the default (joblib)
  launcher and under ``hydra/launcher=batched`` (training, evaluation,
  certification and serving preparation of every member), and with
  ``--sequential`` as single ``python train.py`` runs one after another;
- the ceiling of the batched ratio: one CQL update's matrix-product FLOPs
  (torch's FlopCounterMode), the GFLOP/s single runs reach, and the device's
  measured matrix-multiply peak at the update's shapes (on a CPU, stacked
  members do the same FLOPs, so peak / single bounds the ratio).

Each rate is the best of several repeats: the machine is noisy and the best
repeat is the one least disturbed by other work.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents import available, entry, make_agent
from agents.common.replay import TensorReplay
from envs.spec import N_ACTIONS, N_FEATURES

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 256
HIDDEN = (256, 256)


def synthetic_replay(n: int, device: str, seed: int = 0) -> TensorReplay:
    """Transitions with the real shapes; content does not change the cost of an update."""
    rng = np.random.default_rng(seed)
    masks = rng.random((n, N_ACTIONS)) < 0.8
    masks[:, 0] = True  # "continue" is allowed almost everywhere in the real data
    actions = np.array([rng.choice(np.flatnonzero(m)) for m in masks[:2048]])
    actions = np.resize(actions, n)
    masks = np.resize(masks[:2048], (n, N_ACTIONS))
    return TensorReplay(
        obs=rng.normal(size=(n, N_FEATURES)).astype(np.float32), actions=actions,
        rewards=rng.normal(0.2, 0.3, n).astype(np.float32),
        next_obs=rng.normal(size=(n, N_FEATURES)).astype(np.float32),
        dones=rng.random(n) < 0.05, masks=masks, next_masks=np.roll(masks, 1, axis=0), device=device, seed=seed)


def best_rate(work: Callable[[int], None], updates: int, repeats: int) -> float:
    """Updates per second of the fastest of ``repeats`` timed runs of ``updates`` updates."""
    work(min(50, updates))  # warm-up: allocator, autograd graph caches, CUDA context
    best = 0.0
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        work(updates)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = max(best, updates / (time.perf_counter() - started))
    return best


def agent_rate(name: str, replay: TensorReplay, device: str, updates: int, repeats: int) -> float:
    agent = make_agent(name, {"batch_size": BATCH, "hidden": list(HIDDEN), "device": device})

    def work(k: int) -> None:
        agent.fit(replay, n_updates=agent.updates_done + k, progress=False)

    return best_rate(work, updates, repeats)


def minimal_cql_rate(replay: TensorReplay, device: str, updates: int, repeats: int, alpha: float = 0.02) -> float:
    """The discrete CQL update written as plainly as torch allows: the reference point."""
    torch.manual_seed(0)

    def mlp() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(N_FEATURES, HIDDEN[0]), torch.nn.ReLU(),
                                   torch.nn.Linear(HIDDEN[0], HIDDEN[1]), torch.nn.ReLU(),
                                   torch.nn.Linear(HIDDEN[1], N_ACTIONS)).to(device)

    q_net, target = mlp(), mlp()
    target.load_state_dict(q_net.state_dict())
    optimizer = torch.optim.Adam(q_net.parameters(), lr=3e-4)
    steps = [0]

    # the plain way: one contiguous tensor per field, one gather each
    data = [t.contiguous().clone() for t in (replay.obs, replay.actions, replay.rewards, replay.next_obs,
                                             replay.dones, replay.masks, replay.next_masks)]

    def work(k: int) -> None:
        for _ in range(k):
            idx = torch.randint(replay.n, (BATCH,), device=replay.device)
            obs, act, rew, nxt, done, mask, nmask = (t[idx] for t in data)
            with torch.no_grad():
                a_next = q_net(nxt).masked_fill(~nmask, float("-inf")).argmax(1, keepdim=True)
                y = rew + 0.99 * (1 - done) * target(nxt).gather(1, a_next).squeeze(1)
            q = q_net(obs)
            q_taken = q.gather(1, act[:, None]).squeeze(1)
            penalty = torch.logsumexp(q.masked_fill(~mask, float("-inf")), 1) - q_taken
            loss = torch.nn.functional.smooth_l1_loss(q_taken, y) + alpha * penalty.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps[0] += 1
            if steps[0] % 500 == 0:
                target.load_state_dict(q_net.state_dict())

    return best_rate(work, updates, repeats)


def batched_rates(replay: TensorReplay, device: str, members: int, updates: int, repeats: int) -> dict[str, float]:
    """Aggregate member-updates per second: ``members`` CQL agents stepped one after another (what
    single runs do on one device), and the same members as one stacked model."""
    from agents.offline.batched import BatchedQLearning

    options = {"batch_size": BATCH, "hidden": list(HIDDEN), "device": device}
    singles = [make_agent("cql", {**options, "seed": seed}) for seed in range(members)]

    def one_by_one(k: int) -> None:
        for agent in singles:
            agent.fit(replay, n_updates=agent.updates_done + k, progress=False)

    group = BatchedQLearning([make_agent("cql", {**options, "seed": seed}) for seed in range(members)], replay)

    def stacked(k: int) -> None:
        group.fit(group.updates_done + k, progress=False)

    single_rate = best_rate(one_by_one, max(1, updates // members), repeats) * members
    batched_rate = best_rate(stacked, max(1, updates // members), repeats) * members
    return {"members": members, "single_runs": round(single_rate, 1), "batched": round(batched_rate, 1),
            "ratio": round(batched_rate / single_rate, 2)}


def compute_ceiling(replay: TensorReplay, device: str, single_rate: float, members: int) -> dict[str, float]:
    """How far stacking can lift the aggregate rate on this device: the matrix-product FLOPs of one
    CQL update (counted by torch's FlopCounterMode, as the agent runs it), the rate single runs
    reach in them, and this device's measured matrix-multiply peak at the update's hidden layer,
    one member's product and ``members`` stacked. Stacked members do the same FLOPs, so on a CPU
    peak / single rate bounds the batched ratio. On a GPU it is an estimate: other shapes
    (or a larger stack) may run faster than those measured."""
    from torch.utils.flop_counter import FlopCounterMode

    agent = make_agent("cql", {"batch_size": BATCH, "hidden": list(HIDDEN), "device": device})
    agent.fit(replay, n_updates=1, progress=False)  # built and warmed
    with FlopCounterMode(display=False) as counter:
        agent.fit(replay, n_updates=agent.updates_done + 1, progress=False)
    flops = counter.get_total_flops()
    peak = 0.0
    for stack in (1, members):
        a = torch.randn(stack, BATCH, HIDDEN[0], device=device)
        b = torch.randn(stack, HIDDEN[0], HIDDEN[1], device=device)

        def work(k: int, a: torch.Tensor = a, b: torch.Tensor = b) -> None:
            for _ in range(k):
                torch.bmm(a, b)

        peak = max(peak, best_rate(work, 200, 3) * 2 * stack * BATCH * HIDDEN[0] * HIDDEN[1] / 1e9)
    reached = flops * single_rate / 1e9
    return {"gflop_per_update": round(flops / 1e9, 4), "single_runs_gflops": round(reached, 1),
            "matmul_peak_gflops": round(peak, 1), "ceiling_ratio": round(peak / reached, 2)}


def run_train(args: list[str], what: str) -> tuple[float, str]:
    """``python train.py ARGS`` from the repository root; its wall time and stdout. RuntimeError
    with the end of its output when it fails (``what`` names the run)."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, capture_output=True,
                            text=True, check=False)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return wall, result.stdout


def sequential_runs_wall_time(members: int, fraction: float, cache: Path) -> float:
    """The same members as ``python train.py`` runs one after another (no sweep launcher)."""
    with tempfile.TemporaryDirectory() as tmp:
        return sum(run_train(["agent=cql", f"seed={seed}", f"train_fraction={fraction}", f"runs_dir={tmp}/runs",
                              f"data.cache_dir={cache}", "progress=false"], f"single run {seed}")[0]
                   for seed in range(members))


def sweep_wall_time(members: int, fraction: float, sequential: bool = False) -> dict[str, Any]:
    """The whole sweep, start to finish, under the default launcher and under the batched one (and,
    with ``sequential``, as single runs one after another)."""
    from hydra import compose, initialize_config_dir

    from carepath.training import logged_data

    out: dict[str, Any] = {"members": members, "train_fraction": fraction}
    seeds = ",".join(str(s) for s in range(members))
    cache = ROOT / "data" / "cache"
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        logged_data(compose("train", overrides=[f"data.cache_dir={cache}", "progress=false"]), ROOT)
    for launcher in ("joblib", "batched"):
        with tempfile.TemporaryDirectory() as tmp:
            # the same cached log for both, generated above before either clock starts
            common = [f"runs_dir={tmp}/runs", f"data.cache_dir={cache}", "progress=false"]
            wall, _ = run_train(["-m", f"hydra/launcher={launcher}", "agent=cql", f"seed={seeds}",
                                 f"train_fraction={fraction}", *common], f"the {launcher} sweep")
        out[f"{launcher}_wall_s"] = round(wall, 1)
    out["ratio"] = round(out["joblib_wall_s"] / out["batched_wall_s"], 2)
    if sequential:
        out["sequential_wall_s"] = round(sequential_runs_wall_time(members, fraction, cache), 1)
        out["ratio_to_sequential"] = round(out["sequential_wall_s"] / out["batched_wall_s"], 2)
    return out


def default_train_wall_time() -> dict[str, Any]:
    """``python train.py`` exactly as a researcher first runs it, with a cold data cache."""
    with tempfile.TemporaryDirectory() as tmp:
        wall, stdout = run_train(["progress=false", f"runs_dir={tmp}/runs", f"data.cache_dir={tmp}/cache"],
                                 "python train.py")
    summary = [line for line in stdout.splitlines() if "remission" in line]
    return {"wall_s": round(wall, 1), "summary": summary[-1] if summary else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=1000, help="updates per timed repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--transitions", type=int, default=200_000)
    parser.add_argument("--skip-default-run", action="store_true", help="do not time python train.py")
    parser.add_argument("--members", type=int, default=8, help="members of the batched comparison (default 8)")
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all",
                        help="where to measure the update rates (all: the CPU, and CUDA when there is one)")
    parser.add_argument("--sweep-fraction", type=float, default=0.0,
                        help="also time the whole sweep under both launchers at this train_fraction (0: skip)")
    parser.add_argument("--sequential", action="store_true",
                        help="with --sweep-fraction, also time the members as single runs one after another")
    parser.add_argument("--out", type=Path, default=RESULTS / "train_throughput.json")
    args = parser.parse_args()
    if args.sequential and args.sweep_fraction <= 0:
        parser.error("--sequential times the sweep's members one after another: give --sweep-fraction too")

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    devices = [args.device] if args.device != "all" else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    offline = [name for name in available() if entry(name).kind == "offline"]
    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "setting": {"batch_size": BATCH, "hidden": list(HIDDEN), "features": N_FEATURES, "actions": N_ACTIONS,
                    "transitions": args.transitions, "updates_per_repeat": args.updates, "repeats": args.repeats},
        "updates_per_s": {},
    }
    for device in devices:
        replay = synthetic_replay(args.transitions, device)
        rates = {name: round(agent_rate(name, replay, device, args.updates, args.repeats), 1) for name in offline}
        reference = round(minimal_cql_rate(replay, device, args.updates, args.repeats), 1)
        rates["minimal_torch_cql"] = reference
        results["updates_per_s"][device] = rates
        results.setdefault("cql_vs_minimal_loop", {})[device] = round(rates["cql"] / reference, 3)
        for name, rate in rates.items():
            print(f"{device:5s} {name:18s} {rate:9.1f} updates/s")
        print(f"{device:5s} cql / minimal loop: {rates['cql'] / reference:.2f} (target: cql >= 200 updates/s on CPU)")
        batched = batched_rates(replay, device, args.members, args.updates, args.repeats)
        results.setdefault("batched_sweep", {})[device] = batched
        print(f"{device:5s} {args.members} cql members: {batched['single_runs']:.0f} updates/s one after another, "
              f"{batched['batched']:.0f} as one stacked model (x{batched['ratio']:.2f})")
        # against the same baseline as the ratio: the members stepped one after another
        ceiling = compute_ceiling(replay, device, batched["single_runs"], args.members)
        results.setdefault("batched_ceiling", {})[device] = ceiling
        print(f"{device:5s} one cql update: {ceiling['gflop_per_update']} GFLOP in matrix products; single runs "
              f"reach {ceiling['single_runs_gflops']} GFLOP/s of a measured {ceiling['matmul_peak_gflops']} GFLOP/s "
              f"peak, so stacking can reach at most x{ceiling['ceiling_ratio']:.2f}")
    if not args.skip_default_run:
        results["default_train"] = default_train_wall_time()
        print(f"python train.py (cold cache): {results['default_train']['wall_s']} s  "
              f"{results['default_train']['summary']}")
    if args.sweep_fraction > 0:
        results["sweep_wall_time"] = sweep = sweep_wall_time(args.members, args.sweep_fraction, args.sequential)
        print(f"sweep of {args.members} cql seeds at train_fraction {args.sweep_fraction}: joblib "
              f"{sweep['joblib_wall_s']} s, batched {sweep['batched_wall_s']} s (x{sweep['ratio']:.2f})")
        if "sequential_wall_s" in sweep:
            print(f"the same {args.members} as single runs one after another: {sweep['sequential_wall_s']} s "
                  f"(batched x{sweep['ratio_to_sequential']:.2f})")
    from evaluation.cli import write_json_atomic  # atomic: never a half-written result

    write_json_atomic(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Simulator throughput and memory.

Prints and writes ``benchmarks/results/sim_throughput.json``:

- batched dynamics, patient-steps/s at 4,096 patients on one core (target >= 2,000,000);
- single ``gym.Env`` steps/s, raw and through ``gymnasium.make``'s wrappers (target >= 30,000);
- SB3 PPO environment steps/s on our env divided by the same on CartPole-v1,
  same PPO settings, measured side by side in this run (target >= 0.8);
- memory for 100,000 simulated patients (target < 1 GiB).

Each timing is the best of several repeats: this machine is noisy and the
best repeat is the one least disturbed by other work.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def pin_one_core() -> str:
    """Run on one core, single-threaded maths, as the targets are stated."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = "1"
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        return f"pinned to core {sorted(os.sched_getaffinity(0))[0]}"
    return "not pinned (no sched_setaffinity)"


def best_rate(work: Callable[[], int], repeats: int) -> float:
    """Items per second of the fastest repeat (``work`` returns the items it did)."""
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        items = work()
        best = max(best, items / (time.perf_counter() - started))
    return best


def batched_dynamics(n: int, weeks: int, repeats: int) -> float:
    import numpy as np

    from envs import dynamics as D
    from envs.params import EnvSettings, load_params

    params, settings = load_params(), EnvSettings(horizon=weeks)
    k = D.kernel_params(params, settings)
    rng = np.random.default_rng(0)
    start = D.initial_state(n, params, settings, rng, k)
    D.step(start, np.zeros(n, dtype=np.int64), params, settings, rng, k)  # compile / warm up

    def work() -> int:
        state = start
        mask = D.mask_from_state(state)
        for _ in range(weeks):
            actions = np.where(mask[:, 0], 0, 9)  # continue, or referral where it is the only safe step
            result = D.step(state, actions, params, settings, rng, k)
            state, mask = result.state, result.mask
        return n * weeks

    return best_rate(work, repeats)


def single_env(steps: int, repeats: int, wrapped: bool) -> float:
    import gymnasium as gym

    import envs
    from envs.env import CarePathEnv

    env: Any = gym.make(envs.ENV_ID) if wrapped else CarePathEnv()
    env.reset(seed=0)

    def work() -> int:
        _, info = env.reset(seed=1)
        for _ in range(steps):
            action = 0 if info["action_mask"][0] else 9
            _, _, terminated, truncated, info = env.step(action)
            if terminated or truncated:
                _, info = env.reset()
        return steps

    work()  # warm up
    return best_rate(work, repeats)


def ppo_rate(env_id: str, timesteps: int) -> float:
    import gymnasium as gym
    import torch
    from stable_baselines3 import PPO

    import envs  # noqa: F401 - registers our env

    torch.set_num_threads(1)
    env = gym.make(env_id)
    model = PPO("MlpPolicy", env, n_steps=1024, batch_size=64, n_epochs=4, seed=0, device="cpu", verbose=0)
    started = time.perf_counter()
    model.learn(total_timesteps=timesteps)
    return timesteps / (time.perf_counter() - started)


def memory_100k(n: int) -> dict[str, float]:
    import numpy as np

    from envs import dynamics as D
    from envs.params import EnvSettings, load_params

    params, settings = load_params(), EnvSettings()
    k = D.kernel_params(params, settings)
    rng = np.random.default_rng(0)
    tracemalloc.start()
    state = D.initial_state(n, params, settings, rng, k)
    mask = D.mask_from_state(state)
    for _ in range(26):
        result = D.step(state, np.where(mask[:, 0], 0, 9), params, settings, rng, k)
        state, mask = result.state, result.mask
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"patients": n, "state_mib": state.nbytes / 2**20, "peak_traced_mib": peak / 2**20}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and PPO steps (a smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS / "sim_throughput.json")
    args = parser.parse_args(argv)
    repeats = 2 if args.quick else 5
    pinned = pin_one_core()

    figures: dict[str, Any] = {"machine": platform.platform(), "cpu_count": os.cpu_count(), "pinning": pinned}
    figures["batched_patient_steps_per_s"] = batched_dynamics(4096, 26, repeats)
    figures["single_env_steps_per_s_raw"] = single_env(20_000 if not args.quick else 4000, repeats, wrapped=False)
    figures["single_env_steps_per_s_gym_make"] = single_env(20_000 if not args.quick else 4000, repeats,
                                                            wrapped=True)
    timesteps = 4096 if args.quick else 16_384
    ours, cartpole = [], []
    for _ in range(1 if args.quick else 2):  # alternate, so drift hits both alike
        ours.append(ppo_rate("CarePath-Depression-v0", timesteps))
        cartpole.append(ppo_rate("CartPole-v1", timesteps))
    figures["ppo_steps_per_s_carepath"] = max(ours)
    figures["ppo_steps_per_s_cartpole"] = max(cartpole)
    figures["ppo_ratio_carepath_over_cartpole"] = max(ours) / max(cartpole)
    figures["memory"] = memory_100k(100_000)
    figures["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    figures["targets"] = {
        "batched_patient_steps_per_s": ">= 2000000",
        "single_env_steps_per_s_raw": ">= 30000",
        "ppo_ratio_carepath_over_cartpole": ">= 0.8",
        "memory_100k_patients": "< 1 GiB",
    }

    print(f"batched dynamics (4,096 patients, one core): {figures['batched_patient_steps_per_s']:,.0f} patient-steps/s")
    print(f"single env, raw:                             {figures['single_env_steps_per_s_raw']:,.0f} steps/s")
    print(f"single env, gymnasium.make wrappers:         {figures['single_env_steps_per_s_gym_make']:,.0f} steps/s")
    ratio = figures["ppo_ratio_carepath_over_cartpole"]
    print(f"SB3 PPO: carepath {figures['ppo_steps_per_s_carepath']:,.0f} steps/s, CartPole-v1 "
          f"{figures['ppo_steps_per_s_cartpole']:,.0f} steps/s, ratio {ratio:.2f}")
    mem = figures["memory"]
    print(f"100,000 patients: state {mem['state_mib']:.0f} MiB, peak traced during 26 weeks "
          f"{mem['peak_traced_mib']:.0f} MiB; process max RSS {figures['max_rss_mib']:.0f} MiB")
    from evaluation.cli import write_json_atomic  # atomic: never a half-written result

    write_json_atomic(args.out, figures)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()

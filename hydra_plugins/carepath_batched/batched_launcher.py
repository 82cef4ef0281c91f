"""``hydra/launcher=batched``: the runs of a sweep that can share one stacked model train as one.

    python train.py -m hydra/launcher=batched agent=cql seed=0,1,2,3,4,5,6,7

Jobs whose composed configs are equal but for the seed, of a Q-learning agent
(``cql``, ``dqn_offline``), form a group. Each member starts as a single run
does (``carepath.training.start_run``: its own folder, config check,
``overwrite`` rule, seeded agent, TensorBoard writer, and its checkpoint if
one is there); the group trains as one model
(:class:`agents.offline.batched.BatchedQLearning`), checkpointing every member
in the single-run format, and leaves each a checkpoint at its last update.
Then every job of the sweep runs as a single run, ``n_jobs`` at once (the
joblib launcher): a member resumes from that checkpoint with nothing left to
train, so only its evaluation, serving preparation, certification and
``metrics.json`` remain. Jobs that cannot join a group train in their single
run, and the log says why. Members resumed from checkpoints at different
updates train in one group per resume point.
"""

# No "from __future__ import annotations": Hydra's plugin scan runs this module outside
# sys.modules, where a dataclass with string annotations cannot be built.
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

#: Config keys the members of one group may differ in.
MEMBER_KEYS = ("seed",)
#: Keys that change nothing about training (each member keeps its own value).
IGNORED_KEYS = ("progress", "overwrite")


@dataclass
class BatchedLauncherConf:
    _target_: str = "hydra_plugins.carepath_batched.batched_launcher.BatchedLauncher"
    #: the most members one stacked model holds (a larger group is split)
    max_members: int = 64
    #: finishing runs (evaluation, serving preparation, certification) at once; -1: every core
    n_jobs: int = -1


ConfigStore.instance().store(group="hydra/launcher", name="batched", node=BatchedLauncherConf, provider="carepath")


def group_key(sweep_config: DictConfig) -> str | None:
    """What members of one group share (the task config without its seed), or None when the job
    cannot be grouped (its config does not resolve outside a job)."""
    task = OmegaConf.masked_copy(sweep_config, [str(k) for k in sweep_config if k != "hydra"])
    try:
        plain = OmegaConf.to_container(task, resolve=True)
    except Exception:  # an interpolation that needs the job's runtime: run it alone
        return None
    assert isinstance(plain, dict)
    for key in (*MEMBER_KEYS, *IGNORED_KEYS):
        plain.pop(key, None)
    return json.dumps(plain, sort_keys=True, default=str)


def _without_overwrite(overrides: Sequence[str]) -> list[str]:
    """A member's overrides for its finishing run: ``overwrite=false``, so that it resumes from the
    checkpoint the batched training left instead of clearing it (its start already cleared any
    finished run). ``overwrite`` is not part of the sweep's folder names."""
    return [o for o in overrides if not o.lstrip("+~").startswith("overwrite=")] + ["overwrite=false"]


class BatchedLauncher(Launcher):
    def __init__(self, max_members: int = 64, n_jobs: int = -1) -> None:
        super().__init__()
        if int(max_members) < 1:
            raise ValueError(f"hydra.launcher.max_members must be at least 1, got {max_members}")
        if int(n_jobs) == 0 or int(n_jobs) < -1:
            raise ValueError(f"hydra.launcher.n_jobs must be -1 (every core) or at least 1, got {n_jobs}")
        self.max_members = int(max_members)
        self.n_jobs = int(n_jobs)
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Train every group as one stacked model, then run every job as a single run, several at
        once (joblib): a member resumes from the final checkpoint its group left, so only its
        evaluation, serving preparation and certification remain; a job that joined no group
        trains as well."""
        from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher

        setup_globals()
        assert self.hydra_context is not None and self.config is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        configs: list[DictConfig] = []
        for idx, overrides in enumerate(job_overrides):
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = initial_job_idx + idx
                sweep_config.hydra.job.num = initial_job_idx + idx
            configs.append(sweep_config)
            log.info("\t#%d : %s", initial_job_idx + idx, " ".join(filter_overrides(overrides)))
        groups: dict[str, list[int]] = {}
        alone: list[int] = []
        for i, sweep_config in enumerate(configs):
            key = group_key(sweep_config)
            (groups.setdefault(key, []) if key is not None else alone).append(i)
        trained: set[int] = set()
        for members in groups.values():
            for start in range(0, len(members), self.max_members):
                chunk = members[start:start + self.max_members]
                if len(chunk) == 1:
                    alone.extend(chunk)
                else:
                    trained |= self._train_group([(i, configs[i]) for i in chunk])
        for i in sorted(alone):
            log.info("job #%d runs alone (no other job of the sweep shares its config but the seed)",
                     initial_job_idx + i)
        finishing = [_without_overwrite(o) if i in trained else list(o) for i, o in enumerate(job_overrides)]
        parallel = JoblibLauncher(n_jobs=self.n_jobs)
        parallel.setup(hydra_context=self.hydra_context, task_function=self.task_function, config=self.config)
        return parallel.launch(finishing, initial_job_idx)

    def _train_group(self, jobs: list[tuple[int, DictConfig]]) -> set[int]:
        """Start every member in its own job (folder, config check, ``overwrite``, seeded agent,
        checkpoint), train those that can share a model as one, and leave each a final checkpoint.
        Returns the jobs so trained."""
        from carepath.training import start_run

        assert self.config is not None and self.hydra_context is not None
        started: dict[int, Any] = {}
        for i, sweep_config in jobs:
            ret = run_job(hydra_context=self.hydra_context, task_function=start_run, config=sweep_config,
                          job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
            if ret.status == JobStatus.COMPLETED:
                started[i] = ret.return_value
            # a member that cannot start fails the same way again in its own run, which reports it
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        try:
            return train_group(started)
        finally:
            for run in started.values():
                run.writer.close()


def train_group(runs: dict[int, Any]) -> set[int]:
    """Train the runs that can share one stacked model together, one model per resume point, and
    leave each a checkpoint at its last update; returns their ids. Runs that cannot are left to
    train alone (an empty result), and the log says why."""
    from agents.common.replay import replay_from_transitions
    from agents.offline.batched import BatchedQLearning, IncompatibleMembers, check_members
    from carepath.training import (
        load_checkpoint,
        offline_updates,
        save_checkpoint,
        scalar_logger,
        split_log,
    )

    if not runs:
        return set()
    ids = sorted(runs)
    first = runs[ids[0]]
    if any(runs[i].kind != "offline" for i in ids):
        log.info("jobs %s train one by one: only agents trained on logged data train batched", ids)
        return set()
    cfg = first.cfg
    _, _, parts = split_log(cfg, first.run_dir)
    # one copy of the data for every member; each member draws its own minibatches
    replay = replay_from_transitions(parts["train"].transitions(), device=first.agent.device, seed=int(cfg.seed))
    try:
        samplers = {}
        for i in ids:
            runs[i].agent.setup(replay.feature_names, replay.action_names)
            samplers[i] = load_checkpoint(runs[i].run_dir, runs[i].agent)
        by_update: dict[int, list[int]] = {}
        for i in ids:
            by_update.setdefault(runs[i].agent.updates_done, []).append(i)
        for members in by_update.values():
            check_members([runs[i].agent for i in members])
    except IncompatibleMembers as err:
        log.info("jobs %s train one by one: %s", ids, err)
        return set()
    total, log_every = offline_updates(cfg, first.agent)
    for members in by_update.values():
        batched = BatchedQLearning([runs[i].agent for i in members], replay, [samplers[i] for i in members])
        log.info("training %d %s members as one stacked model from update %d: seeds %s", len(members),
                 first.agent.algorithm, batched.updates_done, [int(runs[i].cfg.seed) for i in members])

        def checkpoint(step: int, members: list[int] = members, generators: list[Any] = batched.generators) -> None:
            for i, g in zip(members, generators, strict=True):
                save_checkpoint(runs[i].run_dir, runs[i].agent, g.get_state())

        batched.fit(total, callbacks=[scalar_logger(runs[i].writer) for i in members], log_every=log_every,
                    progress=bool(cfg.progress), checkpoint=checkpoint, checkpoint_every=int(cfg.checkpoint_every))
        checkpoint(total)  # the finishing run resumes here: nothing left to train
    return set(ids)

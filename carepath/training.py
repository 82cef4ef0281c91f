"""The training job behind ``train.py``: build env / data / agent, train, evaluate, certify, save a bundle.

A run has three phases, so that a sweep launcher can run the middle one for many runs at once
(``hydra/launcher=batched``, :mod:`hydra_plugins.carepath_batched.batched_launcher`):

- :func:`start_run`: check the config, prepare the run folder (refusing a finished run unless
  ``overwrite``), build the seeded agent and the TensorBoard writer;
- training: :func:`train_offline` (logged data, resuming from ``checkpoint.pt``) or
  :func:`train_online` (the simulator);
- :func:`finish_run`: export the bundle, ground truth, off-policy check, serving preparation,
  certification and ``metrics.json``.

:func:`run` is all three, what ``python train.py`` calls.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from carepath.jsontypes import is_int, is_number

log = logging.getLogger("carepath.train")  # the name train.py has always logged under


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


class ConfigError(ValueError):
    """A composed config with a value of the wrong type or out of range; the message names the field."""




_POSITIVE_INT = (lambda v: is_int(v) and v > 0, "a positive integer")
_NON_NEGATIVE_INT = (lambda v: is_int(v) and v >= 0, "a non-negative integer")
_BOOL = (lambda v: isinstance(v, bool), "true or false")
_LEVEL = (lambda v: is_number(v) and 0 < v < 1, "a number in (0, 1)")

#: field -> (check, what it must be); Hydra does not type these (no structured config), so a
#: string where a number belongs would otherwise surface minutes into a run, or not at all.
_CONFIG_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": _NON_NEGATIVE_INT,
    "train_fraction": (lambda v: is_number(v) and v > 0, "a positive number"),
    "checkpoint_every": _NON_NEGATIVE_INT,
    "overwrite": _BOOL,
    "progress": _BOOL,
    "data.path": (lambda v: v is None or isinstance(v, str), "a file path or null"),
    "data.cache_dir": (lambda v: isinstance(v, str) and v != "", "a folder path"),
    "data.epsilon": (lambda v: is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "data.patients": _POSITIVE_INT,
    "data.seed": _NON_NEGATIVE_INT,
    "data.split_seed": _NON_NEGATIVE_INT,
    "data.split": (lambda v: isinstance(v, dict) and {"train", "validation"} <= set(v)
                   and all(is_number(x) and 0 <= x <= 1 for x in v.values())
                   and abs(sum(v.values()) - 1) < 1e-9, "fractions in [0, 1] for train, validation (and test), "
                                                        "summing to 1"),
    "eval.patients": _POSITIVE_INT,
    "eval.seed": _NON_NEGATIVE_INT,
    "eval.ope.enabled": _BOOL,
    "eval.ope.estimators": (lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(x, str) for x in v),
                            "a list of estimator names"),
    "eval.ope.level": _LEVEL,
    "eval.ope.n_boot": _POSITIVE_INT,
    "eval.ope.fairness": _BOOL,
    "eval.ope.fqe_iterations": _POSITIVE_INT,
    "eval.ope.fqe_updates": _POSITIVE_INT,
    "eval.ope.fqe_refits": (lambda v: is_int(v) and (v == 0 or v >= 2), "0 (no refits) or an integer of at least 2"),
    "eval.certify.enabled": _BOOL,
    "eval.certify.confidence": (lambda v: is_number(v) and 0 < v < 1, "a number in (0, 1)"),
    "eval.certify.split": (lambda v: is_number(v) and 0 < v < 1, "a number in (0, 1)"),
    "eval.certify.seed": _NON_NEGATIVE_INT,
    "eval.certify.method": (lambda v: v in ("t", "bernstein"), "'t' or 'bernstein'"),
    "eval.certify.vignettes": _BOOL,
    "explain.enabled": _BOOL,
    "explain.background_size": _POSITIVE_INT,
    "explain.members": (lambda v: is_int(v) and v >= 2, "an integer of at least 2 (an interval needs a spread)"),
    "explain.horizon_weeks": _POSITIVE_INT,
    "explain.updates_per_iteration": _POSITIVE_INT,
    "explain.level": _LEVEL,
}


def _fits(value: Any, hint: Any) -> bool:
    """Whether a config value has the type of a config dataclass field (unknown hints pass)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return is_int(value)
    if hint is float:
        return is_number(value)
    if hint is str:
        return isinstance(value, str)
    if origin is typing.Literal:
        return value in args
    if origin is tuple:
        return isinstance(value, list | tuple) and all(_fits(v, args[0]) for v in value)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    return True


def _describe(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0]).removeprefix('an ').removeprefix('a ')}s"
    return names.get(origin or hint, str(hint))


def check_config(cfg: DictConfig) -> None:
    """Refuse a composed config with a wrong type or an out-of-range value, naming the field,
    before anything is written, generated or trained."""
    from agents import entry, make_config
    from envs.params import EnvSettings
    from evaluation.compare import resolve_estimators
    from policies import BASELINES

    def value(key: str) -> Any:
        missing = object()
        found = OmegaConf.select(cfg, key, default=missing)
        if found is missing:
            raise ConfigError(f"{key}: missing from the config")
        return OmegaConf.to_container(found, resolve=True) if OmegaConf.is_config(found) else found

    for key, (ok, expected) in _CONFIG_RULES.items():
        if not ok(value(key)):
            raise ConfigError(f"{key} must be {expected}, got {value(key)!r}")
    if value("data.policy") not in BASELINES:
        raise ConfigError(f"data.policy must be one of {', '.join(sorted(BASELINES))}, got {value('data.policy')!r}")
    try:
        resolve_estimators(value("eval.ope.estimators"))
    except ValueError as err:
        raise ConfigError(f"eval.ope.estimators: {err}") from None
    try:
        agent = entry(str(value("agent.name")))
    except ValueError as err:
        raise ConfigError(f"agent.name: {err}") from None
    params = value("agent.params")
    if not isinstance(params, dict):
        raise ConfigError(f"agent.params must be a mapping of options, got {params!r}")
    hints = typing.get_type_hints(agent.config_cls)
    for name, option in params.items():
        if name in hints and not _fits(option, hints[name]):
            raise ConfigError(f"agent.params.{name} must be {_describe(hints[name])}, got {option!r}")
    try:
        make_config(agent.name, {**params, "seed": value("seed")})
    except ValueError as err:  # ranges, unknown options; the message names the option
        raise ConfigError(f"agent.params: {err}") from None
    kwargs = value("env.kwargs")
    if not isinstance(kwargs, dict):
        raise ConfigError(f"env.kwargs must be a mapping of simulator settings, got {kwargs!r}")
    try:
        EnvSettings(**{k: v for k, v in kwargs.items() if k not in ("params_path", "param_overrides")})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"env.kwargs: {err}") from None


def env_settings(cfg: DictConfig) -> tuple[Any, dict[str, Any]]:
    from envs.params import EnvSettings

    kwargs = dict(_plain(cfg.env.kwargs))
    params = {k: kwargs.pop(k) for k in ("params_path", "param_overrides") if k in kwargs}
    return EnvSettings(**kwargs), params


def simulator(cfg: DictConfig) -> tuple[Any, Any]:
    """The run's environment settings and simulator parameters (``env.kwargs``)."""
    from envs.params import load_params

    settings, params = env_settings(cfg)
    path = params.get("params_path")
    return settings, load_params(hydra.utils.to_absolute_path(str(path)) if path else None,
                                 params.get("param_overrides") or None)


def simulator_provenance(cfg: DictConfig, log_path: Path | None = None) -> dict[str, Any]:
    """Which simulator the run learnt from: spec version and parameter fingerprint, of the
    run's environment or, for an offline run, as the log recorded them (None when the log
    came from elsewhere, e.g. imported care data)."""
    from envs.spec import SPEC_VERSION

    if log_path is not None:
        from offline_data.io import read_metadata
        from offline_data.schema import META_SIM_PARAMS, META_SPEC_VERSION

        metadata = read_metadata(log_path)
        sim = metadata.get(META_SIM_PARAMS)
        fingerprint = sim.get("fingerprint") if isinstance(sim, dict) else None
        return {"spec_version": metadata.get(META_SPEC_VERSION), "fingerprint": fingerprint}

    return {"spec_version": SPEC_VERSION, "fingerprint": simulator(cfg)[1].fingerprint()}


def logged_data(cfg: DictConfig, run_dir: Path) -> tuple[Any, dict[str, Any]]:
    """The logged dataset: an existing file, or generated once and cached by content."""
    from offline_data.dataset import load_dataset
    from offline_data.generate import generate

    data = cfg.data
    if data.path:
        path = Path(hydra.utils.to_absolute_path(str(data.path)))
    else:
        settings, params = env_settings(cfg)
        # the simulator's identity is part of the key: a changed model makes new data
        key = json.dumps({"data": _plain(data), "env": _plain(cfg.env.kwargs),
                          "simulator": simulator_provenance(cfg)}, sort_keys=True, default=str)
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        path = Path(hydra.utils.to_absolute_path(str(data.cache_dir))) / f"{data.policy}_{digest}.parquet"
        if not path.exists():
            log.info("generating %d patients under %s (epsilon %.2f) -> %s", data.patients, data.policy,
                     data.epsilon, path)
            generate(path, policy=data.policy, epsilon=float(data.epsilon), patients=int(data.patients),
                     seed=int(data.seed), settings=settings, params_path=params.get("params_path"),
                     param_overrides=params.get("param_overrides") or None, progress=bool(cfg.progress))
    dataset = load_dataset(path)
    provenance = {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                  "rows": dataset.n_rows, "patients": dataset.n_patients}
    return dataset, provenance


def split_log(cfg: DictConfig, run_dir: Path) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The logged dataset, its provenance and its parts by patient (``data.split``, ``data.split_seed``)."""
    from offline_data.dataset import split_by_patient

    dataset, provenance = logged_data(cfg, run_dir)
    return dataset, provenance, split_by_patient(dataset, dict(_plain(cfg.data.split)), seed=int(cfg.data.split_seed))


def load_checkpoint(run_dir: Path, agent: Any) -> Any | None:
    """Resume ``agent`` from the run's ``checkpoint.pt``; returns its minibatch sampler's state
    (None when there is no checkpoint)."""
    checkpoint = run_dir / "checkpoint.pt"
    if not checkpoint.exists():
        return None
    # our own file; weights_only refuses anything but tensors and plain containers
    state = torch.load(checkpoint, map_location=agent.device, weights_only=True)
    agent.load_state(state["agent"])
    log.info("resumed from %s at update %d", checkpoint, agent.updates_done)
    return state["sampler"]


def save_checkpoint(run_dir: Path, agent: Any, sampler_state: Any) -> None:
    checkpoint = run_dir / "checkpoint.pt"
    tmp = checkpoint.with_suffix(".tmp")
    torch.save({"agent": agent.state(), "sampler": sampler_state}, tmp)
    tmp.replace(checkpoint)


def offline_updates(cfg: DictConfig, agent: Any) -> tuple[int, int]:
    """The run's number of updates (``train_fraction`` of the agent's) and its logging interval."""
    total = max(1, int(agent.config.n_updates * float(cfg.train_fraction)))
    return total, max(1, min(250, total // 4))


def offline_parts(dataset: Any, parts: dict[str, Any]) -> dict[str, Any]:
    """``validation`` (for OPE), ``held_out`` (every patient the policy did not train on:
    certification) and ``train``."""
    unseen = [part.patient_ids() for name, part in parts.items() if name != "train"]
    held_out = dataset.select_patients(np.concatenate(unseen), f"{dataset.source}[held out]")
    return {"validation": parts["validation"], "held_out": held_out, "train": parts["train"]}


def scalar_logger(writer: Any) -> Callable[[int, dict[str, float]], None]:
    """Training metrics to TensorBoard as ``train/<name>``."""
    def log_metrics(step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            writer.add_scalar(f"train/{key}", value, step)

    return log_metrics


def train_offline(cfg: DictConfig, agent: Any, run_dir: Path, writer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train on the train split; returns the data's provenance and :func:`offline_parts`."""
    from agents.common.replay import replay_from_transitions

    dataset, provenance, parts = split_log(cfg, run_dir)
    replay = replay_from_transitions(parts["train"].transitions(), device=agent.device, seed=int(cfg.seed))
    provenance["split"] = {name: part.n_patients for name, part in parts.items()}
    agent.setup(replay.feature_names, replay.action_names)  # sizes and names from the data
    sampler = load_checkpoint(run_dir, agent)
    if sampler is not None:
        replay.generator.set_state(sampler)
    total, log_every = offline_updates(cfg, agent)
    agent.fit(replay, n_updates=total, progress=bool(cfg.progress), callback=scalar_logger(writer),
              log_every=log_every, checkpoint_every=int(cfg.checkpoint_every),
              checkpoint=lambda step: save_checkpoint(run_dir, agent, replay.generator.get_state()))
    return provenance, offline_parts(dataset, parts)


def logged_check_parts(cfg: DictConfig, run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """For a policy trained in the simulator, the logged data it must answer to before it serves
    (in real use logged care is all a clinic has). No logged patient trained it, so every one is
    held out for certification; the validation split serves the off-policy check and the
    serving preparation, as for an offline run."""
    dataset, provenance, parts = split_log(cfg, run_dir)
    return provenance, {"validation": parts["validation"], "held_out": dataset}


def off_policy_evaluation(cfg: DictConfig, policy: Any, validation: Any, writer: Any) -> dict[str, Any]:
    """What the logged validation patients alone say about the policy (``ope/*`` scalars), to set
    beside the simulator's ground truth: the check a real deployment has to rely on."""
    from evaluation.compare import add_scalars, compare_policies
    from evaluation.ope.fqe import FQEConfig

    ope = cfg.eval.ope
    fqe = FQEConfig(iterations=int(ope.fqe_iterations), updates_per_iteration=int(ope.fqe_updates),
                    seed=int(cfg.seed))
    result = compare_policies(validation, {"policy": policy}, estimators=tuple(ope.estimators),
                              n_boot=int(ope.n_boot), level=float(ope.level), seed=int(cfg.seed), fqe_config=fqe,
                              fairness=bool(ope.fairness), fqe_refits=int(ope.fqe_refits),
                              progress=bool(cfg.progress))
    add_scalars(writer, result, "policy")
    return dict(result.to_json())


def record_training_patients(bundle_dir: Path, train_part: Any) -> None:
    """Hashes of the patients that trained the policy go into the bundle: certification refuses them."""
    from policies.bundle import TRAINING_PATIENTS_FILE, patient_hashes, update_bundle

    hashes = torch.as_tensor(patient_hashes(train_part.patient_ids()))
    update_bundle(bundle_dir, extra_tensors={TRAINING_PATIENTS_FILE: {"hash": hashes}})


def certify_run(cfg: DictConfig, bundle_dir: Path, held_out: Any, writer: Any) -> dict[str, Any]:
    """Certify the trained policy on the patients it did not train on, store the certificate in the
    bundle, and set the simulator's ground truth of the certified policy beside it (``certify/*``)."""
    from evaluation.certify.cli import NetworkPolicy, vignette_check
    from evaluation.certify.core import CertifyConfig, certify, store_certificate
    from evaluation.ground_truth import rollout
    from policies import load

    c = cfg.eval.certify
    config = CertifyConfig(confidence=float(c.confidence), split=float(c.split), seed=int(c.seed),
                           method=str(c.method))
    bundle = load(bundle_dir)
    result = certify(NetworkPolicy(bundle), held_out, None, config,
                     critical_vignettes=vignette_check() if bool(c.vignettes) else None,
                     progress=lambda line: log.info("certify: %s", line))
    cert = result.certificate
    record = {**cert.as_dict(), "data": held_out.source}
    certified_policy = store_certificate(bundle_dir, result, record)
    settings, params = simulator(cfg)
    truth: dict[str, Any] = rollout(certified_policy, int(cfg.eval.patients), seed=int(cfg.eval.seed),
                                    params=params, settings=settings, progress=bool(cfg.progress)).as_dict()
    for key, number in (("certified", float(cert.certified)), ("lower_bound_pp", cert.lower_bound),
                        ("improvement_pp", cert.improvement), ("reward_lower_bound", cert.reward_lower_bound),
                        ("candidate_weight", float(cert.candidate["weight"])), ("ess", float(cert.candidate["ess"])),
                        # which family: SPIBB's threshold, a prefix's weeks (0 when not that family)
                        ("candidate_threshold", float(cert.candidate.get("threshold", 0.0))),
                        ("candidate_weeks", float(cert.candidate.get("weeks", 0))),
                        ("first_choice_lower_bound_pp", float(cert.first_choice["lower_bound"])),
                        ("true_remission", truth["remission"]["value"])):
        writer.add_scalar(f"certify/{key}", number, 0)
    log.info("certify: %s", cert.summary())
    return {"certificate": record, "certified_policy_ground_truth": truth}


def prepare_for_serving(cfg: DictConfig, bundle_dir: Path, validation: Any) -> None:
    """Store what serving needs in the bundle (SHAP background, benefit ensemble), fitted on the
    validation split, so that ``carepath serve --policy <run>/policy`` works at once."""
    from serving.benefit import BenefitConfig
    from serving.prepare import PrepareConfig, prepare_bundle

    ex = cfg.explain
    config = PrepareConfig(background_size=int(ex.background_size), seed=int(cfg.seed),
                           benefit=BenefitConfig(members=int(ex.members), horizon_weeks=int(ex.horizon_weeks),
                                                 updates_per_iteration=int(ex.updates_per_iteration),
                                                 level=float(ex.level), seed=int(cfg.seed)))
    prepare_bundle(bundle_dir, validation, config, source="validation split", progress=bool(cfg.progress))


def train_online(cfg: DictConfig, agent: Any, writer: Any) -> dict[str, Any]:
    agent.config.total_timesteps = max(1, int(agent.config.total_timesteps * float(cfg.train_fraction)))
    agent.fit(callback=scalar_logger(writer), progress=bool(cfg.progress))
    return {"source": "simulator", "timesteps": agent.config.total_timesteps}


def evaluate(cfg: DictConfig, policy: Any, writer: Any) -> dict[str, Any]:
    """Simulator ground truth of the trained policy and the behaviour policy, with 95 % intervals."""
    from evaluation.ground_truth import rollout
    from policies import make_baseline

    settings, params = simulator(cfg)
    results: dict[str, Any] = {}
    behaviour = make_baseline(str(cfg.data.policy), float(cfg.data.epsilon))
    for label, candidate in (("policy", policy), ("behaviour", behaviour)):
        truth = rollout(candidate, int(cfg.eval.patients), seed=int(cfg.eval.seed), params=params,
                        settings=settings, progress=bool(cfg.progress))
        results[label] = truth.as_dict()
    truth = results["policy"]
    for metric in ("remission", "value", "dropout", "phq9_change"):
        interval = truth[metric]
        writer.add_scalar(f"eval/{metric}", interval["value"], 0)
        writer.add_scalar(f"eval/{metric}_lo", interval["low"], 0)
        writer.add_scalar(f"eval/{metric}_hi", interval["high"], 0)
    writer.add_scalar("eval/behaviour_remission", results["behaviour"]["remission"]["value"], 0)
    writer.add_scalar("eval/cost", truth["cost"]["value"], 0)
    for label, tag in (("policy", "eval/cost_per_remission"), ("behaviour", "eval/behaviour_cost_per_remission")):
        if results[label]["cost_per_remission"] is not None:  # None: no one remitted
            writer.add_scalar(tag, results[label]["cost_per_remission"], 0)
    writer.add_scalar("eval/side_effects", truth["side_effects"]["value"], 0)
    writer.add_scalar("safety/blocked_actions_chosen", truth["blocked_actions_chosen"], 0)
    writer.add_scalar("safety/referral_when_item9_high", truth["referrals_when_item9_high"], 0)
    return results


@dataclass
class Run:
    """One run between its phases: its config, folder, seeded agent and TensorBoard writer."""

    cfg: DictConfig
    run_dir: Path
    agent: Any
    kind: str  # "offline" or "online"
    writer: Any
    started: float


def start_run(cfg: DictConfig) -> Run:
    """Check the config (SystemExit naming the field), prepare the run folder, build the agent."""
    from torch.utils.tensorboard import SummaryWriter

    from agents import entry, make_agent

    started = time.perf_counter()
    try:
        check_config(cfg)
    except ConfigError as err:  # before anything is written: one line, exit status 1
        raise SystemExit(f"train.py: invalid config: {err}") from None
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if (run_dir / "metrics.json").exists():
        if not cfg.overwrite:
            raise SystemExit(f"{run_dir} holds a finished run; pass overwrite=true to replace it")
        for stale in ("metrics.json", "checkpoint.pt", "policy", "tensorboard"):
            target = run_dir / stale
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    torch.manual_seed(int(cfg.seed))  # our numpy code takes explicit generators, seeded per use

    agent_entry = entry(str(cfg.agent.name))
    params = dict(_plain(cfg.agent.params))
    params["seed"] = int(cfg.seed)
    if agent_entry.kind == "online":
        params["env"] = {**dict(_plain(cfg.env.kwargs)), **params.get("env", {})}
    agent = make_agent(agent_entry.name, params)
    writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
    return Run(cfg=cfg, run_dir=run_dir, agent=agent, kind=agent_entry.kind, writer=writer, started=started)


def train_run(run: Run) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train one run; returns its data provenance and its logged parts (empty when none)."""
    cfg = run.cfg
    if run.kind == "offline":
        return train_offline(cfg, run.agent, run.run_dir, run.writer)
    data = train_online(cfg, run.agent, run.writer)
    parts: dict[str, Any] = {}
    if cfg.eval.certify.enabled or cfg.explain.enabled:
        data["logged_check"], parts = logged_check_parts(cfg, run.run_dir)
    return data, parts


def finish_run(run: Run, data: dict[str, Any], parts: dict[str, Any]) -> float:
    """Export, evaluate, check off-policy, prepare for serving, certify and write ``metrics.json``;
    closes the run's writer. Returns the policy's true remission."""
    from agents import entry
    from evaluation.cli import write_json_atomic
    from policies import load

    cfg, run_dir, agent, writer = run.cfg, run.run_dir, run.agent, run.writer
    agent_entry = entry(str(cfg.agent.name))
    try:
        validation = parts.get("validation")
        log_path = Path(data["path"]) if run.kind == "offline" else None
        data = {**data, "simulator": simulator_provenance(cfg, log_path)}
        bundle_dir = run_dir / "policy"
        resolved = _plain(cfg)
        agent.export(bundle_dir, name=f"{cfg.name}-seed{cfg.seed}", config=resolved, data=data, overwrite=True)
        policy = load(bundle_dir)
        results = evaluate(cfg, policy, writer)
        evaluation: dict[str, Any] = {"simulator_ground_truth": results}
        if validation is not None and cfg.eval.ope.enabled:
            evaluation["off_policy_validation"] = off_policy_evaluation(cfg, policy, validation, writer)
        # record the evaluation in the bundle itself (re-saved atomically with the same weights)
        agent.export(bundle_dir, name=policy.name, config=resolved, data=data, evaluation=evaluation, overwrite=True)
        if "train" in parts:
            record_training_patients(bundle_dir, parts["train"])
        if validation is not None and cfg.explain.enabled:
            prepare_for_serving(cfg, bundle_dir, validation)
        certification = None
        if parts and cfg.eval.certify.enabled:
            certification = certify_run(cfg, bundle_dir, parts["held_out"], writer)
        remission = results["policy"]["remission"]
        metrics = {"agent": agent_entry.name, "seed": int(cfg.seed), "data": data, "evaluation": results,
                   "off_policy_validation": evaluation.get("off_policy_validation"),
                   "certification": certification,
                   "wall_time_s": round(time.perf_counter() - run.started, 1)}
        writer.add_hparams({"agent": agent_entry.name, "seed": int(cfg.seed),
                            "train_fraction": float(cfg.train_fraction)},
                           {"hparam/remission": remission["value"],
                            "hparam/value": results["policy"]["value"]["value"]}, run_name=".")
    finally:
        writer.close()
    write_json_atomic(run_dir / "metrics.json", metrics)
    (run_dir / "checkpoint.pt").unlink(missing_ok=True)
    behaviour = results["behaviour"]["remission"]
    print(f"{agent_entry.name} seed {cfg.seed}: remission {100 * remission['value']:.1f} % "
          f"[{100 * remission['low']:.1f}, {100 * remission['high']:.1f}] vs behaviour "
          f"{100 * behaviour['value']:.1f} %; blocked actions {results['policy']['blocked_actions_chosen']}; "
          f"{metrics['wall_time_s']:.0f} s -> {run_dir}")
    return float(remission["value"])


def run(cfg: DictConfig) -> float:
    """One training run, start to finish (``python train.py``)."""
    job = start_run(cfg)
    try:
        data, parts = train_run(job)
    except BaseException:
        job.writer.close()
        raise
    return finish_run(job, data, parts)

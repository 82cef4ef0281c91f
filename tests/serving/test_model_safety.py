"""Model safety for every agent in the registry: no blocked suggestion, item 9 >= 2 -> one critical referral.

Each registered agent (iterated from :mod:`agents.registry`, so a new one is covered
without touching this file) is built with tiny settings, trained briefly (a few hundred
offline updates on the small logged data, a few hundred online timesteps in the
simulator), exported, prepared for serving and loaded by the recommender. Barely
trained policies are what we want: their scores are arbitrary, and arbitrary scores
are exactly what must never leak into a suggestion a clinical rule blocks.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from agents import available, entry, make_agent, registry
from agents.common.replay import replay_from_transitions
from envs.rules import action_mask
from envs.spec import ACTION_LABELS, ACTION_NAMES, BASE_FEATURES, FEATURE_INDEX, N_ACTIONS
from offline_data.dataset import load_dataset
from serving.cds_hooks import SERVICE_ID, TOP_K, build_card
from serving.fhir_input import features_from_prefetch
from serving.patient import ITEM9_MISSING_ALERT
from serving.prepare import prepare_bundle
from serving.recommender import Recommender
from serving.schemas import Recommendation
from tests.serving.conftest import PATIENT, SMALL_PREPARE
from tests.serving.test_cds_hooks import PATIENT_ID, hook_call, prefetch
from tests.serving.test_recommender import _feature_value

AGENTS = available()
AGENT_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "agent"
REFER = "refer_specialist"
ALL_BUT_REFERRAL = frozenset(ACTION_NAMES) - {REFER}

#: The smallest settings of every kind, applied where the agent's config has the field.
TINY: dict[str, Any] = {
    "n_updates": 300, "batch_size": 64, "target_update_interval": 100,  # offline
    "total_timesteps": 256, "n_envs": 2, "vec_env": "dummy",  # online
    "hidden": (16,), "device": "cpu", "seed": 0,
}
#: Caps on the SB3 options of ``configs/agent/<name>.yaml`` (rollout length, replay size, warm-up).
ALGO_CAPS: dict[str, int] = {"n_steps": 64, "batch_size": 64, "buffer_size": 2_000, "learning_starts": 0}

PROPERTY = settings(max_examples=100, derandomize=True, database=None, deadline=None)
CARDS = settings(max_examples=20, derandomize=True, database=None, deadline=None)

patient_states = st.fixed_dictionaries({name: _feature_value(name) for name in BASE_FEATURES})


def tiny_params(name: str) -> dict[str, Any]:
    """The agent's Hydra params (``configs/agent/<name>.yaml``, if any) shrunk to test size."""
    path = AGENT_CONFIGS / f"{name}.yaml"
    loaded = yaml.safe_load(path.read_text()) if path.is_file() else None
    params: dict[str, Any] = dict(loaded.get("params") or {}) if isinstance(loaded, dict) else {}
    fields = {f.name for f in dataclasses.fields(entry(name).config_cls)}
    params.update({key: value for key, value in TINY.items() if key in fields})
    if isinstance(params.get("algo_kwargs"), dict):
        params["algo_kwargs"] = {key: min(value, ALGO_CAPS[key]) if key in ALGO_CAPS else value
                                 for key, value in params["algo_kwargs"].items()}
    return params


@pytest.fixture(scope="module")
def served_agents(tmp_path_factory: pytest.TempPathFactory, logged_path: Path) -> Iterator[dict[str, Recommender]]:
    """Every registered agent, tiny and briefly trained, exported, prepared and loaded for serving."""
    # one thread: these networks are tiny, and on a busy machine a second thread costs 10-30x in waiting
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield build_all(tmp_path_factory, logged_path)
    finally:
        torch.set_num_threads(threads)


def build_all(tmp_path_factory: pytest.TempPathFactory, logged_path: Path) -> dict[str, Recommender]:
    logged = load_dataset(logged_path)
    transitions = logged.transitions()
    folder = tmp_path_factory.mktemp("safety_bundles")
    served: dict[str, Recommender] = {}
    for name in AGENTS:
        kind = entry(name).kind
        agent = make_agent(name, tiny_params(name))
        if kind == "offline":
            agent.fit(replay_from_transitions(transitions, seed=0), progress=False)
        elif kind == "online":
            agent.fit(progress=False)
        else:  # pragma: no cover - a new kind needs a recipe here
            pytest.fail(f"agent {name!r} is of kind {kind!r}: teach this fixture how to train it")
        bundle = agent.export(folder / name, name=f"safety-{name}")
        prepare_bundle(bundle, logged, SMALL_PREPARE, progress=False)
        served[name] = Recommender(bundle)
    return served


def check_safe(recommender: Recommender, features: Mapping[str, Any], answer: Recommendation, top_k: int) -> None:
    """The promises serving keeps whatever the policy's scores."""
    obs = recommender.observation(features)
    mask = action_mask(obs[None, :])[0]
    allowed = {ACTION_NAMES[a] for a in range(N_ACTIONS) if mask[a]}
    suggested = [s.action for s in answer.suggestions]
    blocked = {b.action for b in answer.blocked}
    assert suggested, "no suggestion at all"
    assert set(suggested) <= allowed, f"blocked action suggested: {sorted(set(suggested) - allowed)}"
    assert not set(suggested) & blocked
    assert blocked == set(ACTION_NAMES) - allowed and all(b.rules for b in answer.blocked)
    assert len(suggested) == len(set(suggested)) == min(top_k, len(allowed))
    if features.get("phq9_item9") is None:  # the self-harm rule could not be checked: say so
        assert ITEM9_MISSING_ALERT in answer.alerts
    if obs[FEATURE_INDEX["phq9_item9"]] >= 2:
        assert suggested == [REFER]
        assert answer.critical and answer.suggestions[0].critical
        assert answer.alerts[0].startswith("CRITICAL")
    else:
        assert not answer.critical and not any(s.critical for s in answer.suggestions)


def check_card(card: Mapping[str, Any], item9_high: bool, allowed: set[str]) -> None:
    """A CDS Hooks card: critical with one stat referral for item 9 >= 2; only allowed actions."""
    actions = [s["actions"][0]["resource"]["code"]["coding"][0]["code"] for s in card["suggestions"]]
    assert actions and set(actions) <= allowed, f"blocked action on the card: {sorted(set(actions) - allowed)}"
    if item9_high:
        assert card["indicator"] == "critical"
        assert actions == [REFER] and card["suggestions"][0]["isRecommended"]
        assert card["suggestions"][0]["label"] == ACTION_LABELS[REFER]
        assert card["suggestions"][0]["actions"][0]["resource"]["priority"] == "stat"
    else:
        assert card["indicator"] != "critical"
        assert all(s["actions"][0]["resource"]["priority"] == "routine" for s in card["suggestions"])


def allowed_actions(recommender: Recommender, features: Mapping[str, Any]) -> set[str]:
    mask = action_mask(recommender.observation(features)[None, :])[0]
    return {ACTION_NAMES[a] for a in range(N_ACTIONS) if mask[a]}


# ------------------------------------------------------------------ coverage


def test_every_registered_agent_is_served(served_agents: dict[str, Recommender]) -> None:
    assert set(served_agents) == set(registry.AGENTS)
    assert {entry(name).kind for name in served_agents} == {"offline", "online"}
    for name, recommender in served_agents.items():
        assert recommender.policy.name == f"safety-{name}"


# ------------------------------------------------------------------ the property, per agent


@pytest.mark.parametrize("name", AGENTS)
@PROPERTY
@given(features=patient_states, top_k=st.integers(1, N_ACTIONS))
def test_no_agent_ever_suggests_a_blocked_action(served_agents: dict[str, Recommender], name: str,
                                                 features: dict[str, float | int | None], top_k: int) -> None:
    recommender = served_agents[name]
    answer = recommender.recommend(features, top_k=top_k, explain=False)
    check_safe(recommender, features, answer, top_k)


@pytest.mark.parametrize("name", AGENTS)
@CARDS
@given(features=patient_states)
def test_no_agent_puts_a_blocked_action_on_a_cds_card(served_agents: dict[str, Recommender], name: str,
                                                      features: dict[str, float | int | None]) -> None:
    recommender = served_agents[name]
    answer = recommender.recommend(features, top_k=TOP_K, explain=True)  # as the patient-view endpoint does
    check_safe(recommender, features, answer, TOP_K)
    card = build_card(answer, [], card_uuid=uuid.uuid4(), patient_id="pt-safety")
    high = recommender.observation(features)[FEATURE_INDEX["phq9_item9"]] >= 2
    check_card(card, bool(high), allowed_actions(recommender, features))


def cds_app(recommender: Recommender, tmp_path: Path) -> tuple[Any, dict[str, str]]:
    """An app serving one already loaded recommender, and the headers of a recommend token."""
    from serving.app import ServeSettings, create_app
    from serving.auth import TokenStore
    from serving.db import make_engine

    db_url = f"sqlite:///{tmp_path / 'audit.sqlite'}"
    headers = {"Authorization": f"Bearer {TokenStore(make_engine(db_url)).create('safety-clinic')}"}
    app = create_app(ServeSettings(policies=[], db_url=db_url, allow_uncertified=True),
                     recommenders={recommender.policy.name: recommender})
    return app, headers


@pytest.mark.parametrize("name", AGENTS)
def test_patient_view_endpoint_card_is_safe_for_every_item9(served_agents: dict[str, Recommender], name: str,
                                                            tmp_path: Path) -> None:
    recommender = served_agents[name]
    app, headers = cds_app(recommender, tmp_path)
    with TestClient(app) as client:
        for medications in (True, False):
            for item9 in range(4):
                now = datetime.now(UTC)
                data = prefetch(now, item9=item9, medications=medications)
                features, _ = features_from_prefetch(data, now, patient_id=PATIENT_ID)
                assert features["phq9_item9"] == item9
                answer = client.post(f"/cds-services/{SERVICE_ID}", headers=headers, json=hook_call(data))
                assert answer.status_code == 200, answer.text
                (card,) = answer.json()["cards"]
                check_card(card, item9 >= 2, allowed_actions(recommender, features))
                if not medications:  # no antidepressant: nothing to raise, switch within class or augment
                    actions = {s["actions"][0]["resource"]["code"]["coding"][0]["code"] for s in card["suggestions"]}
                    assert not {"raise_dose", "switch_within_class", "augment"} & actions


# ------------------------------------------------------------------ adversarial: rule boundaries


TAPER = "taper_antidepressant"

#: PATIENT blocks nothing but the taper (every rule feature given); each case changes a few features and says,
#: independently of envs.rules, which actions must be blocked.
BOUNDARIES: dict[str, tuple[dict[str, Any], frozenset[str]]] = {
    "nothing_blocked": ({}, frozenset()),
    "weeks_on_dose_1": ({"weeks_on_dose": 1}, frozenset({"raise_dose"})),
    "weeks_on_dose_1.5": ({"weeks_on_dose": 1.5}, frozenset({"raise_dose"})),
    "weeks_on_dose_2": ({"weeks_on_dose": 2}, frozenset()),
    "weeks_on_step_1": ({"weeks_on_step": 1}, frozenset({"switch_within_class", "switch_class", "augment"})),
    "weeks_on_step_2": ({"weeks_on_step": 2}, frozenset()),
    "dose_0": ({"dose_level": 0}, frozenset({"raise_dose", "switch_within_class", "augment"})),
    "dose_0_first_week": ({"dose_level": 0, "weeks_on_step": 0, "weeks_on_dose": 0},
                          frozenset({"raise_dose", "switch_within_class", "augment"})),
    "dose_1": ({"dose_level": 1}, frozenset()),
    "dose_3": ({"dose_level": 3}, frozenset({"raise_dose"})),
    "no_digital_access": ({"digital_access": 0, "on_digital": 0},
                          frozenset({"add_digital_guided", "add_digital_unguided"})),
    "on_guided_digital": ({"on_digital": 1}, frozenset({"add_digital_guided", "add_digital_unguided"})),
    "on_unguided_digital": ({"on_digital": 2}, frozenset({"add_digital_guided", "add_digital_unguided"})),
    "augmented": ({"on_augmentation": 1}, frozenset({"augment"})),
    "in_psychotherapy": ({"on_psychotherapy": 1}, frozenset({"add_psychotherapy"})),
    "in_specialist_care": ({"in_specialist_care": 1}, frozenset({REFER})),
    "item9_1": ({"phq9_item9": 1}, frozenset()),
    # a taper needs 26 weeks of sustained remission on an antidepressant
    "weeks_well_25": ({"weeks_well": 25, "phq9": 3}, frozenset({TAPER})),
    "weeks_well_26": ({"weeks_well": 26, "phq9": 3}, frozenset()),
    "weeks_well_26_no_drug": ({"weeks_well": 26, "phq9": 3, "dose_level": 0},
                              frozenset({"raise_dose", "switch_within_class", "augment", TAPER})),
    "item9_2": ({"phq9_item9": 2}, ALL_BUT_REFERRAL),
    "item9_3_in_specialist_care": ({"phq9_item9": 3, "in_specialist_care": 1}, ALL_BUT_REFERRAL),
    "item9_2_every_rule_on": ({"phq9_item9": 2, "in_specialist_care": 1, "dose_level": 0, "weeks_on_step": 0,
                               "weeks_on_dose": 0, "on_augmentation": 1, "on_psychotherapy": 1, "on_digital": 2,
                               "digital_access": 0}, ALL_BUT_REFERRAL),
    "every_rule_on_but_item9": ({"in_specialist_care": 1, "dose_level": 3, "weeks_on_step": 1, "weeks_on_dose": 1,
                                 "on_augmentation": 1, "on_psychotherapy": 1, "on_digital": 1, "digital_access": 0},
                                frozenset(ACTION_NAMES) - {"continue", "engagement_nudge"}),
}


@pytest.mark.parametrize("name", AGENTS)
@pytest.mark.parametrize("case", list(BOUNDARIES))
def test_rule_boundaries_for_every_agent(served_agents: dict[str, Recommender], name: str, case: str) -> None:
    changes, must_block = BOUNDARIES[case]
    if "weeks_well" not in changes:  # PATIENT is not in sustained remission: no taper yet
        must_block = must_block | {TAPER}
    features = {**PATIENT, **changes}
    recommender = served_agents[name]
    for top_k in (1, 3, N_ACTIONS):
        answer = recommender.recommend(features, top_k=top_k, explain=False)
        check_safe(recommender, features, answer, top_k)
        assert {b.action for b in answer.blocked} == must_block
    # with room for every step, exactly the allowed ones are shown
    assert {s.action for s in answer.suggestions} == set(ACTION_NAMES) - must_block


@pytest.mark.parametrize("name", AGENTS)
@pytest.mark.parametrize("missing", [(), ("in_specialist_care",), tuple(f for f in BASE_FEATURES if f != "phq9_item9")],
                         ids=["all_given", "specialist_care_missing", "only_item9_given"])
def test_high_item9_in_specialist_care_is_still_one_critical_referral(served_agents: dict[str, Recommender], name: str,
                                                                      missing: tuple[str, ...]) -> None:
    """The referral rule's exemption: a patient already in specialist care with item 9 = 3 is re-referred."""
    recommender = served_agents[name]
    features: dict[str, Any] = {**PATIENT, "phq9_item9": 3, "in_specialist_care": 1}
    features.update(dict.fromkeys(missing))
    for top_k in range(1, N_ACTIONS + 1):
        answer = recommender.recommend(features, top_k=top_k, explain=top_k == 1)
        check_safe(recommender, features, answer, top_k)
        assert [s.action for s in answer.suggestions] == [REFER] and answer.suggestions[0].critical
        assert {b.action for b in answer.blocked} == ALL_BUT_REFERRAL
        assert not any(r.name == "already_referred" for b in answer.blocked for r in b.rules)
    card = build_card(answer, [], card_uuid=uuid.uuid4(), patient_id="pt-safety")
    check_card(card, True, {REFER})

"""Shared serving fixtures: one small prepared policy bundle per session, an app with a token."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from envs.spec import N_ACTIONS, N_FEATURES
from offline_data.dataset import load_dataset
from offline_data.generate import generate
from policies.bundle import ActionSelection, BundleManifest, save_bundle
from policies.networks import NetworkSpec, PolicyNetwork
from serving.benefit import BenefitConfig
from serving.prepare import PrepareConfig, prepare_bundle

#: A few seconds of preparation: enough to exercise every piece, not to be accurate.
SMALL_PREPARE = PrepareConfig(background_size=8, max_rows=2000,
                              benefit=BenefitConfig(members=3, horizon_weeks=4, updates_per_iteration=15,
                                                    hidden=(16,)))

#: A typical patient as a clinician would enter one (base features by name).
PATIENT = {
    "phq9": 18, "phq9_item9": 1, "gad7": 12, "phq9_change_4w": 4, "phq9_at_intake": 20, "treatment_level": 1,
    "weeks_on_step": 6, "dose_level": 2, "weeks_on_dose": 4, "on_psychotherapy": 0, "on_digital": 0,
    "on_augmentation": 0, "in_specialist_care": 0, "digital_access": 1, "weeks_in_care": 6, "age_band": 1,
    "sex": 0, "adherence": 0.8, "engagement": 0.7,
}


@pytest.fixture(scope="session")
def logged_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("serving_data") / "stard.parquet"
    generate(path, policy="stard", epsilon=0.3, patients=200, seed=0)
    return path


def make_prepared_bundle(folder: Path, data: Path, name: str = "serving-test-policy",
                         output: str = "q_values") -> Path:
    torch.manual_seed(0)
    net = PolicyNetwork(NetworkSpec(N_FEATURES, N_ACTIONS, hidden=(16,), output=output))  # type: ignore[arg-type]
    manifest = BundleManifest(algorithm="cql" if output == "q_values" else "bc", name=name, network=net.spec,
                              selection=ActionSelection("greedy"))
    save_bundle(folder, net, manifest)
    prepare_bundle(folder, load_dataset(data), SMALL_PREPARE, progress=False)
    return folder


@pytest.fixture(scope="session")
def prepared_bundle(tmp_path_factory: pytest.TempPathFactory, logged_path: Path) -> Path:
    return make_prepared_bundle(tmp_path_factory.mktemp("bundles") / "policy", logged_path)


@dataclass
class Served:
    client: TestClient
    token: str
    db_url: str
    headers: dict[str, str]


@pytest.fixture()
def served(prepared_bundle: Path, tmp_path: Path) -> Iterator[Served]:
    """The app over the prepared bundle with a fresh SQLite audit store and a recommend+feedback token."""
    from serving.app import ServeSettings, create_app
    from serving.auth import TokenStore
    from serving.db import make_engine

    db_url = f"sqlite:///{tmp_path / 'audit.sqlite'}"
    token = TokenStore(make_engine(db_url)).create("test-clinic")
    app = create_app(ServeSettings(policies=[prepared_bundle], db_url=db_url, allow_uncertified=True))
    with TestClient(app) as client:
        yield Served(client, token, db_url, {"Authorization": f"Bearer {token}"})

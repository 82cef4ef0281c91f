import json
import pickle

import numpy as np
import pytest
import torch

from envs.rules import action_mask
from envs.spec import ACTION_NAMES, FEATURE_NAMES, N_ACTIONS, N_FEATURES, Action
from policies.bundle import (
    ActionSelection,
    BundleError,
    BundleManifest,
    BundlePolicy,
    load,
    save_bundle,
)
from policies.networks import NetworkSpec, PolicyNetwork
from tests.conftest import make_obs


def make_network(output="q_values", ensemble=1, seed=0):
    torch.manual_seed(seed)
    spec = NetworkSpec(N_FEATURES, N_ACTIONS, hidden=(32, 32), output=output, ensemble=ensemble)
    net = PolicyNetwork(spec)
    net.set_normalization(torch.arange(N_FEATURES, dtype=torch.float32), torch.full((N_FEATURES,), 2.0))
    return net


def saved(tmp_path, output="q_values", selection=None, ensemble=1):
    net = make_network(output, ensemble)
    manifest = BundleManifest(algorithm="cql", name="test-policy", network=net.spec,
                              selection=selection or ActionSelection(), config={"lr": 3e-4})
    return save_bundle(tmp_path / "policy", net, manifest), net


def obs_batch():
    rows = [make_obs(phq9=p, weeks_on_step=w, phq9_item9=i) for p, w, i in ((15, 6, 0), (8, 1, 0), (20, 12, 2))]
    return np.concatenate(rows)


def test_round_trip_reproduces_the_network_exactly(tmp_path):
    path, net = saved(tmp_path)
    policy = load(path)
    obs = obs_batch()
    expected = net(torch.as_tensor(obs)).detach().double().numpy()
    assert np.array_equal(policy.q_values(obs), expected)
    manifest = json.loads((path / "bundle.json").read_text())
    assert manifest["feature_names"] == list(FEATURE_NAMES)
    assert manifest["action_names"] == list(ACTION_NAMES)
    assert len(manifest["weights_sha256"]) == 64 and manifest["config"] == {"lr": 3e-4}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder left behind"


def test_greedy_and_softmax_respect_the_mask(tmp_path):
    obs = obs_batch()
    mask = action_mask(obs)
    for selection in (ActionSelection(), ActionSelection("softmax", temperature=0.5),
                      ActionSelection("greedy", epsilon=0.2)):
        policy = load(saved(tmp_path / selection.kind / str(selection.epsilon), selection=selection)[0])
        probs = policy.action_probs(obs, mask)
        assert np.allclose(probs.sum(axis=1), 1.0)
        assert np.all(probs[~mask] == 0.0)
        assert probs[2, Action.REFER_SPECIALIST] == 1.0  # item 9 = 2: the only allowed action
    greedy = load(saved(tmp_path / "g2")[0])
    q = np.where(mask, greedy.q_values(obs), -np.inf)
    assert np.array_equal(greedy.action_probs(obs, mask).argmax(axis=1), q.argmax(axis=1))


def test_logit_policies_have_no_q_values_and_ensembles_average(tmp_path):
    logits = load(saved(tmp_path / "bc", output="logits")[0])
    with pytest.raises(ValueError, match="outputs logits, not Q-values"):
        logits.q_values(obs_batch())
    ens = load(saved(tmp_path / "ens", output="q_ensemble", ensemble=3)[0])
    members = ens.q_ensemble(obs_batch())
    assert members.shape == (3, 3, N_ACTIONS)
    assert np.allclose(ens.q_values(obs_batch()), members.mean(axis=0))


def test_changed_weights_are_refused(tmp_path):
    path, _ = saved(tmp_path)
    data = bytearray((path / "weights.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (path / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 .* does not match .* refusing to load"):
        load(path)


def test_a_pickle_where_weights_belong_is_never_unpickled(tmp_path):
    path, _ = saved(tmp_path)

    class Boom:
        def __reduce__(self):
            return (pytest.fail, ("the pickle was executed",))

    payload = pickle.dumps(Boom())
    (path / "weights.safetensors").write_bytes(payload)
    manifest = json.loads((path / "bundle.json").read_text())
    import hashlib

    manifest["weights_sha256"] = hashlib.sha256(payload).hexdigest()  # even with a matching hash
    (path / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="not a safetensors file"):
        load(path)


@pytest.mark.parametrize("field, value, message", [
    ("format", "something-else", "field 'format'"),
    ("format_version", 99, "unsupported format_version"),
    ("feature_names", ["phq9"], "feature_names"),
    ("action_names", list(reversed(ACTION_NAMES)), "action_names"),
    ("network", {"n_in": N_FEATURES, "n_out": N_ACTIONS, "hidden": [64]}, "weights do not fit"),
    ("network", {"n_in": 5, "n_out": N_ACTIONS}, "network sizes"),
    ("selection", {"kind": "boltzmann"}, "action selection must be"),
    ("name", 7, "field 'name'"),
])
def test_tampered_manifest_is_refused_with_the_field(tmp_path, field, value, message):
    path, _ = saved(tmp_path)
    manifest = json.loads((path / "bundle.json").read_text())
    manifest[field] = value
    (path / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        load(path)


def test_missing_or_broken_files_are_named(tmp_path):
    path, _ = saved(tmp_path)
    (path / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="bundle.json: not valid JSON"):
        load(path)
    (path / "weights.safetensors").unlink()
    with pytest.raises(BundleError, match="missing weights.safetensors"):
        load(path)
    with pytest.raises(BundleError, match="not a policy bundle folder"):
        load(tmp_path / "nowhere")


def test_existing_bundle_is_not_overwritten_by_accident(tmp_path):
    path, net = saved(tmp_path)
    manifest = BundleManifest(algorithm="cql", name="again", network=net.spec)
    with pytest.raises(FileExistsError):
        save_bundle(path, net, manifest)
    save_bundle(path, net, manifest, overwrite=True)
    assert isinstance(load(path), BundlePolicy) and load(path).name == "again"


def test_a_bundle_of_an_older_spec_version_is_refused_naming_the_version(tmp_path):
    from envs.spec import SPEC_VERSION
    from policies import BundleError, load
    from policies.bundle import BundleManifest, save_bundle
    from policies.networks import NetworkSpec, PolicyNetwork

    net = PolicyNetwork(NetworkSpec(N_FEATURES, N_ACTIONS, hidden=(8,), output="q_values"))
    torch.manual_seed(0)
    folder = save_bundle(tmp_path / "b", net, BundleManifest(algorithm="cql", name="b", network=net.spec))
    manifest = json.loads((folder / "bundle.json").read_text())
    manifest["spec_version"] = SPEC_VERSION - 1
    (folder / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=rf"bundle spec version {SPEC_VERSION - 1}, this carepath serves spec "
                                          rf"version {SPEC_VERSION} \(version 2 added the action taper_antidepressant"):
        load(folder)

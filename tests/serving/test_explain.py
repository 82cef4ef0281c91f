"""The network explainer: the same values as shap's DeepExplainer, additive, and exact where Shapley
values are known in closed form."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
import shap
import torch
from numpy.typing import NDArray
from torch import nn

from policies.networks import NetworkSpec, PolicyNetwork
from serving.explain import Explainer, NetworkExplainer


class _ClipAsReLU(nn.Module):
    """clamp(x, -c, c) = x - relu(x - c) + relu(-x - c): a form shap's DeepExplainer can follow."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c, self.upper, self.lower = c, nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.upper(x - self.c) + self.lower(-x - self.c)


class _Scores(nn.Module):
    """The policy's scores (BundlePolicy.outputs) as one torch module, in float64, for shap."""

    def __init__(self, network: PolicyNetwork) -> None:
        super().__init__()
        self.net = copy.deepcopy(network).double()
        clip = network.spec.extra.get("clip_obs")
        self.clip = _ClipAsReLU(float(clip)) if clip is not None else None

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = (obs - self.net.obs_mean) / self.net.obs_std
        if self.clip is not None:
            x = self.clip(x)
        spec = self.net.spec
        if spec.output == "q_ensemble":
            return torch.stack([head(x) for head in self.net.heads]).mean(dim=0)
        out = self.net.heads[0](x)
        return out[:, : spec.n_out // 2] if spec.output == "q_bcq" else out


def _score_fn(network: PolicyNetwork) -> Callable[[NDArray[np.float64]], NDArray[np.float64]]:
    scores = _Scores(network)
    return lambda rows: scores(torch.as_tensor(rows)).detach().numpy()


def _network(seed: int, n_in: int, **spec: object) -> PolicyNetwork:
    torch.manual_seed(seed)
    net = PolicyNetwork(NetworkSpec(n_in=n_in, **spec))  # type: ignore[arg-type]
    rng = np.random.default_rng(seed)
    net.set_normalization(torch.as_tensor(rng.normal(0, 2, n_in), dtype=torch.float32),
                          torch.as_tensor(rng.uniform(0.5, 3, n_in), dtype=torch.float32))
    return net


CASES = [
    dict(n_out=11, hidden=(64, 64), activation="relu", output="q_values"),
    dict(n_out=11, hidden=(64, 64), activation="tanh", output="logits", extra={"clip_obs": 1.5}),
    dict(n_out=11, hidden=(32,), activation="elu", output="q_ensemble", ensemble=3),
    dict(n_out=22, hidden=(16, 16, 16), activation="relu", output="q_bcq", extra={"threshold": 0.3}),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['activation']}-{c['output']}")
def test_values_equal_shap_deep_explainer_and_add_up(case: dict[str, object]) -> None:
    rng = np.random.default_rng(1)
    net = _network(1, 32, **case)
    background = rng.normal(0, 3, (16, 32))
    ours = NetworkExplainer(net, background)
    theirs = shap.DeepExplainer(_Scores(net), torch.as_tensor(background))
    for _ in range(4):
        x = background[rng.integers(16)] + rng.normal(0, 4, 32)  # far enough out to cross the clip
        mine = ours.explain(x)
        reference = np.asarray(theirs.shap_values(torch.as_tensor(x[None, :]), check_additivity=False))[0]
        np.testing.assert_allclose(mine.values, reference, atol=1e-8)
        scores = _Scores(net)(torch.as_tensor(x[None, :])).detach().numpy()[0]
        np.testing.assert_allclose(mine.scores, scores, atol=1e-10)
        # summation to delta: values add up to score minus base value (the issue asks 1e-4)
        np.testing.assert_allclose(mine.values.sum(axis=0) + mine.base_values, mine.scores, atol=1e-10)


def test_a_linear_network_gets_exactly_the_shapley_values() -> None:
    """Shapley values of a linear model against an independent background are w (x - mean b):
    shap's permutation explainer is exact there too (every permutation gives the same values)."""
    rng = np.random.default_rng(2)
    net = _network(2, 32, n_out=11, hidden=(), output="q_values")
    background = rng.normal(0, 1, (8, 32))
    x = rng.normal(0, 2, 32)
    mine = NetworkExplainer(net, background).explain(x)
    with torch.no_grad():
        head = net.heads[0]
        assert isinstance(head, nn.Sequential)
        linear = head[0]
        assert isinstance(linear, nn.Linear)
        weight = linear.weight.double().numpy() / net.obs_std.double().numpy()
    np.testing.assert_allclose(mine.values, (weight * (x - background.mean(axis=0))).T, atol=1e-9)
    permutation = Explainer(_score_fn(net), background)
    np.testing.assert_allclose(mine.values, permutation.explain(x).values, atol=1e-6)


def test_small_relu_networks_agree_with_exact_shapley_values() -> None:
    """On 5 features shap's ExactExplainer enumerates every coalition. DeepLIFT is not Shapley in
    general, but on small ReLU policies it must point at the same features with close values."""
    for seed in range(3):
        rng = np.random.default_rng(seed)
        net = _network(seed, 5, n_out=3, hidden=(16, 16), activation="relu", output="q_values")
        background = rng.normal(0, 1, (10, 5))
        exact = shap.ExactExplainer(_score_fn(net),
                                    shap.maskers.Independent(background, max_samples=10))
        for _ in range(3):
            x = rng.normal(0, 2, 5)
            mine = NetworkExplainer(net, background).explain(x).values
            reference = np.asarray(exact(x[None, :]).values)[0]
            np.testing.assert_allclose(mine.sum(axis=0), reference.sum(axis=0), atol=1e-6)  # both additive
            assert np.corrcoef(mine.ravel(), reference.ravel())[0, 1] > 0.97  # measured 0.98-0.997
            scale = np.abs(reference).max()
            assert np.abs(mine - reference).max() < 0.4 * scale  # measured 5-24 % of the largest value


def test_a_background_of_the_wrong_width_is_refused() -> None:
    with pytest.raises(ValueError, match=r"shape \(k, 32\)"):
        NetworkExplainer(_network(0, 32, n_out=11), np.zeros((4, 31)))
    with pytest.raises(ValueError, match="32 features"):
        NetworkExplainer(_network(0, 32, n_out=11), np.zeros((4, 32))).explain(np.zeros(31))

import json

import numpy as np

from envs.params import EnvSettings
from envs.spec import ACTION_NAMES, MASKABLE_FEATURES
from offline_data.dataset import load_dataset
from offline_data.describe import describe, format_description
from offline_data.generate import generate


def test_describe_reports_counts_outcomes_missingness_and_subgroups(tmp_path):
    path = tmp_path / "d.parquet"
    generate(path, policy="usual_care", epsilon=0.2, patients=123, seed=4, settings=EnvSettings(horizon=8))
    data = load_dataset(path)
    d = describe(data)
    f = data.frame
    assert d.patients == 123 and d.episodes == 123 and d.weeks == len(f)
    counts = {a["action"]: a["count"] for a in d.actions}
    assert counts == {name: int((f.action == i).sum()) for i, name in enumerate(ACTION_NAMES)}
    assert abs(d.mean_reward - float(f.reward.mean())) < 1e-6
    last = data.starts[1:] - 1
    assert d.share_terminated == float(f.terminated[last].mean()) and d.share_terminated + d.share_truncated == 1
    assert set(d.missing_share) == set(MASKABLE_FEATURES) and 0 < d.missing_share["phq9"] < 1
    assert sum(d.subgroups["sex"].values()) == 123 and set(d.subgroups) == {"sex", "age_band", "digital_access"}

    text = format_description(d)
    assert "123" in text and f"{len(f):,}" in text
    for name, count in counts.items():
        assert name in text and f"{count:,}" in text
    for name in MASKABLE_FEATURES:
        assert name in text
    assert "usual_care (epsilon 0.2)" in text and "behaviour probabilities: logged" in text
    assert "age_band" in text and "left care" in text
    json.dumps(d.as_dict())  # serialisable
    assert np.isfinite(d.mean_return)

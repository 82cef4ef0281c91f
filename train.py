"""Train a policy by Hydra config: build env / data / agent, train, evaluate, save a bundle.

    python train.py                         # discrete CQL on generated STAR*D data
    python train.py agent=maskable_ppo      # an online agent in the simulator
    python train.py experiment=smoke        # under a minute: what the tests run
    python train.py -m agent=bc,cql,bcq seed=0,1,2
    python train.py -m hydra/launcher=batched agent=cql seed=0,1,2,3,4,5,6,7   # one stacked model

A run folder (``runs/<name>/seed<seed>``) holds the resolved config, a
checkpoint while training, ``metrics.json``, TensorBoard events and
``policy/`` (the bundle). Rerunning the same command resumes an interrupted
run from its checkpoint. The job itself is :mod:`carepath.training`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from carepath.training import run


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    return run(cfg)


if __name__ == "__main__":
    main()

"""Logged (offline) care data: one row per patient-week.

- :mod:`offline_data.schema` — the columns, their types and ranges, the metadata keys.
- :mod:`offline_data.generate` — simulated logs under a baseline behaviour policy.
- :mod:`offline_data.io` / :mod:`offline_data.parse` / :mod:`offline_data.validate` — files read
  (CSV as text), columns typed, every row checked; problems named by file, row and column.
- :mod:`offline_data.frame` — a validated log in memory (typed numpy columns) and its Arrow form.
- :mod:`offline_data.importer` / :mod:`offline_data.pseudonymise` / :mod:`offline_data.behavior` —
  real-world logs: keyed pseudonyms, identifiers and dates removed, behaviour probabilities estimated.
- :mod:`offline_data.dataset` — training arrays (transitions, padded episodes) and patient splits.
- :mod:`offline_data.describe` — the summary ``carepath data describe`` prints.
- :mod:`offline_data.cli` / :mod:`offline_data.config` — ``carepath data generate | import | describe``,
  with generation settings from ``configs/data/`` (the ``data`` group train.py composes too).

Imports only :mod:`envs` and :mod:`policies`. Submodules are imported on use,
so ``import offline_data`` stays cheap.
"""

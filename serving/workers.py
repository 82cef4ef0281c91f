"""Several server processes: ``carepath serve --workers N``.

One Python process answers one request at a time on one core (the policy, the
SHAP rationale and the audit insert all hold the GIL), so a second core only
helps through a second process. uvicorn starts the workers (spawned, not forked:
torch and SQLAlchemy pools do not survive a fork) and each builds its own app
from the settings the parent passes in an environment variable.

What stays correct across processes:

- Audit rows: every worker writes through its own engine to the one store
  (SQLite in WAL mode with durable commits, or PostgreSQL); an answer is sent only
  after its row is committed, in whichever worker answered.
- Tokens: read from the store, so a token created or revoked is seen by every
  worker (each caches a check for ``token_cache_seconds``, as one worker does).
- Explanations: seeded per call, so the same request gets the same rationale
  from any worker.
- The rate limit is kept per worker, in memory. The kernel spreads connections
  over the workers, so each worker allows ``rate / N`` requests a second and a
  burst of ``burst / N`` (at least 1) per token: together about the configured
  figures. A client holding one keep-alive connection stays on one worker and
  gets only that worker's share: the limit errs on the strict side.

The parent checks the settings first (policies load and are certified, the
store opens and its pseudonym key matches), so a bad start fails with one line
before any worker starts.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from serving.app import ServeSettings, create_app

#: The environment variable that carries the settings to the worker processes.
SETTINGS_ENV = "CAREPATH_SERVE_SETTINGS"
#: The parent's process id, for a worker to tell whether its parent is still there.
PARENT_ENV = "CAREPATH_SERVE_PARENT"
#: A file a worker that fails to start writes its error to: uvicorn then stops the parent, which
#: reads it, says it and exits non-zero (uvicorn itself returns normally with several workers).
FAILURE_ENV = "CAREPATH_SERVE_FAILURE_FILE"
#: More workers than this many per core only queue for the cores and multiply memory.
MAX_WORKERS_PER_CORE = 4


def default_workers() -> int:
    """The number of cores this process may run on."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return max(os.cpu_count() or 1, 1)


def check_workers(workers: int) -> int:
    """``workers`` if it is sane, else ValueError naming the bound."""
    bound = MAX_WORKERS_PER_CORE * default_workers()
    if not 1 <= workers <= bound:
        raise ValueError(f"--workers must be between 1 and {bound} ({MAX_WORKERS_PER_CORE} per core on this "
                         f"machine's {default_workers()}), got {workers}")
    return workers


def per_worker(settings: ServeSettings, workers: int) -> ServeSettings:
    """The settings one of ``workers`` processes runs with: its share of the rate limit."""
    if workers == 1:
        return settings
    if settings.rate_limit == 0:
        return replace(settings, workers=workers)
    return replace(settings, rate_limit=settings.rate_limit / workers,
                   rate_burst=max(1, math.ceil(settings.rate_burst / workers)), workers=workers)


def settings_to_env(settings: ServeSettings) -> str:
    body = asdict(settings)
    body["policies"] = [str(Path(p).resolve()) for p in settings.policies]
    body["cors_origins"] = list(settings.cors_origins)
    return json.dumps(body)


def settings_from_env(text: str) -> ServeSettings:
    body: dict[str, Any] = json.loads(text)
    body["cors_origins"] = tuple(body.get("cors_origins", ()))
    return ServeSettings(**body)


def preflight(settings: ServeSettings) -> None:
    """What would make every worker fail at start, checked once in the parent (ValueError, one line)."""
    from policies import load
    from serving.app import check_servable, open_audit_store
    from serving.recommender import certification_info, check_prepared

    policies = [load(path) for path in settings.policies]
    for policy in policies:
        check_prepared(policy)
    check_servable([(p.name, certification_info(p.manifest.certificate).certified) for p in policies],
                   settings.allow_uncertified)
    open_audit_store(settings).engine.dispose()


def die_with_parent() -> None:
    """Have the kernel kill this worker when the server's parent process dies (Linux), so that a
    parent killed with SIGKILL leaves no orphan worker answering on its port, unaudited by restarts."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    parent = os.environ.get(PARENT_ENV)
    if parent is not None and os.getppid() != int(parent):  # the parent died before the call above
        os._exit(1)


def app_from_env() -> Any:
    """uvicorn's app factory in each worker process."""
    import torch

    die_with_parent()
    text = os.environ.get(SETTINGS_ENV)
    if not text:
        raise RuntimeError(f"{SETTINGS_ENV} is not set: start workers with carepath serve --workers N")
    torch.set_num_threads(1)  # one core per worker: intra-op threads would fight the other workers
    try:
        return create_app(settings_from_env(text))
    except Exception as err:
        failure = os.environ.get(FAILURE_ENV)
        if failure:
            Path(failure).write_text(f"{type(err).__name__}: {err}")
        raise


__all__ = ["FAILURE_ENV", "PARENT_ENV", "SETTINGS_ENV", "app_from_env", "check_workers", "default_workers",
           "per_worker", "preflight", "settings_from_env", "settings_to_env"]

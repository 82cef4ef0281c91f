"""The FastAPI app: REST API, HL7 CDS Hooks service, clinician page, audit trail.

``create_app`` loads every policy bundle (hash-checked) and builds and warms
its explainer before the app answers anything, so the first request is as fast
as the rest. Every endpoint but ``/healthz``, CDS discovery and the page's
static files needs a bearer token (``carepath tokens create``); every answered
recommendation is committed to the audit store before the answer leaves.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from carepath import __version__
from envs.spec import ACTION_NAMES, FEATURE_NAMES
from serving.audit import AuditStore, UnknownAuditId
from serving.auth import TokenInfo, TokenStore, bearer_token
from serving.db import DEFAULT_DB_URL, make_engine, pseudonym_key
from serving.recommender import EXPLAINERS, ExplainerName, Recommender
from serving.schemas import UNPROCESSABLE, PolicySummary, RecommendationRequest, RecommendationResponse
from serving.security import RateLimiter, SecurityHeaders

log = logging.getLogger("carepath.serve")
STATIC_DIR = Path(__file__).parent / "static"


@dataclass
class ServeSettings:
    """What ``carepath serve`` is started with."""

    policies: Sequence[str | Path]
    db_url: str = DEFAULT_DB_URL
    key_file: str | None = None
    max_body_bytes: int = 64 * 1024
    #: the rationale: "deep" (DeepLIFT through the network) or "permutation" (shap, model-agnostic)
    explainer: ExplainerName = "deep"
    permutations: int = 1  # permutation explainer: one antithetic pair (exact additivity; see serving.explain)
    token_cache_seconds: float = 5.0  # a revoked token stops working within this time
    rate_limit: float = 20.0  # requests a second per token on average (0: no limit)
    rate_burst: int = 60
    cors_origins: tuple[str, ...] = ()  # closed by default: no cross-origin page can read answers
    #: serve a policy no certificate vouches for (``carepath certify``); its answers then carry a banner
    allow_uncertified: bool = False
    #: "now": build and warm the SHAP explainers before the app exists; "background": in a thread, so
    #: the server answers at once and only an explained request in its first seconds waits
    warm_explainers: str = "now"
    #: server processes sharing the rate limit (``carepath serve --workers``): each holds rate / workers
    workers: int = 1


@dataclass
class ServingState:
    """Everything a request handler needs, built once at start-up."""

    recommenders: dict[str, Recommender]
    default_policy: str
    tokens: TokenStore
    audit: AuditStore
    settings: ServeSettings
    limiter: RateLimiter = field(default_factory=RateLimiter)
    extra: dict[str, Any] = field(default_factory=dict)

    def recommender(self, name: str | None) -> Recommender:
        key = name or self.default_policy
        if key not in self.recommenders:
            raise HTTPException(404, detail=f"unknown policy {key!r}; served: {', '.join(self.recommenders)}")
        return self.recommenders[key]


async def get_state(request: Request) -> ServingState:
    # async, as every handler here: the work is short and CPU-bound, and with one worker a
    # thread-pool hop per dependency costs more than it saves
    return _state(request)


def _state(request: Request) -> ServingState:
    state: ServingState = request.app.state.carepath
    return state


StateDep = Annotated[ServingState, Depends(get_state)]


def require_scope(scope: str) -> Callable[[Request], Awaitable[TokenInfo]]:
    """A dependency: a valid bearer token (401 otherwise) that has ``scope`` (403 otherwise)."""

    async def check(request: Request) -> TokenInfo:
        state = _state(request)
        token = bearer_token(request.headers.get("authorization"))
        info = state.tokens.verify(token) if token else None
        if info is None:
            raise HTTPException(401, detail="a valid bearer token is required (carepath tokens create NAME)",
                                headers={"WWW-Authenticate": "Bearer"})
        if scope not in info.scopes:
            raise HTTPException(403, detail=f"token {info.name!r} lacks the {scope!r} scope")
        wait = state.limiter.retry_after(info.name)
        if wait > 0:
            shared = (f" (about {state.limiter.rate * state.settings.workers:g} across {state.settings.workers} "
                      "server processes)" if state.settings.workers > 1 else "")
            raise HTTPException(429, detail=f"token {info.name!r} is over its rate limit of "
                                            f"{state.limiter.rate:g} requests a second{shared}; retry in {wait:.1f} s",
                                headers={"Retry-After": str(math.ceil(wait))})
        return info

    return check


class RecommendationQuery(RecommendationRequest):
    policy: str | None = Field(None, max_length=200, description="policy name (default: the first served)")


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    audit_id: str = Field(min_length=1, max_length=64)
    suggestion_id: str = Field(min_length=1, max_length=64)
    action: Literal[ACTION_NAMES]  # type: ignore[valid-type]
    outcome: Literal["accepted", "overridden"]
    override_reason: str | None = Field(None, max_length=500)
    chosen_action: Literal[ACTION_NAMES] | None = Field(  # type: ignore[valid-type]
        None, description="what was done instead of an overridden suggestion (exported as logged data)")


class FeedbackResponse(BaseModel):
    recorded: bool
    feedback_id: int


def check_servable(policies: Sequence[tuple[str, bool]], allow_uncertified: bool) -> None:
    """ValueError when two policies (name, certified) share a name, or one is not certified and
    serving uncertified policies was not asked for."""
    names = [name for name, _ in policies]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"two policies are named {twice[0]!r}; serve each name once")
    uncertified = [name for name, certified in policies if not certified]
    if uncertified and not allow_uncertified:
        raise ValueError(f"policy {', '.join(map(repr, uncertified))} is not certified: no certificate from logged "
                         "data vouches for it against current care. Run 'carepath certify --policy BUNDLE --data LOG "
                         "--out CERTIFIED', or pass --allow-uncertified to serve it with a banner saying so")


def open_audit_store(settings: ServeSettings) -> AuditStore:
    """The audit store at ``settings.db_url``, its pseudonym key checked: a key that does not match
    the store refuses the start, naming both fingerprints, rather than answering 422 to every request."""
    audit = AuditStore(make_engine(settings.db_url), pseudonym_key(settings.db_url, settings.key_file))
    try:
        audit.check_key()
    except BaseException:
        audit.engine.dispose()
        raise
    return audit


def create_app(settings: ServeSettings, *, recommenders: dict[str, Recommender] | None = None) -> FastAPI:
    """Build the app; loads and warms every policy unless ``recommenders`` are given."""
    if not settings.policies and not recommenders:
        raise ValueError("serve needs at least one policy bundle (--policy PATH)")
    if settings.warm_explainers not in ("now", "background"):
        raise ValueError(f"warm_explainers must be 'now' or 'background', got {settings.warm_explainers!r}")
    if settings.explainer not in EXPLAINERS:
        raise ValueError(f"explainer must be one of {sorted(EXPLAINERS)}, got {settings.explainer!r}")
    if recommenders is None:
        built = [Recommender(path, permutations=settings.permutations, explainer=settings.explainer,
                             warm=True if settings.warm_explainers == "now" else "background")
                 for path in settings.policies]
        check_servable([(r.policy.name, r.info.certification.certified) for r in built], settings.allow_uncertified)
        recommenders = {r.policy.name: r for r in built}
    else:
        check_servable([(name, r.info.certification.certified) for name, r in recommenders.items()],
                       settings.allow_uncertified)
    audit = open_audit_store(settings)
    engine = audit.engine
    state = ServingState(recommenders=recommenders, default_policy=next(iter(recommenders)),
                         tokens=TokenStore(engine, cache_seconds=settings.token_cache_seconds),
                         audit=audit, settings=settings,
                         limiter=RateLimiter(settings.rate_limit, settings.rate_burst))

    app = FastAPI(title="carepath", version=__version__, docs_url=None, redoc_url=None,
                  description="Decision support for the next step of depression care: ranked next steps with "
                              "expected benefit, uncertainty and a SHAP rationale. It never acts on a patient.")
    app.router.route_class = StrictJSONRoute  # before any route: every JSON body is read by strict_json
    app.state.carepath = state
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], allow_credentials=False)
    app.add_middleware(SecurityHeaders)  # outermost: every answer gets the headers, 413s included
    app.exception_handler(ValueError)(_value_error)
    app.exception_handler(OperationalError)(_store_unavailable)
    app.exception_handler(InterfaceError)(_store_unavailable)

    @app.get("/healthz", tags=["meta"])
    async def healthz(state: StateDep) -> JSONResponse:
        states = {r.explainer_state for r in state.recommenders.values()}
        explainers = "failed" if "failed" in states else "warming" if "warming" in states else "ready"
        # a failed explainer means every explained request fails: not healthy
        return JSONResponse({"status": "ok" if explainers != "failed" else "degraded", "version": __version__,
                             "policies": list(state.recommenders), "explainers": explainers},
                            status_code=200 if explainers != "failed" else 503)

    @app.get("/v1/policies", response_model=list[PolicySummary], tags=["recommendations"])
    async def policies(state: StateDep, _: Annotated[TokenInfo, Depends(require_scope("recommend"))]) -> Any:
        return [PolicySummary(name=name, algorithm=r.policy.algorithm, version=r.info.version, created=r.info.created,
                              features=list(FEATURE_NAMES), actions=list(ACTION_NAMES),
                              evaluation_summary=r.info.evaluation_summary,
                              evaluation=r.policy.manifest.evaluation) for name, r in state.recommenders.items()]

    @app.post("/v1/recommendations", response_model=RecommendationResponse, tags=["recommendations"],
              responses=UNPROCESSABLE)
    async def recommend(body: RecommendationQuery, state: StateDep,
                  token: Annotated[TokenInfo, Depends(require_scope("recommend"))]) -> Any:
        recommender = state.recommender(body.policy)
        features = body.features.model_dump(exclude_none=True)  # type: ignore[attr-defined]
        if body.explain:
            await recommender.explainer_warmed()
        answer = recommender.recommend(features, top_k=body.top_k, explain=body.explain)
        audit_id = uuid.uuid4().hex
        response = RecommendationResponse(**answer.model_dump(), audit_id=audit_id)
        state.audit.record_recommendation(
            audit_id=audit_id, token_name=token.name, channel="rest", patient_id=body.patient_id,
            policy_name=recommender.policy.name, policy_version=recommender.info.version,
            certificate_id=recommender.info.certification.id,
            features=dict(zip(FEATURE_NAMES, map(float, recommender.observation(features)), strict=True)),
            request=body.model_dump(exclude={"patient_id"}), response=response.model_dump())
        return response

    @app.post("/v1/feedback", response_model=FeedbackResponse, tags=["recommendations"], responses=UNPROCESSABLE)
    async def feedback(body: FeedbackRequest, state: StateDep,
                 token: Annotated[TokenInfo, Depends(require_scope("feedback"))]) -> Any:
        try:
            feedback_id = state.audit.record_feedback(
                audit_id=body.audit_id, token_name=token.name, suggestion_id=body.suggestion_id,
                action=body.action, outcome=body.outcome, override_reason=body.override_reason,
                chosen_action=body.chosen_action)
        except UnknownAuditId as err:
            raise HTTPException(404, detail=str(err)) from None
        return FeedbackResponse(recorded=True, feedback_id=feedback_id)

    if (STATIC_DIR / "index.html").is_file():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

        @app.get("/", include_in_schema=False)
        async def page() -> FileResponse:
            return FileResponse(STATIC_DIR / "index.html")

    from serving.cds_hooks import build_router  # here: it imports this module's dependencies

    app.include_router(build_router())
    return app


class BodyLimit:
    """Refuse bodies over ``limit`` bytes with 413 before they are read into memory: by the
    declared Content-Length, and by counting a streamed body. Plain ASGI (Starlette's
    ``BaseHTTPMiddleware`` costs about a millisecond a request)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self._refuse(send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, detail=f"request body over {self.limit} bytes")
            return message

        await self.app(scope, counted, send)

    async def _refuse(self, send: Send) -> None:
        response = JSONResponse({"detail": f"request body over {self.limit} bytes"}, status_code=413)
        await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


#: The deepest nesting of arrays and objects a request body may have (a FHIR prefetch needs about 15).
MAX_JSON_DEPTH: Final = 64


class _Repeated(dict[str, Any]):
    """A JSON object that repeated a key (``key``)."""

    key: str = ""


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    repeated, seen = _Repeated(obj), set()
    for key, _ in pairs:
        if key in seen:
            repeated.key = key
            break
        seen.add(key)
    return repeated


def _body_error(path: list[str | int], message: str) -> HTTPException:
    """A 422 shaped like FastAPI's validation errors, ``loc`` naming the place in the body."""
    loc = ["body", *(p if isinstance(p, int) else _shown(p) for p in path)]
    return HTTPException(422, detail=[{"type": "json_invalid", "loc": loc, "msg": message}])


def _shown(text: str, limit: int = 100) -> str:
    """``text`` safe to put in an answer: lone surrogates and NUL escaped, cut at ``limit`` characters."""
    return text[:limit].encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "holds a NUL character (U+0000)"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "holds a lone surrogate (\\ud800-\\udfff escape): not Unicode text"
    return None


def strict_json(body: bytes) -> Any:
    """Parse a request body as JSON, refusing what ``json.loads`` lets through but no client should send.

    Refused with 422 (``loc`` naming the place): a key repeated in an object (parsers disagree on which
    value counts: ``{"phq9_item9": 3, "phq9_item9": 0}``), ``NaN`` and infinities (not JSON; ``1e309``
    overflows to one), strings holding NUL or lone surrogates (neither storable nor encodable), nesting
    deeper than :data:`MAX_JSON_DEPTH`, bodies that are not UTF-8. Malformed JSON raises
    ``json.JSONDecodeError``, which FastAPI answers with its own 422.
    """
    try:
        data = json.loads(body, object_pairs_hook=_json_object)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise _body_error([], f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as err:  # not UTF-8; an integer of more than 4300 digits
        raise _body_error([], f"not a JSON body: {_shown(str(err), 200)}") from None
    stack: list[tuple[Any, list[str | int]]] = [(data, [])]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict | list) and len(path) >= MAX_JSON_DEPTH:
            raise _body_error(path[:3], f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(value, _Repeated):
            raise _body_error([*path, value.key], f"key {_shown(value.key)!r} appears more than once in one object")
        if isinstance(value, dict):
            for key, item in value.items():
                if problem := _text_problem(key):
                    raise _body_error([*path, key], f"the key {problem}")
                stack.append((item, [*path, key]))
        elif isinstance(value, list):
            stack.extend((item, [*path, i]) for i, item in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            raise _body_error(path, "NaN and infinite numbers are not JSON (a number this large overflows)")
        elif isinstance(value, str) and (problem := _text_problem(value)):
            raise _body_error(path, f"the text {problem}")
    return data


class _StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_strict_json"):
            self._strict_json = strict_json(await self.body())
        return self._strict_json


class StrictJSONRoute(APIRoute):
    """A route whose JSON body is read with :func:`strict_json`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(_StrictJSONRequest(request.scope, request.receive))

        return strict


#: Seconds a client should wait before retrying while the audit store is unreachable.
STORE_RETRY_AFTER = 5


async def _store_unavailable(request: Request, err: Exception) -> JSONResponse:
    # The audit store (or the token table in it) is unreachable: PostgreSQL stopped, SQLite
    # locked. No answer leaves without its audit row, so the answer is 503, not a 500 with a
    # traceback; the engine's pool reconnects by itself once the database is back.
    log.warning("audit store unavailable (%s): answered 503", type(getattr(err, "orig", err)).__name__)
    return JSONResponse({"detail": "the audit store is unavailable, so no recommendation can be recorded or "
                                   f"given; retry in {STORE_RETRY_AFTER} seconds"},
                        status_code=503, headers={"Retry-After": str(STORE_RETRY_AFTER)})


async def _value_error(request: Request, err: Exception) -> JSONResponse:
    # a ValueError from the recommender is bad input the schema could not catch
    return JSONResponse({"detail": str(err)}, status_code=422)

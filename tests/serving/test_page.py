"""The clinician page at ``/`` in headless Chromium, against the real app served by uvicorn.

Debian's ``/usr/bin/chromium`` is driven by Python playwright (no browser is
ever downloaded). Without it these tests skip, unless ``CAREPATH_REQUIRE_BROWSER=1``
(CI sets it), which turns a missing browser into a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import func, select

from envs.rules import RULE_BY_NAME
from serving.app import STATIC_DIR

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "docs" / "clinician_page.png"
TIMEOUT_MS = 20_000


def _require_browser() -> bool:
    return os.environ.get("CAREPATH_REQUIRE_BROWSER") == "1"


def _no_browser(reason: str) -> NoReturn:
    if _require_browser():
        pytest.fail(f"{reason}, and CAREPATH_REQUIRE_BROWSER=1 requires the browser tests to run")
    pytest.skip(reason)


def test_page_has_no_inline_code_and_sets_a_strict_csp() -> None:
    """What lets the page run under "default-src 'self'": no inline script, style or handler, nothing external."""
    html = (STATIC_DIR / "index.html").read_text()
    assert """content="default-src 'self';""" in html
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "a <script> without src"
    assert not re.search(r"<style\b|\sstyle=|\son[a-z]+=", html), "inline style or event handler"
    assert not re.search(r"(src|href)=\"(https?:)?//", html), "a resource from another host"
    script = (STATIC_DIR / "app.js").read_text()
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function|\.style\b",
                         script)
    assert "localStorage" not in script


def test_examples_are_valid_synthetic_patients() -> None:
    from envs.spec import BASE_FEATURES
    from serving.schemas import PatientFeatures

    patients = json.loads((STATIC_DIR / "examples.json").read_text())["patients"]
    assert 4 <= len(patients) <= 8
    for patient in patients:
        assert "synthetic" in patient["name"], patient["name"]
        PatientFeatures.model_validate(patient["features"])  # the API would accept it
    features = [p["features"] for p in patients]
    assert features[1].get("phq9_item9") == 3  # the item-9 example the tests pick by position
    assert any(f.get("digital_access") == 0 for f in features)
    assert any(len(set(BASE_FEATURES) - set(f)) >= 5 for f in features)


@dataclass
class LiveServer:
    base_url: str
    token: str
    db_url: str


@pytest.fixture(scope="module")
def live_server(prepared_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The app over the prepared bundle, served by uvicorn on a free loopback port in a thread."""
    import uvicorn

    from serving.app import ServeSettings, create_app
    from serving.auth import TokenStore
    from serving.db import make_engine

    db_url = f"sqlite:///{tmp_path_factory.mktemp('page_audit') / 'audit.sqlite'}"
    token = TokenStore(make_engine(db_url)).create("page-test-clinic")
    # CAREPATH_SCREENSHOT_POLICY: serve a real trained policy (for the picture in docs/)
    policy = Path(os.environ.get("CAREPATH_SCREENSHOT_POLICY", str(prepared_bundle)))
    app = create_app(ServeSettings(policies=[policy], db_url=db_url, allow_uncertified=True))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="carepath-page-server", daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not answer {base_url}/healthz within 30 s")
        time.sleep(0.05)
    try:
        yield LiveServer(base_url, token, db_url)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        _no_browser(f"{CHROMIUM} is missing (install it with 'make browser')")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _no_browser("the playwright package is not installed (pip install -e '.[dev]')")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class PageLog:
    """What the page did besides what a test looks at: every request and every console error."""

    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    expected_statuses: set[int] = field(default_factory=set)

    def unexpected_errors(self) -> list[str]:
        # Chromium logs every 4xx answer as "Failed to load resource: ... status of 401 (...)"
        allowed = [f"status of {s} " for s in self.expected_statuses]
        return [e for e in self.errors if not any(a in e for a in allowed)]


@dataclass
class Page:
    page: Any
    log: PageLog
    server: LiveServer


def _open(browser: Any, server: LiveServer, width: int = 1280, height: int = 900) -> tuple[Any, Any, PageLog]:
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    log = PageLog()
    page.on("request", lambda request: log.requests.append(request.url))
    page.on("console", lambda msg: log.errors.append(f"{msg.text} [{msg.location.get('url')}]")
            if msg.type == "error" else None)
    page.on("pageerror", lambda err: log.errors.append(f"page error: {err}"))
    page.goto(f"{server.base_url}/")
    page.wait_for_selector("body[data-ready=true]")
    return context, page, log


def _check_clean(log: PageLog) -> None:
    hosts = {urlsplit(url).hostname for url in log.requests}
    assert hosts == {"127.0.0.1"}, f"the page made requests beyond 127.0.0.1: {sorted(log.requests)}"
    assert not log.unexpected_errors(), f"browser console errors: {log.unexpected_errors()}"


@pytest.fixture()
def page(browser: Any, live_server: LiveServer) -> Iterator[Page]:
    """A fresh 1280x900 tab on the page; afterwards: loopback requests only, no console errors."""
    context, tab, log = _open(browser, live_server)
    try:
        yield Page(tab, log, live_server)
        _check_clean(log)
    finally:
        context.close()


def _recommend(page: Any, token: str | None, example_index: int = 0) -> Any:
    if token is not None:
        page.get_by_test_id("token-input").fill(token)
    select = page.get_by_test_id("patient-select")
    value = select.locator("option").nth(example_index + 1).get_attribute("value")
    select.select_option(value)
    page.get_by_test_id("recommend").click()
    return page


def _wait_for_suggestions(page: Any) -> Any:
    items = page.get_by_test_id("suggestion")
    items.first.wait_for()
    return items


def test_recommend_shows_ranked_steps_rationale_and_blocked_rules(page: Page, tmp_path: Path) -> None:
    tab = _recommend(page.page, page.server.token)
    items = _wait_for_suggestions(tab)
    top_k = int(tab.get_by_test_id("top-k").input_value())
    assert top_k == 3
    assert items.count() == top_k
    first = items.first
    benefit = first.get_by_test_id("benefit").inner_text()
    assert "PHQ-9" in benefit and "continuing over" in benefit, benefit
    if first.get_attribute("data-action") != "continue":  # continuing is the reference, without an interval
        assert re.search(r"\(\d+ % interval [\d.]+ (lower |higher )?to [\d.]+ (lower|higher)\)", benefit), benefit
    assert first.get_by_test_id("rationale-chart").count() == 1
    bars = first.locator("svg [data-testid=rationale-bar]")
    assert bars.count() >= 1
    assert float(bars.first.get_attribute("width") or 0) > 0
    assert first.get_by_test_id("interval-chart").count() == 1

    # Example A is already in psychotherapy: that step is blocked, with the rule in words
    rules = tab.get_by_test_id("blocked-list").get_by_test_id("blocked-rule")
    assert rules.count() >= 1
    assert RULE_BY_NAME["already_in_psychotherapy"].description in rules.all_inner_texts()
    banner = tab.get_by_test_id("decision-support")
    assert banner.is_visible() and "Decision support only" in banner.inner_text()
    # the test bundle has no certificate: the page says so above everything else
    certification = tab.get_by_test_id("certification")
    assert certification.is_visible() and "Not certified" in certification.inner_text()
    assert certification.get_attribute("role") == "alert"
    imputed = tab.get_by_test_id("imputed").inner_text()
    assert "Sleep" in imputed and "PHQ-9" not in imputed  # example A gives all but the wearable features
    assert tab.get_by_test_id("evaluation-summary").locator("li").count() >= 1
    assert tab.get_by_test_id("audit-id").inner_text()

    shot = tmp_path / "clinician_page.png"
    tab.screenshot(path=str(shot), full_page=True)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    if os.environ.get("CAREPATH_UPDATE_SCREENSHOT") == "1":  # refresh the picture in docs/ on request only
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)


def test_item9_shows_critical_alert_and_only_referral(page: Page) -> None:
    tab = _recommend(page.page, page.server.token, example_index=1)
    items = _wait_for_suggestions(tab)
    alert = tab.get_by_test_id("alerts").get_by_test_id("alert-critical")
    assert alert.is_visible()
    assert alert.get_attribute("role") == "alert"
    assert "CRITICAL" in alert.inner_text()
    assert items.count() == 1
    assert items.first.get_attribute("data-action") == "refer_specialist"
    assert "Refer to specialist care" in items.first.get_by_test_id("suggestion-label").inner_text()
    assert RULE_BY_NAME["item9_referral_only"].description in (
        tab.get_by_test_id("blocked-list").get_by_test_id("blocked-rule").all_inner_texts())


def test_missing_features_are_listed_as_assumed(page: Page) -> None:
    tab = _recommend(page.page, page.server.token, example_index=3)
    # the page first asks for the fields the safety rules read; a second press answers anyway
    error = tab.get_by_test_id("error-box")
    error.wait_for()
    assert "safety rules read these fields" in error.inner_text() and tab.get_by_test_id("suggestion").count() == 0
    tab.get_by_test_id("recommend").click()
    _wait_for_suggestions(tab)
    imputed = tab.get_by_test_id("imputed").inner_text()
    assert "assumed:" in imputed and "PHQ-9 item 9" in imputed
    assert "item 9" in tab.get_by_test_id("alerts").inner_text()  # item 9 not asked: an alert, not critical
    assert tab.get_by_test_id("alert-critical").count() == 0


def test_without_token_the_error_box_shows_the_401(page: Page) -> None:
    page.log.expected_statuses.add(401)
    tab = _recommend(page.page, token=None)
    error = tab.get_by_test_id("error-box")
    error.wait_for()
    assert "401" in error.inner_text() and "bearer token is required" in error.inner_text()
    assert tab.get_by_test_id("suggestion").count() == 0


def test_out_of_range_feature_shows_the_422_naming_the_field(page: Page) -> None:
    page.log.expected_statuses.add(422)
    tab = _recommend(page.page, page.server.token)
    tab.get_by_test_id("feature-phq9").fill("30")
    tab.get_by_test_id("recommend").click()
    error = tab.get_by_test_id("error-box")
    error.wait_for()
    assert "422" in error.inner_text() and "features.phq9" in error.inner_text()
    assert tab.get_by_test_id("feature-phq9").get_attribute("aria-invalid") == "true"


def test_accept_and_override_are_recorded(page: Page) -> None:
    from serving.db import FeedbackRecord, make_engine

    tab = _recommend(page.page, page.server.token)
    items = _wait_for_suggestions(tab)
    audit_id = tab.get_by_test_id("audit-id").inner_text()
    engine = make_engine(page.server.db_url)

    def feedback_rows() -> int:
        with engine.connect() as conn:
            query = select(func.count()).select_from(FeedbackRecord).where(FeedbackRecord.audit_id == audit_id)
            return int(conn.execute(query).scalar_one())

    first = items.first
    first.get_by_test_id("accept").click()
    status = first.get_by_test_id("feedback-status")
    status.filter(has_text="recorded").wait_for()
    assert feedback_rows() == 1
    assert first.get_by_test_id("accept").is_disabled()

    second = items.nth(1)
    second.get_by_test_id("override").click()
    second.get_by_test_id("override-reason").fill("patient prefers to wait a week")
    second.get_by_test_id("override-submit").click()
    second.get_by_test_id("feedback-status").filter(has_text="recorded").wait_for()
    assert feedback_rows() == 2
    with engine.connect() as conn:
        outcomes = conn.execute(select(FeedbackRecord.outcome, FeedbackRecord.override_reason)
                                .where(FeedbackRecord.audit_id == audit_id).order_by(FeedbackRecord.id)).all()
    assert [tuple(row) for row in outcomes] == [("accepted", None), ("overridden", "patient prefers to wait a week")]


def test_form_follows_the_api_and_token_stays_in_session_storage(page: Page) -> None:
    tab = page.page
    schema = httpx.get(f"{page.server.base_url}/openapi.json").json()["components"]["schemas"]["PatientFeatures"]
    for name, prop in schema["properties"].items():
        field_ = tab.get_by_test_id(f"feature-{name}")
        assert field_.count() == 1, name
        spec = next(o for o in prop["anyOf"] if o["type"] != "null")
        if field_.evaluate("e => e.tagName") == "INPUT":
            assert float(field_.get_attribute("min")) == spec["minimum"], name
            assert float(field_.get_attribute("max")) == spec["maximum"], name
            assert field_.get_attribute("step") == ("1" if spec["type"] == "integer" else "any"), name
        label = tab.locator(f"label[for='{field_.get_attribute('id')}']")
        assert label.count() == 1, name
    tab.get_by_test_id("token-input").fill(page.server.token)
    assert tab.evaluate("sessionStorage.getItem('carepath.token')") == page.server.token
    assert tab.evaluate("localStorage.length") == 0
    assert page.server.token not in tab.url
    tab.reload()
    tab.wait_for_selector("body[data-ready=true]")
    assert tab.get_by_test_id("token-input").input_value() == page.server.token


def test_narrow_screen_has_no_sideways_scroll(browser: Any, live_server: LiveServer) -> None:
    context, tab, log = _open(browser, live_server, width=390, height=844)
    try:
        _recommend(tab, live_server.token)
        _wait_for_suggestions(tab)
        assert tab.evaluate("document.documentElement.scrollWidth") <= 390
        assert tab.get_by_test_id("suggestion").first.locator("svg [data-testid=rationale-bar]").count() >= 1
        _check_clean(log)
    finally:
        context.close()


def test_the_page_asks_for_exactly_the_fields_the_safety_rules_read() -> None:
    from envs.rules import RULE_FEATURES

    script = (STATIC_DIR / "app.js").read_text()
    listed = re.search(r"const SAFETY_FIELDS = \[([^\]]*)\]", script)
    assert listed is not None
    assert tuple(re.findall(r'"([a-z0-9_]+)"', listed.group(1))) == RULE_FEATURES

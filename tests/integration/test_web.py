"""The web dashboard in a real browser: Playwright drives Debian's Chromium (headless, through
its executable path) against three real daemons on loopback. Log in with an account, see
three nodes, open greeter, call it from the generated form and see "Hello Ada", see a 400 for
a wrong type, search the store, follow a live log line, see denials shown as denied, see a
node turn dead when its daemon is killed. Every page: a title, labelled form controls, no
console error, and a screenshot under artifacts/screenshots/ (ignored by git)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import trio
from playwright.sync_api import expect

from meshd.node_ops import package_version

from .cluster import Cluster, control, wait_for
from .test_broker import FAST, ready
from .test_tunnel import free_port

ROOT = Path(__file__).resolve().parents[2]
GREETER = ROOT / "examples" / "greeter" / "main.py"
SHOTS = ROOT / "artifacts" / "screenshots"
# each page and the title its h1 shows
PAGES = {"nodes": "Nodes", "network": "Network", "services": "Services",
         "services/greeter": "greeter", "call/greeter/Greeter.Hello": "Call greeter Greeter.Hello",
         "traces": "Traces", "logs": "Logs", "stats": "Stats", "store": "Store",
         "config": "Config", "broker": "Broker", "runtime": "Runtime"}
HOSTILE = '<img src=x onerror="window.pwned=1">'  # what no page may turn into markup
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]


def chromium_path() -> str:
    """Debian's chromium (CI installs it with apt); the test fails saying so without it."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("the dashboard tests need Debian's chromium: apt-get install chromium "
                "(.ci/run installs it)")
    raise AssertionError  # unreachable


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    """Nodes a (the dashboard), b (greeter) and c; accounts ops (admin) and guest (no rule
    grants it anything); a few store keys."""
    c = Cluster(tmp_path_factory.mktemp("web"))
    port = free_port()
    try:
        a = c.add("a", env={**FAST, "MESHD_WEB_LISTEN": f"127.0.0.1:{port}"})
        b = c.add("b", join=[a.addr], env=FAST)
        n3 = c.add("c", join=[a.addr], env=FAST)
        ready(a, b, n3)
        c.service(b, "greeter", script=GREETER)
        c.service(n3, "payments", env={"TESTSVC_META": "team=payments,tier=core"})
        wait_for(lambda: {"greeter", "payments"} <= {
            s["name"] for s in control(a.data_dir, "services")}, 20, "services seen from a")
        control(a.data_dir, "auth.accounts.create", id="ops", secret="ops-secret-1",
                scopes=["admin"])
        control(a.data_dir, "auth.accounts.create", id="guest", secret="guest-secret-1",
                scopes=["guest"])
        for key, value in (("user:ada", '{"name": "Ada"}'), ("user:bob", '{"name": "Bob"}'),
                           ("order:1", '{"total": 3}')):
            control(a.data_dir, "store.write", database="shop", table="things", key=key,
                    value=value)
        yield {"a": a, "b": b, "c": n3, "cluster": c, "url": f"http://127.0.0.1:{port}"}
    finally:
        c.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    path = chromium_path()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield b
        finally:
            b.close()


class Page:
    """A browser page that remembers every console error and uncaught exception."""

    def __init__(self, browser, url: str) -> None:
        self.url = url
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.page.set_default_timeout(15_000)
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"console {m.type}: {m.text}")
                     if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))

    def login(self, account: str, secret: str) -> None:
        self.page.goto(self.url + "/#/login")
        self.page.get_by_label("Account", exact=True).fill(account)
        self.page.get_by_label("Secret").fill(secret)
        self.page.get_by_role("button", name="Log in").click()

    def go(self, page: str) -> None:
        self.page.goto(f"{self.url}/#/{page}")

    def ready(self, page: str, timeout: float = 15.0) -> None:
        """Wait for the page's `meshd:ready:NAME` mark: its first answers are shown. (The
        page's CSP refuses wait_for_function's eval; evaluate is fine.)"""
        name = page.split("/")[0]
        deadline = time.monotonic() + timeout
        while not self.page.evaluate(
                "(n) => performance.getEntriesByName('meshd:ready:' + n).length", name):
            assert time.monotonic() < deadline, f"page {page} never became ready"
            time.sleep(0.05)

    def close(self) -> None:
        self.context.close()


@pytest.fixture(scope="module")
def ops_session(mesh, browser):
    """One login of the admin account ops for the module (logins are rate-limited per
    account: 5 at once)."""
    page = Page(browser, mesh["url"])
    page.login("ops", "ops-secret-1")
    page.page.wait_for_selector("tr[data-node]")
    try:
        yield page
    finally:
        page.close()


@pytest.fixture
def ops(ops_session):
    """The admin's page; no console error during the test."""
    ops_session.errors.clear()
    yield ops_session
    assert ops_session.errors == [], ops_session.errors


def test_log_in_and_see_three_nodes(ops):
    p = ops.page
    rows = p.locator("tr[data-node]")
    expect(p.locator("tr[data-node][data-status=alive]")).to_have_count(3)
    assert sorted(rows.evaluate_all("rs => rs.map(r => r.dataset.node)")) == ["a", "b", "c"]
    assert p.title() == "Nodes · meshd"
    # the node's own row says so; the others show how they are reached and their version
    assert "(this node)" in p.locator("tr[data-node=a]").inner_text()
    expect(p.locator("tr[data-node=b]")).to_contain_text("direct")  # reach, with an RTT
    expect(p.locator("tr[data-node=b]")).to_contain_text(" ms")
    expect(p.locator("tr[data-node=b]")).to_contain_text(package_version())  # debug.stats


def test_call_greeter_from_the_generated_form(ops):
    p = ops.page
    ops.go("services")
    # filters: by tag (the instances' metadata), by name
    p.get_by_label("Tag", exact=True).fill("team=pay")
    expect(p.locator("tr[data-service]")).to_have_count(1)
    expect(p.locator("tr[data-service=payments]")).to_contain_text("tier=core")
    p.get_by_label("Tag", exact=True).fill("")
    p.get_by_label("Name", exact=True).fill("greet")
    expect(p.locator("tr[data-service]")).to_have_count(1)
    p.get_by_role("link", name="greeter").click()
    p.wait_for_selector("[data-endpoint='Greeter.Hello']")
    assert "HelloRequest" in p.locator("[data-endpoint='Greeter.Hello']").inner_text()
    p.locator("[data-endpoint='Greeter.Hello']").get_by_role("link", name="Call").click()
    field = p.locator("#field-name")
    assert p.locator("label[for=field-name]").inner_text().startswith("name")
    # validation as one types: the required field left empty says so and sends nothing
    p.get_by_role("button", name="Call").click()
    assert "required" in p.locator("#field-name-error").inner_text()
    field.fill("Ada")
    assert p.locator("#field-name-error").inner_text() == ""
    p.get_by_role("button", name="Call").click()
    reply = p.locator("#call-result pre.reply")
    reply.wait_for()
    assert "Hello Ada" in reply.inner_text()
    result = p.locator("#call-result").inner_text()
    assert "ms" in result and "trace" in result
    # the trace link opens the call's spans across nodes (a's client span, b's server)
    p.locator("#call-result a[href^='#/traces/']").click()
    p.wait_for_selector("table.waterfall tr[data-kind=server]")
    nodes = p.locator("table.waterfall tbody tr td:nth-child(2)").all_inner_texts()
    assert {"a", "b"} <= set(nodes)
    p.go_back()
    # a wrong type, sent raw: the service's 400 and its structured error
    p.get_by_label("Raw JSON").check()
    p.get_by_label("Request (JSON)").fill('{"name": 5}')
    p.get_by_role("button", name="Call").click()
    p.locator("#call-result .error-body").wait_for()
    assert p.locator("#call-result [role=alert]").inner_text().startswith("400 bad_request")
    error = json.loads(p.locator("#call-result .error-body").inner_text())
    assert error["status"] == 400 and "name" in error["detail"]


def test_search_the_store(ops):
    p = ops.page
    ops.go("store")
    p.get_by_label("Database").select_option("shop")
    expect(p.locator("#store-table")).to_have_value("things")
    p.get_by_label("Key prefix").fill("user:")
    p.get_by_role("button", name="Search").click()
    expect(p.locator("[data-key]")).to_have_count(2)
    p.get_by_label("Key contains").fill("bo")
    p.get_by_role("button", name="Search").click()
    expect(p.locator("[data-key]")).to_have_count(1)
    p.locator("[data-key='user:bob']").click()
    value = p.get_by_label("Value", exact=True)
    expect(value).to_have_value(re.compile('"name": "Bob"'))


def test_follow_a_live_log_line(ops, mesh):
    p = ops.page
    ops.go("logs")
    p.wait_for_selector("#logs .logline")  # the recent records first
    marker = f"webtail{os.getpid()}x{int(time.time())}"
    mesh["cluster"].service(mesh["c"], marker)  # c's registry logs the registration
    expect(p.locator("#logs")).to_contain_text(marker, timeout=20_000)
    assert p.locator("#logs .logline", has_text=marker).first.inner_text().count(" c ") >= 1


def test_every_page_titled_labelled_and_without_console_errors(ops):
    p = ops.page
    SHOTS.mkdir(parents=True, exist_ok=True)
    for page, heading in PAGES.items():
        ops.go(page)
        ops.ready(page)
        assert p.locator("main h1").inner_text().startswith(heading), page
        assert p.title() == f"{p.locator('main h1').inner_text().split(chr(10))[0]} · meshd" \
            or p.title().startswith(heading), (page, p.title())
        assert p.locator("main [role=alert]").count() == 0, \
            (page, p.locator("main [role=alert]").all_inner_texts())  # the admin sees all
        unlabelled = p.evaluate("""() => [...document.querySelectorAll(
                'input, select, textarea')].filter(el => !el.hidden && el.type !== 'hidden'
                && !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                && !el.getAttribute('aria-labelledby')).map(el => el.id || el.outerHTML)""")
        assert unlabelled == [], (page, unlabelled)
        shown = p.locator("main").inner_text()
        assert "[object" not in shown and "undefined" not in shown, (page, shown[:500])
        p.screenshot(path=str(SHOTS / f"{page.replace('/', '-')}.png"), full_page=True)
    assert ops.errors == []


def test_what_rules_deny_is_shown_as_denied(mesh, browser):
    page = Page(browser, mesh["url"])
    try:
        page.login("guest", "guest-secret-1")
        p = page.page
        denied = p.locator(".denied").first
        denied.wait_for()
        assert "Denied" in denied.inner_text() and "rule" in denied.inner_text().lower()
        page.go("services")
        p.locator(".denied").first.wait_for()
        # a wrong secret is an error on the login page, not a blank screen
        page.login("guest", "not-the-secret")
        p.locator("[role=alert]").first.wait_for()
        assert "401" in p.locator("[role=alert]").first.inner_text()
        assert page.errors == [], page.errors
    finally:
        page.close()


def test_hostile_names_and_values_stay_text(ops, mesh):
    """A store key and value, a config value and a log line holding markup are shown as
    text: no element is made of them, no script runs."""
    a = mesh["a"]
    control(a.data_dir, "store.write", database="shop", table="evil", key=HOSTILE,
            value=HOSTILE)
    control(a.data_dir, "config.set", path="evil", value=HOSTILE)
    p = ops.page
    ops.go("store")
    p.get_by_label("Database").select_option("shop")
    p.get_by_label("Table").select_option("evil")
    p.get_by_role("button", name="Search").click()
    p.locator("[data-key]").first.click()
    expect(p.get_by_label("Value", exact=True)).to_have_value(HOSTILE)
    ops.go("config")
    ops.ready("config")
    expect(p.locator("main")).to_contain_text("<img src=x onerror=")  # JSON-quoted, as text
    ops.go("logs")
    ops.ready("logs")
    p.wait_for_timeout(300)
    assert p.evaluate("() => window.pwned") is None
    assert p.locator("main img").count() == 0


def test_config_history_publish_and_logout_keeps_a_pasted_token(ops, mesh, browser):
    p = ops.page
    ops.go("config")
    ops.ready("config")
    p.get_by_label("Path", exact=True).fill("shop.currency")
    p.get_by_label("Value (JSON)").fill('"EUR"')
    p.get_by_role("button", name="Save").click()
    expect(p.locator("main")).to_contain_text("saved")
    expect(p.locator("main table")).to_contain_text("shop.currency")  # its history
    expect(p.locator("main table")).to_contain_text("ops")  # who set it
    wait_for(lambda: control(mesh["b"].data_dir, "config.get",
                             path="shop.currency")["value"] == "EUR", 10, "the value on b")
    ops.go("broker")
    ops.ready("broker")
    p.get_by_label("Topic", exact=True).fill("orders.created")
    p.get_by_role("button", name="Publish").click()
    expect(p.locator("main")).to_contain_text("published")
    # a pasted token is forgotten by Log out, not revoked: it may be used elsewhere
    token = control(mesh["a"].data_dir, "auth.token.create", account="ops", ttl=600)["token"]
    page = Page(browser, mesh["url"])
    try:
        page.page.goto(mesh["url"] + "/#/login")
        page.page.get_by_role("textbox", name="Token").fill(token)
        page.page.get_by_role("button", name="Use token").click()
        page.page.wait_for_selector("tr[data-node]")
        page.page.get_by_role("button", name="Log out").click()
        page.page.get_by_label("Secret").wait_for()
        from meshd.control import ControlClient

        async def whoami() -> dict:
            client = ControlClient(mesh["a"].data_dir / "meshd.sock", token=token)
            try:
                return await client.call("auth.whoami")
            finally:
                await client.aclose()
        assert trio.run(whoami)["id"] == "ops"
        assert page.errors == [], page.errors
    finally:
        page.close()
    # leaving pages let go of their live streams
    wait_for(lambda: control(mesh["a"].data_dir, "status")["stats"]["web_streams"] <= 2, 10,
             "the dashboard's streams closed with their pages")


def test_managed_services_on_the_runtime_page(ops, mesh):
    control(mesh["a"].data_dir, "runtime.run", name="sleeper", source="module:json",
            command=[sys.executable, "-c", "import time; time.sleep(600)"])
    p = ops.page
    ops.go("runtime")
    expect(p.locator("tr[data-spec=sleeper]")).to_contain_text("module:json")
    expect(p.locator("tr[data-replica='sleeper/0'][data-state=running]")).to_have_count(
        1, timeout=20_000)
    p.once("dialog", lambda d: d.accept())
    p.locator("tr[data-spec=sleeper]").get_by_role("button", name="Kill").click()
    expect(p.locator("main")).to_contain_text("killed sleeper")
    expect(p.locator("tr[data-spec=sleeper]")).to_have_count(0, timeout=10_000)


def test_a_node_turns_dead_when_its_daemon_is_killed(ops, mesh):
    """Last: it takes node c away."""
    p = ops.page
    ops.go("nodes")
    p.wait_for_selector("tr[data-node=c][data-status=alive]")
    mesh["c"].kill9()
    p.wait_for_selector("tr[data-node=c][data-status=dead]", timeout=30_000)

"""The web console in headless chromium (run by scripts/console-browser-test.sh).

Against `raftmq console` serving a `raftmq dev` cluster, with the `raftmq` CLI as the
independent witness:
  1. every page loads with no console error, page error or failed request;
  2. a topic created through the UI (form filled, confirm dialog accepted; a dismissed
     dialog first, which must change nothing; then one accepted without a credential,
     which the cluster, requiring signed requests, refuses) is in `raftmq admin topic
     list`, and the request carried the admin credential typed in the page;
  3. a message sent with `raftmq produce` is found by its id in the UI;
  4. the lag a consumer group shows in the UI, per queue and in total, is what
     `raftmq admin group describe` reports (lag made by sending N messages, consuming
     them all with `raftmq consume`, then sending M more);
and the rates page draws live send and consume rates while the CLI produces and
consumes. Each page is screenshotted into --shots. Prints one line per check and a
closing 'N passed, N failed'; exits non-zero if any failed.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from playwright.sync_api import ConsoleMessage, Page, sync_playwright

WAIT_MS = 20_000
CLI_TIMEOUT_S = 120

UI_TOPIC = "ConsoleUiTopic"
LAG_TOPIC = "ConsoleLagTopic"
LAG_GROUP = "ConsoleLagGroup"
CONSUMED = 10
LEFT = 6
RATE_MESSAGES = 2000


class Cli:
    """The raftmq CLI against the cluster's NameServer."""

    def __init__(self, binary: str, namesrv: str) -> None:
        self.binary = binary
        self.namesrv = namesrv

    def run(self, *args: str) -> str:
        cmd = [self.binary, *args, "--namesrv", self.namesrv]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
        if r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()[-2000:]}")
        return r.stdout

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [self.binary, *args, "--namesrv", self.namesrv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def topics(self) -> dict[str, str]:
        """`admin topic list`: topic name -> its line (the last group's)."""
        out = {}
        for line in self.run("admin", "topic", "list").splitlines():
            parts = line.split()
            if len(parts) >= 2:
                out[parts[1]] = line
        return out

    def group_lags(self, group: str) -> tuple[dict[str, int], int]:
        """`admin group describe`: 'broker/topic/queue' -> lag, and the total."""
        lags: dict[str, int] = {}
        total = 0
        broker = None
        for line in self.run("admin", "group", "describe", "--group", group).splitlines():
            head = re.match(r"^(\S+)\s+consumer group ", line)
            if head:
                broker = head.group(1)
                continue
            q = re.match(r"^\s+(\S+)/(\d+)\s+committed \S+\s+min \d+\s+max \d+\s+lag (\d+)", line)
            if q and broker:
                lags[f"{broker}/{q.group(1)}/{q.group(2)}"] = int(q.group(3))
            t = re.match(r"^\s+total lag (\d+)", line)
            if t:
                total += int(t.group(1))
        return lags, total


def eventually(what: str, check: Callable[[], object], within_s: float = WAIT_MS / 1000):
    """Polls `check` until it returns something truthy; fails naming `what` and the
    last value or error seen."""
    deadline = time.monotonic() + within_s
    last: object = None
    while True:
        try:
            got = check()
            if got:
                return got
            last = got
        except AssertionError as e:
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {within_s:.0f} s for {what}; last seen: {last}")
        time.sleep(0.2)


class Browser:
    """One page, with every console error, page error and failed request recorded."""

    def __init__(self, page: Page, url: str, shots: Path) -> None:
        self.page = page
        self.url = url.rstrip("/")
        self.shots = shots
        self.shot_count = 0
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: self.errors.append(f"request failed: {r.method} {r.url}: {r.failure}"))
        page.on(
            "response",
            lambda r: self.errors.append(f"HTTP {r.status}: {r.request.method} {r.url}") if r.status >= 400 else None,
        )

    def _console(self, m: ConsoleMessage) -> None:
        if m.type == "error":
            self.errors.append(f"console error: {m.text} ({m.location})")

    def open(self, fragment: str, page_name: str) -> None:
        """Shows `#/fragment` and waits until its page drew itself (or failed)."""
        self.page.goto(f"{self.url}/#/{fragment}")
        sel = f'main[data-page="{page_name}"]:not([data-state="loading"])'
        self.page.wait_for_selector(sel, timeout=WAIT_MS)
        state = self.page.get_attribute("main", "data-state")
        if state != "ready":
            status = self.page.text_content("#status")
            raise AssertionError(f"page #{fragment} did not load: state {state}, status {status!r}")

    def answer_next_dialog(self, accept: bool) -> list[str]:
        """Accepts or dismisses the next confirm dialog; the list gets its text."""
        asked: list[str] = []

        def answer(d) -> None:
            asked.append(d.message)
            if accept:
                d.accept()
            else:
                d.dismiss()

        self.page.once("dialog", answer)
        return asked

    def shot(self, name: str) -> Path:
        self.shot_count += 1
        path = self.shots / f"{self.shot_count:02d}-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def assert_no_errors(self, where: str = "") -> None:
        errors = self.take_errors()
        if errors:
            raise AssertionError(where + "; ".join(errors))

    def take_errors(self) -> list[str]:
        errors, self.errors = self.errors, []
        return errors

    def status(self) -> str:
        return (self.page.text_content("#status") or "").strip()


def check_pages_load_without_errors(b: Browser, cli: Cli) -> str:
    # Something to show on every page: a topic, a group, messages.
    cli.run("admin", "topic", "create", "--topic", LAG_TOPIC, "--queues", "2")
    cli.run("produce", "--topic", LAG_TOPIC, "--count", "4", "--tag", "TagA")
    pages = [
        ("cluster", "cluster", "cluster"),
        ("topics", "topics", "topics"),
        (f"topics/{LAG_TOPIC}", "topics", "topic-detail"),
        ("groups", "groups", "groups"),
        ("messages", "messages", "messages"),
        (f"messages?topic={LAG_TOPIC}&queue=0", "messages", "messages-browse"),
        ("rates", "rates", "rates"),
    ]
    seen = []
    for fragment, page_name, shot in pages:
        b.open(fragment, page_name)
        # Let the first auto-refresh run too: its errors count.
        b.page.wait_for_timeout(600)
        path = b.shot(shot)
        b.assert_no_errors(f"#{fragment}: ")
        seen.append(path.name)
    # The cluster page names the group's leader and three healthy replicas.
    b.open("cluster", "cluster")
    rows = eventually(
        "three healthy replicas on the cluster page",
        lambda: (n := b.page.locator("section[data-group] tr[data-node] .badge.ok").count()) >= 3 and n,
    )
    return f"{len(pages)} pages, no console errors; cluster page shows {rows} healthy replicas"


# The bootstrap admin's secret file (--admin-secret-file), set by main().
ADMIN_SECRET_FILE: list[str] = []


def check_topic_created_in_ui_is_listed(b: Browser, cli: Cli) -> str:
    b.open("topics", "topics")
    b.page.fill("#topic-name", UI_TOPIC)
    b.page.fill("#topic-queues", "3")
    b.page.select_option("#topic-type", "fifo")
    # Said no to: nothing changes.
    dialogs = b.answer_next_dialog(accept=False)
    b.page.click("#topic-create")
    eventually("the cancelled note", lambda: "Cancelled" in b.status())
    if UI_TOPIC in cli.topics():
        raise AssertionError("a dismissed confirmation created the topic")
    # Said yes to without a credential: the cluster requires signed requests
    # and the console signs a change only with what the page typed, so it is refused.
    b.answer_next_dialog(accept=True)
    b.page.click("#topic-create")
    eventually("the refusal of an unsigned change", lambda: "no credentials" in b.status())
    if UI_TOPIC in cli.topics():
        raise AssertionError("a change without a credential created the topic")
    # Chromium logs the 401 answer as a console error: that one was expected.
    unexpected = [e for e in b.take_errors() if "401" not in e]
    if unexpected:
        raise AssertionError("; ".join(unexpected))
    # Said yes to, with the admin credential typed in the header box: the change
    # carries it, and the cluster accepts it.
    secret = Path(ADMIN_SECRET_FILE[0]).read_text().strip()
    b.page.click("#credential summary")
    b.page.fill("#cred-access-key", "admin")
    b.page.fill("#cred-secret", secret)
    sent: list[dict] = []
    b.page.on("request", lambda r: sent.append(r.post_data_json) if r.method == "POST" else None)
    asked = b.answer_next_dialog(accept=True)
    b.page.click("#topic-create")
    eventually("the 'created' note", lambda: f"Topic {UI_TOPIC} created" in b.status())
    if not sent or sent[-1].get("access_key") != "admin" or sent[-1].get("secret") != secret:
        raise AssertionError(f"the create did not carry the credential: {sent}")
    b.page.click("#credential summary")
    if not asked or UI_TOPIC not in asked[0] or dialogs[0] != asked[0]:
        raise AssertionError(f"the confirmation did not name the change: {asked} / {dialogs}")
    b.page.wait_for_selector(f'tr[data-topic="{UI_TOPIC}"]', timeout=WAIT_MS)
    line = eventually(f"{UI_TOPIC} in `raftmq admin topic list`", lambda: cli.topics().get(UI_TOPIC))
    if "queues 3" not in line or "FIFO" not in line:
        raise AssertionError(f"listed as {line!r}, not 3 FIFO queues")
    b.shot("topic-created")
    b.assert_no_errors()
    return f"confirm asked {asked[0]!r}, credential sent; admin topic list: {line.strip()!r}"


def check_message_sent_with_cli_found_by_id(b: Browser, cli: Cli) -> str:
    # Sent with message trace on: the page shows its timeline too.
    out = cli.run("produce", "--topic", UI_TOPIC, "--count", "1", "--tag", "TagUi", "--key", "order-ui-1", "--trace")
    m = re.search(r"\bid (\S+)", out)
    if not m:
        raise AssertionError(f"no id in produce's output: {out!r}")
    msg_id = m.group(1)
    b.open("messages", "messages")
    b.page.fill("#msg-id", msg_id)
    b.page.click("#msg-id-go")
    row = b.page.wait_for_selector(f'#msg-results tr[data-id="{msg_id}"]', timeout=WAIT_MS)
    text = row.text_content() or ""
    if UI_TOPIC not in text or "TagUi" not in text or "order-ui-1" not in text:
        raise AssertionError(f"the row for {msg_id} reads {text!r}")
    row.click()  # the details: properties and body
    b.page.wait_for_selector("#msg-results tr.details:not([hidden]) pre.props", timeout=WAIT_MS)
    # The trace is written off the send path: look again until PRODUCED is there.
    def produced_row():
        b.page.wait_for_selector("#trace-title", timeout=WAIT_MS)
        r = b.page.query_selector('#msg-results tr[data-trace-kind="PRODUCED"]')
        if r:
            return r.text_content() or ""
        b.page.click("#msg-id-go")
        return None
    traced = eventually(f"a PRODUCED event in {msg_id}'s trace", produced_row)
    if "Raft index" not in traced or UI_TOPIC not in traced:
        raise AssertionError(f"the PRODUCED row reads {traced!r}")
    b.shot("message-by-id")
    b.assert_no_errors()
    return f"message {msg_id} found in the UI, its trace shows {traced.strip()!r}"


def ui_lags(b: Browser) -> tuple[dict[str, int], int]:
    rows = b.page.locator("tr.queue-row")
    lags = {}
    for i in range(rows.count()):
        r = rows.nth(i)
        lags[r.get_attribute("data-key")] = int(r.locator("td.lag").get_attribute("data-lag"))
    total = int((b.page.text_content("#group-total-lag") or "").strip())
    return lags, total


def check_group_lag_matches_admin(b: Browser, cli: Cli) -> str:
    # N sent (4 by the first check) + 6, all consumed and committed by a member
    # that then leaves, then LEFT more: the group lags by LEFT.
    cli.run("produce", "--topic", LAG_TOPIC, "--count", str(CONSUMED - 4))
    cli.run(
        "consume", "--topic", LAG_TOPIC, "--group", LAG_GROUP, "--count", str(CONSUMED), "--quiet",
        "--idle-exit-ms", "10000",
    )
    cli.run("produce", "--topic", LAG_TOPIC, "--count", str(LEFT))
    b.open(f"groups/{LAG_GROUP}", "groups")

    def agree():
        b.page.reload()
        b.page.wait_for_selector('main[data-page="groups"][data-state="ready"] #group-total-lag', timeout=WAIT_MS)
        ui = ui_lags(b)
        admin = cli.group_lags(LAG_GROUP)
        if ui != admin:
            raise AssertionError(f"UI {ui} vs admin {admin}")
        return ui

    (lags, total) = eventually("the UI's lag to equal `admin group describe`'s", agree)
    if total != LEFT or sum(lags.values()) != total:
        raise AssertionError(f"lag {total} (queues {lags}), expected {LEFT}")
    b.shot("group-lag")
    b.open("groups", "groups")
    b.page.wait_for_selector(f'tr[data-group="{LAG_GROUP}"]', timeout=WAIT_MS)
    b.shot("groups-with-lag")
    b.assert_no_errors()
    return f"lag {total} over {len(lags)} queue(s), equal to admin group describe: {lags}"


def check_rates_page_draws_live_rates(b: Browser, cli: Cli) -> str:
    b.open(f"rates?topic={LAG_TOPIC}&group={LAG_GROUP}", "rates")
    # Sent one at a time, so the rates last a few samples; both processes end by
    # themselves (the consumer also after 10 s without a message).
    producer = cli.popen("produce", "--topic", LAG_TOPIC, "--count", str(RATE_MESSAGES))
    consumer = cli.popen(
        "consume", "--topic", LAG_TOPIC, "--group", LAG_GROUP, "--count", str(LEFT + RATE_MESSAGES),
        "--quiet", "--idle-exit-ms", "10000",
    )
    try:
        send = eventually(
            "a send rate above zero",
            lambda: (t := b.page.text_content("#rate-send") or "") and t != "–" and not t.startswith("0") and t,
            within_s=40,
        )
        eventually(
            "a consume rate above zero",
            lambda: (t := b.page.text_content("#rate-consume") or "") and t != "–" and not t.startswith("0") and t,
            within_s=40,
        )
        # A few more samples, so the chart shows lines rather than a point.
        b.page.wait_for_timeout(6000)
        b.shot("rates-live")
    finally:
        for p in (producer, consumer):
            try:
                p.wait(timeout=CLI_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    b.assert_no_errors()
    return f"send rate {send} drawn"


def check_dlq_and_cluster_pages(b: Browser, cli: Cli) -> str:
    b.open(f"messages?dlq={LAG_GROUP}", "messages")
    b.page.wait_for_selector("#msg-results", timeout=WAIT_MS)
    b.shot("dlq")
    b.open(f"topics/{UI_TOPIC}", "topics")
    b.shot("topic-ui-detail")
    b.assert_no_errors()
    return "DLQ panel and topic detail drawn"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="the console, http://HOST:PORT/")
    ap.add_argument("--bin", required=True, help="the raftmq binary")
    ap.add_argument("--namesrv", required=True)
    ap.add_argument("--chromium", required=True, help="Debian's chromium")
    ap.add_argument("--shots", required=True, type=Path)
    ap.add_argument("--admin-secret-file", required=True, help="the cluster's bootstrap admin secret (dev --auth)")
    args = ap.parse_args()
    ADMIN_SECRET_FILE.append(args.admin_secret_file)
    cli = Cli(args.bin, args.namesrv)
    checks = [
        check_pages_load_without_errors,
        check_topic_created_in_ui_is_listed,
        check_message_sent_with_cli_found_by_id,
        check_group_lag_matches_admin,
        check_rates_page_draws_live_rates,
        check_dlq_and_cluster_pages,
    ]
    passed = failed = 0
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=args.chromium,
            # Root in a container: chromium's sandbox needs user namespaces it may not get.
            args=["--no-sandbox", "--disable-dev-shm-usage"],
        )
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 900})
            b = Browser(page, args.url, args.shots)
            for check in checks:
                name = check.__name__.removeprefix("check_")
                started = time.monotonic()
                try:
                    said = check(b, cli)
                    passed += 1
                    print(f"PASS {name} ({time.monotonic() - started:.1f} s): {said}", flush=True)
                except Exception as e:  # noqa: BLE001 - every failure is reported, then the next check runs
                    failed += 1
                    print(f"FAIL {name} ({time.monotonic() - started:.1f} s): {e}", flush=True)
                    traceback.print_exc(limit=3)
                    try:
                        b.shot(f"FAILED-{name}")
                    except Exception:  # noqa: BLE001
                        pass
                    b.take_errors()
        finally:
            browser.close()
    print(f"screenshots: {sorted(p.name for p in args.shots.glob('*.png'))}")
    print(f"console-browser-test: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

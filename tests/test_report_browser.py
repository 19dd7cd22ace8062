"""The HTML report in a real browser: headless Chromium driven over the DevTools protocol.

It opens exported reports (a small run full of hostile text, and a big run of ~500 nodes and
~3,000 calls), and checks that the page logs no error, that the tree, the plot, the node
details and the call table are in the DOM and work, that no model text became markup, and
takes a screenshot. The DevTools websocket is spoken with a few lines of stdlib code below, so
the test needs no extra Python package; it is skipped only when Chromium is not installed.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import time
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import anyio
import pytest
from run_fixtures import big_run_options, build_db

from drpo.inspect.report import export_report
from drpo.runs.store import RunStore

CHROMIUM = next(
    (
        path
        for name in ("chromium", "chromium-browser", "google-chrome")
        if (path := shutil.which(name))
    ),
    None,
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed (apt-get install chromium); the browser test needs it",
)


# ------------------------------------------------------------------------------------ DevTools


class WebSocket:
    """A minimal RFC 6455 client: text frames out (masked), text frames in, pings answered."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        parts = urlparse(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {parts.path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("DevTools closed the connection during the handshake")
            response += chunk
        head, self.buffer = response.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket handshake refused: {head[:200]!r}")

    def _read(self, count: int) -> bytes:
        while len(self.buffer) < count:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("DevTools closed the connection")
            self.buffer += chunk
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        header = bytearray([0x80 | opcode])
        if len(payload) < 126:
            header.append(0x80 | len(payload))
        elif len(payload) < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack(">H", len(payload))
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", len(payload))
        mask = os.urandom(4)
        key = int.from_bytes((mask * (len(payload) // 4 + 1))[: len(payload)], "big")
        masked = (int.from_bytes(payload, "big") ^ key).to_bytes(len(payload), "big")
        self.sock.sendall(bytes(header) + mask + masked)

    def send(self, text: str) -> None:
        self._send_frame(0x1, text.encode())

    def recv(self) -> str:
        message = b""
        while True:
            first, second = self._read(2)
            opcode, length = first & 0x0F, second & 0x7F
            if length == 126:
                (length,) = struct.unpack(">H", self._read(2))
            elif length == 127:
                (length,) = struct.unpack(">Q", self._read(8))
            payload = self._read(length)
            if opcode == 0x9:
                self._send_frame(0xA, payload)
                continue
            if opcode == 0x8:
                raise ConnectionError("DevTools closed the websocket")
            if opcode in (0x0, 0x1, 0x2):
                message += payload
                if first & 0x80:
                    return message.decode()

    def close(self) -> None:
        self.sock.close()


class Browser:
    """Headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, profile: Path, width: int = 1400, height: int = 1000) -> None:
        self.profile = profile
        self.process = subprocess.Popen(
            [
                str(CHROMIUM),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                err = (
                    self.process.stderr.read().decode(errors="replace")
                    if self.process.stderr
                    else ""
                )
                self.process.kill()
                raise RuntimeError(f"Chromium did not start: {err[-2000:]}")
            time.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        self.ws = WebSocket(f"ws://127.0.0.1:{port}{path}")
        self.next_id = 0
        self.events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable", session=self.session)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session=self.session,
        )

    def call(self, method: str, params: dict | None = None, *, session: str | None = None) -> Any:
        self.next_id += 1
        request: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            request["sessionId"] = session
        self.ws.send(json.dumps(request))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method} failed: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def page(self, method: str, params: dict | None = None) -> Any:
        return self.call(method, params, session=self.session)

    def wait_event(self, method: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            for event in self.events[seen:]:
                if event["method"] == method:
                    self.events.remove(event)
                    return event
            seen = len(self.events)
            message = json.loads(self.ws.recv())
            if "method" in message:
                self.events.append(message)
        raise TimeoutError(f"no {method} within {timeout}s")

    def open(self, url: str) -> float:
        """Navigate and wait for the load event; returns seconds until it fired."""
        started = time.perf_counter()
        self.page("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired")
        return time.perf_counter() - started

    def evaluate(self, expression: str) -> Any:
        result = self.page(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def errors(self) -> list[str]:
        """Everything the page reported as an error: exceptions, console.error, log errors."""
        self.evaluate("0")  # lets pending events arrive
        found = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(json.dumps(params.get("exceptionDetails"))[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(json.dumps(params.get("args"))[:500])
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                found.append(params["entry"].get("text", "")[:500])
        return found

    def screenshot(self, path: Path) -> bytes:
        data = base64.b64decode(self.page("Page.captureScreenshot", {"format": "png"})["data"])
        path.write_bytes(data)
        return data

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except Exception:
            pass
        self.ws.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def png_facts(data: bytes) -> tuple[int, int, int]:
    """(width, height, distinct byte values in the decoded pixel stream) of a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    position, idat = 8, b""
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        if kind == b"IDAT":
            idat += data[position + 8 : position + 8 + length]
        position += 12 + length
    return width, height, len(set(zlib.decompress(idat)))


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    profile = tmp_path_factory.mktemp("chromium-profile")
    instance = Browser(profile)
    try:
        yield instance
    finally:
        instance.close()


def _export(db: Path, run_id: str, out: Path):
    async def main():
        async with RunStore.open(db, readonly=True) as store:
            return await export_report(store, run_id, out)

    return anyio.run(main)


# ------------------------------------------------------------------------------------ tests

CHECK_PAGE = """(() => {
  const r = window.__drpoReport || {};
  return {
    ready: !!r.ready,
    initMs: r.initMs,
    nodesInData: r.nodes,
    callsInData: r.calls,
    treeRows: document.querySelectorAll('#tree li.node').length,
    bestRows: document.querySelectorAll('#tree li.node.best').length,
    plot: !!document.querySelector('svg#reward-plot'),
    plotBest: document.querySelectorAll('#reward-plot .pt-best').length,
    plotMean: document.querySelectorAll('#reward-plot .pt-mean').length,
    plotNodes: document.querySelectorAll('#reward-plot .pt-node').length,
    bestLine: !!document.querySelector('#plot-best') && !!document.querySelector('#plot-mean'),
    detailTitle: (document.querySelector('#detail-title') || {}).textContent || null,
    callRows: document.querySelectorAll('#calls-table tbody tr').length,
    range: (document.querySelector('#calls-range') || {}).textContent || '',
    pwned: window.__pwned === undefined ? null : window.__pwned,
    injected: document.querySelectorAll('img, [onerror], [onload], script:not([id="drpo-data"])').length,
  };
})()"""


def test_report_of_a_hostile_run_renders_without_errors_and_stays_inert(tmp_path, browser):
    db = tmp_path / "runs.db"
    run = anyio.run(lambda: build_db(db, run_id="hostile", hostile=True, name="<b>x</b>", depth=5))
    report = _export(db, run.run_id, tmp_path / "report.html")
    seconds = browser.open(report.path.resolve().as_uri())
    page = browser.evaluate(CHECK_PAGE)
    assert browser.errors() == []
    assert page["ready"], page
    assert page["nodesInData"] == len(run.node_ids)
    # the tree opens along the best path: the root, and each best-path node's children
    assert page["bestRows"] >= 2 and page["treeRows"] >= 1 + 3
    assert page["plot"] and page["bestLine"]
    levels = browser.evaluate(
        "JSON.parse(document.getElementById('drpo-data').textContent).tree.levels.length"
    )
    assert page["plotBest"] == page["plotMean"] == levels >= 3
    assert page["detailTitle"].startswith("Node n")  # the best node is selected at load
    # hostile text is shown as text: nothing ran, no element was injected
    assert page["pwned"] is None
    assert page["injected"] == 1  # only our own script element
    text = browser.evaluate("document.body.innerText")
    assert "</script><script>window.__pwned = 1</script>" in text or "<img src=x" in text
    assert "<b>x</b>" in browser.evaluate("document.getElementById('run-title').textContent")

    # expanding everything shows every node; selecting one shows its prompt diff and critique
    browser.evaluate("document.getElementById('tree-expand').click()")
    assert browser.evaluate("document.querySelectorAll('#tree li.node').length") == len(
        run.node_ids
    )
    detail = browser.evaluate(
        """(() => {
      const pruned = document.querySelector('#tree li.node.pruned > .label');
      pruned.click();
      return {
        title: document.getElementById('detail-title').textContent,
        ins: document.querySelectorAll('#detail-prompt ins').length,
        aspects: document.querySelectorAll('#detail-critique tbody tr').length,
        query: document.getElementById('detail-query').textContent.length,
        answer: document.getElementById('detail-answer').textContent.length,
        hash: location.hash,
      };
    })()"""
    )
    assert detail["ins"] >= 1 and detail["query"] > 0 and detail["answer"] > 0
    assert detail["hash"].startswith("#node=")
    assert browser.errors() == []
    shot = browser.screenshot(tmp_path / "hostile.png")
    width, height, distinct = png_facts(shot)
    assert (width, height) == (1400, 1000) and distinct > 30 and len(shot) > 20_000
    print(f"\nsmall report: {report.bytes} bytes, load {seconds * 1000:.0f} ms")


def test_big_report_loads_fast_and_pages_the_call_table(tmp_path, browser):
    db = tmp_path / "big.db"
    run = anyio.run(lambda: build_db(db, run_id="big", **big_run_options()))
    assert len(run.node_ids) >= 450 and run.calls >= 3000
    report = _export(db, run.run_id, tmp_path / "big.html")
    assert report.calls == run.calls and report.nodes == len(run.node_ids)
    browser.events.clear()
    seconds = browser.open(report.path.resolve().as_uri())
    page = browser.evaluate(CHECK_PAGE)
    assert browser.errors() == []
    assert page["ready"] and page["callsInData"] == run.calls
    # lazily rendered: only the best path is built, and one page of calls
    assert page["treeRows"] < 0.5 * len(run.node_ids)
    assert page["callRows"] == 50
    assert page["range"].strip().startswith(f"rows 1–50 of {run.calls}")
    assert page["plotNodes"] == len(run.node_ids) - 1  # every node but the root
    paged = browser.evaluate(
        """(() => {
      document.getElementById('calls-next').click();
      const second = document.getElementById('calls-range').textContent;
      const role = document.getElementById('calls-role');
      role.value = 'editor';
      role.dispatchEvent(new Event('change'));
      const rows = [...document.querySelectorAll('#calls-table tbody tr')];
      const roles = new Set(rows.map((tr) => tr.children[1].textContent));
      document.querySelector('#calls-table th[data-key="cost_usd"]').click();
      return {second, roles: [...roles], editorRange: document.getElementById('calls-range').textContent};
    })()"""
    )
    assert paged["second"].strip().startswith(f"rows 51–100 of {run.calls}")
    assert paged["roles"] == ["editor"]
    assert f"of {run.calls_by_role['editor']}" in paged["editorRange"]
    started = time.perf_counter()
    browser.evaluate("document.getElementById('tree-expand').click()")
    expand_ms = (time.perf_counter() - started) * 1000
    assert browser.evaluate("document.querySelectorAll('#tree li.node').length") == len(
        run.node_ids
    )
    assert browser.errors() == []
    shot = browser.screenshot(tmp_path / "big.png")
    assert png_facts(shot)[2] > 30
    print(
        f"\nbig report: {len(run.node_ids)} nodes, {run.calls} calls; export "
        f"{report.seconds * 1000:.0f} ms, {report.bytes / 1024:.0f} KiB; page load "
        f"{seconds * 1000:.0f} ms (script init {page['initMs']:.0f} ms); expand all "
        f"{expand_ms:.0f} ms"
    )


def test_report_of_a_run_with_nothing_recorded_yet_opens_cleanly(tmp_path, browser):
    db = tmp_path / "empty.db"

    async def create() -> str:
        async with RunStore.open(db) as store:
            run_id = await store.create_run("optimize", {"settings": {}}, name="empty")
            await store.set_run_status(run_id, "running")
            return run_id

    report = _export(db, anyio.run(create), tmp_path / "empty.html")
    browser.events.clear()
    browser.open(report.path.resolve().as_uri())
    page = browser.evaluate(CHECK_PAGE)
    assert browser.errors() == []
    assert page["ready"] and page["treeRows"] == 0 and page["callRows"] == 0
    assert page["plot"] and page["plotBest"] == 0
    assert "no level has completed yet" in browser.evaluate("document.body.innerText")

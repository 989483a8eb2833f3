"""A minimal headless-Chromium driver over the DevTools protocol (no Selenium/Playwright download).

Chromium (Debian package `chromium`) is started in its own process group on a
private profile; `Browser.close()` kills the group. Only what the UI tests
need: navigate, wait for text, click by visible text, screenshot.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    def __init__(self, executable: str, width: int = 1400, height: int = 1100, timeout: float = 30.0):
        from websockets.sync.client import connect
        self.profile = tempfile.mkdtemp(prefix="shomin-chromium-")
        self.proc = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
             f"--user-data-dir={self.profile}", "--remote-debugging-address=127.0.0.1",
             "--remote-debugging-port=0", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            port = self._devtools_port(timeout)
            deadline = time.monotonic() + timeout
            while True:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                    pages = [t for t in json.load(r) if t.get("type") == "page"]
                if pages or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=64 * 2**20, open_timeout=timeout)
            self._id = 0
            self.send("Page.enable")
            self.send("Runtime.enable")
        except BaseException:
            self.close()
            raise

    def _devtools_port(self, timeout: float) -> int:
        # Chromium prints "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/..." on stderr
        deadline = time.monotonic() + timeout
        buf = b""
        os.set_blocking(self.proc.stderr.fileno(), False)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}: {buf.decode(errors='replace')[-2000:]}")
            chunk = self.proc.stderr.read() or b""
            buf += chunk
            m = re.search(rb"DevTools listening on ws://127\.0\.0\.1:(\d+)/", buf)
            if m:
                return int(m.group(1))
            time.sleep(0.1)
        raise TimeoutError(f"chromium did not open its DevTools port: {buf.decode(errors='replace')[-2000:]}")

    def send(self, method: str, params: dict | None = None, timeout: float = 30.0) -> dict:
        self._id += 1
        mid = self._id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer to {method}")
            msg = json.loads(self.ws.recv(timeout=left))
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def evaluate(self, expression: str):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        return r.get("result", {}).get("value")

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, needles: list[str], timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.text()
            if all(n in text for n in needles):
                return text
            time.sleep(0.3)
        missing = [n for n in needles if n not in text]
        raise AssertionError(f"not on the page after {timeout:.0f}s: {missing}\n--- page text ---\n{text[:3000]}")

    def click_text(self, label: str, timeout: float = 15.0) -> None:
        """Click the innermost visible element whose own text is exactly `label` (tabs, buttons, links)."""
        js = """(() => {
          const want = %s;
          const els = [...document.querySelectorAll('button, a, [role=tab], li, span, div, p')];
          const hit = els.filter(e => e.offsetParent !== null && e.innerText && e.innerText.trim() === want)
                         .sort((a, b) => a.querySelectorAll('*').length - b.querySelectorAll('*').length)[0];
          if (!hit) return false;
          (hit.closest('button, a, [role=tab]') || hit).click();
          return true;
        })()""" % json.dumps(label)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.evaluate(js):
                return
            time.sleep(0.3)
        raise AssertionError(f"nothing to click labelled {label!r}")

    def screenshot(self, path: str | Path, full_page: bool = True) -> Path:
        params: dict = {"format": "png"}
        if full_page:
            size = self.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            if size:
                params.update(captureBeyondViewport=True,
                              clip={"x": 0, "y": 0, "width": size[0], "height": min(size[1], 6000), "scale": 1})
        data = self.send("Page.captureScreenshot", params)["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            if getattr(self, "ws", None) is not None:
                self.ws.close()
        except Exception:  # noqa: BLE001
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        except ProcessLookupError:
            pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""A minimal headless Chromium driver for tests: DevTools over ``--remote-debugging-pipe``.

Chromium reads JSON commands, each ending with a NUL byte, from file descriptor 3 and writes
replies and events to file descriptor 4. That is all this module needs: no websocket library,
no Playwright browser download. One page target is opened and driven in flat session mode.

Example (skipped when there is no Chromium)::

    with Chromium.launch(find_chromium()) as browser:
        page = browser.open("file:///tmp/report.html")
        title = page.evaluate("document.title")
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
from typing import Any

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
)
# A hang guard only: no outcome depends on it (events, not latencies, decide what happens).
TIMEOUT = 90.0


def find_chromium() -> str | None:
    """The path of a Chromium/Chrome executable on PATH, or ``None``."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Page:
    """One page target attached in flat mode; collects console errors as they arrive."""

    def __init__(self, browser: Chromium, session_id: str) -> None:
        self.browser = browser
        self.session_id = session_id
        self.errors: list[str] = []

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Send a command to this page and return its result."""
        return self.browser.send(method, params, self.session_id)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serializable results)."""
        reply = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in reply:
            raise RuntimeError(f"page script failed: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def screenshot_png(self) -> bytes:
        """A PNG screenshot of the viewport."""
        data = self.send("Page.captureScreenshot", format="png")["data"]
        return base64.b64decode(data)


class Chromium:
    """A headless Chromium process driven over the DevTools pipe.

    Use :meth:`launch` as a context manager; the process and its profile directory are removed
    on exit.
    """

    def __init__(self, process: subprocess.Popen, to_browser: int, from_browser: int) -> None:
        self.process = process
        self._to_browser = to_browser
        self._from_browser = from_browser
        self._next_id = 0
        self._messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._pages: dict[str, Page] = {}
        self.events: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._profile: str | None = None

    @classmethod
    def launch(cls, executable: str, width: int = 1280, height: int = 1600) -> Chromium:
        """Start Chromium headless with a fresh profile and the DevTools pipe."""
        profile = tempfile.mkdtemp(prefix="afnio-chromium-")
        commands_read, commands_write = os.pipe()
        replies_read, replies_write = os.pipe()

        def wire_pipes() -> None:  # runs in the child, before exec
            high_in = fcntl.fcntl(commands_read, fcntl.F_DUPFD, 10)
            high_out = fcntl.fcntl(replies_write, fcntl.F_DUPFD, 10)
            os.dup2(high_in, 3)
            os.dup2(high_out, 4)

        process = subprocess.Popen(
            [
                executable,
                *FLAGS,
                f"--window-size={width},{height}",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=wire_pipes,
            pass_fds=(3, 4),
        )
        os.close(commands_read)
        os.close(replies_write)
        browser = cls(process, commands_write, replies_read)
        browser._profile = profile
        return browser

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ protocol
    def _read(self) -> None:
        buffer = b""
        while True:
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                self._messages.put(None)
                return
            buffer += chunk
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                self._messages.put(json.loads(raw))

    def _handle_event(self, message: dict[str, Any]) -> None:
        self.events.append(message)
        page = self._pages.get(message.get("sessionId", ""))
        if page is None:
            return
        method, params = message["method"], message.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text")
            page.errors.append(f"uncaught exception: {text}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = " ".join(str(arg.get("value", arg.get("description"))) for arg in params["args"])
            page.errors.append(f"console.{params['type']}: {args}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            page.errors.append(f"log error: {params['entry'].get('text')}")

    def _next_message(self) -> dict[str, Any]:
        try:
            message = self._messages.get(timeout=TIMEOUT)
        except queue.Empty:
            raise TimeoutError(f"Chromium sent nothing for {TIMEOUT:.0f} s") from None
        if message is None:
            raise RuntimeError(f"Chromium closed the DevTools pipe (exit {self.process.poll()})")
        return message

    def send(
        self, method: str, params: dict[str, Any] | None = None, session_id: str | None = None
    ) -> dict[str, Any]:
        """Send one command and return its result (events that arrive meanwhile are kept)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session_id is not None:
            message["sessionId"] = session_id
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._next_message()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method} failed: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self._handle_event(reply)

    def wait_for_event(self, method: str, session_id: str) -> dict[str, Any]:
        """Return the next event ``method`` of a session (events seen before are searched too)."""
        for event in self.events:
            if event["method"] == method and event.get("sessionId") == session_id:
                self.events.remove(event)
                return event
        while True:
            message = self._next_message()
            if "method" not in message:
                continue
            self._handle_event(message)
            if message["method"] == method and message.get("sessionId") == session_id:
                self.events.remove(message)
                return message

    def open(self, url: str) -> Page:
        """Open ``url`` in a new page and wait for its load event."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})
        page = Page(self, session["sessionId"])
        self._pages[page.session_id] = page
        for domain in ("Page", "Runtime", "Log"):
            page.send(f"{domain}.enable")
        page.send("Page.navigate", url=url)
        self.wait_for_event("Page.loadEventFired", page.session_id)
        return page

    def close(self) -> None:
        """Ask the browser to close, wait for the process, and remove its profile."""
        if self.process.poll() is None:
            self._next_id += 1
            command = {"id": self._next_id, "method": "Browser.close", "params": {}}
            os.write(self._to_browser, json.dumps(command).encode() + b"\0")
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        os.close(self._to_browser)
        self._reader.join(timeout=30)
        if not self._reader.is_alive():
            os.close(self._from_browser)
        if self._profile:
            shutil.rmtree(self._profile, ignore_errors=True)

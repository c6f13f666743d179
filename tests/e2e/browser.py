"""A real headless Chromium driven over the W3C WebDriver protocol, for the web page's tests.

Debian's `chromium` and `chromedriver` (packages chromium, chromium-driver; `make system-deps`)
do the work; the protocol is plain HTTP + JSON, so httpx (already a dependency) is the client:
no Selenium, no browser download at test time.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from serve.local_app import free_port

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference
KEYS = {"tab": "\ue004", "shift": "\ue008", "enter": "\ue007", "space": "\ue00d"}
START_TIMEOUT_S = 30


class WebDriverError(RuntimeError):
    pass


def find_browser() -> tuple[str, str]:
    """Paths of chromium and chromedriver, or a failure naming the packages to install."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        raise FileNotFoundError(
            "the browser tests need Debian's chromium and chromium-driver "
            "(make system-deps, or apt-get install chromium chromium-driver)"
        )
    return chromium, driver


class Browser:
    """One WebDriver session of a headless Chromium."""

    def __init__(self, http: httpx.Client, session: str):
        self.http, self.session = http, session

    # ----------------------------------------------------------------------- protocol

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        url = f"/session/{self.session}{path}"
        response = self.http.request(method, url, json=body if method != "GET" else None)
        value = response.json().get("value")
        if response.status_code != 200:
            error = value if isinstance(value, dict) else {}
            message = error.get("message", "").splitlines()[0] if error.get("message") else ""
            raise WebDriverError(f"{method} {path}: {error.get('error')}: {message}")
        return value

    def go(self, url: str) -> None:
        self._call("POST", "/url", {"url": url})

    def find(self, css: str) -> str:
        found = self._call("POST", "/element", {"using": "css selector", "value": css})
        return found[ELEMENT]

    def find_all(self, css: str) -> list[str]:
        found = self._call("POST", "/elements", {"using": "css selector", "value": css})
        return [item[ELEMENT] for item in found]

    def click(self, css: str) -> None:
        self._call("POST", f"/element/{self.find(css)}/click", {})

    def type(self, css: str, text: str, clear: bool = True) -> None:
        """Types into an input like a user; for a file input, `text` is the file's path."""
        element = self.find(css)
        if clear:
            self._call("POST", f"/element/{element}/clear", {})
        self._call("POST", f"/element/{element}/value", {"text": text})

    def text(self, css: str) -> str:
        return self._call("GET", f"/element/{self.find(css)}/text")

    def js(self, script: str, *args: Any) -> Any:
        """Runs `script` as a function body in the page (`arguments` holds args)."""
        return self._call("POST", "/execute/sync", {"script": script, "args": list(args)})

    def press(self, key: str, times: int = 1, shift: bool = False) -> None:
        code = KEYS[key]
        actions: list[dict] = []
        if shift:
            actions.append({"type": "keyDown", "value": KEYS["shift"]})
        for _ in range(times):
            actions += [{"type": "keyDown", "value": code}, {"type": "keyUp", "value": code}]
        if shift:
            actions.append({"type": "keyUp", "value": KEYS["shift"]})
        body = {"actions": [{"type": "key", "id": "keyboard", "actions": actions}]}
        self._call("POST", "/actions", body)

    def emulate_screen(self, size: tuple[int, int] | None) -> None:
        """A phone's screen (CSS pixels, touch, the page's viewport meta honoured), or None for
        the desktop window again (Chrome DevTools' device emulation, through chromedriver)."""
        if size is None:
            self.cdp("Emulation.clearDeviceMetricsOverride")
            return
        width, height = size
        self.cdp(
            "Emulation.setDeviceMetricsOverride",
            width=width, height=height, deviceScaleFactor=2, mobile=True,
        )  # fmt: skip

    def cdp(self, command: str, **params: Any) -> Any:
        return self._call("POST", "/goog/cdp/execute", {"cmd": command, "params": params})

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self._call("GET", "/screenshot")))
        return path

    # ----------------------------------------------------------------------- waiting

    def wait(self, condition: Callable[[], Any], timeout: float, what: str) -> Any:
        """Polls `condition` until it returns something truthy (the page changes by itself:
        timers, fetches, media loading; WebDriver has no event to block on)."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:g} s for {what}; last value {value!r}")
            time.sleep(0.1)

    def wait_js(self, script: str, timeout: float, what: str, *args: Any) -> Any:
        return self.wait(lambda: self.js(script, *args), timeout, what)

    @contextmanager
    def screenshot_on_failure(self, folder: Path, name: str) -> Iterator[None]:
        """On an exception: a screenshot and the page's HTML in `folder` (outside git), then
        the exception goes on."""
        try:
            yield
        except BaseException:
            folder.mkdir(parents=True, exist_ok=True)
            try:
                shot = self.screenshot(folder / f"{name}.png")
                html = folder / f"{name}.html"
                html.write_text(self.js("return document.documentElement.outerHTML;"))
                print(f"\nbrowser screenshot: {shot}\npage HTML: {html}")
            except Exception as exc:  # the browser may be what failed
                print(f"\nno screenshot of {name}: {exc}")
            raise


@contextmanager
def chromium(folder: Path) -> Iterator[Browser]:
    """Starts chromedriver and a headless Chromium (profile and logs under `folder`)."""
    chromium_path, driver_path = find_browser()
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = (folder / "chromedriver.log").open("ab")
    driver = subprocess.Popen(
        [driver_path, f"--port={port}", f"--log-path={folder / 'chromedriver.log'}"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    args = [
        "--headless=new",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-extensions",
        "--window-size=1280,1600",
        f"--user-data-dir={folder / 'profile'}",
    ]
    if os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium refuses to run its sandbox as root
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    session = None
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if http.get("/status").json()["value"]["ready"]:
                    break
            except httpx.HTTPError:
                pass
            if driver.poll() is not None or time.monotonic() > deadline:
                raise WebDriverError(f"chromedriver did not start; see {folder}/chromedriver.log")
            time.sleep(0.1)  # waiting for the driver process to listen
        capabilities = {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium_path, "args": args},
        }
        response = http.post("/session", json={"capabilities": {"alwaysMatch": capabilities}})
        value = response.json()["value"]
        if response.status_code != 200:
            raise WebDriverError(f"no browser session: {value.get('message', value)}")
        session = value["sessionId"]
        yield Browser(http, session)
    finally:
        if session is not None:
            try:
                http.delete(f"/session/{session}")
            except httpx.HTTPError:
                pass
        http.close()
        driver.terminate()
        try:
            driver.wait(timeout=10)
        except subprocess.TimeoutExpired:
            driver.kill()
            driver.wait()
        log.close()

"""The web page's files (serve/web) and how the API serves them, in process (no browser).

The page in a real headless Chromium against a real server: tests/e2e/test_web_page.py.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

from serve.api import WEB_DIR
from serve.schemas import STYLE_NAMES
from tests.unit.test_api_contract import api, call

PAGE_FILES = ("index.html", "app.js", "style.css")


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.assets: list[str] = []
        self.controls: list[dict[str, str | None]] = []
        self.label_for: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if "id" in attributes:
            self.ids.add(attributes["id"])
        if tag == "script":
            self.assets.append(attributes.get("src") or "")
        if tag == "link" and attributes.get("rel") == "stylesheet":
            self.assets.append(attributes.get("href") or "")
        if tag in ("input", "select", "textarea"):
            self.controls.append(attributes)
        if tag == "label" and attributes.get("for"):
            self.label_for.add(attributes["for"])


def _page() -> _Collector:
    collector = _Collector()
    collector.feed((WEB_DIR / "index.html").read_text())
    return collector


def test_the_page_is_served_at_the_root_with_its_files_and_a_strict_policy():
    app = api(keys=True)  # no key needed: the page holds no data; its calls send the key
    page = call(app, "GET", "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "media-src 'self' blob:" in policy
    for name in PAGE_FILES:
        served = call(app, "GET", f"/static/{name}")
        assert served.status_code == 200, name
        assert served.content == (WEB_DIR / name).read_bytes()
    assert call(app, "GET", "/static/missing.js").status_code == 404
    assert call(app, "GET", "/static/..%2Fapi.py").status_code == 404
    wrong = call(app, "POST", "/static/app.js")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "GET, HEAD"
    assert wrong.json()["error"]["code"] == "method_not_allowed"


def test_the_page_stays_out_of_the_openapi_document_which_documents_the_styles():
    document = api().openapi()
    assert not [
        path for path in document["paths"] if not path.startswith(("/v1/", "/healthz", "/readyz"))
    ]
    schemas = document["components"]["schemas"]
    names = []
    for ref in schemas["MotionStyle"]["oneOf"]:
        style = schemas[ref["$ref"].rsplit("/", 1)[1]]
        names.append(style["properties"]["name"]["const"])
    assert tuple(names) == STYLE_NAMES
    assert schemas["ExaggerateStyle"]["properties"]["amount"]["maximum"] == 5
    assert schemas["RetimeStyle"]["required"] == ["speed"]


def test_the_page_loads_nothing_from_elsewhere():
    page = _page()
    assert page.assets == ["static/style.css", "static/app.js"]
    for name in PAGE_FILES:
        text = (WEB_DIR / name).read_text()
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), name
        assert "@import" not in text and "import(" not in text, name
    assert "<script>" not in (WEB_DIR / "index.html").read_text()  # no inline script (CSP)


def test_every_element_the_script_uses_exists_and_every_control_has_a_label():
    page = _page()
    script = (WEB_DIR / "app.js").read_text()
    used = set(re.findall(r'\$\("([\w-]+)"\)', script))
    assert used and used <= page.ids, sorted(used - page.ids)
    for control in page.controls:
        labelled = control.get("id") in page.label_for or control.get("aria-label")
        assert labelled, f"control without a label: {control}"

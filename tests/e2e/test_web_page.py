"""The web page at `/` in a real headless Chromium against a real `motionserve serve`.

A person's path through it: type the API key, upload the sample clip, pick the draft preset,
see the estimate, submit, watch every stage reach done, play the result, read the cost table;
a file that is not a video shows the server's own error message. On a failure the browser's
screenshot and the page's HTML are saved under pytest's temporary folder (outside git) and their
paths printed.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import FAST_OVERRIDES
from tests.e2e.browser import chromium
from tests.e2e.conftest import KEYS

JOB_TIMEOUT_S = 150
PHONE = (390, 844)  # CSS pixels of a common phone held upright


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with chromium(tmp_path_factory.mktemp("chromium")) as instance:
        yield instance


@pytest.fixture
def shots(tmp_path_factory):
    return tmp_path_factory.mktemp("screenshots")


def open_page(browser, server) -> None:
    browser.emulate_screen(None)
    browser.go(f"{server.url}/")
    browser.wait_js("return document.body.dataset.ready === 'true';", 30, "the page to start")
    browser.type("#api-key", KEYS["acme"])


def test_edit_the_sample_from_the_page(server, browser, sample_video, shots, tmp_path):
    with browser.screenshot_on_failure(shots, "edit"):
        open_page(browser, server)
        # The preview and reference-image controls show exactly when the OpenAPI offers them.
        document = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
        multipart = document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
        offers_reference = "reference" in multipart["multipart/form-data"]["schema"]["properties"]
        visible = browser.js(
            "return ['reference-field', 'preview-button'].map(id => "
            "document.getElementById(id).offsetParent !== null);"
        )
        assert visible == [offers_reference, "/v1/previews" in document["paths"]]
        browser.type("#video", str(sample_video))
        if offers_reference:  # sent as the multipart file `reference`; it becomes the anchor
            import numpy as np
            from PIL import Image

            reference = tmp_path / "reference.png"
            pixels = np.random.default_rng(2).integers(0, 256, (96, 96, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(reference)
            browser.type("#reference", str(reference))
        browser.type("#prompt", "a robot dancing in a park")
        browser.click("#preset option[value='draft']")
        browser.click("#advanced summary")  # Advanced: small frames, few steps, fast
        browser.type("#overrides", json.dumps(FAST_OVERRIDES))

        # The estimate, before submitting, for the chosen preset and overrides.
        browser.wait_js("return document.querySelector('#estimate').dataset.state === 'ready';",
                        30, "the estimate")  # fmt: skip
        estimate = browser.text("#estimate")
        assert "This plan" in estimate and "Naive run" in estimate and "preset draft" in estimate

        browser.click("#submit-button")
        browser.wait_js("return !document.querySelector('#job-section').hidden;", 60, "the job")
        state = browser.wait_js(
            "const s = document.querySelector('#job-state').dataset.state;"
            "return ['done', 'failed', 'cancelled'].includes(s) ? s : null;",
            JOB_TIMEOUT_S,
            "the job to finish",
        )
        assert state == "done", browser.text("#job-section")

        # Per-stage progress: every stage the server reports, each one complete.
        job_id = browser.text("#job-id").removeprefix("job ").strip()
        with server.client() as client:
            status = client.get(f"/v1/jobs/{job_id}").json()
        counts = browser.js(
            "return [...document.querySelectorAll('#job-progress li')].map(li => "
            "[li.dataset.stage, li.querySelector('progress').value, "
            "li.querySelector('progress').max, li.querySelector('.count').textContent]);"
        )
        assert [stage for stage, *_ in counts] == list(status["progress"]), counts
        if offers_reference:  # the page sent the reference, and the job anchored on it
            assert status["report"]["plan"]["work_units"]["vae_encodes"] > 0
        for stage, done, total, text in counts:
            assert done == total == status["progress"][stage]["total"] > 0, counts
            assert text == f"{done}/{total}"

        # The result plays: a blob: source the browser decodes (H.264 MP4).
        media = browser.wait_js(
            "const v = document.querySelector('#result-video');"
            "if (v.error) return {error: v.error.code};"
            "return v.readyState >= 2 ? {src: v.currentSrc, width: v.videoWidth, "
            "duration: v.duration} : null;",
            30,
            "the result video to load",
        )
        assert "error" not in media, media
        assert media["src"].startswith("blob:") and media["width"] > 0 and media["duration"] > 0
        played = browser.js(
            "const v = document.querySelector('#result-video'); v.muted = true;"
            "return v.play().then(() => true, e => String(e));"
        )
        assert played is True, played
        link = browser.js(
            "const a = document.querySelector('#result-download');"
            "return [a.href, a.getAttribute('download')];"
        )
        assert link[0] == media["src"] and link[1].endswith(".mp4")

        # The cost table: one row per stage of the report, plan against naive.
        report = status["report"]
        rows = browser.js(
            "return [...document.querySelectorAll('#cost-table tbody tr')].map(tr => "
            "[...tr.cells].map(c => c.textContent));"
        )
        expected = {(s["stage"], s["device"]) for s in report["plan"]["stages"]}
        expected |= {(s["stage"], s["device"]) for s in report["naive"]["stages"]}
        assert {(row[0], row[1]) for row in rows} == expected
        totals = browser.js(
            "return [...document.querySelectorAll('#cost-totals tbody tr')].map(tr => "
            "tr.cells[0].textContent);"
        )
        assert totals == ["plan", "naive"]
        ratio = report["ratios"]["work_units"]
        assert f"work units x{ratio:.1f}" in browser.text("#cost-summary")


def test_a_bad_file_shows_the_servers_error(server, browser, tmp_path, shots):
    bad = tmp_path / "notes.mp4"
    bad.write_text("this is a shopping list, not a video\n" * 20)
    with server.client() as client, bad.open("rb") as handle:
        refused = client.post(
            "/v1/jobs",
            files={"video": ("notes.mp4", handle, "video/mp4")},
            data={"request": json.dumps({"prompt": "x", "preset": "draft"})},
        )
    assert refused.status_code in (415, 422), refused.text
    error = refused.json()["error"]

    with browser.screenshot_on_failure(shots, "bad-file"):
        open_page(browser, server)
        browser.type("#video", str(bad))
        browser.type("#prompt", "a robot dancing")
        browser.click("#preset option[value='draft']")
        browser.click("#submit-button")
        shown = browser.wait_js(
            "const e = document.querySelector('#form-error');"
            "return e.hidden ? null : [e.textContent, e.dataset.code];",
            60,
            "the error message",
        )
        assert shown == [f"{error['message']} ({error['code']})", error["code"]]
        assert browser.js("return document.querySelector('#job-section').hidden;") is True
        # The browser could not read it either: no estimate, and the page says why.
        browser.wait_js(
            "return document.querySelector('#estimate').dataset.state === 'unavailable';",
            15,
            "the estimate to say it has nothing to go on",
        )


def test_cancel_a_job_from_the_page(server, browser, sample_video, shots):
    with browser.screenshot_on_failure(shots, "cancel"):
        open_page(browser, server)
        browser.type("#video", str(sample_video))
        browser.type("#prompt", "a robot dancing in the rain")
        browser.type("#seed", "99")  # not the edit test's job: nothing of it is cached
        browser.click("#preset option[value='draft']")
        browser.click("#advanced summary")
        browser.type("#overrides", json.dumps(FAST_OVERRIDES))
        browser.click("#submit-button")
        browser.wait_js("return !document.querySelector('#job-section').hidden;", 60, "the job")
        browser.click("#job-cancel")
        state = browser.wait_js(
            "const s = document.querySelector('#job-state').dataset.state;"
            "return ['done', 'failed', 'cancelled'].includes(s) ? s : null;",
            30,
            "the job to stop",
        )
        assert state == "cancelled"
        assert browser.js("return document.querySelector('#job-cancel').disabled;") is True
        assert browser.js("return document.querySelector('#result-section').hidden;") is True


def test_the_page_is_usable_by_keyboard_and_on_a_phone(server, browser, shots):
    with browser.screenshot_on_failure(shots, "phone"):
        open_page(browser, server)
        browser.emulate_screen(PHONE)
        width = browser.wait_js(
            "return window.innerWidth === arguments[0] ? window.innerWidth : null;",
            10,
            "the phone's width",
            PHONE[0],
        )
        # Nothing wider than the screen: no sideways scrolling of the page.
        assert browser.js("return document.documentElement.scrollWidth;") <= width
        # Every visible control has a label a screen reader announces.
        unlabelled = browser.js(
            "return [...document.querySelectorAll('input, select, textarea, button')]"
            ".filter(c => c.offsetParent !== null)"
            ".filter(c => !(c.labels && c.labels.length) && !c.getAttribute('aria-label')"
            " && !c.getAttribute('aria-labelledby') && !(c.tagName === 'BUTTON'"
            " && c.textContent.trim()))"
            ".map(c => c.id || c.outerHTML);"
        )
        assert unlabelled == []
        # Tab walks through the form in order; Space ticks a checkbox, Enter adds a style.
        browser.js("document.querySelector('a.skip').focus();")  # the page's first stop
        reached = []
        for _ in range(40):
            browser.press("tab")
            focused = browser.js("return document.activeElement.id;")
            reached.append(focused)
            if focused == "submit-button":
                break
        order = ["api-key", "remember-key", "video", "prompt", "preset", "add-style-name",
                 "add-style", "keep-audio", "submit-button"]  # fmt: skip
        assert [f for f in reached if f in order] == order, reached
        before = browser.js("return document.querySelectorAll('#styles li').length;")
        browser.js("document.querySelector('#add-style').focus();")
        browser.press("enter")
        browser.wait_js(
            "return document.querySelectorAll('#styles li').length === arguments[0];",
            5,
            "a style added from the keyboard",
            before + 1,
        )
        browser.js("document.querySelector('#keep-audio').focus();")
        browser.press("space")
        assert browser.js("return document.querySelector('#keep-audio').checked;") is False


def test_the_page_is_served_without_a_key_and_its_calls_need_one(server):
    page = httpx.get(f"{server.url}/", timeout=30)
    assert page.status_code == 200 and "<form" in page.text
    assert httpx.get(f"{server.url}/static/app.js", timeout=30).status_code == 200
    assert httpx.get(f"{server.url}/v1/jobs/x", timeout=30).status_code == 401

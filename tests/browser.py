"""A real headless browser for page tests: Debian's ``chromium`` (``.ci/run`` installs it).

``open_page`` loads a copy of a page with two probe scripts added (allowed by its CSP through
their hashes): one first in <head> records script errors, console errors and CSP violations,
one measures every chart canvas (pixels painted, labels drawn) once the page says it is ready (or an error came); the DOM is then dumped with the probe's findings.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

CHROMIUM = next((path for name in ("chromium", "chromium-browser", "google-chrome")
                 if (path := shutil.which(name))), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
         "--virtual-time-budget=10000"]

RECORDER = """
window.__errors = [];
addEventListener("error", (e) => __errors.push("error: " + e.message));
addEventListener("unhandledrejection", (e) => __errors.push("rejection: " + e.reason));
document.addEventListener("securitypolicyviolation", (e) => __errors.push("csp: " + e.violatedDirective));
const __consoleError = console.error;
console.error = (...args) => { __errors.push("console: " + args.join(" ")); __consoleError(...args); };
"""
MEASURE = """
function measure(tries) {
  if (!document.body.dataset.ready && !__errors.length && tries > 0) return setTimeout(() => measure(tries - 1), 100);
  const charts = [...document.querySelectorAll("canvas[data-chart-canvas]")].map((canvas) => {
    const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    let painted = 0;
    for (let i = 3; i < pixels.length; i += 4) if (pixels[i]) painted++;
    // The labels Chart.js drew (a wrapped label is an array of lines): text a canvas holds as pixels.
    const chart = window.Chart && Chart.getChart(canvas);
    const labels = chart ? (chart.data.labels || []).map((label) => [].concat(label).join(" ")) : [];
    return {name: canvas.dataset.chartCanvas, painted, labels};
  });
  const probe = document.createElement("pre");
  probe.id = "probe";
  probe.textContent = JSON.stringify({errors: __errors, charts, ready: document.body.dataset.ready || ""});
  document.body.append(probe);
}
addEventListener("load", () => measure(80));
"""


def require_browser() -> str:
    """chromium's path; a skip without it, except where REFED_RAY_REQUIRE_BROWSER is set (CI)."""
    if CHROMIUM is None:
        if os.environ.get("REFED_RAY_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed (apt-get install -y chromium): .ci/run installs it")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return CHROMIUM


def _hash(script: str) -> str:
    return f"'sha256-{base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()}'"


def with_probe(page: str) -> str:
    """The page with the probe scripts added and allowed by its policy."""
    page = page.replace("script-src ", f"script-src {_hash(RECORDER)} {_hash(MEASURE)} ", 1)
    page = page.replace("<title>", f"<script>{RECORDER}</script><title>", 1)
    return page.replace("</body>", f"<script>{MEASURE}</script></body>", 1)


def open_page(page: Path, work: Path, fragment: str = "") -> tuple[dict, "Dom"]:
    """Load ``page`` (with ``#fragment``) in headless chromium: the probe's findings and the DOM."""
    probed = work / f"probed-{page.name}"
    probed.write_text(with_probe(page.read_text(encoding="utf-8")), encoding="utf-8")
    url = probed.as_uri() + (f"#{fragment}" if fragment else "")
    result = subprocess.run([require_browser(), *FLAGS, "--dump-dom", url], capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    found = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, flags=re.DOTALL)
    assert found, f"the probe did not run: {result.stdout[-2000:]}"
    dom = Dom()
    dom.feed(result.stdout)
    return json.loads(dom.unescape(found.group(1))), dom


def screenshot(page: Path, target: Path, width: int = 1280, height: int = 1800, fragment: str = "") -> Path:
    url = page.as_uri() + (f"#{fragment}" if fragment else "")
    subprocess.run([require_browser(), *FLAGS, f"--window-size={width},{height}", f"--screenshot={target}", url],
                   capture_output=True, text=True, timeout=180, check=True)
    return target


class Dom(HTMLParser):
    """The dumped DOM: the attributes of every element by tag, and its text."""

    def __init__(self):
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data):
        self.text.append(data)

    def unescape(self, text: str) -> str:
        import html

        return html.unescape(text)

    def find(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        """Elements of ``tag`` whose attributes include ``attrs`` (``class_`` for class)."""
        wanted = {k.rstrip("_").replace("_", "-"): v for k, v in attrs.items()}
        return [a for t, a in self.elements if t == tag and all(a.get(k) == v for k, v in wanted.items())]

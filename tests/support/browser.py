"""Headless Chromium for browser tests: render a page of a single-page app (the Prefect UI), read what it shows.

Chromium is Debian's ``chromium``, installed by ``scripts/browser.sh`` (``scripts/test.sh`` runs it). One call of
``Chromium.render`` is one ``chromium --headless --dump-dom --screenshot`` run with a fresh profile: the DOM after
the app's scripts ran (``--virtual-time-budget`` lets its API calls finish), and a PNG of the same moment.
``wait_for_page`` renders again until the page shows what a test expects, since one render may come before the
server has what the page asks for.

    browser = Chromium(find_chromium(), tmp_path)
    page = browser.wait_for_page(url, lambda p: "Completed" in p.text, 120, "the run to show Completed",
                                 screenshot=tmp_path / "run.png")
    assert page.texts("p-bread-crumbs__crumb") == ["Runs", "my-job"]
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable

# Flags that work on a machine without a display, GPU, D-Bus or internet (checked with Debian's Chromium 156).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,900"]


def find_chromium() -> str | None:
    """The path of the installed Chromium (``chromium``, or Ubuntu's ``chromium-browser``), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


# ---- the rendered DOM ------------------------------------------------------------------------------------------

_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
_HIDDEN = {"script", "style", "template", "noscript"}


@dataclass
class Element:
    tag: str
    classes: list[str]
    href: str | None
    text: str = ""


@dataclass
class RenderedPage:
    """A page as the browser left it: its DOM (``html``), visible text (``text``, whitespace collapsed), title,
    and its elements with their text, to look things up by CSS class or link."""

    url: str
    html: str
    title: str = ""
    text: str = ""
    elements: list[Element] = field(default_factory=list)

    def texts(self, css_class: str) -> list[str]:
        """The text of each element carrying ``css_class``, in document order."""
        return [e.text for e in self.elements if css_class in e.classes]

    def key_values(self) -> list[tuple[str, str]]:
        """The page's label/value pairs (the Prefect UI's ``p-key-value`` details: ``("Flow Run", "my-job")``)."""
        return list(zip(self.texts("p-key-value__label"), self.texts("p-key-value__value")))

    def links(self) -> list[tuple[str, str]]:
        """Every link as ``(href, text)``."""
        return [(e.href, e.text) for e in self.elements if e.tag == "a" and e.href is not None]


class _DomReader(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []  # visible text, in order; an element's text is chunks[start:end]
        self.open: list[tuple[Element, int]] = []
        self.elements: list[Element] = []
        self.hidden = 0
        self.title: list[str] | None = None
        self.title_text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _HIDDEN:
            self.hidden += 1
        if tag == "title":
            self.title = []
        if tag in _VOID:
            return
        a = dict(attrs)
        el = Element(tag, (a.get("class") or "").split(), a.get("href"))
        self.elements.append(el)
        self.open.append((el, len(self.chunks)))

    def handle_endtag(self, tag: str) -> None:
        if tag in _HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        if tag == "title" and self.title is not None:
            self.title_text, self.title = " ".join("".join(self.title).split()), None
        # Close up to the matching open element (the serialized DOM is well formed; this tolerates stray tags).
        for i in range(len(self.open) - 1, -1, -1):
            if self.open[i][0].tag == tag:
                for el, start in self.open[i:]:
                    el.text = " ".join(" ".join(self.chunks[start:]).split())
                del self.open[i:]
                break

    def handle_data(self, data: str) -> None:
        if self.title is not None:
            self.title.append(data)
        elif not self.hidden:
            self.chunks.append(data)


def read_dom(url: str, html: str) -> RenderedPage:
    reader = _DomReader()
    reader.feed(html)
    reader.close()
    return RenderedPage(url=url, html=html, title=reader.title_text, text=" ".join(" ".join(reader.chunks).split()),
                        elements=reader.elements)


# ---- running the browser ---------------------------------------------------------------------------------------

class Chromium:
    """Runs headless Chromium, one process per page, each with a fresh profile under ``workdir``."""

    def __init__(self, executable: str, workdir: Path, budget_ms: int = 30_000, timeout: float = 120) -> None:
        self.executable, self.workdir = executable, workdir
        self.budget_ms, self.timeout = budget_ms, timeout
        workdir.mkdir(parents=True, exist_ok=True)

    def render(self, url: str, screenshot: Path | None = None) -> RenderedPage:
        """Load ``url``, let the page's scripts run for up to ``budget_ms`` of virtual time (Chromium stops early
        once nothing is pending), and return the DOM; with ``screenshot``, also save a PNG of it there."""
        profile = Path(tempfile.mkdtemp(prefix="profile-", dir=self.workdir))
        cmd = [self.executable, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={self.budget_ms}",
               "--dump-dom"]
        if screenshot is not None:
            cmd.append(f"--screenshot={screenshot}")
        # A session of its own: on a timeout the whole browser (its renderer and GPU processes too) is killed.
        proc = subprocess.Popen([*cmd, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise AssertionError(f"chromium did not finish rendering {url} within {self.timeout:.0f} s") from None
        finally:
            shutil.rmtree(profile, ignore_errors=True)
        if proc.returncode != 0 or "<html" not in out:
            raise AssertionError(f"chromium exited with {proc.returncode} rendering {url}: {err[-3000:]}")
        return read_dom(url, out)

    def wait_for_page(self, url: str, shows: Callable[[RenderedPage], object], timeout: float, what: str,
                      screenshot: Path | None = None) -> RenderedPage:
        """Render ``url`` until ``shows(page)`` is truthy, and return that page (its screenshot, if asked for, is of
        that render). Fails after ``timeout`` naming ``what``, with the text the page showed last."""
        deadline = time.monotonic() + timeout
        while True:
            page = self.render(url, screenshot)
            if shows(page):
                return page
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {url} to show {what}; "
                                     f"it showed (title {page.title!r}): {page.text[:2000]}")
            time.sleep(1)

"""The user documentation: short README for users, pages that link up, /docs that serves them.

``/docs`` is crawled on a real server: every page the README links to, every
link and anchor in them, every picture. On disk, every relative link in the
README and under docs/ must point at a file of the repository.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlsplit

import pytest
import requests

from soundwatch.bundle import Bundle, load_bundle
from tests.httpkit import bundle_dir, running_server

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
REFERENCE_PAGES = (
    "configuration.md",
    "mqtt.md",
    "iot-edge.md",
    "http-api.md",
    "model.md",
    "verification.md",
    "bench.md",
    "architecture.md",
    "commands.md",
    "faults.md",
    "baseline.md",
)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def _links(text: str) -> list[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold no links
    return [a or b for a, b in LINK.findall(text)]


def test_the_readme_is_short_and_for_users() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.encode()) < 15_000
    for internal in ("seeds", "issue ", "§", " I ", "verified-recipes"):
        assert internal not in text, internal
    assert "make run" in text and "make test" in text and "`make` and `git`" in text
    assert "trained on simulated fans" in text and "make train" in text
    assert "TODO" not in text
    words = " ".join(text.replace("> ", " ").split())
    assert "learns the unit's own normal sound" in words and "docs/baseline.md" in words
    for user in ("IoT Edge operator", "MQTT and Home Assistant", "at the bench"):
        assert f"## Quick start: {user}" in text
    linked = {Path(link).name for link in _links(text) if link.startswith("docs/")}
    assert set(REFERENCE_PAGES) <= linked, set(REFERENCE_PAGES) - linked


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_relative_links_point_at_files_of_the_repository(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    for internal in ("seeds", "§", "verified-recipes"):
        assert internal not in text, f"{page.name}: {internal}"
    for link in _links(text):
        target, _ = urldefrag(link)
        if not target or urlsplit(target).scheme:
            continue
        path = (page.parent / target).resolve()
        rel = path.relative_to(ROOT).as_posix()
        assert path.exists(), f"{page.name}: {link} -> {rel}"


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.images: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(str(a["id"]))
        if tag == "a" and a.get("href"):
            self.hrefs.append(str(a["href"]))
        if tag == "img" and a.get("src") is not None:
            self.images.append(str(a["src"]))


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return load_bundle(bundle_dir())


def test_docs_serves_every_page_with_working_links_and_pictures(bundle: Bundle) -> None:
    with running_server(bundle) as srv:
        base = srv.url
        todo, seen, pages = [base + "/docs"], set(), {}
        while todo:
            url = todo.pop()
            if url in seen:
                continue
            seen.add(url)
            r = requests.get(url, timeout=10)
            assert r.status_code == 200, url
            parser = _Links()
            parser.feed(r.text)
            pages[url] = parser
            for src in parser.images:
                assert src, f"{url}: a picture with no source"
                img = requests.get(urljoin(url, src), timeout=10)
                assert img.status_code == 200, (url, src)
                assert img.headers["Content-Type"].startswith("image/"), (url, src)
            for href in parser.hrefs:
                target = urljoin(url, href)
                if not target.startswith(base + "/docs"):
                    continue  # other routes, or the web
                todo.append(urldefrag(target)[0])
        served = {urlsplit(u).path for u in pages}
        expected = {f"/docs/{name}" for name in REFERENCE_PAGES if (ROOT / "docs" / name).exists()}
        assert expected <= served, expected - served
        # Every anchor lands on a heading of its page.
        for url, parser in pages.items():
            for href in parser.hrefs:
                target, fragment = urldefrag(urljoin(url, href))
                if fragment and target in pages:
                    assert fragment in pages[target].ids, f"{url}: {href}"
        readme = requests.get(base + "/docs", timeout=10).text
        assert "<img" in readme and "[picture:" not in readme
        for escape in ("/docs/..%2Fpyproject.toml", "/docs/img/..%2F..%2F..%2Fetc%2Fpasswd"):
            assert requests.get(base + escape, timeout=10).status_code == 404, escape
        assert requests.get(base + "/docs/nothing.md", timeout=10).status_code == 404

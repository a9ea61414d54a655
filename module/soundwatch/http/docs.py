"""The user documentation at ``/docs``: the README and the pages under ``docs/``.

The pages are the repository's own Markdown, rendered on request, so the
module carries its manual to an isolated plant network. Links between pages
and the pictures they show work as they do in the repository: a link is
resolved against the page's place in the repository, then mapped to the
URL that serves it (``README.md`` -> ``/docs``, ``docs/mqtt.md`` ->
``/docs/mqtt.md``, ``docs/img/x.png`` -> ``/docs/img/x.png``). A link to
anything the server does not carry (source files, example configs) becomes
plain text naming it, never a dead link. Headings get GitHub's anchor ids, so
``mqtt.md#home-assistant`` lands where it does on GitHub.

Where the pages are: a checkout has them at the repository root; an
installed wheel (the container) carries them under
``<prefix>/share/doc/soundwatch`` (pyproject's data-files).
"""

from __future__ import annotations

import functools
import logging
import posixpath
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from markupsafe import Markup

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
README = "README.md"
DOCS_DIR = "docs"
URL_PREFIX = "/docs"
ASSET_TYPES = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg"}
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...


@dataclass(frozen=True)
class Page:
    """One rendered page: its title, its HTML body, and the file it came from."""

    title: str
    body: Markup
    origin: str


def default_roots(readme_path: Path | None = None) -> tuple[Path, ...]:
    """Where a README and its ``docs/`` may be, most specific first."""
    roots = [readme_path.parent] if readme_path is not None else []
    roots += [HERE.parents[2], Path(sys.prefix) / "share" / "doc" / "soundwatch"]
    return tuple(roots)


@dataclass(frozen=True)
class DocsTree:
    """The README and the pages beside it, found on disk."""

    root: Path
    readme: Path

    @classmethod
    def find(cls, readme_path: Path | None = None) -> DocsTree | None:
        if readme_path is not None:
            return cls(readme_path.parent, readme_path) if readme_path.is_file() else None
        for root in default_roots():
            if (root / README).is_file():
                return cls(root, root / README)
        return None

    def file_for(self, repo_path: str) -> Path | None:
        """The file behind a repository path the server may serve, or ``None``."""
        clean = posixpath.normpath(repo_path)
        if clean == README:
            return self.readme
        parts = clean.split("/")
        if parts[0] != DOCS_DIR or ".." in parts or len(parts) < 2:
            return None
        suffix = posixpath.splitext(clean)[1].lower()
        if suffix != ".md" and suffix not in ASSET_TYPES:
            return None
        path = self.root.joinpath(*parts)
        return path if path.is_file() else None

    def url_for(self, repo_path: str) -> str | None:
        """The URL that serves a repository path, or ``None`` when none does."""
        clean = posixpath.normpath(repo_path)
        if self.file_for(clean) is None:
            return None
        if clean == README:
            return URL_PREFIX
        return f"{URL_PREFIX}/{clean[len(DOCS_DIR) + 1 :]}"

    def render(self, repo_path: str) -> Page | None:
        """A Markdown page (``README.md`` or ``docs/<name>.md``) as HTML, or ``None``."""
        path = self.file_for(repo_path)
        if path is None or path.suffix != ".md":
            return None
        text = path.read_text(encoding="utf-8")
        base = posixpath.dirname(posixpath.normpath(repo_path))
        body = _render(text, base, self)
        match = re.search(r"^#\s+(.+)$", text, re.M)
        title = match.group(1).strip().strip("`") if match else repo_path
        return Page(title, body, str(path))


def slug(text: str, seen: dict[str, int]) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces as hyphens."""
    base = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
    count = seen.get(base, 0)
    seen[base] = count + 1
    return base if count == 0 else f"{base}-{count}"


def _render(text: str, base: str, tree: DocsTree) -> Markup:
    md = _markdown()
    if md is None:
        return Markup("<pre>{}</pre>").format(text)
    env: dict[str, Any] = {"base": base, "tree": tree}
    tokens = md.parse(text, env)
    _link_headings(tokens)
    _map_links(tokens, base, tree)
    return Markup(md.renderer.render(tokens, md.options, env))


@functools.lru_cache(maxsize=1)
def _markdown() -> Any:
    try:
        from markdown_it import MarkdownIt
    except ImportError:  # still readable, just not typeset
        logger.warning("markdown-it-py is not installed; /docs shows the pages as text")
        return None
    # Raw HTML in the pages is escaped, not passed through.
    md = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table")
    md.add_render_rule("image", _image)
    return md


def _link_headings(tokens: Sequence[Any]) -> None:
    seen: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if token.type == "heading_open" and i + 1 < len(tokens):
            token.attrSet("id", slug(tokens[i + 1].content, seen))


def _map_links(tokens: Sequence[Any], base: str, tree: DocsTree) -> None:
    for token in tokens:
        children = token.children or []
        opened: list[Any] = []
        for child in children:
            if child.type == "link_open":
                href = str(child.attrGet("href") or "")
                url = _target(href, base, tree)
                if url is None:  # nothing here serves it: say what it is, no dead link
                    child.tag = "span"
                    child.attrs = {"class": "repo-path", "title": f"{href} (in the repository)"}
                else:
                    child.attrSet("href", url)
                opened.append(child)
            elif child.type == "link_close" and opened:
                child.tag = opened.pop().tag
            elif child.type == "image":
                src = str(child.attrGet("src") or "")
                url = _target(src, base, tree)
                child.attrSet("src", url or "")


def _target(href: str, base: str, tree: DocsTree) -> str | None:
    """The URL for a link written in a page at ``base``; ``None`` if not served here."""
    if not href or href.startswith("#") or _EXTERNAL.match(href) or href.startswith("/"):
        return href or None
    path, _, fragment = href.partition("#")
    url = tree.url_for(posixpath.join(base, path))
    if url is None:
        return None
    return f"{url}#{fragment}" if fragment else url


def _image(self: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
    token = tokens[idx]
    alt = self.renderInlineAsText(token.children or [], options, env)
    src = token.attrGet("src")
    if not src:  # a picture the server does not carry: name it instead of a broken image
        return str(Markup('<span class="picture">[picture: {}]</span>').format(alt))
    return str(Markup('<img src="{}" alt="{}" loading="lazy">').format(src, alt))

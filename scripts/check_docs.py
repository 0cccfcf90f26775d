"""Checks a built documentation site the way a reader meets it (run by scripts/check_docs.sh after the build).

1. Internal links: every ``href`` / ``src`` of every built page that points inside the site must name an
   existing file, and its ``#fragment`` an element id of that file.
2. In a browser: the site is served on 127.0.0.1 and headless Chromium opens the index, an API page and the math
   page. The DOM after scripts ran must hold the page's real content (title, text, and for the math page the
   typeset formulas: MathJax runs from the site itself), and each screenshot must show a rendered page, not a
   blank or an error page (non-background pixels, several colors).

    python scripts/check_docs.py docs/_build/html [--out DIR] [--chromium PATH] [--no-browser]

Exit status 0 when everything holds; 1 with one line per failure otherwise.
"""

from __future__ import annotations

import argparse
import functools
import html.parser
import http.server
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import zlib
from pathlib import Path

# -- 1. internal links -------------------------------------------------------------------------------------------


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[tuple[str, str]] = []  # (attribute, value)
        self.problematic = 0  # docutils' markers of invalid markup (docs/known_docstring_issues.txt)

    def handle_starttag(self, tag, attrs):
        if "problematic" in (dict(attrs).get("class") or "").split():
            self.problematic += 1  # docutils marks invalid markup and links it to a message Sphinx does not render
        for name, value in attrs:
            if value is None:
                continue
            if name in ("id", "name") and (name == "id" or tag == "a"):
                self.ids.add(value)
            if (name == "href" and tag in ("a", "link")) or (name == "src" and tag in ("img", "script")):
                self.links.append((name, value))


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8", errors="replace"))
    return page


def check_links(root: Path) -> tuple[list[str], int]:
    """Broken internal links of the site under ``root``: ``(failures, number of links checked)``."""
    pages = sorted(root.rglob("*.html"))
    parsed: dict[Path, _Page] = {}

    def page_of(path: Path) -> _Page:
        if path not in parsed:
            parsed[path] = _parse(path)
        return parsed[path]

    failures, checked = [], 0
    for path in pages:
        for attr, link in page_of(path).links:
            url = urllib.parse.urlsplit(link)
            if url.scheme or link.startswith(("//", "mailto:", "data:")):
                continue  # external: not this check's business (the site must work offline)
            checked += 1
            target = path if not url.path else (path.parent / urllib.parse.unquote(url.path)).resolve()
            if target.is_dir():
                target = target / "index.html"
            rel = path.relative_to(root)
            if not target.exists():
                failures.append(f"{rel}: {attr}={link!r}: no file {target}")
                continue
            try:
                target.relative_to(root.resolve())
            except ValueError:
                failures.append(f"{rel}: {attr}={link!r} leaves the site")
                continue
            if url.fragment and target.suffix == ".html":
                fragment = urllib.parse.unquote(url.fragment)
                if re.fullmatch(r"id\d+", fragment) and page_of(target).problematic:
                    continue  # the link of a docstring markup problem (docs/known_docstring_issues.txt)
                if fragment not in page_of(target).ids:
                    where = target.relative_to(root.resolve())
                    failures.append(f"{rel}: {attr}={link!r}: no id {fragment!r} in {where}")
    return failures, checked


# -- 2. the browser ----------------------------------------------------------------------------------------------


def _png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """Width, height and rows (bytes, 3 or 4 per pixel) of an 8-bit RGB/RGBA non-interlaced PNG."""
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    if header is None:
        raise ValueError(f"{path}: no IHDR chunk")
    width, height, depth, color, _, _, interlace = header
    if depth != 8 or color not in (2, 6) or interlace:
        raise ValueError(f"{path}: unsupported PNG (depth {depth}, color type {color}, interlace {interlace})")
    bpp = 3 if color == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        ftype, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if ftype == 1:
                line[i] = (line[i] + a) & 255
            elif ftype == 2:
                line[i] = (line[i] + b) & 255
            elif ftype == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, [bytes(r) for r in rows]


def screenshot_stats(path: Path) -> dict[str, float]:
    """How much of a screenshot is not background (the most common color), and how many colors it has."""
    width, height, rows = _png_pixels(path)
    bpp = len(rows[0]) // width
    counts: dict[bytes, int] = {}
    for row in rows[::2]:
        for x in range(0, width, 2):
            px = row[x * bpp : x * bpp + 3]
            counts[px] = counts.get(px, 0) + 1
    total = sum(counts.values())
    background = max(counts.values())
    return {"width": width, "height": height, "ink_fraction": 1 - background / total, "colors": len(counts)}


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # the base class's signature
        pass


def serve(root: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=8000",
]


def chromium(binary: str, url: str, *, screenshot: Path | None = None, size=(1280, 1000)) -> str:
    """Runs headless Chromium on ``url`` with a fresh profile: the DOM after scripts ran (or a screenshot)."""
    with tempfile.TemporaryDirectory(prefix="adrpo-docs-chromium-") as profile:
        args = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}"]
        args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
        done = subprocess.run([*args, url], capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited {done.returncode} on {url}: {done.stderr.strip()[-500:]}")
    return done.stdout


# What each page must show once rendered: a title, words of its body, and (math) typeset formulas.
PAGES = {
    "index": {
        "path": "index.html",
        "texts": ["adrpo_jax", "Quickstart", "Porting a TRL", "Configuration reference"],
        "math": True,
    },
    "api": {
        "path": "api/_generated/adrpo_jax.losses.policy_gradient.html",
        "texts": ["grpo_loss", "adrpo_jax.losses.policy_gradient", "Parameters"],
        "math": False,
    },
    "math": {"path": "math.html", "texts": ["The general form", "Flow matching"], "math": True},
}


def _visible_text_length(dom: str) -> int:
    class _Text(html.parser.HTMLParser):
        def __init__(self):
            super().__init__(convert_charrefs=True)
            self.skip = 0
            self.n = 0

        def handle_starttag(self, tag, attrs):
            if tag in ("script", "style"):
                self.skip += 1

        def handle_endtag(self, tag):
            if tag in ("script", "style") and self.skip:
                self.skip -= 1

        def handle_data(self, data):
            if not self.skip:
                self.n += len(data.strip())

    parser = _Text()
    parser.feed(dom)
    return parser.n


def check_in_browser(root: Path, out: Path, binary: str) -> list[str]:
    failures = []
    server, base = serve(root)
    try:
        for name, spec in PAGES.items():
            url = base + spec["path"]
            if not (root / spec["path"]).exists():
                failures.append(f"{name}: {spec['path']} was not built")
                continue
            started = time.monotonic()
            dom = chromium(binary, url)
            missing = [text for text in spec["texts"] if text not in dom]
            failures += [f"{name}: the rendered page lacks {text!r} ({url})" for text in missing]
            title = dom.split("<title>", 1)[1].split("</title>", 1)[0] if "<title>" in dom else ""
            if "adrpo_jax" not in title:  # an error page (404, connection refused) has another title
                failures.append(f"{name}: the page's title is {title!r}, not the site's: an error page? ({url})")
            chars = _visible_text_length(dom)
            if chars < 500:
                failures.append(f"{name}: only {chars} characters of visible text ({url})")
            if spec["math"]:
                typeset = dom.count("<mjx-container")
                if typeset == 0:
                    failures.append(f"{name}: no formula was typeset (no <mjx-container>): MathJax did not run")
            shot = out / f"{name}.png"
            chromium(binary, url, screenshot=shot)
            stats = screenshot_stats(shot)
            if stats["ink_fraction"] < 0.02 or stats["colors"] < 8:
                failures.append(f"{name}: the screenshot looks blank ({stats}); see {shot}")
            print(
                f"check_docs: {name}: {chars} characters, {dom.count('<mjx-container')} formulas, screenshot "
                f"{stats['width']}x{stats['height']} ink {stats['ink_fraction']:.2f} colors {stats['colors']} "
                f"-> {shot} ({time.monotonic() - started:.1f} s)"
            )
    finally:
        server.shutdown()
    return failures


def find_chromium(explicit: str | None) -> str | None:
    for candidate in ([explicit] if explicit else []) + ["chromium", "chromium-browser", "google-chrome"]:
        path = shutil.which(candidate) if candidate else None
        if path:
            return path
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path, help="the built HTML directory (docs/_build/html)")
    parser.add_argument("--out", type=Path, default=None, help="where screenshots go (default: SITE/../screenshots)")
    parser.add_argument("--chromium", default=os.environ.get("CHROMIUM"), help="the browser binary")
    parser.add_argument("--no-browser", action="store_true", help="check the links only")
    args = parser.parse_args(argv)
    root = args.site.resolve()
    if not (root / "index.html").is_file():
        print(f"check_docs: {root}/index.html does not exist: build the site first", file=sys.stderr)
        return 1
    failures, checked = check_links(root)
    print(f"check_docs: {checked} internal links in {len(list(root.rglob('*.html')))} pages, {len(failures)} broken")
    if not args.no_browser:
        binary = find_chromium(args.chromium)
        if binary is None:
            failures.append("no chromium binary (apt-get install chromium, or --chromium PATH, or --no-browser)")
        else:
            out = (args.out or root.parent / "screenshots").resolve()
            out.mkdir(parents=True, exist_ok=True)
            failures += check_in_browser(root, out, binary)
    for failure in failures:
        print(f"check_docs: FAIL {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

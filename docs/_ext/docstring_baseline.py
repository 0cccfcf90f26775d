"""Sphinx extension: known docstring markup issues, listed in a baseline file instead of failing the build.

The site builds with warnings as errors (``-W``). A few docstrings written before the site existed are not
valid reStructuredText (a simple table whose key column overflows, a hanging indent docutils reads as a block
quote). Each is listed in ``docs/known_docstring_issues.txt`` as ``object | message``; a warning that matches a
listed entry is reported as a note, every other warning still fails the build, so no new issue gets in. The
entries are removed by fixing the docstrings, then deleting their lines (or building with
``ADRPO_DOCS_UPDATE_BASELINE=replace``, which rewrites the file with exactly the issues seen);
``ADRPO_DOCS_UPDATE_BASELINE=1`` adds the issues seen to the file and keeps the others. Entries that no longer
occur are reported at the end of a full build.

Only warnings located in a docstring (``...:docstring of adrpo_jax.x.y``) can match: the pages themselves
are always strict.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from sphinx.util import logging as sphinx_logging

log = sphinx_logging.getLogger(__name__)

_DOCSTRING = re.compile(r"docstring of ([\w.]+)")
_SUMMARY = re.compile(r"_generated/([\w.]+)\.rst:\d+:<autosummary>")


def _entry(record: logging.LogRecord) -> str | None:
    try:
        message = record.getMessage()
    except Exception:  # pylint: disable=broad-except
        message = str(record.msg)
    location = str(getattr(record, "location", "") or "")
    first = message.splitlines()[0] if message else ""
    first = re.sub(r"\s*\[docutils\]$", "", first).strip()
    found = _DOCSTRING.search(location) or _DOCSTRING.search(message)
    if found:
        first = re.sub(r"^.*?docstring of [\w.]+(:\d+)?:\s*", "", first)
        return f"{found.group(1)} | {first}"
    summary = _SUMMARY.search(location) or _SUMMARY.search(message)
    if summary:  # the first sentence of a member's docstring in a module's summary table
        first = re.sub(r"^.*?<autosummary>(:\d+)?:\s*", "", first)
        return f"{summary.group(1)} (summary table) | {first}"
    return None


class _BaselineFilter(logging.Filter):
    def __init__(self, known: set[str]):
        super().__init__()
        self.known = known
        self.seen: set[str] = set()
        self.matched = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        entry = _entry(record)
        if entry is None:
            return True
        self.seen.add(entry)
        if entry in self.known:
            self.matched += 1
            return False
        return True


def _baseline_path(app) -> Path:
    return Path(app.confdir) / "known_docstring_issues.txt"


def _read(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    return {
        line.strip()
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }


def _install(app) -> None:
    known = _read(_baseline_path(app))
    flt = _BaselineFilter(known)
    app._adrpo_baseline_filter = flt  # pylint: disable=protected-access
    for handler in logging.getLogger(sphinx_logging.NAMESPACE).handlers:
        if type(handler).__name__ == "WarningStreamHandler":
            handler.filters.insert(0, flt)


def _finish(app, exception) -> None:
    flt = getattr(app, "_adrpo_baseline_filter", None)
    if flt is None or exception is not None:
        return
    path = _baseline_path(app)
    mode = os.environ.get("ADRPO_DOCS_UPDATE_BASELINE", "")
    if mode in ("1", "replace"):
        header = (
            [line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")]
            if path.is_file()
            else []
        )
        entries = flt.seen if mode == "replace" else flt.seen | flt.known
        path.write_text("\n".join(header + sorted(entries)) + "\n", encoding="utf-8")
        log.info("docstring baseline: wrote %d entries to %s", len(entries), path)
        return
    if flt.matched:
        log.info("docstring baseline: %d known docstring issue(s) tolerated (%s)", flt.matched, path.name)
    # a full build (not an incremental one that read only a few docstrings) can tell which entries are stale
    stale = sorted(flt.known - flt.seen)
    if stale and getattr(app, "_adrpo_full_build", False):
        log.info(
            "docstring baseline: %d entr(y/ies) no longer occur; remove them from %s:\n  %s",
            len(stale),
            path.name,
            "\n  ".join(stale),
        )


def _note_full(app, env, docnames) -> None:
    app._adrpo_full_build = len(docnames) == len(env.found_docs)  # pylint: disable=protected-access


def setup(app):
    _install(app)
    app.connect("env-before-read-docs", _note_full)
    app.connect("build-finished", _finish)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}

"""The config keys of every trainer, with defaults and meanings, read from the config modules (no Sphinx needed).

Used by the Sphinx extension ``config_reference`` (the configuration reference page and the ``cfgkey`` role) and
by ``tests/test_docs_tooling.py``. Defaults come from the section builders (e.g.
:func:`adrpo_jax.rl.config.add_llm_config`), meanings from the ``key | meaning`` tables of the config modules'
docstrings, else from the ``# comment`` on the key's line in the builder's source, else from a section wildcard
row (``model.*``). Importing the config modules imports no jax; a builder that still lives in a trainer module is
found there as a fallback (that import does pull in jax).
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Recipe:
    """A trainer's config: the builders applied in order to an empty ConfigDict, and where its docs live."""

    name: str
    title: str
    builders: tuple[tuple[str, ...], ...]  # each: candidate "module:function" paths, first importable wins
    doc_modules: tuple[str, ...]  # modules whose docstring tables describe the keys (besides the builders')
    base: str | None = "common"  # keys of this recipe are shown only where they are not in the base's


COMMON = ("adrpo_jax.train.config:add_common_config",)
RECIPES: tuple[Recipe, ...] = (
    Recipe("common", "Common sections (every trainer)", (COMMON,), ("adrpo_jax.train.config",), base=None),
    Recipe(
        "llm",
        "LLM trainer (trainer='llm')",
        (COMMON, ("adrpo_jax.rl.config:add_llm_config",)),
        ("adrpo_jax.rl.config",),
    ),
    Recipe(
        "flow",
        "Flow trainer on digits (trainer='flow')",
        (COMMON, ("adrpo_jax.flow.config:add_flow_config",)),
        ("adrpo_jax.flow.config",),
    ),
    Recipe(
        "sd3",
        "SD3 / SD3.5 flow trainer",
        (COMMON, ("adrpo_jax.flow.config:add_sd3_config", "adrpo_jax.flow.sd3_trainer:add_sd3_config")),
        ("adrpo_jax.flow.sd3_trainer", "adrpo_jax.flow.config"),
        base="flow",
    ),
    Recipe(
        "audio",
        "Audio LLM trainer",
        (
            COMMON,
            ("adrpo_jax.rl.config:add_llm_config",),
            ("adrpo_jax.rl.config:add_audio_config", "adrpo_jax.rl.audio_trainer:add_audio_config"),
        ),
        ("adrpo_jax.rl.audio_trainer", "adrpo_jax.rl.config"),
        base="llm",
    ),
)


@dataclass
class KeyDoc:
    key: str
    default: Any
    doc: str = ""
    source: str = ""  # where the doc came from (module), for the undocumented-keys report


@dataclass
class RecipeReference:
    recipe: Recipe
    keys: dict[str, KeyDoc] = field(default_factory=dict)  # every key of the built config, in builder order
    shown: list[str] = field(default_factory=list)  # the keys this recipe's section renders
    modules: list[str] = field(default_factory=list)  # source files, for Sphinx's dependency tracking


# ---------------------------------------------------------------------------------------------------------------
# building the configs
# ---------------------------------------------------------------------------------------------------------------


def _resolve(candidates: tuple[str, ...]):
    errors = []
    for path in candidates:
        module_name, _, attr = path.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            errors.append(f"{module_name}: {err}")
            continue
        if hasattr(module, attr):
            return getattr(module, attr), module
        errors.append(f"{module_name} has no {attr}")
    raise ImportError(f"none of {list(candidates)} could be imported ({'; '.join(errors)})")


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in config:  # (a ConfigDict iterates its keys sorted)
        value = config[name]
        key = f"{prefix}{name}"
        if hasattr(value, "keys") and callable(value.keys) and not isinstance(value, dict):
            out.update(_flatten(value, key + "."))
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------------------
# reading the meanings
# ---------------------------------------------------------------------------------------------------------------

_BORDER = re.compile(r"^(=+)(\s+)(=+)\s*$")
_TICKED = re.compile(r"``([^`]+)``")


def _doc_tables(docstring: str) -> list[tuple[str, str]]:
    """``(key cell, meaning)`` rows of the two-column simple tables of a docstring (continuation lines joined)."""
    rows: list[tuple[str, str]] = []
    lines = inspect.cleandoc(docstring or "").splitlines()
    i = 0
    while i < len(lines):
        m = _BORDER.match(lines[i])
        if not m:
            i += 1
            continue
        boundary = len(m.group(1)) + len(m.group(2))
        # a table: border, header, border, rows..., border (or a header-less one: border, rows..., border)
        j = i + 1
        if j + 1 < len(lines) and _BORDER.match(lines[j + 1]) and not _BORDER.match(lines[j]):
            j += 2  # skip the header row and its border
        while j < len(lines) and not _BORDER.match(lines[j]):
            line = lines[j]
            if not line.strip():
                j += 1
                continue
            head = line[:boundary]
            if head.strip():
                if line.startswith("``"):
                    # the key cell may overflow its column: it ends at the first run of 2+ spaces after a ``key``
                    end = line.find("  ", line.find("``", 2) + 2)
                    cell, meaning = (line, "") if end < 0 else (line[:end], line[end:])
                    rows.append((cell.strip(), meaning.strip()))
                else:
                    rows.append(("", ""))  # a table of something else (e.g. the flow methods): ignored
            elif rows:
                cell, meaning = rows[-1]
                rows[-1] = (cell, (meaning + " " + line.strip()).strip())
            j += 1
        i = j + 1
    return [(cell, meaning) for cell, meaning in rows if cell]


def _cell_keys(cell: str, known: set[str]) -> list[str]:
    """The config keys named by a key cell: ``a.b`` / ``a.b``, ``c`` (= a.c) / ``a.*`` (a wildcard)."""
    tokens = _TICKED.findall(cell)
    keys: list[str] = []
    parent = ""
    for token in tokens:
        token = token.strip()
        if token.endswith(".*"):
            keys.append(token)
            parent = token[:-2]
            continue
        if token in known or any(k.startswith(token + ".") for k in known):
            keys.append(token)
            parent = token.rpartition(".")[0]
            continue
        if parent and f"{parent}.{token}" in known:
            keys.append(f"{parent}.{token}")
    return keys


def _source_comments(function: Any) -> list[tuple[list[str], str]]:
    """``(["name", ...], comment)`` for each line of a builder's source with ``"name": value  # comment``."""
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return []
    out = []
    for line in source.splitlines():
        code, sep, comment = line.partition("  # ")
        if not sep or not comment.strip():
            continue
        names = re.findall(r"[\"'](\w+)[\"']\s*:", code)
        if names:
            out.append((names, comment.strip()))
    return out


def build_reference(recipe: Recipe) -> RecipeReference:
    import ml_collections  # pylint: disable=import-outside-toplevel

    ref = RecipeReference(recipe)
    config = ml_collections.ConfigDict()
    functions = []
    for candidates in recipe.builders:
        function, module = _resolve(candidates)
        functions.append((function, module))
        config = function(config)
        ref.modules.append(inspect.getsourcefile(module) or "")
    flat = _flatten(config)
    ref.keys = {key: KeyDoc(key, value) for key, value in flat.items()}
    known = set(flat)

    # meanings: docstring tables of the doc modules and of the builders' modules (first match wins) ...
    modules = [importlib.import_module(name) for name in recipe.doc_modules]
    modules += [module for _, module in functions if module not in modules]
    wildcard: dict[str, tuple[str, str]] = {}
    for module in modules:
        docstrings = [module.__doc__ or ""] + [f.__doc__ or "" for f, m in functions if m is module]
        for docstring in docstrings:
            for cell, meaning in _doc_tables(docstring):
                keys = _cell_keys(cell, known)
                text = meaning or cell
                if meaning and len(keys) < len(_TICKED.findall(cell)):
                    text = f"{cell}: {meaning}"  # the cell carries extra words (e.g. "``top_k`` (0 = off)")
                for key in keys:
                    if key.endswith(".*"):
                        wildcard.setdefault(key[:-2], (text, module.__name__))
                    elif not ref.keys[key].doc:
                        ref.keys[key].doc, ref.keys[key].source = text, module.__name__
        if inspect.getsourcefile(module) not in ref.modules:
            ref.modules.append(inspect.getsourcefile(module) or "")
    # ... then the ``# comment`` on a key's line in a builder's source ...
    for function, module in reversed(functions):
        for names, comment in _source_comments(function):
            for name in names:
                for key in known:
                    if key.rpartition(".")[2] == name and not ref.keys[key].doc:
                        ref.keys[key].doc, ref.keys[key].source = comment, module.__name__
    # ... then a section wildcard (``model.*``: "the DiTConfig fields")
    for key, item in ref.keys.items():
        if not item.doc:
            for prefix, (text, source) in sorted(wildcard.items(), key=lambda kv: -len(kv[0])):
                if key.startswith(prefix + "."):
                    item.doc, item.source = text, source
                    break
    return ref


def all_references() -> dict[str, RecipeReference]:
    """Recipe name -> its reference. ``shown``: the keys its section renders (new, or set otherwise than in its
    base recipe)."""
    refs: dict[str, RecipeReference] = {}
    for recipe in RECIPES:  # a recipe's base comes before it
        ref = build_reference(recipe)
        base = refs.get(recipe.base) if recipe.base else None
        for key, item in ref.keys.items():
            if base is None or key not in base.keys:
                ref.shown.append(key)
            elif fmt(item.default) != fmt(base.keys[key].default):
                ref.shown.append(key)  # a base key this trainer sets otherwise (e.g. ``trainer``)
                if not item.doc:
                    item.doc, item.source = base.keys[key].doc, base.keys[key].source
        refs[recipe.name] = ref
    return refs


def fmt(value: Any) -> str:
    """A default as the reference shows it (``inf``, long tuples shortened)."""
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, tuple) and len(repr(value)) > 90:
        head = ", ".join(repr(v) for v in value[:3])
        return f"({head}, ...)  # {len(value)} items"
    return repr(value)


def type_name(value: Any) -> str:
    """The type of a default, as the reference shows it."""
    if isinstance(value, tuple):
        inner = sorted({type(v).__name__ for v in value})
        return f"tuple[{' | '.join(inner) or 'str'}, ...]"
    return type(value).__name__


def owner(refs: dict[str, RecipeReference], key: str) -> str:
    """The recipe whose entry of ``key`` carries the link target (the first one that renders it)."""
    for recipe in RECIPES:
        if key in refs[recipe.name].shown:
            return recipe.name
    return ""


def undocumented_keys() -> dict[str, list[str]]:
    """recipe -> the keys its section renders without a meaning."""
    refs = all_references()
    return {name: [k for k in ref.shown if not ref.keys[k].doc] for name, ref in refs.items()}


def all_keys() -> dict[str, set[str]]:
    """recipe -> every key of its config."""
    return {name: set(ref.keys) for name, ref in all_references().items()}

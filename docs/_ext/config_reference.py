"""Sphinx extension: the configuration reference, generated from the config modules.

Every config key of every trainer is rendered with its default (read from the section builders, e.g.
:func:`adrpo_jax.rl.config.add_llm_config`) and its meaning (read from the ``key | meaning`` tables of the
config modules' docstrings, or from the ``# comment`` on the key's line in the builder's source). Nothing is
written by hand here: a key added to a builder appears in the docs at the next build, and a key whose meaning is
not written anywhere is listed as undocumented (a build warning with ``config_reference_strict = True``).

Directive (reStructuredText; in a MyST page inside ``{eval-rst}``, since it renders reStructuredText)::

    ```{eval-rst}
    .. config-reference:: llm
    ```

renders the keys that the ``llm`` recipe adds on top of the common sections, grouped by section, as
``std:confval`` objects (the first recipe that defines a key owns its link target). Role::

    {cfgkey}`rl.group_size`        {cfgkey}`flow:rl.method`

checks at build time that the key exists (in any recipe, or in the named one): a misspelled or removed key is a
build warning, so the pages that name keys (the TRL porting table) cannot drift from the code. It links to the
key's entry in the reference.

Importing the config modules imports no jax (they are plain ``ml_collections`` builders); a builder that lives in
a trainer module is found there as a fallback (that import does pull in jax).
"""

from __future__ import annotations

from config_keys import RECIPES, RecipeReference, all_references, fmt, owner, type_name
from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective, SphinxRole

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Sphinx glue
# ---------------------------------------------------------------------------------------------------------------


def _references(env) -> dict[str, RecipeReference]:
    cache = getattr(env, "_adrpo_config_reference", None)
    if cache is None:
        cache = all_references()
        env._adrpo_config_reference = cache  # pylint: disable=protected-access
    return cache


def _owner(env, key: str) -> str:
    return owner(_references(env), key)


class ConfigReferenceDirective(SphinxDirective):
    """``config-reference RECIPE``: every key the recipe adds (or sets differently), with default and meaning."""

    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        name = self.arguments[0]
        refs = _references(self.env)
        if name not in refs:
            raise self.error(f"unknown recipe {name!r}; choose one of {[r.name for r in RECIPES]}")
        ref = refs[name]
        for path in ref.modules:
            if path:
                self.env.note_dependency(path)
        self.env.note_dependency(__file__)
        strict = self.env.config.config_reference_strict
        lines: list[str] = []
        section = None
        undocumented = []
        # top-level keys first, then the sections in alphabetical order (ConfigDict keeps its keys sorted)
        for key in sorted(ref.shown, key=lambda k: ("." in k, k.split(".")[0], k)):
            item = ref.keys[key]
            top = key.split(".")[0] if "." in key else "(top level)"
            if top != section:
                section = top
                lines += ["", f".. rubric:: ``{top}``" if top != "(top level)" else ".. rubric:: top-level keys", ""]
            options = [
                f"   :type: ``{type_name(item.default)}``",
                f"   :default: ``{fmt(item.default)}``",
                "   :no-contents-entry:",
            ]
            if _owner(self.env, key) != name:
                options.append("   :no-index:")
            lines += [f".. confval:: {key}"] + options + [""]
            doc = item.doc or "*(no description in the config module yet)*"
            if not item.doc:
                undocumented.append(key)
            lines += ["   " + doc, ""]
        if undocumented:
            message = (
                f"config reference {name!r}: {len(undocumented)} key(s) without a meaning in the config "
                f"modules: {', '.join(undocumented)}"
            )
            if strict:
                log.warning(message, location=self.get_location())
            else:
                log.info(message)
        container = nodes.container(classes=["config-reference"])
        self.state.nested_parse(StringList(lines, source=f"<config-reference {name}>"), self.content_offset, container)
        return [container]


class ConfigKeyRole(SphinxRole):
    """``{cfgkey}`KEY``` or ``{cfgkey}`RECIPE:KEY```: a checked reference to a config key."""

    def run(self) -> tuple[list[nodes.Node], list[nodes.system_message]]:
        text = self.text.strip()
        recipe, sep, key = text.partition(":")
        if not sep:
            recipe, key = "", text
        refs = _references(self.env)
        if recipe and recipe not in refs:
            msg = self.inliner.reporter.warning(f"cfgkey: unknown recipe {recipe!r} in {text!r}", line=self.lineno)
            return [nodes.literal(text, key)], [msg]
        pool = [refs[recipe]] if recipe else list(refs.values())
        if not any(key in ref.keys for ref in pool):
            msg = self.inliner.reporter.warning(
                f"cfgkey: {key!r} is not a config key{' of ' + repr(recipe) if recipe else ''} (the config modules "
                "changed? fix the page)",
                line=self.lineno,
            )
            return [nodes.literal(text, key)], [msg]
        from sphinx.addnodes import pending_xref  # pylint: disable=import-outside-toplevel

        owner = _owner(self.env, key)
        if not owner:
            return [nodes.literal(key, key)], []
        node = pending_xref("", refdomain="std", reftype="confval", reftarget=key, refexplicit=True, refwarn=True)
        node += nodes.literal(key, key, classes=["xref", "std", "std-confval"])
        return [node], []


def setup(app):
    app.add_config_value("config_reference_strict", False, "env")
    app.add_directive("config-reference", ConfigReferenceDirective)
    app.add_role("cfgkey", ConfigKeyRole())
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}

"""The packaging and documentation tooling: the light core, the one version, the generated configuration
reference (every key has a meaning; every key a page names exists), and the built-site checker
(scripts/check_docs.py: internal links, screenshot analysis). Fast: no Sphinx build, no browser (those run in
scripts/check_docs.sh)."""

import os
import re
import struct
import subprocess
import sys
import textwrap
import tomllib
import zlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
sys.path.insert(0, str(REPO / "docs" / "_ext"))
sys.path.insert(0, str(REPO / "scripts"))

import check_docs  # noqa: E402  (scripts/check_docs.py)
import config_keys  # noqa: E402  (docs/_ext/config_keys.py)

HEAVY = ("torch", "transformers", "diffusers", "tokenizers", "safetensors", "sklearn", "matplotlib", "tensorboardX")


# -- packaging ----------------------------------------------------------------------------------------------------


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_core_dependencies_are_light_and_extras_resolve():
    core = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    assert {"jax", "flax", "optax"} <= core
    assert not core & {"torch", "transformers", "diffusers", "tokenizers", "safetensors", "scikit-learn"}
    extras = PYPROJECT["project"]["optional-dependencies"]
    for needed in ("llm", "flow", "sd3", "audio", "tpu", "cuda12", "test", "docs", "logging", "lint"):
        assert needed in extras, needed
    for name, requirements in extras.items():  # self-references name existing extras only
        for requirement in requirements:
            if _name(requirement) == "adrpo-jax":
                inner = re.search(r"\[(.*)\]", requirement).group(1).split(",")
                assert set(inner) <= set(extras), (name, requirement)
    assert {"transformers", "tokenizers", "safetensors"} <= {_name(r) for r in extras["llm"]}
    assert "diffusers" in {_name(r) for r in extras["sd3"]}
    assert {"tensorboard", "tensorboardx"} <= {_name(r) for r in extras["logging"]}


def test_one_version_string():
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "adrpo_jax.__version__"}
    import adrpo_jax

    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+|rc\d+)?", adrpo_jax.__version__)
    assert f"## [{adrpo_jax.__version__}]" in (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    assert (REPO / "adrpo_jax" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["adrpo_jax"]


@pytest.mark.slow  # a fresh interpreter importing jax and compiling: ~10 s on 2 loaded cores
def test_readme_loss_example_runs_without_the_heavy_dependencies(tmp_path):
    """The README's loss example with torch, transformers, ... made unimportable: what the core install gives."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    example = re.findall(r"```python\n(.*?)```", readme, flags=re.S)[0]
    script = tmp_path / "core_only.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {HEAVY!r}:
                    raise ImportError(f"{{name}} is not part of the core install")
        sys.meta_path.insert(0, _Block())
        """)
        + example
        + "\nassert grad.shape == (8, 16)\nprint('ok', sorted(m for m in sys.modules if m.split('.')[0] in "
        + f"{HEAVY!r}))\n",
        encoding="utf-8",
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok []"), done.stdout


# -- the configuration reference ----------------------------------------------------------------------------------

# Keys rendered without a meaning today (the sections being moved into the config modules): a key added to a
# builder without a row in its module's ``key | meaning`` table fails this test. Entries may only shrink.
UNDOCUMENTED_TODAY = {
    "common": set(),
    "llm": set(),
    "flow": {"rl.advantage_eps"},
    "sd3": {
        "data.prompts",
        "reward.clip_clamp",
        "reward.clip_path",
        "reward.clip_scale",
        "rl.advantage_eps",
        "sampling.time_shift",
        "text.cache_dir",
        "text.max_sequence_length",
        "text.path",
        "text.torch_dtype",
        "vae.path",
    },
    "audio": {
        "audio.audio_template",
        "audio.audio_token",
        "audio.cache_dir",
        "audio.feature_cache_size",
        "audio.freeze_encoder",
        "audio.n_mels",
    },
}


@pytest.fixture(scope="module")
def references():
    return config_keys.all_references()


def test_every_config_key_has_a_meaning(references):
    for name, ref in references.items():
        undocumented = {k for k in ref.shown if not ref.keys[k].doc}
        new = undocumented - UNDOCUMENTED_TODAY.get(name, set())
        assert not new, (
            f"recipe {name!r}: config key(s) {sorted(new)} have no meaning: add a row to the `key | meaning` "
            "table of the config module's docstring (docs/_ext/config_keys.py reads it)"
        )


def test_reference_reads_defaults_and_meanings(references):
    llm = references["llm"]
    assert llm.keys["rl.group_size"].default == 8 and "completions per prompt" in llm.keys["rl.group_size"].doc
    # a row naming two keys, the second relative to the first's section
    assert llm.keys["rl.adv_clip_max"].doc == llm.keys["rl.adv_clip_min"].doc != ""
    assert "rl.group_size" in llm.shown and "optim.learning_rate" not in llm.shown  # common keys: own section
    assert config_keys.fmt(float("-inf")) == "-inf"
    assert config_keys.owner(references, "rl.group_size") == "llm"
    assert config_keys.owner(references, "optim.learning_rate") == "common"


def test_doc_table_parser_handles_overflowing_key_cells():
    doc = """Intro.

    ==========  ======================
    key         meaning
    ==========  ======================
    ``a.b``     first
                continued
    ``a.long_name`` / ``c``  overflowing cell
    ``a.*``     every a key
    ==========  ======================
    """
    rows = config_keys._doc_tables(doc)  # pylint: disable=protected-access
    assert rows == [
        ("``a.b``", "first continued"),
        ("``a.long_name`` / ``c``", "overflowing cell"),
        ("``a.*``", "every a key"),
    ]
    known = {"a.b", "a.long_name", "a.c"}
    assert config_keys._cell_keys(rows[1][0], known) == ["a.long_name", "a.c"]  # pylint: disable=protected-access


def test_every_key_the_pages_name_exists():
    keys = config_keys.all_keys()
    every = set().union(*keys.values())
    named = []
    for page in sorted((REPO / "docs").glob("*.md")):
        for text in re.findall(r"\{cfgkey\}`([^`]+)`", page.read_text(encoding="utf-8")):
            recipe, sep, key = text.partition(":")
            pool = keys[recipe] if sep else every
            named.append((page.name, key if sep else text, (key if sep else text) in pool))
    assert len(named) > 60  # the TRL table alone names ~50
    assert all(ok for _, _, ok in named), [(p, k) for p, k, ok in named if not ok]


# -- the built-site checker ---------------------------------------------------------------------------------------


def _site(tmp_path: Path) -> Path:
    root = tmp_path / "html"
    (root / "api").mkdir(parents=True)
    (root / "index.html").write_text(
        '<html><head><title>adrpo_jax</title><link href="_static/x.css"></head><body>'
        '<a href="api/page.html#fn">ok</a> <a href="#top" id="top">self</a> <a href="https://example.org/">ext</a>'
        '<a href="missing.html">broken</a> <a href="api/page.html#nope">broken fragment</a></body></html>'
    )
    (root / "api" / "page.html").write_text(
        '<html><body><dt id="fn">fn</dt><a href="../index.html">up</a>'
        '<a href="#id1"><span class="problematic" id="id2">*</span></a></body></html>'
    )
    (root / "_static").mkdir()
    (root / "_static" / "x.css").write_text("")
    return root


def test_link_checker_finds_missing_pages_and_fragments(tmp_path):
    failures, checked = check_docs.check_links(_site(tmp_path))
    assert checked == 7  # the external link is not checked
    assert len(failures) == 2
    assert any("missing.html" in f for f in failures) and any("'nope'" in f for f in failures)


def _png(path: Path, rows: list[list[tuple[int, int, int]]]) -> None:
    raw = b"".join(b"\x00" + bytes(v for px in row for v in px) for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", len(rows[0]), len(rows), 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def test_screenshot_analysis_tells_blank_from_rendered(tmp_path):
    blank = tmp_path / "blank.png"
    _png(blank, [[(255, 255, 255)] * 40 for _ in range(30)])
    stats = check_docs.screenshot_stats(blank)
    assert stats["ink_fraction"] == 0 and stats["colors"] == 1
    drawn = tmp_path / "drawn.png"
    _png(drawn, [[(255, 255, 255) if (x + y) % 7 else (x * 6, y * 8, 90) for x in range(40)] for y in range(30)])
    stats = check_docs.screenshot_stats(drawn)
    assert 0.05 < stats["ink_fraction"] < 0.5 and stats["colors"] > 8
    # a real Chromium screenshot (other PNG filters than 0): the committed one of the docs' index
    shot = REPO / "docs" / "screenshots" / "index.png"
    stats = check_docs.screenshot_stats(shot)
    assert stats["width"] >= 800 and stats["ink_fraction"] > 0.05 and stats["colors"] > 50

"""What a TRL user meets when porting a run (issue 29 item 6), in the default suite:

"did you mean" on unknown keys (TRL's names, the same name in another section, spellings) and the TRL name table
of docs/porting_trl.md equal to ``TRL_ALIASES``; the keys that follow an overridden ``rewards.functions``; a run's
``config.json`` read back into the same config (every config file and variant); reward functions found from a
directory of ``import_path`` or by file path, and the messages when they are not; the end-of-run summary; the
eval images of a recipe (PNG files + TensorBoard) and the step-0 console line; launch.py end to end on the toy
trainer (the summary, ``--mode=eval`` with ``--workdir`` alone reading ``config.json``, a TRL name).
The scripted port on the real LLM recipe is the slow ``tests/rl/test_port_trl.py``.
"""

import importlib.util
import json
import logging
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from adrpo_jax.recipe import runner
from adrpo_jax.recipe.base import EVAL_IMAGES_DIR, Recipe, image_grid, write_png
from adrpo_jax.rl import rewards as rewards_lib
from adrpo_jax.train import config as config_lib

REPO = Path(__file__).resolve().parents[2]


def _load_config(name: str, variant: str = ""):
    spec = importlib.util.spec_from_file_location(f"_cfg_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, (module.get_config(variant) if variant else module.get_config())


# ---- did you mean -----------------------------------------------------------------------------------------------


def test_unknown_keys_name_what_was_meant():
    _, config = _load_config("llm_arith", "cpu")
    msg = config_lib.find_unknown_override(config, ["rl.num_generations"])
    assert msg.startswith("Unknown config key `config.rl.num_generations`: `config.rl` has no field "
                          "`num_generations`. Did you mean `rl.group_size` (TRL's `num_generations`)? (valid fields:")
    assert "`sampling.max_new_tokens` (TRL's `max_completion_length`)" in config_lib.find_unknown_override(
        config, ["max_completion_length"])
    assert config_lib.suggest_keys(config, "rl.learning_rate") == ["`optim.learning_rate`"]  # the other section
    assert config_lib.suggest_keys(config, "rl.grup_size") == ["`rl.group_size`"]  # a spelling
    assert config_lib.suggest_keys(config, "output_dir") == ["`--workdir` (TRL's `output_dir`)"]
    assert config_lib.suggest_keys(config, "zzzz_qqq") == []
    assert "Did you mean" not in config_lib.find_unknown_override(config, ["zzzz_qqq"])
    # a TRL name whose key this recipe does not have is not suggested (the flow recipe has no rl.group_size)
    _, flow = _load_config("flow_digits", "cpu")
    assert "`rl.group_size`" not in " ".join(config_lib.suggest_keys(flow, "num_generations"))


def test_trl_table_of_the_docs_equals_the_alias_table():
    """Each row of docs/porting_trl.md's GRPOConfig table whose TRL names map one-to-one onto keys agrees with
    TRL_ALIASES (so the "did you mean" of launch.py and the page cannot drift apart)."""
    text = (REPO / "docs" / "porting_trl.md").read_text(encoding="utf-8")
    table = text[text.index("## 4. `GRPOConfig` names"):]
    checked = 0
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or not cells[0].startswith("`"):
            continue
        trl = re.findall(r"`([A-Za-z_0-9]+)`", cells[0].split("=")[0].split("(")[0])
        ours = re.findall(r"\{cfgkey\}`([^`]+)`", cells[1])
        if len(trl) == len(ours) and trl:
            for name, key in zip(trl, ours):
                assert config_lib.TRL_ALIASES.get(name) == key, (name, key)
                checked += 1
    assert checked >= 25, checked
    for name, key in config_lib.TRL_ALIASES.items():  # every alias names a real key of the LLM recipe
        if not key.startswith("--"):
            assert config_lib.get_by_path(_load_config("llm_arith", "cpu")[1], key, None) is not None, (name, key)


# ---- keys that follow an override -------------------------------------------------------------------------------


def test_overriding_the_reward_functions_sets_weights_and_eval_reward():
    _, config = _load_config("llm_arith", "cpu")  # functions (exact_match, format), weights (1.0, 0.1)
    config.rewards.functions = ("mine.py:r", "format")
    messages = config_lib.apply_override_followers(config, ["rewards.functions", "total_steps"])
    assert config.rewards.weights == (1.0, 1.0) and config.eval.accuracy_reward == "mine.py:r"
    assert len(messages) == 2 and "rewards.weights = (1.0, 1.0) (was (1.0, 0.1))" in messages[0]
    # an explicit weight override wins; an accuracy reward among the new functions stays
    _, config = _load_config("llm_arith", "cpu")
    config.rewards.functions = ("format", "exact_match")
    config.rewards.weights = (0.5, 2.0)
    assert config_lib.apply_override_followers(config, ["rewards.functions", "rewards.weights"]) == []
    assert config.rewards.weights == (0.5, 2.0) and config.eval.accuracy_reward == "exact_match"
    # nothing overridden: nothing follows
    _, config = _load_config("llm_arith", "cpu")
    assert config_lib.apply_override_followers(config, ["rl.beta"]) == [] and config.rewards.weights == (1.0, 0.1)


# ---- config.json back into a config -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llm_arith", "llm_gsm8k", "flow_digits", "sd3_adrpo", "audio_arith"])
def test_run_config_json_reads_back_into_the_same_config(name):
    module, _ = _load_config(name)
    for variant in getattr(module, "VARIANTS", ("",)):
        config = module.get_config(variant) if variant else module.get_config()
        back = config_lib.config_from_dict(json.loads(json.dumps(config_lib.config_to_dict(config))))
        flat, flat_back = config_lib._flatten(config.to_dict()), config_lib._flatten(back.to_dict())
        assert flat.keys() == flat_back.keys(), variant
        for key, value in flat.items():  # same values and the same Python types (tuples stay tuples)
            assert flat_back[key] == value and type(flat_back[key]) is type(value), (variant, key)


def test_workdir_config_file(tmp_path):
    from adrpo_jax.recipe import workdir_config
    _, config = _load_config("llm_arith", "cpu")
    runner.write_run_config(config, tmp_path)
    back = workdir_config.get_config(str(tmp_path))
    assert config_lib.config_diff(config, back, ignore_prefixes=()) == []
    with pytest.raises(config_lib.ConfigError, match="does not exist: a run writes it once its first step"):
        workdir_config.get_config(str(tmp_path / "nope"))


# ---- custom reward functions ------------------------------------------------------------------------------------


REWARD_SRC = "def my_reward(prompts, completions, **columns):\n    return [float(len(c)) for c in completions]\n"


def test_reward_module_found_through_import_path_or_by_file(tmp_path, monkeypatch):
    pkg = tmp_path / "proj" / "mypkg_port_ux"
    pkg.mkdir(parents=True)
    (pkg / "rewards.py").write_text(REWARD_SRC)
    (tmp_path / "proj" / "solo_port_ux.py").write_text("import helper_port_ux\n\ndef r(prompts, completions, **c):\n"
                                                         "    return [helper_port_ux.X] * len(completions)\n")
    (tmp_path / "proj" / "helper_port_ux.py").write_text("X = 2.5\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the folders added below are dropped after the test
    spec = "mypkg_port_ux.rewards:my_reward"
    with pytest.raises(ImportError) as err:  # not on sys.path: the message says where it looked and the ways out
        rewards_lib.resolve_reward_function(spec)
    msg = str(err.value)
    assert "No module named 'mypkg_port_ux'" in msg and str(tmp_path) in msg
    assert "'path/to/mypkg_port_ux/rewards.py:my_reward'" in msg and "--config.import_path=" in msg
    # a file path, relative to the current directory
    name, fn = rewards_lib.resolve_reward_function("proj/mypkg_port_ux/rewards.py:my_reward")
    assert name == "my_reward" and fn(prompts=["p"], completions=["abc"]) == [3.0]
    assert rewards_lib.resolve_reward_function("proj/mypkg_port_ux/rewards.py:my_reward")[1] is fn  # loaded once
    with pytest.raises(AttributeError, match="has no function 'my_rewrd'; did you mean 'my_reward'"):
        rewards_lib.resolve_reward_function("proj/mypkg_port_ux/rewards.py:my_rewrd")
    with pytest.raises(ImportError, match=r"reward file 'nope\.py' of 'nope\.py:f' not found \(looked in the current"):
        rewards_lib.resolve_reward_function("nope.py:f")
    with pytest.raises(ValueError, match="did you mean 'exact_match'"):
        rewards_lib.resolve_reward_function("exact_mach")
    # import_path (what launch.py fills with the config file's and the current directory) makes the module found
    config = ml_collections.ConfigDict({"import_path": f"{tmp_path / 'proj'}"})
    assert runner.apply_import_path(config) == [str(tmp_path / "proj")]
    assert runner.apply_import_path(config) == []  # once
    assert rewards_lib.resolve_reward_function(spec)[1](prompts=["p"], completions=["ab"]) == [2.0]
    # an absolute file path; the file's folder serves its own imports (helper_port_ux next to it)
    assert rewards_lib.resolve_reward_function(f"{tmp_path}/proj/solo_port_ux.py:r")[1](["p"], ["c"]) == [2.5]
    # an import error inside the user's module is shown as it is (not as "module not found")
    (pkg / "broken.py").write_text("import not_installed_dependency_xyz\n")
    with pytest.raises(ModuleNotFoundError, match="^No module named 'not_installed_dependency_xyz'$"):
        rewards_lib.resolve_reward_function("mypkg_port_ux.broken:f")


def test_reward_weights_default_to_one_and_mismatch_names_both_lengths():
    computer = rewards_lib.RewardComputer(["exact_match", "format"], weights=())
    assert computer.weights.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="`weights` has 1 entries for 2 reward functions"):
        rewards_lib.RewardComputer(["exact_match", "format"], weights=(1.0,))
    from adrpo_jax.rl.config import validate_llm_config  # noqa: F401  (the config check names both lengths too)
    _, config = _load_config("llm_arith", "cpu")
    config.rewards.weights = (1.0,)
    from adrpo_jax.rl import config as rl_config
    with pytest.raises(config_lib.ConfigError, match="`rewards.weights` has 1 entries but `rewards.functions` has 2"):
        rl_config._validate_rewards(config)


# ---- end of run -------------------------------------------------------------------------------------------------


def test_run_summary_names_the_outputs(tmp_path):
    for name in ("metrics.jsonl", "samples.jsonl", "config.json"):
        (tmp_path / name).write_text("{}\n")
    (tmp_path / "tb").mkdir()
    for step in (50, 100):
        (tmp_path / "checkpoints" / str(step)).mkdir(parents=True)
    (tmp_path / EVAL_IMAGES_DIR).mkdir()
    write_png(tmp_path / EVAL_IMAGES_DIR / "samples_step100.png", np.zeros((2, 2, 3), np.uint8))
    config = ml_collections.ConfigDict({"total_steps": 100, "model": {"save_final": True}})
    result = {"step": 100, "reward_mean": 0.5, "kl_mean": 0.01, "eval/accuracy": 0.75, "loss": 1.0,
              "final_model": str(tmp_path / "final_model")}
    text = runner.run_summary(result, tmp_path, config)
    lines = text.splitlines()
    assert lines[0] == "Finished at step 100/100: reward_mean=0.5 kl_mean=0.01 eval/accuracy=0.75"
    assert f"metrics:     {tmp_path}/metrics.jsonl" in text
    assert f"tensorboard --logdir {tmp_path}/tb" in text and f"samples:     {tmp_path}/samples.jsonl" in text
    assert f"{tmp_path}/checkpoints (steps 50, 100)" in text and f"{tmp_path}/final_model" in text
    assert "samples_step100.png" in text and f"launch.py --workdir={tmp_path} --mode=eval" in text
    assert "loss" not in text  # a summary, not the dict
    stopped = runner.run_summary({"step": 40, "stopped": "reward hacking: gold reward fell 30% (stop_when=...)"},
                                 tmp_path, ml_collections.ConfigDict({"total_steps": 100, "model": {"save_final": True}}))
    assert stopped.splitlines()[0] == "Stopped early at step 40/100: reward hacking: gold reward fell 30% (stop_when=...)"
    assert "final_model" not in stopped
    not_saved = runner.run_summary({"step": 3}, tmp_path,
                                   ml_collections.ConfigDict({"total_steps": 3, "model": {"save_final": False}}))
    assert "not exported (pass --config.model.save_final=True" in not_saved


# ---- eval images and the step-0 line ----------------------------------------------------------------------------


def _read_png(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(tag + body)
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + length
    w, h, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    c = {0: 1, 2: 3, 6: 4}[color]
    raw = zlib.decompress(chunks[b"IDAT"])
    rows = [raw[y * (w * c + 1):(y + 1) * (w * c + 1)] for y in range(h)]
    assert all(r[0] == 0 for r in rows) and depth == 8
    return np.frombuffer(b"".join(r[1:] for r in rows), np.uint8).reshape(h, w, c)


def test_write_png_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    for shape in ((5, 7, 3), (4, 3, 1), (2, 6, 4)):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        assert (_read_png(write_png(tmp_path / "a.png", image)) == image).all()
    grey = _read_png(write_png(tmp_path / "b.png", np.array([[0.0, 0.5], [1.0, 2.0]], np.float32)))
    assert grey[..., 0].tolist() == [[0, 128], [255, 255]]  # float in [0, 1] (clipped) -> uint8
    with pytest.raises(ValueError, match=r"must be \[H, W\] or \[H, W, C\]"):
        write_png(tmp_path / "c.png", np.zeros((2, 2, 2, 3)))


def test_image_grid_lays_out_rows():
    images = np.stack([np.full((2, 3, 3), v, np.uint8) for v in (10, 20, 30)])
    grid = image_grid(images, ncol=2, pad=1)
    assert grid.shape == (5, 7, 3)
    assert grid[0, 0, 0] == 10 and grid[0, 4, 0] == 20 and grid[3, 0, 0] == 30
    assert grid[2, 0, 0] == 255 and grid[3, 4, 0] == 255  # padding and the empty cell: white
    assert image_grid(np.zeros((1, 2, 2, 1), np.float32), ncol=1).dtype == np.float32


class _ImageRecipe(Recipe):
    """The smallest recipe: a scalar "model", one eval metric and one eval image per evaluation."""

    name = "images"

    def __init__(self, config, workdir):
        super().__init__(config, workdir)
        params = jax.ShapeDtypeStruct((2,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        self.policy = SimpleNamespace(abstract_state={"params": params})
        self.schedule, self.updates_per_step = (lambda s: 0.1), 1
        self.image_steps = []

    def init_state(self):
        return {"params": jnp.zeros((2,), jnp.float32)}

    def train_step(self, step, state):
        return {"params": state["params"] + 1.0}, {"loss": jnp.float32(step)}

    def evaluate(self, step, state):
        return {"eval/reward_mean": float(np.asarray(state["params"])[0])}

    def eval_images(self, step, state):
        self.image_steps.append(step)
        value = min(float(np.asarray(state["params"])[0]) / 4.0, 1.0)
        return {"samples": np.full((4, 6, 3), value, np.float32)}

    def export(self, params, path):
        return None


def test_eval_images_are_written_at_every_evaluation(tmp_path, caplog):
    config = config_lib.common_config()
    config.total_steps, config.eval_every, config.log_every = 4, 2, 2
    config.logging.progress_bar = False
    config.checkpoint.async_save = False
    recipe = _ImageRecipe(config, tmp_path)
    with caplog.at_level(logging.INFO):
        out = recipe.run()
    assert out["step"] == 4 and recipe.image_steps == [0, 2, 4]
    for step, value in ((0, 0), (2, 128), (4, 255)):
        image = _read_png(tmp_path / EVAL_IMAGES_DIR / f"samples_step{step}.png")
        assert image.shape == (4, 6, 3) and int(image[0, 0, 0]) == value
    events = b"".join(p.read_bytes() for p in (tmp_path / "tb").glob("events.out.tfevents.*"))
    assert b"eval_images/samples" in events  # the TensorBoard image summary
    assert "step 0 (before training" in caplog.text and "eval/reward_mean=0" in caplog.text
    assert "Initializing the train state" in caplog.text


# ---- launch.py end to end (toy trainer) -------------------------------------------------------------------------


def _launch(*args, cwd=REPO, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu", CI="true", PYTHONUNBUFFERED="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    return subprocess.run([sys.executable, str(REPO / "launch.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_launch_trl_name_and_eval_without_a_run(tmp_path):
    """Both fail while parsing the flags (before jax is imported)."""
    r = _launch("--config=tests/train/toy_config.py", f"--workdir={tmp_path}", "--config.max_steps=3")
    assert r.returncode == 1 and "Did you mean `total_steps` (TRL's `max_steps`)?" in r.stderr, r.stderr[-2000:]
    r = _launch(f"--workdir={tmp_path}", "--mode=eval")
    assert r.returncode == 1 and f"reads the run's config from {tmp_path}/config.json, which does not exist" \
        in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_launch_summary_and_eval_from_workdir(tmp_path):
    r = _launch("--config=tests/train/toy_config.py", f"--workdir={tmp_path}", "--config.total_steps=5")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Done: {" not in r.stderr + r.stdout
    assert "Finished at step 5/5" in r.stdout and f"metrics:     {tmp_path}/metrics.jsonl" in r.stdout
    assert f"tensorboard --logdir {tmp_path}/tb" in r.stdout, r.stdout
    run_config = json.loads((tmp_path / "config.json").read_text())
    assert run_config["import_path"] == os.pathsep.join([str(REPO / "tests" / "train"), str(REPO)])
    # --workdir alone: the run's config.json (here a plain train function, which --mode=eval refuses by name)
    r = _launch(f"--workdir={tmp_path}", "--mode=eval", "--config.toy.hidden=16")
    assert r.returncode == 1 and "`trainer` is the plain function 'tests.train.toy_trainer:train_and_evaluate'" \
        in r.stderr, r.stderr[-2000:]

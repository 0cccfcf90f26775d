"""The eval command (adrpo_jax.eval / launch.py --mode=eval) and the compare command (adrpo_jax.compare).

Eval: a 2-step LLM run on a tiny random model (in-process), then the newest checkpoint evaluated again: the
record in eval.jsonl holds the same eval/* values as the trainer's own final eval; then the final_model
fallback. Compare: hand-made metrics.jsonl files -> a PNG and a Markdown table with the expected rows/values.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adrpo_jax import compare
from adrpo_jax.train.metrics import read_jsonl

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------------------
# compare
# ----------------------------------------------------------------------------------------------------------


def _write_run(path, records, trainer=None):
    path.mkdir(parents=True)
    with open(path / "metrics.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    if trainer is not None:
        (path / "config.json").write_text(json.dumps({"trainer": trainer}))
    return path


def _llm_runs(tmp_path):
    a = _write_run(tmp_path / "adrpo", [
        {"step": 0, "eval/accuracy": 0.25},
        {"step": 10, "reward_mean": 0.3, "kl_mean": 0.01, "beta_eff_mean": 0.05},
        {"step": 20, "reward_mean": 0.7, "kl_mean": 0.04, "beta_eff_mean": 0.03, "eval/accuracy": 0.5},
        {"step": 30, "reward_mean": 0.6, "kl_mean": 0.02, "beta_eff_mean": 0.04, "eval/accuracy": 0.45}], "llm")
    b = _write_run(tmp_path / "grpo", [
        {"step": 10, "reward_mean": 0.2, "kl_mean": 0.05, "beta_eff_mean": 0.04},
        {"step": 20, "reward_mean": "NaN", "kl_mean": 0.06, "beta_eff_mean": 0.04}])  # no config.json
    return a, b


def test_compare_llm_runs_writes_png_and_table(tmp_path):
    a, b = _llm_runs(tmp_path)
    out = compare.compare([a, b], tmp_path / "out" / "cmp")
    assert out["kind"] == "llm"
    png = Path(out["png"])
    assert png == tmp_path / "out" / "cmp.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    s = out["summaries"]
    assert s["adrpo"]["last_step"] == 30
    assert s["adrpo"]["reward_mean"] == {"final": 0.6, "best": 0.7, "best_step": 20}
    assert s["adrpo"]["kl_mean"] == {"final": 0.02, "best": 0.01, "best_step": 10}  # KL: lower is better
    assert s["adrpo"]["eval/accuracy"] == {"final": 0.45, "best": 0.5, "best_step": 20}
    assert s["adrpo"]["beta_eff_mean"] == {"final": 0.04, "best": None, "best_step": None}
    assert s["grpo"]["reward_mean"] == {"final": 0.2, "best": 0.2, "best_step": 10}  # the NaN is skipped
    assert s["grpo"]["eval/accuracy"] is None
    table = (tmp_path / "out" / "cmp.md").read_text()
    assert table == out["markdown"]
    lines = table.strip().splitlines()
    assert lines[0] == ("| run | last step | reward final | reward best (max) @ step | eval accuracy final | "
                        "eval accuracy best (max) @ step | KL final | KL best (min) @ step | beta_eff final |")
    assert lines[2] == "| adrpo | 30 | 0.6 | 0.7 @ 20 | 0.45 | 0.5 @ 20 | 0.02 | 0.01 @ 10 | 0.04 |"
    assert lines[3] == "| grpo | 20 | 0.2 | 0.2 @ 10 | – | – | 0.06 | 0.05 @ 10 | 0.04 |"
    assert len(lines) == 4


def test_compare_flow_runs_and_cli(tmp_path):
    runs = [_write_run(tmp_path / name, [
        {"step": 0, "eval/reward_mean": -2.0, "eval/diversity": 1.0, "eval/w2_bound": 0.0},
        {"step": 5, "reward_mean": -1.5 + d, "w2_mean": 0.1},
        {"step": 10, "reward_mean": -1.0 + d, "w2_mean": 0.2, "eval/reward_mean": -0.5 + d,
         "eval/diversity": 0.8 - d, "eval/w2_bound": 0.3 + d}], "flow") for name, d in (("w2", 0.0), ("fixed", 0.1))]
    r = subprocess.run([sys.executable, "-m", "adrpo_jax.compare", *map(str, runs), "--out", str(tmp_path / "f"),
                        "--labels", "ADRPO-W2", "fixed beta"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "f.png").stat().st_size > 1000
    table = (tmp_path / "f.md").read_text().splitlines()
    assert "eval diversity best (max) @ step" in table[0] and "eval W2 bound best (min) @ step" in table[0]
    assert table[2] == "| ADRPO-W2 | 10 | -1 | -1 @ 10 | -0.5 | -0.5 @ 10 | 0.8 | 1 @ 0 | 0.3 | 0 @ 0 |"
    assert table[3].startswith("| fixed beta | 10 | -0.9 | -0.9 @ 10 | -0.4 | -0.4 @ 10 | 0.7 | 1 @ 0 | 0.4 |")
    assert "| ADRPO-W2 |" in r.stdout and "Wrote" in r.stdout


def test_compare_rejects_bad_input(tmp_path):
    a, _ = _llm_runs(tmp_path)
    flow = _write_run(tmp_path / "flow", [{"step": 1, "reward_mean": 1.0, "w2_mean": 0.1}])
    with pytest.raises(ValueError, match="compare runs of one trainer"):
        compare.compare([a, flow], tmp_path / "x")
    with pytest.raises(FileNotFoundError, match=r"nope/metrics.jsonl does not exist"):
        compare.compare([a, tmp_path / "nope"], tmp_path / "x")
    with pytest.raises(ValueError, match="--labels has 1 names for 2 run directories"):
        compare.compare([a, flow], tmp_path / "x", labels=["one"])
    assert compare.main([str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 1


def test_launch_mode_compare(tmp_path):
    a, b = _llm_runs(tmp_path)
    r = subprocess.run([sys.executable, "launch.py", "--mode=compare", f"--workdir={tmp_path / 'cmp'}", str(a),
                        str(b)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "cmp" / "compare.png").exists()
    assert "| adrpo | 30 |" in (tmp_path / "cmp" / "compare.md").read_text()


# ----------------------------------------------------------------------------------------------------------
# eval
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llm_dir(tmp_path_factory):
    from flax import nnx

    from adrpo_jax.models.llm import CausalLM, save_pretrained
    from adrpo_jax.rl.tasks import build_char_tokenizer
    from tests.rl.conftest import tiny_decoder_config

    path = tmp_path_factory.mktemp("tiny_llm")
    tok = build_char_tokenizer()
    cfg = tiny_decoder_config(vocab_size=len(tok), tie_word_embeddings=True, initializer_range=0.05)
    save_pretrained(CausalLM(cfg, rngs=nnx.Rngs(0)), path, tokenizer=tok)
    return str(path)


def _llm_config(model_dir):
    import ml_collections

    from adrpo_jax.rl.config import add_llm_config
    from adrpo_jax.train.config import add_common_config

    config = add_llm_config(add_common_config(ml_collections.ConfigDict()))
    config.trainer = "llm"
    config.model.path = model_dir
    config.model.save_final = True
    config.total_steps = 2
    config.log_every = 1
    config.eval_every = 2
    config.checkpoint.every_steps = 2
    config.logging.progress_bar = False
    config.logging.tensorboard = False
    config.optim.learning_rate = 3e-2
    config.sampling.max_prompt_length = 6
    config.sampling.max_new_tokens = 4
    config.sampling.temperature = 1.0
    config.rl.num_prompts_per_step = 4
    config.rl.group_size = 2
    config.eval.num_examples = 12
    config.eval.greedy = False  # sampled (fixed key): the score depends on every weight, not only the argmax
    config.lock()
    return config


@pytest.mark.slow  # a 2-step LLM run, three evaluations (one through launch.py): 45-120 s on 2 cores
def test_eval_reproduces_the_trainers_final_eval(tiny_llm_dir, tmp_path):
    from adrpo_jax.recipe.runner import build_trainer, evaluate_run
    from adrpo_jax.rl.trainer import RLTrainer

    config = _llm_config(tiny_llm_dir)
    out = RLTrainer(config, tmp_path).run()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    final = [r for r in records if r["step"] == 2 and "eval/accuracy" in r][-1]
    initial = [r for r in records if r["step"] == 0][0]  # the eval of the pre-trained weights
    # the check below can tell the final weights from the initial ones
    assert any(abs(initial[k] - final[k]) > 1e-3 for k in final if k.startswith("eval/"))

    record = evaluate_run(config, tmp_path)
    lines = read_jsonl(tmp_path / "eval.jsonl")
    assert lines == [record]
    assert record["step"] == 2 and record["source"] == "checkpoint" and record["trainer"] == "llm"
    assert record["checkpoint"] == str(tmp_path / "checkpoints" / "2")
    assert {"time", "eval_seconds"} <= set(record)
    eval_keys = sorted(k for k in final if k.startswith("eval/"))
    assert eval_keys == sorted(k for k in record if k.startswith("eval/")) and "eval/accuracy" in eval_keys
    for key in eval_keys:
        # The same jitted evaluator on the same restored weights, compiled again: float32 tolerance for the
        # means (accuracy is a mean of 0/1 scores).
        assert record[key] == pytest.approx(final[key], rel=1e-6, abs=1e-6), key

    # The same through launch.py (a config file building the same config), in a fresh process.
    cfg = tmp_path / "cfg.py"
    cfg.write_text("from tests.train.test_eval_compare import _llm_config\n\n\n"
                   f"def get_config():\n    return _llm_config({tiny_llm_dir!r})\n")
    r = subprocess.run([sys.executable, "launch.py", f"--config={cfg}", f"--workdir={tmp_path}", "--mode=eval"],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert r.returncode == 0, r.stderr[-3000:]
    launched = read_jsonl(tmp_path / "eval.jsonl")[-1]
    assert launched["step"] == 2 and launched["source"] == "checkpoint"
    for key in eval_keys:  # another process, same machine and device count: float32 tolerance as above
        assert launched[key] == pytest.approx(final[key], rel=1e-6, abs=1e-6), key

    # No checkpoint left: the run's final_model (model.save_final) is evaluated, with the same numbers.
    assert Path(out["final_model"]).is_dir()
    shutil.rmtree(tmp_path / "checkpoints")
    record2 = evaluate_run(config, tmp_path, trainer=build_trainer(config, tmp_path))
    assert record2["source"] == "final_model" and record2["step"] == 2
    for key in eval_keys:
        # final_model is written as safetensors from the same float32 weights: the same float32 tolerance.
        assert record2[key] == pytest.approx(final[key], rel=1e-6, abs=1e-6), key
    assert len(read_jsonl(tmp_path / "eval.jsonl")) == 3


def test_eval_of_an_empty_workdir_fails_clearly(tmp_path):
    from adrpo_jax.recipe.runner import evaluate_run
    from adrpo_jax.train.config import ConfigError

    config = _llm_config(str(tmp_path / "no_model"))  # nothing is loaded before the checks
    with pytest.raises(FileNotFoundError, match=rf"nothing to evaluate in {tmp_path}: no checkpoint in "):
        evaluate_run(config, tmp_path)
    toy = config.copy_and_resolve_references()
    toy.trainer = "tests.train.toy_trainer:train_and_evaluate"
    with pytest.raises(ConfigError, match="--mode=eval supports the trainers"):
        evaluate_run(toy, tmp_path)
    assert not (tmp_path / "eval.jsonl").exists()
    np.testing.assert_equal(list(tmp_path.iterdir()), [])


@pytest.mark.slow  # a 2-step flow run on a tiny DiT plus two evaluations: 60-120 s of XLA compilation on 2 cores
def test_flow_eval_reproduces_the_trainers_final_eval(tmp_path):
    from adrpo_jax.recipe.runner import evaluate_run
    from adrpo_jax.flow.trainer import FlowTrainer
    from tests.flow.test_trainer import _tiny_models, tiny_trainer_config

    config = tiny_trainer_config(total_steps=2)
    config.eval.write_images = False
    FlowTrainer(config, tmp_path, models=_tiny_models()).run()
    final = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["step"] == 2 and "eval/reward_mean" in r][-1]
    eval_keys = sorted(k for k in final if k.startswith("eval/"))
    assert {"eval/reward_mean", "eval/diversity", "eval/w2_bound"} <= set(eval_keys)

    record = evaluate_run(config, tmp_path, trainer=FlowTrainer(config, tmp_path, models=_tiny_models()))
    assert record["step"] == 2 and record["source"] == "checkpoint" and record["trainer"] == "flow"
    assert sorted(k for k in record if k.startswith("eval/")) == eval_keys
    for key in eval_keys:
        # The same jitted sampler/metrics on the same restored weights, compiled again: float32 tolerance.
        assert record[key] == pytest.approx(final[key], rel=1e-5, abs=1e-6), key
    assert record["eval/w2_bound"] > 0  # the fine-tuned weights, not the pre-trained ones (bound 0)

    shutil.rmtree(tmp_path / "checkpoints")  # the final_model (model.save_final) fallback
    record2 = evaluate_run(config, tmp_path, trainer=FlowTrainer(config, tmp_path, models=_tiny_models()))
    assert record2["source"] == "final_model"
    for key in eval_keys:
        assert record2[key] == pytest.approx(final[key], rel=1e-5, abs=1e-6), key
    assert [r["source"] for r in read_jsonl(tmp_path / "eval.jsonl")] == ["checkpoint", "final_model"]

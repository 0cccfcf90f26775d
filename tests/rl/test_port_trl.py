"""A TRL user's port, scripted from docs/porting_trl.md's own words (slow; issue 29 item 6).

The reward module is the page's Python block, written where its first comment says (``mypkg/rewards.py``) in a
fresh folder outside the package; the data are TRL-style rows shaped like the page's example row; the commands are
the page's bash block of section 3, run one by one from that folder without ``PYTHONPATH``, with only the paths of
``launch.py`` / ``configs/`` made absolute and a few size overrides appended to the training commands (4 steps,
small batches: the page's commands run the configs' full lengths). Checked: both runs train, the reward functions
came from the user's module with weight 1.0 and score the held-out set (``eval.accuracy_reward`` followed them),
``--mode=eval`` with ``--workdir`` alone re-scores the newest checkpoint with the run's own config and reward (the
number training logged at that step), and ``--mode=compare`` writes its PNG and table.
"""

import json
import os
import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from adrpo_jax.train.metrics import read_jsonl

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "porting_trl.md"
SIZE = ["--config.total_steps=4", "--config.eval_every=4", "--config.log_every=2", "--config.eval.num_examples=16",
        "--config.rl.num_prompts_per_step=8", "--config.rl.group_size=4", "--config.checkpoint.every_steps=4"]


def _section(text: str, title: str) -> str:
    start = text.index(title)
    end = text.find("\n## ", start + len(title))
    return text[start:end if end >= 0 else len(text)]


def _blocks(section: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


def _commands(block: str) -> list[list[str]]:
    joined = block.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        line = line.split("#", 1)[0].strip() if line.strip().startswith("#") else line.strip()
        if line:
            out.append(shlex.split(line, comments=True))
    return out


def _absolute(args: list[str]) -> list[str]:
    out = []
    for arg in args:
        if arg == "python":
            arg = sys.executable
        elif arg == "launch.py":
            arg = str(REPO / "launch.py")
        elif arg.startswith("--config=configs/"):
            arg = f"--config={REPO}/{arg[len('--config='):]}"
        out.append(arg)
    return out


@pytest.mark.slow
def test_port_from_the_docs(tmp_path):
    text = DOC.read_text(encoding="utf-8")
    reward_src = _blocks(_section(text, "## 2. Your reward"), "python")[0]
    reward_path = re.match(r"# (\S+\.py)", reward_src).group(1)
    assert not (REPO / reward_path).exists()
    (tmp_path / reward_path).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / reward_path).write_text(reward_src)

    port = _section(text, "## 3. The whole port")
    example = json.loads(_blocks(port, "text")[0].strip())
    rng = random.Random(0)
    for name, n in (("train.jsonl", 64), ("test.jsonl", 16)):
        with open(tmp_path / name, "w", encoding="utf-8") as f:
            for _ in range(n):
                a, b = rng.randint(0, 49), rng.randint(0, 49)
                row = {"prompt": f"{a}+{b}=", "solution": str(a + b)}
                assert row.keys() == example.keys()
                f.write(json.dumps(row) + "\n")

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"JAX_PLATFORMS": "cpu", "CI": "true", "PYTHONUNBUFFERED": "1",
                "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    commands = _commands(_blocks(port, "bash")[0])
    assert len(commands) == 4, commands  # train ADRPO, train GRPO, eval, compare
    outputs = []
    for args in commands:
        args = _absolute(args)
        training = any(a.startswith("--config=") for a in args) and not any(a.startswith("--mode") for a in args)
        r = subprocess.run(args + (SIZE if training else []), cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-4000:])
        outputs.append(r)

    adrpo, grpo = tmp_path / "runs" / "adrpo", tmp_path / "runs" / "grpo"
    train_out = outputs[0]
    assert "rewards.weights = (1.0,)" in train_out.stderr and "step 0 (before training" in train_out.stderr
    assert "Finished at step 4/4" in train_out.stdout and f"tensorboard --logdir {adrpo}/tb" in train_out.stdout
    config = json.loads((adrpo / "config.json").read_text())
    assert config["rewards"]["functions"] == ["mypkg.rewards:my_reward"] and config["rewards"]["weights"] == [1.0]
    assert config["eval"]["accuracy_reward"] == "mypkg.rewards:my_reward"
    assert str(tmp_path) in config["import_path"].split(os.pathsep)
    assert json.loads((grpo / "config.json").read_text())["rl"]["adaptive"] is False
    records = read_jsonl(adrpo / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 2, 4]
    assert all("reward/my_reward_mean" in r for r in records[1:])
    trained = records[-1]["eval/accuracy"]

    evaluated = read_jsonl(adrpo / "eval.jsonl")
    assert len(evaluated) == 1 and evaluated[0]["step"] == 4 and evaluated[0]["source"] == "checkpoint"
    # the same evaluator, config and reward as training's step-4 eval (greedy decoding): the same number
    assert evaluated[0]["eval/accuracy"] == pytest.approx(trained, abs=1e-6)

    cmp = tmp_path / "runs" / "cmp"
    assert (cmp / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (cmp / "compare.md").read_text()
    assert "| adrpo | 4 |" in table and "| grpo | 4 |" in table

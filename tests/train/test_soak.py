"""Soak test (slow; issue 29 item 5): 300 steps of each recipe's ``cpu`` variant with tiny batches, each in its own
process (``tests/train/soak_run.py``), with an evaluation and a checkpoint every 100 steps.

* **Compiles**: every jitted program of the recipe compiles exactly once (at its first call: the set-up, the step-0
  evaluation or step 1); a second compile is a failure that names the program, the step and the argument leaves
  whose shape / dtype / sharding changed. After the warm-up (the first evaluation and checkpoint after step 0,
  i.e. step 101) no XLA compile happens at all in a step or an evaluation (programs or eager operations).
* **Memory**: the process's resident memory is flat after the warm-up: the median over the last 50 steps is within
  5 % of the median over steps 102-151; the number of live jax arrays (read right after a metrics record, where
  the loop's buffer is empty) is the same at the end as after the warm-up.

Measured on a shared 2-core machine (other jobs running): 87 s (llm), 180 s (flow), 105 s (sd3), 95 s (audio), 7.8
min for the four (20-45 s of CPU time each: most of the wall time is the first step's compiles). Found by it: the
flow evaluator compiled ``eval/features`` twice (numpy vs jax input; fixed). Not a failure at 300 steps but seen in
longer runs: orbax 0.12.8 / tensorstore keep ~30 KB of Python objects per checkpoint save (1200 saves: +39 MB RSS,
linear; their io-metrics and kvstore-spec objects), so a run's RSS creeps with its checkpoint count.
"""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STEPS = 300
EVERY = 100  # eval_every = checkpoint.every_steps
LOG_EVERY = 10
WARMUP = EVERY + 1  # the first step after the first periodic evaluation + checkpoint
COMMON = [f"--set=eval_every={EVERY}", f"--set=checkpoint.every_steps={EVERY}", f"--set=log_every={LOG_EVERY}"]
# Programs each run must have called (compiled once, at their first call after the recipe was built): the
# watch's sanity check that it sees the recipe's step and eval programs.
EXPECTED = {"llm": ("generate", "logprobs", "update", "eval/generate"), "flow": ("step", "eval/sample", "eval/features"),
            "sd3": ("step", "eval/step"), "audio": ("audio/encode", "generate", "logprobs", "update", "eval/generate")}
RECIPES = {
    "llm": ["--config=configs/llm_arith.py:cpu", "--set=rl.num_prompts_per_step=4", "--set=rl.group_size=4",
            "--set=eval.num_examples=16"],
    "flow": ["--config=configs/flow_digits.py:cpu", "--set=rl.prompts_per_step=4", "--set=rl.samples_per_prompt=4",
             "--set=eval.samples_per_prompt=8"],
    "sd3": ["--config=configs/sd3_adrpo.py:cpu"],
    "audio": ["--config=configs/audio_arith.py:cpu", "--set=rl.num_prompts_per_step=4", "--set=rl.group_size=4",
              "--set=eval.num_examples=16"],
}


def soak(name: str, tmp_path: Path) -> dict:
    out = tmp_path / "report.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    r = subprocess.run([sys.executable, "tests/train/soak_run.py", f"--workdir={tmp_path / 'run'}", f"--steps={STEPS}",
                        f"--out={out}", *RECIPES[name], *COMMON], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=1500)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(out.read_text())


def recompilations(report: dict) -> list[str]:
    """One line per compile of a program beyond its first: the program, the step, what changed."""
    lines = []
    for name, record in report["programs"].items():
        for entry in record["compiles"][1:]:
            lines.append(f"program {name!r} compiled again at step {entry['step']} ({entry['phase']}): "
                         f"{'; '.join(entry.get('changed') or ['no argument changed'])}")
    return lines


def late_compiles(report: dict) -> list[str]:
    return [f"step {step} ({phase}): {fun}" for step, phase, fun in report["backend_compiles"]
            if step > WARMUP and phase in ("step", "eval")]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECIPES))
def test_soak(name, tmp_path):
    report = soak(name, tmp_path)
    assert report["done"] == STEPS
    assert not recompilations(report), "\n".join(recompilations(report))
    programs = report["programs"]
    for program in EXPECTED[name]:
        assert programs[program]["calls"] > 0 and len(programs[program]["compiles"]) == 1, (program, programs[program])
    assert not late_compiles(report), "XLA compiles after the warm-up:\n" + "\n".join(late_compiles(report))

    rss = report["rss_kib"]  # rss[i]: after step i + 1
    early = statistics.median(rss[WARMUP:WARMUP + 50])
    late = statistics.median(rss[-50:])
    assert late <= 1.05 * early, (f"{name}: resident memory grew {100 * (late / early - 1):.1f}% after the warm-up "
                                  f"({early / 1024:.0f} MiB at steps {WARMUP + 1}-{WARMUP + 50}, {late / 1024:.0f} MiB "
                                  f"at the last 50 steps): {rss[WARMUP::25]}")
    live = report["live_arrays"]
    after_record = [live[i] for i in range(WARMUP, STEPS) if i % LOG_EVERY == 0]  # step i + 1 = a record's + 1
    assert statistics.median(after_record[-5:]) <= statistics.median(after_record[:5]), (name, after_record)


def test_compile_watch_names_the_program_and_the_changed_shape():
    """The soak test's instrument (default suite, < 1 s): a second compile of a program is reported with the
    argument leaf whose shape changed; the same shapes again compile nothing."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from tests.train import soak_run

    fns = {"update": jax.jit(lambda params, batch: params + jnp.sum(batch["tokens"]))}
    watch = soak_run.CompileWatch(fns)
    params = jnp.zeros((2,), jnp.float32)
    for step, width in enumerate((11, 11, 12), start=1):
        watch.step, watch.phase = step, "step"
        fns["update"](params, {"tokens": jnp.ones((8, width), jnp.int32)})
    report = {"programs": watch.report()["programs"]}
    lines = recompilations(report)
    assert len(lines) == 1, lines
    assert lines[0] == ("program 'update' compiled again at step 3 (step): args[1]['tokens']: (8, 11) int32 "
                        "SingleDeviceSharding -> (8, 12) int32 SingleDeviceSharding"), lines[0]
    assert [b[0] for b in watch.report()["backend_compiles"] if "lambda" in b[2]] == [1, 3]
    # a numpy argument where a jax array was compiled is a new cache entry too (what the flow evaluator had)
    fns["update"](params, {"tokens": np.ones((8, 12), np.int32)})
    assert "NoneType" in recompilations({"programs": watch.report()["programs"]})[-1]

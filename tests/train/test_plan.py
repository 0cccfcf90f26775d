"""The plan mode (adrpo_jax/recipe/plan.py) on the real TPU compiler (libtpu, no TPU): a tiny LLM recipe's
programs compiled for a v5e-8, the report's figures equal the compiler's own, an oversized plan refused naming the
program and the key, the program set of a recipe and the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import pytest

from adrpo_jax.rl.config import add_llm_config
from adrpo_jax.train.config import add_common_config
from tests.topologies import requires_cuda_plugin, requires_libtpu

REPO = Path(__file__).resolve().parents[2]
TOPOLOGY = "v5e:2x4"


def _tiny_config(tmp_path, **overrides):
    """A tiny Llama (config.json only: a plan never reads weights), the arithmetic task, 16 rows per step."""
    model_dir = tmp_path / "model"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "max_position_embeddings": 256}))
    config = add_llm_config(add_common_config(ml_collections.ConfigDict()))
    config.model.path = str(model_dir)
    config.sampling.max_prompt_length, config.sampling.max_new_tokens = 16, 8
    config.rl.num_prompts_per_step, config.rl.group_size = 8, 2
    config.eval_every, config.eval.num_examples = 10, 16
    for key, value in overrides.items():
        node = config
        *parts, last = key.split(".")
        for part in parts:
            node = node[part]
        node[last] = value
    return config


@requires_libtpu
def test_tiny_llm_plan_on_v5e_equals_the_compiler(tmp_path):
    from adrpo_jax.recipe import plan as plan_lib
    from adrpo_jax.rl.trainer import RLTrainer
    from adrpo_jax.train import config as config_lib

    config = _tiny_config(tmp_path)
    report = plan_lib.plan(config, TOPOLOGY, workdir=tmp_path)
    names = [p["name"] for p in report["programs"]]
    assert set(names) == {"logprobs", "update", "plan/prefill", "plan/decode", "eval/mean"}  # generate: planned_by
    assert report["fits"] and report["num_devices"] == 8 and report["chip"]["name"] == "TPU v5e"
    assert json.loads((tmp_path / "plan.json").read_text())["programs"][0]["name"] == names[0]
    # The report's figures are the TPU compiler's own: compile the update again outside the plan and compare.
    mesh, _, _ = plan_lib.target_mesh(config, TOPOLOGY)
    with config_lib.shapes_only():
        recipe = RLTrainer(config, tmp_path, mesh=mesh, abstract=True)
    assert all(d.platform == "tpu" for d in mesh.devices.flat)
    from adrpo_jax.models.llm.activation_sharding import compiling_for
    with compiling_for("tpu"):  # the plan traces the programs as a TPU would run them (splash attention)
        compiled = recipe.programs["update"].compile()
    update = next(p for p in report["programs"] if p["name"] == "update")
    assert update["memory"] == compiled.memory and update["flops"] == compiled.cost["flops"] > 0
    assert update["roofline_s"] == max(update["flops"] / 197e12, update["bytes_accessed"] / 819e9)
    # Peak = resident state + the program's own buffers (its resident arguments counted once).
    assert update["peak_bytes"] >= update["memory"]["temp"] > 0
    decode = next(p for p in report["programs"] if p["name"] == "plan/decode")
    assert decode["per_step"] == 7  # max_new_tokens - 1 decode steps after the prefill's first token
    # the KV cache is donated (updated in place, as in the sampler's loop): aliased, not counted twice
    cache_bytes = sum(x.size * x.dtype.itemsize // 8 for x in jax.tree.leaves(recipe.programs["plan/decode"].abstract_args()[3]))
    assert decode["memory"]["alias"] >= cache_bytes > 0


@requires_libtpu
def test_plan_that_does_not_fit_names_the_program_and_the_key(tmp_path):
    from adrpo_jax.recipe import plan as plan_lib

    config = _tiny_config(tmp_path, **{"plan.margin": 0.99999})  # a 170 KB budget: nothing fits
    with pytest.raises(plan_lib.PlanError, match=r"program 'update' needs .* GiB per chip .*optim.grad_accum_steps"):
        plan_lib.plan(config, TOPOLOGY, workdir=tmp_path, search=False)
    report = json.loads((tmp_path / "plan.json").read_text())
    assert not report["fits"]


def test_every_program_of_the_recipe_is_declared_and_jitted_once(tmp_path):
    """The program set is the recipe's only jit: the four recipe modules call no jax.jit themselves."""
    for module in ("rl/trainer.py", "rl/audio_trainer.py", "flow/trainer.py", "flow/sd3_trainer.py",
                   "flow/recipe.py"):
        assert "jax.jit(" not in (REPO / "adrpo_jax" / module).read_text(), module


@requires_libtpu
@pytest.mark.slow
def test_launch_plan_cli(tmp_path):
    config = _tiny_config(tmp_path)
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text("import json, ml_collections\nfrom math import inf, nan\nfrom adrpo_jax.rl.config import add_llm_config\n"
                        "from adrpo_jax.train.config import add_common_config\n"
                        "def get_config():\n    c = add_llm_config(add_common_config(ml_collections.ConfigDict()))\n"
                        f"    c.update_from_flattened_dict({dict(_flat(config.to_dict()))!r})\n    return c\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, str(REPO / "launch.py"), f"--config={cfg_file}", f"--workdir={tmp_path}/w",
                          "--mode=plan", f"--config.plan.target={TOPOLOGY}"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fits" in out.stdout and (tmp_path / "w" / "plan.json").exists()
    bad = subprocess.run([sys.executable, str(REPO / "launch.py"), f"--config={cfg_file}", f"--workdir={tmp_path}/b",
                          "--mode=plan", f"--config.plan.target={TOPOLOGY}", "--config.plan.margin=0.99999"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert bad.returncode == 1 and "does not fit" in bad.stderr


def _flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_cpu_target_needs_its_devices():
    from adrpo_jax.recipe import plan as plan_lib
    from adrpo_jax.train.config import ConfigError

    config = add_common_config(ml_collections.ConfigDict())
    with pytest.raises(ConfigError, match="plan.target"):
        plan_lib.target_mesh(config, "cpu:1024")
    with pytest.raises(ConfigError, match="must be a TPU topology"):
        plan_lib.target_mesh(config, "tpu-v5")
    mesh, chip, compiler = plan_lib.target_mesh(config, "cpu:8@h100")
    assert mesh.size == 8 == jax.device_count() and chip.name.startswith("NVIDIA H100") and "CPU" in compiler


def test_plan_check_runs_before_the_weights_on_accelerators(tmp_path, monkeypatch):
    """plan.check: on a GPU / TPU the run is planned on its own devices first; a program that cannot fit stops it
    before any weight is read (the model directory here has no weights at all). On CPU nothing is checked."""
    from adrpo_jax.recipe import plan as plan_lib
    from adrpo_jax.recipe import runner
    from adrpo_jax.train import perf

    config = _tiny_config(tmp_path, eval_every=0)
    assert plan_lib.check_before_run(config, tmp_path) is None  # CPU: no check
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    tiny = perf.Chip("a 1 MiB chip", 1e12, 1e11, 2 ** 20)
    monkeypatch.setattr(perf, "mesh_chips", lambda mesh: (tiny, mesh.size))
    with pytest.raises(plan_lib.PlanError, match=r"program 'update' needs .* 1 MiB chip"):
        runner.train(config, tmp_path)
    assert json.loads((tmp_path / "plan_check.json").read_text())["fits"] is False
    config.plan.check = False
    with pytest.raises(Exception) as err:  # unchecked, the run goes on to load the (missing) tokenizer and weights
        runner.train(config, tmp_path / "unchecked")
    assert not isinstance(err.value, plan_lib.PlanError)


@requires_cuda_plugin
def test_gpu_target_is_a_deviceless_h100_mesh(tmp_path):
    from adrpo_jax.recipe import plan as plan_lib
    from adrpo_jax.train.config import ConfigError

    config = _tiny_config(tmp_path)
    mesh, chip, compiler = plan_lib.target_mesh(config, "h100:2x4")
    assert mesh.size == 8 and {d.platform for d in mesh.devices.flat} == {"gpu"}
    assert chip.name.startswith("NVIDIA H100") and "deviceless" in compiler
    with pytest.raises(ConfigError, match="h100:8"):
        plan_lib.target_mesh(config, "a100:8")


@pytest.mark.slow  # XLA:GPU compiles every program (~1 min on 2 cores)
@requires_cuda_plugin
def test_tiny_llm_plan_on_h100_deviceless(tmp_path):
    """The GPU compiler's own buffer assignment (cuDNN attention compiled in bfloat16), no GPU: the update's
    figures are its memory_analysis(); FLOPs come from the jaxpr (XLA:GPU has no cost analysis without a device)."""
    from adrpo_jax.recipe import plan as plan_lib

    config = _tiny_config(tmp_path, **{"model.dtype": "bfloat16"})
    report = plan_lib.plan(config, "h100:8", workdir=tmp_path)
    assert report["fits"] and report["num_devices"] == 8 and report["chip"]["name"].startswith("NVIDIA H100")
    update = next(p for p in report["programs"] if p["name"] == "update")
    assert update["memory"]["temp"] > 0 and update["flops"] > 0



@requires_libtpu
@pytest.mark.parametrize("name,axes", [("v5p:2x2x2", {"data": 1, "fsdp": -1}), ("v5e:4x4", {"data": 2, "fsdp": -1}),
                                       ("v5p:2x2x4", {"data": 1, "fsdp": 2, "expert": 8})])
def test_multi_host_mesh_gives_each_process_contiguous_rows(name, axes):
    """jax.make_mesh orders a multi-host slice's chips for the torus (a v5p-8's fsdp axis runs hosts 0, 1, 0, 1):
    make_mesh reorders the batch positions by process, so each host feeds one contiguous block of rows (a real
    multi-host run refused to start before: 'The batch rows of process 0 are not contiguous')."""
    from adrpo_jax import train
    from tests.topologies import tpu_devices
    devices = tpu_devices(name)
    mesh = train.make_mesh({"tensor": 1, **axes}, devices=devices)
    procs = sorted({d.process_index for d in devices})
    assert len(procs) > 1
    slices = [train.process_batch_slice(64, mesh, p) for p in procs]
    assert [s.stop - s.start for s in slices] == [64 // len(procs)] * len(procs)
    assert sorted(x for s in slices for x in range(s.start, s.stop)) == list(range(64))


def test_a_compile_that_runs_out_of_memory_is_a_failing_program():
    """The TPU compiler refuses a program whose temporaries exceed the chip (RESOURCE_EXHAUSTED): the plan reports
    the program as not fitting (its temporaries from the message), it does not crash."""
    from types import SimpleNamespace

    from adrpo_jax.recipe import plan as plan_lib
    from adrpo_jax.train import perf

    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(17.45G) exceeds available HBM (15.75G).")
    assert plan_lib._compile_oom_bytes(RuntimeError(message)) == int(17.45 * 2 ** 30)
    assert plan_lib._compile_oom_bytes(RuntimeError("INVALID_ARGUMENT: something else")) is None

    def boom(args):
        raise RuntimeError(message)

    program = SimpleNamespace(name="update", phase="update", shrink_key="optim.grad_accum_steps",
                              abstract_args=lambda: (jax.ShapeDtypeStruct((1024,), "float32"),), compile_args=boom)
    rep = plan_lib._program_report(None, program, {}, 2 ** 30, perf.CHIPS["v5e"], 1.0)
    assert rep["peak_bytes"] == 2 ** 30 + 4096 + int(17.45 * 2 ** 30) and rep["shrink_key"] == "optim.grad_accum_steps"
    assert "RESOURCE_EXHAUSTED" in rep["memory"]["compile_error"]
    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
        plan_lib._program_report(None, SimpleNamespace(
            name="x", phase="update", shrink_key=None, abstract_args=lambda: (),
            compile_args=lambda a: (_ for _ in ()).throw(RuntimeError("INVALID_ARGUMENT: other"))), {}, 0,
            perf.CHIPS["v5e"], 1.0)

"""The SD3 recipe's abstract mode (the plan contract): built on a TPU topology mesh without any weight, text encoder
or prompt embedding, shapes from config.json files or the presets; every program lowers and compiles for a v5e-8
(the real TPU compiler, libtpu, no TPU) with LoRA; the shipped `tpu` variant (SD3-medium, 512 px) fits a v5e-8."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from adrpo_jax import train
from adrpo_jax.models import mmdit
from adrpo_jax.models import vae as vae_lib
from tests.topologies import requires_libtpu

REPO = Path(__file__).resolve().parents[2]
TOPOLOGY = "v5e:2x4"


def _tpu_mesh(config):
    from jax.experimental import topologies
    topo = topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGY)
    return train.make_mesh(config.mesh, devices=list(topo.devices))


def _config(variant="tpu", **overrides):
    spec = importlib.util.spec_from_file_location("sd3_adrpo", REPO / "configs" / "sd3_adrpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(variant)
    for key, value in overrides.items():
        node = config
        *parts, last = key.split(".")
        for part in parts:
            node = node[part]
        node[last] = value
    return config


def _tiny_dirs(tmp_path):
    """config.json files only (a plan reads no weights): a tiny MMDiT, a tiny VAE (x2) and a tiny CLIP (also as
    ``clip_eval``, the eval-only scorer: another directory than the training reward's)."""
    out = {}
    for name, cfg in (("transformer", mmdit.tiny_config(sample_size=16, pos_embed_max_size=16).to_diffusers_config()),
                      ("vae", vae_lib.tiny_config().to_diffusers_config()),
                      ("clip", {"projection_dim": 8, "vision_config": {
                          "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "patch_size": 4, "image_size": 16}})):
        d = tmp_path / name
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text(json.dumps(cfg))
        out[name] = str(d)
    (tmp_path / "clip_eval").mkdir(exist_ok=True)
    (tmp_path / "clip_eval" / "config.json").write_text((tmp_path / "clip" / "config.json").read_text())
    out["clip_eval"] = str(tmp_path / "clip_eval")
    return out


def _tiny_plan_config(tmp_path, **overrides):
    dirs = _tiny_dirs(tmp_path)
    return _config("tpu", **{"model.path": dirs["transformer"], "vae.path": dirs["vae"], "text.path": "",
                             "reward.clip_path": dirs["clip"], "data.height": 16, "data.width": 32,
                             "text.max_sequence_length": 8, "model.scan_layers": False, "sampling.num_steps": 2,
                             "eval.clip_paths": (dirs["clip_eval"],), **overrides})


@requires_libtpu
def test_abstract_build_on_a_tpu_mesh_loads_nothing(tmp_path):
    """No weight, tokenizer or text encoder: the shapes of config.json files; the prompt table abstract ([rows, L *
    D] in the compute dtype, rows sharded over fsdp), latents from data.height / data.width (non-square), every
    program declared with abstract arguments, the shrink keys the plan names."""
    from adrpo_jax.flow.sd3_trainer import SD3Trainer
    config = _tiny_plan_config(tmp_path)
    mesh = _tpu_mesh(config)
    with train.config.shapes_only():
        recipe = SD3Trainer(config, str(tmp_path / "w"), mesh=mesh, abstract=True)
    assert recipe.components is None and recipe.shapes.latent_shape == (8, 16, 4)  # x2 VAE: 16 x 32 px
    s = recipe.shapes
    assert s.text_len == 77 + 8 and s.text_dim == 12 and s.rows % 8 == 0 and s.null_id == len(config.data.prompts)
    table = recipe.policy.abstract_frozen["embeddings"]
    leaf = jax.tree.leaves(table)[0]
    assert leaf.shape == (s.rows, 85 * 12) and leaf.dtype == jnp.bfloat16 and tuple(leaf.sharding.spec) == ("fsdp",)
    assert {"step", "eval/step", "eval/noise"} <= set(recipe.programs)
    assert recipe.programs["step"].shrink_key == "optim.grad_accum_steps"
    assert recipe.programs["eval/step"].shrink_key == "eval.batch_size"
    for program in recipe.programs.values():
        if program.args is not None:
            jax.tree.leaves(program.abstract_args())  # every program's arguments exist without weights


def test_preset_shapes_without_paths():
    """Empty paths in the plan mode: model.preset's MMDiT (SD3-medium / SD3.5), SD3's VAE, CLIP ViT-L/14."""
    from adrpo_jax.flow.sd3_trainer import resolve_shapes
    mesh = train.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    for preset, layers in (("sd3-medium", 24), ("sd3.5-large", 38)):
        config = _config("tpu", **{"model.preset": preset})
        with train.config.shapes_only():
            from adrpo_jax.flow.config import validate_sd3_config
            validate_sd3_config(config)
        s = resolve_shapes(config, mesh, prompts=(tuple(config.data.prompts), ()))
        assert s.transformer.num_layers == layers and s.latent_shape == (64, 64, 16)  # 512 px
        assert (s.text_len, s.text_dim, s.pooled_dim) == (333, 4096, 2048) and s.vae.downsample_factor == 8
        spec, inter = s.clip
        assert (spec.hidden_size, spec.num_layers, spec.image_size, spec.projection_dim, inter) == (
            1024, 24, 224, 768, 4096)
    with pytest.raises(train.ConfigError, match="pos_embed_max_size=192") as err:
        resolve_shapes(_config("tpu", **{"data.height": 4096}), mesh, prompts=(("a",), ()))
    assert err.value.key == "data.height"
    with pytest.raises(train.ConfigError, match="multiple of 16") as err:  # VAE factor 8 x patch 2
        resolve_shapes(_config("tpu", **{"data.width": 520}), mesh, prompts=(("a",), ()))
    assert err.value.key == "data.width"


@pytest.mark.slow
@requires_libtpu
def test_every_program_compiles_for_v5e_with_lora(tmp_path):
    """The plan of a tiny SD3 config on a v5e-8 (the TPU compiler): step, eval/step, eval/noise and the phase
    programs (sample, reward, update) all compile; the report's memory is the compiler's."""
    from adrpo_jax.recipe import plan as plan_lib
    config = _tiny_plan_config(tmp_path, **{"logging.phase_timing": True})
    assert config.lora.enabled
    report = plan_lib.plan(config, TOPOLOGY, write=False, search=False)
    names = {p["name"] for p in report["programs"]}
    assert {"step", "sample", "reward", "update", "eval/step", "eval/noise"} <= names, names
    assert report["fits"] and all(p["memory"]["peak"] > 0 for p in report["programs"] if p["name"] != "eval/noise")


@pytest.mark.slow
@requires_libtpu
def test_tpu_variant_fits_a_v5e_8_at_512_px(tmp_path):
    """configs/sd3_adrpo.py:tpu (SD3-medium shapes from the preset, 512 px, LoRA, 8 x 4 images per step in
    micro-batches of one image per chip) fits a v5e-8 with the plan's 10 % margin, by the TPU compiler."""
    from adrpo_jax.recipe import plan as plan_lib
    report = plan_lib.plan(_config("tpu"), TOPOLOGY, write=False, search=False)
    assert report["fits"], plan_lib.format_report(report)
    assert report["largest_peak_gib"] < 0.9 * 16


def test_refresh_keys_reach_the_policy_and_the_step(tmp_path):
    """Issue 28 item 1 (config level; the slow in-process run checks ref_refreshed > 0): rl.ref_refresh_steps /
    rl.sampler_refresh_steps give a refreshed reference and a sampling copy in the train state, and the step's
    flags fire every N steps (they were validated, recorded and ignored: ref_refreshed = 0 at every step)."""
    from adrpo_jax.flow.sd3_trainer import SD3Trainer
    config = _tiny_plan_config(tmp_path, **{"rl.ref_refresh_steps": 2, "rl.sampler_refresh_steps": 3})
    mesh = train.make_mesh(config.mesh, devices=jax.devices())
    with train.config.shapes_only():
        recipe = SD3Trainer(config, str(tmp_path / "w"), mesh=mesh, abstract=True)
    assert {"ref_params", "sampler_params"} <= set(recipe.abstract_state)
    flags = [(recipe.rollout(step, None)["refresh_ref"], recipe.rollout(step, None)["refresh_sampler"])
             for step in range(6)]
    assert [f[0] for f in flags] == [False, True, False, True, False, True]
    assert [f[1] for f in flags] == [False, False, True, False, False, True]


def _dot_dtypes(jaxpr, out):
    """The operand dtypes of every dot_general in a jaxpr and its sub-jaxprs (scan / cond / remat bodies)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.add(tuple(str(v.aval.dtype) for v in eqn.invars))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _dot_dtypes(inner, out)
    return out


def test_reward_tower_in_float32_and_merged_save_in_bfloat16(tmp_path):
    """Issue 28 items 7 and 4: the tpu variant computes the MMDiT in bfloat16, its reward (VAE decode + CLIP tower)
    in float32 (reward.dtype: no bf16 matmul in the reward program) and saves the merged MMDiT in bfloat16."""
    from adrpo_jax.flow.sd3_trainer import SD3Trainer
    config = _tiny_plan_config(tmp_path, **{"logging.phase_timing": True})
    assert (config.model.dtype, config.reward.dtype, config.model.save_dtype) == ("bfloat16", "float32", "bfloat16")
    mesh = train.make_mesh(config.mesh, devices=jax.devices())
    with train.config.shapes_only():
        recipe = SD3Trainer(config, str(tmp_path / "w"), mesh=mesh, abstract=True)
    dots = {}
    for name in ("sample", "reward"):
        program = recipe.programs[name]
        dots[name] = _dot_dtypes(jax.make_jaxpr(program.fn)(*program.abstract_args()).jaxpr, set())
    assert dots["sample"] == {("bfloat16", "bfloat16")} and dots["reward"] == {("float32", "float32")}, dots

"""Disaggregated asynchronous RL (issue 26 item 3): ``mesh.rollout_devices = N`` samples on the first N devices and
trains on the others, weights handed over by a resharding ``device_put``. Config refusals (fast), the meshes, and
(slow) a 4 + 4 split at max_lag=1: the losses of the one-mesh run within tolerance, the metrics, exact resume; a
Qwen3-MoE policy's samples, routing and losses against the one-mesh run."""
import jax
import numpy as np
import pytest

from adrpo_jax.rl.trainer import RLTrainer
from adrpo_jax.train.config import ConfigError
from adrpo_jax.train.metrics import read_jsonl
from adrpo_jax.train.sharding import make_mesh, make_rollout_mesh
from tests.rl.test_trainer import tiny_config


def test_rollout_and_training_meshes_are_disjoint():
    assert jax.device_count() == 8
    cfg = {"data": -1, "fsdp": 1, "tensor": 1, "rollout_devices": 4, "rollout_tensor": 2}
    rollout, training = make_rollout_mesh(cfg), make_mesh(cfg)
    assert dict(rollout.shape) == {"data": 2, "fsdp": 1, "tensor": 2}  # no expert key: no expert axis
    assert dict(make_rollout_mesh(dict(cfg, expert=1)).shape) == {"data": 2, "fsdp": 1, "expert": 1, "tensor": 2}
    assert [d.id for d in rollout.devices.flat] == [0, 1, 2, 3]
    assert sorted(d.id for d in training.devices.flat) == [4, 5, 6, 7] and training.shape["data"] == 4
    assert make_rollout_mesh({"data": -1, "fsdp": 1, "tensor": 1}) is None  # the key absent: one mesh
    assert make_rollout_mesh(dict(cfg, rollout_devices=0)) is None and make_mesh(dict(cfg, rollout_devices=0)).size == 8


@pytest.mark.parametrize("overrides, key, match", [
    ({"mesh.rollout_devices": 4}, "mesh.rollout_devices", "needs `rl.max_lag` >= 1"),
    ({"mesh.rollout_devices": 8, "rl.max_lag": 1}, "mesh.rollout_devices", "smaller than the device count 8"),
    ({"mesh.rollout_devices": -1, "rl.max_lag": 1}, "mesh.rollout_devices", "int >= 0"),
    ({"mesh.rollout_devices": 4, "mesh.rollout_tensor": 3, "rl.max_lag": 1}, "mesh.rollout_tensor", "divid"),
    ({"mesh.rollout_devices": 6, "rl.max_lag": 1}, "mesh.rollout_devices", "divisible by the rollout mesh"),
    ({"mesh.rollout_devices": 4, "mesh.data": 8, "rl.max_lag": 1}, "mesh", "must equal the number of devices"),
])
def test_bad_rollout_mesh_keys_are_refused(tiny_model_dir, tmp_path, overrides, key, match):
    with pytest.raises(ConfigError, match=match) as err:
        RLTrainer(tiny_config(tiny_model_dir, **overrides), tmp_path)
    assert err.value.key == key


def test_rollout_mesh_refused_for_other_recipes():
    from adrpo_jax.train.config import common_config, validate_common_config
    config = common_config()
    config.trainer, config.mesh.rollout_devices = "flow", 2
    with pytest.raises(ConfigError, match="text LLM recipe") as err:
        validate_common_config(config)
    assert err.value.key == "mesh.rollout_devices"
    config.trainer, config.mesh.rollout_devices, config.mesh.rollout_tensor = "llm", 4, 3
    with pytest.raises(ConfigError, match="must divide") as err:
        validate_common_config(config)
    assert err.value.key == "mesh.rollout_tensor"


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.slow
def test_split_meshes_train_like_one_mesh_and_resume_exactly(tiny_model_dir, tmp_path):
    """4 rollout + 4 training devices at max_lag=1 against the one 8-device mesh at max_lag=1: the same samples
    (the sampler's random draws do not depend on the sharding; every row is computed on one device either way) and
    losses / parameters within 1e-5 (not bitwise: the update's batch reductions run over 4 devices instead of 8, a
    different compiled computation; the forward passes are bitwise equal at this size, 20 vs 40 tokens per device,
    while XLA:CPU may round a matmul row differently once a device holds more rows: see the MoE test below). Split
    runs resume bit-identically (same meshes, same programs)."""
    kw = {"rl.ref_sync_steps": 0, "rl.max_lag": 1, "optim.schedule": "constant", "rl.num_prompts_per_step": 8}
    split = {"mesh.rollout_devices": 4}
    one = RLTrainer(tiny_config(tiny_model_dir, eval_every=0, total_steps=4, **kw), tmp_path / "one")
    one.run()
    full = RLTrainer(tiny_config(tiny_model_dir, eval_every=0, total_steps=4, **kw, **split), tmp_path / "split")
    assert sorted(d.id for d in full.rollout_mesh.devices.flat) == [0, 1, 2, 3]
    assert sorted(d.id for d in full.mesh.devices.flat) == [4, 5, 6, 7]
    full.run()
    # every trained array lives on the training devices; the sampler's weights were synced to the rollout mesh
    assert {d.id for x in jax.tree.leaves(full.result.state) for d in x.sharding.device_set} == {4, 5, 6, 7}
    a, b = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "split" / "metrics.jsonl")
    for key in ("loss", "kl_mean", "pg_loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in b], [r[key] for r in a], rtol=1e-5, atol=1e-6, err_msg=key)
    for key in ("reward_mean", "completion_length_mean"):
        assert [r[key] for r in b] == [r[key] for r in a], key  # the same completions
    for x, y in zip(_leaves(full.result.state["params"]), _leaves(one.result.state["params"])):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    # metrics: the lag histogram (one record per step: one-hot), idle times, the weight sync and its bytes
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(full.result.state["params"]))
    for i, r in enumerate(b):
        hist = [r["async/lag_hist/0"], r["async/lag_hist/1"]]
        assert hist == ([1.0, 0.0] if i == 0 else [0.0, 1.0]) and sum(hist) == 1.0
        assert r["time/update_idle"] == r["time/rollout_wait"] >= 0.0 and r["time/rollout_transfer"] >= 0.0
        assert "time/rollout" not in r and "perf/rollout_mbu" not in r  # dispatch-to-completion spans an update
        if i < 3:  # the steps that dispatch a rollout (the last one has none to dispatch)
            assert r["time/weight_sync"] > 0.0 and r["time/rollout_idle"] >= 0.0
            # replicated on the 4 rollout devices (a 4 x 1 x 1 mesh); step 0 syncs twice (R_0 and R_1)
            assert r["async/weight_sync_bytes"] == 4 * param_bytes * (2 if i == 0 else 1)
        else:
            assert "time/weight_sync" not in r
    assert "time/weight_sync" not in a[-1] and "time/rollout_transfer" not in a[-1]  # one mesh: no sync
    # exact resume of the split run: 2 steps, then a new trainer continues to 4
    RLTrainer(tiny_config(tiny_model_dir, eval_every=0, total_steps=2, **kw, **split), tmp_path / "resumed").run()
    resumed = RLTrainer(tiny_config(tiny_model_dir, eval_every=0, total_steps=4, **kw, **split), tmp_path / "resumed")
    assert resumed.run()["resumed_from"] == 2
    for x, y in zip(_leaves(full.result.state), _leaves(resumed.result.state)):
        np.testing.assert_array_equal(x, y)
    again = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    for key in ("loss", "reward_mean", "kl_mean"):
        assert [r[key] for r in again][2:] == [r[key] for r in b][2:], key


def _record_batches(monkeypatch):
    """Patches ``RLTrainer.update`` to keep, per run and step, the rollout batch it trains on (host copies)."""
    records: list[list[dict]] = []
    update = RLTrainer.update

    def recording(self, step, state, rollout):
        batch = {k: v for k, v in rollout[0].items() if k != "model_inputs"}
        batch.update({f"model_inputs/{k}": v for k, v in (rollout[0].get("model_inputs") or {}).items()})
        if step == 0:
            records.append([])
        records[-1].append({k: np.asarray(v) for k, v in batch.items()})
        return update(self, step, state, rollout)

    monkeypatch.setattr(RLTrainer, "update", recording)
    return records


@pytest.mark.slow
def test_split_meshes_with_a_moe_policy(tmp_path, monkeypatch):
    """A tiny Qwen3-MoE policy with router replay on a 4 + 4 split at max_lag=1 (the sampler's MoE layers trace on
    the rollout mesh, which carries the config's 'expert' axis, size 1: without it the experts' sharding rules were
    missing) against the one 8-device mesh: per step the same sampled tokens and the same routing record (the experts
    every token used, replayed by the training passes), and the behaviour / reference log-probs, losses and
    parameters equal to float rounding.

    Not bitwise: the CPU `blocked` expert path multiplies tiles of min(moe_block_size, M rounded up to 8) rows, M the
    device's token-expert assignments (2 rows x 10 tokens x k=2 = 40 on 8 devices, 80 on 4), and XLA:CPU's matmul
    rounds a row differently in an 80-row product than in a 40-row one: the log-prob passes differ by ~2e-6 (with
    moe_impl='dense' they are bitwise equal here; a dense model's differ too when its tokens per device go from 40
    to 80). Nothing is dropped or routed differently.

    Why SGD: with AdamW (the default) the same comparison differs by ~0.2 % in the loss from step 1 on (measured:
    2.1e-3 relative; the parameters by up to 0.26 lr after one step; sampled tokens differ from step 3). Adam's
    first step is lr * g / (|g| + eps), eps = 1e-8, so a coordinate whose exact gradient is 0 but whose computed one
    is rounding noise moves by a sizeable fraction of lr in the noise's direction. Here layer 0's expert 3 (and the
    router's column 3, and embedding rows of tokens seen only there) is used only by rows of zero-advantage groups,
    so its only gradient is the KL term's, beta_i * (1 - exp(ref_logp - logp)) * grad(logp): 0 at step 0 (policy ==
    reference) but for the reference pass and the update's forward being different programs, ~1e-9 in float32 with
    signs that differ between the meshes (that expert's update: up to 0.075 lr on one mesh, 0.071 lr the other way
    on the split). With rl.beta=0, rl.adaptive=False (no KL term) its update is exactly 0 on both and the step-1
    losses agree to 1.3e-6. A dense
    model has no such zero-gradient coordinates at this size, which is why its split test passes under AdamW. SGD
    keeps rounding-level gradient differences rounding-level, so this test can be tight."""
    from adrpo_jax.rl.tasks import build_char_tokenizer
    from tests.models.llm.families import tiny_hf
    tok_dir = tmp_path / "tok"
    build_char_tokenizer().save_pretrained(tok_dir)
    kw = {"model.tokenizer_path": str(tok_dir), "rl.router_replay": "rollout", "rl.ref_sync_steps": 0,
          "rl.max_lag": 1, "rl.num_prompts_per_step": 8, "optim.name": "sgd", "optim.schedule": "constant"}
    model = str(tiny_hf("qwen3_moe").path)
    batches = _record_batches(monkeypatch)
    one = RLTrainer(tiny_config(model, eval_every=0, total_steps=3, **kw), tmp_path / "one")
    one.run()
    trainer = RLTrainer(tiny_config(model, eval_every=0, total_steps=3, **kw, **{"mesh.rollout_devices": 4}),
                        tmp_path / "run")
    assert trainer.is_moe and dict(trainer.rollout_mesh.shape)["expert"] == 1
    trainer.run()
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert all(np.isfinite(r["loss"]) and 0.0 <= r["moe/routing_mismatch"] <= 1.0 for r in records)
    assert records[0]["time/weight_sync"] > 0.0
    assert len(batches) == 2 and len(batches[0]) == len(batches[1]) == 3
    for step, (a, b) in enumerate(zip(*batches)):
        for key in ("tokens", "completion_mask", "model_inputs/expert_indices"):  # the same samples and routing
            np.testing.assert_array_equal(b[key], a[key], err_msg=f"step {step}: {key}")
        for key in ("old_logp", "ref_logp"):  # old_logp: the sampler's (max_lag=1, no importance correction)
            np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-5, err_msg=f"step {step}: {key}")
    reference = read_jsonl(tmp_path / "one" / "metrics.jsonl")
    for key in ("loss", "pg_loss", "kl_mean", "grad_norm"):  # losses ~1e-3: measured differences <= 4e-8
        np.testing.assert_allclose([r[key] for r in records], [r[key] for r in reference], rtol=1e-4, atol=1e-7,
                                   err_msg=key)
    for x, y in zip(_leaves(trainer.result.state["params"]), _leaves(one.result.state["params"])):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)

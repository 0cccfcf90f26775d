"""Router replay in the LLM recipe (rl.router_replay): a tiny Qwen3-MoE policy's rollout carries the sampler's
expert choices into the training passes ('rollout') or not ('none'), and every step logs the routing statistics
(moe/*: the mismatch between the rollout's experts and the training pass's router, expert load)."""

import numpy as np
import pytest

from adrpo_jax.rl.tasks import build_char_tokenizer
from adrpo_jax.rl.trainer import RLTrainer
from adrpo_jax.train.metrics import read_jsonl
from tests.models.llm.families import tiny_hf
from tests.rl.test_trainer import tiny_config


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    tok_dir = tmp_path_factory.mktemp("tok")
    build_char_tokenizer().save_pretrained(tok_dir)
    return str(tiny_hf("qwen3_moe").path), str(tok_dir)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["rollout", "none"])
def test_router_replay_in_the_rollout_batch(moe_dirs, tmp_path, mode):
    model_dir, tok_dir = moe_dirs
    config = tiny_config(model_dir, eval_every=0, **{"model.tokenizer_path": tok_dir, "rl.router_replay": mode,
                                                      "rl.ref_sync_steps": 0})
    trainer = RLTrainer(config, tmp_path)
    assert trainer.is_moe and "moe/metrics" in trainer.programs
    state = trainer.init_state()
    batch, _ = trainer.rollout(0, state)
    if mode == "rollout":
        record = batch["model_inputs"]["expert_indices"]
        b, t = batch["tokens"].shape
        assert record.shape[:2] == (b, t) and record.shape[-1] == 2  # [B, T, sparse layers, top-k]
    else:
        assert "expert_indices" not in (batch.get("model_inputs") or {})
    trainer.run()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert 0.0 <= records[-1]["moe/routing_mismatch"] <= 1.0 and np.isfinite(records[-1]["loss"])

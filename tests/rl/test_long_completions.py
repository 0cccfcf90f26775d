"""Long completions (issue 26 item 4): the GRPO update at up to 8,192 completion tokens on a tiny model, with the
memory of the update linear in the tokens (chunked attention + remat + packed rows), compiled and run on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from adrpo_jax.models.llm import CausalLM, DecoderConfig
from adrpo_jax.rl.step import StepOptions, make_rl_update

P = 64
ROWS = 4


def _model(impl: str, remat: bool):
    cfg = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                        attention_impl=impl, attention_chunk_size=512, remat=remat)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    return cfg, graphdef, params


def _batch_struct(n: int):
    sds = jax.ShapeDtypeStruct
    return {"tokens": sds((ROWS, P + n), jnp.int32), "attention_mask": sds((ROWS, P + n), jnp.bool_),
            "completion_mask": sds((ROWS, n), jnp.bool_), "lengths": sds((ROWS,), jnp.int32),
            "done": sds((ROWS,), jnp.bool_), "rewards": sds((ROWS,), jnp.float32),
            "reward_valid": sds((ROWS,), jnp.bool_), "ref_logp": sds((ROWS, n), jnp.float32)}


def _update_temp_bytes(n: int, *, impl: str, remat: bool, pack: bool) -> int:
    _, graphdef, params = _model(impl, remat)
    opts = StepOptions(group_size=2, prompt_length=P, max_new_tokens=n, logprob_chunk_size=512,
                       pack_tokens=P + n if pack else 0)
    tx = optax.adam(1e-4)
    fn = jax.jit(make_rl_update(graphdef, tx, opts, None), donate_argnums=(0, 1))
    compiled = fn.lower(params, jax.eval_shape(tx.init, params), None, _batch_struct(n),
                        jax.eval_shape(lambda: jax.random.key(0))).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


@pytest.mark.slow
def test_update_memory_is_linear_in_completion_tokens():
    """Doubling the completion budget 2,048 -> 4,096 -> 8,192 about doubles the update's temporary memory with
    chunked attention + remat + packing; the quadratic reference (xla attention, no remat, padded) quadruples."""
    lin = [_update_temp_bytes(n, impl="chunked", remat=True, pack=True) for n in (2048, 4096, 8192)]
    assert lin[1] / lin[0] < 2.6 and lin[2] / lin[1] < 2.6, lin
    quad = [_update_temp_bytes(n, impl="xla", remat=False, pack=False) for n in (2048, 4096)]
    assert quad[1] / quad[0] > 3.2, quad
    assert lin[1] < quad[1] / 4, (lin, quad)


@pytest.mark.slow
def test_update_runs_at_8192_completion_tokens():
    """One packed update on 4 rows with up to 8,192 completion tokens (log-normal lengths around 1/8 of it, one row
    at the limit): finite loss, parameters move, the loss tokens are the real ones."""
    n = 8192
    cfg, graphdef, _ = _model("chunked", True)
    params = nnx.state(CausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    rng = np.random.default_rng(0)
    lengths = np.array([n, 700, 1300, 90], np.int32)
    tokens = rng.integers(3, cfg.vocab_size, (ROWS, P + n)).astype(np.int32)
    cmask = np.arange(n)[None] < lengths[:, None]
    batch = {"tokens": tokens, "attention_mask": np.concatenate([np.ones((ROWS, P), bool), cmask], 1),
             "completion_mask": cmask, "lengths": lengths, "done": lengths < n,
             "rewards": np.array([1.0, 0.0, 1.0, 0.0], np.float32), "reward_valid": np.ones(ROWS, bool),
             "ref_logp": np.full((ROWS, n), -4.0, np.float32)}
    opts = StepOptions(group_size=2, prompt_length=P, max_new_tokens=n, logprob_chunk_size=512, pack_tokens=P + n)
    tx = optax.adam(1e-3)
    new, _, metrics = jax.jit(make_rl_update(graphdef, tx, opts, None))(params, tx.init(params), None, batch,
                                                                         jax.random.key(0))
    assert np.isfinite(float(metrics["loss"])) and int(metrics["num_tokens"]) == int(lengths.sum())
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params)))
    assert moved > 0

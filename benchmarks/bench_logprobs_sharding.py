"""8-device vs 1-device wall time of ``jit(value_and_grad(token_logprobs))`` for the same global batch
(issue 13 item 5), before (chunks flattened over [B, T], crossing the batch shards) and after (chunks over time
within rows), on forced CPU devices.

    python benchmarks/bench_logprobs_sharding.py                      # vocab 49,152, 2 layers, B=64, T=192
    python benchmarks/bench_logprobs_sharding.py --batch 16 --length 64  # smaller, for a busy machine

The "before" is the previous algorithm, kept here verbatim in :func:`flattened_logprobs` (the library no longer
has it). A ratio near 1 means the 8 devices split the work without repeating it (on a CPU host the 8 devices
share the same cores, so 1 is the ideal, not 1/8).
"""
import argparse
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from adrpo_jax.models.llm import CausalLM, DecoderConfig, token_logprobs  # noqa: E402


def flattened_logprobs(model, tokens, mask, chunk_size=512):
  """The previous chunking: [B, T - 1] positions flattened, chunks of chunk_size crossing rows."""
  hidden = model.hidden_states(tokens, attention_mask=mask)
  w = model.lm_head_matrix()
  b, t, d = hidden.shape
  n = b * (t - 1)
  flat_h, flat_y = hidden[:, :-1].reshape(n, d), tokens[:, 1:].reshape(n)
  c = min(chunk_size, n)
  n_chunks = -(-n // c)
  pad = n_chunks * c - n
  flat_h, flat_y = jnp.pad(flat_h, ((0, pad), (0, 0))), jnp.pad(flat_y, (0, pad))

  @jax.checkpoint
  def chunk(h_c, y_c):
    logits = jnp.einsum("cd,dv->cv", h_c, w.astype(h_c.dtype), preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return jnp.take_along_axis(logits, y_c[:, None], axis=-1)[:, 0] - lse

  lp = jax.lax.map(lambda xs: chunk(*xs), (flat_h.reshape(n_chunks, c, d), flat_y.reshape(n_chunks, c)))
  lp = jnp.concatenate([jnp.zeros((b, 1)), lp.reshape(-1)[:n].reshape(b, t - 1)], 1)
  return jnp.where(mask, lp, 0.0)


def timed(fn, args, repeats):
  jax.block_until_ready(fn(*args))  # compile + warm up
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--vocab", type=int, default=49152)
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--length", type=int, default=192)
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--skip-before", action="store_true", help="only the current algorithm (chunks within rows)")
  args = ap.parse_args()
  cfg = DecoderConfig(vocab_size=args.vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)  # SmolLM2-135M shape
  graphdef, params = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, args.vocab, (args.batch, args.length)).astype(np.int32)
  mask = np.ones(tokens.shape, bool)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  bs, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  print(f"{jax.device_count()} CPU devices, jax {jax.__version__}; vocab {args.vocab}, {args.layers} layers, "
        f"B={args.batch}, T={args.length}")
  variants = (("before (flattened chunks)", flattened_logprobs), ("after (chunks within rows)", token_logprobs))
  for name, fn in variants[1:] if args.skip_before else variants:
    def loss(p, t, m, fn=fn):  # the mesh as abstract mesh: the model's batch hint applies (as in rl.step)
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return jnp.sum(fn(nnx.merge(graphdef, p), t, m, chunk_size=512))

    def loss_single(p, t, m, fn=fn):
      return jnp.sum(fn(nnx.merge(graphdef, p), t, m, chunk_size=512))

    vg_single = jax.jit(jax.value_and_grad(loss_single))
    vg_multi = jax.jit(jax.value_and_grad(loss))
    one = timed(vg_single, (params, jnp.asarray(tokens), jnp.asarray(mask)), args.repeats)
    multi_args = (jax.device_put(params, repl), jax.device_put(tokens, bs), jax.device_put(mask, bs))
    eight = timed(vg_multi, multi_args, args.repeats)
    print(f"{name:28s} 1 device {one:7.3f} s   8 devices (data=8) {eight:7.3f} s   ratio {eight / one:5.2f}x",
          flush=True)


if __name__ == "__main__":
  main()

"""GPU smoke check of the attention implementations (part of `benchmarks/gpu_smoke.sh`; issue 13).

    python benchmarks/gpu_smoke.py            # on a machine with a visible GPU: exit 0 = every check passed
    python benchmarks/gpu_smoke.py --dry-run  # anywhere: the same comparisons with 'chunked' standing in for
                                              # 'cudnn', tiny shapes, no GPU required (CI / CPU check)

Checks, bfloat16, a left-padded batch (row 1 starts with padding), grouped-query attention:

1. `attention(..., impl="cudnn")` equals `impl="xla"` in outputs and in the gradients w.r.t. q, k, v (one
   random cotangent), on the query rows that attend at least one key. Both run in bfloat16, so the two are
   compared against a float32 `xla` reference of the same bf16 inputs: cudnn's error must be at most
   `--factor` times xla-bf16's own error plus `--atol` times the reference's scale (bf16 rounding differs
   between the fused kernel and the unfused ops; a bound relative to xla's own bf16 error is what "equal up
   to bf16" means). The compiled program must contain a cuDNN fused-attention custom call (otherwise the
   check would compare xla with itself).
2. The same for a bf16 `CausalLM` prefill (`attention_impl="cudnn"` vs `"xla"`): the log-probs of the next
   tokens at the valid positions and their gradient w.r.t. the parameters (global norm of the difference).

Fails loudly (exit 2) when no GPU is visible to JAX, unless `--dry-run`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from adrpo_jax.models.llm import CausalLM, DecoderConfig  # noqa: E402
from adrpo_jax.models.llm.attention import AttentionMask, attention, select_impl  # noqa: E402


def gpu_visible() -> bool:
  try:
    return len(jax.devices("gpu")) > 0
  except RuntimeError:
    return False


def _masked_err(a, b, valid) -> float:
  d = jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))
  return float(jnp.max(jnp.where(valid, d, 0.0)))


def check_attention(impl: str, b: int, t: int, h: int, kv: int, hd: int, *, factor: float, atol: float) -> dict:
  """cudnn (or `impl`) vs xla, bf16 outputs and q/k/v gradients, relative to an f32 xla reference."""
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, t, h, hd), jnp.float32).astype(jnp.bfloat16)
  k = jax.random.normal(keys[1], (b, t, kv, hd), jnp.float32).astype(jnp.bfloat16)
  v = jax.random.normal(keys[2], (b, t, kv, hd), jnp.float32).astype(jnp.bfloat16)
  ct = jax.random.normal(keys[3], (b, t, h, hd), jnp.float32)
  key_valid = np.ones((b, t), bool)
  if b > 1:
    key_valid[1, : t // 4] = False  # left padding
  mask = AttentionMask(key_valid=jnp.asarray(key_valid))
  # query rows that attend at least one key (causal + left padding: the valid ones); [B, T, 1, 1]
  row_valid = jnp.asarray(key_valid)[:, :, None, None]
  chosen = select_impl("auto", platform=jax.default_backend(), q_shape=q.shape, k_shape=k.shape, dtype=q.dtype,
                       mask=mask, auto_min_len=1 << 30)

  def run(impl_, dtype):
    def f(q_, k_, v_):
      out = attention(q_.astype(dtype), k_.astype(dtype), v_.astype(dtype), mask, impl=impl_, chunk_size=64)
      return jnp.sum(out.astype(jnp.float32) * jnp.where(row_valid, ct, 0.0)), out
    fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))
    hlo = fn.lower(q, k, v).compile().as_text() or ""
    (_, out), grads = fn(q, k, v)
    return out, grads, hlo

  ref_out, ref_grads, _ = run("xla", jnp.float32)
  xla_out, xla_grads, _ = run("xla", jnp.bfloat16)
  new_out, new_grads, hlo = run(impl, jnp.bfloat16)
  kv_valid = jnp.asarray(key_valid)[:, :, None, None]
  checks = {}
  for name, ref, a, bb, valid in (("out", ref_out, xla_out, new_out, row_valid),
                                  ("dq", ref_grads[0], xla_grads[0], new_grads[0], row_valid),
                                  ("dk", ref_grads[1], xla_grads[1], new_grads[1], kv_valid),
                                  ("dv", ref_grads[2], xla_grads[2], new_grads[2], kv_valid)):
    scale = float(jnp.max(jnp.where(valid, jnp.abs(ref), 0.0)))
    xla_err, new_err = _masked_err(a, ref, valid), _masked_err(bb, ref, valid)
    bound = factor * xla_err + atol * scale
    checks[name] = dict(xla_bf16_err=xla_err, impl_err=new_err, bound=bound, scale=scale,
                        ok=bool(np.isfinite(new_err) and new_err <= bound))
  fused = "cudnn" in hlo.lower() or "fmha" in hlo.lower()
  return dict(impl=impl, shape=dict(b=b, t=t, h=h, kv=kv, hd=hd), auto_choice=chosen, fused_kernel_in_hlo=fused,
              checks=checks, ok=all(c["ok"] for c in checks.values()) and (impl != "cudnn" or fused))


def check_model(impl: str, b: int, t: int, layers: int, *, factor: float, atol: float) -> dict:
  """bf16 CausalLM prefill: next-token log-probs and parameter gradients, `impl` vs xla (f32 xla reference)."""
  base = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, tie_word_embeddings=False, initializer_range=0.05,
              attention_chunk_size=64)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(3, 512, (b, t)), jnp.int32)
  mask = np.ones((b, t), bool)
  if b > 1:
    mask[1, : t // 4] = False
  mask = jnp.asarray(mask)
  tgt_valid = mask[:, 1:] & mask[:, :-1]
  params = nnx.state(CausalLM(DecoderConfig(**base), rngs=nnx.Rngs(0)), nnx.Param)

  def run(impl_, dtype):
    model = CausalLM(DecoderConfig(**base, attention_impl=impl_, dtype=dtype), rngs=nnx.Rngs(0))
    graphdef, _ = nnx.split(model, nnx.Param)

    def f(p):
      m = nnx.merge(graphdef, p)
      logits = m(tokens, attention_mask=mask).astype(jnp.float32)
      logp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1)[..., 0]
      return jnp.sum(jnp.where(tgt_valid, logp, 0.0)) / jnp.sum(tgt_valid), logp
    (_, logp), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    return logp, jax.tree.leaves(grads)

  ref_lp, ref_g = run("xla", jnp.float32)
  xla_lp, xla_g = run("xla", jnp.bfloat16)
  new_lp, new_g = run(impl, jnp.bfloat16)

  def gnorm(a, bb):
    return float(jnp.sqrt(sum(jnp.sum((x.astype(jnp.float32) - y.astype(jnp.float32)) ** 2) for x, y in zip(a, bb))))
  ref_gnorm = float(jnp.sqrt(sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in ref_g)))
  lp_scale = float(jnp.max(jnp.where(tgt_valid, jnp.abs(ref_lp), 0.0)))
  checks = {}
  for name, xla_err, new_err, scale in (
      ("logprobs", _masked_err(xla_lp, ref_lp, tgt_valid), _masked_err(new_lp, ref_lp, tgt_valid), lp_scale),
      ("grad_norm_diff", gnorm(xla_g, ref_g), gnorm(new_g, ref_g), ref_gnorm)):
    bound = factor * xla_err + atol * scale
    checks[name] = dict(xla_bf16_err=xla_err, impl_err=new_err, bound=bound, scale=scale,
                        ok=bool(np.isfinite(new_err) and new_err <= bound))
  return dict(impl=impl, shape=dict(b=b, t=t, layers=layers), checks=checks,
              ok=all(c["ok"] for c in checks.values()))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dry-run", action="store_true",
                      help="no GPU needed: 'chunked' stands in for 'cudnn', tiny shapes")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=1024, help="sequence length of the attention check (even)")
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--kv-heads", type=int, default=2)
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--model-seq", type=int, default=512, help="sequence length of the model check")
  parser.add_argument("--model-layers", type=int, default=2)
  parser.add_argument("--factor", type=float, default=2.0, help="cudnn error <= factor * xla-bf16 error + ...")
  parser.add_argument("--atol", type=float, default=1e-2, help="... + atol * max |reference|")
  parser.add_argument("--json", help="also write the results here")
  args = parser.parse_args(argv)

  impl = "cudnn"
  if args.dry_run:
    impl = "chunked"
    args.batch, args.seq, args.heads, args.kv_heads, args.head_dim = 2, 64, 4, 2, 32
    args.model_seq, args.model_layers = 32, 1
  elif not gpu_visible():
    print(f"FAIL: no GPU visible to JAX (backend {jax.default_backend()!r}, devices {jax.devices()}); "
          "install jax[cuda12] or run with --dry-run", file=sys.stderr, flush=True)
    return 2
  print(f"# gpu_smoke: jax {jax.__version__}, devices {jax.devices()}, impl {impl!r} vs 'xla' (bf16)", flush=True)
  results = dict(
      attention=check_attention(impl, args.batch, args.seq, args.heads, args.kv_heads, args.head_dim,
                                factor=args.factor, atol=args.atol),
      model=check_model(impl, min(args.batch, 4), args.model_seq, args.model_layers, factor=args.factor,
                        atol=args.atol))
  for part, res in results.items():
    extra = (f", auto picks {res['auto_choice']!r}, fused kernel in HLO: {res['fused_kernel_in_hlo']}"
             if part == "attention" else "")
    print(f"{part} {res['shape']}{extra}: {'OK' if res['ok'] else 'FAILED'}")
    for name, c in res["checks"].items():
      print(f"  {name:15s} {impl} err {c['impl_err']:.3e}  xla-bf16 err {c['xla_bf16_err']:.3e}  bound "
            f"{c['bound']:.3e}  (|ref| {c['scale']:.3e})  {'ok' if c['ok'] else 'FAIL'}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2, default=str)
  ok = all(r["ok"] for r in results.values())
  if not args.dry_run and results["attention"]["auto_choice"] != "cudnn":
    print(f"FAIL: attention_impl='auto' picks {results['attention']['auto_choice']!r} on this GPU for the "
          "checked shape (expected 'cudnn')", file=sys.stderr)
    ok = False
  print("gpu_smoke attention:", "PASSED" if ok else "FAILED", flush=True)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())

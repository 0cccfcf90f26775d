"""Generation with the `decode` attention (the KV-cache step reads only the filled key blocks; what `auto` picks
on CPU/GPU for caches of >= 512 slots) vs the whole-cache `xla` step, and transformers `generate`, in one process,
calls interleaved (issue 13: decode attention that skips empty key blocks).

Same random Llama as `bench_decoder.py --vs-transformers` (saved by transformers: 4 layers, hidden 256,
intermediate 1024, vocab 8192, float32), batch 16, 32-token prompts, `--new-tokens` new tokens (default 480: a
512-slot cache), no EOS; greedy and top-p 0.95; transformers at `--threads` torch threads.

    .venv/bin/python benchmarks/bench_decode_attention.py --new-tokens 480 --repeats 2
"""
import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adrpo_jax.models.llm import SamplingConfig, load_pretrained, make_generate_fn

MODES = (("greedy", dict(greedy=True), dict(do_sample=False)),
         ("top-p 0.95", dict(temperature=1.0, top_p=0.95), dict(do_sample=True, temperature=1.0, top_k=0, top_p=0.95)))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--prompt-len", type=int, default=32)
  ap.add_argument("--new-tokens", type=int, default=480)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--threads", type=int, default=1)
  ap.add_argument("--impls", default="auto,xla")
  args = ap.parse_args(argv)
  import torch
  import transformers
  torch.set_num_threads(args.threads)
  b, p, n, v = args.batch, args.prompt_len, args.new_tokens, 8192
  hf_cfg = transformers.LlamaConfig(vocab_size=v, hidden_size=256, intermediate_size=1024,
                                    num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                                    max_position_embeddings=max(512, p + n), tie_word_embeddings=False,
                                    bos_token_id=None, eos_token_id=None, pad_token_id=0)
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(hf_cfg).eval()
  tmp = tempfile.mkdtemp(prefix="bench_decode_attention_")
  hf.save_pretrained(tmp)
  prompts = np.random.default_rng(0).integers(1, v, (b, p)).astype(np.int32)
  tokens_j, mask_j = jnp.asarray(prompts), jnp.ones((b, p), bool)
  tokens_t, mask_t = torch.tensor(prompts, dtype=torch.long), torch.ones((b, p), dtype=torch.long)
  impls = [x for x in args.impls.split(",") if x]
  states = {}
  for impl in impls:
    states[impl] = nnx.split(load_pretrained(tmp, config_overrides={"attention_impl": impl}))
  print(f"# load average {os.getloadavg()[0]:.1f} at the start; jax {jax.__version__}, transformers "
        f"{transformers.__version__}, torch {torch.__version__} ({args.threads} threads); batch {b}, prompt {p}, "
        f"{n} new tokens (cache {p + n} slots)", flush=True)
  rows = {}
  for label, ours_kw, hf_kw in MODES:
    runners, fns = {}, {}
    for impl in impls:
      graphdef, state = states[impl]
      fn = jax.jit(make_generate_fn(graphdef, SamplingConfig(max_new_tokens=n, **ours_kw)))
      jax.block_until_ready(fn(state, tokens_j, mask_j, jax.random.key(0)).tokens)  # compile
      fns[impl] = fn
      runners[impl] = (lambda i, fn=fn, state=state: jax.block_until_ready(
          fn(state, tokens_j, mask_j, jax.random.key(i + 1)).tokens))

    def hf_run(i, hf_kw=hf_kw):
      torch.manual_seed(i)
      with torch.inference_mode():
        out = hf.generate(input_ids=tokens_t, attention_mask=mask_t, max_new_tokens=n, min_new_tokens=n,
                          eos_token_id=None, pad_token_id=0, **hf_kw)
      assert out.shape == (b, p + n)
    runners["transformers"] = hf_run
    hf_run(0)  # warm-up
    if "greedy" in label and len(impls) > 1:  # same tokens from every implementation
      outs = [np.asarray(fns[k](states[k][1], tokens_j, mask_j, jax.random.key(0)).tokens)
              for k in impls]
      assert all((o == outs[0]).all() for o in outs), "greedy tokens differ between attention implementations"
    times = {k: [] for k in runners}
    for i in range(args.repeats):
      for k in (list(runners) if i % 2 == 0 else list(runners)[::-1]):
        t0 = time.perf_counter()
        runners[k](i)
        times[k].append(time.perf_counter() - t0)
    rows[label] = {k: float(np.median(t)) for k, t in times.items()}
    print(f"# {label}: {times}", flush=True)
  print(f"\nload average {os.getloadavg()[0]:.1f} at the end\n")
  print("| mode | transformers (s) | " + " | ".join(f"ours {k} (s)" for k in impls) + " | "
        + " | ".join(f"{k}: x transformers" for k in impls) + " |")
  print("|---|" + "---:|" * (1 + 2 * len(impls)))
  for label, r in rows.items():
    print(f"| {label} | {r['transformers']:.3f} | " + " | ".join(f"{r[k]:.3f}" for k in impls) + " | "
          + " | ".join(f"{r['transformers'] / r[k]:.2f}x" for k in impls) + " |")


if __name__ == "__main__":
  main()

"""Ours vs Tunix (google-tunix, the JAX-native post-training library) on one model: sampling and a GRPO update.

Tunix pins ``safetensors<0.8`` (ours: 0.8.0), so it lives in a venv of its own with our jax / flax / optax pins and
this repository on ``PYTHONPATH`` (``requirements-bench-tunix.txt``)::

    python3.11 -m venv /work/tunix_venv
    /work/tunix_venv/bin/pip install -r requirements-bench-tunix.txt
    JAX_PLATFORMS=cpu PYTHONPATH=. /work/tunix_venv/bin/python benchmarks/bench_tunix.py --json tunix.json
    # ours only (any venv, no tunix): engine variants side by side, e.g. the layer layouts
    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/bench_tunix.py --sides ours --ours scan,unrolled

Setup (identical on both sides, one process, both single-threaded: XLA ``--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1`` unless ``--threads 0``):
  * model: a random Llama (default vocab 8,192, hidden 256, 4 layers, 4 heads of 64, MLP 1,024, untied: 8.39M
    parameters, float32, rope theta 1e6 -- Tunix's Llama3 applies RoPE with theta 1e6 whatever its config says)
    drawn with NumPy and written as a Hugging Face directory (``save_pretrained``); Tunix loads it with
    ``tunix.models.llama3.params.create_model_from_safe_tensors``, we with ``load_pretrained``;
  * sampling: B rows of P random prompt tokens (no padding), N new tokens, no stop token (both sides decode all N
    steps: Tunix gets an EOS id outside the vocabulary); greedy, temperature 1 (Tunix: ``top_p=1.0``, its
    ``jax.random.categorical`` path) and top-p 0.95 (Tunix: ``lax.top_k`` over the vocabulary); short (``--new-tokens``)
    and long (``--long-new-tokens``) completions. Timed: Tunix's own per-call engine path
    (``Sampler.init_sample_state`` + the jitted prefill + the jitted ``while_loop`` decode, i.e. ``Sampler.__call__``
    minus string tokenization / detokenization), ours ``jax.jit(make_generate_fn(...))``; both block on the tokens.
    Tunix returns no log-probs (its default); ours always computes them (a log-sum-exp per step);
  * GRPO update: ``--update-rows`` rows of P prompt + (``--update-len`` - P) completion slots (random completion
    lengths, padding after them), on-policy (ratio 1), beta 0.04 with the k3 estimator (Tunix ``low_var_kl``), clip
    0.2, token-mean loss, AdamW lr 1e-6 after global-norm clipping 1.0, entropy computed on both sides. Tunix: its
    ``PeftTrainer`` train step (``nnx.value_and_grad`` of ``algo_core.grpo_loss_fn`` + ``nnx.Optimizer``, jitted with
    ``jit_train_and_eval_step(cache_nnx_graph=True)`` as ``train()`` does) on a ``TrainExample`` whose advantages are
    ours (computed from the same rewards); ours ``jax.jit(make_rl_update(...), donate_argnums=(0, 1))``.

Checks first (identical outputs): completion log-probs (ours vs Tunix, and vs transformers/torch when importable),
greedy tokens on the short case, and the first update's loss / gradient norm / KL. A failed check exits 1 unless
``--no-check-fail``. Then each case: one warm-up call per side (compile time reported), ``--reps`` rounds of
alternating calls (A B A B ...), medians with min / max and the per-round ratios, written to ``--json``. Each call's
process CPU time is recorded too (``cpu_*``): with one compute thread per side it is the call's own work, which a
loaded machine inflates far less than the wall time (the speedup on it: ``cpu_speedup_vs_*``); a quiet machine's
wall-time medians are the figures to quote.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time


def _arg_value(argv, name: str, default: str) -> str:
  for i, a in enumerate(argv):
    if a == name and i + 1 < len(argv):
      return argv[i + 1]
    if a.startswith(name + "="):
      return a.split("=", 1)[1]
  return default


# XLA's CPU thread pool is fixed when jax initialises: one compute thread per side unless --threads 0.
if _arg_value(sys.argv[1:], "--threads", "1") == "1" and __name__ == "__main__":
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                             " intra_op_parallelism_threads=1").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, ".."))
sys.path.insert(0, _HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _bench_utils import build_model, machine  # noqa: E402
from flax import nnx  # noqa: E402

from adrpo_jax.models.llm import DecoderConfig, SamplingConfig, load_pretrained, make_generate_fn, token_logprobs  # noqa: E402
from adrpo_jax.models.llm.checkpoint import save_pretrained  # noqa: E402
from adrpo_jax.rl.step import StepOptions, make_rl_update, prepare_rollout  # noqa: E402

PAD, BOS, EOS = 0, 1, 2
FIRST_WORD = 4  # prompt / completion ids are drawn from [4, vocab): never PAD, BOS, EOS

# ours variants: name -> overrides of DecoderConfig fields and of SamplingConfig fields (by name)
OURS_VARIANTS = {
    "default": {},
    "scan": {"scan_layers": True, "unroll_layers": False},  # the layer scan everywhere (the earlier default)
    "unrolled": {"scan_layers": "auto", "unroll_layers": True},
    "list": {"scan_layers": False},
    "xla": {"attention_impl": "xla"},
}
_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingConfig)}

SAMPLING_MODES = {  # name -> (our SamplingConfig kwargs, tunix kwargs)
    "greedy": (dict(greedy=True), dict(top_p=None, temperature=1.0)),
    "temp1": (dict(temperature=1.0), dict(top_p=1.0, temperature=1.0)),
    "top_p": (dict(temperature=1.0, top_p=0.95), dict(top_p=0.95, temperature=1.0)),
}


def log(*a):
  print("#", *a, file=sys.stderr, flush=True)


def parse_variant(spec: str) -> tuple[str, dict]:
  """'unrolled' (a preset) or 'name:key=value,key=value' (DecoderConfig overrides, Python literals)."""
  import ast
  if spec in OURS_VARIANTS:
    return spec, dict(OURS_VARIANTS[spec])
  name, _, rest = spec.partition(":")
  if not rest:
    raise ValueError(f"--ours variant {spec!r}: use a preset {sorted(OURS_VARIANTS)} or 'name:key=value,...'")
  overrides = {}
  for item in rest.split(","):
    key, _, value = item.partition("=")
    try:
      overrides[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      overrides[key.strip()] = value.strip()
  return name, overrides


def model_config(args) -> DecoderConfig:
  return DecoderConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads, rope_theta=1e6, rms_norm_eps=1e-5,
                       max_position_embeddings=4096, bos_token_id=BOS, eos_token_id=(EOS,), pad_token_id=PAD)


def summary(times: list[float]) -> dict:
  return dict(median_s=float(np.median(times)), min_s=float(np.min(times)), max_s=float(np.max(times)),
              times_s=[float(t) for t in times])


# ------------------------------------------------------------------------------------------------------
# Tunix side
# ------------------------------------------------------------------------------------------------------
class TunixSide:
  def __init__(self, args, model_dir: str):
    import tunix  # noqa: F401
    from tunix.models.llama3 import model as llama3
    from tunix.models.llama3 import params as llama3_params
    self.args = args
    self.llama3 = llama3
    self.config = llama3.ModelConfig(num_layers=args.layers, vocab_size=args.vocab, embed_dim=args.hidden,
                                     hidden_dim=args.intermediate, num_heads=args.heads,
                                     head_dim=args.hidden // args.heads, num_kv_heads=args.kv_heads,
                                     rope_theta=1_000_000, norm_eps=1e-5, weight_tying=False)
    self.load = lambda: llama3_params.create_model_from_safe_tensors(model_dir, self.config)
    self.model_dir = model_dir
    self._samplers = {}

  @staticmethod
  def version() -> str:
    from importlib.metadata import version
    try:
      return version("google-tunix")
    except Exception:
      return "unknown"

  def sampler(self, b: int, p: int, n: int):
    from tunix.generate import sampler as tunix_sampler
    key = (b, p, n)
    if key not in self._samplers:
      from bench_trl import make_tokenizer
      s = tunix_sampler.Sampler(self.load(), make_tokenizer(self.args.vocab),
                                tunix_sampler.CacheConfig(cache_size=p + n, num_layers=self.args.layers,
                                                          num_kv_heads=self.args.kv_heads,
                                                          head_dim=self.args.hidden // self.args.heads))
      s.eos_ids = jnp.array([self.args.vocab])  # no stop token: every row decodes all n steps
      self._samplers[key] = s
    return self._samplers[key]

  def generate_fn(self, prompts, n: int, mode: str):
    """A callable running Sampler.__call__'s engine path; returns completions [B, n] (blocked)."""
    b, p = prompts.shape
    s = self.sampler(b, p, n)
    kw = SAMPLING_MODES[mode][1]
    counter = [0]

    def run():
      counter[0] += 1
      state = s.init_sample_state(prompts, total_sampling_steps=p + n, include_logits=False,
                                  forbidden_token_ids=None, temperature=kw["temperature"], top_p=kw["top_p"],
                                  top_k=None, seed=jax.random.PRNGKey(counter[0]), beam_size=None,
                                  include_logprobs=False)
      state = s._compiled_prefill_fn(s._flattened_transformer_state, state, None, echo=False)
      state = s._compiled_decode_fn(s._flattened_transformer_state, state)
      return jax.block_until_ready(state.token_buffer)[:, p:]

    return run

  def logprobs(self, tokens, p: int):
    from tunix.rl import common
    model = self.load()
    graphdef, state = nnx.split(model)
    return common.compute_per_token_logps(graphdef, state, prompt_tokens=tokens[:, :p], completion_tokens=tokens[:, p:],
                                          pad_id=PAD, eos_id=EOS, stop_gradient=True, temperature=1.0)

  def update_fn(self, batch, advantages, p: int):
    """One PeftTrainer GRPO train step per call; returns (loss, aux, grad_norm) of the call."""
    from tunix.rl import algo_core, common
    from tunix.rl.grpo import grpo_learner
    from tunix.sft import peft_trainer
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-6, weight_decay=0.0))
    trainer = peft_trainer.PeftTrainer(self.load(), tx, peft_trainer.TrainingConfig(eval_every_n_steps=10**9,
                                                                                   max_steps=10**6))
    algo = grpo_learner.GRPOConfig(num_generations=self.args.group, beta=0.04, epsilon=0.2,
                                   loss_agg_mode="token-mean", kl_loss_mode="low_var_kl")
    algo.temperature = 1.0  # GRPOLearner sets it from the rollout config

    def loss_fn(model, train_example, algo_config):
      return algo_core.grpo_loss_fn(model, train_example, algo_config=algo, pad_id=PAD, eos_id=EOS)

    trainer.with_loss_fn(loss_fn, has_aux=True)
    trainer.with_gen_model_input_fn(lambda x: {"train_example": x, "algo_config": algo})
    step, _ = trainer.jit_train_and_eval_step(cache_nnx_graph=True)
    tokens = batch["tokens"]
    cmask = batch["completion_mask"]
    example = common.TrainExample(
        prompt_ids=tokens[:, :p], prompt_mask=batch["attention_mask"][:, :p].astype(jnp.int32),
        completion_ids=jnp.where(cmask, tokens[:, p:], PAD), completion_mask=cmask.astype(jnp.int32),
        advantages=advantages, ref_per_token_logps=batch["ref_logp"], old_per_token_logps=None)

    def run():
      return jax.block_until_ready(step(example))

    return run


# ------------------------------------------------------------------------------------------------------
# Our side
# ------------------------------------------------------------------------------------------------------
class OursSide:
  def __init__(self, model_dir: str, overrides: dict):
    self.model_dir = model_dir
    self.sampling = {k: v for k, v in overrides.items() if k in _SAMPLING_FIELDS}
    self.overrides = {k: v for k, v in overrides.items() if k not in _SAMPLING_FIELDS}
    self.model = load_pretrained(model_dir, config_overrides=self.overrides or None)

  def generate_fn(self, prompts, n: int, mode: str):
    b, p = prompts.shape
    cfg = SamplingConfig(max_new_tokens=n, eos_token_ids=(), pad_token_id=PAD, **SAMPLING_MODES[mode][0],
                         **self.sampling)
    graphdef, state = nnx.split(self.model)
    fn = jax.jit(make_generate_fn(graphdef, cfg))
    mask = jnp.ones((b, p), bool)
    counter = [0]

    def run():
      counter[0] += 1
      return jax.block_until_ready(fn(state, prompts, mask, jax.random.key(counter[0])).completions)

    return run

  def logprobs(self, tokens, mask, n: int):
    return jax.jit(lambda m, t, a: token_logprobs(m, t, a, logits_to_keep=n))(self.model, tokens, mask)

  def update_fn(self, batch, opts: StepOptions):
    graphdef, params, frozen = nnx.split(load_pretrained(self.model_dir, config_overrides=self.overrides or None),
                                         nnx.Param, ...)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-6, weight_decay=0.0))
    update = jax.jit(make_rl_update(graphdef, tx, opts, None), donate_argnums=(0, 1))
    state = [params, tx.init(params)]
    key = jax.random.key(0)

    def run():
      out = jax.block_until_ready(update(state[0], state[1], frozen, batch, key))
      state[0], state[1] = out[0], out[1]
      return out[2]

    return run


def rollout_batch(args, vocab: int, seed: int = 0):
  """Prompt + completion rows as a rollout produces them; reference log-probs near the policy's (log 1/V)."""
  b, p = args.update_rows, args.prompt_len
  n = args.update_len - p
  rng = np.random.default_rng(seed)
  tokens = rng.integers(FIRST_WORD, vocab, (b, p + n)).astype(np.int32)
  lengths = rng.integers(n // 2, n + 1, b).astype(np.int32)
  cmask = np.arange(n)[None, :] < lengths[:, None]
  tokens[:, p:] = np.where(cmask, tokens[:, p:], PAD)
  ref = (-math.log(vocab) + 0.1 * rng.standard_normal((b, n))).astype(np.float32)
  return {k: jnp.asarray(v) for k, v in {
      "tokens": tokens, "attention_mask": np.concatenate([np.ones((b, p), bool), cmask], 1),
      "completion_mask": cmask, "lengths": lengths, "done": lengths < n,
      "rewards": rng.standard_normal(b).astype(np.float32), "reward_valid": np.ones(b, bool),
      "ref_logp": ref}.items()}


def torch_logprobs(model_dir: str, tokens: np.ndarray, mask: np.ndarray, n: int):
  """transformers' float32 log-probs of the last n tokens, or None without torch."""
  try:
    import torch
    from transformers import AutoModelForCausalLM
  except ImportError:
    return None
  model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    ids = torch.as_tensor(tokens, dtype=torch.long)
    am = torch.as_tensor(mask, dtype=torch.long)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=am, position_ids=pos).logits[:, -n - 1:-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, -n:, None])[..., 0]
  return logp.numpy()


# ------------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------------
def interleaved(runners: dict, reps: int, warmup: int = 1) -> dict:
  """`warmup` calls per side (the first one's time reported as compile_s: it compiles; Tunix's train step
  compiles again on its second call, hence warmup=2 for the update), then `reps` rounds of A B A B ... calls."""
  out = {name: {"compile_s": None, "times": [], "cpu": []} for name in runners}
  for name, fn in runners.items():
    for i in range(warmup):
      t0 = time.perf_counter()
      fn()
      if i == 0:
        out[name]["compile_s"] = time.perf_counter() - t0
  names = list(runners)
  for _ in range(reps):
    for name in names:
      t0, c0 = time.perf_counter(), time.process_time()
      runners[name]()
      out[name]["times"].append(time.perf_counter() - t0)
      out[name]["cpu"].append(time.process_time() - c0)
  res = {}
  for name, v in out.items():
    cpu = summary(v["cpu"])
    res[name] = dict(compile_s=v["compile_s"], **summary(v["times"]),
                     cpu_median_s=cpu["median_s"], cpu_min_s=cpu["min_s"], cpu_max_s=cpu["max_s"], cpu_s=cpu["times_s"])
  return res


def add_ratios(case: dict, reference: str | None):
  """speedup of each ours variant over `reference` (its median / ours median) and per-round ratios."""
  if reference is None or reference not in case["sides"]:
    return
  ref = case["sides"][reference]
  for name, side in case["sides"].items():
    if name == reference:
      continue
    side["speedup_vs_" + reference] = ref["median_s"] / side["median_s"]
    side["round_ratios_vs_" + reference] = [r / s for r, s in zip(ref["times_s"], side["times_s"])]
    side["cpu_speedup_vs_" + reference] = ref["cpu_median_s"] / side["cpu_median_s"]


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--vocab", type=int, default=8192)
  parser.add_argument("--hidden", type=int, default=256)
  parser.add_argument("--intermediate", type=int, default=1024)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--kv-heads", type=int, default=4)
  parser.add_argument("--batch", type=int, default=16, help="sampling rows")
  parser.add_argument("--prompt-len", type=int, default=32)
  parser.add_argument("--new-tokens", type=int, default=96, help="short completions")
  parser.add_argument("--long-new-tokens", type=int, default=1024, help="long completions (0: skip)")
  parser.add_argument("--long-batch", type=int, default=16)
  parser.add_argument("--update-rows", type=int, default=8)
  parser.add_argument("--update-len", type=int, default=192, help="prompt + completion slots of the update")
  parser.add_argument("--group", type=int, default=4, help="GRPO group size of the update batch")
  parser.add_argument("--modes", default="greedy,temp1,top_p")
  parser.add_argument("--cases", default="short,long,update", help="subset of short,long,update")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--long-reps", type=int, default=3)
  parser.add_argument("--threads", type=int, default=1, help="1: single-threaded XLA on both sides; 0: all cores")
  parser.add_argument("--sides", default="ours,tunix", help="'ours,tunix' or 'ours' (no tunix needed)")
  parser.add_argument("--ours", default="default", help="comma-separated ours variants: presets "
                      f"{sorted(OURS_VARIANTS)} or 'name:key=value,...' overrides of DecoderConfig / "
                      "SamplingConfig fields (e.g. 'u:scan_layers=False', 's:unroll_layers=False'); each is timed "
                      "in the same interleaved loop")
  parser.add_argument("--no-check-fail", action="store_true", help="report failed checks without exiting 1")
  parser.add_argument("--json", help="write the results to this JSON file")
  args = parser.parse_args(argv)
  sides = [s.strip() for s in args.sides.split(",") if s.strip()]
  if not set(sides) <= {"ours", "tunix"} or "ours" not in sides:
    raise ValueError(f"--sides={args.sides!r} must be 'ours,tunix' or 'ours'")
  variants = dict(parse_variant(s.strip()) for s in args.ours.split(",") if s.strip())
  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  for m in modes:
    if m not in SAMPLING_MODES:
      raise ValueError(f"--modes: unknown mode {m!r}; use {sorted(SAMPLING_MODES)}")
  cases = {c.strip() for c in args.cases.split(",") if c.strip()}
  if args.update_len <= args.prompt_len:
    raise ValueError(f"--update-len={args.update_len} must exceed --prompt-len={args.prompt_len}")
  if args.update_rows % args.group:
    raise ValueError(f"--update-rows={args.update_rows} must be a multiple of --group={args.group}")
  use_tunix = "tunix" in sides
  result: dict = dict(machine=machine(), args=vars(args), load_before=os.getloadavg(), xla_flags=os.environ.get(
      "XLA_FLAGS", ""), checks={}, cases={})
  if use_tunix:
    result["tunix"] = TunixSide.version()

  with tempfile.TemporaryDirectory() as tmp:
    model_dir = os.path.join(tmp, "model")
    cfg = model_config(args)
    base = build_model(cfg)
    result["params"] = int(sum(x.size for x in jax.tree.leaves(nnx.state(base, nnx.Param))))
    save_pretrained(base, model_dir)
    del base
    log(f"model: {result['params'] / 1e6:.2f}M parameters -> {model_dir}")
    ours = {name: OursSide(model_dir, ov) for name, ov in variants.items()}
    first = next(iter(ours.values()))
    tunix = TunixSide(args, model_dir) if use_tunix else None
    rng = np.random.default_rng(1)
    prompts = jnp.asarray(rng.integers(FIRST_WORD, args.vocab, (args.batch, args.prompt_len)), jnp.int32)
    long_prompts = jnp.asarray(rng.integers(FIRST_WORD, args.vocab, (args.long_batch, args.prompt_len)), jnp.int32)
    batch = rollout_batch(args, args.vocab)
    p, n_upd = args.prompt_len, args.update_len - args.prompt_len
    opts = StepOptions(group_size=args.group, prompt_length=p, max_new_tokens=n_upd, beta=0.04, adaptive=False,
                       kl_estimator="k3", eps_low=0.2, eps_high=0.2, loss_aggregation="token_mean", temperature=1.0)
    advantages = jax.jit(lambda b: prepare_rollout(opts, b).advantages)(batch)

    # ---------------- checks ----------------
    checks = result["checks"]
    failed = []
    cm = np.asarray(batch["completion_mask"])
    our_lp = np.asarray(first.logprobs(batch["tokens"], batch["attention_mask"], n_upd))
    torch_lp = torch_logprobs(model_dir, np.asarray(batch["tokens"]), np.asarray(batch["attention_mask"]), n_upd)
    if torch_lp is not None:
      checks["logp_max_abs_diff_ours_vs_torch"] = float(np.max(np.abs(np.where(cm, our_lp - torch_lp, 0))))
    if use_tunix:
      tunix_lp = np.asarray(tunix.logprobs(batch["tokens"], p))
      checks["logp_max_abs_diff_ours_vs_tunix"] = float(np.max(np.abs(np.where(cm, our_lp - tunix_lp, 0))))
      if torch_lp is not None:
        checks["logp_max_abs_diff_tunix_vs_torch"] = float(np.max(np.abs(np.where(cm, tunix_lp - torch_lp, 0))))
      if checks["logp_max_abs_diff_ours_vs_tunix"] > 1e-4:
        failed.append("log-probs")
      g_ours = np.asarray(first.generate_fn(prompts, args.new_tokens, "greedy")())
      g_tunix = np.asarray(tunix.generate_fn(prompts, args.new_tokens, "greedy")())
      # Tunix treats a generated PAD id as padding (its decode mask is `token_buffer != pad_id`), so a row is
      # compared up to and including its first PAD (ours keeps attending to it); random weights emit it rarely.
      cols = np.arange(g_ours.shape[1])[None, :]
      first_pad = np.where((g_ours == PAD).any(1), np.argmax(g_ours == PAD, 1), g_ours.shape[1])
      comparable = cols <= first_pad[:, None]
      checks["greedy_tokens_differing"] = int(np.sum((g_ours != g_tunix) & comparable))
      checks["greedy_tokens_compared"] = int(comparable.sum())
      checks["greedy_rows_with_generated_pad"] = int((g_ours == PAD).any(1).sum())
      if checks["greedy_tokens_differing"]:
        failed.append("greedy tokens")
      m_ours = first.update_fn(batch, opts)()
      loss_t, aux_t, gn_t = tunix.update_fn(batch, advantages, p)()
      first_update = dict(ours_loss=float(m_ours["loss"]), tunix_loss=float(loss_t),
                          ours_grad_norm=float(m_ours["grad_norm"]), tunix_grad_norm=float(gn_t),
                          ours_kl=float(m_ours["kl_mean"]), tunix_kl=float(aux_t["kl"]))
      checks["first_update"] = first_update
      for k in ("loss", "grad_norm", "kl"):
        a, b_ = first_update["ours_" + k], first_update["tunix_" + k]
        if abs(a - b_) > 1e-4 * max(1.0, abs(b_)):
          failed.append(f"first update {k}")
    checks["failed"] = failed
    log(f"checks: {json.dumps(checks)}")
    if failed and not args.no_check_fail:
      print(json.dumps(result, indent=2, default=str))
      raise SystemExit(f"identical-output checks failed: {failed}")

    # ---------------- timed cases ----------------
    reference = "tunix" if use_tunix else (next(iter(ours)) if len(ours) > 1 else None)
    sampling_cases = []
    if "short" in cases:
      sampling_cases.append(("short", prompts, args.new_tokens, args.reps))
    if "long" in cases and args.long_new_tokens > 0:
      sampling_cases.append(("long", long_prompts, args.long_new_tokens, args.long_reps))
    for label, prom, n, reps in sampling_cases:
      for mode in modes:
        name = f"{mode}_{label}"
        runners = {f"ours:{v}": side.generate_fn(prom, n, mode) for v, side in ours.items()}
        if use_tunix:
          runners["tunix"] = tunix.generate_fn(prom, n, mode)
        case = dict(rows=int(prom.shape[0]), prompt=int(prom.shape[1]), new_tokens=n,
                    sides=interleaved(runners, reps))
        add_ratios(case, reference if reference == "tunix" else f"ours:{reference}")
        result["cases"][name] = case
        log(name, {k: round(v["median_s"], 4) for k, v in case["sides"].items()})
    if "update" in cases:
      runners = {f"ours:{v}": side.update_fn(batch, opts) for v, side in ours.items()}
      if use_tunix:
        runners["tunix"] = tunix.update_fn(batch, advantages, p)
      case = dict(rows=args.update_rows, tokens=args.update_len, sides=interleaved(runners, args.reps, warmup=2))
      add_ratios(case, reference if reference == "tunix" else f"ours:{reference}")
      result["cases"]["grpo_update"] = case
      log("grpo_update", {k: round(v["median_s"], 4) for k, v in case["sides"].items()})
  result["load_after"] = os.getloadavg()

  print(f"**Machine:** {result['machine']}; XLA flags {result['xla_flags']!r}; load {result['load_before']} -> "
        f"{result['load_after']}  ")
  print(f"**Model:** {result['params'] / 1e6:.2f}M-parameter random Llama (vocab {args.vocab}, hidden {args.hidden}, "
        f"{args.layers} layers), float32; tunix {result.get('tunix', '-')}; checks {json.dumps(checks)}\n")
  sides_names = list(next(iter(result["cases"].values()))["sides"]) if result["cases"] else []
  print("| case | " + " | ".join(f"{s} median [min, max] (s); CPU s" for s in sides_names)
        + " | speedup (wall; CPU) |")
  print("|---|" + "---:|" * (len(sides_names) + 1))
  for name, case in result["cases"].items():
    cells = [f"{v['median_s']:.3f} [{v['min_s']:.3f}, {v['max_s']:.3f}]; {v['cpu_median_s']:.3f}"
             for v in case["sides"].values()]
    sp = ", ".join(f"{k}: {v[key]:.2f}x; {v['cpu_' + key]:.2f}x" for k, v in case["sides"].items() for key in v
                   if key.startswith("speedup"))
    print(f"| {name} | " + " | ".join(cells) + f" | {sp} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2, default=str)
  return result


if __name__ == "__main__":
  main()

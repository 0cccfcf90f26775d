"""Our GRPO step vs TRL's GRPOTrainer on the same tiny Llama, batch and sequence lengths (CPU, float32).

    .venv/bin/python benchmarks/bench_trl.py                     # ~3-6 min on 2 cores
    .venv/bin/python benchmarks/bench_trl.py --layers 2 --reps 3 # quicker

Setup (identical on both sides):
  * model: ``transformers.LlamaConfig`` (random init, seed 0) saved with ``save_pretrained`` to a temp dir; TRL
    loads it with ``from_pretrained`` (through ``GRPOTrainer(model=<dir>)``), we load the same files with
    ``adrpo_jax.models.llm.load_pretrained`` (identical float32 weights; the max |log-prob difference| on the
    batch is printed as a check);
  * tokenizer: a word-level ``PreTrainedTokenizerFast`` built in memory (one word = one token), so every
    prompt is exactly ``--prompt-len`` tokens (no padding);
  * batch: ``--prompts`` prompts x ``--group`` completions, ``--new-tokens`` completion slots, beta 0.04, k3 KL,
    clip eps 0.2, token-mean (TRL ``loss_type='dapo'`` == our ``token_mean``), temperature 1.0, no top-k/top-p;
    AdamW lr 1e-6 with global-norm clipping 1.0 on both sides;
  * threads: torch.set_num_threads(os.cpu_count()) and XLA's CPU thread pool both use every core; with
    ``--threads 1`` both are single-threaded (XLA: ``--xla_cpu_multi_thread_eigen=false
    intra_op_parallelism_threads=1``), the fair setting on a machine shared with other jobs (torch's OpenMP
    pool degrades badly when its threads are preempted).

(i) train step = log-probs (+ entropy) of the completion tokens + backward + optimizer update on one rollout
    batch with precomputed reference log-probs (no generation, no reference forward on either side):
      - TRL: the batch is the output of ``GRPOTrainer._generate_and_score_completions`` (TRL's own generation,
        reward, advantages and reference log-probs for one step); timed: ``trainer.compute_loss(model, inputs)``
        (``_get_per_token_logps_and_entropies`` + GRPO/DAPO loss with KL) + ``accelerator.backward(loss)`` +
        ``clip_grad_norm_(1.0)`` + ``optimizer.step()`` + ``zero_grad()``: what ``Trainer`` does per
        optimizer step after ``_prepare_inputs``;
      - ours: the same token ids / masks / reference log-probs fed to ``jax.jit(make_rl_update(...),
        donate_argnums=(0, 1))`` (advantages from random rewards inside the step: a [B] op);
    tokens/s counts every position of the [B, P + N] batch.
(ii) generation: B = prompts x group rows, P prompt tokens -> N new tokens, sampling at temperature 1.0:
      - TRL: ``model.generate(ids, attention_mask, generation_config=trainer.generation_config)`` under
        ``torch.no_grad()`` (TRL's non-vLLM generation path, default dynamic KV cache);
      - ours: ``jax.jit(make_generate_fn(...))`` (prefill + ``lax.while_loop`` decode with a static KV cache);
    both stop early only when every row has emitted EOS (practically never with random weights); tokens/s =
    generated tokens (up to and including EOS) / second.
Warm-up is excluded (ours: the first call compiles; its time is reported separately); medians over ``--reps``
calls, the two frameworks' calls interleaved.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

def _threads_from_argv(argv) -> int | None:
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return None


# XLA's CPU thread pool is fixed when jax initialises: --threads 1 makes both sides single-threaded.
if _threads_from_argv(sys.argv[1:]) == 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                               " intra_op_parallelism_threads=1").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from _bench_utils import machine  # noqa: E402
from adrpo_jax.models.llm import SamplingConfig, load_pretrained, make_generate_fn, token_logprobs  # noqa: E402
from adrpo_jax.rl.step import StepOptions, make_rl_update  # noqa: E402

PAD, BOS, EOS, UNK = 0, 1, 2, 3


def make_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": UNK}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="left")


def make_hf_model(args, path: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=max(args.hidden // 128, 1), max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                      torch_dtype="float32")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    make_tokenizer(args.vocab).save_pretrained(path)
    return cfg


def median_time(fn, reps: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), times


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=512, help="our log-prob chunk (token positions)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch threads; 1 also makes XLA single-threaded (set before jax starts), otherwise "
                             "XLA uses every core")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--gen-attention", default="auto",
                        help="comma-separated attention_impl values for our generation, each timed in the same "
                             "interleaved loop (e.g. 'auto,xla': the decode kernel vs the whole-cache reference); "
                             "the first is the one reported as ours")
    parser.add_argument("--skip-train", action="store_true", help="only the generation comparison")
    args = parser.parse_args(argv)
    gen_impls = [x.strip() for x in args.gen_attention.split(",") if x.strip()]

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    b, g, p, n = args.prompts * args.group, args.group, args.prompt_len, args.new_tokens
    result: dict = dict(machine=machine(), args=vars(args), torch=torch.__version__, trl=trl.__version__,
                        transformers=transformers.__version__)
    log = lambda *a: print("#", *a, file=sys.stderr, flush=True)  # noqa: E731

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        hf_cfg = make_hf_model(args, model_dir)
        rng = np.random.default_rng(0)
        prompts = [" ".join(f"w{i}" for i in rng.integers(4, args.vocab, p)) for _ in range(args.prompts * 4)]

        def reward_fn(completions, **kwargs):  # trivial, deterministic, varied (non-zero advantages)
            return [float(hash(c) % 997) / 997.0 for c in completions]

        config = GRPOConfig(
            output_dir=os.path.join(tmp, "trl"), per_device_train_batch_size=b, num_generations=g,
            steps_per_generation=1, gradient_accumulation_steps=1, max_completion_length=n, beta=0.04,
            loss_type="dapo", epsilon=0.2, temperature=1.0, top_p=1.0, top_k=0, learning_rate=1e-6,
            weight_decay=0.0, max_grad_norm=1.0, use_cpu=True, bf16=False, fp16=False, report_to=[],
            save_strategy="no", logging_steps=1000, disable_dropout=True, max_steps=10, seed=0)
        trainer = GRPOTrainer(model=model_dir, reward_funcs=[reward_fn], args=config,
                              train_dataset=Dataset.from_dict({"prompt": prompts}),
                              processing_class=make_tokenizer(args.vocab))
        trainer.create_optimizer_and_scheduler(num_training_steps=10)
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's training loop
        model = trainer.model
        model.train()
        rows = [{"prompt": prompts[i // g]} for i in range(b)]  # TRL's RepeatSampler: each prompt g times
        torch.manual_seed(0)
        t0 = time.perf_counter()
        inputs = trainer._generate_and_score_completions(rows)
        log(f"TRL _generate_and_score_completions (generation + rewards + reference log-probs): "
            f"{time.perf_counter() - t0:.2f}s")
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        cmask = inputs["completion_mask"].bool()
        n_actual = completion_ids.shape[1]
        assert prompt_ids.shape == (b, p), prompt_ids.shape
        assert "old_per_token_logps" not in inputs  # on-policy: ratio 1 on both sides

        # ---------------- ours: same weights, same batch ----------------
        ours = load_pretrained(model_dir)
        graphdef, params, frozen = nnx.split(ours, nnx.Param, ...)
        tokens = jnp.asarray(torch.cat([prompt_ids, completion_ids], 1).numpy().astype(np.int32))
        attn = jnp.asarray(torch.cat([inputs["prompt_mask"].bool(), cmask], 1).numpy())
        lengths = cmask.sum(1).numpy().astype(np.int32)
        batch = {"tokens": tokens, "attention_mask": attn, "completion_mask": jnp.asarray(cmask.numpy()),
                 "lengths": jnp.asarray(lengths), "done": jnp.asarray(lengths < n_actual),
                 "rewards": jnp.asarray(rng.standard_normal(b), jnp.float32), "reward_valid": jnp.ones(b, bool),
                 "ref_logp": jnp.asarray(inputs["ref_per_token_logps"].numpy().astype(np.float32))}
        # check: identical weights -> identical log-probs of the completion tokens
        with torch.no_grad():
            hf_logp, _, _ = trainer._get_per_token_logps_and_entropies(
                model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([inputs["prompt_mask"], cmask.long()], 1),
                n_actual)
        our_logp = np.asarray(token_logprobs(ours, tokens, attn, chunk_size=args.chunk))[:, p:]
        diff = float(np.max(np.abs(np.where(cmask.numpy(), our_logp - hf_logp.numpy(), 0.0))))
        result["max_abs_logp_diff"] = diff
        log(f"max |logp ours - TRL| over the completion tokens: {diff:.2e}")

        opts = StepOptions(group_size=g, prompt_length=p, max_new_tokens=n_actual, beta=0.04, adaptive=False,
                           kl_estimator="k3", eps_low=0.2, eps_high=0.2, loss_aggregation="token_mean",
                           temperature=1.0, logprob_chunk_size=args.chunk)
        tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-6, weight_decay=0.0))
        update = jax.jit(make_rl_update(graphdef, tx, opts, None), donate_argnums=(0, 1))
        state = [jax.tree.map(jnp.copy, params), None]
        state[1] = tx.init(state[0])
        key = jax.random.key(0)

        def our_step():
            out = update(state[0], state[1], frozen, batch, key)
            jax.block_until_ready(out)
            state[0], state[1] = out[0], out[1]

        if args.skip_train:
            our_step = lambda: None  # noqa: E731
        t0 = time.perf_counter()
        our_step()
        our_compile = time.perf_counter() - t0

        opt = trainer.optimizer

        def trl_step():
            loss = trainer.compute_loss(model, inputs)
            trainer.accelerator.backward(loss)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        if args.skip_train:
            trl_step = lambda: None  # noqa: E731
        t0 = time.perf_counter()
        trl_step()
        trl_first = time.perf_counter() - t0
        our_step()  # second warm-up call each
        trl_step()
        t_ours, t_trl = [], []
        for r in range(args.reps):
            for name in (("ours", "trl") if r % 2 == 0 else ("trl", "ours")):
                t0 = time.perf_counter()
                (our_step if name == "ours" else trl_step)()
                (t_ours if name == "ours" else t_trl).append(time.perf_counter() - t0)
        step_tokens = b * (p + n_actual)
        result["train"] = dict(tokens=step_tokens, completion_tokens=int(lengths.sum()), ours_compile_s=our_compile,
                               trl_first_call_s=trl_first, ours_s=float(np.median(t_ours)),
                               trl_s=float(np.median(t_trl)), ours_times=t_ours, trl_times=t_trl)
        if args.skip_train:
            result["train"] = None
        log(f"train: {result['train']}")

        # ---------------- generation ----------------
        gen_ids = prompt_ids  # [b, p] (each prompt g times), no padding
        gen_mask = torch.ones_like(gen_ids)
        gen_cfg = trainer.generation_config
        model.eval()

        def trl_generate():
            with torch.no_grad():
                out = model.generate(input_ids=gen_ids, attention_mask=gen_mask, generation_config=gen_cfg)
            comp = out[:, p:]
            is_eos = comp == EOS
            first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.tensor(comp.shape[1]))
            return int(first.sum())

        sampling = SamplingConfig(max_new_tokens=n, temperature=1.0, eos_token_ids=(EOS,), pad_token_id=PAD)
        j_ids, j_mask = jnp.asarray(gen_ids.numpy().astype(np.int32)), jnp.ones((b, p), bool)
        counter = [0]

        def make_our_generate(impl):
            m = ours if impl == ours.config.attention_impl else load_pretrained(
                model_dir, config_overrides={"attention_impl": impl})
            gen_graphdef, gen_state = nnx.split(m)
            gen_fn = jax.jit(make_generate_fn(gen_graphdef, sampling))

            def our_generate():
                counter[0] += 1
                out = gen_fn(gen_state, j_ids, j_mask, jax.random.key(counter[0]))
                jax.block_until_ready(out.tokens)
                return int(np.asarray(out.lengths).sum())
            return our_generate

        runners, gen_compiles = {"trl": trl_generate}, {}
        for impl in gen_impls:
            runners[impl] = make_our_generate(impl)
            t0 = time.perf_counter()
            runners[impl]()
            gen_compiles[impl] = time.perf_counter() - t0
        trl_generate()
        times = {k: [] for k in runners}
        toks = {k: [] for k in runners}
        for r in range(args.reps):
            order = list(runners) if r % 2 == 0 else list(runners)[::-1]
            for name in order:
                t0 = time.perf_counter()
                k = runners[name]()
                times[name].append(time.perf_counter() - t0)
                toks[name].append(k)
        rate = lambda k: float(np.median(np.array(toks[k]) / np.array(times[k])))  # noqa: E731
        first = gen_impls[0]
        result["generate"] = dict(ours_compile_s=gen_compiles[first], ours_s=float(np.median(times[first])),
                                  trl_s=float(np.median(times["trl"])), ours_tokens_per_s=rate(first),
                                  trl_tokens_per_s=rate("trl"), ours_tokens=toks[first], trl_tokens=toks["trl"],
                                  per_impl={k: dict(s=float(np.median(times[k])), times=times[k],
                                                    tokens_per_s=rate(k), compile_s=gen_compiles[k])
                                            for k in gen_impls})
        log(f"generate: {result['generate']}")

    tr, ge = result["train"], result["generate"]
    n_params = sum(x.size for x in jax.tree.leaves(params))
    xla_threads = "1 thread" if args.threads == 1 else f"{os.cpu_count()} threads"
    print(f"**Machine:** {machine()}; XLA {xla_threads}; torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers "
          f"{transformers.__version__}, trl {trl.__version__}  ")
    print(f"**Model:** LlamaConfig(vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, "
          f"{hf_cfg.num_attention_heads} heads / {hf_cfg.num_key_value_heads} kv, untied), {n_params / 1e6:.2f}M "
          f"params, float32, random init; same weights on both sides (max |logp diff| {result['max_abs_logp_diff']:.1e})  ")
    print(f"**Batch:** {args.prompts} prompts x {g} completions = {b} rows, prompt {p} tokens, {n_actual} completion "
          f"slots ({int(lengths.sum())} completion tokens); beta 0.04, k3 KL, token-mean loss, AdamW + clip 1.0; "
          f"medians of {args.reps} interleaved calls after warm-up\n")
    print("| | ours (JAX, jitted) | TRL GRPOTrainer (torch) | ours / TRL speed |")
    print("|---|---:|---:|---:|")
    if tr is not None:
        print(f"| train step: log-probs + backward + update (s) | {tr['ours_s']:.3f} | {tr['trl_s']:.3f} | "
              f"**{tr['trl_s'] / tr['ours_s']:.2f}x** |")
        print(f"| train step tokens/s ({tr['tokens']} tokens) | {tr['tokens'] / tr['ours_s']:,.0f} | "
              f"{tr['tokens'] / tr['trl_s']:,.0f} | |")
    for impl, st in ge["per_impl"].items():
        print(f"| generation, attention_impl={impl!r}: {b} x {n} new tokens (s) | {st['s']:.3f} | {ge['trl_s']:.3f} | "
              f"**{ge['trl_s'] / st['s']:.2f}x** |")
        print(f"| generation tokens/s ({impl!r}) | {st['tokens_per_s']:,.0f} | {ge['trl_tokens_per_s']:,.0f} | |")
    if tr is not None:
        print(f"| compile / first call, train step (s) | {tr['ours_compile_s']:.1f} (compile) | "
              f"{tr['trl_first_call_s']:.2f} (first call) | |")
    print(f"| compile, generation (s) | {ge['ours_compile_s']:.1f} | - | |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return result


if __name__ == "__main__":
    main()

"""Gemma 2 / Gemma 3 (text): parity with transformers (logits, greedy, sampled log-probs), exact checkpoint round trip,
every attention implementation, the 256k vocabulary through the chunked log-probs, chat template and stop tokens."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adrpo_jax.models.llm import (CausalLM, DecoderConfig, generate, load_pretrained, save_pretrained,
                                  token_logprobs)
from tests.models.llm.families import hf_greedy, hf_logits, hf_state, padded_batch, tiny_hf

pytest.importorskip("torch")
FAMILIES = ("gemma2", "gemma3")
_forward = jax.jit(lambda m, t, a: m(t, attention_mask=a))


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers_on_left_padded_batch(name):
  tiny = tiny_hf(name)
  model = load_pretrained(tiny.path)
  cfg = model.config
  assert cfg.norm_unit_offset and cfg.scale_embeddings and cfg.sandwich_norm and cfg.tie_word_embeddings
  if name == "gemma2":
    assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping, cfg.rope_local_theta) == (5.0, 3.0, None)
  else:
    assert cfg.qk_norm and cfg.rope_local_theta == 1e4 and cfg.rope_scaling_dict["factor"] == 4.0
  tokens, mask = padded_batch()
  ours = np.asarray(_forward(model, jnp.asarray(tokens), jnp.asarray(mask)))
  ref = hf_logits(tiny, tokens, mask)
  assert np.abs(ours - ref)[mask].max() < 1e-4, np.abs(ours - ref)[mask].max()
  if name == "gemma2":  # the final soft-cap is active: |logits| < 3
    assert np.abs(ours).max() < 3.0 and np.abs(ours).max() > 2.0


@pytest.mark.slow  # sampler compilations and HF generate
@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_continuation_identical_and_sampled_logprobs(name):
  tiny = tiny_hf(name)
  model = load_pretrained(tiny.path)
  tokens, mask = padded_batch()
  out = generate(model, tokens, mask, greedy=True, max_new_tokens=8)  # past the window of 4: sliding layers act
  np.testing.assert_array_equal(np.asarray(out.completions), hf_greedy(tiny, tokens, mask, 8))
  sampled = generate(model, tokens, mask, rng=jax.random.key(3), temperature=0.9, max_new_tokens=8)
  logp = token_logprobs(model, sampled.tokens, sampled.attention_mask, temperature=0.9)[:, tokens.shape[1]:]
  valid = np.asarray(sampled.completion_mask)
  np.testing.assert_allclose(np.asarray(logp)[valid], np.asarray(sampled.logprobs)[valid], atol=2e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_hf_round_trip_is_exact(name, tmp_path):
  transformers = pytest.importorskip("transformers")
  tiny = tiny_hf(name)
  model = load_pretrained(tiny.path)
  save_pretrained(model, tmp_path / "out")
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  assert type(back).__name__ == type(tiny.torch_model).__name__
  ref, got = hf_state(tiny), {k: v.detach().float().numpy() for k, v in back.state_dict().items()}
  assert set(got) == set(ref)
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
  assert back.config.layer_types == tiny.torch_model.config.layer_types
  assert back.config.rope_parameters == tiny.torch_model.config.rope_parameters


def test_multimodal_gemma3_checkpoint_loads_its_language_model(tmp_path):
  """A `gemma3` (image-text) checkpoint: its text_config and `language_model.model.*` tensors (hub layout) load
  as the text model; the vision tower's tensors are skipped."""
  import json
  import shutil

  from adrpo_jax.models.llm.checkpoint import SafetensorsFile, write_safetensors

  tiny = tiny_hf("gemma3")
  src = SafetensorsFile(tiny.path / "model.safetensors")
  arrays = {n.replace("model.", "language_model.model.", 1): np.array(src.get(n)) for n in src.names()}
  arrays["vision_tower.vision_model.post_layernorm.weight"] = np.ones(4, np.float32)
  (tmp_path / "mm").mkdir()
  write_safetensors(tmp_path / "mm" / "model.safetensors", [(n, a.shape, a.dtype) for n, a in arrays.items()],
                    arrays.__getitem__)
  text = json.loads((tiny.path / "config.json").read_text())
  (tmp_path / "mm" / "config.json").write_text(json.dumps(
      {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "text_config": text,
       "vision_config": {"model_type": "siglip_vision_model"}}))
  a, b = load_pretrained(tiny.path), load_pretrained(tmp_path / "mm")
  assert a.config == b.config
  for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  shutil.rmtree(tmp_path / "mm")


@pytest.mark.parametrize("impl", ["xla", "chunked", "splash"])
def test_every_attention_implementation_matches_transformers(impl):
  """Soft-capped (Gemma 2) attention with alternating sliding windows through each implementation (splash in
  Pallas interpret mode: prefill), and the cached decode path (decode implementation) against the full pass."""
  tiny = tiny_hf("gemma2")
  model = load_pretrained(tiny.path, config_overrides={"attention_impl": impl, "attention_chunk_size": 4})
  tokens, mask = padded_batch()
  if impl == "splash":
    from adrpo_jax.models.llm import attention as attn

    def fn(m, t, a):
      real = attn.splash_attention
      attn.splash_attention = lambda *args, **kw: real(*args, **{**kw, "interpret": True})
      try:
        return m(t, attention_mask=a)
      finally:
        attn.splash_attention = real
    ours = np.asarray(jax.jit(fn)(model, jnp.asarray(tokens), jnp.asarray(mask)))
  else:
    ours = np.asarray(_forward(model, jnp.asarray(tokens), jnp.asarray(mask)))
  ref = hf_logits(tiny, tokens, mask)
  assert np.abs(ours - ref)[mask].max() < 1e-4


def test_cached_decode_equals_full_forward_with_two_ropes():
  """Gemma 3's local and global rope bases and windows through the KV-cached path (decode implementation over a
  stacked cache) equal the full pass."""
  model = load_pretrained(tiny_hf("gemma3").path, config_overrides={"attention_impl": "decode"})
  tokens, mask = padded_batch(rows=2, length=12)
  full = np.asarray(_forward(model, jnp.asarray(tokens), jnp.asarray(mask)))

  @jax.jit
  def step(m, t, a, cache):
    return m(t, attention_mask=a, cache=cache)

  cache = model.init_cache(2, 16)
  outs = []
  for lo, hi in [(0, 7)] + [(i, i + 1) for i in range(7, 12)]:
    logits, cache = step(model, jnp.asarray(tokens[:, lo:hi]), jnp.asarray(mask[:, lo:hi]), cache)
    outs.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(outs, 1)[mask], full[mask], atol=2e-5)


@pytest.mark.slow  # ~8 s: the default suite's 10-minute budget (the chunk-width rule is tested in test_logprobs)
def test_gemma_vocabulary_log_probs_are_chunked():
  """A 262,144-token vocabulary (Gemma 3's) through token_logprobs: equal to the direct log-softmax, and the
  compiled program's temporaries stay far below one [B, T, V] float32 logits array."""
  cfg = DecoderConfig(vocab_size=262_144, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, head_dim=8, model_type="gemma3_text", tie_word_embeddings=True,
                      qk_norm=True, norm_unit_offset=True, scale_embeddings=True, sandwich_norm=True,
                      query_pre_attn_scalar=8, rope_local_theta=1e4, sliding_window=4,
                      layer_types=("sliding_attention",))
  graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype),
                                               nnx.to_pure_dict(state)))
  model = nnx.merge(graphdef, state)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 96)), jnp.int32)
  fn = jax.jit(lambda m, t: token_logprobs(m, t, chunk_size=16))  # [2, 8, V] float32 chunks: 16.8 MB
  full_bytes = 2 * 96 * cfg.vocab_size * 4  # one [B, T, V] float32 array: 201 MB
  temp = fn.lower(model, tokens).compile().memory_analysis().temp_size_in_bytes
  assert temp < full_bytes / 4, (temp, full_bytes)
  logp = np.asarray(fn(model, tokens))
  logits = np.asarray(jax.jit(lambda m, t: m(t))(model, tokens), np.float64)
  ref = logits - logits.max(-1, keepdims=True)
  ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
  ref = np.take_along_axis(ref[:, :-1], np.asarray(tokens)[:, 1:, None], -1)[..., 0]
  np.testing.assert_allclose(logp[:, 1:], ref, atol=1e-4)


def test_bfloat16_embedding_scale_and_norm_numerics():
  """sqrt(D) is applied in the compute dtype (bf16: 55.4256 -> 55.5 for D = 3072, as transformers) and (1 + w) norms
  compute in float32 before the cast."""
  from adrpo_jax.models.llm.modeling import RMSNorm

  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8)), jnp.bfloat16)
  with nnx.use_eager_sharding(False):
    norm = RMSNorm(8, eps=1e-6, dtype=jnp.bfloat16, param_dtype=jnp.float32, unit_offset=True)
  norm.weight[...] = jnp.full((8,), 0.5)
  x32 = np.asarray(x, np.float32)
  expected = (x32 / np.sqrt((x32 ** 2).mean(-1, keepdims=True) + 1e-6) * 1.5).astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(norm(x)), np.asarray(expected))
  assert float(jnp.asarray(3072 ** 0.5, jnp.bfloat16)) == 55.5


def test_chat_template_and_stop_tokens(tmp_path):
  """Gemma's chat template through the tokenizer: BOS written by the template (so no second BOS from
  add_special_tokens), `<end_of_turn>` a stop token, and a system prompt folded into the first user turn when the
  template refuses a system role (Gemma 2's)."""
  tokenizers = pytest.importorskip("tokenizers")
  transformers = pytest.importorskip("transformers")
  from adrpo_jax.rl.rollout import PromptEncoder, stop_token_ids

  specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
  words = ["user", "model", "what", "is", "2+2", "be", "brief", "\n"]
  vocab = {t: i for i, t in enumerate(specials + words)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"<[a-z_]+>|\n| "), behavior="isolated")
  template = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
              "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'assistant') %}"
              "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + "
              "role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt "
              "%}{{'<start_of_turn>model\n'}}{% endif %}")  # Gemma 2's template
  hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                                pad_token="<pad>", unk_token="<unk>",
                                                additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
  hf_tok.chat_template = template
  assert vocab["<end_of_turn>"] in stop_token_ids(hf_tok)
  enc = PromptEncoder(hf_tok, 24, chat_template=True, system_prompt="be brief")
  text = enc.render("what is 2+2")
  assert text.startswith("<bos><start_of_turn>user\nbe brief\n\nwhat is 2+2<end_of_turn>\n<start_of_turn>model\n")
  ids, mask, _ = enc.encode(["what is 2+2"])
  assert list(ids[0][mask[0]]).count(vocab["<bos>"]) == 1


@pytest.mark.parametrize("name,layers,scale", [("gemma-3-12b", 48, 256 ** -0.5), ("gemma-3-27b", 62, 168 ** -0.5)])
def test_gemma3_presets_build_abstractly(name, layers, scale):
  from adrpo_jax.models.llm.presets import abstract_model

  model = abstract_model(name)
  cfg = model.config
  assert cfg.num_hidden_layers == layers and cfg.attention_scale == scale and cfg.vocab_size == 262_208
  assert cfg.layer_types[:6] == ("sliding_attention",) * 5 + ("full_attention",) and cfg.sliding_window == 1024
  assert cfg.rope_theta == 1e6 and cfg.rope_local_theta == 1e4 and cfg.eos_token_id == (1, 106)
  assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == cfg.num_params()

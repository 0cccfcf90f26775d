"""Issue 28 item 16: a cached call that would write past the end of the KV cache raises (concrete index);
on main the write was clamped onto the last slots and the logits were off by up to 0.87, without an error."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from adrpo_jax.models.llm import DecoderConfig
from tests.models.llm.conftest import numpy_model

CFG = DecoderConfig(vocab_size=61, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_writing_past_the_cache_end_raises(scan_layers):
  model = numpy_model(CFG.replace(scan_layers=scan_layers))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 9)), jnp.int32)
  cache = dataclasses.replace(model.init_cache(2, 8), index=jnp.asarray(6, jnp.int32))  # 6 slots written
  with pytest.raises(ValueError, match=r"6 of its 8 slots written: 3 more tokens would write past its end.*at "
                                       r"least 9 slots"):
    model(tokens[:, 6:9], cache=cache)
  model._check_inputs(tokens[:, 6:8], None, None, cache)  # exactly full: fine (the check alone, no forward)
  full = dataclasses.replace(cache, index=jnp.asarray(8, jnp.int32))
  with pytest.raises(ValueError, match="8 of its 8 slots"):
    model(tokens[:, 8:9], cache=full)

"""``rl.coefficient_sign`` from the configs through the step options to the loss's coefficient (LLM and flow)."""

import numpy as np
import pytest

from adrpo_jax import losses
from adrpo_jax.flow.config import COEFFICIENT_SIGNS as FLOW_SIGNS
from adrpo_jax.flow.config import add_flow_config, validate_flow_config
from adrpo_jax.flow.step import FlowStepOptions
from adrpo_jax.rl.config import COEFFICIENT_SIGNS as RL_SIGNS
from adrpo_jax.rl.config import add_llm_config, validate_llm_config
from adrpo_jax.rl.step import StepOptions
from adrpo_jax.train.config import ConfigError, common_config


def llm_config(**rl):
    config = add_llm_config(common_config())
    config.model.path = "builtin:tiny_arith"
    for k, v in rl.items():
        config.rl[k] = v
    return config


def flow_config(**rl):
    config = add_flow_config(common_config())
    for k, v in rl.items():
        config.rl[k] = v
    return config


def test_sign_lists_agree_with_the_losses():
    assert RL_SIGNS == FLOW_SIGNS == losses.COEFFICIENT_SIGNS == ("adrpo", "crd")


@pytest.mark.parametrize("sign", ["adrpo", "crd"])
def test_llm_options_carry_the_sign_to_the_coefficient(sign):
    config = llm_config(coefficient_sign=sign, beta=0.3)
    validate_llm_config(config)
    opts = StepOptions.from_config(config)
    assert opts.coefficient_sign == sign and opts.coefficient_kwargs()["coefficient_sign"] == sign
    adv = np.array([-1.0, -0.1, 0.0, 0.2, 2.0], np.float32)
    m = losses.coefficient_metrics(adv, opts.beta, **opts.coefficient_kwargs())
    s = 1.0 if sign == "adrpo" else -1.0
    np.testing.assert_allclose(m["beta_eff_mean"], np.mean(0.3 - s * np.clip(adv, -0.3, 0.3)), rtol=1e-6)
    assert StepOptions.from_config(llm_config()).coefficient_sign == "adrpo"  # the default: the paper's sign


@pytest.mark.parametrize("sign", ["adrpo", "crd"])
def test_flow_options_carry_the_sign_to_the_coefficient(sign):
    config = flow_config(coefficient_sign=sign, beta=1.0)
    validate_flow_config(config)
    opts = FlowStepOptions.from_config(config, num_conditions=20, null_class=20, image_shape=(8, 8, 1))
    assert opts.coefficient_sign == sign and opts.coefficient_kwargs()["coefficient_sign"] == sign
    adv = np.array([-5.0, -0.5, 0.0, 0.5, 2.0], np.float32)
    m = losses.coefficient_metrics(adv, opts.loss_beta, **opts.coefficient_kwargs())
    s = 1.0 if sign == "adrpo" else -1.0
    np.testing.assert_allclose(m["beta_eff_mean"], np.mean(1.0 - s * np.clip(adv, -1.0, 1.0)), rtol=1e-6)


def test_bad_or_inert_sign_is_a_config_error_naming_the_key():
    for config, validate in ((llm_config(coefficient_sign="+1"), validate_llm_config),
                             (flow_config(coefficient_sign="reverse"), validate_flow_config)):
        with pytest.raises(ConfigError, match="rl.coefficient_sign") as err:
            validate(config)
        assert err.value.key == "rl.coefficient_sign"
    # the sign of a coefficient without an adaptive term would be silently ignored: refused
    with pytest.raises(ConfigError, match="rl.adaptive") as err:
        validate_llm_config(llm_config(coefficient_sign="crd", adaptive=False))
    assert err.value.key == "rl.coefficient_sign"
    with pytest.raises(ConfigError, match="rl.method") as err:
        validate_flow_config(flow_config(coefficient_sign="crd", method="fixed_beta"))
    assert err.value.key == "rl.coefficient_sign"
    with pytest.raises(ValueError, match="coefficient_sign"):
        StepOptions(group_size=2, prompt_length=4, max_new_tokens=4, coefficient_sign="CRD")
    with pytest.raises(ValueError, match="coefficient_sign"):
        FlowStepOptions(num_conditions=2, null_class=2, image_shape=(8, 8, 1), coefficient_sign=-1)

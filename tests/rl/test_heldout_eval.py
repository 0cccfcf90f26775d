"""The arithmetic eval problems are held out: distinct, and never in the RL training prompt stream."""

import pytest

from adrpo_jax.rl.config import add_llm_config
from adrpo_jax.rl.data import PromptIterator, distinct_examples, make_eval_examples, make_prompt_source
from adrpo_jax.rl.tasks import ArithmeticTask
from adrpo_jax.train.config import common_config


def arith_config(seed=0, min_digits=1, max_digits=2, n=256):
    config = add_llm_config(common_config())
    config.seed = seed
    config.eval.num_examples = n
    config.data.arithmetic.min_digits = min_digits
    config.data.arithmetic.max_digits = max_digits
    return config


def training_prompts(config, steps, prompts_per_step=16):
    it = PromptIterator(make_prompt_source(config), prompts_per_step, group_size=1)
    return [row["prompt"] for _ in range(steps) for row in it.next_rows()]


@pytest.mark.parametrize("seed,digits", [(0, (1, 2)), (3, (1, 2)), (1, (2, 3))])
def test_eval_problems_are_distinct_and_never_trained_on(seed, digits):
    config = arith_config(seed, *digits)
    held_out = [ex["prompt"] for ex in make_eval_examples(config)]
    assert len(held_out) == len(set(held_out)) == 256
    seen = training_prompts(config, steps=300)  # a whole 300-step run: 4,800 prompts
    assert not set(seen) & set(held_out)  # overlap 0 (was 173-178 of 256 on 1-2 digits before the exclusion)


def test_empty_exclude_is_the_original_stream_and_redraws_stay_deterministic():
    plain = ArithmeticTask(seed=5)
    assert [plain[i] for i in range(300)] == [ArithmeticTask(seed=5, exclude=())[i] for i in range(300)]
    banned = frozenset(plain[i]["prompt"] for i in range(0, 300, 3))
    task = ArithmeticTask(seed=5, exclude=banned)
    exs = [task[i] for i in range(300)]
    assert exs == [ArithmeticTask(seed=5, exclude=set(banned))[i] for i in range(300)]  # pure of (seed, index)
    assert not {ex["prompt"] for ex in exs} & banned
    kept = [i for i in range(300) if plain[i]["prompt"] not in banned]
    assert all(exs[i] == plain[i] for i in kept)  # only the hits are redrawn
    assert all(int(ex["answer"]) == eval(ex["prompt"][:-1]) for ex in exs)


def test_exclusion_errors():
    everything = frozenset(f"{a}+{b}=" for a in range(10) for b in range(10))
    with pytest.raises(ValueError, match="exclude"):
        ArithmeticTask(min_digits=1, max_digits=1, exclude=everything)[0]
    with pytest.raises(ValueError, match="exclude"):
        ArithmeticTask(exclude="1+1=")
    with pytest.raises(ValueError, match="distinct problems"):
        distinct_examples(ArithmeticTask(min_digits=1, max_digits=1), 101)  # only 100 one-digit sums exist

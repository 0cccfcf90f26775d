import pytest

from adrpo_jax.rl.tasks import (ArithmeticTask, build_char_tokenizer, exact_match_reward, final_number_reward,
                                format_reward, parse_final_number)


def test_problems_are_deterministic_and_correct():
    task = ArithmeticTask(min_digits=1, max_digits=3, operations=("+", "-", "*"), seed=7)
    again = ArithmeticTask(min_digits=1, max_digits=3, operations=("+", "-", "*"), seed=7)
    other = ArithmeticTask(min_digits=1, max_digits=3, operations=("+", "-", "*"), seed=8)
    exs = [task[i] for i in range(200)]
    assert exs == [again[i] for i in range(200)]
    assert exs != [other[i] for i in range(200)]
    for ex in exs:
        assert ex["prompt"].endswith("=")
        assert int(ex["answer"]) == eval(ex["prompt"][:-1])  # noqa: S307 - our own digits and operators
        assert int(ex["answer"]) >= 0
    assert {ex["prompt"][len(ex["prompt"]) // 2] for ex in exs}  # not all identical
    assert len({ex["prompt"] for ex in exs}) > 150


def test_word_problems_carry_their_answer():
    task = ArithmeticTask(style="word", operations=("+", "-", "*"), seed=1)
    for i in range(50):
        ex = task[i]
        numbers = [int(n) for n in __import__("re").findall(r"\d+", ex["prompt"])]
        a, b = numbers[:2]
        assert int(ex["answer"]) in (a + b, a - b, a * b)
        assert ex["prompt"].endswith("Answer with just the number.")


@pytest.mark.parametrize("kwargs, match", [
    (dict(min_digits=0), "min_digits"), (dict(max_digits=0), "max_digits"),
    (dict(operations=("/",)), "operations"), (dict(style="poem"), "style")])
def test_bad_task_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ArithmeticTask(**kwargs)


def test_rewards():
    comps = ["12", " 12 ", "13", "12 apples", "", "-3"]
    assert exact_match_reward(None, comps, answer=["12"] * 5 + ["-3"]) == [1, 1, 0, 0, 0, 1]
    assert format_reward(None, comps) == [1, 1, 1, 0, 0, 1]
    assert final_number_reward(None, ["so 1,200 total", "x is 4 then 5", "none"], answer=[1200, "5", "0"]) == [1, 1, 0]
    assert parse_final_number("a -7 b") == "-7" and parse_final_number("none") is None
    with pytest.raises(ValueError, match="answer"):
        exact_match_reward(None, ["1"])
    with pytest.raises(ValueError, match="answer has 2"):
        exact_match_reward(None, ["1"], answer=["1", "2"])


def test_char_tokenizer_round_trips_offline(tmp_path):
    from transformers import AutoTokenizer
    build_char_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "123+45=168"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.decode(ids + [tok.eos_token_id, tok.pad_token_id], skip_special_tokens=True) == text

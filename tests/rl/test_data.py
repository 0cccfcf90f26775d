"""Prompt sources (arithmetic, GSM8K-style jsonl) and the deterministic, resumable, per-process iterator."""

import numpy as np
import pytest

from adrpo_jax.rl.data import JsonlPromptSource, PromptIterator, columns_of, parse_gsm8k_answer
from adrpo_jax.rl.rollout import PromptEncoder, stop_token_ids
from adrpo_jax.rl.tasks import ArithmeticTask, build_char_tokenizer
from tests.rl.conftest import write_jsonl


def test_gsm8k_answers():
    assert parse_gsm8k_answer("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
    assert parse_gsm8k_answer("x #### 1 #### -3,500") == "-3500"
    assert parse_gsm8k_answer("#### 12.") == "12"
    with pytest.raises(ValueError, match="no '####'"):
        parse_gsm8k_answer("72")


def test_jsonl_source(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q1?", "answer": "so 3\n#### 3", "level": 2},
                                              {"question": "q2?", "answer": "#### 1,000"}])
    src = JsonlPromptSource(path)
    assert len(src) == 2 and src[0] == {"level": 2, "prompt": "q1?", "answer": "3", "solution": "so 3\n#### 3",
                                        "index": 0}
    assert src[1]["answer"] == "1000"
    raw = JsonlPromptSource(path, answer_format="raw")
    assert raw[1]["answer"] == "#### 1,000"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing field 'answer'"):
        JsonlPromptSource(bad)
    (tmp_path / "bad2.jsonl").write_text('{"question": "q", "answer": "no marker"}\n')
    with pytest.raises(ValueError, match=r"bad2.jsonl:1: no '####'"):
        JsonlPromptSource(tmp_path / "bad2.jsonl")


def test_iterator_groups_resume_and_process_slices(tmp_path):
    task = ArithmeticTask(seed=3)
    it = PromptIterator(task, num_prompts=4, group_size=3)
    first = it.next_rows()
    assert len(first) == 12 and all(first[3 * j]["prompt"] == first[3 * j + 2]["prompt"] for j in range(4))
    assert [first[3 * j]["index"] for j in range(4)] == [0, 1, 2, 3]
    state = it.get_state()
    second = it.next_rows()
    resumed = PromptIterator(task, num_prompts=4, group_size=3)
    resumed.set_state(state)
    assert resumed.next_rows() == second
    # Two "processes" feeding rows [0, 6) and [6, 12): together exactly the global batch, groups straddling.
    halves = [PromptIterator(task, 4, 3, rows=slice(0, 5)), PromptIterator(task, 4, 3, rows=slice(5, 12))]
    assert halves[0].next_rows() + halves[1].next_rows() == first


def test_jsonl_epochs_are_reshuffled_deterministically(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(5)])
    src = JsonlPromptSource(path)
    it = PromptIterator(src, num_prompts=5, seed=1)
    e0 = [r["index"] for r in it.next_rows()]
    e1 = [r["index"] for r in it.next_rows()]
    assert sorted(e0) == sorted(e1) == list(range(5)) and e0 != e1
    again = PromptIterator(src, num_prompts=5, seed=1)
    again.set_state({"position": 5})
    assert [r["index"] for r in again.next_rows()] == e1
    assert [r["index"] for r in PromptIterator(src, 5, shuffle=False).next_rows()] == list(range(5))


def test_columns_of():
    assert columns_of([{"prompt": "a", "answer": "1", "x": 1}, {"prompt": "b", "answer": "2"}]) == {"answer": ["1", "2"]}


def test_prompt_encoder_pads_truncates_and_decodes():
    tok = build_char_tokenizer()
    enc = PromptEncoder(tok, 6, prompt_template="Q{prompt}")
    with pytest.raises(ValueError, match="chat template"):
        PromptEncoder(tok, 6, chat_template=True)
    tokens, mask, truncated = enc.encode(["1+1=", "12+34="])
    assert tokens.shape == (2, 6) and mask[0].tolist() == [False, True, True, True, True, True]
    assert truncated.tolist() == [False, True]  # "Q12+34=" is 7 > 6 chars: left-truncated
    assert tok.decode(tokens[1][mask[1]].tolist()) == "12+34="
    assert enc.decode(np.array([[5, 2, 0], [6, 6, 6]]), [2, 3]) == ["1", "222"]
    assert stop_token_ids(tok) == (2,)

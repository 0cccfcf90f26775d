"""Issue 28 items 18 and 20: jsonl rows with null / non-string answers are refused at load (file and line);
check_data(config) validates the data files before any model is loaded, with one line naming the setting."""

import logging

import pytest

from adrpo_jax.rl import config as config_lib
from adrpo_jax.rl.data import JsonlPromptSource, check_data
from adrpo_jax.train.config import ConfigError, common_config
from tests.rl.conftest import write_jsonl


@pytest.mark.parametrize("answer, shown", [(None, r"None \(null\)"), (True, r"True \(bool\)"), ([1], r"\[1\] \(list\)"),
                                           (2.5, r"2.5 \(float\)"), ({"a": 1}, "dict")])
def test_null_and_non_string_answers_are_refused(tmp_path, answer, shown):
  path = write_jsonl(tmp_path / "d.jsonl", [{"question": "1+1=", "answer": "2"}, {"question": "2+2=", "answer": answer}])
  with pytest.raises(ValueError, match=rf"d.jsonl:2: field 'answer' \(data.answer_key\) must be a string .*{shown}"):
    JsonlPromptSource(path, answer_format="raw")


def test_integer_answers_and_bad_prompts(tmp_path):
  path = write_jsonl(tmp_path / "d.jsonl", [{"question": "1+1=", "answer": 2}])
  assert JsonlPromptSource(path, answer_format="raw")[0]["answer"] == "2"
  path = write_jsonl(tmp_path / "p.jsonl", [{"question": None, "answer": "2"}])
  with pytest.raises(ValueError, match=r"p.jsonl:1: field 'question' \(data.prompt_key\) must be a non-empty string"):
    JsonlPromptSource(path, answer_format="raw")


def test_bad_rows_are_listed_together_or_skipped(tmp_path, caplog):
  rows = [{"question": "a", "answer": "1"}, {"question": "b", "answer": None}, "not json",
          {"question": "c"}, {"question": "d", "answer": "4"}]
  path = tmp_path / "d.jsonl"
  path.write_text("\n".join(r if isinstance(r, str) else __import__("json").dumps(r) for r in rows) + "\n")
  with pytest.raises(ValueError, match=r"3 bad rows of 5 in .*d.jsonl:2: .*d.jsonl:3: invalid JSON.*d.jsonl:4: "
                                       r"missing field 'answer'.*data.on_bad_row=skip"):
    JsonlPromptSource(path, answer_format="raw")
  with caplog.at_level(logging.WARNING):
    src = JsonlPromptSource(path, answer_format="raw", on_bad_row="skip")
  assert [src[i]["prompt"] for i in range(len(src))] == ["a", "d"] and src.num_skipped == 3
  assert [src[i]["index"] for i in range(2)] == [0, 1] and "skipped 3 bad row(s) of 5" in caplog.text


def _config(tmp_path, **data):
  config = config_lib.add_llm_config(common_config())
  config.data.source = "jsonl"
  config.data.path = str(tmp_path / "train.jsonl")
  config.eval.path = str(tmp_path / "eval.jsonl")
  for k, v in data.items():
    setattr(config.data, k, v)
  return config


def test_check_data_names_the_setting_to_change(tmp_path):
  write_jsonl(tmp_path / "eval.jsonl", [{"question": "q", "answer": "#### 1"}])
  write_jsonl(tmp_path / "train.jsonl", [{"prompt": "q", "answer": "#### 1"}])
  with pytest.raises(ConfigError, match=r"train.jsonl:1: missing field 'question' .*set --config.data.prompt_key=prompt")\
      as err:
    check_data(_config(tmp_path))
  assert err.value.key == "data.prompt_key" and "\n" not in str(err.value)
  write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "target": "1"}])
  with pytest.raises(ConfigError, match=r"missing field 'answer' .*set --config.data.answer_key=target") as err:
    check_data(_config(tmp_path))
  assert err.value.key == "data.answer_key"
  write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "42"}])
  with pytest.raises(ConfigError, match=r"no '####' .*set --config.data.answer_format=raw") as err:
    check_data(_config(tmp_path))
  assert err.value.key == "data.answer_format"
  write_jsonl(tmp_path / "eval.jsonl", [{"question": "q", "answer": "7"}])
  sources = check_data(_config(tmp_path, answer_format="raw"))
  assert sources["data.path"][0]["answer"] == "42" and sources["eval.path"][0]["answer"] == "7"
  write_jsonl(tmp_path / "eval.jsonl", [{"question": "q", "answer": "7"}, {"question": "r", "answer": None}])
  with pytest.raises(ConfigError, match=r"eval.jsonl:2: field 'answer'") as err:
    check_data(_config(tmp_path, answer_format="raw"))
  assert err.value.key == "eval.path"
  assert len(check_data(_config(tmp_path, answer_format="raw", on_bad_row="skip"))["eval.path"]) == 1
  config = _config(tmp_path)
  config.data.source = "arithmetic"
  assert check_data(config) == {}


def test_on_bad_row_is_a_validated_config_key(tmp_path):
  config = config_lib.add_llm_config(common_config())
  assert config.data.on_bad_row == "raise"
  config_lib.validate_llm_config(config)
  config.data.on_bad_row = "ignore"
  with pytest.raises(ConfigError, match="data.on_bad_row") as err:
    config_lib.validate_llm_config(config)
  assert err.value.key == "data.on_bad_row"

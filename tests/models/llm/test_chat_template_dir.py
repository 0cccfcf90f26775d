"""Issue 28 item 13: a checkpoint that keeps its chat template in the processor's chat_template.json (not in
the tokenizer files) still gets it from load_tokenizer."""

import json

import pytest

from adrpo_jax.models.llm import load_tokenizer
from adrpo_jax.models.llm.checkpoint import chat_template_from_directory
from adrpo_jax.rl.rollout import PromptEncoder
from adrpo_jax.rl.tasks import build_char_tokenizer

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer_dir(tmp_path):
  tok = build_char_tokenizer()
  tok.chat_template = None
  tok.save_pretrained(tmp_path)
  for name in ("chat_template.jinja",):
    (tmp_path / name).unlink(missing_ok=True)
  cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
  cfg.pop("chat_template", None)
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
  return tmp_path


def test_processor_chat_template_json_is_used(tmp_path):
  d = _tokenizer_dir(tmp_path)
  assert chat_template_from_directory(d) is None and not load_tokenizer(d).chat_template
  (d / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}))
  tok = load_tokenizer(d)
  assert tok.chat_template == TEMPLATE
  enc = PromptEncoder(tok, 64, chat_template=True, system_prompt="S")
  assert enc.render("1+1=") == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n1+1=<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("name, content", [
    ("chat_template.json", {"chat_template": [{"name": "tool_use", "template": "x"},
                                              {"name": "default", "template": TEMPLATE}]}),
    ("processor_config.json", {"processor_class": "Qwen2AudioProcessor", "chat_template": TEMPLATE}),
])
def test_other_template_locations(tmp_path, name, content):
  (tmp_path / name).write_text(json.dumps(content))
  assert chat_template_from_directory(tmp_path) == TEMPLATE

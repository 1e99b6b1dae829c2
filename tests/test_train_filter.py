"""Teacher filtering: k samples per problem through relax.generate, pass rates, kept rows, JSONL."""

import json

import jax
import jax.numpy as jnp
import numpy as np

import relax
from relax.data.synthetic import save_tokenizer
from relax.relay.config import RelayConfig, SamplingConfig
from relax.tokenizer import special_ids
from relax.train.config import FilterConfig
from relax.train.filter import filter_problems, pass_rates


def teacher_relay(tok, temperature=0.7):
    """The filter's decoding in these tests: 6 tokens, the teacher at top-p 0.95."""
    eos, pad = special_ids(tok)
    return RelayConfig(
        max_new_tokens=6,
        llm=SamplingConfig(temperature=temperature, top_p=0.95),
        eos_ids=eos,
        pad_id=pad,
    )


def tiny_model():
    """A random 1-layer model over the synthetic tokenizer's vocabulary, and its params."""
    model = relax.Model(
        relax.ModelConfig(
            family="qwen3",
            vocab_size=160,
            hidden_size=32,
            intermediate_size=64,
            num_layers=1,
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
            tie_embeddings=True,
        ),
        dtype=jnp.float32,
    )
    return model, model.init_params(jax.random.key(0))


def test_filter_keeps_problems_above_threshold(tmp_path):
    tok = relax.load_tokenizer(save_tokenizer(str(tmp_path / "tok")))
    model, params = tiny_model()
    problems = [
        {"question": f"Ann has {i} coins.", "answer": a}
        for i, a in enumerate(["yes", "no", "half", "yes"])
    ]
    calls = []

    def grade(text, answer):
        calls.append(answer)
        if answer == "half":  # right on every other sample of this problem
            return len([c for c in calls if c == "half"]) % 2 == 1
        return answer == "yes"

    out = tmp_path / "kept.jsonl"
    cfg = FilterConfig(
        k=4, batch_size=2, relay=teacher_relay(tok), output=str(out), min_pass_rate=0.0
    )
    kept = filter_problems(model, params, tok, problems, cfg, grade, progress=False)
    assert len(calls) == 16
    assert [p["answer"] for p in kept] == ["yes", "half", "yes"]
    np.testing.assert_allclose([p["pass_rate"] for p in kept], [1.0, 0.5, 1.0])
    with open(out) as f:
        rows = [json.loads(line) for line in f]
    assert rows == kept
    with open(str(out) + ".all.jsonl") as f:
        all_rows = [json.loads(line) for line in f]
    assert [r["pass_rate"] for r in all_rows] == [1.0, 0.0, 0.5, 1.0]
    cfg2 = FilterConfig(k=4, batch_size=2, relay=teacher_relay(tok), output="", min_pass_rate=0.5)
    calls.clear()
    assert [
        p["answer"]
        for p in filter_problems(model, params, tok, problems, cfg2, grade, progress=False)
    ] == ["yes", "yes"]


def teacher_samples(tmp_path, temperature=0.7, **cfg):
    """The texts the filter grades for two problems x k = 4 with FilterConfig(**cfg), the
    teacher sampled at ``temperature``."""
    tok = relax.load_tokenizer(save_tokenizer(str(tmp_path / "tok")))
    model, params = tiny_model()
    problems = [{"question": f"Ann has {i} coins.", "answer": "1"} for i in range(2)]
    seen = []
    relay = teacher_relay(tok, temperature)
    cfg = FilterConfig(k=4, batch_size=2, relay=relay, output="", **cfg)
    pass_rates(model, params, tok, problems, cfg, lambda t, a: seen.append(t), progress=False)
    return seen


def test_filter_samples_with_the_teachers_temperature(tmp_path):
    """FilterConfig.relay.llm is the teacher's sampling: changing it changes the samples."""
    samples = lambda t: teacher_samples(tmp_path, temperature=t)
    assert len(samples(0.7)) == 8
    assert samples(0.7) == samples(0.7) and samples(0.7) != samples(2.0)


def test_filter_with_a_tensor_parallel_teacher(tmp_path):
    """mesh.model=2 (the teacher's 4 heads, 2 kv heads, MLP and vocabulary over two devices,
    rows over the other two) samples what the data-parallel filter samples."""
    from relax.mesh import MeshConfig

    tp = teacher_samples(tmp_path, mesh=MeshConfig(model=2))
    assert tp == teacher_samples(tmp_path, mesh=MeshConfig())


def test_self_solutions_keeps_graded_correct(tmp_path):
    """The warm-up source: the SLM's own samples, kept when the grader says correct."""
    from relax.relay.config import RelayConfig, SamplingConfig
    from relax.train.warmup import self_solutions

    tok = relax.load_tokenizer(save_tokenizer(str(tmp_path / "tok")))
    model, params = tiny_model()
    # the filter test's generation config and batch shape: one compilation for both tests
    gen = RelayConfig(
        max_new_tokens=6,
        eos_ids=tuple({tok.eos_token_id, tok.pad_token_id}),
        pad_id=tok.pad_token_id,
        slm=SamplingConfig(temperature=0.7, top_p=0.95),
    )
    problems = [{"question": f"Ann has {i} coins.", "answer": str(i)} for i in range(4)]
    rows = self_solutions(
        model,
        params,
        tok,
        problems,
        gen,
        lambda text, ans: ans in "13",
        jax.random.key(1),
        batch_size=2,
        samples=4,
    )
    assert [r["answer"] for r in rows] == ["1"] * 4 + ["3"] * 4
    assert all(isinstance(r["response"], str) for r in rows)

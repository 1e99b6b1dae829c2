"""The README's examples that say they run as tests do run, and do what they claim."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_example(name):
    text = open(os.path.join(ROOT, "README.md")).read()
    m = re.search(rf"<!-- readme-example: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"README example {name!r} not found"
    return m.group(1)


def test_relay_decoder_in_your_own_jax_code():
    code = readme_example("relay-in-jax")
    scope = {}
    exec(compile(code, "README.md:relay-in-jax", "exec"), scope)  # its asserts must hold
    out, share = scope["out"], scope["share"]
    assert out.tokens.shape == (8, 5 + 12) and 0.0 <= float(share) <= 1.0


def test_engine_in_your_own_jax_code():
    code = readme_example("engine-in-jax")
    scope = {}
    exec(compile(code, "README.md:engine-in-jax", "exec"), scope)  # its asserts must hold
    out, requests = scope["out"], scope["requests"]
    new = out.lengths - requests.prompt_lens
    assert out.tokens.shape == (10, 5 + 12) and bool(
        (new <= requests.settings.max_new_tokens).all()
    )

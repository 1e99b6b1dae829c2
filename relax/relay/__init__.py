"""Command automaton, sampling, the jitted relay decoder, and its eager reference.

- command.py    `CallCommand`: `<call>\\s*(\\d+)\\s*</call>` compiled into per-(state, token) tables.
- config.py     `RelayConfig`, `SamplingConfig` (frozen, static under jit).
- sampling.py   greedy / temperature / top-k / top-p, each returning (token, log-prob).
- loop.py       the loop state and one iteration (an LLM step and an SLM step).
- decoder.py    `relay_generate`, `generate`, `RelayOutput`: one jitted `lax.while_loop`.
- reference.py  the same protocol eagerly, without caches: the test oracle.
"""

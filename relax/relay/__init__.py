"""Command automaton, sampling, the jitted relay decoder, and its eager reference.

- command.py    `CallCommand`: `<call>\\s*(\\d+)\\s*</call>` compiled into per-(state, token) tables.
- config.py     `RelayConfig`, `SamplingConfig` (frozen, static under jit).
- sampling.py   greedy / temperature / top-k / top-p, each returning (token, log-prob).
- loop.py       the loop state (per-row settings as data) and its steps: schedule, LLM, SLM.
- decoder.py    `relay_generate`, `generate`, `RelayOutput`: one jitted `lax.while_loop`.
- engine.py     `Engine`, `Requests`, `Session`: continuous batching of a queue on B slots.
- reference.py  the same protocol eagerly, without caches: the test oracle.
"""

"""Command automaton, sampling, the jitted relay decoder and engine, the entropy-router
baseline, and the eager reference.

- command.py    `CallCommand`: `<call>\\s*(\\d+)\\s*</call>` compiled into per-(state, token) tables.
- config.py     `RelayConfig`, `SamplingConfig` (frozen, static under jit).
- sampling.py   greedy / temperature / top-k / top-p, each returning (token, log-prob).
- inputs.py     `Requests`, `RowSettings`: a call's inputs as one value, and their checks.
- layout.py     where rows and KV caches live on a device mesh.
- state.py      the loop state (per-row settings as data) and its static `LoopSpec`.
- loop.py       the loop's steps: schedule, LLM, SLM.
- decoder.py    `RelayDecoder`, `relay_generate`, `generate`, `RelayOutput`: one jitted
                `lax.while_loop`.
- slots.py      the engine's slots on device: its state, one iteration, its programs.
- engine.py     `Engine`, `Session`: continuous batching of a queue on B slots.
- entropy_router.py  `EntropyRouter`: the training-free baseline (the LLM writes k
                tokens when the SLM's entropy passes tau).
- reference.py  the same protocol eagerly, without caches: the test oracle.
"""

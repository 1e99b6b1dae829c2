"""The server's Prometheus metrics (`GET /metrics`) and its one-line access log.

Each server has its own `prometheus_client` registry (several servers in one process,
as in the tests, do not share counters). Labels: `model` (relay, slm, llm) and, for
tokens, `source` (slm, command, llm: who wrote them, counted on the finished rows).
Slots in use and queue lengths are read from the engine loop when scraped.

Latency figures are as the client sees them, from the request's arrival: time to first
token (the first text of any choice), time per output token after it, and the whole
request.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

access_log = logging.getLogger("relax.serve.access")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self, worker):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "relax_requests", "Requests by model and outcome (ok, cancelled, bad_request, "
            "overloaded, draining, failed).", ["model", "outcome"], registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "relax_prompt_tokens", "Prompt tokens of served requests.", ["model"], registry=r
        )
        self.tokens = Counter(
            "relax_generated_tokens", "Generated tokens by who wrote them (slm, command, llm).",
            ["model", "source"], registry=r,
        )  # fmt: skip
        self.calls = Counter("relax_llm_calls", "Calls honoured.", ["model"], registry=r)
        self.ttft = Histogram(
            "relax_time_to_first_token_seconds", "From arrival to the first text.", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            "relax_time_per_output_token_seconds", "After the first token, per token.",
            ["model"], buckets=TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "relax_request_seconds", "From arrival to the last token.", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.draining = Gauge("relax_draining", "1 while shutting down.", registry=r)
        r.register(_EngineCollector(worker))

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Slots in use, slots and rows waiting per model, read from the engine loop."""

    def __init__(self, worker):
        self.worker = worker

    def describe(self):
        return []

    def collect(self):
        used = GaugeMetricFamily("relax_slots_in_use", "Slots holding a row.", labels=["model"])
        total = GaugeMetricFamily("relax_slots", "Slots of the model's engine.", labels=["model"])
        queue = GaugeMetricFamily(
            "relax_queue_length", "Rows waiting for a slot.", labels=["model"]
        )
        for name, (live, waiting) in self.worker.stats().items():
            used.add_metric([name], live)
            total.add_metric([name], self.worker.slots(name))
            queue.add_metric([name], waiting)
        return [used, total, queue]

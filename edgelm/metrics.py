"""Prometheus metrics, named as SGLang names them but under the ``edgelm:`` prefix.

Every collector lives in the HTTP process. The scheduler (another process) only fills a
:class:`SchedulerStats` and ships it to the tokenizer manager with its periodic output; the tokenizer
manager calls :meth:`SchedulerMetricsCollector.log_stats`, so one ``/metrics`` route shows everything.
Each :class:`ServerMetrics` owns its own ``CollectorRegistry`` (not the process-wide default one), so
tests and several engines in one process do not clash.

    metrics = ServerMetrics(model_name="SmolLM2-135M")
    metrics.scheduler.log_stats(stats)                 # on each SchedulerStats from the scheduler
    metrics.tokenizer.observe_time_to_first_token(0.12)
    body, content_type = metrics.render()              # for GET /metrics
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

# No "<name>_created" timestamp series next to each counter and histogram (as SGLang's /metrics).
prometheus_client.disable_created_metrics()

PREFIX = "edgelm:"

# Seconds. Edge devices are slower than data-centre GPUs, so the buckets reach further out.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 120, 300)
ITL_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 120, 300, 600, 1200, 2400)


@dataclass
class SchedulerStats:
    """The scheduler's gauges at one moment; picklable, sent from the engine process."""

    num_running_reqs: int = 0
    num_queue_reqs: int = 0
    num_grammar_queue_reqs: int = 0
    num_used_tokens: int = 0
    max_total_num_tokens: int = 0
    token_usage: float = 0.0  # num_used_tokens / max_total_num_tokens
    cache_hit_rate: float = 0.0  # prefix-cache hit tokens / prompt tokens, recent window
    gen_throughput: float = 0.0  # decode tokens/s, recent window
    num_retracted_reqs: int = 0
    is_cuda_graph: float = 0.0  # 1.0 when the last decode step replayed a CUDA graph


# SchedulerStats field -> gauge help text. Field name = metric name without the prefix.
_SCHEDULER_GAUGES = {
    "num_running_reqs": "The number of running requests.",
    "num_queue_reqs": "The number of requests in the waiting queue.",
    "num_grammar_queue_reqs": "The number of requests waiting for their grammar to compile.",
    "num_used_tokens": "The number of used KV-cache tokens.",
    "max_total_num_tokens": "Maximum total number of tokens in the KV cache pool.",
    "token_usage": "The fraction of the KV cache pool in use.",
    "cache_hit_rate": "The prefix cache hit rate.",
    "gen_throughput": "The generation throughput (token/s).",
    "num_retracted_reqs": "The number of retracted requests.",
    "is_cuda_graph": "Whether the last decode batch ran from a CUDA graph.",
}
assert set(_SCHEDULER_GAUGES) == {f.name for f in dataclasses.fields(SchedulerStats)}


def _label_names(labels: dict[str, str]) -> list[str]:
    return list(labels.keys())


class SchedulerMetricsCollector:
    """Gauges set from :class:`SchedulerStats` (one gauge per field)."""

    def __init__(self, labels: dict[str, str], registry: CollectorRegistry | None = None) -> None:
        self.labels = dict(labels)
        self.registry = registry if registry is not None else CollectorRegistry()
        self._gauges = {
            field: Gauge(PREFIX + field, doc, _label_names(self.labels), registry=self.registry).labels(
                **self.labels
            )
            for field, doc in _SCHEDULER_GAUGES.items()
        }

    def log_stats(self, stats: SchedulerStats) -> None:
        for field, gauge in self._gauges.items():
            gauge.set(float(getattr(stats, field)))


class TokenizerMetricsCollector:
    """Per-request counters and latency histograms, fed by the tokenizer manager."""

    def __init__(
        self,
        labels: dict[str, str],
        registry: CollectorRegistry | None = None,
        ttft_buckets: Sequence[float] = TTFT_BUCKETS,
        itl_buckets: Sequence[float] = ITL_BUCKETS,
        e2e_buckets: Sequence[float] = E2E_BUCKETS,
    ) -> None:
        self.labels = dict(labels)
        self.registry = registry if registry is not None else CollectorRegistry()
        names = _label_names(self.labels)

        def counter(name: str, doc: str):
            return Counter(PREFIX + name, doc, names, registry=self.registry).labels(**self.labels)

        def histogram(name: str, doc: str, buckets: Sequence[float]):
            return Histogram(PREFIX + name, doc, names, buckets=buckets, registry=self.registry).labels(
                **self.labels
            )

        # prometheus_client appends "_total" to counters in the exposition.
        self.prompt_tokens_total = counter("prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens_total = counter("generation_tokens", "Number of generation tokens processed.")
        self.cached_tokens_total = counter("cached_tokens", "Number of prompt tokens served from the prefix cache.")
        self.num_requests_total = counter("num_requests", "Number of requests processed.")
        self.num_aborted_requests_total = counter("num_aborted_requests", "Number of requests aborted.")
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Histogram of time to first token in seconds.", ttft_buckets
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", itl_buckets
        )
        self.time_per_output_token = histogram(
            "time_per_output_token_seconds",
            "Histogram of time per output token (after the first) per request, in seconds.",
            itl_buckets,
        )
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds", "Histogram of end-to-end request latency in seconds.", e2e_buckets
        )

    def observe_one_finished_request(
        self,
        prompt_tokens: int,
        generation_tokens: int,
        e2e_latency: float,
        cached_tokens: int = 0,
        time_to_first_token: float | None = None,
    ) -> None:
        self.prompt_tokens_total.inc(prompt_tokens)
        self.generation_tokens_total.inc(generation_tokens)
        if cached_tokens:
            self.cached_tokens_total.inc(cached_tokens)
        self.num_requests_total.inc()
        self.e2e_request_latency.observe(e2e_latency)
        if time_to_first_token is not None and generation_tokens > 1:
            decode_time = max(e2e_latency - time_to_first_token, 0.0)
            self.time_per_output_token.observe(decode_time / (generation_tokens - 1))

    def observe_time_to_first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)

    def observe_inter_token_latency(self, seconds: float, num_tokens: int = 1) -> None:
        """``seconds`` passed between two outputs, the later one carrying ``num_tokens`` new tokens:
        each of those tokens counts as one observation of ``seconds / num_tokens``."""
        if num_tokens <= 0:
            return
        per_token = seconds / num_tokens
        for _ in range(num_tokens):
            self.inter_token_latency.observe(per_token)

    def inc_aborted(self) -> None:
        self.num_aborted_requests_total.inc()


def metrics_response(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The Prometheus text exposition of ``registry`` and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


class ServerMetrics:
    """Both collectors on one private registry: what the HTTP process holds."""

    def __init__(self, model_name: str, extra_labels: dict[str, str] | None = None) -> None:
        self.labels = {"model_name": model_name, **(extra_labels or {})}
        self.registry = CollectorRegistry()
        self.scheduler = SchedulerMetricsCollector(self.labels, self.registry)
        self.tokenizer = TokenizerMetricsCollector(self.labels, self.registry)

    def render(self) -> tuple[bytes, str]:
        return metrics_response(self.registry)


def add_metrics_route(app, metrics: ServerMetrics, path: str = "/metrics") -> None:
    """Register ``GET path`` on a FastAPI app, serving ``metrics``."""
    from fastapi import Response

    async def get_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(content=body, media_type=content_type)

    app.add_api_route(path, get_metrics, methods=["GET"], include_in_schema=False)

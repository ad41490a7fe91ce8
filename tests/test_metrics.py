"""The Prometheus collectors: names, labels, histograms and the /metrics route."""

from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from edgelm.metrics import (
    SchedulerMetricsCollector,
    SchedulerStats,
    ServerMetrics,
    TokenizerMetricsCollector,
    add_metrics_route,
    metrics_response,
)


def _samples(text: str) -> dict:
    """{(sample name, frozenset(labels)): value}"""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


MODEL = {"model_name": "tiny"}
L = frozenset(MODEL.items())


def test_scheduler_gauges():
    col = SchedulerMetricsCollector(MODEL)
    col.log_stats(SchedulerStats(num_running_reqs=3, num_queue_reqs=2, token_usage=0.25, cache_hit_rate=0.5,
                                 gen_throughput=123.5, num_used_tokens=64, max_total_num_tokens=256))
    body, ctype = metrics_response(col.registry)
    text = body.decode()
    assert ctype.startswith("text/plain")
    assert "# TYPE edgelm:num_running_reqs gauge" in text
    s = _samples(text)
    assert s[("edgelm:num_running_reqs", L)] == 3
    assert s[("edgelm:num_queue_reqs", L)] == 2
    assert s[("edgelm:token_usage", L)] == 0.25
    assert s[("edgelm:cache_hit_rate", L)] == 0.5
    assert s[("edgelm:gen_throughput", L)] == 123.5
    assert s[("edgelm:max_total_num_tokens", L)] == 256
    # a later snapshot replaces the values
    col.log_stats(SchedulerStats(num_running_reqs=0))
    assert _samples(metrics_response(col.registry)[0].decode())[("edgelm:num_running_reqs", L)] == 0
    assert "sglang:" not in text


def test_tokenizer_counters_and_histograms():
    col = TokenizerMetricsCollector(MODEL)
    col.observe_time_to_first_token(0.03)
    col.observe_time_to_first_token(0.5)
    col.observe_inter_token_latency(0.04, num_tokens=2)  # two tokens of 0.02 s each
    col.observe_inter_token_latency(0.1)
    col.observe_one_finished_request(prompt_tokens=10, generation_tokens=5, e2e_latency=1.5,
                                     cached_tokens=4, time_to_first_token=0.5)
    col.observe_one_finished_request(prompt_tokens=7, generation_tokens=1, e2e_latency=0.3)
    col.inc_aborted()
    text = metrics_response(col.registry)[0].decode()
    assert "# TYPE edgelm:time_to_first_token_seconds histogram" in text
    assert "_created" not in text
    s = _samples(text)
    assert s[("edgelm:prompt_tokens_total", L)] == 17
    assert s[("edgelm:generation_tokens_total", L)] == 6
    assert s[("edgelm:cached_tokens_total", L)] == 4
    assert s[("edgelm:num_requests_total", L)] == 2
    assert s[("edgelm:num_aborted_requests_total", L)] == 1
    assert s[("edgelm:time_to_first_token_seconds_count", L)] == 2
    assert abs(s[("edgelm:time_to_first_token_seconds_sum", L)] - 0.53) < 1e-9
    assert s[("edgelm:time_to_first_token_seconds_bucket", L | {("le", "0.05")})] == 1
    assert s[("edgelm:time_to_first_token_seconds_bucket", L | {("le", "+Inf")})] == 2
    assert s[("edgelm:inter_token_latency_seconds_count", L)] == 3
    assert s[("edgelm:inter_token_latency_seconds_bucket", L | {("le", "0.02")})] == 2
    assert abs(s[("edgelm:inter_token_latency_seconds_sum", L)] - 0.14) < 1e-9
    assert s[("edgelm:e2e_request_latency_seconds_count", L)] == 2
    # (1.5 - 0.5) / (5 - 1) = 0.25 s per output token; the one-token request adds nothing
    assert s[("edgelm:time_per_output_token_seconds_count", L)] == 1
    assert s[("edgelm:time_per_output_token_seconds_sum", L)] == 0.25


def test_two_servers_in_one_process_and_route():
    a, b = ServerMetrics("model-a"), ServerMetrics("model-b", extra_labels={"engine": "1"})
    a.tokenizer.observe_one_finished_request(3, 4, 0.2)
    b.scheduler.log_stats(SchedulerStats(num_running_reqs=7))
    sa = _samples(a.render()[0].decode())
    sb = _samples(b.render()[0].decode())
    la = frozenset({"model_name": "model-a"}.items())
    lb = frozenset({"model_name": "model-b", "engine": "1"}.items())
    assert sa[("edgelm:generation_tokens_total", la)] == 4
    assert sb[("edgelm:generation_tokens_total", lb)] == 0
    assert sb[("edgelm:num_running_reqs", lb)] == 7

    app = FastAPI()
    add_metrics_route(app, b)
    r = TestClient(app).get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert 'edgelm:num_running_reqs{engine="1",model_name="model-b"} 7.0' in r.text

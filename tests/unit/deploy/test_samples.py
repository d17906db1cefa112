import math

import pytest
from prometheus_client import generate_latest

from deploy.rollout.samples import (
    CounterReset,
    MetricsError,
    VersionSample,
    delta,
    parse,
    quantile,
    samples_for,
)
from tests.support.fakes import metric_registry

INF = math.inf


def _text() -> str:
    reg, req, err, dur, weight = metric_registry()
    req.labels("iris", "1", "http").inc(70)
    req.labels("iris", "1", "grpc").inc(30)
    err.labels("iris", "1", "http", "500").inc(2)
    err.labels("iris", "1", "grpc", "503").inc(1)
    err.labels("iris", "1", "http", "400").inc(9)  # the client's fault: not counted
    err.labels("iris", "1", "http", "404").inc(4)
    for _ in range(3):
        dur.labels("iris", "1", "http").observe(0.003)
    dur.labels("iris", "1", "grpc").observe(0.2)
    req.labels("iris", "2", "http").inc(5)
    req.labels("other", "1", "http").inc(1000)
    weight.labels("iris", "1").set(90)
    weight.labels("iris", "2").set(10)
    return generate_latest(reg).decode()


def test_parse_real_prometheus_client_output_sums_protocols_and_counts_only_5xx():
    s = parse(_text(), at=5.0)
    v1 = s[("iris", 1)]
    assert v1.requests == 100
    assert v1.server_errors == 3
    assert v1.at == 5.0
    b = dict(v1.buckets)
    assert b[0.005] == 3 and b[0.25] == 4 and b[INF] == 4
    assert s[("iris", 2)].requests == 5
    assert s[("other", 1)].requests == 1000


def test_samples_for_reports_a_version_without_series_as_zero():
    s = samples_for(_text(), "iris", [1, 3], at=1.0)
    assert s[3] == VersionSample.zero(1.0)
    assert s[1].requests == 100


def test_unparseable_text_is_a_metrics_error():
    with pytest.raises(MetricsError):
        parse("kloop_inference_requests_total{model=\"a\" 1 2 3 garbage{", at=0)


@pytest.mark.parametrize(
    "q, buckets, want",
    [
        # 10 observations: 4 <= 0.1, 8 <= 0.2, 10 <= 0.4.
        # p50: rank 5, in (0.1, 0.2] holding 4 -> 0.1 + 0.1 * (5-4)/4 = 0.125
        (0.5, ((0.1, 4), (0.2, 8), (0.4, 10), (INF, 10)), 0.125),
        # p99: rank 9.9 in (0.2, 0.4] holding 2 -> 0.2 + 0.2 * (9.9-8)/2 = 0.39
        (0.99, ((0.1, 4), (0.2, 8), (0.4, 10), (INF, 10)), 0.39),
        # first bucket starts at 0: rank 2 of 4 in (0, 0.1] -> 0.05
        (0.2, ((0.1, 4), (0.2, 8), (0.4, 10), (INF, 10)), 0.05),
        # rank lands in +Inf: the highest finite bound
        (0.99, ((0.1, 5), (0.2, 5), (INF, 10)), 0.2),
        (0.5, ((0.1, 0), (INF, 0)), None),  # no observations: PromQL's NaN
        (0.5, ((INF, 3),), None),  # fewer than two buckets
        (0.5, (), None),
    ],
)
def test_quantile_matches_hand_computation(q, buckets, want):
    got = quantile(q, buckets)
    assert got == (None if want is None else pytest.approx(want))


def test_quantile_rejects_q_outside_0_1():
    with pytest.raises(ValueError):
        quantile(1.5, ((0.1, 1), (INF, 1)))


def _s(req, err, at, buckets=((0.1, 0), (INF, 0))):
    return VersionSample(req, err, tuple(buckets), at)


def test_delta_subtracts_counters_and_buckets():
    d = delta(_s(150, 7, 70, ((0.1, 140), (INF, 150))), _s(100, 5, 10, ((0.1, 95), (INF, 100))))
    assert (d.requests, d.server_errors, d.seconds) == (50, 2, 60)
    assert d.buckets == ((0.1, 45), (INF, 50))
    assert d.error_rate == pytest.approx(0.04)


def test_delta_from_a_zero_baseline():
    d = delta(_s(10, 1, 5, ((0.1, 10), (INF, 10))), VersionSample.zero(0))
    assert d.requests == 10 and d.buckets == ((0.1, 10), (INF, 10))


@pytest.mark.parametrize(
    "now, base",
    [
        (_s(5, 0, 2), _s(100, 0, 1)),  # requests went down
        (_s(200, 0, 2), _s(100, 3, 1)),  # errors went down
        (_s(200, 3, 2, ((0.1, 1), (INF, 200))), _s(100, 3, 1, ((0.1, 50), (INF, 100)))),
    ],
)
def test_delta_with_counter_reset_is_unmeasurable(now, base):
    with pytest.raises(CounterReset):
        delta(now, base)


def test_sample_json_round_trip_keeps_inf():
    s = _s(3, 1, 2, ((0.1, 2), (INF, 3)))
    assert VersionSample.from_dict(s.to_dict()) == s

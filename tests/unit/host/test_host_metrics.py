"""A host's metrics: every series there from the start at 0, by Prometheus's names;
domains counted by state at each scrape."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pvmig.dom0.domain import DomainState
from pvmig.host.metrics import Metrics


def _samples(metrics: Metrics) -> dict:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_every_series_is_there_at_zero_before_any_migration():
    m = _samples(Metrics(SimpleNamespace(domains={})))
    for role in ("source", "destination"):
        assert m[("pvmig_migrations_started_total", (("role", role),))] == 0
        for outcome in ("completed", "failed", "aborted"):
            assert m[("pvmig_migrations_ended_total",
                      (("outcome", outcome), ("role", role)))] == 0
    for kind in ("memory", "disk"):
        assert m[("pvmig_migration_sent_bytes_total", (("kind", kind),))] == 0
        assert m[("pvmig_migration_received_bytes_total", (("kind", kind),))] == 0
    assert m[("pvmig_migration_downtime_seconds_count", ())] == 0
    assert m[("pvmig_postcopy_faults_total", ())] == 0


def test_counts_and_the_downtime_histogram():
    metrics = Metrics(SimpleNamespace(domains={}))
    metrics.started.labels("source").inc()
    metrics.ended_as("source", "aborted")
    metrics.sent.labels("disk").inc(4096)
    metrics.downtime.observe(0.012)
    m = _samples(metrics)
    assert m[("pvmig_migrations_ended_total", (("outcome", "aborted"), ("role", "source")))] == 1
    assert m[("pvmig_migration_sent_bytes_total", (("kind", "disk"),))] == 4096
    assert m[("pvmig_migration_downtime_seconds_bucket", (("le", "0.01"),))] == 0
    assert m[("pvmig_migration_downtime_seconds_bucket", (("le", "0.02"),))] == 1
    assert m[("pvmig_migration_downtime_seconds_sum", ())] == 0.012


def test_domains_are_counted_by_state_at_each_scrape():
    host = SimpleNamespace(domains={})
    metrics = Metrics(host)
    assert not [k for k in _samples(metrics) if k[0] == "pvmig_domains"]
    host.domains = {"a": SimpleNamespace(state=DomainState.RUNNING),
                    "b": SimpleNamespace(state=DomainState.RUNNING),
                    "c": SimpleNamespace(state=DomainState.INCOMING)}
    m = _samples(metrics)
    assert m[("pvmig_domains", (("state", "running"),))] == 2
    assert m[("pvmig_domains", (("state", "incoming"),))] == 1

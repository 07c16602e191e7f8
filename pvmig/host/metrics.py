"""A host's Prometheus metrics (`pvmig agent --metrics-listen`): what its migrations did,
as counters and a histogram a scraper sums across a fleet.

Names follow Prometheus's conventions (base units, `_total` for counters, a `role` label
for the half a host played), after KubeVirt's `kubevirt_vmi_migration_*`. Each figure is
counted where the agent knows it: a migration's start, end and rounds by each half;
bytes as the source sent them and the destination received them (page and disk data
apart); the downtime as the coordinator measured it on one clock (given to the source
with Complete, observed once per migration); post-copy's faults by the destination.
Domains by state are read from the host at each scrape.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

ROLES = ("source", "destination")
KINDS = ("memory", "disk")
# a PV guest's pause: a few ms on loopback, tens over a shaped link, seconds when stuck
DOWNTIME_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
ENDS = ("completed", "failed", "aborted")


class Metrics:
    def __init__(self, host) -> None:
        self.registry = r = CollectorRegistry()
        self.started = Counter("pvmig_migrations_started", "Migrations begun here, by the "
                               "half this host plays", ["role"], registry=r)
        self.ended = Counter("pvmig_migrations_ended", "Migrations ended here: completed "
                             "(the guest runs at the destination), failed (an error ended "
                             "it before the commit) or aborted (cancelled)",
                             ["role", "outcome"], registry=r)
        self.sent = Counter("pvmig_migration_sent_bytes", "Bytes sent on data channels and "
                            "page streams: page data and disk blocks with their headers",
                            ["kind"], registry=r)
        self.received = Counter("pvmig_migration_received_bytes", "Bytes received on data "
                                "channels and page streams", ["kind"], registry=r)
        self.rounds = Counter("pvmig_migration_rounds", "Rounds the source sent: memory's "
                              "(pre-copy and the final pass) and the disks' alone",
                              ["kind"], registry=r)
        self.downtime = Histogram("pvmig_migration_downtime_seconds", "The guest's pause, "
                                  "from its last step at the source to its first at the "
                                  "destination (the coordinator's measure, one per "
                                  "migration, observed at the source)",
                                  buckets=DOWNTIME_BUCKETS, registry=r)
        self.postcopy_faults = Counter("pvmig_postcopy_faults", "Distinct frames a guest "
                                       "blocked on after a switch to post-copy (its "
                                       "destination)", registry=r)
        for role in ROLES:  # every series there from the start, at 0
            self.started.labels(role)
            for outcome in ENDS:
                self.ended.labels(role, outcome)
        for kind in KINDS:
            self.sent.labels(kind)
            self.received.labels(kind)
        self.rounds.labels("memory")
        self.rounds.labels("storage")
        r.register(_Domains(host))

    def ended_as(self, role: str, outcome: str) -> None:
        self.ended.labels(role, outcome).inc()


class _Domains:
    """pvmig_domains{state}: the domains this host holds, by state, at the scrape."""

    def __init__(self, host) -> None:
        self.host = host

    def collect(self):
        g = GaugeMetricFamily("pvmig_domains", "Domains on this host, by state",
                              labels=["state"])
        counts: dict[str, int] = {}
        for dom in list(self.host.domains.values()):
            counts[str(dom.state)] = counts.get(str(dom.state), 0) + 1
        for state, n in sorted(counts.items()):
            g.add_metric([state], n)
        yield g

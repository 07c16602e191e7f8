"""The fleet file (TOML): the agents, the caps, and the policies that select domains by
label. Parsed and checked here, whole, before anything moves: an unknown key or a limit
that cannot be met is refused by name.

    [fleet]
    parallel_migrations = 5           # in the whole fleet (KubeVirt's per cluster)
    parallel_outbound_per_host = 2    # from one host at once
    retries = 1                       # a migration that failed, the guest still at its
                                      # source, is tried again (another destination if any)

    [defaults]                        # every migration's, unless a policy says otherwise
    bandwidth_mbps = 0                # its page streams' cap; 0: none
    completion_timeout_per_gib_s = 150  # 0: none
    timeout_action = "abort"          # abort | pause | postcopy
    progress_timeout_s = 150          # a stall: no round boundary lowered what is left
    downtime_limit_ms = 300
    copy_storage = false

    [[agents]]
    name = "a"
    address = "10.0.0.1:7000"
    labels = { zone = "left" }

    [[policies]]                      # the most specific match wins (KubeVirt's rule)
    name = "db"
    selector = { tier = "db" }        # the domains it applies to
    hosts = { disk = "ssd" }          # where they may go (the agents' labels)
    bandwidth_mbps = 400
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from pvmig import errors, labels
from pvmig.migration import policy
from pvmig.migration.policy import TimeoutAction

GIB = 1 << 30


@dataclass(frozen=True)
class Settings:
    """What one migration gets: the defaults, with the winning policy's keys over them."""

    bandwidth_mbps: float = 0.0
    completion_timeout_per_gib_s: float = 150.0  # KubeVirt's completionTimeoutPerGiB
    timeout_action: TimeoutAction = TimeoutAction.ABORT
    progress_timeout_s: float = 150.0  # KubeVirt's progressTimeout, at round boundaries
    downtime_limit_ms: float = policy.DOWNTIME_LIMIT_MS
    copy_storage: bool = False
    policy: str = ""  # the name of the policy that gave them; "": the defaults


@dataclass(frozen=True)
class Policy:
    name: str
    selector: dict
    hosts: dict  # labels a destination must carry
    overrides: dict  # Settings' keys this policy sets

    @property
    def specificity(self) -> int:
        return len(self.selector)


@dataclass(frozen=True)
class Agent:
    name: str
    address: str
    labels: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Fleet:
    agents: dict[str, Agent]
    parallel_migrations: int = 5
    parallel_outbound_per_host: int = 2
    retries: int = 1
    defaults: Settings = Settings()
    policies: tuple[Policy, ...] = ()
    path: str = ""

    def agent(self, name_or_address: str) -> Agent:
        """An agent by its name or its address, or NotFound listing them."""
        for a in self.agents.values():
            if name_or_address in (a.name, a.address):
                return a
        raise errors.NotFound(f"no agent {name_or_address!r} in the fleet "
                              f"({', '.join(self.agents)})")

    def policy_for(self, domain_labels: dict) -> tuple[Settings, Policy | None]:
        """The most specific matching policy (most selector labels), ties to the first
        name in lexical order, as KubeVirt's MigrationPolicy; none: the defaults."""
        matching = [p for p in self.policies if labels.matches(p.selector, domain_labels)]
        if not matching:
            return self.defaults, None
        best = min(matching, key=lambda p: (-p.specificity, p.name))
        return replace(self.defaults, **best.overrides, policy=best.name), best

    def rules_for(self, domain_labels: dict) -> tuple[Settings, dict]:
        """A domain's migration settings, and the labels its destination must carry."""
        settings, chosen = self.policy_for(domain_labels)
        return settings, (chosen.hosts if chosen else {})

    def hosts_for(self, dom) -> dict:
        """The labels a destination of `dom` (anything with .labels) must carry."""
        return self.rules_for(dom.labels)[1]


_FLEET_KEYS = {"parallel_migrations", "parallel_outbound_per_host", "retries"}
_SETTING_KEYS = {f.name for f in fields(Settings)} - {"policy"}
_AGENT_KEYS = {"name", "address", "labels"}
_POLICY_KEYS = {"name", "selector", "hosts"} | _SETTING_KEYS
_TOP_KEYS = {"fleet", "defaults", "agents", "policies"}


def load(path: str | Path) -> Fleet:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise errors.InvalidArgument(f"cannot read the fleet file {path}: "
                                     f"{e.strerror or e}") from None
    try:
        return parse(tomllib.loads(text), str(path))
    except tomllib.TOMLDecodeError as e:
        raise errors.InvalidArgument(f"{path}: not TOML: {e}") from None


def parse(doc: dict, path: str = "<fleet>") -> Fleet:
    def bad(msg: str) -> errors.InvalidArgument:
        return errors.InvalidArgument(f"{path}: {msg}")

    _unknown(doc, _TOP_KEYS, "the file's top level", bad)
    top = _table(doc, "fleet", bad)
    _unknown(top, _FLEET_KEYS, "[fleet]", bad)
    cluster = _int(top, "parallel_migrations", 5, "[fleet]", bad)
    outbound = _int(top, "parallel_outbound_per_host", 2, "[fleet]", bad)
    retries = _int(top, "retries", 1, "[fleet]", bad, minimum=0)
    if outbound > cluster:
        raise bad(f"[fleet] parallel_outbound_per_host = {outbound} can never be reached "
                  f"with parallel_migrations = {cluster} in the whole fleet")

    given = _table(doc, "defaults", bad)
    _unknown(given, _SETTING_KEYS, "[defaults]", bad)
    defaults = Settings(**_settings(given, "[defaults]", bad))
    _check_settings(defaults, "[defaults]", bad)

    agents: dict[str, Agent] = {}
    listed = doc.get("agents", [])
    if not isinstance(listed, list) or not all(isinstance(a, dict) for a in listed):
        raise bad("agents is a list of tables: [[agents]] name = ..., address = ...")
    for i, a in enumerate(listed):
        where = f"[[agents]] #{i + 1}"
        _unknown(a, _AGENT_KEYS, where, bad)
        name, address = a.get("name"), a.get("address")
        if not isinstance(name, str) or not name:
            raise bad(f"{where} has no name")
        where = f"agent {name!r}"
        if not isinstance(address, str) or not _is_address(address):
            raise bad(f"{where}: address is HOST:PORT, not {address!r}")
        if name in agents:
            raise bad(f"agent {name!r} is named twice")
        if any(b.address == address for b in agents.values()):
            raise bad(f"{where}: address {address} is agent "
                      f"{next(b.name for b in agents.values() if b.address == address)!r}'s "
                      "too")
        agents[name] = Agent(name, address, _labels(a, "labels", where, bad))
    if len(agents) < 2:
        raise bad(f"a fleet has at least 2 agents, not {len(agents)}")

    policies: list[Policy] = []
    listed = doc.get("policies", [])
    if not isinstance(listed, list) or not all(isinstance(p, dict) for p in listed):
        raise bad("policies is a list of tables: [[policies]] name = ..., selector = ...")
    for i, p in enumerate(listed):
        where = f"[[policies]] #{i + 1}"
        _unknown(p, _POLICY_KEYS, where, bad)
        name = p.get("name")
        if not isinstance(name, str) or not name:
            raise bad(f"{where} has no name")
        where = f"policy {name!r}"
        if any(q.name == name for q in policies):
            raise bad(f"policy {name!r} is named twice")
        overrides = _settings({k: v for k, v in p.items() if k in _SETTING_KEYS}, where, bad)
        _check_settings(replace(defaults, **overrides), where, bad)
        hosts = _labels(p, "hosts", where, bad)
        if hosts and not any(labels.matches(hosts, a.labels) for a in agents.values()):
            raise bad(f"{where}: hosts = {hosts} matches no agent of the fleet")
        policies.append(Policy(name, _labels(p, "selector", where, bad), hosts, overrides))
    return Fleet(agents=agents, parallel_migrations=cluster,
                 parallel_outbound_per_host=outbound, retries=retries, defaults=defaults,
                 policies=tuple(policies), path=path)


# ---- checks


def _unknown(table: dict, known: set, where: str, bad) -> None:
    extra = sorted(set(table) - known)
    if extra:
        raise bad(f"unknown key{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))} "
                  f"in {where} (known: {', '.join(sorted(known))})")


def _table(doc: dict, key: str, bad) -> dict:
    t = doc.get(key, {})
    if not isinstance(t, dict):
        raise bad(f"[{key}] is a table")
    return t


def _int(t: dict, key: str, default: int, where: str, bad, minimum: int = 1) -> int:
    v = t.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise bad(f"{where} {key} is a whole number >= {minimum}, not {v!r}")
    return v


def _settings(given: dict, where: str, bad) -> dict:
    out = {}
    for key, v in given.items():
        if key == "timeout_action":
            try:
                out[key] = TimeoutAction(v)
            except ValueError:
                raise bad(f"{where} timeout_action is one of "
                          f"{', '.join(a.value for a in TimeoutAction)}, not {v!r}") from None
        elif key == "copy_storage":
            if not isinstance(v, bool):
                raise bad(f"{where} copy_storage is true or false, not {v!r}")
            out[key] = v
        else:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(f"{where} {key} is a number, not {v!r}")
            out[key] = float(v)
    return out


def _check_settings(s: Settings, where: str, bad) -> None:
    for key in ("bandwidth_mbps", "completion_timeout_per_gib_s", "progress_timeout_s"):
        if getattr(s, key) < 0:
            raise bad(f"{where} {key} must be >= 0 (0: none), not {getattr(s, key)}")
    if s.downtime_limit_ms <= 0:
        raise bad(f"{where} downtime_limit_ms must be > 0, not {s.downtime_limit_ms}")
    if s.bandwidth_mbps and s.completion_timeout_per_gib_s:
        # a GiB at the cap takes at least this long: a timeout below it always fires
        floor = GIB * 8 / (s.bandwidth_mbps * 1e6)
        if s.completion_timeout_per_gib_s < floor:
            raise bad(f"{where}: completion_timeout_per_gib_s = "
                      f"{s.completion_timeout_per_gib_s:g} cannot be met: a GiB takes at "
                      f"least {floor:.1f} s at bandwidth_mbps = {s.bandwidth_mbps:g}")
    if s.timeout_action is TimeoutAction.POSTCOPY and s.copy_storage:
        raise bad(f"{where}: timeout_action = \"postcopy\" with copy_storage: not "
                  "supported (the disks' last blocks go in a final pass)")


def _labels(t: dict, key: str, where: str, bad) -> dict:
    v = t.get(key, {})
    if not isinstance(v, dict):
        raise bad(f"{where} {key} is a table of labels, {{ key = \"value\" }}, not {v!r}")
    try:
        return labels.check(v, what=f"{key} label")
    except errors.InvalidArgument as e:
        raise bad(f"{where}: {e}") from None


def _is_address(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isascii() and port.isdigit() and 0 < int(port) < 65536)


def render(agents: list[tuple[str, str, dict]], **fleet_keys) -> str:
    """A fleet file naming `agents` (name, address, labels), with [fleet] keys given:
    what a cluster's bring-up writes beside itself (pvmig.tools.cluster, deploy/)."""
    unknown = set(fleet_keys) - _FLEET_KEYS
    if unknown:
        raise errors.InvalidArgument(f"unknown [fleet] keys {sorted(unknown)}")
    out = ["# written by pvmig for this cluster; see docs/FLEET.md", "[fleet]"]
    out += [f"{k} = {v}" for k, v in fleet_keys.items()]
    for name, address, given in agents:
        out += ["", "[[agents]]", f'name = "{name}"', f'address = "{address}"']
        if given:
            out.append("labels = { " + ", ".join(f'"{k}" = "{v}"' for k, v in given.items())
                       + " }")
    return "\n".join(out) + "\n"

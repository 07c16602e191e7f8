"""A scenario: a timeline of what happens to a fleet, played against its real agents.

    fleet = "fleet.toml"               # relative to the scenario file
    name = "evacuate-under-load"       # optional; the report's title

    [[step]]
    at = 0                             # seconds from the start
    create = { domain = "d1", host = "a", ram_mb = 256, dirty_rate = 4000,
               labels = { tier = "db" } }

    [[step]]
    at = 2
    workload = { domain = "d1", dirty_rate = 12000 }   # io_rate too (a disk)

    [[step]]
    at = 3
    migrate = { domain = "d1", to = "b" }   # to: optional, placed as evacuate places

    [[step]]
    at = 3
    evacuate = { host = "a" }

    [[step]]
    at = 10
    when_idle = true                   # and once no migration is queued or under way
    rebalance = {}

    [[step]]
    at = 12
    destroy = { domain = "d1" }        # waits for a move of it under way to end

Steps run in order, each at its time or as soon as the one before it has (a create
boots its guest before the next step). Migrations, evacuations and rebalances queue
their moves behind those already queued, all under the fleet file's caps (one
pvmig.fleet.runner for the whole scenario), and the next step does not wait for them.
A step that fails (no room, a domain that is not there) is reported and the scenario
goes on; a scenario file that is wrong is refused whole, before anything runs.

At the end, as for an evacuation: a census (each domain the scenario knows of runs on
exactly one host, its guest's checks clean; a destroyed one on none), the caps as the
agents' ledgers saw them, and a report of every step and every migration.
"""

from __future__ import annotations

import asyncio
import math
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pvmig import errors, labels
from pvmig._proto import pvmig_pb2 as pb
from pvmig.fleet import config, inventory, operation, placement
from pvmig.fleet.config import Fleet
from pvmig.fleet.placement import DomainView, Move
from pvmig.fleet.runner import Runner
from pvmig.rpc.client import AgentClient

# What each action takes: key -> (kind, required); kinds: str, int, number, labels
ACTIONS: dict[str, dict[str, tuple[str, bool]]] = {
    "create": {"domain": ("str", True), "host": ("str", True), "ram_mb": ("int", False),
               "dirty_rate": ("number", False), "hot_fraction": ("number", False),
               "hot_share": ("number", False), "fill": ("number", False),
               "seed": ("int", False), "labels": ("labels", False),
               "disk_blocks": ("int", False), "io_rate": ("number", False)},
    "workload": {"domain": ("str", True), "dirty_rate": ("number", False),
                 "io_rate": ("number", False)},
    "migrate": {"domain": ("str", True), "to": ("str", False)},
    "evacuate": {"host": ("str", True)},
    "rebalance": {},
    "destroy": {"domain": ("str", True)},
}
_STEP_KEYS = {"at", "when_idle"} | set(ACTIONS)
_TOP_KEYS = {"fleet", "name", "step"}
CREATE_TIMEOUT_S = 600.0
CALL_TIMEOUT_S = 60.0
# A domain being moved answers at neither host for its downtime: a workload change
# asked then is asked again, until this long
WORKLOAD_RETRY_S = 30.0


@dataclass(frozen=True)
class Step:
    number: int
    at: float
    action: str
    args: dict
    when_idle: bool = False

    @property
    def title(self) -> str:
        what = " ".join(f"{k}={v}" for k, v in self.args.items()
                        if k in ("domain", "host", "to"))
        return f"step {self.number}: {self.action}{' ' + what if what else ''}"


@dataclass(frozen=True)
class Spec:
    path: str
    name: str
    fleet: Fleet
    steps: tuple[Step, ...]


def load(path: str | Path) -> Spec:
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as e:
        raise errors.InvalidArgument(f"cannot read the scenario {path}: "
                                     f"{e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise errors.InvalidArgument(f"{path}: not TOML: {e}") from None
    return parse(doc, path)


def parse(doc: dict, path: Path) -> Spec:
    def bad(msg: str) -> errors.InvalidArgument:
        return errors.InvalidArgument(f"{path}: {msg}")

    extra = sorted(set(doc) - _TOP_KEYS)
    if extra:
        raise bad(f"unknown key(s) {', '.join(map(repr, extra))} at the top level "
                  f"(known: {', '.join(sorted(_TOP_KEYS))})")
    where = doc.get("fleet")
    if not isinstance(where, str) or not where:
        raise bad('fleet = "FILE" names the fleet file (relative to the scenario)')
    fleet = config.load(path.parent / where)
    name = doc.get("name", path.stem)
    if not isinstance(name, str):
        raise bad(f"name is a string, not {name!r}")
    listed = doc.get("step", [])
    if not isinstance(listed, list) or not listed or not all(isinstance(s, dict)
                                                             for s in listed):
        raise bad("a scenario has steps: [[step]] at = SECONDS, and one action ("
                  + ", ".join(ACTIONS) + ")")
    steps, last_at = [], 0.0
    for i, raw in enumerate(listed, 1):
        steps.append(_step(i, raw, fleet, lambda m, i=i: bad(f"step {i}: {m}")))
        if steps[-1].at < last_at:
            raise bad(f"step {i}: at = {steps[-1].at:g} is before step {i - 1}'s "
                      f"{last_at:g}: steps are listed in time order")
        last_at = steps[-1].at
    return Spec(str(path), name, fleet, tuple(steps))


def _step(number: int, raw: dict, fleet: Fleet, bad) -> Step:
    extra = sorted(set(raw) - _STEP_KEYS)
    if extra:
        raise bad(f"unknown key(s) {', '.join(map(repr, extra))} (known: "
                  f"{', '.join(sorted(_STEP_KEYS))})")
    at = raw.get("at")
    if isinstance(at, bool) or not isinstance(at, (int, float)) or not (
            math.isfinite(at) and at >= 0):
        raise bad(f"at is the step's time, in seconds >= 0 from the start, not {at!r}")
    when_idle = raw.get("when_idle", False)
    if not isinstance(when_idle, bool):
        raise bad(f"when_idle is true or false, not {when_idle!r}")
    actions = [a for a in ACTIONS if a in raw]
    if len(actions) != 1:
        raise bad(f"a step has one action of {', '.join(ACTIONS)}; this one has "
                  f"{', '.join(actions) or 'none'}")
    action = actions[0]
    args = raw[action]
    if not isinstance(args, dict):
        raise bad(f"{action} is a table: {action} = {{ ... }}")
    known = ACTIONS[action]
    extra = sorted(set(args) - set(known))
    if extra:
        raise bad(f"{action}: unknown key(s) {', '.join(map(repr, extra))} (known: "
                  f"{', '.join(known) or 'none'})")
    for key, (kind, required) in known.items():
        if key not in args:
            if required:
                raise bad(f"{action} needs {key}")
            continue
        args[key] = _value(args[key], kind, f"{action} {key}", bad)
    for key in ("host", "to"):
        if key in args:
            try:
                args[key] = fleet.agent(args[key]).name
            except errors.NotFound as e:
                raise bad(f"{action} {key}: {e}") from None
    if action == "workload" and not {"dirty_rate", "io_rate"} & set(args):
        raise bad("workload needs dirty_rate or io_rate")
    if action == "create":
        if args.get("ram_mb", 64) <= 0:
            raise bad(f"create ram_mb must be > 0, not {args['ram_mb']}")
        if "io_rate" in args and not args.get("disk_blocks"):
            raise bad("create io_rate is a disk's: give disk_blocks too")
    return Step(number, float(at), action, args, when_idle)


def _value(v, kind: str, what: str, bad):
    if kind == "str":
        if not isinstance(v, str) or not v:
            raise bad(f"{what} is a name, not {v!r}")
        return v
    if kind == "labels":
        if not isinstance(v, dict):
            raise bad(f"{what} is a table of labels, not {v!r}")
        try:
            return labels.check(v, what="label")
        except errors.InvalidArgument as e:
            raise bad(f"{what}: {e}") from None
    if kind == "int":
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise bad(f"{what} is a whole number >= 0, not {v!r}")
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
            math.isfinite(v) and v >= 0):
        raise bad(f"{what} is a number >= 0, not {v!r}")
    return float(v)


class Scenario:
    """One run of a Spec against its fleet: steps at their times, moves under the caps."""

    def __init__(self, spec: Spec, display_of, say=lambda line: None,
                 clock=time.monotonic) -> None:
        self.spec, self.fleet, self.display_of, self.say = spec, spec.fleet, display_of, say
        self.clock = clock
        self.runner: Runner | None = None
        self.steps: list[dict] = []
        self.known: dict[str, bool] = {}  # domain -> alive (False: destroyed)
        self._stop = asyncio.Event()

    def cancel(self, why: str) -> None:
        if self.runner is not None:
            self.runner.cancel(why)
        self._stop.set()

    async def run(self) -> dict:
        hosts = await inventory.survey(self.fleet)
        for h in hosts.values():
            self.known.update({d: True for d in h.domains})
        self.runner = runner = Runner(self.fleet, hosts, None, self.clock)
        runner.display = display = self.display_of(lambda: runner.rows, self.spec.name)
        t0 = runner.t0
        try:
            with operation.cancelled_by_signals(self.cancel):
                for step in self.spec.steps:
                    if await self._until(t0 + step.at):
                        if step.when_idle:
                            await self._idle()
                    if self._stop.is_set():
                        self.steps.append(self._record(step, t0, skipped=True))
                        continue
                    self.steps.append(await self._play(step, t0))
                await runner.drain()
        finally:
            display.close()
        return await self._result(self.clock() - t0)

    async def _until(self, when: float) -> bool:
        """Sleep until `when` (the clock's); False if cancelled meanwhile."""
        try:
            await asyncio.wait_for(self._stop.wait(), max(0.0, when - self.clock()))
            return False
        except asyncio.TimeoutError:
            return True

    async def _idle(self) -> None:
        stop = asyncio.ensure_future(self._stop.wait())
        drained = asyncio.ensure_future(self.runner.drain())
        await asyncio.wait({stop, drained}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        drained.cancel()

    def _record(self, step: Step, t0: float, skipped: bool = False) -> dict:
        return {"step": step.number, "action": step.action, "args": step.args,
                "at-ms": round(step.at * 1e3, 3),
                "started-ms": round((self.clock() - t0) * 1e3, 3),
                "ok": not skipped, "error": ("skipped: " + self.runner.cancelled)
                if skipped else None}

    async def _play(self, step: Step, t0: float) -> dict:
        rec = self._record(step, t0)
        try:
            rec["detail"] = await getattr(self, "_" + step.action)(step)
        except errors.PvmigError as e:
            rec["ok"], rec["error"] = False, str(e)
        rec["ended-ms"] = round((self.clock() - t0) * 1e3, 3)
        self.say(f"{rec['started-ms'] / 1e3:8.2f} {step.title}: "
                 + (f"failed: {rec['error']}" if rec["error"] else _brief(rec["detail"])))
        return rec

    # ---- the actions

    async def _create(self, step: Step) -> dict:
        a = step.args
        name, host = a["domain"], a["host"]
        ram = a.get("ram_mb", 64) << 20
        workload = pb.WorkloadConfig(**{k: a[k] for k in (
            "dirty_rate", "hot_fraction", "hot_share", "fill", "seed") if k in a})
        devices = []
        if a.get("disk_blocks"):
            # relative: under each agent's storage dir (the fleet's policy copies it, or
            # the agents share it)
            devices.append(pb.DeviceConfig(kind="vbd", devid=0, disk=f"{name}.img",
                                           blocks=a["disk_blocks"],
                                           **({"io_rate": a["io_rate"]}
                                              if "io_rate" in a else {})))
        async with self._agent(host) as c:
            info = await c.call(c.agent.CreateDomain, pb.CreateDomainRequest(
                name=name, ram_bytes=ram, workload=workload, devices=devices,
                labels=a.get("labels", {})), timeout=CREATE_TIMEOUT_S)
        view = self.runner.hosts[host]
        view.used_ram += info.ram_bytes
        view.domains[name] = DomainView(name, host, info.ram_bytes, dict(info.labels))
        self.known[name] = True
        return {"host": host, "ram-bytes": info.ram_bytes, "domid": info.domid}

    async def _workload(self, step: Step) -> dict:
        a = step.args
        request = pb.SetWorkloadRequest(name=a["domain"], **{
            k: a[k] for k in ("dirty_rate", "io_rate") if k in a})
        deadline = self.clock() + WORKLOAD_RETRY_S
        while True:
            refusals = []
            for host in self._where(a["domain"]):
                try:
                    async with self._agent(host) as c:
                        info = await c.call(c.agent.SetWorkload, request,
                                            timeout=CALL_TIMEOUT_S)
                    return {"host": host, "dirty-rate": info.workload.dirty_rate}
                except (errors.NotFound, errors.FailedPrecondition) as e:
                    refusals.append(f"{host}: {e}")
            if not refusals or self.clock() > deadline or self._stop.is_set():
                raise errors.FailedPrecondition(
                    f"no host took the workload change of {a['domain']}: "
                    + ("; ".join(refusals) or "the scenario knows of no such domain"))
            await asyncio.sleep(0.05)  # (its downtime: the destination resumes it soon)

    async def _migrate(self, step: Step) -> dict:
        name = step.args["domain"]
        if name in self.runner.in_flight():
            raise errors.FailedPrecondition(f"a move of {name} is under way already")
        dom = self._view(name)
        allowed = self.fleet.hosts_for(dom)
        if "to" in step.args:
            dest = self.runner.hosts[step.args["to"]]
            if dest.name == dom.host:
                raise errors.InvalidArgument(f"{name} is on {dest.name} already")
            if not labels.matches(allowed, dest.labels):
                raise errors.FailedPrecondition(
                    f"{name}'s policy sends it to hosts with {allowed}; {dest.name} has "
                    f"{dest.labels}")
            if dest.free_ram < dom.ram:
                raise errors.ResourceExhausted(
                    f"{dest.name} has {dest.free_ram >> 20} MiB free, not "
                    f"{dom.ram >> 20} MiB for {name}")
        else:
            dest = placement.best_host(dom, list(self.runner.hosts.values()), allowed)
            if isinstance(dest, str):
                raise errors.ResourceExhausted(f"{name} fits nowhere: {dest}")
        move = Move(dom, dom.host, dest.name)
        placement.reserve(move, self.runner.hosts)
        self.runner.submit([move], origin=f"step {step.number}")
        return {"moves": [f"{name} {dom.host}->{dest.name}"]}

    async def _evacuate(self, step: Step) -> dict:
        moves, unplaced = placement.evacuation(
            step.args["host"], self.runner.hosts, self.fleet.hosts_for,
            busy=self.runner.in_flight())
        self.runner.submit(moves, origin=f"step {step.number}")
        return _planned(moves, unplaced)

    async def _rebalance(self, step: Step) -> dict:
        before = placement.spread(self.runner.hosts)
        moves = placement.rebalance(self.runner.hosts, self.fleet.hosts_for,
                                    busy=self.runner.in_flight())
        self.runner.submit(moves, origin=f"step {step.number}")
        return _planned(moves, []) | {"spread-before": round(before, 4), "spread-planned":
                                      round(placement.spread(self.runner.hosts), 4)}

    async def _destroy(self, step: Step) -> dict:
        name = step.args["domain"]
        for row in self.runner.rows:  # (its move ends first: then it is in one place)
            if row.domain == name and row.task is not None:
                await row.task
        dom = self._view(name)
        async with self._agent(dom.host) as c:
            await c.call(c.agent.DestroyDomain, pb.DomainRef(name=name),
                         timeout=CALL_TIMEOUT_S)
        view = self.runner.hosts[dom.host]
        view.used_ram -= dom.ram
        view.domains.pop(name, None)
        self.known[name] = False
        return {"host": dom.host}

    # ---- where things are

    def _view(self, name: str) -> DomainView:
        for h in self.runner.hosts.values():
            if name in h.domains:
                return h.domains[name]
        raise errors.NotFound(f"no domain {name!r} in the fleet (as the scenario knows "
                              "it: those there at its start, and those it created)")

    def _where(self, name: str) -> list[str]:
        """The hosts that may hold the running guest now: a move under way's source
        (until its commit) and destination, else where the plan has it."""
        for row in reversed(self.runner.rows):
            if row.domain == name and row.task is not None and not row.task.done():
                return [row.source, row.dest]
        try:
            return [self._view(name).host]
        except errors.NotFound:
            return []

    def _agent(self, host: str) -> AgentClient:
        return AgentClient(self.fleet.agents[host].address, f"agent {host}")

    # ---- the account

    async def _result(self, total_s: float) -> dict:
        failed = sum(not s["ok"] for s in self.steps)
        return {"scenario": self.spec.name, "scenario-file": self.spec.path,
                "fleet-file": self.fleet.path, "caps": operation.caps_of(self.fleet),
                "total-time-ms": round(total_s * 1e3, 3), "steps": self.steps,
                "steps-failed": failed,
                **await operation.account(self.fleet, self.runner, self.known,
                                          clean=not failed)}


def _planned(moves, unplaced) -> dict:
    return {"moves": [f"{m.domain.name} {m.source}->{m.dest}" for m in moves],
            "unplaced": [{"domain": u.domain.name, "why": u.why} for u in unplaced]}


def _brief(detail: dict) -> str:
    if "moves" in detail:
        out = f"{len(detail['moves'])} move(s) queued"
        if detail.get("unplaced"):
            out += ", not moved: " + ", ".join(f"{u['domain']} ({u['why']})"
                                              for u in detail["unplaced"])
        return out
    return ", ".join(f"{k} {v}" for k, v in detail.items())

"""What the fleet holds now: each agent's RAM, labels and domains, and its migration
ledger, asked of the agents themselves."""

from __future__ import annotations

import asyncio

from pvmig import errors
from pvmig._proto import pvmig_pb2 as pb
from pvmig.fleet.config import Fleet
from pvmig.fleet.placement import DomainView, HostView
from pvmig.rpc.client import AgentClient

ASK_TIMEOUT_S = 10.0


async def survey(fleet: Fleet) -> dict[str, HostView]:
    """Every agent's view, or Unavailable naming each that did not answer (a plan made
    without one of them could place a domain on a host that is down, or miss a copy)."""
    names = list(fleet.agents)
    answers = await asyncio.gather(*(_host(fleet, n) for n in names), return_exceptions=True)
    down = [f"{n} ({fleet.agents[n].address}): {a}" for n, a in zip(names, answers)
            if isinstance(a, BaseException)]
    if down:
        raise errors.Unavailable("the fleet's agents must all answer; not: " + "; ".join(down))
    return dict(zip(names, answers))


async def _host(fleet: Fleet, name: str) -> HostView:
    agent = fleet.agents[name]
    async with AgentClient(agent.address, f"agent {name}") as c:
        hello = await c.hello("fleet")
        if hello.agent_name != name:
            raise errors.FailedPrecondition(
                f"the agent at {agent.address} calls itself {hello.agent_name!r}, not "
                f"{name!r} as the fleet file says")
        reply = await c.call(c.agent.ListDomains, pb.ListDomainsRequest(),
                             timeout=ASK_TIMEOUT_S)
    view = HostView(name=name, address=agent.address, labels=dict(agent.labels),
                    max_ram=hello.max_ram_bytes)
    for d in reply.domains:
        view.used_ram += d.ram_bytes
        view.domains[d.name] = DomainView(d.name, name, d.ram_bytes, dict(d.labels), d.state)
    return view


async def census(fleet: Fleet, names: set[str]) -> dict[str, list[dict]]:
    """Where each named domain is, on every agent, and how its guest's checks stand:
    after a fleet's work each must run on exactly one host."""
    hosts = await survey_domains(fleet)
    out: dict[str, list[dict]] = {n: [] for n in sorted(names)}
    for host, domains in hosts.items():
        for d in domains:
            if d.name in out:
                out[d.name].append({"host": host, "state": d.state,
                                    "checks": d.guest.checks_run,
                                    "failed": d.guest.checks_failed})
    return out


async def survey_domains(fleet: Fleet) -> dict[str, list]:
    async def one(name):
        async with AgentClient(fleet.agents[name].address, f"agent {name}") as c:
            return (await c.call(c.agent.ListDomains, pb.ListDomainsRequest(),
                                 timeout=ASK_TIMEOUT_S)).domains
    names = list(fleet.agents)
    return dict(zip(names, await asyncio.gather(*(one(n) for n in names))))


async def ledgers(fleet: Fleet) -> dict[str, list]:
    """Each agent's migration ledger (pvmig.host.ledger), by agent name."""
    async def one(name):
        async with AgentClient(fleet.agents[name].address, f"agent {name}") as c:
            return list((await c.call(c.agent.ListMigrations, pb.ListMigrationsRequest(),
                                      timeout=ASK_TIMEOUT_S)).migrations)
    names = list(fleet.agents)
    return dict(zip(names, await asyncio.gather(*(one(n) for n in names))))


def most_at_once(intervals: list[tuple[int, int]]) -> int:
    """The most intervals open at one instant (an end before a start at the same ns:
    a slot given back and taken again is not two at once)."""
    events = sorted([(b, 1) for b, _ in intervals] + [(e, -1) for _, e in intervals])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most

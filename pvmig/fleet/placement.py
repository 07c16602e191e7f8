"""Where domains go: by free RAM and labels, planned before anything moves (pure).

A host's free RAM is its agent's --max-ram less every domain it holds, those arriving
included; a plan reserves what it places, so that two domains are not counted into the
same free space. Evacuation places the largest first (first-fit decreasing: the big ones
have the fewest choices), each on the host with the most free RAM among those its
policy allows; rebalancing moves one domain at a time from the fullest host to the
emptiest while that narrows the spread.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from pvmig import labels


@dataclass
class HostView:
    name: str
    address: str
    labels: dict
    max_ram: int
    used_ram: int = 0
    domains: dict = field(default_factory=dict)  # name -> DomainView

    @property
    def free_ram(self) -> int:
        return self.max_ram - self.used_ram

    @property
    def load(self) -> float:
        return self.used_ram / self.max_ram if self.max_ram else 1.0


@dataclass(frozen=True)
class DomainView:
    name: str
    host: str
    ram: int
    labels: dict
    state: str = "running"


@dataclass(frozen=True)
class Move:
    domain: DomainView
    source: str
    dest: str


@dataclass(frozen=True)
class Unplaced:
    domain: DomainView
    why: str


def best_host(dom: DomainView, hosts: list[HostView], allowed: dict,
              exclude: frozenset | set = frozenset()) -> HostView | str:
    """The host with the most free RAM that takes `dom` (its labels match `allowed`, not
    its own host, not excluded); else why none does."""
    fitting = [h for h in hosts if h.name != dom.host and h.name not in exclude
               and labels.matches(allowed, h.labels)]
    if not fitting:
        return (f"no other host carries the labels {allowed}" if allowed
                else "no other host is left to take it")
    roomy = [h for h in fitting if h.free_ram >= dom.ram]
    if not roomy:
        most = max(fitting, key=lambda h: h.free_ram)
        return (f"needs {dom.ram >> 20} MiB; the most free on a host it may go to is "
                f"{most.free_ram >> 20} MiB ({most.name})")
    return min(roomy, key=lambda h: (-h.free_ram, h.name))


def reserve(move: Move, hosts: dict[str, HostView]) -> None:
    hosts[move.dest].used_ram += move.domain.ram
    hosts[move.dest].domains[move.domain.name] = replace(move.domain, host=move.dest)
    hosts[move.source].used_ram -= move.domain.ram
    hosts[move.source].domains.pop(move.domain.name, None)


def evacuation(source: str, hosts: dict[str, HostView], allowed_of,
               busy: frozenset | set = frozenset()) -> tuple[list[Move], list[Unplaced]]:
    """Every domain off `source`: moves, and those that fit nowhere. allowed_of(dom):
    the host labels its policy asks for; busy: domains a move is under way for already
    (their next move waits for the end of this one). `hosts` is changed as the plan
    reserves."""
    others = [h for n, h in hosts.items() if n != source]
    moves, unplaced = [], []
    for dom in sorted(hosts[source].domains.values(), key=lambda d: (-d.ram, d.name)):
        if dom.state != "running":  # (migrating already, or crashed: not ours to move)
            unplaced.append(Unplaced(dom, f"it is {dom.state}, not running"))
            continue
        if dom.name in busy:
            unplaced.append(Unplaced(dom, "a move of it is under way already"))
            continue
        where = best_host(dom, others, allowed_of(dom))
        if isinstance(where, str):
            unplaced.append(Unplaced(dom, where))
            continue
        move = Move(dom, source, where.name)
        reserve(move, hosts)
        moves.append(move)
    return moves, unplaced


def spread(hosts: dict[str, HostView]) -> float:
    loads = [h.load for h in hosts.values()]
    return max(loads) - min(loads)


def rebalance(hosts: dict[str, HostView], allowed_of, max_moves: int = 64,
              busy: frozenset | set = frozenset()) -> list[Move]:
    """Moves that even the hosts' RAM (as shares of their --max-ram): each time, from
    the fullest host, the domain whose move to the emptiest host it may go to narrows
    the spread most; until no move narrows it. A domain moves at most once, and not one
    in `busy` (a move of it under way)."""
    moves: list[Move] = []
    moved: set[str] = set()
    while len(moves) < max_moves:
        now = spread(hosts)
        best, best_spread = None, now
        fullest = max(hosts.values(), key=lambda h: (h.load, h.name))
        for dom in sorted(fullest.domains.values(), key=lambda d: d.name):
            if dom.name in moved or dom.name in busy or dom.state != "running":
                continue
            allowed = allowed_of(dom)
            fits = [h for h in hosts.values() if h is not fullest
                    and h.free_ram >= dom.ram and labels.matches(allowed, h.labels)]
            if not fits:
                continue
            where = min(fits, key=lambda h: (h.load, h.name))  # the emptiest it may go to
            move = Move(dom, fullest.name, where.name)
            reserve(move, hosts)
            after = spread(hosts)
            reserve(Move(dom, where.name, fullest.name), hosts)  # (undone: only a trial)
            if after < best_spread - 1e-9:
                best, best_spread = move, after
        if best is None:
            return moves
        reserve(best, hosts)
        moves.append(best)
        moved.add(best.domain.name)
    return moves

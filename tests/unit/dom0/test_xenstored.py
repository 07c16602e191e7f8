"""The xenstore daemon (pvmig/dom0/xenstored/): tree, permissions, watches, transactions,
the wire, and a guest's XsClient served through a real ring page."""

from __future__ import annotations

import logging
import struct
import threading

import msgpack
import numpy as np
import pytest

from pvmig.dom0.xenstored import (
    MAX_TRANSACTIONS,
    MAX_WATCHES,
    OUTBOX_LIMIT,
    Connection,
    RingServer,
    Xenstored,
)
from pvmig.pv.xenstore import (
    REQ_PROD,
    Decoder,
    XenstoreError,
    XsClient,
    XsMessage,
    XsRing,
    XsType,
    encode,
)

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def xs() -> Xenstored:
    xs = Xenstored()
    xs.introduce(3, mfn=1000, evtchn=5)
    xs.introduce(4, mfn=2000, evtchn=6)
    return xs


@pytest.fixture
def dom0(xs: Xenstored) -> Connection:
    return xs.connect(0)


def err(fn, *args, **kw) -> str:
    """The error string `fn(*args)` raises."""
    with pytest.raises(XenstoreError) as e:
        fn(*args, **kw)
    return e.value.err


class Events:
    """A watch callback that records (path, token)."""

    def __init__(self) -> None:
        self.got: list[tuple[str, str]] = []

    def __call__(self, path: str, token: str) -> None:
        self.got.append((path, token))

    def take(self) -> list[tuple[str, str]]:
        got, self.got = self.got, []
        return got


# ---- the tree


def test_write_read_directory_mkdir_rm(dom0):
    dom0.write("/a/b", "1")
    dom0.write("/a/c", b"\x00\xff")
    assert dom0.read("/a/b") == b"1"
    assert dom0.read("/a/c") == b"\x00\xff"
    assert dom0.read("/a") == b""  # an implicit parent
    assert dom0.directory("/a") == ["b", "c"]
    dom0.mkdir("/a/d")
    dom0.mkdir("/a/d")  # again: fine, unchanged
    assert dom0.directory("/a") == ["b", "c", "d"] and dom0.read("/a/d") == b""
    dom0.write("/a/b", "2")
    assert dom0.read("/a/b") == b"2" and dom0.directory("/a") == ["b", "c", "d"]
    dom0.rm("/a/c")
    assert dom0.directory("/a") == ["b", "d"]
    assert err(dom0.read, "/a/c") == "ENOENT"
    dom0.rm("/a/c")           # already gone, its parent exists: fine
    assert err(dom0.rm, "/x/y") == "ENOENT"
    assert err(dom0.rm, "/") == "EINVAL"
    dom0.rm("/a")
    assert not dom0.exists("/a") and not dom0.exists("/a/b")
    assert "a" not in dom0.directory("/")


def test_introduce_creates_the_domain_home(xs, dom0):
    assert dom0.directory("/local/domain") == ["0", "3", "4"]
    assert dom0.get_perms("/local/domain/3") == [(3, "n")]


def test_relative_paths_are_under_the_domain_home(xs, dom0):
    g = xs.connect(3)
    g.write("data/x", "1")
    assert dom0.read("/local/domain/3/data/x") == b"1"
    assert g.read("/local/domain/3/data/x") == b"1"
    dom0.write("name", "zero")
    assert dom0.read("/local/domain/0/name") == b"zero"


def test_implicit_parents_are_owned_like_the_new_node(xs, dom0):
    g = xs.connect(3)
    g.write("a/b/c", "v")
    for path in ("a", "a/b", "a/b/c"):
        assert g.get_perms(path) == [(3, "n")]
    dom0.mkdir("/local/domain/3/shared")
    dom0.set_perms("/local/domain/3/shared", [(0, "n"), (3, "b")])
    g.write("shared/x/y", "1")  # a domain owns what it creates, keeping the grants
    assert g.get_perms("shared/x") == [(3, "n"), (3, "b")]
    assert g.get_perms("shared/x/y") == [(3, "n"), (3, "b")]
    dom0.write("/local/domain/3/shared/z", "1")  # dom0 creates with the parent's perms
    assert dom0.get_perms("/local/domain/3/shared/z") == [(0, "n"), (3, "b")]


@pytest.mark.parametrize("path", ["", "/a//b", "/a/", "a b", "/a\0b", "/é",
                                  "/" + "a" * 3100, "x" * 2100])
def test_bad_paths_are_refused(dom0, path):
    assert err(dom0.write, path, "v") == "EINVAL"
    assert err(dom0.read, path) == "EINVAL"


# ---- permissions


def test_a_domain_is_denied_another_domains_node(xs, dom0):
    g3, g4 = xs.connect(3), xs.connect(4)
    g3.write("secret", "s")
    assert err(g4.read, "/local/domain/3/secret") == "EACCES"
    assert err(g4.write, "/local/domain/3/secret", "x") == "EACCES"
    assert err(g4.write, "/local/domain/3/new", "x") == "EACCES"  # creation: the parent says
    assert err(g4.rm, "/local/domain/3/secret") == "EACCES"
    assert err(g4.directory, "/local/domain/3") == "EACCES"
    # a missing node under a node one may not read: EACCES, saying nothing
    assert err(g4.read, "/local/domain/3/nothing") == "EACCES"
    assert err(g3.read, "/local/domain/3/nothing") == "ENOENT"
    # dom0 may do anything
    assert dom0.read("/local/domain/3/secret") == b"s"
    dom0.write("/local/domain/3/secret", "t")
    assert g3.read("secret") == b"t"


def test_permissions_grant_read_or_write_to_named_domains(xs, dom0):
    g3, g4 = xs.connect(3), xs.connect(4)
    g3.write("shared", "v")
    g3.set_perms("shared", [(3, "n"), (4, "r")])
    assert g4.read("/local/domain/3/shared") == b"v"
    assert err(g4.write, "/local/domain/3/shared", "x") == "EACCES"
    g3.set_perms("shared", [(3, "w")])  # everyone else may write, not read
    g4.write("/local/domain/3/shared", "w4")
    assert err(g4.read, "/local/domain/3/shared") == "EACCES"
    assert g3.read("shared") == b"w4"
    # only the owner sets permissions, and only dom0 gives a node away
    assert err(g4.set_perms, "/local/domain/3/shared", [(4, "b")]) == "EACCES"
    assert err(g3.set_perms, "shared", [(4, "n")]) == "EACCES"
    dom0.set_perms("/local/domain/3/shared", [(4, "n")])
    assert g4.read("/local/domain/3/shared") == b"w4"
    assert err(g3.read, "shared") == "EACCES"


def test_get_and_set_perms_on_the_wire(xs, dom0):
    g3 = Wire(xs.connect(3))
    assert g3.ok(XsType.WRITE, b"node\0v") == b"OK\0"
    assert g3.ok(XsType.SET_PERMS, b"node\0n3\0r4\0") == b"OK\0"
    assert g3.ok(XsType.GET_PERMS, b"node\0") == b"n3\0r4\0"
    assert g3.error(XsType.SET_PERMS, b"node\0x3\0") == "EINVAL"
    assert g3.error(XsType.SET_PERMS, b"node\0") == "EINVAL"


# ---- watches


def test_a_watch_fires_at_once_then_on_changes_at_or_below_its_path(dom0):
    ev = Events()
    token = dom0.watch("/a/b", ev, token="tk")
    assert token == "tk"
    assert ev.take() == [("/a/b", "tk")]
    dom0.write("/a/b", "1")
    dom0.write("/a/b/c/d", "2")
    dom0.mkdir("/a/b/e")
    dom0.set_perms("/a/b", [(0, "r")])
    dom0.rm("/a/b/c")
    assert ev.take() == [("/a/b", "tk"), ("/a/b/c/d", "tk"), ("/a/b/e", "tk"),
                         ("/a/b", "tk"), ("/a/b/c", "tk")]
    dom0.write("/a/bc", "x")   # a sibling that shares the prefix
    dom0.write("/a", "x")      # a parent
    dom0.write("/z", "x")
    dom0.mkdir("/a/b/e")       # exists already: no change
    assert ev.take() == []
    dom0.unwatch("/a/b", "tk")
    dom0.write("/a/b", "2")
    assert ev.take() == []
    assert err(dom0.unwatch, "/a/b", "tk") == "ENOENT"


def test_removing_a_node_fires_the_watches_below_it(dom0):
    ev = Events()
    dom0.write("/dev/vbd/768/state", "4")
    dom0.watch("/dev/vbd/768/state", ev, token="s")
    dom0.watch("/dev/vbd/999", ev, token="missing")  # may watch a node not there
    ev.take()
    dom0.rm("/dev")
    assert sorted(ev.take()) == [("/dev/vbd/768/state", "s"), ("/dev/vbd/999", "missing")]


def test_watches_of_one_path_with_two_tokens_and_a_duplicate(dom0):
    a, b = Events(), Events()
    dom0.watch("/p", a, token="1")
    dom0.watch("/p", b, token="2")
    assert err(dom0.watch, "/p", a, token="1") == "EEXIST"
    dom0.write("/p", "x")
    assert a.take() == [("/p", "1"), ("/p", "1")] and b.take() == [("/p", "2"), ("/p", "2")]


def test_a_domain_hears_only_of_nodes_it_may_read(xs, dom0):
    g3, g4 = xs.connect(3), xs.connect(4)
    ev = Events()
    g4.watch("/local/domain/3", ev, token="spy")
    assert ev.take() == [("/local/domain/3", "spy")]  # the registration itself
    g3.write("secret", "s")
    dom0.write("/local/domain/3/other", "o")
    assert ev.take() == []
    g3.write("public", "p")
    g3.set_perms("public", [(3, "r")])
    assert ev.take() == [("/local/domain/3/public", "spy")]  # the set_perms made it readable
    g3.write("public", "q")
    assert ev.take() == [("/local/domain/3/public", "spy")]


def test_relative_watches_hear_relative_paths(xs):
    g = xs.connect(3)
    ev = Events()
    g.watch("device", ev, token="t")
    g.write("device/vbd/768/state", "1")
    assert ev.take() == [("device", "t"), ("device/vbd/768/state", "t")]


def test_watches_are_dropped_on_release_and_reset(xs, dom0):
    g = Wire(xs.connect(3))
    assert g.ok(XsType.WATCH, b"data\0t\0") == b"OK\0"
    assert g.events() == [("data", "t")]
    dom0.write("/local/domain/3/data", "1")
    assert g.events() == [("data", "t")]
    assert g.ok(XsType.RESET_WATCHES, b"") == b"OK\0"
    dom0.write("/local/domain/3/data", "2")
    assert g.events() == []
    assert g.ok(XsType.WATCH, b"data\0t\0") == b"OK\0"
    g.events()
    ev = Events()
    dom0.watch("@releaseDomain", ev, token="rel")
    ev.take()
    xs.release(3)
    assert ev.take() == [("@releaseDomain", "rel")]
    assert g.conn.closed and g.conn.handle(XsMessage.of(XsType.READ, "data")) == []
    dom0.write("/local/domain/3/data", "3")  # no one is told
    assert g.conn.take_events() == []
    assert err(xs.connect, 3) == "ENOENT"


def test_special_watches_for_introduce_and_release_go_to_dom0(xs, dom0):
    ev, ev3 = Events(), Events()
    dom0.watch("@introduceDomain", ev, token="i")
    xs.connect(3).watch("@introduceDomain", ev3, token="i3")
    ev.take(), ev3.take()
    xs.introduce(9, 1, 2)
    assert ev.take() == [("@introduceDomain", "i")]
    assert ev3.take() == []
    xs.domain_shutdown(9)
    xs.domain_shutdown(9)  # once, until RESUME re-arms it
    rel = Events()
    dom0.watch("@releaseDomain", rel, token="r")
    rel.take()
    xs.resume(9)
    xs.domain_shutdown(9)
    assert rel.take() == [("@releaseDomain", "r")]


def test_watch_callbacks_may_change_the_tree_and_run_in_order(dom0):
    order = []

    def first(path: str, token: str) -> None:
        order.append(("first", path))
        if path == "/a":
            dom0.write("/b", "from first")  # runs after this callback, not inside it

    def second(path: str, token: str) -> None:
        order.append(("second", path))

    dom0.write("/a", "0")
    dom0.watch("/a", first, token="f")
    dom0.watch("/", second, token="s")
    order.clear()
    dom0.write("/a", "1")
    assert order == [("first", "/a"), ("second", "/a"), ("second", "/b")]


def test_a_failing_callback_is_logged_and_the_daemon_goes_on(dom0, caplog):
    def bad(path: str, token: str) -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="pvmig.dom0.xenstored"):
        dom0.watch("/a", bad, token="bad")
        dom0.write("/a", "1")
    assert "watch callback for /a (token bad) failed" in caplog.text
    assert dom0.read("/a") == b"1"


def test_the_watch_quota(xs, dom0):
    g = xs.connect(3)
    for i in range(MAX_WATCHES):
        g.watch(f"w{i}", lambda p, t: None)
    assert err(g.watch, "one-more", lambda p, t: None) == "E2BIG"
    for i in range(MAX_WATCHES + 1):  # dom0 is not limited
        dom0.watch(f"/w{i}", lambda p, t: None)


# ---- transactions


def test_a_transaction_sees_a_snapshot_plus_its_own_writes(dom0):
    dom0.write("/x", "1")
    dom0.write("/y", "1")
    t = dom0.transaction()
    dom0.write("/y", "2")            # after the start: not in the snapshot
    assert t.read("/y") == b"1"
    t.write("/x", "t")
    t.write("/new/deep", "n")
    assert t.read("/x") == b"t" and t.directory("/new") == ["deep"]
    assert dom0.read("/x") == b"1" and not dom0.exists("/new")  # not yet visible
    t.abort()
    assert dom0.read("/x") == b"1" and not dom0.exists("/new")


def test_commit_applies_and_fires_watches_at_commit(dom0):
    ev = Events()
    dom0.watch("/d", ev, token="w")
    ev.take()
    with dom0.transaction() as t:
        t.write("/d/a", "1")
        t.write("/d/b", "2")
        t.rm("/d/a")
        assert ev.take() == []
    assert ev.take() == [("/d/a", "w"), ("/d/b", "w"), ("/d/a", "w")]
    assert dom0.directory("/d") == ["b"]


def test_a_conflict_gives_eagain_and_a_retry_succeeds(dom0):
    dom0.write("/counter", "0")

    def bump(t) -> None:
        value = int(t.read("/counter"))
        if not attempts:
            dom0.write("/counter", "10")  # someone else, between read and commit
        attempts.append(value)
        t.write("/counter", str(value + 1))

    attempts: list[int] = []
    t = dom0.transaction()
    bump(t)
    assert err(t.commit) == "EAGAIN"
    assert dom0.read("/counter") == b"10"
    attempts.clear()
    dom0.write("/counter", "0")
    dom0.transact(bump)
    assert attempts == [0, 10]  # the first try conflicted; the retry saw 10
    assert dom0.read("/counter") == b"11"


def test_conflicts_cover_nodes_found_missing_and_writes_only(dom0):
    t = dom0.transaction()
    assert not t.exists("/flag")
    t.write("/out", "1")
    dom0.write("/flag", "set")  # the transaction decided on its absence
    assert err(t.commit) == "EAGAIN"

    dom0.write("/w", "0")
    t = dom0.transaction()
    t.write("/w", "t")          # a blind write
    dom0.write("/w", "other")
    assert err(t.commit) == "EAGAIN"

    dom0.write("/mine", "0")
    t = dom0.transaction()      # unrelated changes do not conflict
    t.write("/mine", "1")
    dom0.write("/unrelated", "1")
    t.commit()
    assert dom0.read("/mine") == b"1"

    dom0.mkdir("/d")
    t = dom0.transaction()      # creating a node changes its parent's list of children
    t.write("/d/one", "1")
    dom0.write("/d/two", "2")
    assert err(t.commit) == "EAGAIN"
    assert err(t.commit) == "EINVAL"  # ended


def test_transactions_on_the_wire(xs, dom0):
    g = Wire(xs.connect(3))
    tx = int(g.ok(XsType.TRANSACTION_START, b"\0").rstrip(b"\0"))
    assert g.ok(XsType.WRITE, b"k\0v", tx=tx) == b"OK\0"
    assert g.ok(XsType.READ, b"k\0", tx=tx) == b"v"
    assert g.error(XsType.READ, b"k\0") == "ENOENT"
    assert g.error(XsType.READ, b"k\0", tx=tx + 100) == "ENOENT"  # no such transaction
    assert g.error(XsType.TRANSACTION_START, b"\0", tx=tx) == "EBUSY"
    assert g.error(XsType.TRANSACTION_END, b"X\0", tx=tx) == "EINVAL"
    assert g.ok(XsType.TRANSACTION_END, b"T\0", tx=tx) == b"OK\0"
    assert g.ok(XsType.READ, b"k\0") == b"v"
    assert g.error(XsType.TRANSACTION_END, b"T\0", tx=tx) == "ENOENT"
    # another domain cannot use this domain's transaction
    tx = int(g.ok(XsType.TRANSACTION_START, b"\0").rstrip(b"\0"))
    assert Wire(xs.connect(4)).error(XsType.READ, b"k\0", tx=tx) == "ENOENT"


def test_the_transaction_quota(xs, dom0):
    g = xs.connect(3)
    for _ in range(MAX_TRANSACTIONS):
        g.transaction()
    assert err(g.transaction) == "ENOSPC"
    for _ in range(MAX_TRANSACTIONS + 1):
        dom0.transaction()


# ---- the wire


class Wire:
    """Talks to a Connection in messages."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.req_id = 100
        self.pending: list[XsMessage] = []

    def send(self, type_, payload: bytes, tx: int = 0) -> XsMessage:
        self.req_id += 1
        out = self.conn.handle(XsMessage(type_, self.req_id, tx, payload))
        reply = out[0]
        assert reply.req_id == self.req_id and reply.tx_id == tx
        self.pending += out[1:]
        return reply

    def ok(self, type_, payload: bytes, tx: int = 0) -> bytes:
        reply = self.send(type_, payload, tx)
        assert reply.type == type_, reply
        return reply.payload

    def error(self, type_, payload: bytes, tx: int = 0) -> str:
        reply = self.send(type_, payload, tx)
        assert reply.type == XsType.ERROR, reply
        assert reply.payload.endswith(b"\0")
        return reply.payload[:-1].decode()

    def events(self) -> list[tuple[str, str]]:
        msgs = self.pending + self.conn.take_events()
        self.pending = []
        assert all(m.type == XsType.WATCH_EVENT and m.req_id == 0 for m in msgs)
        return [tuple(m.strings()) for m in msgs]


def test_replies_on_the_wire(xs, dom0):
    g = Wire(xs.connect(3))
    assert g.ok(XsType.WRITE, b"a/b\0value") == b"OK\0"
    assert g.ok(XsType.WRITE, b"a/empty\0") == b"OK\0"
    assert g.ok(XsType.READ, b"a/b\0") == b"value"   # no NUL added
    assert g.ok(XsType.DIRECTORY, b"a\0") == b"b\0empty\0"
    assert g.ok(XsType.MKDIR, b"m\0") == b"OK\0"
    assert g.ok(XsType.DIRECTORY, b"m\0") == b""
    assert g.ok(XsType.RM, b"a\0") == b"OK\0"
    assert g.ok(XsType.GET_DOMAIN_PATH, b"7\0") == b"/local/domain/7\0"
    assert g.ok(XsType.WATCH, b"m\0tok\0") == b"OK\0"
    assert g.events() == [("m", "tok")]  # after the ack
    assert g.ok(XsType.UNWATCH, b"m\0tok\0") == b"OK\0"


def test_dom0_only_requests(xs, dom0):
    w0, g = Wire(dom0), Wire(xs.connect(3))
    for type_, payload in [(XsType.INTRODUCE, b"7\0" b"123\0" b"9\0"), (XsType.RELEASE, b"4\0"),
                           (XsType.RESUME, b"3\0"), (XsType.IS_DOMAIN_INTRODUCED, b"3\0"),
                           (XsType.SET_TARGET, b"3\0" b"4\0")]:
        assert g.error(type_, payload) == "EACCES", type_
    assert w0.ok(XsType.IS_DOMAIN_INTRODUCED, b"7\0") == b"F\0"
    assert w0.ok(XsType.INTRODUCE, b"7\0" b"123\0" b"9\0") == b"OK\0"
    assert w0.ok(XsType.IS_DOMAIN_INTRODUCED, b"7\0") == b"T\0"
    assert dom0.get_perms("/local/domain/7") == [(7, "n")]
    assert w0.ok(XsType.INTRODUCE, b"7\0" b"123\0" b"10\0") == b"OK\0"  # a new channel
    assert w0.error(XsType.INTRODUCE, b"7\0" b"124\0" b"10\0") == "EINVAL"  # another frame
    assert w0.error(XsType.INTRODUCE, b"0\0" b"1\0" b"1\0") == "EINVAL"
    assert w0.ok(XsType.RESUME, b"7\0") == b"OK\0"
    assert w0.ok(XsType.RELEASE, b"7\0") == b"OK\0"
    assert w0.error(XsType.RELEASE, b"7\0") == "ENOENT"
    assert w0.error(XsType.RESUME, b"7\0") == "ENOENT"
    # a stub domain with a target may act as its target's owner
    assert w0.ok(XsType.SET_TARGET, b"4\0" b"3\0") == b"OK\0"
    xs.connect(3).write("private", "p")
    assert xs.connect(4).read("/local/domain/3/private") == b"p"


@pytest.mark.parametrize("type_,payload", [
    (XsType.READ, b"no-nul"),
    (XsType.READ, b""),
    (XsType.READ, b"a\0b\0"),            # one argument only
    (XsType.READ, b"a//b\0"),
    (XsType.READ, b"\xff\0"),
    (XsType.WRITE, b"no-separator"),
    (XsType.WRITE, b"bad path\0v"),
    (XsType.WATCH, b"only-path\0"),
    (XsType.WATCH, b"p\0t"),             # not NUL-terminated
    (XsType.UNWATCH, b"p\0"),
    (XsType.GET_DOMAIN_PATH, b"x\0"),
    (XsType.GET_DOMAIN_PATH, b"99999\0"),
    (XsType.TRANSACTION_END, b"T\0"),    # outside a transaction
    (XsType.WATCH_EVENT, b"p\0t\0"),     # not a request
    (XsType.ERROR, b"EINVAL\0"),
    (XsType.SET_PERMS, b"p\0r\0"),
])
def test_malformed_requests_get_einval_and_the_daemon_goes_on(xs, type_, payload):
    g = Wire(xs.connect(3))
    assert g.error(type_, payload) == "EINVAL"
    assert g.ok(XsType.WRITE, b"still\0works") == b"OK\0"
    assert g.ok(XsType.READ, b"still\0") == b"works"


def test_an_unknown_type_handed_to_a_connection_is_einval(xs):
    reply = xs.connect(3).handle(XsMessage(99, 5, 0, b""))  # type: ignore[arg-type]
    assert reply == [XsMessage.of(XsType.ERROR, "EINVAL", req_id=5)]


def test_a_reply_too_big_for_the_wire_is_an_error(dom0, xs):
    for i in range(400):
        dom0.write(f"/big/child-number-{i:04d}", "")
    g = Wire(xs.connect(0))
    assert g.error(XsType.DIRECTORY, b"/big\0") == "E2BIG"


# ---- a guest's client through a real ring


class Guest:
    """xenstored serving domain 3's ring, and domain 3's XsClient, in one process."""

    def __init__(self, xs: Xenstored, domid: int = 3, page: np.ndarray | None = None) -> None:
        self.page = np.zeros(4096, np.uint8) if page is None else page
        self.marks: list[tuple[int, int]] = []
        self.notified = {"guest": 0, "xenstored": 0}
        self.conn = xs.connect(domid)
        self.server = RingServer(self.conn, XsRing(self.page), self._notify_guest)
        self.client = XsClient(XsRing(self.page, on_write=lambda o, n: self.marks.append((o, n))),
                               self._notify_xenstored, wait=lambda t: self.server.pump(),
                               timeout=5)

    def _notify_guest(self) -> None:
        self.notified["guest"] += 1

    def _notify_xenstored(self) -> None:
        self.notified["xenstored"] += 1

    def settle(self) -> None:
        for _ in range(4):
            self.server.pump()
            self.client.poll()


def test_client_and_daemon_through_the_ring(xs, dom0):
    g = Guest(xs)
    c = g.client
    assert c.get_domain_path(3) == "/local/domain/3"
    c.write("data/x", "1")
    c.mkdir("data/dir")
    assert c.read("data/x") == b"1"
    assert c.directory("data") == ["x", "dir"]
    assert dom0.read("/local/domain/3/data/x") == b"1"
    c.rm("data/dir")
    assert c.directory("data") == ["x"]
    assert c.get_perms("data/x") == ["n3"]
    with pytest.raises(XenstoreError, match="xenstore READ data/nope: ENOENT"):
        c.read("data/nope")
    with pytest.raises(XenstoreError, match="EACCES"):
        c.read("/local/domain/4")
    assert g.notified["guest"] > 0 and g.notified["xenstored"] > 0


def test_watch_events_reach_the_client_through_the_ring(xs, dom0):
    g = Guest(xs)
    g.client.watch("control/shutdown", "ctl")
    g.settle()
    assert g.client.pop_watch_events() == [("control/shutdown", "ctl")]
    dom0.write("/local/domain/3/control/shutdown", "suspend")  # the toolstack asks
    g.settle()
    assert g.client.pop_watch_events() == [("control/shutdown", "ctl")]
    assert g.client.read("control/shutdown") == b"suspend"


def test_the_ring_wraps_many_times_with_large_values(xs, dom0):
    g = Guest(xs)
    value = bytes(range(1, 256)) * 15  # 3825 bytes: each request and reply wraps the ring
    for i in range(30):
        g.client.write(f"v{i % 3}", value[i:])
        assert g.client.read(f"v{i % 3}") == value[i:]
    assert g.server.requests == 60


def test_transactions_and_eagain_through_the_ring(xs, dom0):
    g = Guest(xs)
    c = g.client
    c.write("n", "0")
    tx = c.transaction_start()
    assert int(c.read("n", tx=tx)) == 0
    dom0.write("/local/domain/3/n", "5")
    c.write("n", "1", tx=tx)
    with pytest.raises(XenstoreError) as e:
        c.transaction_end(tx, commit=True)
    assert e.value.err == "EAGAIN"
    tx = c.transaction_start()
    c.write("n", str(int(c.read("n", tx=tx)) + 1), tx=tx)
    c.transaction_end(tx, commit=True)
    assert dom0.read("/local/domain/3/n") == b"6"


def test_xenstored_never_marks_the_guests_page(xs, dom0):
    g = Guest(xs)
    g.client.watch("w", "t")
    g.settle()
    g.client.pop_watch_events()
    g.marks.clear()
    before = g.page.copy()
    dom0.write("/local/domain/3/w", "x")  # xenstored alone writes an event into the page
    g.server.pump()
    assert not np.array_equal(before, g.page)
    assert g.marks == []                  # ...and nothing says so
    g.client.poll()                       # the guest's own store (rsp_cons) is marked
    assert g.marks == [(2056, 4)]


def test_unknown_types_get_einval_and_the_ring_goes_on(xs):
    g = Guest(xs)
    ring = XsRing(g.page)
    bad = struct.pack("<IIII", 99, 77, 0, 2) + b"x\0"
    ring.write_request(bad + encode(XsMessage.of(XsType.GET_DOMAIN_PATH, "3", req_id=78)))
    g.server.pump()
    replies = list(Decoder().feed(ring.read_response()))
    assert [(m.type, m.req_id, m.payload) for m in replies] == [
        (XsType.ERROR, 77, b"EINVAL\0"), (XsType.GET_DOMAIN_PATH, 78, b"/local/domain/3\0")]


def test_a_lost_stream_or_a_corrupt_ring_stops_that_ring_only(xs, dom0, caplog):
    g, h = Guest(xs, 3), Guest(xs, 4)
    XsRing(g.page).write_request(struct.pack("<IIII", 2, 1, 0, 5000))
    with caplog.at_level(logging.ERROR):
        g.server.pump()
    assert "length 5000 exceeds 4096" in g.server.broken
    assert g.server.pump() is False
    struct.pack_into("<I", h.page, REQ_PROD, 5000)  # prod 5000 bytes past cons
    with caplog.at_level(logging.ERROR):
        h.server.pump()
    assert "request ring is corrupt" in h.server.broken
    assert "no longer served" in caplog.text
    ok = Guest(xs, 3)  # a fresh ring for domain 3 works; the daemon is fine
    ok.client.write("x", "1")
    assert dom0.read("/local/domain/3/x") == b"1"


def test_a_guest_that_does_not_read_stops_being_served(xs, dom0):
    g = Guest(xs)
    ring = XsRing(g.page)
    req = encode(XsMessage.of(XsType.GET_DOMAIN_PATH, "3", req_id=1))
    sent = 0
    for _ in range(3000):  # requests, never reading a reply
        if ring.write_request(req) == len(req):
            sent += 1
        g.server.pump()
    # the replies filled the response ring and the outbox; then the requests the ring
    assert sent < 1000 and g.server.requests < sent
    assert len(g.server._out) < OUTBOX_LIMIT + 32
    replies = []
    decoder = Decoder()
    while True:  # the guest reads at last: every request gets its reply
        data = ring.read_response()
        g.server.pump()
        if not data and not ring.requests_pending() and not g.server._out:
            break
        replies += decoder.feed(data)
    assert len(replies) == sent and g.server.requests == sent


def test_the_ring_served_from_another_thread(xs, dom0):
    """The agent pumps the ring in its own thread when the guest's channel fires."""
    page = np.zeros(4096, np.uint8)
    to_xenstored, to_guest = threading.Event(), threading.Event()
    conn = xs.connect(3)
    conn.on_event = to_xenstored.set
    server = RingServer(conn, XsRing(page), to_guest.set)
    stop = threading.Event()

    def agent() -> None:
        while not stop.is_set():
            if to_xenstored.wait(0.01):
                to_xenstored.clear()
            server.pump()

    def guest_wait(timeout: float) -> None:
        to_guest.wait(timeout)
        to_guest.clear()

    thread = threading.Thread(target=agent)
    thread.start()
    try:
        client = XsClient(XsRing(page), to_xenstored.set, wait=guest_wait, timeout=5)
        client.watch("w", "t")
        for i in range(200):
            client.write("w", str(i))
            assert client.read("w") == str(i).encode()
        client.poll()
        events = client.pop_watch_events()
        assert events[0] == ("w", "t") and len(events) >= 2
    finally:
        stop.set()
        thread.join(5)


# ---- the guest's entries, moved with the device state


def test_dump_and_load_move_a_domains_subtree(xs, dom0):
    g = xs.connect(3)
    g.write("data/a", b"\x00\x01")
    g.write("data/b/c", "deep")
    g.set_perms("data/a", [(3, "n"), (0, "r"), (4, "r")])
    dom0.write("/local/domain/3/device/vbd/768/state", "4")
    dump = xs.dump(3, exclude=["device"])
    wire = msgpack.unpackb(msgpack.packb(dump), raw=False)

    dest = Xenstored()
    dest.introduce(12, mfn=5, evtchn=1)
    d0 = dest.connect(0)
    d0.write("/local/domain/12/stale", "gone after load")
    ev = Events()
    d0.watch("/local/domain/12/data", ev, token="w")
    ev.take()
    dest.load(12, wire)
    assert d0.read("/local/domain/12/data/a") == b"\x00\x01"
    assert d0.read("/local/domain/12/data/b/c") == b"deep"
    assert not d0.exists("/local/domain/12/stale")
    assert not d0.exists("/local/domain/12/device")
    assert d0.get_perms("/local/domain/12") == [(12, "n")]
    assert d0.get_perms("/local/domain/12/data/a") == [(12, "n"), (0, "r"), (4, "r")]
    assert d0.get_perms("/local/domain/12/data/b/c") == [(12, "n")]
    assert ev.take()  # the load fired the watch
    assert dest.connect(12).read("data/b/c") == b"deep"  # the guest owns them again
    remapped = [[rel, value, [[12 if d == 3 else d, p] for d, p in perms]]
                for rel, value, perms in wire["nodes"]]
    assert dest.dump(12) == {"domid": 12, "nodes": remapped}


def test_load_refuses_bad_dumps(xs):
    with pytest.raises(XenstoreError, match="must start with the domain's home"):
        xs.load(3, {"domid": 3, "nodes": []})
    with pytest.raises(XenstoreError, match="bad path"):
        xs.load(3, {"domid": 3, "nodes": [["", b"", [[3, "n"]]], ["a//b", b"", [[3, "n"]]]]})
    with pytest.raises(XenstoreError, match="bad permission"):
        xs.load(3, {"domid": 3, "nodes": [["", b"", [[3, "x"]]]]})
    with pytest.raises(XenstoreError, match="not a xenstore dump"):
        xs.load(3, {"nodes": []})
    with pytest.raises(XenstoreError, match="not a xenstore dump"):
        xs.load(3, {"domid": 3, "nodes": [["", b""]]})

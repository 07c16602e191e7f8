"""xenstored: the host's tree of small strings, with permissions, watches and transactions.

The daemon's logic only, with no transport of its own: the host agent drives it. Each
domain talks to it through a `Connection`: a guest's connection is fed whole messages by
a `RingServer` pumping the ring in the guest's magic page; dom0's in-process users (the
toolstack, blkback, netback) call the same connection's Python methods directly and get
watch events as callbacks. Semantics follow C xenstored (tools/xenstored/core.c):

- Nodes: path -> value, permissions, children. Permissions are a list of (domid, perm),
  perm one of 'n' (none) 'r' 'w' 'b' (both); the first entry names the owner and gives
  everyone else's access; later entries grant particular domains. The owner and dom0
  may do anything. Access is checked on the node itself only, never on its parents,
  except that creating a node needs write access to its nearest existing ancestor. New
  nodes, and the parents created with them, inherit that ancestor's permissions, and an
  unprivileged domain owns what it creates.
- Paths: absolute, or relative to the connection's home /local/domain/<domid>. A name
  is made of [A-Za-z0-9-_@/], without "//" or a trailing "/". Watches may also name the
  special events "@introduceDomain" and "@releaseDomain" (sent to dom0 only).
- Watches fire once at registration, then for every change (write, mkdir, rm,
  set_perms) at or below their path, and an rm also fires the watches below the removed
  node. A connection receives an event only if it may read the changed node. Events of
  a relative watch carry relative paths.
- Transactions see a snapshot of the tree taken at their start, plus their own
  changes. The commit fails with EAGAIN if any node the transaction read or wrote
  (including nodes it found missing) changed since the start; otherwise its changes
  land at once and their watches fire then. Creating or removing a node changes its
  parent's list of children, so two transactions adding siblings conflict (as in C).
- Errors travel as strings ("ENOENT", "EACCES", "EINVAL", ...). A malformed request is
  answered with ERROR and the daemon goes on; a handler never raises.

Why snapshots are copies of a dict of immutable nodes: a transaction's start is one
shallow dict copy (a few thousand pointers at most here), a commit compares node
identities, and no node is ever modified in place, so the live tree and every snapshot
share whatever did not change.

Callbacks run outside the daemon's lock, in the thread that made the change, before the
call that made it returns, one at a time and in order; a change made inside a callback
queues its callbacks, which run after that callback returns, never nested in it.
`Connection.on_event` runs under the lock: it may only wake the thread that pumps that
connection's ring.

`RingServer` writes responses and events into the guest's magic page without marking
it dirty: the foreign mapping xenstored uses is never tracked by log-dirty.

The package, one module per concept as in tools/xenstored (core.c, transaction.c, watch.c,
domain.c), from the bottom up; each imports only modules above it in this list:

  store.py         the tree: nodes, paths, permissions, the operations, dump and load
  transaction.py   transactions: start, lookup, end (commit, with conflict detection)
  watch.py         watches: registering, firing (and @introduceDomain/@releaseDomain),
                   delivering to a connection's queue of events or to a callback
  domain.py        domains introduced, shut down, resumed, released; connections closed
  connection.py    `Connection`: a domain's requests dispatched by type, and dom0's direct
                   calls; `Transaction`, a direct connection's transaction
  daemon.py        `Xenstored`: the whole daemon, which makes connections
  ring_server.py   `RingServer`: a guest's ring served through its connection

The daemon's layers are classes each built on the one below (Store, Transactions, Watches,
Domains, Xenstored); what one of them needs of a connection is a Protocol in its own
module (store.Client, transaction.TxClient, watch.Peer), so that none imports connection.py.
"""

from pvmig.dom0.xenstored.connection import Connection, Transaction
from pvmig.dom0.xenstored.daemon import Xenstored
from pvmig.dom0.xenstored.ring_server import OUTBOX_LIMIT, RingServer
from pvmig.dom0.xenstored.store import Perm
from pvmig.dom0.xenstored.transaction import MAX_TRANSACTIONS
from pvmig.dom0.xenstored.watch import MAX_WATCHES

__all__ = [
    "MAX_TRANSACTIONS",
    "MAX_WATCHES",
    "OUTBOX_LIMIT",
    "Connection",
    "Perm",
    "RingServer",
    "Transaction",
    "Xenstored",
]

"""Transactions (tools/xenstored/transaction.c): started on a snapshot of the tree, found by
their id, and ended: a commit lands the changes at once, unless a node the transaction used
changed since its start (EAGAIN), and then fires their watches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pvmig.dom0.xenstored.store import Client, Store, _Change, _fail, _Node

MAX_TRANSACTIONS = 10       # open at once per guest connection (ENOSPC beyond)


class TxClient(Client, Protocol):
    """A connection as transactions see it: also the transactions it has open."""

    _txs: dict[int, _Transaction]


@dataclass(slots=True)
class _Transaction:
    id: int
    conn: TxClient
    nodes: dict[str, _Node]
    accessed: dict[str, _Node | None]        # path -> the node as first seen (None: absent)
    written: dict[str, None]                 # paths changed, in order
    changes: list[_Change]


class Transactions(Store):
    """The store with transactions."""

    def __init__(self) -> None:
        super().__init__()
        self._txs: dict[int, _Transaction] = {}
        self._next_tx = 1

    # ---- transactions

    def _tx_start(self, conn: TxClient) -> _Transaction:
        if len(conn._txs) >= MAX_TRANSACTIONS and conn.domid != 0:
            raise _fail("ENOSPC", f"more than {MAX_TRANSACTIONS} open transactions")
        while self._next_tx in self._txs or self._next_tx == 0:
            self._next_tx = (self._next_tx + 1) & 0xFFFFFFFF
        tx = _Transaction(self._next_tx, conn, dict(self._nodes), {}, {}, [])
        self._next_tx = (self._next_tx + 1) & 0xFFFFFFFF
        self._txs[tx.id] = tx
        conn._txs[tx.id] = tx
        return tx

    def _tx_lookup(self, conn: TxClient, tx_id: int) -> _Transaction | None:
        if tx_id == 0:
            return None
        tx = conn._txs.get(tx_id)
        if tx is None:
            raise _fail("ENOENT", f"no transaction {tx_id}")
        return tx

    def _tx_end(self, conn: TxClient, tx: _Transaction, commit: bool) -> None:
        self._txs.pop(tx.id, None)
        conn._txs.pop(tx.id, None)
        if not commit:
            return
        for path, seen in tx.accessed.items():
            if self._nodes.get(path) is not seen:
                raise _fail("EAGAIN", f"transaction {tx.id}: {path} changed")
        for path in tx.written:
            node = tx.nodes.get(path)
            if node is None:
                self._nodes.pop(path, None)
            else:
                self._nodes[path] = node
        for change in tx.changes:
            self._fire(change)

"""The agent's data listener (`--data-listen`): where data channels arrive.

An accept thread, and a thread per connection: the handshake (pvmig.rpc.data_channel),
the claim checked on the event loop against the migration's current epoch and key,
then the restore side's reading (dest_host.channels) until the connection closes. Bad
input of any kind gets an error in this agent's log, an error record where the peer
can still read one, and a closed connection; no byte of it reaches a domain's memory
(frame numbers and lengths are checked before the data is read).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
import threading
import time

from dest_host.channels import on_loop
from pvmig import errors
from pvmig.host.host import Host
from pvmig.migration import wire
from pvmig.rpc import channel, data_channel

log = logging.getLogger("pvmig.agent.data")
MAX_PENDING = 64  # connections in their handshake at once; more are closed at once
DRAIN_S = 1.0  # after an error record: reading what the peer still sends, so it reads it
DRAIN_BYTES = 64 << 20
OFF = "off"


class DataServer:
    def __init__(self, host: Host, listen: str, loop: asyncio.AbstractEventLoop) -> None:
        bind_host, port = channel.parse_address(listen, listen=True)
        self.host = host
        self.loop = loop
        self.sock = data_channel.listen((bind_host, port))
        self.port = self.sock.getsockname()[1]
        self.bind_host = bind_host
        self.tls = data_channel.server_context(host.security)
        self._pending = threading.BoundedSemaphore(MAX_PENDING)
        self._stopped = False
        self._thread = threading.Thread(target=self._accept_loop, name="data-accept",
                                        daemon=True)

    @property
    def endpoint(self) -> tuple[str, int, bool]:
        """What OpenData tells a source: a wildcard is no address, so it says none (the
        source then dials the host it reached this agent's gRPC port at)."""
        host = "" if self.bind_host in ("0.0.0.0", "::", "") else self.bind_host
        return host, self.port, self.tls is not None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept
        except OSError:
            pass
        self.sock.close()
        self._thread.join(timeout=5)

    def _accept_loop(self) -> None:
        while not self._stopped:
            try:
                sock, addr = self.sock.accept()
            except OSError:
                if self._stopped:
                    return
                continue
            peer = f"{addr[0]}:{addr[1]}"
            if not self._pending.acquire(blocking=False):
                log.error("data connection from %s refused: %d handshakes under way already",
                          peer, MAX_PENDING)
                sock.close()
                continue
            threading.Thread(target=self._serve, args=(sock, peer), name=f"data-{peer}",
                             daemon=True).start()

    def _serve(self, sock: socket.socket, peer: str) -> None:
        conn, done = None, None
        try:
            try:
                conn, hello = data_channel.handshake(sock, peer, self.tls)
            finally:
                self._pending.release()
            try:
                session, done = self._claim(hello, conn)
            except errors.PvmigError as e:
                log.error("data connection from %s refused: %s", peer, e)
                data_channel.refuse(conn, e)
                return
            data_channel.accept(conn)
            log.info("migration %s: data connection %d (epoch %d) from %s", hello.migration_id,
                     hello.index, hello.epoch, peer)
            session.data.receive(conn, hello.index)
        except errors.PvmigError as e:
            log.error("data connection from %s closed: %s", peer, e)
            if conn is not None:
                self._error(conn, e)
        except (OSError, struct.error, ssl.SSLError, UnicodeError) as e:
            log.warning("data connection from %s dropped: %s", peer, e or type(e).__name__)
        except Exception:  # a bug here: said, and the connection closed; the agent goes on
            log.exception("data connection from %s: internal error", peer)
        finally:
            (conn or data_channel.Connection(sock, peer)).close()
            if done is not None:
                done.set_result(None)

    def _claim(self, hello: data_channel.Hello, conn: data_channel.Connection):
        def claim():
            session = self.host.restores.get(hello.migration_id)
            if session is None or session.data is None:
                raise errors.NotFound(f"no incoming migration {hello.migration_id!r} on "
                                      f"agent {self.host.name} (it ended, or never began)")
            return session, session.data.claim(hello, conn)
        return on_loop(self.loop, claim)

    @staticmethod
    def _error(conn: data_channel.Connection, e: errors.PvmigError) -> None:
        """An error record, then what the peer still sends read and dropped for a moment,
        so that closing does not reset the connection before the peer reads the error."""
        try:
            wire.send_error(conn, e)
            conn.sock.shutdown(socket.SHUT_WR)
            conn.sock.settimeout(DRAIN_S)
            drained, deadline = 0, time.monotonic() + DRAIN_S
            while drained < DRAIN_BYTES and time.monotonic() < deadline and (
                    chunk := conn.sock.recv(1 << 16)):
                drained += len(chunk)
        except OSError:
            pass

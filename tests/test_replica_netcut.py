"""The network between a mount and its target breaks in the middle of a frame: a TCP proxy
between them forwards the first connection until a chosen byte, then closes both sides."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_replica_helpers import (
    KEY,
    Mounted,
    Serve,
    assert_same_tree,
    converge,
    replication_status,
    settled_status,
)

MiB = 1 << 20
#: where the first connection breaks: 3 MiB into the client's stream, inside a DATA payload
CUT = 3 * MiB + 12345


class CuttingProxy:
    """Forwards 127.0.0.1:port to ``upstream``.  The first connection stalls once
    ``cut_after`` bytes went from the client to the server, and is cut (both sockets shut
    down and closed) when :attr:`release` is set; later connections are forwarded whole."""

    def __init__(self, upstream: tuple[str, int], cut_after: int) -> None:
        self.upstream = upstream
        self.cut_after = cut_after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.connections = 0
        self.cut_at: int | None = None  # client->server bytes forwarded when it cut
        self.stalled = threading.Event()
        self.release = threading.Event()
        self._closing = False
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            self._socks += [client, server]
            limit = self.cut_after if self.connections == 1 else None
            for a, b, lim in ((client, server, limit), (server, client, None)):
                t = threading.Thread(target=self._pump, args=(a, b, lim), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while True:
                want = 65536 if limit is None else min(65536, limit - sent)
                if want == 0:
                    self.stalled.set()
                    self.release.wait(120)
                    self.cut_at = sent
                    break
                data = src.recv(want)
                if not data:
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._closing = True
        self.release.set()
        self.listener.close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()


class ProxiedServe(Serve):
    """A serve whose address, as the mount sees it once a proxy is set, is the proxy's."""

    proxy: CuttingProxy | None = None

    @property
    def address(self) -> str:
        return self.proxy.address if self.proxy is not None else f"127.0.0.1:{self.port}"


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[tuple[ProxiedServe, CuttingProxy, Path]]:
    key = tmp_path / "key"
    key.write_bytes(KEY)
    replica = tmp_path / "replica"
    replica.mkdir()
    serve = ProxiedServe(tmp_path, replica, key)
    serve.start()  # listens on its own port; the mount gets the proxy's
    proxy = serve.proxy = CuttingProxy(("127.0.0.1", serve.port), cut_after=CUT)
    try:
        yield serve, proxy, tmp_path
    finally:
        serve.stop()
        proxy.close()


def test_network_cut_mid_frame_loses_nothing(
    proxied: tuple[ProxiedServe, CuttingProxy, Path],
) -> None:
    """A 48 MiB file and a small tree copied through the mount while the connection to the
    target stalls 3 MiB into the stream (inside a DATA payload: the handshake and the OP frames
    before it are a few hundred bytes) and breaks there once the copy is done: the mount
    reconnects, replays what was not durable, and the replica equals BACKING; no change is
    reported failed, and the comparison after the replay finds nothing left to mend (so the
    replay alone brought the replica up to date: a dropped replay fails here)."""
    serve, proxy, tmp = proxied
    backing = tmp / "backing"
    backing.mkdir()
    src = tmp / "src"
    (src / "d").mkdir(parents=True)
    (src / "big").write_bytes(os.urandom(48 * MiB))
    for i in range(20):
        (src / "d" / f"f{i}").write_bytes(os.urandom(1000 * i))
    m = Mounted(tmp, backing, serve)
    try:
        subprocess.run(["cp", "-a", f"{src}/.", str(m.mountpoint)], check=True, timeout=120)
        assert proxy.stalled.wait(60), "the stream never reached the cut"
        proxy.release.set()  # BACKING holds still now: the repair after the replay is exact
        converge(backing, serve.replica, m)
        states = settled_status(m, timeout=30)
        assert proxy.cut_at == CUT, "the proxy never cut the connection"
        assert proxy.connections >= 2
        assert states[0]["failed_changes"] == 0, states
        assert states[0]["repairs"] == 2, states  # the start's, and the one after the replay
        assert states[0]["last_repair_differences"] == 0, states
        assert_same_tree(backing, src)
        assert_same_tree(backing, serve.replica)
        assert replication_status(m.mountpoint)[0]["connected"]
    finally:
        m.close()

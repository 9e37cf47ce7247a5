"""A TCP forwarder in front of a real server, which can drop connections as a restart would."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading


class _Pipe(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server = self.server
        with server.lock:
            server.connections += 1
            drop = server.connections <= server.drop_first
        if drop:
            return  # closed before the server's greeting: "Lost connection to server"
        upstream = socket.create_connection(server.target, timeout=10)
        upstream.settimeout(None)
        pump = threading.Thread(target=_copy, args=(upstream, self.request), daemon=True)
        pump.start()
        _copy(self.request, upstream)
        pump.join()


def _copy(source: socket.socket, target: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            target.sendall(data)
    for end in (source, target):
        with contextlib.suppress(OSError):
            end.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def tcp_proxy(target: tuple[str, int], drop_first: int):
    """Forward a free port on 127.0.0.1 to ``target``, dropping the first ``drop_first``
    connections; yields the port."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Pipe)
    server.daemon_threads = True
    server.target, server.drop_first = target, drop_first
    server.connections, server.lock = 0, threading.Lock()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()

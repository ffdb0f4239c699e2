"""/metrics, /healthz and /readyz against 300 half-open connections (slow-loris)."""
import socket

import psutil

from asyncproc import metrics
from tests.harness import wait_until


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True  # reset: closed too


def test_half_open_connections_cost_no_thread_and_are_closed_in_time(sim, start_processor):
    proc = start_processor(sim.url)
    supervisor = psutil.Process(proc.proc.pid)
    threads_before = supervisor.num_threads()
    clients = []
    try:
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", proc.metrics_port), timeout=5)
            sock.sendall(b"GET /metr")  # a request line never finished
            sock.setblocking(False)
            clients.append(sock)
        # answered while they hang, with no thread per hanging client
        assert proc.get("/metrics").status_code == 200
        assert proc.get("/readyz").status_code == 200 and proc.get("/healthz").status_code == 200
        assert supervisor.num_threads() <= threads_before + metrics.MAX_SERVING_THREADS
        # the server closes every one: the oldest when more than MAX_PENDING wait, the
        # rest when their CONNECTION_TIMEOUT is up
        wait_until(lambda: all(closed_by_server(s) for s in clients), timeout=metrics.CONNECTION_TIMEOUT + 10,
                   interval=0.2, what="the server to close the half-open connections")
        assert proc.get("/metrics").status_code == 200
        # the thread that just answered may still be on its way out
        wait_until(lambda: supervisor.num_threads() <= threads_before, timeout=5, what="serving threads gone")
    finally:
        for sock in clients:
            sock.close()

"""The worker's loop in-process, over a real pipe and real sockets: requests in flight wait as
parked sockets (not threads), an answer still arriving is read by a helper thread while the
loop goes on, and `answer_state` says "whole" only when it is."""
import multiprocessing
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncproc import gateway
from asyncproc.gateway import BASE_HEADERS, TIMED_OUT, Attempt, Gateway
from asyncproc.outcomes import Assignment, Kind, from_wire
from asyncproc.worker import CANCEL, DONE, JOBS, STOP, Helpers, Loop, Outbox
from tests.harness import wait_until
from tests.hostile import OK_BODY, HostileServer


class Slow(BaseHTTPRequestHandler):
    """Answers every POST after 0.3 s with the request body, kept alive, in one write (as
    a server in another process does; here, a hundred threads of this process contend)."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(0.3)
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


class SlowServer(ThreadingHTTPServer):
    request_queue_size = 512   # a hundred connections at once (the default backlog is 5)
    daemon_threads = True


@pytest.fixture
def slow_origin():
    server = SlowServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def loop():
    """A worker loop on a thread of this process, driven over a real pipe."""
    ours, theirs = multiprocessing.Pipe()
    http = Gateway()
    running = Loop(http, Outbox(theirs), capacity=200)
    stopping = threading.Event()
    thread = threading.Thread(target=running.run, args=(theirs, stopping, 0.5), daemon=True)
    thread.start()
    running.pipe = ours
    yield running
    ours.send((STOP,))
    thread.join(10)
    http.close()
    assert not thread.is_alive()


def job(key, origin, path="/v1/completions", request_timeout=30.0):
    return Assignment(key, origin, path, f'{{"prompt": "{key}"}}'.encode(), dict(BASE_HEADERS),
                      time.time() + 60, 5.0, request_timeout)


def collect(pipe, keys, timeout=30.0):
    """Outcomes by key, in arrival order, until every key has one; a second one fails."""
    got = {}
    deadline = time.monotonic() + timeout
    while set(got) != set(keys):
        assert pipe.poll(max(deadline - time.monotonic(), 0)), f"missing {sorted(set(keys) - set(got))}"
        message = pipe.recv()
        if message[0] == DONE:
            for key, wire in message[1]:
                assert key not in got, f"two outcomes for {key}"
                got[key] = from_wire(wire)
    return got


def test_requests_in_flight_wait_as_parked_sockets_not_threads(loop, slow_origin):
    first = [f"a{i}" for i in range(100)]
    loop.pipe.send((JOBS, [job(k, slow_origin) for k in first]))
    outcomes = collect(loop.pipe, first)
    assert all(o.kind is Kind.OK and o.body == f'{{"prompt": "{k}"}}'.encode() for k, o in outcomes.items())
    threads = len(loop.helpers.threads)  # they opened the connections

    second = [f"b{i}" for i in range(100)]
    loop.pipe.send((JOBS, [job(k, slow_origin) for k in second]))
    wait_until(lambda: len(loop.parked) == 100, timeout=5, what="100 requests parked at once")
    outcomes = collect(loop.pipe, second)
    assert all(o.kind is Kind.OK and o.body == f'{{"prompt": "{k}"}}'.encode() for k, o in outcomes.items())
    assert len(loop.helpers.threads) == threads   # no thread more for the second hundred
    assert loop.http.origins.made() == 100   # every connection kept and used again
    assert loop.http.in_flight() == 0


def test_once_a_helper_found_the_address_the_loop_opens_connections_itself(loop, slow_origin):
    loop.pipe.send((JOBS, [job("first", slow_origin)]))
    collect(loop.pipe, ["first"])   # a helper connected, looking the name up
    helpers = loop.helpers.started
    keys = [f"k{i}" for i in range(50)]
    loop.pipe.send((JOBS, [job(k, slow_origin) for k in keys]))
    outcomes = collect(loop.pipe, keys)
    assert all(o.kind is Kind.OK and o.body == f'{{"prompt": "{k}"}}'.encode() for k, o in outcomes.items())
    assert loop.helpers.started == helpers        # 49 connections opened, no helper woken
    assert loop.http.origins.made() == 50 and loop.opening == {}


def test_a_burst_to_a_new_origin_takes_one_helper_to_find_its_address(loop, slow_origin):
    keys = [f"k{i}" for i in range(50)]
    loop.pipe.send((JOBS, [job(k, slow_origin) for k in keys]))
    outcomes = collect(loop.pipe, keys)
    assert all(o.kind is Kind.OK and o.body == f'{{"prompt": "{k}"}}'.encode() for k, o in outcomes.items())
    assert loop.helpers.started == 1   # it connected the first; the loop opened the other 49
    assert loop.http.origins.made() == 50 and loop.finding == {} and loop.awaiting == {}


def test_when_the_helper_finds_no_address_the_waiting_attempts_go_to_helpers(loop):
    listener = socket.create_server(("127.0.0.1", 0))
    origin = f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()   # refused: no address is learned
    keys = [f"r{i}" for i in range(5)]
    loop.pipe.send((JOBS, [job(k, origin) for k in keys]))
    outcomes = collect(loop.pipe, keys)
    assert {o.error for o in outcomes.values()} == {"connection error: [Errno 111] Connection refused"}
    assert loop.finding == {} and loop.awaiting == {} and loop.http.in_flight() == 0


def test_a_connection_the_loop_cannot_open_is_a_retryable_failure_and_a_helper_opens_the_next(loop):
    listener = socket.create_server(("127.0.0.1", 0))
    origin = f"http://127.0.0.1:{listener.getsockname()[1]}"
    with socket.create_connection(listener.getsockname()) as found:
        loop.http.origins.found(origin, found)
    listener.close()   # nothing listens there now: refused
    loop.pipe.send((JOBS, [job("refused", origin)]))
    outcome = collect(loop.pipe, ["refused"])["refused"]
    assert (outcome.kind, outcome.error) == (Kind.RETRY, "connection error: [Errno 111] Connection refused")
    assert not loop.http.origins.knows(origin, time.monotonic()) and loop.helpers.started == 0   # not trusted again
    loop.pipe.send((JOBS, [job("again", origin)]))
    assert collect(loop.pipe, ["again"])["again"].error.startswith("connection error")
    assert loop.helpers.started == 1   # the next one was a helper's, looking the name up again


@pytest.fixture
def hanging_origin(loop):
    """An origin the loop knows the address of, where connecting hangs: a listener that
    never accepts, its queue full."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    origin = f"http://127.0.0.1:{listener.getsockname()[1]}"
    found = socket.create_connection(listener.getsockname())
    loop.http.origins.found(origin, found)
    crowd = [found] + [socket.socket() for _ in range(4)]
    for sock in crowd[1:]:
        sock.setblocking(False)
        sock.connect_ex(listener.getsockname())
    yield origin
    for sock in crowd:
        sock.close()
    listener.close()


def test_a_connection_the_loop_opens_ends_at_its_connect_timeout(loop, hanging_origin):
    started = time.monotonic()
    loop.pipe.send((JOBS, [job("hangs", hanging_origin)._replace(connect_timeout=0.3)]))
    outcome = collect(loop.pipe, ["hangs"])["hangs"]
    assert (outcome.kind, outcome.error) == (Kind.RETRY, "connect timeout")
    assert 0.3 <= time.monotonic() - started < 2.0 and loop.opening == {}
    assert loop.helpers.started == 0


def test_a_cancel_ends_a_connection_the_loop_is_opening(loop, hanging_origin):
    loop.pipe.send((JOBS, [job("hangs", hanging_origin)]))
    wait_until(lambda: len(loop.opening) == 1, timeout=5, what="the connection being opened")
    loop.pipe.send((CANCEL, ["hangs"]))
    assert collect(loop.pipe, ["hangs"], timeout=2.0)["hangs"].kind is Kind.CANCELLED
    assert loop.opening == {} and loop.http.in_flight() == 0


def test_while_answers_gather_jobs_start_and_a_cancel_acts_at_once(loop, slow_origin, hanging_origin):
    """After a turn that sent outcomes the loop lets answers gather (the batch window: a
    share of the mean latency), but what the supervisor sends meanwhile is not held: jobs
    start (their requests sent), and a cancel (as a preemption or a stop) ends the wait."""
    loop.window.MAX = 60.0
    loop.window.mean_latency = 1e6   # a window of 60 s from the first outcome on
    loop.pipe.send((JOBS, [job("first", slow_origin), job("hangs", hanging_origin)._replace(connect_timeout=60.0)]))
    assert collect(loop.pipe, ["first"])["first"].kind is Kind.OK   # the loop now lets answers gather
    loop.pipe.send((JOBS, [job("second", slow_origin)]))
    wait_until(lambda: [a.key for a in loop.parked.values()] == ["second"], timeout=5, what="the job sent at once")
    loop.pipe.send((CANCEL, ["hangs"]))
    assert collect(loop.pipe, ["hangs"], timeout=5.0)["hangs"].kind is Kind.CANCELLED


def test_an_answer_still_arriving_is_read_by_a_helper_while_the_loop_goes_on(loop):
    hostile = HostileServer(interval=0.2)
    try:
        loop.pipe.send((JOBS, [job("drip", hostile.url, "/drip", request_timeout=1.5)]))
        wait_until(lambda: hostile.served == ["/drip"], timeout=5, what="the drip begun")
        loop.pipe.send((JOBS, [job("warm", hostile.url, "/ok")]))
        collect(loop.pipe, ["warm"])   # connected by a helper; now kept alive
        started = time.monotonic()
        keys = [f"ok{i}" for i in range(20)]
        for key in keys:   # one at a time over the kept connection: each sent and read by the loop
            loop.pipe.send((JOBS, [job(key, hostile.url, "/ok")]))
            assert collect(loop.pipe, [key])[key].body == OK_BODY
        assert time.monotonic() - started < 1.0   # while the drip still holds its helper
        drip = collect(loop.pipe, ["drip"])["drip"]
        assert (drip.kind, drip.error) == (Kind.RETRY, TIMED_OUT)
    finally:
        hostile.stop()


def test_helpers_start_as_work_waits_up_to_the_limit_and_idle_ones_end():
    release, done = threading.Event(), []
    helpers = Helpers(8, lambda item: (release.wait(10), done.append(item)), idle_seconds=0.2)
    for i in range(20):
        helpers.submit(("send", i))
    wait_until(lambda: helpers.idle == 0 and len(helpers.threads) == 8, timeout=5, what="eight helpers busy")
    release.set()
    wait_until(lambda: len(done) == 20, timeout=5, what="every item done")
    assert sorted(i for _, i in done) == list(range(20))
    wait_until(lambda: not helpers.threads, timeout=5, what="idle helpers ended")
    helpers.submit(("send", 20))   # and a new one starts for new work
    wait_until(lambda: len(done) == 21, timeout=5, what="the item after")


RESPONSE = st.builds(
    lambda status, headers, body: (status, headers, body),
    st.integers(200, 599),
    st.lists(st.tuples(st.sampled_from(["Server", "X-Id", "Content-Type", "Date"]),
                       st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=20)), max_size=4),
    st.binary(max_size=2000))


def peek(data: bytes):
    left, right = socket.socketpair()
    try:
        if data:
            left.sendall(data)
        attempt = Attempt(job("k", "http://127.0.0.1:1"), 0.0, 0.0, 0.0)
        attempt.sock = right
        return gateway.answer_state(attempt)
    finally:
        left.close()
        right.close()


@given(RESPONSE, st.data())
def test_an_answer_is_all_here_only_once_every_byte_of_it_is(response, data):
    status, headers, body = response
    raw = (f"HTTP/1.1 {status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
           + f"content-length: {len(body)}\r\n\r\n").encode() + body
    cut = data.draw(st.integers(1, len(raw)))
    assert peek(raw[:cut]) == (gateway.WHOLE if cut == len(raw) else gateway.PART)


@given(st.binary(min_size=1, max_size=3000))
def test_any_bytes_give_an_answer_never_an_error(raw):
    assert peek(raw) in (gateway.WHOLE, gateway.PART, gateway.HELPER)


def test_what_a_helper_must_read():
    assert peek(b"") == gateway.NOTHING   # a spurious wake-up
    assert peek(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n") == gateway.HELPER
    assert peek(b"HTTP/1.1 100 Continue\r\n\r\n") == gateway.HELPER
    assert peek(b"HTTP/1.1 200 OK\r\nContent-Length: 99999\r\n\r\n" + b"x" * 100) == gateway.HELPER
    assert peek(b"HTTP/1.0 200 OK\r\n\r\nread until close") == gateway.HELPER
    assert peek(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n") == gateway.WHOLE


@given(st.integers(200, 599), st.integers(0, 60000), st.integers(1, 7), st.binary(max_size=20))
def test_an_answer_found_whole_is_read_whole_without_waiting(status, size, arrivals, extra):
    """The loop reads an answer `answer_state` found WHOLE on a non-blocking socket (no poll
    before each read): every byte of the body comes back, however the answer arrived,
    across reads larger than the socket file's buffer. A 204 or 304 has no body by HTTP:
    bytes sent anyway must not be read as the next answer, so its connection is dropped, as
    is one where more came after the answer."""
    from asyncproc.origins import Connection

    body = bytes(i % 251 for i in range(size))
    raw = b"HTTP/1.1 %d X\r\nServer: t\r\nContent-Length: %d\r\n\r\n%s" % (status, size, body)
    with socket.create_server(("127.0.0.1", 0)) as server:   # TCP, as the gateway
        right = socket.create_connection(server.getsockname())
        left, _ = server.accept()
    http = Gateway()
    try:
        conn = Connection("127.0.0.1", 1)
        conn.sock = right
        attempt = Attempt(job("k", "http://127.0.0.1:1"), time.monotonic(), time.monotonic() + 30, 5.0)
        attempt.conn = conn
        assert http.send_now(attempt) is None
        assert right.gettimeout() == 0.0   # non-blocking: nothing polls before the call
        step = -(-len(raw) // arrivals)
        for start in range(0, len(raw), step):   # the answer arrives in pieces
            assert gateway.answer_state(attempt) in (gateway.NOTHING, gateway.PART)
            left.sendall(raw[start:start + step])
        left.sendall(extra)
        wait_until(lambda: gateway.answer_state(attempt) == gateway.WHOLE and attempt.overrun == bool(extra),
                   timeout=5, what="every byte here")
        outcome = http.receive_now(attempt)
        assert outcome.status == status
        if status not in gateway.NO_BODY:
            assert outcome.body == body
        # closed (the next attempt connects afresh) where stray bytes could be read as an answer
        assert (conn.sock is None) == (status in gateway.NO_BODY or bool(extra))
    finally:
        left.close()
        right.close()

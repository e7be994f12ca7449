"""wsserver.brokers.rediswire: the Redis broker's hand-packed EVALSHA and its listener's bulk
read, against real Redis servers (the shared 127.0.0.1:6379 with a key prefix of the test's
own, or a redis-server of the test's own where a test flushes scripts, kills clients or hangs
the server)."""

from __future__ import annotations

import json
import selectors
import threading
import time

import pytest
import redis
from rawws import FrameParser
from support import wait_for

from wsserver.broadcaster import Broadcast, Broadcaster
from wsserver.brokers import Outgoing, make_broker, order_of
from wsserver.brokers.rediswire import Connections, PackedScript, Pipeline, drain
from wsserver.config import load_settings
from wsserver.exceptions import BrokerTimedOut
from wsserver.hub import Hub
from wsserver.protocol import Notification

REDIS_URL = "redis://127.0.0.1:6379/0"
WAIT = 10
# returns what it was given, so a reply shows the command arrived as packed
ECHO = "return {#KEYS, KEYS[1], KEYS[#KEYS], ARGV[1], ARGV[#ARGV], '%s'}"


class CountingScript:
    """redis-py's Script, counting the calls that reach it (the fallback path)."""

    def __init__(self, script: object) -> None:
        self.script = script
        self.sha = script.sha  # type: ignore[attr-defined]
        self.calls = 0

    def __call__(self, keys: list, args: list) -> object:
        self.calls += 1
        return self.script(keys=keys, args=args)  # type: ignore[operator]


@pytest.fixture
def opened():
    """``opened(thing)`` returns ``thing`` (a client, a connection stack, a pub/sub), closed
    after the test, the newest first."""
    things: list = []

    def track(thing):  # noqa: ANN001, ANN202
        things.append(thing)
        return thing

    yield track
    for thing in reversed(things):
        thing.close()


def packed(opened, client: redis.Redis,  # noqa: ANN001
           text: str) -> tuple[PackedScript, CountingScript, Connections]:
    connections = opened(Connections(client.connection_pool))
    script = CountingScript(client.register_script(text))
    return PackedScript(script, connections), script, connections


def test_the_packed_command_is_the_one_redis_py_packs(opened):
    client = opened(redis.Redis.from_url(REDIS_URL))
    lean, script, _connections = packed(opened, client, ECHO % "x")
    keys = ["k:1", "k:é", b"k:\x00raw"]
    args = ["chan", 101, 60000, '["r", null, "{\\"x\\": \\"ü\\""]', b"", -5]
    conn = client.connection_pool.make_connection()
    try:
        expected = b"".join(conn.pack_command("EVALSHA", script.sha, len(keys), *keys, *args))
    finally:
        conn.disconnect()
    assert lean.pack(keys, args) == expected


def test_a_packed_call_answers_as_the_script_call(redis_prefix, opened):
    client = opened(redis.Redis.from_url(REDIS_URL, socket_timeout=2.0))
    lean, script, _connections = packed(opened, client, ECHO % redis_prefix)
    keys = [f"{redis_prefix}:a", f"{redis_prefix}:é"]
    args = [f"{redis_prefix}:chan", 7, "méta"]
    first = lean(keys, args)  # the server may not know it yet: the fallback loads it
    again = [lean(keys, args) for _ in range(3)]
    direct = script.script(keys=keys, args=args)
    assert first == direct and all(reply == direct for reply in again)
    assert direct == [2, f"{redis_prefix}:a".encode(), f"{redis_prefix}:é".encode(),
                      f"{redis_prefix}:chan".encode(), "méta".encode(), redis_prefix.encode()]
    assert script.calls <= 1  # at most the first, the others lean


def test_noscript_after_script_flush_loads_the_script_and_goes_lean_again(private_redis, opened):
    client = opened(redis.Redis.from_url(private_redis.url, socket_timeout=2.0))
    lean, script, _connections = packed(opened, client, ECHO % "flush")
    client.script_load(ECHO % "flush")
    reply = lean(["k"], ["v"])
    assert script.calls == 0
    client.script_flush()
    assert lean(["k"], ["v"]) == reply  # NOSCRIPT -> redis-py's Script loads it
    assert script.calls == 1
    assert client.script_exists(script.sha) == [True]
    assert lean(["k"], ["v"]) == reply and script.calls == 1


def test_an_error_reply_is_raised_and_the_connection_stays_usable(redis_prefix, opened):
    client = opened(redis.Redis.from_url(REDIS_URL, socket_timeout=2.0))
    connections = opened(Connections(client.connection_pool))
    failing = PackedScript(client.register_script(f"return redis.error_reply('no {redis_prefix}')"),
                           connections)
    lean = PackedScript(client.register_script(ECHO % redis_prefix), connections)
    lean(["k"], ["v"])
    with pytest.raises(redis.ResponseError, match=f"no {redis_prefix}"):
        failing(["k"], ["v"])
    with pytest.raises(redis.ResponseError, match=f"no {redis_prefix}"):
        failing(["k"], ["v"])  # the script is loaded by now: a plain error reply
    assert lean(["k"], ["v"])[-1] == redis_prefix.encode()
    assert len(connections._made) == 1  # one connection served every call


def test_a_hung_server_times_out_and_the_next_call_starts_clean(private_redis, opened):
    client = opened(redis.Redis.from_url(private_redis.url, socket_timeout=0.5))
    lean, _script, _connections = packed(opened, client, ECHO % "hang")
    try:
        reply = lean(["k"], ["v"])
        private_redis.hang()
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            lean(["k"], ["v"])
        assert time.monotonic() - started < 2.0
        private_redis.resume()
        # the late reply to the timed-out call must not be read as this call's
        assert lean(["k2"], ["v2"]) == [1, b"k2", b"k2", b"v2", b"v2", b"hang"]
        assert reply[1] == b"k"
    finally:
        private_redis.resume()


def test_an_idle_connection_the_server_closed_is_replaced(private_redis, monkeypatch, opened):
    from wsserver.brokers import rediswire

    monkeypatch.setattr(rediswire, "_CHECK_IDLE_AFTER", 0.0)
    client = opened(redis.Redis.from_url(private_redis.url, socket_timeout=2.0))
    lean, _script, connections = packed(opened, client, ECHO % "idle")
    lean(["k"], ["v"])
    admin = redis.Redis.from_url(private_redis.url)
    assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
    wait_for(lambda: len(admin.client_list(_type="normal")) == 1, timeout=5,
             message="the server to close every other connection")
    admin.close()
    assert lean(["k"], ["v"])[1] == b"k"


def test_after_a_reset_every_idle_connection_reconnects(private_redis, opened):
    client = opened(redis.Redis.from_url(private_redis.url, socket_timeout=2.0))
    lean, _script, connections = packed(opened, client, ECHO % "reset")
    lean(["k"], ["v"])
    conn = connections._idle[-1][0]
    sock = conn._sock
    connections.reset()
    assert lean(["k"], ["v"])[1] == b"k"
    assert conn._sock is not None and conn._sock is not sock


def test_drain_reads_every_buffered_message_in_order(redis_prefix, opened):
    client = opened(redis.Redis.from_url(REDIS_URL, socket_timeout=2.0))
    pubsub = opened(client.pubsub())
    channel = f"{redis_prefix}:bus"
    pubsub.subscribe(channel)
    others: list = []
    wait_for(lambda: drain(pubsub, lambda data: None, others.append) or others,
             timeout=5, message="the subscription's confirmation")
    assert others[0]["type"] == "subscribe"
    sent = [f"{i} " .encode() + b"x" * (i % 700) for i in range(2000)]
    pipe = client.pipeline(transaction=False)
    for data in sent:
        pipe.publish(channel, data)
    pipe.execute()
    got: list[bytes] = []

    def more() -> bool:
        drain(pubsub, got.append, others.append, limit=300)
        return len(got) >= len(sent)

    wait_for(more, timeout=10, interval=0.001, message="every message")
    assert got == sent
    assert len(others) == 1
    assert drain(pubsub, got.append, others.append) == 0  # nothing left, nothing waited for


class RecordingBroadcaster(Broadcaster):
    """A real broadcaster that also keeps every item queued, in order."""

    def __init__(self, hub: Hub) -> None:
        super().__init__(hub, 1000, on_slow=lambda conn: None)
        self.items: list = []

    def submit(self, item, timeout):  # noqa: ANN001, ANN201
        accepted = super().submit(item, timeout)
        if accepted:
            self.items.append(item)
        return accepted


def test_the_listener_queues_messages_received_together_as_one_item_in_order(redis_prefix):
    settings = load_settings({"WSSERVER_REDIS_URL": REDIS_URL,
                              "WSSERVER_REDIS_PREFIX": redis_prefix,
                              "WSSERVER_HISTORY_SIZE": "500"})
    hub = Hub(10)
    broadcaster = RecordingBroadcaster(hub)
    broadcaster.start()
    broker = make_broker(settings)
    broker.start(broadcaster, hub)
    try:
        wait_for(lambda: broker.ready, message="broker ready")
        now = int(time.time() * 1000)
        messages = tuple(
            Outgoing("r", None, Notification("e", "", i).envelope_prefix("r", now))
            for i in range(300)
        )
        ids = broker.publish(messages, 2)  # one script: 300 PUBLISHes back to back
        assert ids is not None and len(ids) == 300

        def delivered() -> list[Broadcast]:
            out: list[Broadcast] = []
            for item in list(broadcaster.items):
                out.extend(item if isinstance(item, tuple) else
                           [item] if isinstance(item, Broadcast) else [])
            return [b for b in out if b.presence is None]

        wait_for(lambda: len(delivered()) >= 300, timeout=10, message="every message queued")
        got = delivered()
        assert [json.loads(FrameParser().feed(b.frame)[0][1])["id"] for b in got] == ids
        assert [b.order for b in got] == [order_of(i) for i in ids]
        assert len(broadcaster.items) < 300  # read together, queued together
        assert broker._position is not None and order_of(broker._position) is not None
    finally:
        broker.stop()
        broadcaster.stop(2)


def test_a_publish_to_a_hung_redis_times_out_then_works_again(private_redis):
    settings = load_settings({"WSSERVER_REDIS_URL": private_redis.url,
                              "WSSERVER_REDIS_PREFIX": "wstest-wire"})
    hub = Hub(10)
    broadcaster = Broadcaster(hub, 100, on_slow=lambda conn: None)
    broadcaster.start()
    broker = make_broker(settings)
    broker.start(broadcaster, hub)
    prefix = Notification("e", "", 1).envelope_prefix("r", int(time.time() * 1000))
    try:
        wait_for(lambda: broker.ready, message="broker ready")
        assert broker.publish((Outgoing("r", None, prefix),), 1)
        private_redis.hang()
        with pytest.raises(BrokerTimedOut):
            broker.publish((Outgoing("r", None, prefix),), 1)
        private_redis.resume()
        wait_for(lambda: broker.ready, timeout=10, message="broker ready again")
        assert broker.publish((Outgoing("r", None, prefix),), 1)
    finally:
        private_redis.resume()
        broker.stop()
        broadcaster.stop(2)


def test_a_server_down_raises_connection_errors_then_the_same_connection_serves_again(
    private_redis, opened
):
    client = opened(redis.Redis.from_url(private_redis.url, socket_timeout=2.0,
                                         socket_connect_timeout=2.0))
    lean, _script, connections = packed(opened, client, ECHO % "down")
    assert lean(["k"], ["v"])[1] == b"k"
    private_redis.kill()
    with pytest.raises(redis.ConnectionError):
        lean(["k"], ["v"])  # on the connection it had
    with pytest.raises(redis.ConnectionError):
        lean(["k"], ["v"])  # connecting again is refused
    private_redis.start()
    assert lean(["k"], ["v"])[1] == b"k"
    assert len(connections._made) == 1  # nothing leaked while Redis was down


# -- Pipeline: many calls in flight on one non-blocking connection ------------------------


class Driven:
    """A Pipeline as the worker drives it: a poller of its own, ``turn`` one poll."""

    def __init__(self, connections: Connections, timeout: float = 2.0, limit: int = 1000):
        self.poller = selectors.DefaultSelector()
        self.pipeline = Pipeline(connections, timeout, limit)
        self.pipeline.watch = self.watch
        self.watched: list[int] = []  # every events value the pipeline asked for

    def watch(self, sock, events: int) -> None:  # noqa: ANN001
        self.watched.append(events)
        if not events:
            self.poller.unregister(sock)
        elif sock in self.poller.get_map():
            self.poller.modify(sock, events)
        else:
            self.poller.register(sock, events)

    def turn(self, timeout: float = 0.05) -> None:
        self.pipeline.flush()
        if self.poller.get_map():
            for _key, _events in self.poller.select(timeout):
                self.pipeline.on_ready()
        self.pipeline.expire(time.monotonic())

    def until(self, done, timeout: float = 10.0) -> None:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "the pipeline answered in time"
            self.turn()

    def close(self) -> None:
        self.pipeline.close()
        self.poller.close()


def connected(opened, client: redis.Redis, text: str):  # noqa: ANN001, ANN201
    """(PackedScript, Driven) on one stack, whose one connection a blocking call made."""
    lean, _script, connections = packed(opened, client, text)
    lean(["warm"], ["up"])  # as the worker's first publish, on a pool thread
    driven = opened(Driven(connections))
    assert driven.pipeline.can_send()  # it takes that connection
    return lean, driven


def test_a_pipeline_takes_only_a_connection_already_connected_and_never_connects(opened):
    client = opened(redis.Redis.from_url(REDIS_URL))
    lean, _script, connections = packed(opened, client, ECHO % "take")
    driven = opened(Driven(connections))
    assert not driven.pipeline.can_send()  # nothing connected yet: the caller waits elsewhere
    assert connections._made == []
    lean(["k"], ["v"])
    assert driven.pipeline.can_send()
    assert driven.watched == [selectors.EVENT_READ]
    unwatched = opened(Driven(connections))
    unwatched.pipeline.watch = None
    assert not unwatched.pipeline.can_send()  # nobody would drive it


def test_replies_come_back_in_order_each_to_its_own_caller(redis_prefix, opened):
    client = opened(redis.Redis.from_url(REDIS_URL))
    lean, driven = connected(opened, client, ECHO % redis_prefix)
    replies: dict[int, object] = {}
    for i in range(300):  # all written before any is read
        assert driven.pipeline.can_send()
        driven.pipeline.send(lean.pack([f"k{i}"], [f"v{i}"]),
                             lambda r, i=i: replies.__setitem__(i, r))
    assert driven.pipeline.in_flight == 300
    driven.until(lambda: len(replies) == 300)
    for i in range(300):
        assert replies[i] == [1, f"k{i}".encode(), f"k{i}".encode(), f"v{i}".encode(),
                              f"v{i}".encode(), redis_prefix.encode()]
    assert driven.pipeline.in_flight == 0


def test_an_error_reply_goes_to_its_caller_only(redis_prefix, opened):
    client = opened(redis.Redis.from_url(REDIS_URL))
    lean, driven = connected(opened, client, ECHO % redis_prefix)
    failing = PackedScript(client.register_script("return redis.error_reply('nope')"),
                           lean._connections)
    client.script_load("return redis.error_reply('nope')")
    got: list = []
    driven.pipeline.send(lean.pack(["a"], ["1"]), got.append)
    driven.pipeline.send(failing.pack(["b"], ["2"]), got.append)
    driven.pipeline.send(lean.pack(["c"], ["3"]), got.append)
    driven.until(lambda: len(got) == 3)
    assert got[0][1] == b"a" and got[2][1] == b"c"
    assert isinstance(got[1], redis.ResponseError) and "nope" in str(got[1])


def test_noscript_is_handed_to_the_caller_as_an_error_reply(private_redis, opened):
    client = opened(redis.Redis.from_url(private_redis.url))
    lean, driven = connected(opened, client, ECHO % "noscript")
    client.script_flush()
    got: list = []
    driven.pipeline.send(lean.pack(["a"], ["1"]), got.append)
    driven.until(lambda: got)
    assert isinstance(got[0], redis.ResponseError) and str(got[0]).startswith("NOSCRIPT")


def test_a_hung_server_answers_everything_in_flight_with_a_timeout_and_no_late_reply_is_matched(
    private_redis, opened
):
    client = opened(redis.Redis.from_url(private_redis.url, socket_timeout=2.0))
    lean, _script, connections = packed(opened, client, ECHO % "hang")
    lean(["warm"], ["up"])
    driven = opened(Driven(connections, timeout=0.5))
    got: list = []
    try:
        private_redis.hang()
        started = time.monotonic()
        for i in range(5):
            assert driven.pipeline.can_send()
            driven.pipeline.send(lean.pack([f"k{i}"], ["v"]), got.append)
        assert time.monotonic() - started < 0.2  # sending never waits
        driven.until(lambda: len(got) == 5, timeout=5)
        assert 0.4 < time.monotonic() - started < 2.0
        assert all(isinstance(r, redis.TimeoutError) for r in got)
        assert driven.watched[-1] == 0  # the connection left the poller, dropped
        private_redis.resume()
        # the late replies went to the dropped connection: a blocking call reconnects and
        # hands a connection back; the pipeline's next call gets its own reply
        lean(["again"], ["v"])
        later: list = []
        assert driven.pipeline.can_send()
        driven.pipeline.send(lean.pack(["mine"], ["v"]), later.append)
        driven.until(lambda: later)
        assert later[0][1] == b"mine"
    finally:
        private_redis.resume()


def test_a_killed_server_answers_everything_in_flight_with_a_connection_error(
    private_redis, opened
):
    client = opened(redis.Redis.from_url(private_redis.url, socket_timeout=2.0))
    lean, driven = connected(opened, client, ECHO % "kill")
    got: list = []
    private_redis.hang()  # nothing answered before the kill
    for i in range(3):
        driven.pipeline.send(lean.pack([f"k{i}"], ["v"]), got.append)
    private_redis.kill()
    driven.until(lambda: len(got) == 3, timeout=5)
    assert all(isinstance(r, redis.ConnectionError) for r in got)
    assert not driven.pipeline.can_send()  # no connected connection left to take


def test_at_the_limit_can_send_says_no_and_a_reset_moves_to_a_new_connection(
    redis_prefix, opened
):
    client = opened(redis.Redis.from_url(REDIS_URL))
    lean, _script, connections = packed(opened, client, ECHO % redis_prefix)
    lean(["warm"], ["up"])
    driven = opened(Driven(connections, limit=2))
    got: list = []
    for i in range(2):
        assert driven.pipeline.can_send()
        driven.pipeline.send(lean.pack([f"k{i}"], ["v"]), got.append)
    assert not driven.pipeline.can_send()
    held = driven.pipeline._conn
    connections.reset()  # the listener resubscribed: maybe another server
    assert not driven.pipeline.can_send()  # the old server's replies first
    driven.until(lambda: len(got) == 2)
    assert not driven.pipeline.can_send()  # released; the only connection is stale now
    assert held._sock is None
    lean(["k"], ["v"])  # a blocking call reconnects it
    assert driven.pipeline.can_send() and driven.pipeline._conn is held
    assert held._sock is not None


def test_closing_the_stack_from_another_thread_leaves_the_pipelines_connection_alone(
    redis_prefix, opened
):
    client = opened(redis.Redis.from_url(REDIS_URL))
    lean, driven = connected(opened, client, ECHO % redis_prefix)
    assert driven.pipeline.can_send()
    sock = driven.pipeline._sock
    closer = threading.Thread(target=lean._connections.close)
    closer.start()
    closer.join(WAIT)
    assert sock.fileno() >= 0  # still open, still registered in the owner's poller
    got: list = []
    driven.pipeline.send(lean.pack(["after"], ["v"]), got.append)
    driven.until(lambda: got)
    assert got[0][1] == b"after"
    driven.pipeline.close()
    assert sock.fileno() == -1 and driven.watched[-1] == 0


def test_an_idle_pipeline_connection_the_server_kills_leaves_the_poller_quietly(
    private_redis, opened
):
    client = opened(redis.Redis.from_url(private_redis.url, socket_timeout=2.0))
    lean, driven = connected(opened, client, ECHO % "killed")
    admin = redis.Redis.from_url(private_redis.url)
    try:
        assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
    finally:
        admin.close()
    driven.until(lambda: driven.watched[-1] == 0)  # EOF read, nothing in flight: let go
    assert driven.pipeline._conn is None and not driven.pipeline.can_send()
    lean(["k"], ["v"])  # a blocking call connects it again; then the pipeline takes it
    got: list = []
    assert driven.pipeline.can_send()
    driven.pipeline.send(lean.pack(["back"], ["v"]), got.append)
    driven.until(lambda: got)
    assert got[0][1] == b"back"

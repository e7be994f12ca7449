"""The same broker contract, against both backends: the in-memory one and Redis (the real
server on 127.0.0.1:6379). Ids increase per audience; history answers recovery the same
way; publishing is all-or-nothing."""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import time
import uuid

import pytest
import redis
from rawws import FrameParser
from support import delete_redis_keys, wait_for

from wsserver import allocator
from wsserver.broadcaster import Broadcaster
from wsserver.brokers import Idempotency, Outgoing, Repeated, make_broker, order_of
from wsserver.codes import CLOSE_INTERNAL_ERROR, REASON_MISSED_MESSAGES
from wsserver.config import load_settings
from wsserver.connection import Connection
from wsserver.exceptions import BadRequest
from wsserver.flusher import Flusher
from wsserver.frames import OP_CLOSE, OP_TEXT
from wsserver.hub import Hub
from wsserver.protocol import Notification

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(params=["memory", "redis"])
def make(request):
    prefix = f"wstest-{uuid.uuid4().hex[:10]}"
    made = []

    def build(size: int = 5, ttl: float = 300.0, hub: Hub | None = None):
        env = {"WSSERVER_HISTORY_SIZE": str(size), "WSSERVER_HISTORY_TTL": str(ttl)}
        if request.param == "redis":
            env.update(WSSERVER_REDIS_URL=REDIS_URL, WSSERVER_REDIS_PREFIX=prefix)
        settings = load_settings(env)
        hub = hub if hub is not None else Hub(10)
        broadcaster = Broadcaster(hub, 64, on_slow=lambda conn: None)
        broadcaster.start()
        broker = make_broker(settings)
        broker.start(broadcaster, hub)
        made.append((broker, broadcaster))
        wait_for(lambda: broker.ready, message="broker ready")
        return broker

    yield build
    for broker, broadcaster in made:
        broker.stop()
        broadcaster.stop(2)
    if request.param == "redis":
        delete_redis_keys(REDIS_URL, prefix)


def message(room: str | None = "r", user: str | None = None, data: int = 0) -> Outgoing:
    prefix = Notification("e", "", data).envelope_prefix(room, int(time.time() * 1000))
    return Outgoing(room, user, prefix)


def test_ids_increase_per_audience(make):
    broker = make()
    ids = [broker.publish((message("a"),), 1)[0] for _ in range(5)]
    orders = [order_of(i) for i in ids]
    assert orders == sorted(orders) and len(set(ids)) == 5
    other = broker.publish((message("b"),), 1)[0]
    assert order_of(other) is not None
    both = broker.publish((message("a"), message("b")), 1)
    assert order_of(both[0]) > orders[-1] and order_of(both[1]) > order_of(other)


def test_a_batch_to_one_audience_is_numbered_in_order_in_one_call(make):
    """A batch (``NotificationService.publish_many``) hands several messages to the same
    audience in one call: each gets its own id, in order, after what came before, and the
    history holds every one of them (none overwrote another)."""
    broker = make(size=20)
    [before] = broker.publish((message("r"),), 1)
    ids = broker.publish(tuple(message("r", data=i) for i in range(5)) + (message("s"),), 1)
    assert len(ids) == 6 and len(set(ids[:5])) == 5  # ids are per audience: "s" has its own
    orders = [order_of(i) for i in [before, *ids[:5]]]
    assert orders == sorted(orders) and len(set(orders)) == 6
    [after] = broker.publish((message("r"),), 1)
    assert order_of(after) > orders[-1]
    recovery = broker.history("r", before)
    assert recovery.recovered
    assert [o for o, _ in recovery.frames] == [order_of(i) for i in [*ids[:5], after]]
    for i, (_, frame) in enumerate(recovery.frames[:5]):
        assert f'"data":{i}'.encode() in frame


def test_a_notification_is_encoded_once_for_every_client(make):
    """Encode once: the broker makes one frame of a notification and the broadcaster hands
    that same bytes object to every client's write path (real sockets: each peer reads it
    byte for byte). A per-client encoding or copy would hand over distinct objects."""
    handed: dict[int, list[bytes]] = {}  # the objects themselves: ids of freed ones recur

    class RecordingConnection(Connection):
        def send_frames(self, frames, total=None):  # noqa: ANN001, ANN202
            handed.setdefault(self.id, []).extend(frames)
            return super().send_frames(frames, total)

    flusher = Flusher(poll_timeout=0.05)
    flusher.start()
    pairs = [socket.socketpair() for _ in range(20)]
    try:
        hub = Hub(50)
        for i, (ours, _peer) in enumerate(pairs):
            assert hub.add(RecordingConnection(i + 1, ours, "test", 1 << 20, flusher)) is None
        broker = make(hub=hub)
        [msg_id] = broker.publish((message(None, data=42),), 1)
        received = []
        for _ours, peer in pairs:
            peer.settimeout(5)
            parser, frames = FrameParser(), []
            while not frames:
                frames = parser.feed(peer.recv(65536))
            received.append(frames)
        assert all(frames == received[0] for frames in received)
        [(opcode, payload)] = received[0]
        body = json.loads(payload)
        assert opcode == OP_TEXT and body["id"] == msg_id and body["data"] == 42
        assert len(handed) == 20 and all(len(objs) == 1 for objs in handed.values())
        first = handed[1][0]
        assert all(objs[0] is first for objs in handed.values()), "one frame object for all"
    finally:
        flusher.stop()
        for ours, peer in pairs:
            ours.close()
            peer.close()


def test_history_replays_everything_after_since_in_order(make):
    broker = make(size=50)
    ids = [broker.publish((message("r", data=i),), 1)[0] for i in range(10)]
    recovery = broker.history("r", ids[3])
    assert recovery.recovered
    assert [o for o, _ in recovery.frames] == [order_of(i) for i in ids[4:]]
    assert all(f'"id":"{i}"'.encode() in frame for (_, frame), i in zip(recovery.frames, ids[4:]))
    up_to_date = broker.history("r", ids[-1])
    assert up_to_date.recovered and up_to_date.frames == []


def test_history_says_when_it_no_longer_reaches_back(make):
    broker = make(size=3)
    ids = [broker.publish((message("r"),), 1)[0] for _ in range(8)]
    assert not broker.history("r", ids[0]).recovered
    assert broker.history("r", ids[-3]).recovered  # ids[-2:] are still kept
    assert not broker.history("r", "999999999999999-0").recovered
    assert not broker.history("r", "not-an-id").recovered
    assert not broker.history("never-used", ids[0]).recovered


def test_history_expires(make):
    broker = make(size=10, ttl=1.0)
    first = broker.publish((message("t"),), 1)[0]
    broker.publish((message("t"),), 1)
    assert broker.history("t", first).recovered
    wait_for(lambda: not broker.history("t", first).recovered, timeout=5, message="history expiry")


def test_user_and_everybody_audiences_have_their_own_ids(make):
    broker = make()
    a = broker.publish((message(None, "u1"),), 1)[0]
    b = broker.publish((message(None, None),), 1)[0]
    c = broker.publish((message(None, "u1"),), 1)[0]
    assert order_of(c) > order_of(a) and b


# -- idempotency keys -------------------------------------------------------------------------


def test_a_repeated_idempotency_key_answers_the_first_ids_and_publishes_nothing(make):
    broker = make(size=10)
    key = Idempotency(f"k-{uuid.uuid4()}", "fp1")
    first = broker.publish((message("a"), message("b")), 1, key)
    assert not isinstance(first, Repeated)
    again = broker.publish((message("a"), message("b")), 1, key)
    assert isinstance(again, Repeated) and list(again) == first
    for room, mid in zip("ab", first):  # nothing after the first ids: nothing was published
        recovery = broker.history(room, mid)
        assert recovery.recovered and recovery.frames == []
    other = broker.publish((message("a"),), 1, Idempotency(f"k-{uuid.uuid4()}", "fp1"))
    assert order_of(other[0]) > order_of(first[0]), "another key publishes"
    with pytest.raises(BadRequest) as reused:
        broker.publish((message("a"),), 1, Idempotency(key.key, "fp2"))
    assert (reused.value.status, reused.value.code) == (422, "idempotency_key_reused")
    assert broker.history("a", other[0]).frames == [], "the reused key published nothing"


def test_an_idempotency_key_is_forgotten_after_the_history_ttl(make):
    broker = make(ttl=1.0)
    key = Idempotency("ttl-key", "fp")
    first = broker.publish((message("t"),), 1, key)
    assert broker.publish((message("t"),), 1, key) == first
    wait_for(lambda: not isinstance(broker.publish((message("t"),), 1, key), Repeated),
             timeout=5, message="key expiry")


def test_memory_idempotency_keys_are_capped_oldest_first(memory):
    broker = memory(idempotency_max_keys="3")
    firsts = [broker.publish((message("c"),), 1, Idempotency(f"k{i}", "fp")) for i in range(5)]
    assert broker.idempotency_keys() == 3
    assert isinstance(broker.publish((message("c"),), 1, Idempotency("k4", "fp")), Repeated)
    assert broker.publish((message("c"),), 1, Idempotency("k4", "fp")) == firsts[4]
    assert not isinstance(broker.publish((message("c"),), 1, Idempotency("k0", "fp")), Repeated)


def test_memory_idempotency_keys_are_swept(memory):
    broker = memory(history_ttl="1")
    broker.publish((message("s"),), 1, Idempotency("swept", "fp"))
    assert broker.idempotency_keys() == 1
    wait_for(lambda: broker.idempotency_keys() == 0, timeout=5, message="sweep")


# -- the memory broker keeps bounded history ---------------------------------------------------


@pytest.fixture
def memory():
    """Memory brokers with extra settings; each stopped after the test."""
    made = []

    def build(**env: str):
        settings = load_settings({f"WSSERVER_{k.upper()}": v for k, v in env.items()})
        hub = Hub(10)
        broadcaster = Broadcaster(hub, 4096, on_slow=lambda conn: None)
        broadcaster.start()
        broker = make_broker(settings)
        broker.start(broadcaster, hub)
        made.append((broker, broadcaster))
        return broker

    yield build
    for broker, broadcaster in made:
        broker.stop()
        broadcaster.stop(2)


def test_memory_history_is_swept_without_reads_or_writes(memory):
    """Expired history goes by itself: 200 rooms nobody reads or publishes to again are
    forgotten within a sweep interval past the TTL, counters included."""
    broker = memory(history_ttl="1")
    for i in range(200):
        broker.publish((message(f"swept-{i}", data=i),), 1)
    assert broker.stats()[0] == 200
    wait_for(lambda: broker.stats() == (0, 0), timeout=1 + broker.sweep_interval + 3,
             message="the sweeper forgetting expired rooms")


def test_memory_history_gives_its_tables_and_memory_back(memory, monkeypatch):
    """A dict's table never shrinks as entries go: once 2,000 rooms and their idempotency
    keys are swept, both dicts are rebuilt small, and the broker, empty, asks the C allocator
    to return the freed memory (malloc_trim) although far under 4 MiB was freed."""
    trims = []
    monkeypatch.setattr(allocator, "trim", lambda: trims.append(time.monotonic()))
    broker = memory(history_ttl="1")
    for i in range(2000):
        broker.publish((message(f"table-{i}"),), 1, Idempotency(f"table-{i}", "fp"))
    tables = sys.getsizeof(broker._audiences), sys.getsizeof(broker._keys)
    wait_for(lambda: broker.stats() == (0, 0) and broker.idempotency_keys() == 0 and trims,
             timeout=1 + broker.sweep_interval + 5, message="the sweep and the trim")
    # rebuilt once at most a quarter is left: a sweep may find only part expired (a slow
    # host took long to publish), rebuild for the rest (under a quarter), then empty that one
    # later; either way the table is a third or less of what it was (a dict never shrinks)
    assert sys.getsizeof(broker._audiences) * 3 < tables[0], "the audiences' dict shrank"
    assert sys.getsizeof(broker._keys) * 3 < tables[1], "the keys' dict shrank"
    assert broker.empty()


def test_memory_history_expires_on_write(memory):
    """Without the sweeper, publishing forgets expired audiences as it goes (a couple per
    publish): history does not wait for a read to expire."""
    broker = memory(history_ttl="1", history_size="0")
    broker.stop()  # the sweeper: only publishing expires now
    for i in range(50):
        broker.publish((message(f"old-{i}"),), 1)
    wait_for(lambda: broker.publish((message("live"),), 1) and broker.stats()[0] == 1,
             timeout=10, message="expiry on write")


def test_memory_history_keeps_at_most_max_rooms_and_ids_never_go_back(memory):
    broker = memory(history_max_rooms="10", history_size="5")
    ids = {f"cap-{i}": broker.publish((message(f"cap-{i}"),), 1)[0] for i in range(25)}
    assert broker.stats()[0] == 10, "the least recently published rooms were forgotten"
    assert broker.history("cap-24", ids["cap-24"]).recovered
    assert not broker.history("cap-0", ids["cap-0"]).recovered, "forgotten: cannot vouch"
    again = broker.publish((message("cap-0"),), 1)[0]
    highest = max(order_of(i) for i in ids.values())
    assert order_of(again) > order_of(ids["cap-0"]), "a re-created room's ids go on upwards"
    assert order_of(again) > highest or order_of(again)[1] > order_of(ids["cap-14"])[1]
    resumed = broker.history("cap-0", ids["cap-0"])
    assert not resumed.recovered and resumed.frames == []


def test_memory_history_counters_are_bounded_with_history_size_0(memory):
    broker = memory(history_size="0", history_max_rooms="5")
    for i in range(100):
        broker.publish((message(f"n-{i}"),), 1)
    assert broker.stats() == (5, 0)


def test_memory_history_keeps_at_most_max_bytes(memory):
    broker = memory(history_max_bytes="20000", history_size="100")
    frame_size = None
    for i in range(100):
        broker.publish((message(f"b-{i % 7}", data="x" * 1000),), 1)
        _, kept = broker.stats()
        frame_size = frame_size or kept
        assert kept <= 20000
    assert broker.stats()[1] > 20000 - 2 * frame_size, "kept up to the budget, not far below"


# -- a dropped subscription loses nothing (issue 14) -----------------------------------------


class Peer:
    """One client on ``hub`` over a socketpair, in ``rooms``: a thread records the ids of the
    notifications it receives and the close frame, if one comes."""

    def __init__(self, hub: Hub, flusher: Flusher, conn_id: int, rooms: tuple[str, ...],
                 user: str | None = None):
        self.ours, self.theirs = socket.socketpair()
        self.conn = Connection(conn_id, self.ours, "test", 1 << 22, flusher)
        self.conn.user = user
        assert hub.add(self.conn) is None
        for room in rooms:
            hub.subscribe(self.conn, room)
        self.ids: list[str] = []
        self.replies: list[dict] = []  # text frames that are not notifications
        self.close: tuple[int, str] | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        parser = FrameParser()
        self.theirs.settimeout(30)
        try:
            while self.close is None:
                data = self.theirs.recv(65536)
                if not data:
                    return
                for opcode, payload in parser.feed(data):
                    if opcode == OP_TEXT:
                        obj = json.loads(payload)
                        if "id" in obj:
                            self.ids.append(obj["id"])
                        else:
                            self.replies.append(obj)
                    elif opcode == OP_CLOSE:
                        self.close = (struct.unpack("!H", payload[:2])[0], payload[2:].decode())
        except OSError:
            return

    def shut(self) -> None:
        self.ours.close()
        self.theirs.close()


@pytest.fixture
def peers():
    """``peers(hub, *rooms_each)``: clients on ``hub``; all closed after the test."""
    flusher = Flusher(poll_timeout=0.05)
    flusher.start()
    made: list[Peer] = []

    def build(hub: Hub, *rooms_each: tuple[str, ...], user: str | None = None) -> list[Peer]:
        new = [Peer(hub, flusher, len(made) + i + 1, rooms, user)
               for i, rooms in enumerate(rooms_each)]
        made.extend(new)
        return new

    yield build
    flusher.stop()
    for peer in made:
        peer.shut()


def drop_subscription(broker) -> bool:  # noqa: ANN001
    """Kill the Redis connection of ``broker``'s listener, found by its client name, as
    ``CLIENT KILL`` or Redis's output-buffer limit would (never another process's). False
    for the memory broker, which has no subscription to lose."""
    if broker.kind != "redis":
        return False
    name = broker._listener_redis.connection_pool.connection_kwargs["client_name"]
    client = redis.Redis.from_url(REDIS_URL)
    try:
        wait_for(lambda: any(c["name"] == name for c in client.client_list()),
                 message="the listener connected")
        killed = 0
        for entry in client.client_list():
            if entry["name"] == name:
                killed += client.client_kill_filter(_id=entry["id"])
        return killed > 0
    finally:
        client.close()


def test_a_dropped_subscription_is_caught_up_in_order_without_duplicates(make, peers):
    """Another worker publishes right after this worker's subscription was killed, 6 times:
    each client gets every message of its audiences once, in publish order, and the catch-up
    (not the live channel) delivered some of them. The memory broker: nothing to drop."""
    hub = Hub(10)
    listener = make(size=100, hub=hub)
    publisher = make(size=100) if listener.kind == "redis" else listener
    clients = peers(hub, (), ("a",), ("a", "b"))
    audiences = (("a",), ("b",), None)
    sent: list[tuple[str | None, str]] = []
    for round_ in range(6):
        drop_subscription(listener)
        for i in range(12):
            rooms = audiences[i % 3]
            room = rooms[0] if rooms else None
            [mid] = publisher.publish((message(room, data=i),), 1)
            sent.append((room, mid))
        wait_for(lambda: listener.ready, message="resubscribed")
    for peer, rooms in zip(clients, ((), ("a",), ("a", "b"))):
        expected = [mid for room, mid in sent if room is None or room in rooms]
        wait_for(lambda: len(peer.ids) >= len(expected), timeout=10, message="every message")
        assert peer.ids == expected, "every message once, in publish order"
        assert peer.close is None
    if listener.kind == "redis":
        assert listener.replayed > 0, "some messages came by the catch-up"
        assert listener.gaps == 0


def _cut_off_then(make, peers, damage):  # noqa: ANN001, ANN202
    """A worker whose subscription is killed while ``damage(publisher, admin)`` runs."""
    hub = Hub(10)
    listener = make(size=3, hub=hub)
    if listener.kind != "redis":
        pytest.skip("the memory broker has no subscription to lose")
    publisher = make(size=3)
    clients = peers(hub, ("a",), ())
    [first] = publisher.publish((message("a"),), 1)
    wait_for(lambda: clients[0].ids == [first], message="the first message live")
    admin = redis.Redis.from_url(REDIS_URL)
    try:
        assert drop_subscription(listener)
        damage(publisher, admin, listener)
    finally:
        admin.close()
    for peer in clients:
        wait_for(lambda: peer.close is not None, timeout=10, message="the close to resume")
        assert peer.close == (CLOSE_INTERNAL_ERROR, REASON_MISSED_MESSAGES)
    assert listener.gaps == 1
    return listener, publisher, clients, first


def test_history_trimmed_past_the_drop_closes_clients_to_resume(make, peers):
    """10 messages to a room keeping 3, published while the subscription is down: the first
    missed ones cannot be replayed, so the clients are told (1011) and resume with since,
    where recovery answers ``recovered: false``."""
    def publish_ten(publisher, admin, listener):  # noqa: ANN001, ANN202
        for i in range(10):
            publisher.publish((message("a", data=i),), 1)

    listener, publisher, clients, first = _cut_off_then(make, peers, publish_ten)
    assert not listener.history("a", first).recovered
    assert clients[0].ids == [first], "nothing replayed out of order before the close"
    wait_for(lambda: listener.ready, message="subscribed again")
    later = peers(listener._hub, ("a",))[0]
    [mid] = publisher.publish((message("a"),), 1)
    wait_for(lambda: later.ids == [mid], message="live again after the gap")


def test_a_lost_bus_log_closes_clients_to_resume(make, peers):
    """Redis lost the bus log (restarted without persistence, flushed) while the subscription
    was down: nothing can vouch for what was missed, so the clients are told."""
    def lose_log(publisher, admin, listener):  # noqa: ANN001, ANN202
        admin.delete(listener._bus)

    _cut_off_then(make, peers, lose_log)


# -- the server API: a room's history page, control messages (wsserver.control) -------------


def test_room_history_pages_the_newest_or_after_since(make):
    broker = make(size=50)
    ids = [broker.publish((message("r", data=i),), 1)[0] for i in range(10)]

    def got(page):  # noqa: ANN001, ANN202
        return [json.loads(text)["id"] for text in page.messages]

    newest = broker.room_history("r", None, 3, 1.0)
    assert got(newest) == ids[-3:] and newest.complete and not newest.more
    after = broker.room_history("r", ids[2], 4, 1.0)
    assert got(after) == ids[3:7] and after.complete and after.more
    rest = broker.room_history("r", ids[6], 4, 1.0)
    assert got(rest) == ids[7:] and rest.complete and not rest.more
    assert [json.loads(t)["data"] for t in rest.messages] == [7, 8, 9], "whole envelopes"
    up_to_date = broker.room_history("r", ids[-1], 10, 1.0)
    assert up_to_date.messages == [] and up_to_date.complete and not up_to_date.more


def test_room_history_is_incomplete_exactly_when_a_resume_would_be(make):
    broker = make(size=3)
    ids = [broker.publish((message("r"),), 1)[0] for _ in range(8)]
    old = broker.room_history("r", ids[0], 100, 1.0)
    assert not old.complete and not broker.history("r", ids[0]).recovered
    kept = [json.loads(t)["id"] for t in old.messages]
    assert kept == ids[-len(kept):] and len(kept) >= 3, "what is kept after it, in order"
    recent = broker.room_history("r", ids[-3], 100, 1.0)
    assert recent.complete and [json.loads(t)["id"] for t in recent.messages] == ids[-2:]
    future = broker.room_history("r", "999999999999999-0", 100, 1.0)
    assert not future.complete and future.messages == []
    nothing = broker.room_history("never-used", ids[0], 100, 1.0)
    assert not nothing.complete and nothing.messages == []
    assert broker.room_history("never-used", None, 100, 1.0).complete


def test_control_disconnects_a_users_connections_after_what_was_published_before(make, peers):
    from wsserver.codes import CLOSE_DISCONNECTED, REASON_DISCONNECTED
    from wsserver.control import DISCONNECT, Control

    hub = Hub(10)
    broker = make(hub=hub)
    theirs = peers(hub, ("a",), (), user="u")
    other = peers(hub, ("a",), user="v")[0]
    [mid] = broker.publish((message(None, user="u"),), 1)
    outcome = broker.control(Control(DISCONNECT, "u"), 1.0)
    assert outcome is not None and outcome.count == 2 and outcome.unanswered == 0
    assert outcome.workers >= 1
    for peer in theirs:
        wait_for(lambda: peer.close is not None, message="the 4002 close")
        assert peer.close == (CLOSE_DISCONNECTED, REASON_DISCONNECTED)
        assert peer.ids == [mid], "the notification published before came first"
    again = broker.control(Control(DISCONNECT, "u"), 1.0)
    assert again is not None and again.count == 0, "closing ones are not counted twice"
    nobody = broker.control(Control(DISCONNECT, "nobody"), 1.0)
    assert nobody is not None and nobody.count == 0
    assert other.close is None


def test_control_unsubscribe_takes_a_user_out_of_a_room_with_a_reply(make, peers):
    from wsserver.control import UNSUBSCRIBE, Control, unsubscribed_reply

    hub = Hub(10)
    broker = make(hub=hub)
    theirs = peers(hub, ("a", "b"), ("a",), user="u")
    other = peers(hub, ("a",), user="v")[0]
    [before] = broker.publish((message("a"),), 1)
    outcome = broker.control(Control(UNSUBSCRIBE, "u", "a"), 1.0)
    assert outcome is not None and outcome.count == 2
    [after] = broker.publish((message("a"),), 1)
    [in_b] = broker.publish((message("b"),), 1)
    wait_for(lambda: other.ids == [before, after], message="the other user gets both")
    wait_for(lambda: theirs[0].ids == [before, in_b], message="room b still reaches it")
    # (Redis ids are per stream: `after` and `in_b` may be equal strings, so lists compare)
    assert theirs[0].ids == [before, in_b] and theirs[1].ids == [before], "nothing after it"
    for peer in theirs:
        wait_for(lambda: peer.replies, message="the unsubscribed reply")
        assert peer.replies == [unsubscribed_reply("a")] and peer.close is None
    assert hub.room_counts() == {"a": 1, "b": 1}


def test_a_control_message_missed_by_a_dropped_subscription_is_caught_up(make, peers):
    """With Redis a control message is in the bus log: a worker whose subscription dropped
    acts on it when it catches up, in order, and never shows it to a client."""
    from wsserver.codes import CLOSE_DISCONNECTED
    from wsserver.control import DISCONNECT, Control

    hub = Hub(10)
    listener = make(hub=hub)
    if listener.kind != "redis":
        pytest.skip("the memory broker has no subscription to lose")
    publisher = make()
    peer = peers(hub, ("a",), user="u")[0]
    assert drop_subscription(listener)
    [mid] = publisher.publish((message("a"),), 1)
    outcome = publisher.control(Control(DISCONNECT, "u"), 1.0)
    assert outcome is not None
    wait_for(lambda: peer.close is not None, timeout=10, message="closed after the catch-up")
    assert peer.close[0] == CLOSE_DISCONNECTED and peer.ids == [mid] and peer.replies == []
    assert listener.gaps == 0


def test_reconnect_delays_carry_jitter():
    """Workers cut off together (a Redis restart) must not come back in lockstep: the
    listener draws each wait from [half, all] of the backoff."""
    import inspect

    from wsserver.brokers import redis as redis_broker

    assert "random.uniform(backoff / 2, backoff)" in inspect.getsource(redis_broker)


def test_a_sentinel_broker_names_the_master_and_sentinels_never_the_password():
    """The start-up line's broker part with Sentinel: master name, database, TLS, sentinels;
    the URL's password nowhere. Made without connecting (redis-py connects lazily)."""
    broker = make_broker(load_settings({}, {
        "redis_sentinels": ("10.0.0.1:26379", "[::1]:26380"), "redis_sentinel_master": "mm",
        "redis_url": "rediss://me:s3cret@/4", "redis_prefix": "p"}))
    assert broker.describe() == (
        "redis sentinel master mm/4 (TLS) via 10.0.0.1:26379,[::1]:26380 prefix p")
    plain = make_broker(load_settings({}, {"redis_sentinels": ("s:1",),
                                           "redis_sentinel_master": "mm"}))
    assert plain.describe() == "redis sentinel master mm/0 via s:1 prefix wsserver"

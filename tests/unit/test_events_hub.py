"""EventLog (the hub's logic), the replica's fan-out and the hub publisher, without Ray:
the fan-out reads a real EventLog through the same call the Ingress makes."""

import asyncio
import contextlib
import json
import time
from typing import Any

from graph.events.fanout import LATEST, EventFanout, sse_frame
from graph.events.hub import EventHubService
from graph.events.model import HubPublisher, StreamEvent, TrackedDetection, hub_event
from graph.events.ring import EventFilter, EventLog


def sub_event(sub: str, kind: str = "detection", n: int = 0) -> dict[str, Any]:
    display, camera = sub.split(";")
    return {
        "topic": f"sub:{sub}",
        "type": kind,
        "camera_id": camera,
        "subscription_id": sub,
        "display_id": display,
        "data": {"n": n},
    }


def test_ids_increase_across_topics_and_each_topic_keeps_its_newest() -> None:
    log = EventLog(capacity=3)
    log.publish([sub_event("d;busy", n=i) for i in range(10)])
    log.publish([sub_event("d;quiet", n=100)])
    result = log.read(0)
    assert [e["id"] for e in result.events] == [8, 9, 10, 11]
    assert [e["data"]["n"] for e in result.events] == [7, 8, 9, 100]
    assert result.missed == 7 and result.cursor == 11
    # The quiet camera's event survived the busy one's flood.
    assert log.read(0, EventFilter(cameras={"quiet"})).events[0]["data"]["n"] == 100


def test_a_reader_is_told_exactly_what_it_missed_once() -> None:
    log = EventLog(capacity=4)
    log.publish([sub_event("d;a", n=i) for i in range(3)])  # ids 1..3
    first = log.read(0, limit=2)
    assert [e["id"] for e in first.events] == [1, 2] and first.cursor == 2
    log.publish([sub_event("d;a", n=i) for i in range(3, 9)])  # ids 4..9, evicts 1..5
    second = log.read(first.cursor)
    assert [e["id"] for e in second.events] == [6, 7, 8, 9]
    assert second.missed == 3  # ids 3, 4, 5: never delivered
    assert log.read(second.cursor).missed == 0


def test_filters_by_camera_subscription_type_and_job() -> None:
    log = EventLog()
    log.publish(
        [
            sub_event("d1;cam1"),
            sub_event("d1;cam1", "new"),
            sub_event("d2;cam2"),
            {"topic": "job:j1", "type": "job.progress", "job_id": "j1", "data": {}},
        ]
    )
    ids = lambda flt: [e["id"] for e in log.read(0, flt).events]  # noqa: E731
    assert ids(EventFilter(cameras={"cam1"})) == [1, 2]
    assert ids(EventFilter(subscriptions={"d2;cam2"})) == [3]
    assert ids(EventFilter(types={"new"})) == [2]
    assert ids(EventFilter(jobs={"j1"})) == [4]
    assert ids(EventFilter.of({"cameras": ["cam1"], "types": ["detection"]})) == [1]


def test_type_filtered_readers_count_only_their_type_as_missed() -> None:
    log = EventLog(capacity=2)
    log.publish([sub_event("d;a", "detection"), sub_event("d;a", "new")])
    log.publish([sub_event("d;a", "detection"), sub_event("d;a", "detection")])
    assert log.read(0, EventFilter(types={"new"})).missed == 1
    assert log.read(0, EventFilter(types={"detection"})).missed == 1


def test_sessions_stamp_later_events_of_their_display() -> None:
    log = EventLog()
    log.publish([sub_event("disp;cam")])
    log.set_session("disp", 42)
    log.publish([sub_event("disp;cam"), sub_event("other;cam")])
    events = log.read(0).events
    assert [e["session_id"] for e in events] == [None, 42, None]
    log.set_session("disp", None)
    log.publish([sub_event("disp;cam")])
    assert log.read(3).events[0]["session_id"] is None


def test_least_recent_topics_go_beyond_max_topics() -> None:
    log = EventLog(capacity=2, max_topics=2)
    for name in ("d;a", "d;b", "d;c"):
        log.publish([sub_event(name)])
    assert {e["camera_id"] for e in log.read(0).events} == {"b", "c"}
    assert log.stats()["topics_dropped"] == 1


class LogReader:
    """The EventHub itself (its class, without Ray) over a given EventLog: the fan-out
    reads it through the same `read` call the Ingress makes on the actor."""

    def __init__(self, log: EventLog) -> None:
        self.service = EventHubService()
        self.log = log

    @property
    def log(self) -> EventLog:
        return self.service._log

    @log.setter
    def log(self, log: EventLog) -> None:  # a restarted hub: a new, empty log
        self.service._log = log

    def publish(self, events: list[dict[str, Any]]) -> None:
        self.service.publish_now(events)

    async def read(
        self, after: int, flt: dict[str, Any] | None, limit: int, wait_s: float
    ) -> dict[str, Any]:
        return await self.service.read(after, flt, limit, wait_s)


async def take(stream: Any, n: int, timeout_s: float = 5.0) -> list[dict[str, Any]]:
    """Up to `n` events (heartbeats skipped); fewer if `timeout_s` passes first."""
    out: list[dict[str, Any]] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            async for event in stream:
                if event is not None:
                    out.append(event)
                if len(out) >= n:
                    return out
    return out


def test_resume_replays_the_buffer_then_goes_live_without_gaps_or_repeats() -> None:
    async def main() -> None:
        hub = LogReader(EventLog(capacity=100))
        fanout = EventFanout(hub.read, client_capacity=100, wait_s=0.2)
        hub.publish([sub_event("d;a", n=i) for i in range(5)])  # ids 1..5
        live = fanout.follow(EventFilter(), None)
        first = asyncio.ensure_future(take(live, 2))
        await fanout.started()
        hub.publish([sub_event("d;a", n=i) for i in range(5, 7)])  # ids 6, 7
        assert [e["id"] for e in await first] == [6, 7]
        await live.aclose()  # the client disconnects after id 7
        hub.publish([sub_event("d;a", n=i) for i in range(7, 10)])  # ids 8..10, missed
        resumed = fanout.follow(EventFilter(), after_id=7)
        got = asyncio.ensure_future(take(resumed, 5))
        await asyncio.sleep(0.1)
        hub.publish([sub_event("d;a", n=i) for i in range(10, 12)])  # ids 11, 12, live
        assert [e["id"] for e in await got] == [8, 9, 10, 11, 12]
        await resumed.aclose()
        assert fanout.status()["clients"] == 0

    asyncio.run(main())


def test_a_resume_too_late_is_told_how_many_were_evicted() -> None:
    async def main() -> None:
        hub = LogReader(EventLog(capacity=3))
        fanout = EventFanout(hub.read, wait_s=0.2)
        hub.publish([sub_event("d;a", n=i) for i in range(10)])  # keeps 8..10
        stream = fanout.follow(EventFilter(), after_id=2)
        got = await take(stream, 4)
        assert got[0] == {"type": "dropped", "count": 5, "reason": "evicted"}
        assert [e["id"] for e in got[1:]] == [8, 9, 10]
        await stream.aclose()

    asyncio.run(main())


def test_a_slow_client_loses_its_oldest_events_and_is_told_others_get_all() -> None:
    async def main() -> None:
        hub = LogReader(EventLog(capacity=1000))
        fanout = EventFanout(hub.read, client_capacity=10, wait_s=0.2)
        slow_queue = fanout.register(EventFilter())  # connected, but reads nothing yet
        fast = fanout.follow(EventFilter(), None)
        fast_events = asyncio.ensure_future(take(fast, 50))
        await fanout.started()
        for i in range(0, 50, 5):  # bursts the fast client keeps up with
            hub.publish([sub_event("d;a", n=n) for n in range(i, i + 5)])
            await asyncio.sleep(0.02)
        assert len(await fast_events) == 50  # never held back by the slow one
        slow = fanout.follow(slow_queue.flt, None, queue=slow_queue)
        got = await take(slow, 11)
        assert got[0] == {"type": "dropped", "count": 40, "reason": "slow_client"}
        assert [e["data"]["n"] for e in got[1:]] == list(range(40, 50))
        assert slow_queue.dropped_total == 40
        await slow.aclose()
        await fast.aclose()

    asyncio.run(main())


def test_changing_a_client_filter_stops_its_events() -> None:
    async def main() -> None:
        hub = LogReader(EventLog())
        fanout = EventFanout(hub.read, wait_s=0.2)
        queue = fanout.register(EventFilter(subscriptions={"d;a"}))
        stream = fanout.follow(queue.flt, None, queue=queue)
        got = asyncio.ensure_future(take(stream, 1))
        await fanout.started()
        hub.publish([sub_event("d;b"), sub_event("d;a")])
        assert [e["subscription_id"] for e in await got] == ["d;a"]
        queue.flt = EventFilter(subscriptions=set())
        hub.publish([sub_event("d;a")])
        assert await take(fanout.follow(queue.flt, None, 0.05, queue=queue), 1, 0.5) == []

    asyncio.run(main())


def test_hub_restarted_empty_makes_the_pump_read_from_its_start() -> None:
    async def main() -> None:
        hub = LogReader(EventLog())
        fanout = EventFanout(hub.read, wait_s=0.1)
        hub.publish([sub_event("d;a") for _ in range(5)])
        queue = fanout.register(EventFilter())
        stream = fanout.follow(queue.flt, None, queue=queue)
        assert await fanout.started() == 5
        hub.log = EventLog()  # a restarted hub numbers from 1 again, with a new epoch
        hub.publish([sub_event("d;a", n=99)])
        got = await take(stream, 2)
        assert got[0] == {"type": "dropped", "count": 0, "reason": "hub_restarted"}
        assert got[1]["data"]["n"] == 99 and got[1]["id"] == 1  # not skipped as "seen"
        assert fanout.status()["hub_restarts"] == 1
        await stream.aclose()

    asyncio.run(main())


def test_a_malformed_event_is_skipped_and_the_pump_goes_on() -> None:
    async def main() -> None:
        hub = LogReader(EventLog())
        fanout = EventFanout(hub.read, wait_s=0.1)
        stream = fanout.follow(EventFilter(cameras={"a"}), None)
        got = asyncio.ensure_future(take(stream, 2))
        await fanout.started()
        bad = sub_event("d;a") | {"camera_id": ["a"]}  # unhashable: the filter raises
        hub.publish([sub_event("d;a", n=1), bad, sub_event("d;a", n=2)])
        hub.publish([sub_event("d;a", n=3)])
        assert [e["data"]["n"] for e in await got] == [1, 2]
        assert [e["data"]["n"] for e in await take(stream, 1)] == [3]
        assert fanout.status()["pump_errors"] == 1
        assert "skipped event: TypeError" in fanout.status()["last_error"]
        await stream.aclose()

    asyncio.run(main())


def test_a_resume_while_the_hub_is_away_gets_heartbeats_then_its_events() -> None:
    async def main() -> None:
        hub = LogReader(EventLog())
        hub.publish([sub_event("d;a", n=i) for i in range(3)])  # ids 1..3
        away = True

        async def read(
            after: int, flt: dict[str, Any] | None, limit: int, wait_s: float
        ) -> dict[str, Any]:
            if away:
                raise ConnectionError("hub restarting")
            return await hub.read(after, flt, limit, wait_s)

        fanout = EventFanout(read, wait_s=0.1)
        stream = fanout.follow(EventFilter(), after_id=1, idle_s=0.05)
        first = [await anext(stream), await anext(stream)]
        assert first == [None, None]  # heartbeats: the connection is kept alive
        away = False
        assert [e["id"] for e in await take(stream, 2)] == [2, 3]
        await stream.aclose()
        assert fanout.status()["clients"] == 0

    asyncio.run(main())


def test_sse_frames() -> None:
    event = {"id": 7, "type": "detection", "data": {"x": 1}}
    frame = sse_frame(event)
    assert frame.startswith("id: 7\nevent: detection\ndata: ") and frame.endswith("\n\n")
    assert json.loads(frame.split("data: ", 1)[1]) == event
    assert sse_frame({"type": "dropped", "count": 3, "reason": "slow_client"}).startswith(
        "event: dropped\n"
    )
    assert sse_frame(None) == ": heartbeat\n\n"
    assert LATEST > 2**40


def stream_event(n: int) -> StreamEvent:
    det = TrackedDetection(3, 2, "car", 0.9, (1.0, 2.0, 3.0, 4.0), True)
    return StreamEvent("detection", "disp;cam", "cam", "m", n, 1.0, 1.5, (det,))


def test_hub_event_shape() -> None:
    event = hub_event(stream_event(4))
    assert event["topic"] == "sub:disp;cam" and event["display_id"] == "disp"
    assert event["data"]["detections"][0]["box"] == (1.0, 2.0, 3.0, 4.0)
    assert event["data"]["frame_seq"] == 4 and event["type"] == "detection"


def test_publisher_never_blocks_bounds_its_buffer_and_resends_after_a_failure() -> None:
    async def main() -> None:
        sent: list[dict[str, Any]] = []
        fail = True

        keys: list[tuple[str, int]] = []

        async def send(events: list[dict[str, Any]], key: tuple[str, int]) -> None:
            keys.append(key)
            if fail:
                raise ConnectionError("hub down")
            sent.extend(events)

        publisher = HubPublisher(send, max_buffer=5)
        publisher.publish([stream_event(i) for i in range(3)])
        assert await publisher.flush() == 0
        assert publisher.status()["pending"] == 3 and publisher.send_errors == 1
        publisher.publish([stream_event(i) for i in range(3, 9)])  # the buffer drops 3
        assert publisher.status() | {"last_error": None} == {
            "pending": 8,  # the failed batch, kept whole, and the bounded buffer
            "sent": 0,
            "dropped": 1,
            "send_errors": 1,
            "last_error": None,
        }
        fail = False
        assert await publisher.flush() == 8
        assert [e["data"]["frame_seq"] for e in sent] == [0, 1, 2, 4, 5, 6, 7, 8]
        # The failed batch went again under its key; the next batch has the next one.
        assert keys[0] == keys[1] and keys[2][1] == keys[1][1] + 1

        async def hang(events: list[dict[str, Any]], key: tuple[str, int]) -> None:
            await asyncio.sleep(60)

        stuck = HubPublisher(hang, timeout_s=0.1)
        stuck.publish([stream_event(1)])
        assert await stuck.flush() == 0 and stuck.status()["pending"] == 1

    asyncio.run(main())


def test_a_new_pump_after_all_clients_left_starts_from_now() -> None:
    async def main() -> None:
        hub = LogReader(EventLog())
        fanout = EventFanout(hub.read, wait_s=0.1)
        first = fanout.follow(EventFilter(), None)
        got = asyncio.ensure_future(take(first, 1))
        await fanout.started()
        hub.publish([sub_event("d;a", n=1)])
        assert (await got)[0]["data"]["n"] == 1
        await first.aclose()
        await asyncio.sleep(0.3)  # the pump ends with its last client
        hub.publish([sub_event("d;a", n=2)])  # nobody listens: not for the next client
        queue = fanout.register(EventFilter())
        second = fanout.follow(queue.flt, None, queue=queue)
        assert await asyncio.wait_for(fanout.started(), 5) == 2
        hub.publish([sub_event("d;a", n=3)])
        assert [e["data"]["n"] for e in await take(second, 1)] == [3]
        await second.aclose()
        # A resume after a pump restart replays and goes live (it does not hang).
        resumed = fanout.follow(EventFilter(), after_id=1)
        assert [e["data"]["n"] for e in await take(resumed, 2)] == [2, 3]
        await resumed.aclose()

    asyncio.run(main())


def test_the_replica_measures_capture_to_event_latency() -> None:
    async def main() -> None:
        hub = LogReader(EventLog())
        fanout = EventFanout(hub.read, wait_s=0.1)
        stream = fanout.follow(EventFilter(), None)
        got = asyncio.ensure_future(take(stream, 2))
        await fanout.started()
        now = time.time()
        hub.publish(
            [
                {**sub_event("d;a"), "data": {"captured_at": now - 0.5}},
                {**sub_event("d;a"), "data": {"captured_at": now - 1.5}},
            ]
        )
        await got
        latency = fanout.status()["capture_to_event_ms"]
        assert latency["n"] == 2 and 450 <= latency["p50"] <= 2000 and latency["p95"] >= 1450
        await stream.aclose()

    asyncio.run(main())


def test_a_batch_sent_twice_is_stored_once() -> None:
    log = EventLog()
    log.publish([sub_event("d;a")], batch=("pub-1", 1))
    log.publish([sub_event("d;a")], batch=("pub-1", 1))  # a resend after a timeout
    log.publish([sub_event("d;a")], batch=("pub-2", 1))
    log.publish([sub_event("d;a")], batch=("pub-1", 2))
    assert [e["id"] for e in log.read(0).events] == [1, 2, 3]
    assert log.stats()["duplicate_batches"] == 1


def test_each_client_is_told_only_of_its_own_missed_events() -> None:
    async def main() -> None:
        hub = LogReader(EventLog(capacity=4))
        fanout = EventFanout(hub.read, wait_s=0.1, limit=2)
        quiet = fanout.register(EventFilter(cameras={"quiet"}))
        busy = fanout.register(EventFilter(cameras={"busy"}))
        await fanout.started()
        # A burst the pump (2 per read) cannot keep up with: the busy topic evicts.
        hub.publish([sub_event("d;quiet")] + [sub_event("d;busy", n=i) for i in range(20)])
        await asyncio.sleep(0.5)
        quiet_got = await take(fanout.follow(quiet.flt, None, 0.05, queue=quiet), 5, 0.5)
        busy_got = await take(fanout.follow(busy.flt, None, 0.05, queue=busy), 10, 0.5)
        assert [e["type"] for e in quiet_got] == ["detection"]
        assert busy_got[0]["type"] == "dropped" and busy_got[0]["reason"] == "evicted"
        delivered = [e for e in busy_got if e["type"] == "detection"]
        assert busy_got[0]["count"] + len(delivered) == 20

    asyncio.run(main())


def test_a_reader_that_keeps_up_skips_idle_topics() -> None:
    log = EventLog()
    for i in range(2000):
        log.publish([{"topic": f"job:{i}", "type": "job.finished", "job_id": str(i)}])
    log.publish([sub_event("d;a", n=1)])
    result = log.read(2000)
    assert [e["data"]["n"] for e in result.events] == [1] and result.cursor == 2001
    # A full resume is paged by `limit`, oldest first.
    page = log.read(0, limit=10)
    assert [e["id"] for e in page.events] == list(range(1, 11)) and page.cursor == 10


def test_a_restarted_hub_numbers_above_the_old_one_and_a_resume_is_told_of_the_gap() -> None:
    """Given a client that saw event N of a hub that then restarted, when it resumes with
    Last-Event-ID N, then it is told events were lost and gets every event of the new hub
    (with 1-based numbering a new hub's first N events were skipped silently)."""
    from graph.events.ring import restart_safe_first_id

    async def main() -> list[dict[str, Any]]:
        old = EventLog(first_id=restart_safe_first_id(1_800_000_000.0))
        hub = LogReader(old)
        hub.publish([sub_event("d;a", n=i) for i in range(5)])
        seen = old.last_id
        # The hub restarts a second later, empty, numbering from its own start.
        hub.log = EventLog(first_id=restart_safe_first_id(1_800_000_001.0))
        hub.publish([sub_event("d;a", n=100 + i) for i in range(3)])
        assert hub.log.read(0).events[0]["id"] > seen
        fanout = EventFanout(hub.read, wait_s=0.1)
        stream = fanout.follow(EventFilter(), seen, 0.05)
        got = await take(stream, 4)
        await stream.aclose()
        return got

    got = asyncio.run(main())
    assert got[0] == {"type": "dropped", "count": 0, "reason": "hub_restarted"}
    assert [e["data"]["n"] for e in got[1:]] == [100, 101, 102]


def test_a_resume_from_this_hubs_own_start_is_not_told_of_a_restart() -> None:
    """Last-Event-ID equal to the hub's start (the client saw it empty) loses nothing."""
    from graph.events.ring import restart_safe_first_id

    async def main() -> list[dict[str, Any]]:
        hub = LogReader(EventLog(first_id=restart_safe_first_id(1_800_000_000.0)))
        start = hub.log.last_id
        hub.publish([sub_event("d;a", n=1)])
        fanout = EventFanout(hub.read, wait_s=0.1)
        stream = fanout.follow(EventFilter(), start, 0.05)
        got = await take(stream, 1)
        await stream.aclose()
        return got

    got = asyncio.run(main())
    assert [e.get("type") for e in got] != ["dropped"]
    assert got[0]["data"]["n"] == 1

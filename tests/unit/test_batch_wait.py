"""The detectors' default batching (`batch_wait_timeout_s` 0, README "Batches take what
is queued"), run through Ray Serve's own `@serve.batch` queue: no frame waits for
partners, the frames of one multi-frame call share a batch, and frames that arrive
while a batch runs (the engine blocks the replica's event loop) share the next one."""

from __future__ import annotations

import asyncio
import time

import pytest
from ray import serve
from ray.serve import batching

from graph.common.schemas import DetectorUserConfig

DEFAULT = DetectorUserConfig()
INFERENCE_S = 0.02


@pytest.fixture(autouse=True)
def outside_a_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    # The queue's only tie to a running replica is a warning that reads the
    # deployment's max_ongoing_requests; the batching itself is Serve's own code.
    monkeypatch.setattr(
        batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests", lambda _: None
    )


class Replica:
    """What `Detector` does around its engine: a batched method whose engine call
    blocks the event loop, and `detect_many` gathering one call's frames."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.during_first: list[int] = []  # calls that arrive while the first batch runs
        self.arrived: list[asyncio.Future[list[int]]] = []

    async def _detect_batch(self, frame: int) -> int:
        raise NotImplementedError

    async def detect_many(self, frames: list[int]) -> list[int]:
        return list(await asyncio.gather(*(self._detect_batch(f) for f in frames)))


def new_replica() -> Replica:
    """Serve keeps one queue per decorated method, bound to the event loop that first
    used it: each test decorates its own."""

    class Batched(Replica):
        @serve.batch(
            max_batch_size=DEFAULT.max_batch_size,
            batch_wait_timeout_s=DEFAULT.batch_wait_timeout_s,
        )
        async def _detect_batch(self, frames: list[int]) -> list[int]:  # type: ignore[override]
            if not self.batches:
                # Calls that reach the replica meanwhile: they run once the loop is free.
                self.arrived = [
                    asyncio.ensure_future(self.detect_many([f])) for f in self.during_first
                ]
            self.batches.append(list(frames))
            time.sleep(INFERENCE_S)  # a synchronous engine, as in Detector._detect_batch
            return [f * 10 for f in frames]

    return Batched()


def test_the_default_waits_for_no_partner() -> None:
    assert DEFAULT.batch_wait_timeout_s == 0.0


def test_a_lone_frame_does_not_wait_for_the_next() -> None:
    async def run() -> list[list[int]]:
        replica = new_replica()
        first = asyncio.ensure_future(replica.detect_many([0]))
        for _ in range(20):  # event loop turns, no wall time: any wait would still go on
            await asyncio.sleep(0)
        second = asyncio.ensure_future(replica.detect_many([1]))
        assert await asyncio.gather(first, second) == [[0], [10]]
        return replica.batches

    assert asyncio.run(run()) == [[0], [1]]


def test_one_calls_frames_share_a_batch_up_to_the_maximum() -> None:
    async def run() -> list[list[int]]:
        replica = new_replica()
        n = DEFAULT.max_batch_size + 2
        assert await replica.detect_many(list(range(n))) == [f * 10 for f in range(n)]
        return replica.batches

    size = DEFAULT.max_batch_size
    assert asyncio.run(run()) == [list(range(size)), [size, size + 1]]


def test_frames_arriving_during_an_inference_share_the_next_batch() -> None:
    async def run() -> list[list[int]]:
        replica = new_replica()
        replica.during_first = [1, 2, 3]  # three other cameras' calls
        assert await replica.detect_many([0]) == [0]
        assert await asyncio.gather(*replica.arrived) == [[10], [20], [30]]
        return replica.batches

    assert asyncio.run(run()) == [[0], [1, 2, 3]]

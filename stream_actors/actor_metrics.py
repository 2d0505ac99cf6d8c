"""A camera actor's gauges for the Ray dashboard / Prometheus (a Ray shell: Ray's
metrics API), tagged by stream and subscription."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class CameraMetrics:
    def __init__(self) -> None:
        from ray.util import metrics

        self._fps_in = metrics.Gauge(
            "camgraph_stream_fps_in", "frames read per second", tag_keys=("stream",)
        )
        self._reconnects = metrics.Gauge(
            "camgraph_stream_reconnects", "reconnect attempts so far", tag_keys=("stream",)
        )
        self._fps_done = metrics.Gauge(
            "camgraph_subscription_fps_processed",
            "frames through the detector per second",
            tag_keys=("subscription",),
        )
        self._drops = metrics.Gauge(
            "camgraph_subscription_drops",
            "frames dropped so far, by reason",
            tag_keys=("subscription", "reason"),
        )
        self._latency = metrics.Gauge(
            "camgraph_subscription_latency_ms_p50",
            "capture to detection, median of recent frames",
            tag_keys=("subscription",),
        )

    def export(self, streams: Iterable[tuple[str, Any]]) -> None:
        """`streams`: (stream key, the actor's stream: its reader and processors)."""
        for key, stream in streams:
            self._fps_in.set(stream.reader.fps(), {"stream": key})
            self._reconnects.set(stream.reader.reconnects, {"stream": key})
            for sub_id, processor in list(stream.processors.items()):
                status = processor.status()
                tags = {"subscription": sub_id}
                self._fps_done.set(status["fps_processed"], tags)
                if status["latency_ms_p50"] is not None:
                    self._latency.set(status["latency_ms_p50"], tags)
                for reason, count in status["drops"].items():
                    self._drops.set(count, {**tags, "reason": reason})

"""Media jobs: detection over a whole video or image file, in the background.

`POST /detect/{media_id}` submits a job for an http(s) URL or a local file; the `MediaJobs`
actor runs it: it downloads the media if needed, reads it frame by frame, sends frames to
the detector deployment (a few in flight), publishes progress and detections to the
EventHub (topic `job:<job id>`) and persists each job record atomically. A restarted
actor cannot resume a job: what was queued or running becomes `interrupted`.

Everything but the actor (`actor.py`, the only module here that imports Ray) is pure and
tested without Ray: `JobStore` (`store.py`, records on disk), `JobRun` (`runner.py`, one
job's reading, detection and events, with `detect` and `publish` injected), `JobManager`
(`manager.py`), and `download` (`media.py`). Settings are in `settings.py`, records,
requests, events and errors in `records.py`. Events go to the hub through the camera
actors' `HubPublisher`.
"""

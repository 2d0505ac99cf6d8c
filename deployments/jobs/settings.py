"""`args.jobs`: the settings and limits of media jobs."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from graph.common.netpolicy import DEFAULT_DENIED, networks
from graph.common.schemas import StrictModel

MiB = 1024 * 1024


class MediaJobSettings(StrictModel):
    """`args.jobs`: where job records live and how jobs read media."""

    jobs_dir: Path = Field(Path("data/jobs"), description="records, downloads; relative: base_dir")
    max_download_bytes: int = Field(512 * MiB, ge=1, description="a larger download fails")
    denied_networks: tuple[str, ...] = Field(
        DEFAULT_DENIED, description="`url` media (and redirects) never from these networks"
    )

    @field_validator("denied_networks")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        networks(value)  # a bad CIDR is a clear error at deploy time
        return value

    download_timeout_s: float = Field(300.0, gt=0, le=86_400, description="one whole download")
    frame_stride: int = Field(1, ge=1, le=10_000, description="process every Nth video frame")
    max_frames: int | None = Field(None, ge=1, description="most frames processed per job")
    max_image_pixels: int = Field(
        50_000_000, ge=1024, description="a larger image or video frame fails the job"
    )
    progress_every_s: float = Field(0.5, ge=0, le=60, description="job.progress at most this often")
    keep_finished: int = Field(1000, ge=0, le=1_000_000, description="finished jobs kept")
    detect_concurrency: int = Field(2, ge=1, le=64, description="frames in flight per job")
    max_running_jobs: int = Field(2, ge=1, le=256, description="jobs at once; others queue")
    model_wait_s: float = Field(120.0, ge=0, le=3600, description="wait for a loading model")
    cancel_wait_s: float = Field(10.0, ge=0, le=600, description="DELETE waits this for the stop")
    allowed_dirs: tuple[Path, ...] | None = Field(
        (Path("data"),),
        description="`path` media only from under these (relative: base_dir); null: any "
        "readable path (an explicit opt-out)",
    )

    def resolved(self, base_dir: Path) -> MediaJobSettings:
        """Relative directories made absolute against `base_dir`."""

        def absolute(path: Path) -> Path:
            return path if path.is_absolute() else (base_dir / path).resolve()

        allowed = None if self.allowed_dirs is None else tuple(map(absolute, self.allowed_dirs))
        return self.model_copy(
            update={"jobs_dir": absolute(self.jobs_dir), "allowed_dirs": allowed}
        )

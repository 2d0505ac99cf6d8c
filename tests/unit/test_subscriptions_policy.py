"""File cameras read only from the configured directories (no Ray)."""

from __future__ import annotations

from pathlib import Path

from stream_actors.subscriptions import Subscription


def sub(path: str) -> Subscription:
    return Subscription.model_validate({"subscriptionIdentifier": "d;c", "fileUrl": path})


def test_files_under_the_allowed_directories_pass_and_others_are_refused(tmp_path: Path) -> None:
    allowed = tmp_path / "media"
    (allowed / "cams").mkdir(parents=True)
    (allowed / "cams" / "a.mp4").write_bytes(b"x")
    assert sub(str(allowed / "cams" / "a.mp4")).file_refusal([allowed]) is None
    assert sub(f"file://{allowed}/cams/a.mp4").file_refusal([allowed]) is None
    assert (
        Subscription.model_validate(
            {"subscriptionIdentifier": "d;c", "rtspUrl": "rtsp://h/x"}
        ).file_refusal([allowed])
        is None
    )
    for outside in ("/etc/passwd", f"{allowed}/../secret.mp4", f"{allowed}x/a.mp4"):
        refusal = sub(outside).file_refusal([allowed])
        assert refusal == "refused by policy: file cameras read only from streams.file_dirs"


def test_a_link_out_of_an_allowed_directory_is_refused(tmp_path: Path) -> None:
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "link.mp4").symlink_to("/etc/hostname")
    assert sub(str(allowed / "link.mp4")).file_refusal([allowed]) is not None

"""The live view (`/ui`) in a real browser: Debian's Chromium, headless, driven by
Selenium, against the deployed graph with the bearer token on and a real RTSP camera.

Tiles appear, the boxes drawn for a frame are the camera's detections of that frame (as
the API's own event ring has them), the models' states show, and a camera whose server
went away shows its state. A screenshot goes to data/test-output/live-view.png."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from deployments.detector import Detector
from deployments.ingress import Ingress
from graph.app import Deployments, build_graph
from graph.config import PROJECT_ROOT
from tests.integration.apps import app_config, deployed, healthy, scene_camera, wait_until
from tests.peers import RtspServer

pytestmark = pytest.mark.integration
APP = "camgraph-live-view-test"
TOKEN = "live-view-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SUB = "live;cam-live"
SCREENSHOT = PROJECT_ROOT / "data" / "test-output" / "live-view.png"


@pytest.fixture(scope="module")
def rtsp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RtspServer]:
    with scene_camera(tmp_path_factory.mktemp("clip"), 41) as server:
        yield server


@pytest.fixture(scope="module")
def app(cluster: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data = tmp_path_factory.mktemp("live")
    (data / "token").write_text(TOKEN)
    config = app_config(
        data, ingress={"auth_token_file": str(data / "token")}, streams={"reconcile_s": 1.0}
    )
    detector = Detector.options(num_replicas=1, ray_actor_options={"num_cpus": 0.5})
    url = cluster["http_url"]
    graph = build_graph(config, Deployments(detector, Ingress.options(num_replicas=1)))
    with deployed(APP, graph, ready=healthy(url), what="the model"):
        yield url


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    driver_path = shutil.which("chromedriver")
    assert driver_path, "chromedriver is missing: `make peers` installs Debian's chromium-driver"
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,900")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def tiles(browser: Any) -> dict[str, dict[str, str]]:
    found = browser.execute_script(
        "return [...document.querySelectorAll('.tile')].map(t => ({...t.dataset}))"
    )
    return {t["camera"]: t for t in found}


def ring(url: str) -> dict[int, int]:
    """frame_seq → number of boxes, from the API's own per-subscription event ring."""
    events = httpx.get(f"{url}/streams/{SUB}/events", params={"after": 0}, headers=AUTH)
    events.raise_for_status()
    return {e["frame_seq"]: len(e["detections"]) for e in events.json() if e["kind"] == "detection"}


def test_the_page_without_a_token_says_so(app: str, browser: Any) -> None:
    assert httpx.get(f"{app}/ui").status_code == 200  # the static page itself is open
    assert httpx.get(f"{app}/streams").status_code == 401  # its data is not
    browser.get(f"{app}/ui")
    wait_until(
        lambda: "401" in browser.find_element("id", "error").text,
        30,
        "the page to say the token is missing",
    )


def test_live_view_draws_the_cameras_detections_and_a_stopped_camera_state(
    app: str, rtsp: RtspServer, browser: Any
) -> None:
    body = {"subscriptionIdentifier": SUB, "rtspUrl": rtsp.url("scene"), "modelId": "demo"}
    assert httpx.post(f"{app}/streams", json=body, headers=AUTH, timeout=30).status_code == 201
    try:
        browser.get(f"{app}/ui?access_token={TOKEN}")
        assert "access_token" not in browser.current_url  # kept out of the address bar
        tile = wait_until(lambda: tiles(browser).get("cam-live"), 60, "the camera's tile")
        assert tile["state"] in {"connecting", "connected", "unknown"}

        def boxes_match_the_api() -> tuple[int, int] | None:
            shown = tiles(browser)["cam-live"]
            if int(shown.get("boxes", 0)) == 0 or not shown.get("frameSeq"):
                return None
            seq, drawn = int(shown["frameSeq"]), int(shown["boxes"])
            return (seq, drawn) if ring(app).get(seq) == drawn else None

        seq, drawn = wait_until(boxes_match_the_api, 90, "boxes of a frame, as the API has it")
        assert drawn > 0
        # The boxes come on the event stream as soon as a frame is detected; the frame
        # itself comes from the next poll of /cameras/{id}/image (every 250 ms, a JPEG
        # encoded by the camera actor), which on a loaded box can land a while later.
        wait_until(
            lambda: int(tiles(browser)["cam-live"].get("images", 0)) > 0,
            30,
            "a camera frame drawn under the boxes",
        )
        models = browser.execute_script(
            "return [...document.querySelectorAll('[data-model]')]"
            ".map(m => [m.dataset.model, m.dataset.state])"
        )
        assert ["demo", "enabled"] in models
        assert browser.find_element("css selector", ".tile .meta").text.startswith("fps in")
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SCREENSHOT))
        assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        print(f"live view screenshot: {SCREENSHOT} (frame {seq}, {drawn} boxes)")

        rtsp.stop()  # the camera goes away: its tile must say so
        state = wait_until(
            lambda: (s := tiles(browser)["cam-live"]["state"]) not in {"connected"} and s,
            60,
            "the tile to show the camera is no longer connected",
        )
        assert state in {"reconnecting", "circuit_open", "connecting"}
        chip = browser.find_element("css selector", ".tile[data-camera='cam-live'] .state")
        assert chip.text == state
        browser.save_screenshot(str(SCREENSHOT.with_name("live-view-stopped.png")))
        errors = browser.execute_script("return window.camgraphLive.errors")
        assert errors == 0, "the page failed to read an API"
    finally:
        httpx.delete(f"{app}/streams/{SUB}", headers=AUTH, timeout=30)

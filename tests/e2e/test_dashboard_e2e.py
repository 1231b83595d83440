"""The operator dashboard on the metrics port, against the real server, in headless Chromium."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from e2e_support import free_port
from PIL import Image

from allocsvc.client import Client

pytestmark = pytest.mark.e2e

TRUE_RATES = {"green": 0.30, "blue": 0.05, "red": 0.10}
SOURCES = ("google", "facebook", "instagram")
WAIT_S = 60.0


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers["Content-Type"], err.read().decode()


def _json(url: str) -> Any:
    status, kind, body = _get(url)
    assert (status, kind) == (200, "application/json"), body
    return json.loads(body)


@pytest.fixture
def dashboard(start_server, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A server with the dashboard on a metrics port, sampling history every 0.2 s, and one
    segmented experiment fed by simulated users in three bursts (each seen by the history)."""
    monkeypatch.setenv("ALLOCSVC_DASHBOARD__HISTORY_INTERVAL", "0.2")
    # No automatic tree rebuilds: each source serves from its own posteriors once it has its
    # minimum (instead of the global node until a first tree), so the shares the chart draws
    # move between bursts.
    monkeypatch.setenv("ALLOCSVC_HIERARCHY__ENABLED", "false")
    http_port = free_port()
    server = start_server(extra_args=("--metrics-port", str(http_port)))
    base = f"http://127.0.0.1:{http_port}"
    rng = random.Random(12)
    with Client(server.target, timeout=30) as client:
        client.create_experiment(
            {
                "id": "dash-checkout",
                "name": "Checkout button",
                "status": "running",
                "variants": list(TRUE_RATES),
                "segmentation": {
                    "mode": "manual",
                    "segment_by": ["source"],
                    "min_samples_per_segment": 30,
                },
            }
        )
        client.create_experiment({"id": "dash-draft", "variants": ["a", "b"]})
        made = 0
        for burst in range(3):
            for i in range(200):
                source = rng.choice(SOURCES)
                answer = client.allocate(
                    "dash-checkout", f"u{burst}-{i}", context={"utm_source": source}
                )
                if rng.random() < TRUE_RATES[answer.variant_id]:
                    client.record_conversion(answer.assignment_id)
            made += 200
            # Wait until a history sample has seen this burst, so each burst is one interval.
            deadline = time.monotonic() + WAIT_S
            while _sampled(base, "dash-checkout") < made:
                assert time.monotonic() < deadline, "history never sampled the allocations"
                time.sleep(0.1)
        segments = client.list_segments("dash-checkout")
    yield base, segments


def _sampled(base: str, key: str) -> int:
    """Allocations the dashboard's newest history sample has counted."""
    sampled: int = _json(f"{base}/api/experiments/{key}")["history"]["sampled_allocations"]
    return sampled


def test_json_api_matches_the_admin_api(dashboard) -> None:  # type: ignore[no-untyped-def]
    base, segments = dashboard
    overview = {e["id"]: e for e in _json(f"{base}/api/experiments")["experiments"]}
    assert overview["dash-draft"]["status"] == "draft"
    assert overview["dash-draft"]["allocations"] == 0
    checkout = overview["dash-checkout"]
    assert (checkout["status"], checkout["segment_by"]) == ("running", ["source"])

    detail = _json(f"{base}/api/experiments/dash-checkout")
    by_key = {s.segment_key: s for s in segments}
    assert {s["segment_key"] for s in detail["segments"]} == set(by_key)
    for shown in detail["segments"]:
        rpc = by_key[shown["segment_key"]]
        assert [(v["id"], v["allocations"], v["conversions"]) for v in shown["variants"]] == [
            (v.variant_id, v.allocations, v.conversions) for v in rpc.variants
        ]
    overall = by_key[""]
    assert sum(v.allocations for v in overall.variants) == 600 == checkout["allocations"]
    shares = [v["share"] for v in detail["variants"]]
    assert sum(shares) == pytest.approx(1.0)
    for v, rpc_v in zip(detail["variants"], overall.variants, strict=True):
        assert v["conversion_rate"] == pytest.approx(rpc_v.conversions / rpc_v.allocations)
    # One point per burst interval at least; each point's shares are a distribution.
    points = detail["history"]["points"]
    assert detail["history"]["variants"] == list(TRUE_RATES)
    assert len(points) >= 2
    for p in points:
        assert sum(p["shares"]) == pytest.approx(1.0)
    assert [c["level"] for c in detail["cascade"]] == sorted(c["level"] for c in detail["cascade"])
    assert sum(c["allocations"] for c in detail["cascade"]) == 600


def test_pages_metrics_and_errors(dashboard) -> None:  # type: ignore[no-untyped-def]
    base, _ = dashboard
    status, kind, body = _get(f"{base}/")
    assert (status, kind) == (200, "text/html; charset=utf-8")
    assert 'href="/experiments/dash-checkout"' in body and "dash-draft" in body
    status, _, page = _get(f"{base}/experiments/dash-checkout")
    assert status == 200
    assert page.count("<polyline") == len(TRUE_RATES)
    assert "source:google" in page and "<script" not in page
    status, _, tree = _get(f"{base}/experiments/dash-checkout/tree")
    assert status == 200 and "Segment tree of dash-checkout" in tree
    status, _, _ = _get(f"{base}/experiments/dash-draft/tree")
    assert status == 404
    # /metrics serves a snapshot refreshed every second on the event loop: wait for one taken
    # after the fixture's allocations.
    wanted = 'allocsvc_allocations_total{experiment="dash-checkout"'
    deadline = time.monotonic() + WAIT_S
    status, _, metrics = _get(f"{base}/metrics")
    while status == 200 and wanted not in metrics and time.monotonic() < deadline:
        time.sleep(0.2)
        status, _, metrics = _get(f"{base}/metrics")
    assert status == 200 and wanted in metrics
    status, kind, missing = _get(f"{base}/api/experiments/no-such")
    assert (status, kind) == (404, "application/json")
    assert "no-such" in json.loads(missing)["error"]
    post = urllib.request.Request(f"{base}/api/experiments", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(post, timeout=30)
    refused.value.close()
    assert refused.value.code == 405


def _screenshot(url: str, out: Path, profile: Path) -> Image.Image:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is not installed (Debian package `chromium`; .ci/run installs it)")
    done = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--window-size=1200,1400",
            f"--screenshot={out}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and out.exists(), done.stderr
    return Image.open(out).convert("RGB")


def _near(pixels: np.ndarray, color: str, tolerance: int = 40) -> np.ndarray:
    """Where pixels are within `tolerance` of `color` in every channel."""
    target = np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)])
    near: np.ndarray = (np.abs(pixels.astype(int) - target) <= tolerance).all(axis=-1)
    return near


def _non_white(pixels: np.ndarray) -> int:
    return int((pixels.min(axis=-1) < 235).sum())


def test_headless_chromium_renders_the_page(dashboard, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, _ = dashboard
    shot = _screenshot(f"{base}/experiments/dash-checkout", tmp_path / "page.png", tmp_path / "p")
    assert shot.size == (1200, 1400)
    pixels = np.asarray(shot)
    # Text, tables and the chart cover a real part of the page; a blank or error page does not.
    assert _non_white(pixels) > 0.02 * pixels.shape[0] * pixels.shape[1]
    # The chart is drawn: the variants' exact colours appear elsewhere only in 10x10 swatches
    # (two per variant, 60 columns at most; links and badges are other shades), so colour in
    # many columns is the lines across the chart (about 600 columns wide). All three are
    # counted: lines near 0% overlap, and the one drawn last hides the others.
    series = [_near(pixels, c, tolerance=12) for c in ("#1f77b4", "#ff7f0e", "#2ca02c")]
    assert np.unique(np.nonzero(series[0] | series[1] | series[2])[1]).size > 300
    overview = np.asarray(_screenshot(f"{base}/", tmp_path / "overview.png", tmp_path / "p"))
    assert _non_white(overview) > 0.005 * overview.shape[0] * overview.shape[1]

"""The HTML drift report: complete, self-contained, escaped, bounded, and it renders in a browser."""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import shutil
import struct
import subprocess
import zlib
from datetime import datetime, timedelta, timezone
from html import escape
from html.parser import HTMLParser

import numpy as np
import pytest

from cloud import synthetic
from cloud.demo import run_demo
from cloud.drift import SCORE_ROW, DeviceDrift, FeatureDrift, ModelDrift, fleet_drift
from cloud.drift_report import MAX_DEVICES, write_html
from edge_runtime.store import LocalStore

HOSTILE = "<script>alert(1)</script>"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROW_RE = re.compile(r'<tr class="v-([\w-]+)"><td class="l id">([^<]*)</td>')


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory):
    """A real fleet of three devices, dev-02 drifted in temperature, reviewed whole cycles at a time
    over the day it drifted (the demo goes on to retrain it, and a third day clears it)."""
    work = tmp_path_factory.mktemp("report")
    run_demo(work / "demo", devices=3, rows=2880, seed=1, echo=lambda *_: None)
    drifted_day_end = datetime.fromtimestamp(synthetic.START_TS + 2 * synthetic.CYCLE_S, timezone.utc)
    reports, warnings = fleet_drift(LocalStore(work / "demo" / "store"), cycle_s=synthetic.CYCLE_S,
                                    until=drifted_day_end)
    assert [d.device_id for d in reports[0].devices if d.verdict == "drift"] == ["dev-02"]
    # the devices counted every window on the registered baseline's review grids; windows this short (60
    # rows) leave the counts out, since their sketches hold every value: either way, read exactly
    assert reports[0].windows_on_grid + reports[0].windows_sketched == sum(d.windows for d in reports[0].devices)
    compared = [f for d in reports[0].devices for f in d.features if f.ks is not None]
    assert compared and all(f.ks_adjusted == f.ks for f in compared)  # no sketch error taken off
    return work, reports, warnings


@pytest.fixture(scope="module")
def page(reviewed):
    work, reports, warnings = reviewed
    path = write_html(reports, work / "out" / "drift.html", [*warnings, "a warning with <b>markup</b>"])
    return path, path.read_text(encoding="utf-8")


class Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_page_is_self_contained(page):
    _, html = page
    parser = Tags()
    parser.feed(html)
    assert not [(t, a) for t, a in parser.tags if t in ("link", "img", "iframe", "object", "embed")]
    assert not [a for t, a in parser.tags if t == "script" and "src" in a]
    refs = [v for _, a in parser.tags for k, v in a.items() if k in ("src", "href", "xlink:href", "action") and v]
    assert not refs
    assert not re.search(r"https?://|<link|<script\s+src|@import|url\(", html, re.I)


def test_page_has_every_device_feature_and_chart(reviewed, page):
    _, reports, _ = reviewed
    _, html = page
    report = reports[0]
    assert f"model {report.model_name} version {report.model_version}" in html
    rows = dict((device, verdict) for verdict, device in ROW_RE.findall(html))
    assert rows == {d.device_id: d.verdict for d in report.devices}
    assert rows["dev-02"] == "drift" and rows["dev-01"] != "drift" and rows["dev-03"] != "drift"
    assert "drifted devices</th><td class=\"l\">dev-02</td>" in html
    assert "a warning with &lt;b&gt;markup&lt;/b&gt;" in html

    features = [f.feature for f in report.fleet.features]
    assert set(features) == set(report.distributions) and SCORE_ROW in features
    table = html[html.index('<table class="features">'):]
    table = table[:table.index("</table>")]
    for f in report.fleet.features:
        name = re.escape(escape(f.feature))
        row = re.search(rf'<tr class="v-{f.verdict}"><td class="l">{name}</td>(.*?)</tr>', table)
        assert row, f.feature
        assert f"{f.ks:.3f}" in row[1] and f"{f.psi:.3f}" in row[1] and f"{f.ks_adjusted:.3f}" in row[1]
    assert re.search(r'<tr class="v-drift"><td class="l">temperature</td>', table)
    # a CDF per feature (baseline and fleet), an hourly mean per input feature, records and rates per hour
    for name in features:
        assert f"<title>{escape(name)}</title>" in html
    for name in set(features) - {SCORE_ROW}:
        assert f"<title>{escape(name)}: hourly mean</title>" in html
    cdf = html[html.index('<div class="grid cdf">'):]
    cdf = cdf[:cdf.index("</div>")]
    assert cdf.count("<svg") == len(features) and cdf.count("<polyline") == 2 * len(features)
    assert "<title>records scored per hour</title>" in html and "<title>outlier rate</title>" in html
    bars = html[html.index("<title>outlier and rejected rates per device</title>"):]
    bars = bars[:bars.index("</svg>")]
    assert all(f"<title>{d}: outliers" in bars for d in rows)
    assert html.count("<svg") == 1 + len(features) + 2 + len(features) - 1


def test_strings_from_devices_are_escaped(reviewed, tmp_path):
    _, reports, _ = reviewed
    report = copy.deepcopy(reports[0])
    report.model_name = 'm"><b>x'
    report.devices[0].device_id = HOSTILE
    report.devices[0].reasons = [f"{HOSTILE}: drift"]
    name = "<img src=x onerror=alert(2)>"
    old, report.fleet.features[0].feature = report.fleet.features[0].feature, name
    report.distributions[name] = report.distributions.pop(old)
    report.timeline[0]["means"][name] = 1.0
    html = write_html([report], tmp_path / "x.html", [HOSTILE]).read_text()
    assert HOSTILE not in html and "<script" not in html and name not in html and "<b>x" not in html
    assert escape(HOSTILE) in html and escape(name) in html and escape('m"><b>x') in html
    assert (escape(HOSTILE), "drift") in [(d, v) for v, d in ROW_RE.findall(html)]
    assert f"<title>{escape(HOSTILE)}: outliers" in html


def test_empty_and_missing_values(tmp_path):
    html = write_html([], tmp_path / "none.html", ["no baseline for m 1: skipped"]).read_text()
    assert "No model version" in html and "no baseline for m 1: skipped" in html and "<svg" not in html

    bare = DeviceDrift("bare", windows=1, records=0, rejected=0, outliers=0, outlier_rate=0.0)
    odd = DeviceDrift("odd", 2, 100, 3, 1, 0.01, verdict="short", reasons=["less than one whole cycle"],
                      features=[FeatureDrift("t", 100, float("nan"), None, ks=float("inf"), verdict="short")])
    fleet = DeviceDrift("(fleet)", 3, 100, 3, 1, 0.01, verdict="short", features=odd.features)
    report = ModelDrift("m", "1", None, None, [odd, bare], fleet=fleet,
                        distributions={"t": {"x": [0.0, 1.0], "baseline_cdf": [0.2, 1.0], "current_cdf": None},
                                       "u": {"x": [], "baseline_cdf": [], "current_cdf": None}})
    html = write_html([report, ModelDrift("m", "2", None, None, [])], tmp_path / "empty.html").read_text()
    assert "t (no current data)" in html and "no data" in html and "No hourly data in range." in html
    assert "No device had data in range." in html and "no windows in range" in html
    assert {d: v for v, d in ROW_RE.findall(html)} == {"odd": "short", "bare": "too-few"}
    assert not re.search(r">\s*-?(nan|inf)\s*<", html, re.I)


def test_large_fleet_and_long_timeline_are_bounded(reviewed, tmp_path):
    _, reports, _ = reviewed
    report = copy.deepcopy(reports[0])
    report.devices = [dataclasses.replace(d, device_id=f"{d.device_id}-{i:03d}")
                      for i in range(60) for d in report.devices]
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    report.timeline = [{**report.timeline[i % len(report.timeline)], "hour": start + timedelta(hours=i)}
                       for i in range(24 * 90)]
    html = write_html([report], tmp_path / "big.html").read_text()
    assert len(ROW_RE.findall(html)) == MAX_DEVICES
    assert f"and {180 - MAX_DEVICES} more devices" in html
    assert html.count(": outliers ") == MAX_DEVICES
    assert "One hour in 3 is drawn." in html
    assert max(len(p.split()) for p in re.findall(r'<polyline points="([^"]*)"', html)) <= 720
    assert len(html) < 1_500_000


def decode_png(data: bytes) -> np.ndarray:
    """RGB pixels of an 8-bit, non-interlaced RGB or RGBA PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, head = 8, [], None
    while pos < len(data):
        (n,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        if kind == b"IHDR":
            head = struct.unpack(">IIBBBBB", data[pos + 8:pos + 8 + n])
        elif kind == b"IDAT":
            idat.append(data[pos + 8:pos + 8 + n])
        pos += 12 + n
    width, height, depth, colour, _, _, interlace = head
    assert depth == 8 and colour in (2, 6) and interlace == 0, head
    bpp = 3 if colour == 2 else 4
    stride = width * bpp
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), np.uint8)
    prev = np.zeros(stride, np.uint8)
    for y in range(height):
        kind, line = raw[y, 0], raw[y, 1:]
        if kind == 0:
            row = line.copy()
        elif kind == 1:  # sub: a running sum along the row, per channel
            row = (np.cumsum(line.reshape(width, bpp), axis=0, dtype=np.uint64) % 256).astype(np.uint8).ravel()
        elif kind == 2:  # up
            row = line + prev
        else:  # average, paeth: byte by byte
            row, up = bytearray(line.tobytes()), prev.tobytes()
            for i in range(stride):
                a, b = (row[i - bpp] if i >= bpp else 0), up[i]
                if kind == 3:
                    row[i] = (row[i] + ((a + b) >> 1)) & 255
                    continue
                c = up[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            row = np.frombuffer(bytes(row), np.uint8)
        out[y] = prev = row
    return out.reshape(height, width, bpp)[:, :, :3]


def chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(tmp_path)}
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not on PATH (Debian: apt-get install chromium)")
def test_renders_in_chromium(page, tmp_path):
    path, html = page
    shot = tmp_path / "shot.png"
    proc = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", path.as_uri())
    assert shot.exists(), proc.stderr[-2000:]
    pixels = decode_png(shot.read_bytes())
    assert pixels.shape == (2000, 1280, 3)
    flat = pixels.reshape(-1, 3).astype(int)
    assert len(np.unique(flat @ [1 << 16, 1 << 8, 1])) > 200  # text, badges, charts: anti-aliased colours
    assert (flat.min(axis=1) < 235).mean() > 0.03  # not a blank page
    drift_red = (np.abs(flat - [0xC6, 0x28, 0x28]).max(axis=1) <= 8).sum()
    assert drift_red > 500  # the drift badges, row markers and dev-02's bar

    proc = chromium(tmp_path, "--dump-dom", path.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert dom.count("<svg") == html.count("<svg") >= 10
    assert dom.count("<polyline") == html.count("<polyline") and "<rect" in dom
    assert "dev-02" in dom and "Fleet drift review" in dom

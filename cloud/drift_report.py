"""A self-contained HTML page of a fleet drift review: tables, and charts drawn as inline SVG.

Nothing on the page is fetched (no script, font or style sheet from elsewhere), so it can be
mailed, archived or opened offline. Every string from the data is escaped: device ids and
feature names are chosen by devices.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from html import escape
from pathlib import Path

from .drift import SCORE_ROW, SEVERITY, DeviceDrift, FeatureDrift, ModelDrift

MAX_DEVICES = 50  # rows in the device table and bars in the device chart
MAX_FEATURES = 30  # charts per feature
MAX_POINTS = 720  # points on a timeline chart (30 days of hours)
COLOURS = {"drift": "#c62828", "outliers": "#ad1457", "data-quality": "#e65100", "warn": "#f9a825", "ok": "#2e7d32",
           "short": "#78909c", "too-few": "#b0bec5"}
BASELINE, CURRENT = "#1565c0", "#c62828"

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#222;
 margin:24px auto;max-width:1220px;padding:0 12px;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:19px;margin:32px 0 6px;border-bottom:2px solid #ddd}
h3{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;margin:6px 0;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right;vertical-align:top}
th{background:#f3f3f3}td.l,th.l{text-align:left}
tr.v-drift td:first-child{border-left:5px solid #c62828}tr.v-drift{background:#fdecea}
tr.v-data-quality td:first-child{border-left:5px solid #e65100}tr.v-data-quality{background:#fff3e0}
tr.v-warn td:first-child{border-left:5px solid #f9a825}tr.v-warn{background:#fffde7}
tr.v-ok td:first-child{border-left:5px solid #2e7d32}
tr.v-short td:first-child,tr.v-too-few td:first-child{border-left:5px solid #b0bec5}tr.v-short,tr.v-too-few{color:#555}
.badge{display:inline-block;padding:0 7px;border-radius:9px;color:#fff;font-size:12px;font-weight:600}
.grid{display:flex;flex-wrap:wrap;gap:10px}.note{color:#666;font-size:13px}
.warn-box{background:#fff8e1;border:1px solid #f9a825;padding:6px 12px}
.legend span{margin-right:14px}.key{display:inline-block;width:18px;height:3px;vertical-align:middle;margin-right:4px}
svg{background:#fff;border:1px solid #eee}svg text{font:11px system-ui,sans-serif;fill:#333}
"""


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _num(value: float | None, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value, spec)


def _pct(value: float | None) -> str:
    return _num(value, ".2%")


def _when(value: datetime | None) -> str:
    if value is None:
        return "–"
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc)
    return f"{value:%Y-%m-%d %H:%M} UTC"


def _verdict_class(verdict: str) -> str:
    return verdict if verdict in SEVERITY else "unknown"


def _badge(verdict: str) -> str:
    return f'<span class="badge" style="background:{COLOURS.get(verdict, "#607d8b")}">{_e(verdict)}</span>'


def _finite(*values: float | None) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def _tick(value: float, lo: float, hi: float) -> str:
    """An axis label with as many decimals as the axis's span needs."""
    if max(abs(lo), abs(hi)) >= 1e6 or hi - lo <= 0:
        return format(value, ".3g")
    return format(value, f",.{max(0, 1 - math.floor(math.log10(hi - lo)))}f")


def _line_chart(series: Sequence[tuple[str, str, bool, Sequence[tuple[float, float]]]], title: str,
                x_ticks: Sequence[tuple[float, str]] | None = None, y_fmt: str | None = None,
                hline: tuple[float, str] | None = None, note: str = "", width: int = 380, height: int = 200) -> str:
    """An SVG line chart; series are (name, colour, dashed, points); x ticks (x, label) or automatic."""
    left, right, top, bottom = 56, 12, 22, 26
    points = [(x, y) for *_, pts in series for x, y in pts if _finite(x, y)]
    head = f'<svg width="{width}" height="{height}" role="img">'
    head += f'<title>{_e(title)}</title><text x="{left}" y="14" font-weight="600">{_e(title)}</text>'
    if not points:
        return head + f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no data</text></svg>'
    xs, ys = [p[0] for p in points], [p[1] for p in points] + ([hline[0]] if hline and _finite(hline[0]) else [])
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - (abs(y0) * 0.1 or 1), y1 + (abs(y1) * 0.1 or 1)
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    out = [head, f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
                 'fill="none" stroke="#ccc"/>']
    for y in (y0 + pad, (y0 + y1) / 2, y1 - pad):
        label = format(y, y_fmt) if y_fmt else _tick(y, y0 + pad, y1 - pad)
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eee"/>'
                   f'<text x="{left - 4}" y="{sy(y) + 4:.1f}" text-anchor="end">{_e(label)}</text>')
    if note:
        out.append(f'<text x="{width - right}" y="14" text-anchor="end" fill="{CURRENT}">{_e(note)}</text>')
    ticks = x_ticks if x_ticks is not None else [(x, _tick(x, x0, x1)) for x in (x0, (x0 + x1) / 2, x1)]
    for x, label in ticks:
        anchor = "start" if x == ticks[0][0] else "end" if x == ticks[-1][0] else "middle"
        out.append(f'<text x="{sx(x):.1f}" y="{height - 8}" text-anchor="{anchor}">{_e(label)}</text>')
    if hline and _finite(hline[0]):
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(hline[0]):.1f}" y2="{sy(hline[0]):.1f}" '
                   f'stroke="{BASELINE}" stroke-dasharray="5 3"><title>{_e(hline[1])}</title></line>')
    for name, colour, dashed, pts in series:
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts if _finite(x, y))
        if path:
            dash = ' stroke-dasharray="5 3"' if dashed else ""
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.8"{dash}>'
                       f"<title>{_e(name)}</title></polyline>")
    return "".join(out) + "</svg>"


def _device_bars(devices: Sequence[DeviceDrift], expected: float | None) -> str:
    """Horizontal bars: each device's outlier rate (its verdict's colour) and rejected share (grey)."""
    label_w, width, row = 150, 760, 30
    rates = [(d.outlier_rate, d.rejected / (d.records + d.rejected) if d.records + d.rejected else 0.0)
             for d in devices]
    top = max([r for pair in rates for r in pair] + [expected or 0.0, 0.01]) * 1.1
    plot = width - label_w - 70
    height = 24 + row * len(devices)
    out = [f'<svg width="{width}" height="{height}" role="img">'
           "<title>outlier and rejected rates per device</title>"]
    for i, (d, (outlier, rejected)) in enumerate(zip(devices, rates)):
        y = 8 + i * row
        name = d.device_id if len(d.device_id) <= 22 else d.device_id[:21] + "…"
        out.append(f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">{_e(name)}<title>{_e(d.device_id)}'
                   "</title></text>")
        for j, (rate, colour, what) in enumerate(((outlier, COLOURS.get(d.verdict, "#607d8b"), "outliers"),
                                                  (rejected, "#9e9e9e", "rejected"))):
            w = max(rate / top * plot, 0.5 if rate else 0.0)
            out.append(f'<rect x="{label_w}" y="{y + j * 11}" width="{w:.1f}" height="10" fill="{colour}">'
                       f"<title>{_e(d.device_id)}: {what} {_pct(rate)}</title></rect>"
                       f'<text x="{label_w + w + 4:.1f}" y="{y + j * 11 + 9}">{_pct(rate)}</text>')
    if expected is not None:
        x = label_w + expected / top * plot
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="4" y2="{height - 14}" stroke="{BASELINE}" '
                   f'stroke-dasharray="4 3"/><text x="{x:.1f}" y="{height - 3}" text-anchor="middle">'
                   f"expected {_pct(expected)}</text>")
    return "".join(out) + "</svg>"


def _time_ticks(hours: Sequence[datetime], n: int) -> list[tuple[float, str]]:
    if not hours:
        return []
    picks = sorted({round(i * (len(hours) - 1) / (n - 1)) for i in range(n)})
    return [(hours[i].timestamp(), f"{hours[i].astimezone(timezone.utc):%m-%d %H:%M}") for i in picks]


def _overview(r: ModelDrift) -> str:
    """Time range, devices by verdict, the fleet's counts and verdict (cells are HTML)."""
    counts = Counter(d.verdict for d in r.devices)
    badges = " ".join(f"{_badge(v)} {n}" for v, n in sorted(counts.items(), key=lambda x: -SEVERITY.get(x[0], 0)))
    cycle = f"whole cycles of {r.cycle_s / 3600:g} h" if r.cycle_s else "no cycle"
    rows = [("time range", _e(f"{_when(r.since)} .. {_when(r.until)} ({cycle})")),
            ("devices", f"{len(r.devices)}: {badges or 'none'}"),
            ("drifted devices", _e(", ".join(r.drifted_devices) or "none"))]
    f = r.fleet
    if f is None:
        rows.append(("fleet", "no windows in range"))
    else:
        seen = f.records + f.rejected
        expected = "unknown" if r.expected_outlier_rate is None else _pct(r.expected_outlier_rate)
        rows += [("fleet verdict", _badge(f.verdict) + (" " + _e("; ".join(f.reasons)) if f.reasons else "")),
                 ("data seen", _e(f"{_when(f.first)} .. {_when(f.last)}, {f.windows} windows")),
                 ("records scored", f"{f.records:,}"),
                 ("rejected", f"{f.rejected:,} ({_pct(f.rejected / seen if seen else None)})"),
                 ("outliers", f"{f.outliers:,} ({_pct(f.outlier_rate)}; expected {expected})")]
    return "<table>" + "".join(f'<tr><th class="l">{k}</th><td class="l">{v}</td></tr>' for k, v in rows) + "</table>"


def _device_table(devices: Sequence[DeviceDrift], total: int) -> str:
    head = ["device", "verdict", "records", "outliers", "outlier rate", "rejected", "windows", "last window",
            "reasons"]
    rows = []
    for d in devices:
        reasons = d.reasons[:6] + ([f"... {len(d.reasons) - 6} more"] if len(d.reasons) > 6 else [])
        rows.append(f'<tr class="v-{_verdict_class(d.verdict)}"><td class="l id">{_e(d.device_id)}</td>'
                    f'<td class="l">{_badge(d.verdict)}</td><td>{d.records:,}</td><td>{d.outliers:,}</td>'
                    f"<td>{_pct(d.outlier_rate)}</td><td>{d.rejected:,}</td><td>{d.windows}</td>"
                    f'<td>{_e(_when(d.last))}</td><td class="l">{"<br>".join(_e(x) for x in reasons)}</td></tr>')
    more = total - len(devices)
    more_note = f'<p class="note">... and {more} more devices (see the JSON).</p>' if more > 0 else ""
    return ('<table class="devices"><tr>' + "".join(f'<th class="l">{_e(h)}</th>' for h in head) + "</tr>"
            + "".join(rows) + "</table>" + more_note)


def _feature_table(features: Sequence[FeatureDrift]) -> str:
    head = ["feature", "count", "mean", "baseline mean", "KS", "adjusted KS", "PSI", "JS", "Wasserstein",
            "robust L-inf", "q-value", "missing", "non-finite", "out of range", "verdict"]
    rows = [f'<tr class="v-{_verdict_class(f.verdict)}"><td class="l">{_e(f.feature)}</td><td>{f.count:,}</td>'
            + "".join(f"<td>{_e(v)}</td>" for v in (
                _num(f.mean, ".4g"), _num(f.baseline_mean, ".4g"), _num(f.ks, ".3f"), _num(f.ks_adjusted, ".3f"),
                _num(f.psi, ".3f"), _num(f.js, ".3f"), _num(f.wasserstein, ".3f"), _num(f.robust_linf, ".3f"),
                _num(f.qvalue, ".2g"), _pct(f.missing_rate), _pct(f.nonfinite_rate), _pct(f.out_of_range_rate)))
            + f'<td class="l">{_badge(f.verdict)}</td></tr>' for f in features]
    head_row = "".join(f"<th>{_e(h)}</th>" for h in head)
    return f'<table class="features"><tr>{head_row}</tr>' + "".join(rows) + "</table>"


def _legend(*items: tuple[str, str, bool]) -> str:
    keys = "".join(f'<span><i class="key" style="background:{c};{"opacity:.6" if dashed else ""}"></i>{_e(n)}'
                   f"{' (dashed)' if dashed else ''}</span>" for n, c, dashed in items)
    return f'<p class="legend note">{keys}</p>'


def _capped(names: list[str]) -> tuple[list[str], str]:
    more = len(names) - MAX_FEATURES
    note = f'<p class="note">... and {more} more features (see the table).</p>' if more > 0 else ""
    return names[:MAX_FEATURES], note


def _model_section(r: ModelDrift) -> str:
    parts = [f"<h2>model {_e(r.model_name)} version {_e(r.model_version)}</h2>", "<h3>Fleet overview</h3>",
             _overview(r), "<h3>Devices, worst first</h3>"]
    shown = r.devices[:MAX_DEVICES]
    parts.append(_device_table(shown, len(r.devices)) if shown else '<p class="note">No device had data in range.</p>')
    if r.cohorts:
        parts += ["<h3>Cohorts</h3>", _device_table(r.cohorts[:MAX_DEVICES], len(r.cohorts))]
    if shown:
        parts += ["<h3>Outlier and rejection rates per device</h3>",
                  _legend(("outlier rate (verdict colour)", COLOURS["drift"], False), ("rejected share", "#9e9e9e",
                                                                                       False)),
                  _device_bars(shown, r.expected_outlier_rate)]
    parts += ["<h3>Baseline and current fleet distributions (CDF)</h3>",
              _legend(("baseline", BASELINE, True), ("fleet, whole cycles in range", CURRENT, False))]
    names, more = _capped(list(r.distributions))
    charts = []
    for name in names:
        dist = r.distributions[name]
        xs, base, cur = dist.get("x") or [], dist.get("baseline_cdf") or [], dist.get("current_cdf")
        series = [("baseline", BASELINE, True, list(zip(xs, base)))]
        if cur:
            series.append(("fleet", CURRENT, False, list(zip(xs, cur))))
        # the baseline's grid bounds the x axis: fleet values beyond it show as a CDF short of 0 or 1
        outside = (cur[0] if cur else 0.0) + (1.0 - cur[-1] if cur else 0.0)
        note = f"{outside:.0%} of fleet outside" if outside >= 0.005 else ""
        title = name + ("" if cur else " (no current data)")
        charts.append(_line_chart(series, title, y_fmt=".2f", note=note, width=290, height=190))
    parts.append(f'<div class="grid cdf">{"".join(charts)}</div>{more}' if charts
                 else '<p class="note">No distributions.</p>')
    parts.append("<h3>Over time (fleet, per hour)</h3>")
    timeline = r.timeline
    step = max(1, math.ceil(len(timeline) / MAX_POINTS))
    timeline = timeline[::step]
    if not timeline:
        parts.append('<p class="note">No hourly data in range.</p>')
    else:
        if step > 1:
            parts.append(f'<p class="note">One hour in {step} is drawn.</p>')
        hours = [t["hour"] for t in timeline]
        ticks, narrow = _time_ticks(hours, 5), _time_ticks(hours, 3)
        xs = [h.timestamp() for h in hours]
        records = [(x, float(t["records"])) for x, t in zip(xs, timeline)]
        rates = [(x, t["outliers"] / t["records"]) for x, t in zip(xs, timeline) if t["records"]]
        rejected = [(x, t["rejected"] / (t["records"] + t["rejected"])) for x, t in zip(xs, timeline)
                    if t["records"] + t["rejected"]]
        exp = r.expected_outlier_rate
        charts = [_line_chart([("records", "#455a64", False, records)], "records scored per hour", ticks,
                              width=600),
                  _line_chart([("outlier rate", CURRENT, False, rates), ("rejected share", "#9e9e9e", False, rejected)],
                              "outlier rate and rejected share per hour", ticks, ".1%",
                              (exp, "expected outlier rate") if exp is not None else None, width=600)]
        parts.append(_legend(("outlier rate", CURRENT, False), ("rejected share", "#9e9e9e", False),
                             ("expected outlier rate / baseline mean", BASELINE, True)))
        parts.append(f'<div class="grid">{"".join(charts)}</div>')
        base_means = {f.feature: f.baseline_mean for f in (r.fleet.features if r.fleet else [])}
        names, more = _capped(sorted({n for t in timeline for n in t.get("means", {})}))
        charts = [_line_chart([(name, CURRENT, False, [(x, t["means"][name]) for x, t in zip(xs, timeline)
                                                        if name in t.get("means", {})])],
                              f"{name}: hourly mean", narrow,
                              hline=(base_means[name], "baseline mean") if base_means.get(name) is not None else None,
                              width=380, height=180) for name in names]
        parts.append(f'<div class="grid">{"".join(charts)}</div>{more}')
    parts.append("<h3>Features, whole fleet</h3>")
    parts.append(_feature_table(r.fleet.features) if r.fleet and r.fleet.features
                 else '<p class="note">No features judged.</p>')
    if r.fleet and any(f.feature == SCORE_ROW for f in r.fleet.features):
        parts.append(f'<p class="note">{_e(SCORE_ROW)} is the model\'s score, compared like a feature.</p>')
    return "\n".join(parts)


def render_html(reports: Sequence[ModelDrift], warnings: Iterable[str] = ()) -> str:
    """The page as a string."""
    warnings = list(warnings)
    body = ["<h1>Fleet drift review</h1>",
            '<p class="note">Verdicts: drift (a distribution moved), outliers (far more flagged than the '
            "threshold was calibrated for), data-quality (rejected, missing, non-finite or out-of-range values), "
            "warn, ok, short (less than one whole cycle), too-few (too few values).</p>"]
    if warnings:
        body.append("<h2>Warnings</h2><div class=\"warn-box\"><ul>"
                    + "".join(f"<li>{_e(w)}</li>" for w in warnings[:200]) + "</ul>"
                    + (f"<p>... and {len(warnings) - 200} more.</p>" if len(warnings) > 200 else "") + "</div>")
    body += [_model_section(r) for r in reports] or ['<p class="note">No model version had a baseline and data '
                                                     "to review.</p>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>Fleet drift review</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_html(reports: Sequence[ModelDrift], path: str | Path, warnings: Iterable[str] = ()) -> Path:
    """Write the page to ``path`` (its folder is made) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(reports, warnings), encoding="utf-8")
    return path

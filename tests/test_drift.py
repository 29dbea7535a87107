from datetime import datetime, timezone

import numpy as np
import pytest

from cloud.drift import Thresholds, assess_device, judge, ks_distance, psi
from cloud.train import quantile_edges
from edge_runtime.contracts import WindowSummary
from edge_runtime.summary import summarise

RNG = np.random.default_rng(0)
BASE = RNG.normal(0, 1, 20000)
EDGES = quantile_edges(BASE)


def s(x):
    return summarise(x, EDGES)


def test_same_distribution_is_stable():
    fresh = np.random.default_rng(1).normal(0, 1, 5000)
    assert psi(s(BASE), s(fresh)) < 0.02
    assert ks_distance(s(BASE), s(fresh)) < 0.05
    assert judge("f", s(BASE), s(fresh), Thresholds()).verdict == "ok"


def test_shift_of_one_sd_is_drift_with_the_textbook_ks_distance():
    shifted = np.random.default_rng(2).normal(1, 1, 5000)
    assert ks_distance(s(BASE), s(shifted)) == pytest.approx(0.383, abs=0.04)  # 2*Phi(0.5) - 1
    assert psi(s(BASE), s(shifted)) > 0.25
    assert judge("f", s(BASE), s(shifted), Thresholds()).verdict == "drift"


def test_too_few_rows_are_not_judged():
    assert judge("f", s(BASE), s(np.full(10, 9.0)), Thresholds()).verdict == "too-few"


def window(device, x, start_h):
    t = datetime(2026, 11, 1, start_h, tzinfo=timezone.utc)
    return WindowSummary(model_name="m", model_version="1.0.0", device_id=device, window_start=t, window_end=t,
                         records=len(x), features={"f": s(x)}, score=s(x))


def test_device_verdict_merges_its_windows():
    base = window("training", BASE, 0)
    rng = np.random.default_rng(3)
    clean = [window("d1", rng.normal(0, 1, 500), h) for h in range(4)]
    half = [window("d2", rng.normal(0, 1, 500), h) for h in range(2)] + \
           [window("d2", rng.normal(2, 1, 500), h) for h in range(2, 4)]
    assert assess_device(base, clean, Thresholds()).verdict == "ok"
    d2 = assess_device(base, half, Thresholds())
    assert d2.verdict == "drift" and d2.drifted_features == ["f"] and d2.records == 2000


def test_a_device_with_foreign_bin_edges_is_skipped_with_a_warning(tmp_path):
    from cloud.drift import fleet_drift
    from edge_runtime.contracts import baseline_key, summary_key
    from edge_runtime.store import LocalStore

    store = LocalStore(tmp_path)
    base = window("training", BASE, 0)
    store.put(baseline_key("m", "1.0.0"), base.model_dump_json().encode())
    good = window("d1", np.random.default_rng(4).normal(0, 1, 500), 1)
    odd = window("d2", np.random.default_rng(5).normal(0, 1, 500), 1)
    odd.features["f"] = summarise(np.zeros(500), [0.0, 1.0])
    for w in (good, odd):
        store.put(summary_key("m", "1.0.0", w.device_id, w.window_start), w.model_dump_json().encode())
    (report,), warnings = fleet_drift(store)
    assert [d.device_id for d in report.devices] == ["d1"]
    assert len(warnings) == 1 and "d2" in warnings[0] and "edges" in warnings[0]


def test_a_summary_under_another_devices_key_is_not_counted(tmp_path):
    """The store's IAM policy scopes a device's writes to keys with its own name; the review trusts
    the key, so a device cannot speak for another by naming it inside the summary."""
    from cloud.drift import fleet_drift
    from edge_runtime.contracts import baseline_key, summary_key
    from edge_runtime.store import LocalStore

    store = LocalStore(tmp_path)
    store.put(baseline_key("m", "1.0.0"), window("training", BASE, 0).model_dump_json().encode())
    honest = window("d1", np.random.default_rng(4).normal(0, 1, 500), 1)
    forged = window("d1", np.random.default_rng(5).normal(3, 1, 500), 2)  # claims d1, written by d2
    store.put(summary_key("m", "1.0.0", "d1", honest.window_start), honest.model_dump_json().encode())
    store.put(summary_key("m", "1.0.0", "d2", forged.window_start), forged.model_dump_json().encode())
    (report,), warnings = fleet_drift(store)
    assert [(d.device_id, d.windows) for d in report.devices] == [("d1", 1)]
    assert len(warnings) == 1 and "device=d2" in warnings[0] and "'d1'" in warnings[0]

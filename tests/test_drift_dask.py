"""The fleet review on Dask distributed: the same verdicts and numbers as in-process."""

from __future__ import annotations

import json
from datetime import timedelta

import numpy as np
import pytest
from test_drift import T0, Fleet

from cloud.drift import Thresholds, fleet_drift, to_json

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


def test_the_review_on_a_local_cluster_matches_the_in_process_one(tmp_path, client, monkeypatch):
    from cloud import drift

    monkeypatch.setattr(drift, "SHARE_SUMMARIES", 50)  # several shares, so both workers get some
    fleet = Fleet(tmp_path, fpr=0.01)
    rng = np.random.default_rng(20)
    for i in range(40):
        shift = 0.6 if i % 10 == 3 else 0.0
        for h in range(6):
            fleet.add(f"d{i:02d}", rng.normal(shift, 1, 400), T0 + timedelta(hours=h), outliers=4)
    here, warnings_here = fleet_drift(fleet.store, last=None, workers=2)
    seen = []
    with distributed.get_task_stream(client) as stream:
        there, warnings_there = fleet_drift(fleet.store, last=None, workers=2, dask=client,
                                            progress=lambda done, total: seen.append((done, total)))
    assert json.dumps(to_json(here, Thresholds())) == json.dumps(to_json(there, Thresholds()))
    assert warnings_here == warnings_there
    assert there[0].drifted_devices == ["d03", "d13", "d23", "d33"]
    assert seen[-1] == (240, 240)
    # the devices were reviewed by tasks on both workers, one task per share
    tasks = [t for t in stream.data if t["key"].startswith("review_devices")]
    assert len(tasks) == 5 and len({t["worker"] for t in tasks}) == 2

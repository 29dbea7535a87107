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
    from cloud.drift import local_cluster

    cluster = local_cluster(2)  # as ``fleet drift --dask local:2`` starts one
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


def test_workers_started_for_the_review_keep_their_memory_between_summaries(client):
    """Dask's default MALLOC_TRIM_THRESHOLD_ (64 KB) halves the review's speed on its workers."""
    import os

    from cloud.drift import DASK_WORKER_ENV

    seen = client.run(lambda: {k: os.environ.get(k) for k in DASK_WORKER_ENV})
    assert len(seen) == 2 and all(env == {k: str(v) for k, v in DASK_WORKER_ENV.items()} for env in seen.values())


@pytest.mark.parametrize("on_grid", [False, True], ids=["sketches", "grid"])
def test_the_review_on_a_local_cluster_matches_the_in_process_one(tmp_path, client, monkeypatch, on_grid):
    from cloud import drift

    monkeypatch.setattr(drift, "SHARE_SUMMARIES", 50)  # several shares, so both workers get some
    fleet = Fleet(tmp_path, fpr=0.01, on_grid=on_grid)
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
    assert (there[0].windows_on_grid, there[0].windows_sketched) == ((240, 0) if on_grid else (0, 240))
    assert warnings_here == warnings_there
    assert there[0].drifted_devices == ["d03", "d13", "d23", "d33"]
    assert seen[-1] == (240, 240)
    # the devices were reviewed by tasks on both workers, one task per share
    tasks = [t for t in stream.data if t["key"].startswith("review_devices")]
    assert len(tasks) == 5 and len({t["worker"] for t in tasks}) == 2

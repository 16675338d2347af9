"""A gang on its own, without a coordinator: formed (placement group, rank actors, gloo process group) and closed
cleanly — every rank destroys its process group before the actors and the placement group go."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import ray
from ray.exceptions import RayActorError

from l2cluster.cluster.daemon import start_local_ray
from l2cluster.cluster.gang import Gang, GangShape

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    start_local_ray(num_cpus=2)
    try:
        yield
    finally:
        ray.shutdown()


def _mnist(n: int = 20) -> dict:
    images, labels = np.zeros((n, 28, 28), np.uint8), np.arange(n, dtype=np.uint8) % 10
    return {"train_images": images, "train_labels": labels, "test_images": images, "test_labels": labels}


def test_closing_an_idle_gang_destroys_every_ranks_process_group(local_ray):
    gang = Gang.create(GangShape(2, 1.0, 0.0), strategy="PACK", plugin_dirs=[])

    async def form_then_close():
        await gang.form(ray.put(_mnist()), 120)
        infos = await asyncio.gather(*[w.info.remote() for w in gang.workers])
        return infos, await gang.close()

    infos, destroyed = asyncio.run(form_then_close())
    assert [i.process_groups_started for i in infos] == [1, 1]
    assert destroyed == 2
    for w in gang.workers:  # and then the ranks are gone
        with pytest.raises(RayActorError):
            ray.get(w.info.remote(), timeout=60)
    # The placement group was removed: its CPUs are free for the next gang.
    for _ in range(100):
        if ray.available_resources().get("CPU", 0) == 2:
            break
        time.sleep(0.1)
    assert ray.available_resources().get("CPU", 0) == 2

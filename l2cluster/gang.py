"""Worker gangs: one Ray actor per DDP rank, reserved by a placement group, kept warm between jobs.

A gang is formed once — placement group, actors, torch.distributed process group (gloo on CPU, NCCL on GPU,
rank 0 picks address and port), MNIST read zero-copy from the Ray object store — and then runs job after job
of the same shape without starting anything new.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
import traceback
import uuid
import warnings
from dataclasses import dataclass, field
from datetime import timedelta

import ray
import torch
import torch.distributed as dist
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from l2cluster.checkpoint import JobCheckpoints
from l2cluster.data import Mnist, split_mnist
from l2cluster.log import configure_logging, get_logger


@dataclass(frozen=True)
class GangShape:
    """What a gang offers: jobs with the same shape run on the same gangs."""

    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: float  # 0 for CPU gangs

    @classmethod
    def of(cls, config, gpus_in_cluster: float) -> GangShape:
        s = config.scaling
        use_gpu = s.use_gpu is True or (s.use_gpu == "auto" and gpus_in_cluster > 0)
        return cls(s.num_workers, s.cpus_per_worker, s.gpus_per_worker if use_gpu else 0.0)

    def bundles(self) -> list[dict[str, float]]:
        bundle = {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.gpus_per_worker else {})}
        return [dict(bundle) for _ in range(self.num_workers)]


@ray.remote(max_concurrency=2)  # a second thread takes cancel() while run() trains
class RankWorker:
    """One DDP rank. Lives as long as its gang; trains one job at a time."""

    def __init__(self, rank: int, world: int, num_threads: int, plugin_dirs: list[str]):
        from l2cluster.registry import load_registry

        torch.set_num_threads(num_threads)  # oversubscribed CPU workers were measured 25x slower
        configure_logging(json=True)
        self.rank, self.world = rank, world
        self.registry = load_registry(plugin_dirs)
        self.mnist: Mnist | None = None
        self.splits: dict[tuple, object] = {}
        self.cancel_flag = threading.Event()
        self.rendezvous: socket.socket | None = None  # rank 0's process-group rendezvous socket
        self.process_groups_started = 0
        self.jobs_run = 0

    def endpoint(self) -> tuple[str, int]:
        """Rank 0: open the process group's rendezvous socket on this node's address; returns address and port.

        The socket is bound here and handed to torch's TCPStore, which would otherwise listen on every
        interface (on an embedded cluster everything stays on 127.0.0.1), and no other process can take the
        port between choosing and binding it."""
        ip = ray.util.get_node_ip_address()
        self.rendezvous = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
        self.rendezvous.bind((ip, 0))
        self.rendezvous.listen(128)
        return ip, self.rendezvous.getsockname()[1]

    def setup(self, address: str, port: int, backend: str, mnist: dict) -> dict:
        listen_fd = {"master_listen_fd": self.rendezvous.fileno()} if self.rank == 0 else {}
        store = dist.TCPStore(address, port, self.world, self.rank == 0, timeout=timedelta(seconds=300),
                              wait_for_workers=False, **listen_fd)
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world)
        self.process_groups_started += 1
        with warnings.catch_warnings():  # object-store arrays are read-only; the trainer copies them to floats
            warnings.simplefilter("ignore", UserWarning)
            self.mnist = Mnist(**{k: torch.from_numpy(v) for k, v in mnist.items()})
        return self.info()

    def info(self) -> dict:
        node = f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:6]}"
        return {"pid": os.getpid(), "node": node, "rank": self.rank,
                "process_groups_started": self.process_groups_started, "jobs_run": self.jobs_run}

    def cancel(self) -> None:
        self.cancel_flag.set()

    def run(self, job_id: str, config: dict, attempt: int, coordinator, checkpoint_dir: str | None = None) -> dict:
        """Train one job; rank 0 reports each epoch to the coordinator. Never raises: a crash is a result.

        With a checkpoint directory every rank saves its state after each epoch but the last, and a later
        attempt resumes from the newest epoch that every rank has, so it ends exactly as an uninterrupted run."""
        from l2cluster.spec import spec_models
        from l2cluster.trainer import Trainer

        self.cancel_flag.clear()
        log = get_logger(job_id=job_id, rank=self.rank, attempt=attempt)
        ckpt = JobCheckpoints(checkpoint_dir, job_id, self.rank) if checkpoint_dir else None
        try:
            cfg = spec_models(self.registry).train.model_validate(config)
            d = cfg.data
            key = (d.val_size, d.split_seed, d.train_size)
            if key not in self.splits:
                self.splits[key] = split_mnist(self.mnist, val_size=d.val_size, seed=d.split_seed,
                                               train_size=d.train_size)
            device = torch.device("cuda") if ray.get_gpu_ids() else torch.device("cpu")
            trainer = Trainer([cfg], self.splits[key], self.registry, device=device)
            resumed = self._resume(trainer, ckpt, device) if ckpt is not None else 0
            if resumed:
                log.info("job_resumed", epoch=resumed)

            def on_epoch(epoch, metrics):
                if ckpt is not None and epoch < cfg.epochs and metrics[0]:
                    ckpt.save(epoch, trainer.state_dict())
                    if self.world > 1:  # every rank's file is on disk before the epoch counts as done
                        dist.barrier()
                if self.rank == 0 and metrics[0]:
                    log.info("epoch_done", epoch=epoch, val_acc=metrics[0]["val_acc"], epoch_s=metrics[0]["epoch_s"])
                    coordinator.report_epoch.remote(job_id, epoch, metrics[0])

            def should_stop() -> bool:
                stop = self.cancel_flag.is_set()
                if self.world > 1:  # every rank must stop at the same step, or the others hang in all-reduce
                    flag = torch.tensor([float(stop)], device=device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    stop = bool(flag.item())
                return stop

            (result,) = trainer.fit(on_epoch=on_epoch, should_stop=should_stop)
            final = dict(result.final)
            final["param_sum"] = float(sum(p.detach().double().sum() for p in trainer.params.values()))
            out = {"outcome": result.outcome, "final": final, "error": result.error, "epochs": result.epochs,
                   "diverged_epoch": result.diverged_epoch, "resumed_from_epoch": resumed}
            if ckpt is not None:  # the run is over: its outcome is final, nothing will resume it
                ckpt.remove()
        except Exception as e:  # a crashing job must not take the gang or the daemon down
            log.error("job_crashed", error=f"{type(e).__name__}: {e}")
            out = {"outcome": "failed", "final": {}, "error": f"{type(e).__name__}: {e}",
                   "diverged_epoch": None, "traceback": traceback.format_exc(limit=5)}
        self.jobs_run += 1
        return out

    def _resume(self, trainer, ckpt: JobCheckpoints, device) -> int:
        """Load the newest checkpoint every rank has (0: none, start from scratch); ranks agree on the epoch."""
        epochs = ckpt.epochs()
        epoch = epochs[-1] if epochs else 0
        if self.world > 1:
            agreed = torch.tensor([epoch], device=device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            epoch = int(agreed.item())
            have = torch.tensor([int(epoch in epochs)], device=device)
            dist.all_reduce(have, op=dist.ReduceOp.MIN)
            epoch = epoch if have.item() else 0
        if epoch:
            trainer.load_state_dict(ckpt.load(epoch))
        return epoch

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


PG_PREFIX = "l2cluster-gang-"


def remove_orphaned_placement_groups() -> int:
    """Remove the placement groups of gangs a previous coordinator left behind; returns how many.

    A gang's actors die with the coordinator that created them, but its placement group belongs to the Ray job
    and would keep its CPUs and GPUs reserved for ever. Only a starting coordinator calls this: every gang
    placement group on the cluster is then an orphan."""
    removed = 0
    for info in ray.util.placement_group_table().values():
        if info.get("name", "").startswith(PG_PREFIX) and info.get("state") != "REMOVED":
            with contextlib.suppress(Exception):  # removed meanwhile
                remove_placement_group(ray.util.get_placement_group(info["name"]))
                removed += 1
    return removed


@dataclass
class Gang:
    """Driver-side handle of one gang: its placement group, its rank actors, and what it is doing."""

    shape: GangShape
    pg: object
    workers: list
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    ready: bool = False
    busy: bool = False
    job_id: str | None = None
    idle_since: float = field(default_factory=time.time)
    infos: list[dict] = field(default_factory=list)

    @classmethod
    def create(cls, shape: GangShape, *, strategy: str, plugin_dirs: list[str]) -> Gang:
        gang_id = uuid.uuid4().hex[:8]
        pg = placement_group(shape.bundles(), strategy=strategy, name=f"{PG_PREFIX}{gang_id}")
        threads = max(1, int(shape.cpus_per_worker))
        workers = [
            RankWorker.options(
                num_cpus=shape.cpus_per_worker, num_gpus=shape.gpus_per_worker,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
            ).remote(rank, shape.num_workers, threads, plugin_dirs)
            for rank in range(shape.num_workers)
        ]
        return cls(shape, pg, workers, id=gang_id)

    async def form(self, mnist_ref, timeout_s: float) -> None:
        """Wait for the placement group, then start the process group and hand every rank the dataset."""
        await asyncio.wait_for(self.pg.ready(), timeout_s)
        address, port = await self.workers[0].endpoint.remote()
        backend = "nccl" if self.shape.gpus_per_worker else "gloo"
        self.infos = await asyncio.wait_for(
            asyncio.gather(*[w.setup.remote(address, port, backend, mnist_ref) for w in self.workers]), timeout_s)
        self.ready = True

    @property
    def node(self) -> str:
        return self.infos[0]["node"] if self.infos else ""

    def release(self) -> None:
        for w in self.workers:
            ray.kill(w)
        remove_placement_group(self.pg)

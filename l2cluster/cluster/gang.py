"""Worker gangs: one Ray actor per DDP rank, reserved by a placement group, kept warm between jobs.

A gang is formed once — placement group, actors, torch.distributed process group (gloo on CPU, NCCL on GPU,
rank 0 picks address and port), MNIST read zero-copy from the Ray object store — and then runs job after job
of the same shape without starting anything new.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import os
import socket
import struct
import threading
import time
import traceback
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import ray
import torch
import torch.distributed as dist
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from l2cluster.cluster.scheduler import GangShape  # the shape is the scheduler's (pure); gangs are made of it
from l2cluster.log import configure_logging, get_logger
from l2cluster.records import RankInfo, RankOutcome
from l2cluster.training.data import Mnist, split_mnist
from l2cluster.training.process import prepare_training_process

# Rank 0 tells the coordinator how far into the epoch its pack is at most this often (one small actor message).
PROGRESS_EVERY_S = 2.0


# type-check: Ray's actor decorators are not typed
@ray.remote(max_concurrency=2)  # type: ignore[call-overload]  # a second thread takes cancel() while run() trains
class RankWorker:
    """One DDP rank. Lives as long as its gang; trains one pack (one or more jobs) at a time."""

    def __init__(self, rank: int, world: int, num_threads: int, plugin_dirs: list[str]):
        from l2cluster.registry import load_registry

        prepare_training_process(num_threads)
        configure_logging(json=True)
        self.rank, self.world = rank, world
        self.registry = load_registry(plugin_dirs)
        self.mnist: Mnist | None = None
        self.splits: dict[tuple, object] = {}
        self.cancel_all = threading.Event()
        self.cancelled_jobs: set[str] = set()
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

    def setup(self, address: str, port: int, backend: str, mnist: dict) -> RankInfo:
        # gloo and NCCL listen on the interface the hostname resolves to, unless told otherwise: keep them on
        # the interface that carries this node's Ray address (loopback on an embedded cluster). A user's own
        # GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME wins.
        interface = interface_of(ray.util.get_node_ip_address())
        if interface is None:
            raise RuntimeError(f"no network interface of this host holds the node address "
                               f"{ray.util.get_node_ip_address()}; set GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME) "
                               "in the workers' environment")
        for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            os.environ.setdefault(var, interface)
        # type-check: rank 0 opened the rendezvous socket before it gets here
        listen_fd = {"master_listen_fd": self.rendezvous.fileno()} if self.rank == 0 else {}  # type: ignore[union-attr]
        store = dist.TCPStore(address, port, self.world, self.rank == 0, timeout=timedelta(seconds=300),
                              # type-check: torch's stub does not list master_listen_fd
                              wait_for_workers=False, **listen_fd)  # type: ignore[arg-type]
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world)
        self.process_groups_started += 1
        with warnings.catch_warnings():  # object-store arrays are read-only; the trainer copies them to floats
            warnings.simplefilter("ignore", UserWarning)
            self.mnist = Mnist(**{k: torch.from_numpy(v) for k, v in mnist.items()})
        return self.info()

    def info(self) -> RankInfo:
        node = f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:6]}"
        gpu_bytes = torch.cuda.get_device_properties(0).total_memory if ray.get_gpu_ids() else None
        return RankInfo(pid=os.getpid(), node=node, rank=self.rank, gpu_bytes=gpu_bytes,
                        process_groups_started=self.process_groups_started, jobs_run=self.jobs_run)

    def cancel(self, job_id: str | None = None) -> None:
        """Stop the running pack (job_id None) or one member of it before the next step."""
        if job_id is None:
            self.cancel_all.set()
        else:
            self.cancelled_jobs.add(job_id)

    def run(self, pack_id: str, members: list[tuple[str, dict]], attempt: int, coordinator,
            checkpoint_dir: str | None = None, done: Sequence[str] = ()) -> RankOutcome:
        """Train one pack (one job: a pack of one) through the job runner; rank 0 reports each member's epochs
        and early results to the coordinator, any rank its notes (a checkpoint not written). Never raises: a crash
        is a result (RankOutcome.crashed)."""
        from l2cluster.spec.config import spec_models
        from l2cluster.training.runner import Member, run_pack

        self.cancel_all.clear()
        self.cancelled_jobs = set()
        log = get_logger(pack=pack_id[:8], rank=self.rank, attempt=attempt,
                         **({"job_id": members[0][0]} if len(members) == 1 else {"members": len(members)}))
        try:
            train_model = spec_models(self.registry).train
            pack = [Member(job_id, train_model.model_validate(config)) for job_id, config in members]
            d = pack[0].config.data
            key = (d.val_size, d.split_seed, d.train_size)
            if key not in self.splits:
                # type-check: loaded in __init__ before any run
                self.splits[key] = split_mnist(self.mnist, val_size=d.val_size, seed=d.split_seed,  # type: ignore[arg-type]
                                               train_size=d.train_size)
            device = torch.device("cuda") if ray.get_gpu_ids() else torch.device("cpu")

            def on_epoch(job_id, epoch, metrics):
                log.info("epoch_done", job_id=job_id, epoch=epoch, val_acc=metrics["val_acc"],
                         epoch_s=metrics["epoch_s"])
                coordinator.report_epoch.remote(job_id, epoch, metrics)

            def on_result(job_id, result):
                coordinator.report_result.remote(job_id, attempt, result)

            def cancelled():
                return True if self.cancel_all.is_set() else self.cancelled_jobs

            def on_note(job_ids, text):  # any rank: each writes its own checkpoint file
                coordinator.report_note.remote(job_ids, attempt, text)

            last_progress = [0.0]

            def on_progress(job_ids, epoch, step, num_steps):
                # Live progress inside an epoch: at most one message every PROGRESS_EVERY_S, never waited on.
                now = time.monotonic()
                if now - last_progress[0] >= PROGRESS_EVERY_S:
                    last_progress[0] = now
                    coordinator.report_progress.remote(job_ids, epoch, step, num_steps)

            run = run_pack(pack, self.splits[key], self.registry, device=device, checkpoint_dir=checkpoint_dir,
                           rank=self.rank, world=self.world, done=set(done), on_epoch=on_epoch, on_result=on_result,
                           cancelled=cancelled, on_progress=on_progress, on_note=on_note, log=log)
            out = RankOutcome(run.results, run.resumed_from_epoch, run.split)
        except Exception as e:  # a crashing job must not take the gang or the daemon down
            log.error("job_crashed", error=f"{type(e).__name__}: {e}")
            out = RankOutcome(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=5))
        self.jobs_run += 1
        return out

    def shutdown(self) -> bool:
        """Destroy this rank's process group (before the gang is released); returns whether it had one."""
        if not dist.is_initialized():
            return False
        dist.destroy_process_group()
        return True


def interface_of(ip: str) -> str | None:
    """The name of the network interface that holds the address `ip` on this host (Linux), or None."""
    address = ipaddress.ip_address(ip)
    if address.is_loopback:
        return "lo"
    if address.version == 6:
        with contextlib.suppress(OSError), open("/proc/net/if_inet6") as f:
            for line in f:  # address in 32 hex digits, index, prefix length, scope, flags, name
                fields = line.split()
                if ipaddress.ip_address(int(fields[0], 16)) == address:
                    return fields[5]
        return None
    return next((name for name, found in ipv4_addresses().items() if found == ip), None)


def ipv4_addresses() -> dict[str, str]:
    """{interface name: its IPv4 address} of this host's interfaces that have one (Linux)."""
    out = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:  # SIOCGIFADDR: the interface's IPv4 address, bytes 20-24 of the returned ifreq
                found = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))[20:24]
            except OSError:  # no IPv4 address on it
                continue
            out[name] = socket.inet_ntoa(found)
    return out


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
    infos: list[RankInfo] = field(default_factory=list)

    @classmethod
    def create(cls, shape: GangShape, *, strategy: str, plugin_dirs: list[str]) -> Gang:
        gang_id = uuid.uuid4().hex[:8]
        pg = placement_group(shape.bundles(), strategy=strategy, name=f"{PG_PREFIX}{gang_id}")
        threads = max(1, int(shape.cpus_per_worker))
        workers = [
            # type-check: Ray's actor decorators are not typed
            RankWorker.options(  # type: ignore[attr-defined]
                num_cpus=shape.cpus_per_worker, num_gpus=shape.gpus_per_worker,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
            ).remote(rank, shape.num_workers, threads, plugin_dirs)
            for rank in range(shape.num_workers)
        ]
        return cls(shape, pg, workers, id=gang_id)

    async def form(self, mnist_ref, timeout_s: float) -> None:
        """Wait for the placement group, then start the process group and hand every rank the dataset."""
        # type-check: Ray's actor decorators are not typed
        await asyncio.wait_for(self.pg.ready(), timeout_s)  # type: ignore[attr-defined]
        address, port = await self.workers[0].endpoint.remote()
        backend = "nccl" if self.shape.gpus_per_worker else "gloo"
        self.infos = await asyncio.wait_for(
            asyncio.gather(*[w.setup.remote(address, port, backend, mnist_ref) for w in self.workers]), timeout_s)
        self.ready = True

    @property
    def node(self) -> str:
        return self.infos[0].node if self.infos else ""

    async def close(self, timeout_s: float = 10.0) -> int:
        """Release an idle gang cleanly: every rank destroys its process group first (within `timeout_s`), then
        the actors and the placement group go. Returns how many ranks destroyed theirs."""
        try:
            done = await asyncio.wait_for(asyncio.gather(*[w.shutdown.remote() for w in self.workers],
                                                         return_exceptions=True), timeout_s)
        except asyncio.TimeoutError:
            done = []
        finally:
            self.release()
        return sum(d is True for d in done)

    def release(self) -> None:
        """Kill the ranks and remove the placement group (a gang that lost a rank, or one already closed)."""
        for w in self.workers:
            ray.kill(w)
        remove_placement_group(self.pg)

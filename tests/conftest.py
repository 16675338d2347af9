"""Shared pytest fixtures: where MNIST lives, a tiny learnable MNIST-shaped stand-in, and the reset of process-wide
state (a torch.distributed process group, a Ray connection) that a test must not leave to the next."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

from l2cluster.training.data import MNIST_FILES, write_idx

# `../shared` sits next to the repository root (tests/..).
SHARED_MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"

TINY_TRAIN_SIZE = 600
TINY_TEST_SIZE = 200
TINY_NUM_CLASSES = 10


@pytest.fixture(scope="session")
def shared_mnist_dir() -> Path | None:
    """The real MNIST directory, or None where it does not hold all four gzipped files."""
    if all((SHARED_MNIST_DIR / f"{name}.gz").is_file() for name in MNIST_FILES.values()):
        return SHARED_MNIST_DIR
    return None


def _tiny_split(prototypes: torch.Tensor, size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    # Balanced labels in a shuffled order, so any prefix of the data still has every class.
    labels = (torch.arange(size) % TINY_NUM_CLASSES)[torch.randperm(size, generator=generator)]
    noise = torch.randn(size, 28, 28, generator=generator) * 60.0
    images = (prototypes[labels] + noise).clamp(0, 255).round().to(torch.uint8)
    return images, labels.to(torch.uint8)


@pytest.fixture(scope="session")
def tiny_mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four gzipped IDX files: 600 train / 200 test 28×28 images; each class is a fixed random stroke
    pattern plus pixel noise, so a tiny MLP learns it well above chance within a few steps."""
    directory = tmp_path_factory.mktemp("tiny_mnist")
    generator = torch.Generator().manual_seed(1234)
    # About a quarter of the pixels are "ink" per class, like MNIST's mostly dark background.
    prototypes = (torch.rand(TINY_NUM_CLASSES, 28, 28, generator=generator) < 0.25).float() * 220.0
    train_images, train_labels = _tiny_split(prototypes, TINY_TRAIN_SIZE, generator)
    test_images, test_labels = _tiny_split(prototypes, TINY_TEST_SIZE, generator)
    tensors = {
        "train_images": train_images,
        "train_labels": train_labels,
        "test_images": test_images,
        "test_labels": test_labels,
    }
    for key, name in MNIST_FILES.items():
        write_idx(directory / f"{name}.gz", tensors[key])
    return directory


@pytest.fixture(scope="session")
def mnist_dir(shared_mnist_dir: Path | None, tiny_mnist_dir: Path) -> Path:
    """Real MNIST where available, else the tiny stand-in."""
    return shared_mnist_dir if shared_mnist_dir is not None else tiny_mnist_dir


# -- process-wide state -----------------------------------------------------------------------------------------
# Both look in sys.modules instead of importing: a test that never touched torch.distributed or Ray pays nothing.
@pytest.fixture(autouse=True)
def _no_process_group_left(request):
    """Destroy a torch.distributed process group a test left in this process (the gloo tests make theirs in
    spawned processes; one here would make the next test's init_process_group fail)."""
    yield
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        warnings.warn(f"{request.node.nodeid} left a torch.distributed process group; destroyed it", stacklevel=1)


@pytest.fixture(scope="module", autouse=True)
def _no_ray_left(request):
    """Shut down a Ray connection a test module left up. Per module, not per test: several modules keep one local
    Ray up across their tests (module-scoped `cluster` fixtures); this teardown runs after theirs."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
        warnings.warn(f"{request.node.nodeid} left Ray connected; shut it down", stacklevel=1)

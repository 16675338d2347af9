"""Shared pytest fixtures: where MNIST lives, and a tiny learnable MNIST-shaped stand-in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from l2cluster.data import MNIST_FILES, write_idx

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

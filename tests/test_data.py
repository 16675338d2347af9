"""Tests for l2cluster.training.data: IDX reading/writing, locating MNIST, loading and splitting."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

from l2cluster.training.data import (
    MNIST_FILES,
    DataError,
    Mnist,
    default_cache_dir,
    find_mnist,
    load_mnist,
    read_idx,
    split_mnist,
    write_idx,
)

TRAIN_LABELS_MD5 = "a25bea736e30d166cdddb491f175f624"  # from ../shared/data/mnist/README.md
# Per-class counts of the published MNIST label files.
MNIST_TRAIN_CLASS_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _random_uint8(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _snapshot(directory: Path) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.rglob("*")) if p.is_file()}


def _write_mnist(directory: Path, layout: str = "{name}.gz", keys=tuple(MNIST_FILES), train: int = 20,
                 test: int = 10, fill: int | None = None) -> dict[str, Path]:
    """Write small MNIST-shaped files for `keys`, each at directory / layout.format(name=NAME)."""
    sizes = {"train": train, "test": test}
    written = {}
    for index, key in enumerate(keys):
        count = sizes[key.split("_")[0]]
        if key.endswith("images"):
            tensor = _random_uint8(count, 28, 28, seed=index)
        else:
            tensor = (torch.arange(count) % 10).to(torch.uint8)
        if fill is not None:
            tensor = torch.full_like(tensor, fill)
        path = directory / layout.format(name=MNIST_FILES[key])
        path.parent.mkdir(parents=True, exist_ok=True)
        write_idx(path, tensor)
        written[key] = path
    return written


# ---------------------------------------------------------------------------------------------------------
# IDX reading and writing
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("shape", [(7,), (3, 28, 28), (2, 5, 4), (0,)])
def test_idx_round_trip(tmp_path, suffix, shape):
    tensor = _random_uint8(*shape)
    path = tmp_path / f"data-idx{suffix}"
    write_idx(path, tensor)
    loaded = read_idx(path)
    assert loaded.dtype == torch.uint8
    assert loaded.shape == tensor.shape
    assert torch.equal(loaded, tensor)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_bytes_follow_the_format(tmp_path, suffix):
    tensor = _random_uint8(4, 3, 2)
    path = tmp_path / f"images{suffix}"
    write_idx(path, tensor)
    data = path.read_bytes()
    assert (data[:2] == b"\x1f\x8b") == (suffix == ".gz")
    if suffix:
        data = gzip.decompress(data)
    assert data == struct.pack(">IIII", 0x00000803, 4, 3, 2) + tensor.numpy().tobytes()


def test_write_idx_writes_only_the_view_of_a_non_contiguous_tensor(tmp_path):
    base = _random_uint8(6, 28, 28)
    view = base.transpose(1, 2)[1:4]
    write_idx(tmp_path / "view", view)
    assert torch.equal(read_idx(tmp_path / "view"), view)


def test_read_idx_returns_writable_tensor_without_warning(tmp_path):
    write_idx(tmp_path / "labels.gz", torch.arange(10, dtype=torch.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it wraps a read-only buffer
        loaded = read_idx(tmp_path / "labels.gz")
    loaded.add_(1)
    assert loaded.is_contiguous()
    assert loaded.tolist() == list(range(1, 11))


def test_read_idx_sniffs_gzip_without_gz_suffix(tmp_path):
    tensor = _random_uint8(2, 28, 28)
    write_idx(tmp_path / "images.gz", tensor)
    (tmp_path / "images.gz").rename(tmp_path / "images")
    assert torch.equal(read_idx(tmp_path / "images"), tensor)


@pytest.mark.parametrize(
    "tensor", [torch.zeros(3, dtype=torch.float32), torch.zeros(2, 2, dtype=torch.uint8)]
)
def test_write_idx_rejects_other_dtypes_and_ranks(tmp_path, tensor):
    with pytest.raises(DataError, match="uint8 tensor with 1 dimension") as info:
        write_idx(tmp_path / "bad-idx", tensor)
    assert "bad-idx" in str(info.value)
    assert not (tmp_path / "bad-idx").exists()


def _write_raw_or_gz(path: Path, data: bytes) -> None:
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_truncated_payload_names_file_and_expected_bytes(tmp_path, suffix):
    path = tmp_path / f"train-images-idx3-ubyte{suffix}"
    _write_raw_or_gz(path, struct.pack(">IIII", 0x803, 5, 28, 28) + bytes(1000))
    with pytest.raises(DataError) as info:
        read_idx(path)
    assert str(info.value) == (
        f"{path}: expected 3920 bytes of pixel data after the 16-byte header (5×28×28), found 1000; "
        "the file is truncated or corrupt — delete it and download again"
    )


def test_trailing_bytes_are_rejected(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(struct.pack(">II", 0x801, 4) + bytes(5))
    expected = r"expected 4 bytes of label data after the 8-byte header \(4\), found 5"
    with pytest.raises(DataError, match=expected):
        read_idx(path)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "4-byte magic number, found only 0 bytes"),
        (b"\x00\x00", "4-byte magic number, found only 2 bytes"),
        (
            struct.pack(">III", 0x803, 5, 28),
            "expected a 16-byte IDX header (magic number and 3 dimension sizes), found only 12 bytes",
        ),
    ],
)
def test_incomplete_header_is_rejected(tmp_path, data, expected):
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(data)
    with pytest.raises(DataError, match=expected.replace("(", r"\(").replace(")", r"\)")) as info:
        read_idx(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_wrong_magic_names_file_and_expected_magic(tmp_path, suffix):
    path = tmp_path / f"train-labels-idx1-ubyte{suffix}"
    _write_raw_or_gz(path, struct.pack(">III", 0x802, 2, 2) + bytes(4))
    with pytest.raises(DataError) as info:
        read_idx(path)
    message = str(info.value)
    assert str(path) in message
    assert "0x00000801" in message and "0x00000803" in message and "found 0x00000802" in message


def test_non_ubyte_type_code_is_rejected(tmp_path):
    path = tmp_path / "floats-idx3"
    path.write_bytes(struct.pack(">IIII", 0x00000D03, 1, 1, 1) + bytes(4))
    with pytest.raises(DataError, match="type code 0x0D instead of 0x08") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def _gzipped_images(tmp_path: Path) -> bytes:
    write_idx(tmp_path / "source.gz", _random_uint8(20, 28, 28))
    return (tmp_path / "source.gz").read_bytes()


@pytest.mark.parametrize("damage", ["cut", "flip", "trailing-garbage"])
def test_corrupt_gzip_is_a_data_error(tmp_path, damage):
    data = bytearray(_gzipped_images(tmp_path))
    if damage == "cut":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data += b"not gzip"
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_gz_name_with_garbage_content_is_a_data_error(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(DataError, match="not gzip-compressed") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot open"):
        read_idx(tmp_path / "nowhere.gz")


# ---------------------------------------------------------------------------------------------------------
# Locating MNIST
# ---------------------------------------------------------------------------------------------------------


class FakeTorchvision:
    """Stands in for torchvision in sys.modules: no network here, and the calls must be observable."""

    def __init__(self, monkeypatch, *, fail: Exception | None = None, write: bool = True):
        self.calls: list[dict] = []
        self.fail = fail
        self.write = write
        package = types.ModuleType("torchvision")
        datasets = types.ModuleType("torchvision.datasets")
        datasets.MNIST = self._mnist
        package.datasets = datasets
        monkeypatch.setitem(sys.modules, "torchvision", package)
        monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)

    def _mnist(self, root, download=False, **kwargs):
        self.calls.append({"root": Path(root), "download": download, **kwargs})
        if self.fail is not None:
            raise self.fail
        if self.write:
            # Like torchvision: the .gz archives and their extracted copies under root/MNIST/raw.
            _write_mnist(Path(root), "MNIST/raw/{name}", fill=3)
            _write_mnist(Path(root), "MNIST/raw/{name}.gz", fill=3)


@pytest.fixture
def env(monkeypatch, tmp_path):
    """No L2CLUSTER_DATA, a private XDG cache, and a torchvision that fails the test if it is used."""
    monkeypatch.delenv("L2CLUSTER_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return FakeTorchvision(monkeypatch, fail=AssertionError("torchvision must not be called here"))


def test_default_cache_dir_uses_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "l2cluster" / "mnist"


@pytest.mark.parametrize("xdg", [None, "", "relative/cache"])
def test_default_cache_dir_falls_back_to_home_cache(monkeypatch, tmp_path, xdg):
    monkeypatch.setenv("HOME", str(tmp_path))
    if xdg is None:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    assert default_cache_dir() == tmp_path / ".cache" / "l2cluster" / "mnist"


def test_directory_order_argument_then_env_then_default_cache(env, monkeypatch, tmp_path):
    argument, from_env, cache = tmp_path / "argument", tmp_path / "from_env", default_cache_dir()
    for directory in (argument, from_env, cache):
        _write_mnist(directory)
    monkeypatch.setenv("L2CLUSTER_DATA", str(from_env))
    assert find_mnist(argument)["train_images"].parent == argument
    assert find_mnist(str(argument))["test_labels"].parent == argument
    assert find_mnist()["train_images"].parent == from_env
    monkeypatch.delenv("L2CLUSTER_DATA")
    assert find_mnist()["train_images"].parent == cache
    assert cache == tmp_path / "xdg" / "l2cluster" / "mnist"
    assert env.calls == []


@pytest.mark.parametrize("layout", ["{name}", "{name}.gz", "MNIST/raw/{name}", "MNIST/raw/{name}.gz"])
def test_each_accepted_layout_is_found(env, tmp_path, layout):
    written = _write_mnist(tmp_path, layout)
    found = find_mnist(tmp_path, download=False)
    assert found == written
    assert set(found) == set(MNIST_FILES)


def test_layout_preference_within_a_directory(env, tmp_path):
    layouts = ["MNIST/raw/{name}.gz", "MNIST/raw/{name}", "{name}.gz", "{name}"]
    for count, layout in enumerate(layouts):
        _write_mnist(tmp_path, layout)
        found = find_mnist(tmp_path, download=False)
        assert found["train_images"] == tmp_path / layout.format(name="train-images-idx3-ubyte"), count


def test_files_may_be_spread_over_both_layouts(env, tmp_path):
    _write_mnist(tmp_path, "{name}.gz", keys=["train_images", "train_labels"])
    _write_mnist(tmp_path, "MNIST/raw/{name}", keys=["test_images", "test_labels"])
    found = find_mnist(tmp_path, download=False)
    assert found["train_labels"] == tmp_path / "train-labels-idx1-ubyte.gz"
    assert found["test_labels"] == tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"


def test_missing_files_without_download_name_file_directory_and_fixes(env, tmp_path):
    _write_mnist(tmp_path, keys=["train_images", "train_labels", "test_images"])
    before = _snapshot(tmp_path)
    with pytest.raises(DataError) as info:
        find_mnist(tmp_path, download=False)
    message = str(info.value)
    assert f"{tmp_path}: MNIST file(s) missing: t10k-labels-idx1-ubyte (" in message
    assert "train-images-idx3-ubyte" not in message
    assert "data_dir argument" in message
    assert "Downloading is disabled" in message
    assert "--data-dir" in message and "L2CLUSTER_DATA" in message and "download=True" in message
    assert env.calls == []
    assert _snapshot(tmp_path) == before


def test_missing_files_message_says_where_the_directory_came_from(env, monkeypatch, tmp_path):
    with pytest.raises(DataError, match="default cache directory") as info:
        find_mnist(download=False)
    assert str(default_cache_dir()) in str(info.value)
    monkeypatch.setenv("L2CLUSTER_DATA", str(tmp_path / "env_dir"))
    with pytest.raises(DataError, match="from the L2CLUSTER_DATA environment variable") as info:
        find_mnist(download=False)
    assert str(tmp_path / "env_dir") in str(info.value)
    for name in MNIST_FILES.values():
        assert name in str(info.value)


def test_present_files_are_not_downloaded(env, tmp_path):
    _write_mnist(tmp_path)
    find_mnist(tmp_path, download=True)
    assert env.calls == []


def test_download_fills_only_missing_files_and_never_overwrites(env, monkeypatch, tmp_path):
    fake = FakeTorchvision(monkeypatch)
    existing = _write_mnist(tmp_path, "{name}.gz", keys=["train_images"])
    existing |= _write_mnist(tmp_path, "MNIST/raw/{name}", keys=["train_labels"])
    before = _snapshot(tmp_path)

    found = find_mnist(tmp_path, download=True)

    assert len(fake.calls) == 1 and fake.calls[0]["download"] is True
    assert fake.calls[0]["root"].parent == tmp_path  # staged inside the data directory, then moved
    assert found["train_images"] == existing["train_images"]
    assert found["train_labels"] == existing["train_labels"]
    assert found["test_images"] == tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    assert found["test_labels"] == tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    assert torch.all(read_idx(found["test_images"]) == 3)  # the downloaded content
    after = _snapshot(tmp_path)
    assert {path: after[path] for path in before} == before
    assert set(after) - set(before) == {found["test_images"], found["test_labels"]}  # staging removed


def test_download_creates_the_default_cache_directory(env, monkeypatch):
    FakeTorchvision(monkeypatch)
    found = find_mnist()
    assert found["train_images"] == default_cache_dir() / "MNIST" / "raw" / "train-images-idx3-ubyte"
    assert all(path.is_file() for path in found.values())


def test_failed_download_is_a_data_error_and_leaves_files_alone(env, monkeypatch, tmp_path):
    FakeTorchvision(monkeypatch, fail=RuntimeError("Error downloading train-images-idx3-ubyte.gz"))
    _write_mnist(tmp_path, keys=["train_images"])
    before = _snapshot(tmp_path)
    with pytest.raises(DataError) as info:
        find_mnist(tmp_path)
    message = str(info.value)
    assert "Downloading with torchvision failed: RuntimeError: Error downloading" in message
    assert "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte" in message
    assert str(tmp_path) in message
    assert isinstance(info.value.__cause__, RuntimeError)
    assert _snapshot(tmp_path) == before
    assert list(tmp_path.iterdir()) == [tmp_path / "train-images-idx3-ubyte.gz"]


def test_download_that_produces_nothing_is_a_data_error(env, monkeypatch, tmp_path):
    FakeTorchvision(monkeypatch, write=False)
    with pytest.raises(DataError, match="did not produce them"):
        find_mnist(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


def test_load_tiny_mnist_shapes_dtypes_and_balance(tiny_mnist_dir):
    mnist = load_mnist(tiny_mnist_dir, download=False)
    assert mnist.train_images.shape == (600, 28, 28) and mnist.train_images.dtype == torch.uint8
    assert mnist.train_labels.shape == (600,) and mnist.train_labels.dtype == torch.int64
    assert mnist.test_images.shape == (200, 28, 28) and mnist.test_images.dtype == torch.uint8
    assert mnist.test_labels.shape == (200,) and mnist.test_labels.dtype == torch.int64
    assert torch.bincount(mnist.train_labels, minlength=10).tolist() == [60] * 10
    assert torch.bincount(mnist.test_labels, minlength=10).tolist() == [20] * 10


def test_tiny_mnist_is_learnable(tiny_mnist_dir):
    # Nearest class mean is a weak learner; if it is far above chance, a tiny MLP is too.
    mnist = load_mnist(tiny_mnist_dir, download=False)
    train = mnist.train_images.flatten(1).float()
    means = torch.stack([train[mnist.train_labels == c].mean(0) for c in range(10)])
    predicted = torch.cdist(mnist.test_images.flatten(1).float(), means).argmin(1)
    accuracy = (predicted == mnist.test_labels).float().mean().item()
    assert accuracy > 0.8


def test_load_is_cached_per_directory(tmp_path, tiny_mnist_dir):
    first = load_mnist(tiny_mnist_dir, download=False)
    assert load_mnist(tiny_mnist_dir, download=False) is first
    copy = tmp_path / "copy"
    shutil.copytree(tiny_mnist_dir, copy)
    assert load_mnist(copy, download=False) is not first


def test_load_sees_a_replaced_file(tmp_path):
    _write_mnist(tmp_path)
    first = load_mnist(tmp_path, download=False)
    labels_path = tmp_path / "train-labels-idx1-ubyte.gz"
    write_idx(labels_path, torch.full((20,), 9, dtype=torch.uint8))
    stat = labels_path.stat()
    os.utime(labels_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # coarse-mtime filesystems
    second = load_mnist(tmp_path, download=False)
    assert torch.all(second.train_labels == 9)
    assert not torch.all(first.train_labels == 9)


def test_mismatched_counts_name_both_files(tmp_path):
    paths = _write_mnist(tmp_path, keys=["train_images", "test_images", "test_labels"])
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", torch.zeros(19, dtype=torch.uint8))
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path, download=False)
    message = str(info.value)
    assert f"{paths['train_images']} holds 20 images" in message
    assert f"{tmp_path / 'train-labels-idx1-ubyte.gz'} holds 19 labels" in message


def test_wrong_image_size_is_rejected(tmp_path):
    _write_mnist(tmp_path, keys=["train_images", "train_labels", "test_labels"])
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", torch.zeros(10, 27, 27, dtype=torch.uint8))
    with pytest.raises(DataError, match="expected 28×28 MNIST images, found 27×27") as info:
        load_mnist(tmp_path, download=False)
    assert "t10k-images-idx3-ubyte.gz" in str(info.value)


def test_labels_outside_0_to_9_are_rejected(tmp_path):
    _write_mnist(tmp_path, keys=["train_images", "train_labels", "test_images"])
    labels = torch.zeros(10, dtype=torch.uint8)
    labels[4] = 10
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    with pytest.raises(DataError, match="expected labels 0..9, found 10 at index 4") as info:
        load_mnist(tmp_path, download=False)
    assert "t10k-labels-idx1-ubyte.gz" in str(info.value)


def test_label_file_under_an_image_name_is_rejected(tmp_path):
    _write_mnist(tmp_path, keys=["train_labels", "test_images", "test_labels"])
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", torch.zeros(20, dtype=torch.uint8))
    with pytest.raises(DataError, match="expected 3-D image data"):
        load_mnist(tmp_path, download=False)


@pytest.fixture(scope="module")
def real_mnist(shared_mnist_dir):
    if shared_mnist_dir is None:
        pytest.skip("real MNIST is not in ../shared/data/mnist")
    return load_mnist(shared_mnist_dir, download=False)


def test_real_mnist_shapes_and_labels(real_mnist):
    assert real_mnist.train_images.shape == (60000, 28, 28)
    assert real_mnist.test_images.shape == (10000, 28, 28)
    for labels, counts in [(real_mnist.train_labels, MNIST_TRAIN_CLASS_COUNTS),
                           (real_mnist.test_labels, MNIST_TEST_CLASS_COUNTS)]:
        assert labels.dtype == torch.int64
        assert labels.min().item() >= 0
        assert labels.max().item() <= 9
        histogram = torch.bincount(labels, minlength=10)
        assert histogram.tolist() == counts
        assert histogram.sum().item() == labels.numel()
    assert real_mnist.train_images.max().item() == 255 and real_mnist.train_images.min().item() == 0


def test_real_train_labels_match_the_published_md5(real_mnist, shared_mnist_dir):
    on_disk = gzip.decompress((shared_mnist_dir / "train-labels-idx1-ubyte.gz").read_bytes())
    assert hashlib.md5(on_disk).hexdigest() == TRAIN_LABELS_MD5
    # Rebuilding the file from what was loaded proves no label was dropped, reordered or altered.
    rebuilt = struct.pack(">II", 0x801, 60000) + real_mnist.train_labels.to(torch.uint8).numpy().tobytes()
    assert hashlib.md5(rebuilt).hexdigest() == TRAIN_LABELS_MD5


def test_real_mnist_default_split_sizes(real_mnist):
    splits = split_mnist(real_mnist)
    assert len(splits.train_labels) == 55000 and splits.train_images.shape == (55000, 28, 28)
    assert len(splits.val_labels) == 5000 and splits.val_images.shape == (5000, 28, 28)
    assert len(splits.test_labels) == 10000


# ---------------------------------------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------------------------------------

N_SYNTHETIC = 1000


@pytest.fixture(scope="module")
def indexed_mnist() -> Mnist:
    """Image i stores i in its first two pixels and has label i % 10, so a split reveals its indices."""
    index = torch.arange(N_SYNTHETIC)
    images = torch.zeros(N_SYNTHETIC, 28, 28, dtype=torch.uint8)
    images[:, 0, 0] = (index // 256).to(torch.uint8)
    images[:, 0, 1] = (index % 256).to(torch.uint8)
    test_images = torch.zeros(50, 28, 28, dtype=torch.uint8)
    return Mnist(images, index % 10, test_images, torch.arange(50) % 10)


def _indices(images: torch.Tensor, labels: torch.Tensor) -> list[int]:
    index = images[:, 0, 0].long() * 256 + images[:, 0, 1].long()
    assert torch.equal(labels, index % 10), "images and labels were gathered with different indices"
    return index.tolist()


def test_split_sizes_and_disjointness(indexed_mnist):
    splits = split_mnist(indexed_mnist, val_size=100, seed=3)
    train = _indices(splits.train_images, splits.train_labels)
    val = _indices(splits.val_images, splits.val_labels)
    assert len(train) == 900 and len(val) == 100
    assert not set(train) & set(val)
    assert sorted(train + val) == list(range(N_SYNTHETIC))
    assert val != sorted(val)  # shuffled, not the first 100 examples


def test_split_leaves_the_test_set_unchanged(indexed_mnist):
    splits = split_mnist(indexed_mnist, val_size=100)
    assert splits.test_images is indexed_mnist.test_images
    assert splits.test_labels is indexed_mnist.test_labels


def test_split_is_deterministic_for_a_seed(indexed_mnist):
    first = split_mnist(indexed_mnist, val_size=100, seed=7)
    second = split_mnist(indexed_mnist, val_size=100, seed=7)
    for field in ("train_images", "train_labels", "val_images", "val_labels"):
        assert torch.equal(getattr(first, field), getattr(second, field))
    assert torch.equal(split_mnist(indexed_mnist, val_size=100).val_images,
                       split_mnist(indexed_mnist, val_size=100, seed=0).val_images)


def test_different_seeds_give_different_validation_sets(indexed_mnist):
    seed0 = set(_indices(*_val(split_mnist(indexed_mnist, val_size=100, seed=0))))
    seed1 = set(_indices(*_val(split_mnist(indexed_mnist, val_size=100, seed=1))))
    assert seed0 != seed1


def _val(splits) -> tuple[torch.Tensor, torch.Tensor]:
    return splits.val_images, splits.val_labels


def test_train_size_keeps_a_prefix_and_the_same_validation_set(indexed_mnist):
    full = split_mnist(indexed_mnist, val_size=100, seed=5)
    quick = split_mnist(indexed_mnist, val_size=100, seed=5, train_size=30)
    assert len(quick.train_labels) == 30
    full_train = _indices(full.train_images, full.train_labels)
    assert _indices(quick.train_images, quick.train_labels) == full_train[:30]
    assert torch.equal(quick.val_images, full.val_images)
    largest = split_mnist(indexed_mnist, val_size=100, seed=5, train_size=900)
    assert torch.equal(largest.train_images, full.train_images)


@pytest.mark.parametrize("val_size", [0, -3, N_SYNTHETIC, N_SYNTHETIC + 1, 2.5, True, "100"])
def test_bad_val_size_names_the_field(indexed_mnist, val_size):
    with pytest.raises(ValueError, match=r"data\.val_size must be an integer from 1 to 999"):
        split_mnist(indexed_mnist, val_size=val_size)


@pytest.mark.parametrize("train_size", [0, -1, 901, 10**6])
def test_bad_train_size_names_the_field_and_maximum(indexed_mnist, train_size):
    with pytest.raises(ValueError, match=r"data\.train_size must be an integer from 1 to 900"):
        split_mnist(indexed_mnist, val_size=100, train_size=train_size)

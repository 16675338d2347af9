"""Locating, downloading, reading and splitting the MNIST data set stored as IDX files."""

from __future__ import annotations

import functools
import gzip
import math
import os
import shutil
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from l2cluster.errors import InputError


class DataError(InputError, ValueError):
    """A data file is missing, unreadable or not what was expected; the message names the file and the fix."""


MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

DATA_DIR_ENV = "L2CLUSTER_DATA"

_MAGIC_LABELS = 0x00000801
_MAGIC_IMAGES = 0x00000803
_TYPE_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"
# Large enough that decompressing 47 MB takes few Python-level iterations, small enough to stay cheap.
_READ_CHUNK_BYTES = 4 << 20
_IMAGE_SIDE = 28
_NUM_CLASSES = 10
_REDOWNLOAD = "the file is truncated or corrupt — delete it and download again"


# ---------------------------------------------------------------------------------------------------------
# IDX format
# ---------------------------------------------------------------------------------------------------------


def read_idx(path: str | Path) -> torch.Tensor:
    """Read one unsigned-byte IDX file (raw or gzip) into a writable uint8 tensor shaped like its header."""
    path = Path(path)
    try:
        raw = open(path, "rb")  # noqa: SIM115 -- closed by the `with` below; opened here to report errors
    except OSError as error:
        raise DataError(
            f"{path}: cannot open the IDX file ({error.strerror or error}); "
            "check the path, or delete the file and download it again"
        ) from error
    with raw:
        # Sniff rather than trust the name: torchvision keeps uncompressed copies, users rename files.
        compressed = raw.read(len(_GZIP_MAGIC)) == _GZIP_MAGIC
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
        try:
            return _parse_idx(path, stream)
        except (OSError, EOFError, zlib.error) as error:
            if compressed:
                raise DataError(
                    f"{path}: expected a valid gzip stream, but decompressing failed ({error}); {_REDOWNLOAD}"
                ) from error
            raise DataError(f"{path}: reading the IDX file failed ({error}); {_REDOWNLOAD}") from error


def _parse_idx(path: Path, stream) -> torch.Tensor:
    magic_bytes = stream.read(4)
    if len(magic_bytes) < 4:
        raise DataError(
            f"{path}: expected an IDX header starting with a 4-byte magic number, "
            f"found only {len(magic_bytes)} bytes; {_REDOWNLOAD}"
        )
    magic = int.from_bytes(magic_bytes, "big")
    if magic not in (_MAGIC_LABELS, _MAGIC_IMAGES):
        raise DataError(_bad_magic_message(path, magic))

    ndim = magic & 0xFF
    header_bytes = 4 + 4 * ndim
    dims_bytes = stream.read(4 * ndim)
    if len(dims_bytes) < 4 * ndim:
        raise DataError(
            f"{path}: expected a {header_bytes}-byte IDX header (magic number and {ndim} dimension sizes), "
            f"found only {4 + len(dims_bytes)} bytes; {_REDOWNLOAD}"
        )
    dims = struct.unpack(f">{ndim}I", dims_bytes)
    expected = math.prod(dims)

    # Read whatever is there instead of exactly `expected` bytes: a corrupt header can claim terabytes,
    # and counting the real payload lets the error say how much was found.
    payload = bytearray()
    while chunk := stream.read(_READ_CHUNK_BYTES):
        payload += chunk
    if len(payload) != expected:
        kind = "pixel data" if ndim == 3 else "label data"
        shape = "×".join(str(d) for d in dims)
        problem = _REDOWNLOAD if len(payload) < expected else (
            "the file has trailing bytes or is corrupt — delete it and download again"
        )
        raise DataError(
            f"{path}: expected {expected} bytes of {kind} after the {header_bytes}-byte header ({shape}), "
            f"found {len(payload)}; {problem}"
        )
    if expected == 0:
        # torch.frombuffer rejects empty buffers.
        return torch.empty(dims, dtype=torch.uint8)
    # A bytearray is writable, so the tensor shares its memory without a copy or a read-only warning.
    return torch.frombuffer(payload, dtype=torch.uint8).reshape(dims)


def _bad_magic_message(path: Path, magic: int) -> str:
    found = f"0x{magic:08X}"
    type_code = (magic >> 8) & 0xFF
    if magic >> 16 == 0 and magic & 0xFF in (1, 3) and type_code != _TYPE_UBYTE:
        return (
            f"{path}: expected unsigned-byte IDX data (magic 0x00000801 for labels, 0x00000803 for images), "
            f"found magic {found} with type code 0x{type_code:02X} instead of 0x08; MNIST files hold "
            "unsigned bytes, so this is not an MNIST file or it is corrupt — delete it and download again"
        )
    not_gzip = ""
    if path.suffix == ".gz":
        not_gzip = " (the name ends in .gz but the data is not gzip-compressed either)"
    return (
        f"{path}: expected IDX magic number 0x00000801 (labels) or 0x00000803 (images), found {found}"
        f"{not_gzip}; this is not an MNIST IDX file or it is corrupt — delete it and download again"
    )


def write_idx(path: str | Path, tensor: torch.Tensor) -> None:
    """Write a uint8 1-D (labels) or 3-D (images) tensor as IDX, gzip-compressed if the path ends in .gz."""
    path = Path(path)
    if tensor.dtype != torch.uint8 or tensor.dim() not in (1, 3):
        raise DataError(
            f"{path}: write_idx expects a uint8 tensor with 1 dimension (labels) or 3 (images), "
            f"got dtype {tensor.dtype} with shape {tuple(tensor.shape)}; convert it with .to(torch.uint8) "
            "and reshape it first"
        )
    magic = _MAGIC_LABELS if tensor.dim() == 1 else _MAGIC_IMAGES
    header = struct.pack(f">I{tensor.dim()}I", magic, *tensor.shape)
    # numpy().tobytes() copies only the tensor's own elements; bytes(storage) is elementwise and very slow.
    payload = tensor.detach().cpu().contiguous().numpy().tobytes()
    if path.suffix == ".gz":
        # mtime=0 keeps fixture bytes identical from run to run.
        with gzip.GzipFile(path, mode="wb", compresslevel=6, mtime=0) as out:
            out.write(header)
            out.write(payload)
    else:
        with open(path, "wb") as out:
            out.write(header)
            out.write(payload)


# ---------------------------------------------------------------------------------------------------------
# Finding (and if needed downloading) the four MNIST files
# ---------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Return $XDG_CACHE_HOME/l2cluster/mnist, or ~/.cache/l2cluster/mnist when XDG_CACHE_HOME is unset."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says relative values are invalid and must be ignored.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "l2cluster" / "mnist"


def _choose_data_dir(data_dir: str | Path | None) -> tuple[Path, str]:
    if data_dir is not None:
        return Path(data_dir).expanduser(), "given as --data-dir / the data_dir argument"
    from_env = os.environ.get(DATA_DIR_ENV, "")
    if from_env:
        return Path(from_env).expanduser(), f"from the {DATA_DIR_ENV} environment variable"
    return default_cache_dir(), f"the default cache directory, used because {DATA_DIR_ENV} is not set"


def _candidates(directory: Path, name: str) -> list[Path]:
    # Plain files first, then torchvision's layout, so a user's own copy wins over a download.
    raw = directory / "MNIST" / "raw"
    return [directory / name, directory / f"{name}.gz", raw / name, raw / f"{name}.gz"]


def _locate(directory: Path) -> tuple[dict[str, Path], list[str]]:
    found: dict[str, Path] = {}
    missing: list[str] = []
    for key, name in MNIST_FILES.items():
        path = next((p for p in _candidates(directory, name) if p.is_file()), None)
        if path is None:
            missing.append(key)
        else:
            found[key] = path
    return found, missing


def _download_missing(directory: Path, missing: list[str]) -> None:
    # Imported here only: torchvision is slow to import and not needed when the files are present.
    from torchvision import datasets

    directory.mkdir(parents=True, exist_ok=True)
    # torchvision re-extracts over files already in MNIST/raw, so it downloads into a private staging
    # directory and only files that are absent are moved in; existing files are never overwritten.
    staging = Path(tempfile.mkdtemp(prefix=".l2cluster-download-", dir=directory))
    try:
        datasets.MNIST(root=str(staging), download=True)
        for key in missing:
            source = next((p for p in _candidates(staging, MNIST_FILES[key]) if p.is_file()), None)
            if source is None:
                continue  # the caller looks again and reports it as still missing
            target = directory / source.relative_to(staging)
            if target.exists():
                continue  # another process put it there meanwhile; keep theirs
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(source, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def find_mnist(data_dir: str | Path | None = None, *, download: bool = True) -> dict[str, Path]:
    """Return the paths of the four MNIST files, downloading missing ones with torchvision if allowed.

    The directory is data_dir, else $L2CLUSTER_DATA, else default_cache_dir(). Each file is accepted as
    NAME, NAME.gz, MNIST/raw/NAME or MNIST/raw/NAME.gz, in that order.
    """
    directory, origin = _choose_data_dir(data_dir)
    found, missing = _locate(directory)
    if not missing:
        return found

    download_error: Exception | None = None
    if download:
        try:
            _download_missing(directory, missing)
        except Exception as error:  # no network, no torchvision, read-only dir: all end in the error below
            download_error = error
        else:
            found, missing = _locate(directory)
            if not missing:
                return found

    names = ", ".join(MNIST_FILES[key] for key in missing)
    if not download:
        why = "Downloading is disabled."
    elif download_error is not None:
        why = f"Downloading with torchvision failed: {type(download_error).__name__}: {download_error}."
    else:
        why = "torchvision's download finished but did not produce them."
    raise DataError(
        f"{directory}: MNIST file(s) missing: {names} (directory {origin}). Each file was looked for as "
        f"NAME, NAME.gz, MNIST/raw/NAME and MNIST/raw/NAME.gz. {why} To fix: point --data-dir (data_dir=) "
        f"or {DATA_DIR_ENV} at a directory holding the four MNIST IDX files, or allow downloading "
        "(download=True) on a machine with internet access."
    ) from download_error


# ---------------------------------------------------------------------------------------------------------
# Loading and splitting
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mnist:
    """MNIST's train and test sets; the tensors are shared by every caller, so never modify them in place."""

    train_images: torch.Tensor  # uint8 [N, 28, 28]
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor  # uint8 [M, 28, 28]
    test_labels: torch.Tensor  # int64 [M]


def load_mnist(data_dir: str | Path | None = None, *, download: bool = True) -> Mnist:
    """Find, read and check the four MNIST files; loaded once per directory and process."""
    paths = find_mnist(data_dir, download=download)
    # Size and mtime join the resolved path in the key so a replaced file is not served stale from the cache.
    identity = []
    for key in MNIST_FILES:
        stat = paths[key].stat()
        identity.append((paths[key].resolve(), stat.st_size, stat.st_mtime_ns))
    return _load_checked(tuple(identity))


# Several jobs in one process load the same files; a small bound keeps rewritten fixtures from piling up.
@functools.lru_cache(maxsize=4)
def _load_checked(identity: tuple[tuple[Path, int, int], ...]) -> Mnist:
    paths = dict(zip(MNIST_FILES, (path for path, _, _ in identity), strict=True))
    tensors = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        images_key, labels_key = f"{split}_images", f"{split}_labels"
        _check_pair(tensors[images_key], tensors[labels_key], paths[images_key], paths[labels_key])
    return Mnist(
        train_images=tensors["train_images"],
        train_labels=tensors["train_labels"].to(torch.int64),
        test_images=tensors["test_images"],
        test_labels=tensors["test_labels"].to(torch.int64),
    )


def _check_pair(images: torch.Tensor, labels: torch.Tensor, images_path: Path, labels_path: Path) -> None:
    swapped = "the file may be misnamed; put the right MNIST file under this name or download again"
    if images.dim() != 3:
        raise DataError(
            f"{images_path}: expected 3-D image data (IDX magic 0x00000803), found {images.dim()}-D data "
            f"of shape {tuple(images.shape)}; {swapped}"
        )
    if labels.dim() != 1:
        raise DataError(
            f"{labels_path}: expected 1-D label data (IDX magic 0x00000801), found {labels.dim()}-D data "
            f"of shape {tuple(labels.shape)}; {swapped}"
        )
    if tuple(images.shape[1:]) != (_IMAGE_SIDE, _IMAGE_SIDE):
        raise DataError(
            f"{images_path}: expected {_IMAGE_SIDE}×{_IMAGE_SIDE} MNIST images, found "
            f"{images.shape[1]}×{images.shape[2]} (labels in {labels_path}); this is not MNIST — "
            "delete it and download again"
        )
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels; "
            "expected the same count — the files come from different data sets or one is corrupt: "
            "delete both and download again"
        )
    too_large = (labels >= _NUM_CLASSES).nonzero()
    if too_large.numel():
        index = int(too_large[0, 0])
        raise DataError(
            f"{labels_path}: expected labels 0..{_NUM_CLASSES - 1}, found {int(labels[index])} "
            f"at index {index}; {_REDOWNLOAD}"
        )


@dataclass(frozen=True)
class Splits:
    """Train / validation / test tensors; validation is held out of MNIST's 60k training images."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def _check_count(field: str, value: object, maximum: int, context: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise ValueError(
            f"{field} must be an integer from 1 to {maximum} ({context}), got {value!r}; "
            f"set {field} within that range"
        )


def split_mnist(
    mnist: Mnist, *, val_size: int = 5000, seed: int = 0, train_size: int | None = None
) -> Splits:
    """Hold out val_size random training examples as validation, chosen by the data seed `seed`.

    The same seed gives the same validation set in every job of a sweep. If train_size is given only the
    first train_size of the remaining examples (in the seeded random order) are kept, for quick runs.
    The test set is passed through unchanged.
    """
    total = mnist.train_images.shape[0]
    _check_count("data.val_size", val_size, total - 1, f"the training set has {total} examples")
    if train_size is not None:
        _check_count("data.train_size", train_size, total - val_size,
                     f"{total} training examples minus data.val_size={val_size}")

    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    # The validation set is taken before truncation so it does not depend on train_size.
    val_index = order[:val_size]
    train_index = order[val_size:] if train_size is None else order[val_size:val_size + train_size]
    return Splits(
        train_images=mnist.train_images[train_index],
        train_labels=mnist.train_labels[train_index],
        val_images=mnist.train_images[val_index],
        val_labels=mnist.train_labels[val_index],
        test_images=mnist.test_images,
        test_labels=mnist.test_labels,
    )

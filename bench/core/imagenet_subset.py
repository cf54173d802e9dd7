"""Build an ImageNet class subset as an image folder: ``DEST/train/<wnid>/*`` and ``DEST/test/<wnid>/*``.

The REFINE paper evaluates on 50 ImageNet classes at 224 px; its code reads a prepared folder
(``train/`` and ``test/`` of 224-px images) and publishes neither the class list nor the script
that made it. This tool makes such a folder from an ImageNet download, for the ``imagefolder``
dataset (``configs/imagenet50_paper.yaml``)::

    python -m bench.core.imagenet_subset IMAGENET/train IMAGENET/val DEST            # 50 classes, every 20th
    python -m bench.core.imagenet_subset IMAGENET/train IMAGENET/val DEST --classes my_classes.txt

``IMAGENET/train`` and ``IMAGENET/val`` are class-folder trees (``n01440764/*.JPEG``; the
validation archive sorted into class folders, as the usual ``valprep.sh`` does). The training
images of the chosen classes become ``train/``, their validation images ``test/``. Each image is
resized so its shorter side is ``--size`` (bilinear, antialiased) and centre-cropped to a square,
so every image of the folder has one size, and saved as JPEG at quality 95 (triggers are applied
later, in memory, so the re-encoding touches clean images only). ``DEST/classes.txt`` lists the
classes in label order. Without ``--classes``, the classes are every ``--stride``-th of the
sorted training classes (``--stride 20`` on ImageNet-1k: 50 classes spread over the hierarchy).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from tqdm import tqdm

from bench.core.errors import BenchError

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


def class_dirs(tree: Path) -> list[str]:
    """The class folders of a class-folder tree, sorted (the label order of ``imagefolder``)."""
    if not tree.is_dir():
        raise BenchError(f"{tree} is not a folder")
    names = sorted(p.name for p in tree.iterdir() if p.is_dir())
    if not names:
        raise BenchError(f"{tree} holds no class folders")
    return names


def choose_classes(available: list[str], classes_file: Path | None, stride: int, count: int) -> list[str]:
    """The classes named in ``classes_file`` (one per line, ``#`` comments), else every ``stride``-th."""
    if classes_file is not None:
        try:
            lines = classes_file.read_text().splitlines()
        except OSError as err:
            raise BenchError(f"cannot read the class list {classes_file}: {err.strerror or err}") from None
        chosen = [line.split("#")[0].strip() for line in lines]
        chosen = [c for c in chosen if c]
        missing = [c for c in chosen if c not in available]
        if missing:
            raise BenchError(f"{classes_file}: {len(missing)} class(es) not in the training tree, e.g. {missing[0]!r}")
        if len(set(chosen)) != len(chosen) or not chosen:
            raise BenchError(f"{classes_file} must list distinct classes, one per line")
        return sorted(chosen)
    chosen = available[::stride][:count]
    if len(chosen) < count:
        raise BenchError(f"every {stride}th of {len(available)} classes gives {len(chosen)}, fewer than {count}; "
                         "lower --stride or --count")  # fmt: skip
    return chosen


def square(src: Path, dest: Path, size: int) -> None:
    """Shorter side to ``size``, centre crop to ``size`` x ``size``, RGB JPEG."""
    from PIL import Image

    try:
        with Image.open(src) as img:
            img = img.convert("RGB")
            w, h = img.size
            scale = size / min(w, h)
            img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BILINEAR)
            w, h = img.size
            left, top = (w - size) // 2, (h - size) // 2
            img.crop((left, top, left + size, top + size)).save(dest, "JPEG", quality=95)
    except (OSError, ValueError, SyntaxError) as err:
        raise BenchError(f"{src} is not a readable image ({type(err).__name__}: {err})") from None


def build_subset(train: Path, val: Path, dest: Path, classes: list[str], size: int) -> dict[str, int]:
    """Write ``dest/{train,test}/<class>/`` for ``classes``; return the image count per split."""
    val_classes = set(class_dirs(val))
    missing = [c for c in classes if c not in val_classes]
    if missing:
        raise BenchError(f"{val} has no folder for {len(missing)} chosen class(es), e.g. {missing[0]!r}; "
                         "sort the validation images into class folders first")  # fmt: skip
    if dest.exists() and any(dest.iterdir()):
        raise BenchError(f"{dest} exists and is not empty; give a new folder")
    jobs = []
    for split, tree in (("train", train), ("test", val)):
        for name in classes:
            files = sorted(p for p in (tree / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise BenchError(f"{tree / name} holds no images")
            jobs += [(f, dest / split / name / f"{f.stem}.jpeg") for f in files]
    # Written beside ``dest`` and renamed into place when complete: a failure leaves no half folder.
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    counts = {"train": 0, "test": 0}
    try:
        for src, out in tqdm(jobs, desc="imagenet subset", unit="img", disable=None):
            target = partial / out.relative_to(dest)
            target.parent.mkdir(parents=True, exist_ok=True)
            square(src, target, size)
            counts[target.parent.parent.name] += 1
        (partial / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
        if dest.exists():
            dest.rmdir()  # empty, checked above
        partial.rename(dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.core.imagenet_subset", description=__doc__.split("\n\n")[0])
    parser.add_argument("train", type=Path, help="ImageNet training tree (class folders)")
    parser.add_argument("val", type=Path, help="ImageNet validation tree (class folders): the subset's test/")
    parser.add_argument("dest", type=Path, help="new folder for train/ and test/")
    parser.add_argument("--classes", type=Path, help="file with one class folder name (wnid) per line")
    parser.add_argument("--count", type=int, default=50, help="classes to take without --classes (default 50)")
    parser.add_argument("--stride", type=int, default=20, help="take every STRIDE-th class (default 20)")
    parser.add_argument("--size", type=int, default=224, help="side of the square images (default 224)")
    args = parser.parse_args(argv)
    try:
        if min(args.count, args.stride, args.size) < 1:
            raise BenchError("--count, --stride and --size must be >= 1")
        classes = choose_classes(class_dirs(args.train), args.classes, args.stride, args.count)
        counts = build_subset(args.train, args.val, args.dest, classes, args.size)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.dest}: {len(classes)} classes, {counts['train']} train and {counts['test']} test images "
          f"at {args.size} px")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Folder sources: image files and annotation PNGs on disk, paired by name.

Pairing follows MMSegmentation's ``BaseSegDataset``: the image ``<images_dir>/<name><img_suffix>``
goes with the annotation ``<annotations_dir>/<name><seg_map_suffix>``. ``<name>`` is the path
below the directory without the suffix, so it includes sub-folders when the directories are
searched recursively (Cityscapes' ``leftImg8bit/train/<city>/``). Without a split file every
image found is used, sorted by name; with one, exactly the names it lists, in its order.
Hidden files and folders (names starting with '.') are skipped.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from hooktrain.errors import UserError
from hooktrain.recipe.data import FolderSource

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".npy")


def _check_dir(directory: Path, key: str, where: str) -> None:
    if not directory.is_dir():
        raise UserError(
            f"{where}: {key} {directory} is not a directory (relative paths resolve against the "
            f"working directory {os.getcwd()}); fix {where}.root or {where}.{key}"
        )


def _files(directory: Path, recursive: bool):
    """Every visible file under ``directory`` as ``(path relative to it, path)``."""
    if not recursive:
        for entry in sorted(directory.iterdir()):
            if not entry.name.startswith(".") and entry.is_file():
                yield entry.name, entry
        return
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        base = Path(dirpath)
        for name in sorted(filenames):
            if not name.startswith("."):
                path = base / name
                yield path.relative_to(directory).as_posix(), path


def _strip(name: str, suffixes: Sequence[str]) -> str | None:
    """``name`` without the first of ``suffixes`` it ends with (case-insensitive), or None."""
    lower = name.lower()
    for suffix in suffixes:
        if lower.endswith(suffix.lower()) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _scan(directory: Path, suffixes: Sequence[str], recursive: bool) -> dict[str, Path]:
    """``{name: path}`` of the files under ``directory`` whose names end with a suffix."""
    found: dict[str, Path] = {}
    for relative, path in _files(directory, recursive):
        name = _strip(relative, suffixes)
        if name is not None:
            found.setdefault(name, path)
    return found


def _image_suffixes(img_suffix: str | None) -> tuple[str, ...]:
    return (img_suffix,) if img_suffix else IMAGE_SUFFIXES


def folder_pairs(
    images_dir: Path,
    annotations_dir: Path,
    where: str,
    *,
    img_suffix: str | None = None,
    seg_map_suffix: str = ".png",
    recursive: bool = True,
) -> list[tuple[str, str]]:
    """Every ``(image, annotation)`` pair under the two directories, sorted by name.

    An image is a file ending with ``img_suffix`` (None: any of :data:`IMAGE_SUFFIXES`), an
    annotation one ending with ``seg_map_suffix``; both must have a partner of the same name.
    """
    images_dir, annotations_dir = Path(images_dir), Path(annotations_dir)
    _check_dir(images_dir, "images_dir", where)
    _check_dir(annotations_dir, "annotations_dir", where)
    images = _scan(images_dir, _image_suffixes(img_suffix), recursive)
    masks = _scan(annotations_dir, (seg_map_suffix,), recursive)
    unpaired = sorted(images.keys() ^ masks.keys())
    if unpaired:
        which = "annotation" if unpaired[0] in images else "image"
        suffixes = f"'{img_suffix}'" if img_suffix else "an image extension"
        raise UserError(
            f"{where}: {len(unpaired)} files have no partner (e.g. '{unpaired[0]}' has no "
            f"{which}); images in {images_dir} (names ending with {suffixes}) and annotations "
            f"in {annotations_dir} (names ending with '{seg_map_suffix}') must pair by name; "
            f"fix {where}.img_suffix / seg_map_suffix, or list the wanted names in "
            f"{where}.split_file"
        )
    if not images:
        raise UserError(
            f"{where}: no images found in {images_dir}"
            + (f" with names ending in '{img_suffix}'" if img_suffix else "")
            + (" (set recursive: true to search its sub-folders)" if not recursive else "")
            + f"; fix {where}.images_dir or {where}.img_suffix"
        )
    return [(str(images[n].absolute()), str(masks[n].absolute())) for n in sorted(images)]


def read_split_file(path: Path, where: str) -> list[str]:
    """The names listed in a split file: one per line, surrounding blanks and empty lines
    dropped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise UserError(
            f"{where}.split_file: cannot read {path} ({err.strerror or err}; relative paths "
            f"resolve against {where}.root, else the working directory {os.getcwd()}); fix "
            f"{where}.split_file"
        ) from None
    names = [line.strip() for line in lines if line.strip()]
    if not names:
        raise UserError(f"{where}.split_file: {path} lists no names; fix {where}.split_file")
    return names


def listed_pairs(
    names: Sequence[str],
    images_dir: Path,
    annotations_dir: Path,
    where: str,
    *,
    listed_in: str,
    img_suffix: str | None = None,
    seg_map_suffix: str = ".png",
) -> list[tuple[str, str]]:
    """The ``(image, annotation)`` pair of each of ``names``, in order; a name without its
    image or annotation is an error naming ``listed_in`` (the split file)."""
    images_dir, annotations_dir = Path(images_dir), Path(annotations_dir)
    _check_dir(images_dir, "images_dir", where)
    _check_dir(annotations_dir, "annotations_dir", where)
    pairs: list[tuple[str, str]] = []
    no_image: list[tuple[str, Path]] = []
    no_mask: list[tuple[str, Path]] = []
    for name in names:
        candidates = [images_dir / f"{name}{s}" for s in _image_suffixes(img_suffix)]
        image = next((c for c in candidates if c.is_file()), None)
        mask = annotations_dir / f"{name}{seg_map_suffix}"
        if image is None:
            no_image.append((name, candidates[0]))
        elif not mask.is_file():
            no_mask.append((name, mask))
        else:
            pairs.append((str(image.absolute()), str(mask.absolute())))
    for missing, what, keys in (
        (no_image, "image", "images_dir / img_suffix"),
        (no_mask, "annotation", "annotations_dir / seg_map_suffix"),
    ):
        if missing:
            name, expected = missing[0]
            raise UserError(
                f"{where}: {len(missing)} of the {len(names)} names in {listed_in} have no "
                f"{what} (e.g. '{name}': no {expected}); fix {where}.split_file or "
                f"{where}.{keys}"
            )
    return pairs


def folder_dirs(source: FolderSource) -> tuple[Path, list[Path]]:
    """The images directory and the annotation directories a folder source points at."""
    root = Path(os.path.expanduser(source.root)) if source.root is not None else Path()

    def resolve(path: str | None, default: str) -> Path:
        if path is None:
            return root / default / source.split
        return root / os.path.expanduser(path)

    images = resolve(source.images_dir, "images")
    annotations = source.annotations_dir
    if isinstance(annotations, list):
        return images, [resolve(a, "annotations") for a in annotations]
    return images, [resolve(annotations, "annotations")]


def source_pairs(source: FolderSource, where: str) -> list[tuple[str, str]]:
    """The ``(image, annotation)`` paths of a folder source, in its order."""
    images, annotations = folder_dirs(source)
    options = {"img_suffix": source.img_suffix, "seg_map_suffix": source.seg_map_suffix}
    if source.split_file is None:
        return folder_pairs(images, annotations[0], where, recursive=source.recursive, **options)
    root = Path(os.path.expanduser(source.root)) if source.root is not None else Path()
    files = source.split_file if isinstance(source.split_file, list) else [source.split_file]
    pairs: list[tuple[str, str]] = []
    for i, split_file in enumerate(files):
        path = root / os.path.expanduser(split_file)
        names = read_split_file(path, where)
        directory = annotations[i] if len(annotations) > 1 else annotations[0]
        pairs += listed_pairs(names, images, directory, where, listed_in=str(path), **options)
    return pairs


def load_folder(source: FolderSource, where: str):
    """The folder source as a ``datasets.IterableDataset`` of raw ``image``/``annotation``
    values holding only paths (the loaders read the files)."""
    from datasets import Dataset, Features, Image

    pairs = source_pairs(source, where)
    # Only paths go into the dataset: skipping examples never touches the files.
    table = {
        "image": [{"bytes": None, "path": img} for img, _ in pairs],
        "annotation": [{"bytes": None, "path": ann} for _, ann in pairs],
    }
    features = Features({"image": Image(decode=False), "annotation": Image(decode=False)})
    ds = Dataset.from_dict(table, features=features)
    return ds.to_iterable_dataset(num_shards=min(source.num_shards, len(pairs)))

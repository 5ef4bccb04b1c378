"""RGB palette masks: colours to class indices.

Some datasets store their masks as colour pictures, one colour per class, where training needs
one class index per pixel. :func:`map_colours` turns such a mask into indices with a palette
(colour ``i`` is class ``i``); ``hooktrain data convert --palette`` writes the result as
single-channel PNGs and ``hooktrain data check`` uses the same function to say whether a
dataset's colour masks match the recipe's palette.

A palette comes from a recipe (its ``data.palette``) or from a JSON or YAML file holding a list
of ``[r, g, b]`` colours, one per class index in order (see :func:`load_palette`).

Colours here are always RGB. OpenCV decodes to BGR, so :func:`decode_colour_mask` swaps the
channels once, and nothing else needs to care.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from hooktrain.errors import UserError

__all__ = [
    "Palette",
    "UnknownColour",
    "ColourMapping",
    "load_palette",
    "palette_from_colours",
    "decode_colour_mask",
    "map_colours",
]


@dataclass(frozen=True)
class Palette:
    """Colours in class order: ``colours[i]`` is the ``[r, g, b]`` of class ``i``."""

    colours: np.ndarray  # (K, 3) uint8 RGB
    source: str  # where the colours came from, for messages

    @property
    def duplicates(self) -> list[tuple[tuple[int, int, int], list[int]]]:
        """Colours given to more than one class, with those classes (the first one wins)."""
        seen: dict[tuple[int, int, int], list[int]] = {}
        for index, colour in enumerate(self.colours.tolist()):
            seen.setdefault(tuple(colour), []).append(index)
        return [(colour, indices) for colour, indices in seen.items() if len(indices) > 1]


@dataclass(frozen=True)
class UnknownColour:
    """A mask colour that is not in the palette: where it first occurs and how often."""

    colour: tuple[int, int, int]  # RGB
    x: int
    y: int
    pixels: int

    def describe(self, where: str = "") -> str:
        at = f"{where} " if where else ""
        return f"{list(self.colour)} at {at}(x={self.x}, y={self.y})"


@dataclass(frozen=True)
class ColourMapping:
    """The result of :func:`map_colours`."""

    index: np.ndarray  # HxW class indices (uint8, or uint16 beyond 256 colours); 0 where unknown
    unknown: list[UnknownColour]  # the first few unknown colours, by first occurrence
    unknown_colours: int  # distinct colours not in the palette
    unknown_pixels: int  # pixels of those colours


def palette_from_colours(colours: object, source: str) -> Palette:
    """Validate a list of ``[r, g, b]`` colours into a :class:`Palette`."""
    if not isinstance(colours, list) or not colours:
        raise UserError(
            f"{source}: a palette is a non-empty list of [r, g, b] colours, one per class; "
            f"got {type(colours).__name__}"
        )
    for i, colour in enumerate(colours):
        if (
            not isinstance(colour, list | tuple)
            or len(colour) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255
                       for v in colour)  # fmt: skip
        ):
            raise UserError(
                f"{source}: palette entry {i} is {colour!r}; each colour must be [r, g, b] "
                "with integers 0..255"
            )
    return Palette(np.asarray(colours, dtype=np.uint8).reshape(-1, 3), source)


def load_palette(path: str | os.PathLike) -> Palette:
    """Read a palette from a recipe or from a colour list file.

    ``path`` is either a recipe YAML (loaded with :func:`hooktrain.recipe.schema.load_recipe`, so
    ``_base_`` files count; its ``data.palette`` is used; a dataset base file without a
    ``model`` section is merged but not validated as a whole recipe) or a JSON/YAML file whose
    whole content is a list of ``[r, g, b]`` colours, entry ``i`` being the colour of class
    index ``i``.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"--palette {path}: no such file; pass a recipe YAML with data.palette, or a JSON/YAML "
            "list of [r, g, b] colours (one per class index)"
        )
    try:
        content = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"--palette {path}: not a JSON or YAML file ({exc.__class__.__name__}); "
                        "pass a recipe or a list of [r, g, b] colours") from None  # fmt: skip
    if isinstance(content, dict):
        from hooktrain.recipe.schema import load_recipe, load_yaml

        merged = load_yaml(path)
        if "model" in merged:  # a whole recipe, validated as for training
            palette = load_recipe(path).data.palette
        else:  # a dataset base such as recipes/_base_/datasets/cityscapes.yaml
            palette = (merged.get("data") or {}).get("palette")
        if palette is None:
            raise UserError(
                f"--palette {path}: the recipe sets no data.palette; add data.palette (one "
                "[r, g, b] per class, in class order) or pass a JSON/YAML list of colours"
            )
        return palette_from_colours(palette, f"data.palette of {path}")
    return palette_from_colours(content, str(path))


def decode_colour_mask(raw: bytes) -> np.ndarray | None:
    """Decode an encoded mask with OpenCV, colour channels as RGB.

    Returns ``HxW`` for a single-channel image, ``HxWx3`` RGB for a colour one (alpha is
    dropped), or None when the bytes cannot be decoded. Palette PNGs come back as the colours
    their palette gives each pixel.
    """
    mask = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED)
    if mask is None:
        return None
    if mask.ndim == 3 and mask.shape[2] == 1:
        return mask[:, :, 0]
    if mask.ndim == 3 and mask.shape[2] == 4:
        return cv2.cvtColor(mask, cv2.COLOR_BGRA2RGB)
    if mask.ndim == 3 and mask.shape[2] == 3:
        return cv2.cvtColor(mask, cv2.COLOR_BGR2RGB)
    return mask


def _keys(rgb: np.ndarray) -> np.ndarray:
    """One integer per colour: ``r << 16 | g << 8 | b``."""
    rgb = rgb.astype(np.uint32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def map_colours(rgb: np.ndarray, palette: Palette, max_unknown: int = 5) -> ColourMapping:
    """Map an ``HxWx3`` RGB ``uint8`` mask to class indices: colour ``palette.colours[i]``
    becomes ``i`` (a colour listed twice maps to its first index).

    Pixels of colours not in the palette get index 0 and are reported in ``unknown``: the
    first ``max_unknown`` such colours with the position of their first pixel and their pixel
    count.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"map_colours needs an HxWx3 RGB mask, got shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise UserError(
            f"colour masks must be 8 bits per channel to match a palette, got {rgb.dtype}"
        )
    class_of: dict[int, int] = {}
    for index, key in enumerate(_keys(palette.colours).tolist()):
        class_of.setdefault(key, index)  # a colour listed twice keeps its first class
    table_keys = np.fromiter(class_of.keys(), np.uint32, len(class_of))
    table_index = np.fromiter(class_of.values(), np.int64, len(class_of))
    order = np.argsort(table_keys)
    table_keys, table_index = table_keys[order], table_index[order]

    keys = _keys(rgb)
    uniq, first, inverse, counts = np.unique(
        keys.ravel(), return_index=True, return_inverse=True, return_counts=True
    )
    pos = np.minimum(np.searchsorted(table_keys, uniq), len(table_keys) - 1)
    known = table_keys[pos] == uniq
    dtype = np.uint8 if len(palette.colours) <= 256 else np.uint16
    values = np.where(known, table_index[pos], 0).astype(dtype)
    index = values[inverse].reshape(keys.shape)
    unknown = []
    for i in np.flatnonzero(~known)[np.argsort(first[~known], kind="stable")][:max_unknown]:
        y, x = divmod(int(first[i]), keys.shape[1])
        key = int(uniq[i])
        colour = ((key >> 16) & 255, (key >> 8) & 255, key & 255)
        unknown.append(UnknownColour(colour, x, y, int(counts[i])))
    return ColourMapping(index, unknown, int((~known).sum()), int(counts[~known].sum()))

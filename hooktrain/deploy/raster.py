"""Raster files through rasterio (GDAL): read a band of rows at a time, write GeoTIFFs as rows finish.

:class:`RasterSource` reads any file GDAL opens: GeoTIFF and COG by their internal tiles,
PNG and JPEG by scanline (forward only, which is how :mod:`hooktrain.deploy.tiled` reads), so
no file is ever decoded whole. :class:`GeoTiffWriter` writes a tiled, DEFLATE-compressed
GeoTIFF (BigTIFF when needed) with the input's CRS and transform, block row by block row, into
a ``.partial`` file renamed into place once complete.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from hooktrain.errors import UserError

LABEL_NODATA = 255  # the label GeoTIFF's nodata value: labels are 0..254
BLOCK = 256  # GeoTIFF tile side; rows are written in whole block rows
CACHE_MB = 256  # GDAL's block cache while predicting: a band of blocks of a wide raster, in and out


def rasterio_module() -> Any:
    """rasterio, or a ``UserError`` naming the extra that installs it."""
    try:
        import rasterio
    except ImportError:
        raise UserError(
            "predict: tiled prediction of rasters reads and writes them with rasterio; "
            "pip install 'hooktrain[geo]'"
        ) from None
    return rasterio


def bounded_cache() -> Any:
    """A ``rasterio.Env`` holding GDAL's block cache to :data:`CACHE_MB` (unless the environment
    sets ``GDAL_CACHEMAX``): its default, 5% of the RAM, would fill with blocks the forward-only
    reads never ask for again, so a taller image would take more memory."""
    rasterio = rasterio_module()
    return rasterio.Env() if "GDAL_CACHEMAX" in os.environ else rasterio.Env(GDAL_CACHEMAX=CACHE_MB)


def _quiet_open(path: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
    rasterio = rasterio_module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        try:
            return rasterio.open(path, *args, **kwargs)
        except rasterio.errors.RasterioIOError as exc:
            raise UserError(f"predict: cannot read {path} as a raster ({exc}); give a GeoTIFF, PNG or JPEG") from None


def raster_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` of an image file, from its header."""
    with _quiet_open(path) as dataset:
        return dataset.height, dataset.width


class RasterSource:
    """A :class:`hooktrain.deploy.tiled.RowSource` over a raster file with ``channels`` bands
    (an extra last alpha band, as an RGBA PNG has, is read as the validity mask instead)."""

    def __init__(self, path: str | os.PathLike, channels: int) -> None:
        self.path = Path(path)
        self.dataset = _quiet_open(path)
        dataset = self.dataset
        self.height, self.width = dataset.height, dataset.width
        bands = dataset.count
        alpha = bands == channels + 1 and dataset.colorinterp[-1].name == "alpha"
        if bands != channels and not alpha:
            self.close()
            raise UserError(
                f"predict: {path} has {bands} bands but the model takes {channels} (data.in_channels); "
                "give a raster with one band per input channel"
            )
        self._indexes = list(range(1, channels + 1))
        dtypes = {dataset.dtypes[i - 1] for i in self._indexes}
        if not dtypes <= {"uint8", "uint16"}:
            self.close()
            raise UserError(
                f"predict: {path} holds {', '.join(sorted(dtypes))} pixels; the model reads uint8 or uint16 "
                "(as in training): convert it, e.g. gdal_translate -ot UInt16 -scale"
            )
        flags = [dataset.mask_flag_enums[i - 1] for i in range(1, bands + 1)]
        self.masked = any(flag.name != "all_valid" for band in flags for flag in band)

    @property
    def profile(self) -> dict[str, Any]:
        """The georeferencing an output takes from this raster: size, CRS and transform."""
        dataset = self.dataset
        return {"height": self.height, "width": self.width, "crs": dataset.crs, "transform": dataset.transform}

    def read(self, top: int, bottom: int) -> tuple[np.ndarray, np.ndarray | None]:
        from rasterio.windows import Window

        errors = rasterio_module().errors
        window = Window(0, top, self.width, bottom - top)
        try:
            pixels = np.ascontiguousarray(self.dataset.read(self._indexes, window=window).transpose(1, 2, 0))
            if not self.masked:
                return pixels, None
            with warnings.catch_warnings():  # a nodata value rules over a 4th band GDAL guessed to be alpha
                warnings.simplefilter("ignore", errors.NodataShadowWarning)
                return pixels, self.dataset.dataset_mask(window=window) > 0
        except errors.RasterioError as exc:
            raise UserError(
                f"predict: cannot read rows {top}-{bottom} of {self.path} ({exc}); the file is damaged or "
                "truncated: check it with gdalinfo -checksum, or write it again"
            ) from None

    def close(self) -> None:
        self.dataset.close()


class GeoTiffWriter:
    """Write ``bands`` uint8 bands of a ``height x width`` raster to ``path``, rows in order.

    ``profile`` gives the CRS and transform (:attr:`RasterSource.profile`). Where ``masked``
    (the input has nodata), invalid pixels get the value ``nodata``, or without one an internal
    GDAL mask; ``colours`` is an RGB palette for band 1. Call :meth:`write` with consecutive rows, then
    :meth:`close`; :meth:`abort` removes the partial file.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        profile: dict[str, Any],
        bands: int,
        *,
        nodata: int | None = None,
        masked: bool = False,
        colours: np.ndarray | None = None,
    ) -> None:
        self.path = Path(path)
        self._partial = self.path.with_name(self.path.name + ".partial")
        self._nodata = nodata
        self._pending: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._row = 0
        self._mask_band = masked and nodata is None
        self.height, self.width = profile["height"], profile["width"]
        options = {
            "driver": "GTiff", "dtype": "uint8", "count": bands, "tiled": True, "blockxsize": BLOCK,
            "blockysize": BLOCK, "compress": "deflate", "BIGTIFF": "IF_SAFER", "nodata": nodata, **profile,
        }  # fmt: skip
        self.dataset = _quiet_open(self._partial, "w", **options)
        if colours is not None:
            self.dataset.write_colormap(1, {i: tuple(int(c) for c in rgb) for i, rgb in enumerate(colours)})

    def write(self, rows: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Append ``rows`` (``[bands, n, width]`` uint8; ``[n, width]`` for one band)."""
        rows = rows[None] if rows.ndim == 2 else rows
        if valid is not None and self._nodata is not None:
            rows = np.where(valid, rows, np.uint8(self._nodata))
        self._pending.append((rows, valid))
        pending = sum(block.shape[1] for block, _ in self._pending)
        if pending >= BLOCK:
            self._flush(pending // BLOCK * BLOCK)

    def close(self) -> Path:
        """Write what is left, close, and move the finished file into place."""
        self._flush(sum(block.shape[1] for block, _ in self._pending))
        if self._row != self.height:
            self.abort()
            raise RuntimeError(f"{self.path}: {self._row} of {self.height} rows were written")
        self.dataset.close()
        os.replace(self._partial, self.path)
        return self.path

    def abort(self) -> None:
        """Close and remove the partial file."""
        self.dataset.close()
        self._partial.unlink(missing_ok=True)
        Path(str(self._partial) + ".msk").unlink(missing_ok=True)

    def _flush(self, rows: int) -> None:
        from rasterio.windows import Window

        if not rows:
            return
        pixels = np.concatenate([block for block, _ in self._pending], axis=1)
        valid = np.concatenate(
            [np.ones(block.shape[1:], bool) if v is None else v for block, v in self._pending]
        )
        window = Window(0, self._row, self.width, rows)
        self.dataset.write(pixels[:, :rows], window=window)
        if self._mask_band:
            self.dataset.write_mask(np.where(valid[:rows], 255, 0).astype(np.uint8), window=window)
        self._row += rows
        rest = pixels[:, rows:], valid[rows:]
        self._pending = [rest] if rest[0].shape[1] else []

"""The recipe's ``data:`` section: classes, label handling, sources and loaders.

Relative paths anywhere in this section (``root``, ``data_files``, ``images_dir``, ...) are
resolved against the current working directory of the process that reads them.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import Field, model_validator

from hooktrain.recipe.section import Section


class ShortestEdgeChoiceResize(Section):
    """MMSegmentation's ``RandomChoiceResize(scales, resize_type='ResizeShortestEdge', max_size)``
    (its Mask2Former configs): one of ``scales`` is drawn uniformly as the short edge's length; the
    long edge follows the aspect ratio, both shrunk so the long edge is at most ``max_size``; mmcv's
    keep-ratio Resize then rescales to that (width, height) target."""

    type: Literal["shortest_edge_choice"] = Field("shortest_edge_choice", description="Resize kind.")
    scales: list[int] = Field(
        min_length=1,
        description="Short-edge lengths to draw from, each with the same probability; MMSegmentation's "
        "Mask2Former ADE20K configs: [int(512 * x * 0.1) for x in range(5, 21)] = 256, 307, ..., 1024.",
    )
    max_size: int = Field(2048, ge=1, description="Longest edge allowed after the resize.")

    @model_validator(mode="after")
    def _positive_scales(self) -> "ShortestEdgeChoiceResize":
        if min(self.scales) < 1:
            raise ValueError(f"scales must be positive short-edge lengths, got {self.scales}")
        return self


class TrainPipelineConfig(Section):
    """The train-time augmentation of MMSegmentation's ADE20K pipeline."""

    scale: tuple[int, int] = Field(
        (2048, 512), description="RandomResize base scale as (long edge, short edge), mmseg order"
    )
    ratio_range: tuple[float, float] = Field(
        (0.5, 2.0), description="RandomResize multiplies `scale` by a ratio drawn uniformly from this range"
    )
    resize: ShortestEdgeChoiceResize | None = Field(
        None,
        description="null = RandomResize of `scale` and `ratio_range` (MMSegmentation's ADE20K pipeline); "
        "{type: shortest_edge_choice, scales: [...], max_size: 2048} = RandomChoiceResize with "
        "ResizeShortestEdge instead (its Mask2Former configs), and `scale` and `ratio_range` are unused",
    )
    crop_size: tuple[int, int] = Field(
        (512, 512), description="RandomCrop size as (height, width); smaller images are padded"
    )
    cat_max_ratio: float = Field(
        0.75, gt=0, le=1, description="retry a crop (up to 10 times) while one class covers at least "
        "this share of its labelled pixels; 1 disables"
    )
    flip_prob: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")
    photometric: bool = Field(True, description="apply mmseg's PhotoMetricDistortion to the crop")
    brightness_delta: float = Field(
        32, ge=0, le=255, description="brightness: add uniform(-delta, delta) with probability 0.5"
    )
    contrast_range: tuple[float, float] = Field(
        (0.5, 1.5), description="contrast: multiply by uniform(lo, hi) with probability 0.5"
    )
    saturation_range: tuple[float, float] = Field(
        (0.5, 1.5), description="saturation: multiply HSV saturation by uniform(lo, hi) with probability 0.5"
    )
    hue_delta: int = Field(
        18, ge=0, le=179, description="hue: add randint(-delta, delta) in OpenCV's 0-180 hue units with probability 0.5"
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> "TrainPipelineConfig":
        for name in ("ratio_range", "contrast_range", "saturation_range"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi or (name == "ratio_range" and lo == 0):
                raise ValueError(f"{name} must be (lo, hi) with 0 < lo <= hi, got ({lo}, {hi})")
        for name in ("scale", "crop_size"):
            if min(getattr(self, name)) < 1:
                raise ValueError(f"{name} must hold two positive integers, got {getattr(self, name)}")
        if self.resize is not None:
            if min(self.crop_size) > max(self.resize.scales):
                raise ValueError(
                    f"crop_size {tuple(self.crop_size)} is larger than any image the resize makes: its short "
                    f"edge is at most {max(self.resize.scales)} (resize.scales), so every crop would be padding "
                    "on one side; lower crop_size or raise resize.scales"
                )
            return self
        largest_short_side = min(self.scale) * self.ratio_range[1]
        if min(self.crop_size) > largest_short_side:
            raise ValueError(
                f"crop_size {tuple(self.crop_size)} is larger than any image RandomResize makes: scale "
                f"{tuple(self.scale)} times at most {self.ratio_range[1]} gives a short side of at most "
                f"{largest_short_side:g}, so every crop would be padding on one side; lower crop_size or "
                "raise scale"
            )
        return self


class ValPipelineConfig(Section):
    """The val/test-time resize of MMSegmentation's ADE20K pipeline."""

    scale: tuple[int, int] = Field(
        (2048, 512), description="resize keeping ratio to fit (long edge, short edge), mmseg order"
    )

    @model_validator(mode="after")
    def _check_scale(self) -> "ValPipelineConfig":
        if min(self.scale) < 1:
            raise ValueError(f"scale must hold two positive integers, got {self.scale}")
        return self


class _ColumnsMixin(Section):
    image_column: str = Field("image", description="Column holding the encoded image.")
    annotation_column: str = Field(
        "annotation", description="Column holding the encoded label mask (PNG, one channel)."
    )


class HubSource(_ColumnsMixin):
    """A dataset repository on the Hugging Face Hub (or a local directory laid out like one).

    ``HF_ENDPOINT`` points the client at another Hub-compatible server; ``HF_TOKEN`` gives
    access to gated and private repositories.
    """

    type: Literal["hub"] = Field("hub", description="Source kind.")
    path: str = Field(
        description="Hub repo id 'namespace/name' (e.g. 'zhoubolei/scene_parse_150') or a "
        "local directory."
    )
    name: str | None = Field(
        None,
        description="Configuration name declared by the repo's README. The Hub's parquet "
        "conversion (revision 'refs/convert/parquet') declares none: select its configuration "
        "with data_dir instead.",
    )
    revision: str | None = Field(
        None, description="Git revision: a branch, tag, commit or 'refs/convert/parquet'."
    )
    data_dir: str | None = Field(
        None,
        description="Only read files under this folder of the repo (e.g. 'scene_parsing' on "
        "'refs/convert/parquet').",
    )
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(
        None,
        description="Explicit files (paths or globs inside the repo, or full hf:// URLs), "
        "optionally per split as {split: files}; overrides the repo's own file layout.",
    )
    split: str = Field("train", description="Split to read.")
    streaming: bool = Field(
        True,
        description="Stream from the Hub (true) or download and cache the split once (false).",
    )


class ParquetSource(_ColumnsMixin):
    """Local parquet shards with encoded image and annotation columns."""

    type: Literal["parquet"] = Field("parquet", description="Source kind.")
    data_files: str | list[str] = Field(
        description="A glob or a list of globs/paths of parquet files (one file = one shard)."
    )
    split: str = Field("train", description="Name of the split (used in messages only).")


class FolderSource(Section):
    """Image files and their annotation PNGs on disk, paired the way MMSegmentation pairs them.

    Where the files are: ``root`` + ``split`` (the ADEChallengeData2016 layout
    ``root/images/<split>/`` + ``root/annotations/<split>/``), or ``images_dir`` and
    ``annotations_dir`` (relative to ``root`` when it is set, else to the working directory),
    e.g. ``root: data/cityscapes, images_dir: leftImg8bit/train, annotations_dir: gtFine/train``.

    How they pair: the image ``<images_dir>/<name><img_suffix>`` goes with the annotation
    ``<annotations_dir>/<name><seg_map_suffix>``, where ``<name>`` may include sub-folders
    (``aachen/aachen_000000_000019``; the directories are searched recursively). Without
    ``split_file`` every image under ``images_dir`` is used, sorted by name, and an image or
    annotation without its partner is an error. With ``split_file`` (a text file of names, one
    per line, as VOC's ``ImageSets/Segmentation/train.txt``) exactly the listed names are used,
    in the file's order. Several split files are read one after the other; with as many
    ``annotations_dir`` entries, the i-th file's annotations come from the i-th directory
    (mmseg's VOC aug: ``train.txt`` over SegmentationClass + ``aug.txt`` over
    SegmentationClassAug).
    """

    type: Literal["folder"] = Field("folder", description="Source kind.")
    root: str | None = Field(
        None,
        description="Dataset root; images_dir, annotations_dir and split_file are relative to "
        "it. Alone (with split): the ADEChallengeData2016 layout images/<split>/ + "
        "annotations/<split>/.",
    )
    split: str = Field(
        "training",
        description="Sub-directory of root/images/ and root/annotations/ (when images_dir or "
        "annotations_dir is not set).",
    )
    images_dir: str | None = Field(
        None, description="Directory of images (relative to root when root is set)."
    )
    annotations_dir: str | list[str] | None = Field(
        None,
        description="Directory of annotation PNGs (relative to root when root is set); a list "
        "gives one directory per split_file entry.",
    )
    img_suffix: str | None = Field(
        None,
        description="End of every image file name, e.g. '_leftImg8bit.png' or '.jpg'; null = "
        "any of .jpg .jpeg .png .bmp .tif .tiff .webp .npy.",
    )
    seg_map_suffix: str = Field(
        ".png",
        description="End of every annotation file name, e.g. '_gtFine_labelIds.png'; the "
        "name before it must equal the image's name before img_suffix.",
    )
    split_file: str | list[str] | None = Field(
        None,
        description="Text file(s) of names to use, one per line, without suffixes (relative "
        "to root when root is set); null = every image found.",
    )
    recursive: bool = Field(
        True,
        description="Search images_dir and annotations_dir recursively (Cityscapes' city "
        "folders); names then include the sub-folders.",
    )
    num_shards: int = Field(
        64, ge=1, description="Shards the file list is cut into (units of shuffling and splitting)."
    )

    @model_validator(mode="after")
    def _dirs_given(self) -> FolderSource:
        if self.root is None and (self.images_dir is None or self.annotations_dir is None):
            raise ValueError("set either root (with split) or both images_dir and annotations_dir")
        for key in ("img_suffix", "seg_map_suffix"):
            if getattr(self, key) == "":
                raise ValueError(f"{key} must not be empty; use null for the default")
        if isinstance(self.annotations_dir, list):
            files = self.split_file if isinstance(self.split_file, list) else None
            if not self.annotations_dir or files is None or len(files) != len(self.annotations_dir):
                raise ValueError(
                    f"annotations_dir lists {len(self.annotations_dir)} directories, so "
                    "split_file must list as many files (the i-th file's annotations are in "
                    "the i-th directory); or give one annotations_dir"
                )
        if isinstance(self.split_file, list) and not self.split_file:
            raise ValueError("split_file is an empty list; give at least one file, or null")
        return self


class ShapesSource(Section):
    """The procedural shapes dataset, generated into ``root`` by ``prepare_data``."""

    type: Literal["shapes"] = Field("shapes", description="Source kind.")
    root: str = Field("data/shapes", description="Directory the dataset is generated into.")
    split: Literal["train", "validation"] = Field("train", description="Split to read.")
    num_train: int = Field(2000, ge=1, description="Training images to generate.")
    num_val: int = Field(200, ge=1, description="Validation images to generate.")
    image_size: int = Field(128, ge=32, description="Side of the square images in pixels.")
    train_shards: int = Field(8, ge=1, description="Parquet files of the training split.")
    val_shards: int = Field(2, ge=1, description="Parquet files of the validation split.")
    seed: int = Field(0, description="Seed of the generator (the dataset is a function of it).")
    bands: int = Field(
        3,
        ge=1,
        description="Channels of the images: 3 RGB; 1 grey; 2 grey + NIR; 4 or more RGB + NIR bands in "
        "which the shapes are bright (set data.in_channels to match).",
    )
    bit_depth: Literal[8, 16] = Field(
        8, description="Bits per value: 8, or 16 (values 0..65535, stored as 16-bit PNG or TIFF)."
    )


Source = Annotated[
    HubSource | ParquetSource | FolderSource | ShapesSource, Field(discriminator="type")
]


class TrainDataConfig(Section):
    """The training stream."""

    source: Source = Field(description="Where the training examples come from.")
    batch_size: int = Field(8, ge=1, description="Examples per batch, per process.")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes per process.")
    shuffle_buffer: int = Field(
        512, ge=1, description="Examples per shuffle window (each window is fully permuted)."
    )
    prefetch_factor: int = Field(2, ge=1, description="Batches each worker prepares ahead.")
    pin_memory: bool = Field(
        True,
        description="On CUDA, batches wait in page-locked memory, so their copy to the GPU runs asynchronously "
        "(DataLoader pin_memory). No effect on other devices.",
    )
    pipeline: TrainPipelineConfig = Field(
        default_factory=TrainPipelineConfig, description="Training augmentation pipeline."
    )
    gpu_augment: bool = Field(
        False,
        description="Workers only decode, resize, crop, flip and pad, handing over uint8 images and each "
        "image's PhotoMetricDistortion draws; the distortion and the normalisation run batched on the "
        "training device (the CPU path's draws; its pixels within one uint8 step of OpenCV's per saturation or hue "
        "step, bit for bit in the pixels OpenCV's AVX2/AVX-512 vector loop converts). 8-bit images only.",
    )


class ValDataConfig(Section):
    """The validation loader."""

    source: Source = Field(description="Where the validation examples come from.")
    batch_size: int = Field(1, ge=1, description="Examples per batch, per process.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per process.")
    pipeline: ValPipelineConfig = Field(
        default_factory=ValPipelineConfig, description="Validation resize pipeline."
    )


def default_palette(num_classes: int) -> list[list[int]]:
    """A deterministic palette: the same colours for the same number of classes."""
    colours = np.random.default_rng(42).integers(0, 256, size=(num_classes, 3))
    return colours.tolist()


class DataConfig(Section):
    """The recipe's ``data:`` section."""

    num_classes: int = Field(
        description="Number of scored classes (mask values 0..num_classes-1); 1 = binary "
        "segmentation: masks of 0 (background) and 1 (foreground), one sigmoid output channel."
    )
    class_names: list[str] | None = Field(
        None,
        description="One name per class; defaults to class_0, class_1, ... Binary: the "
        "foreground's name, or [background, foreground].",
    )
    palette: list[list[int]] | None = Field(
        None, description="One [r, g, b] per class for visualisation; default generated."
    )
    ignore_index: int = Field(255, description="Mask value excluded from loss and metrics.")
    reduce_zero_label: bool = Field(
        False, description="Map label 0 to ignore and shift the others down by one (ADE20K)."
    )
    label_map: dict[int, int] = Field(
        default_factory=dict, description="Remap raw mask values before anything else."
    )
    out_of_range: Literal["error", "ignore"] = Field(
        "error",
        description="Mask values >= num_classes (and not ignore_index): stop with an error "
        "or treat them as ignore_index.",
    )
    max_corrupt: int = Field(
        10, ge=0, description="Undecodable images skipped per process before the run stops."
    )
    retry_budget_s: float = Field(
        300, ge=0, description="How long the data's server (the Hub) may fail before the run saves its "
        "last whole iteration and exits with 75; reads are retried with backoff until then, exactly "
        "where they left off (docs/checkpoints.md, Faults).",
    )
    mask_scale: int = Field(
        1,
        ge=1,
        description="Binary only: the mask value that means foreground (1, or 255 for 0/255 masks).",
    )
    in_channels: int = Field(
        3, ge=1, description="Channels of every image: 3 (RGB), 1 (grayscale), 4 or more (multispectral)."
    )
    mean: tuple[float, ...] = Field(
        (123.675, 116.28, 103.53),
        description="Per-channel mean, one per in_channels, in the data's units (0-255 for 8-bit, "
        "0-65535 for 16-bit images).",
    )
    std: tuple[float, ...] = Field(
        (58.395, 57.12, 57.375), description="Per-channel std, one per in_channels, in the data's units."
    )
    train: TrainDataConfig = Field(description="The training stream.")
    val: ValDataConfig | None = Field(None, description="The validation loader (optional).")

    @model_validator(mode="after")
    def _check_classes(self) -> DataConfig:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {self.num_classes}")
        if self.class_names is not None and len(self.class_names) not in {self.num_classes, self.num_labels}:
            raise ValueError(
                f"class_names has {len(self.class_names)} names but num_classes is "
                f"{self.num_classes}; give one name per class"
                + (" (binary: the foreground's name, or [background, foreground])" if self.binary else "")
            )
        if self.palette is not None:
            if len(self.palette) != self.num_labels:
                raise ValueError(
                    f"palette has {len(self.palette)} colours but num_classes is "
                    f"{self.num_classes}; give one [r, g, b] per "
                    + ("label (binary: background, foreground)" if self.binary else "class")
                    + " or drop palette"
                )
            bad = [c for c in self.palette if len(c) != 3 or not all(0 <= v <= 255 for v in c)]
            if bad:
                raise ValueError(f"palette colours must be [r, g, b] in 0..255, got {bad[0]}")
        if self.mask_scale != 1 and not self.binary:
            raise ValueError(
                f"mask_scale is {self.mask_scale} but num_classes is {self.num_classes}; mask_scale is for "
                "binary masks (num_classes: 1): drop it, or set num_classes: 1"
            )
        if self.binary and self.mask_scale == self.ignore_index:
            raise ValueError(
                f"mask_scale {self.mask_scale} is also ignore_index, so foreground and ignored pixels "
                "cannot be told apart; set ignore_index to a value the masks never hold, e.g. 254"
            )
        for key in ("mean", "std"):
            values = getattr(self, key)
            if len(values) != self.in_channels:
                raise ValueError(
                    f"{key} has {len(values)} values but in_channels is {self.in_channels}; give one "
                    f"{key} per channel, in the data's units (0-255 for 8-bit, 0-65535 for 16-bit images)"
                )
        if min(self.std) <= 0:
            raise ValueError(f"std must be > 0 for every channel, got {list(self.std)}")
        return self

    @model_validator(mode="after")
    def _check_shapes_bands(self) -> DataConfig:
        for split in ("train", "val"):
            section = getattr(self, split)
            source = section.source if section is not None else None
            if isinstance(source, ShapesSource) and source.bands != self.in_channels:
                raise ValueError(
                    f"data.{split}.source.bands is {source.bands} but in_channels is {self.in_channels}; "
                    f"set data.in_channels: {source.bands} (with one mean / std value per band) or bands: "
                    f"{self.in_channels}"
                )
        return self

    @model_validator(mode="after")
    def _check_gpu_augment(self) -> DataConfig:
        source = self.train.source
        if self.train.gpu_augment and isinstance(source, ShapesSource) and source.bit_depth == 16:
            raise ValueError(
                "data.train.gpu_augment works on 8-bit images, but data.train.source.bit_depth is 16; "
                "set gpu_augment: false"
            )
        return self

    @model_validator(mode="after")
    def _check_photometric(self) -> DataConfig:
        if self.train.pipeline.photometric and self.in_channels < 3:
            raise ValueError(
                "data.train.pipeline.photometric: mmseg's PhotoMetricDistortion works on 8-bit RGB, but "
                f"in_channels is {self.in_channels}; set photometric: false"
            )
        return self

    @property
    def binary(self) -> bool:
        """Binary segmentation: ``num_classes`` 1, one sigmoid channel, masks of 0 and 1."""
        return self.num_classes == 1

    @property
    def num_labels(self) -> int:
        """Mask values that are scored: ``num_classes``, or 2 (background, foreground) when binary.

        Metrics, confusion matrices, palettes and class names count these; the model's output
        channels count ``num_classes``.
        """
        return 2 if self.binary else self.num_classes

    @property
    def names(self) -> list[str]:
        """One name per label (generated when the recipe gives none; binary: background first)."""
        if self.binary:
            names = self.class_names or ["foreground"]
            return ["background", *names] if len(names) == 1 else list(names)
        return self.class_names or [f"class_{i}" for i in range(self.num_classes)]

    @property
    def colours(self) -> list[list[int]]:
        """One colour per label (generated when the recipe gives none; binary: black, white)."""
        if self.palette is None and self.binary:
            return [[0, 0, 0], [255, 255, 255]]
        return self.palette or default_palette(self.num_classes)

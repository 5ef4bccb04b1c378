"""The recipe's ``model:`` section: encoder, decode head, auxiliary head, losses, inference."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import Field, field_validator, model_validator

from hooktrain.recipe.mask_heads import MASK_CLASSIFICATION_HEADS, EoMTHeadConfig, Mask2FormerHeadConfig
from hooktrain.recipe.section import Section


class EncoderConfig(Section):
    """A timm backbone used as a multi-level feature extractor (``features_only=True``)."""

    name: str = Field("resnet50", description="timm model name, e.g. resnet50, convnext_tiny, pvt_v2_b0.")
    pretrained: bool = Field(
        False, description="Load timm's default pretrained weights (from the Hugging Face Hub or its cache)."
    )
    pretrained_path: str | None = Field(
        None,
        description="Local .safetensors or torch checkpoint to load into the encoder (a timm model's "
        "state_dict, possibly under 'state_dict'/'model'), or hf://OWNER/NAME[@REVISION]: the encoder of a "
        "model shared with `hooktrain push`; takes precedence over `pretrained`.",
    )
    out_indices: list[int] | None = Field(
        None,
        description="Feature levels the encoder returns (timm out_indices; negative counts from the end). "
        "null = the last four levels, usually strides 4, 8, 16, 32.",
    )
    drop_path_rate: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="Stochastic depth rate, passed to timm; null = the timm model's own default (0 for most, "
        "0.1 for Swin).",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra keyword arguments for timm.create_model, e.g. {output_stride: 8} for a dilated ResNet.",
    )
    out_norm: Literal["layer_norm"] | None = Field(
        None,
        description="A LayerNorm over the channels of each returned level, as MMSegmentation's Swin and "
        "mmpretrain's ConvNeXt (norm0..norm3) and transformers' backbones (hidden_states_norms) add; "
        "null = none.",
    )
    out_norm_eps: float = Field(1e-6, gt=0, description="Epsilon of the out_norm LayerNorms.")
    frozen: bool = Field(
        False,
        description="Train the heads only: the encoder's parameters get no gradients and stay out of the "
        "optimizer (a linear probe, as DINOv2's linear evaluation). BatchNorm statistics inside a frozen "
        "encoder still update in training.",
    )
    frozen_norms: bool = Field(
        False,
        description="The encoder's normalisation layers (BatchNorm, GroupNorm, LayerNorm) keep their affine weight "
        "and bias as loaded: no gradients, out of the optimizer (MMSegmentation's norm_cfg requires_grad=False, "
        "as its Mask2Former ResNet configs set); BatchNorm running statistics still update in training "
        "(norm_eval=False).",
    )
    grad_checkpointing: bool = Field(
        False,
        description="Recompute the encoder's blocks in the backward pass instead of keeping their "
        "activations (timm's set_grad_checkpointing): less memory, slower steps.",
    )
    intermediate_norm: bool = Field(
        False,
        description="ViT encoders: apply the final LayerNorm to every returned block's tokens "
        "(DINOv2's get_intermediate_layers(norm=True)); false = raw block outputs (MMSegmentation's ViT).",
    )
    class_token: bool = Field(
        False,
        description="ViT encoders: append the class token to each level's map, broadcast over it, as extra "
        "channels (DINOv2's linear head with the class token); register tokens are always dropped.",
    )
    norm_eps: float | None = Field(
        None,
        gt=0,
        description="ViT encoders: the eps of every LayerNorm (e.g. a transformers checkpoint's layer_norm_eps); "
        "null = the timm model's own.",
    )
    patch_bias: bool = Field(
        True,
        description="ViT encoders: a bias in the patch embedding's convolution. MMSegmentation's "
        "VisionTransformer has none (patch_bias=False; a pretrained bias is dropped, as mmseg drops it).",
    )
    pos_embed_resize: Literal["timm", "mmseg"] = Field(
        "timm",
        description="ViT encoders: how position embeddings are resized to another grid: timm's bicubic "
        "with antialiasing, or MMSegmentation's VisionTransformer's bicubic without it.",
    )


class CrossEntropyLossConfig(Section):
    """Pixel-wise cross-entropy (mmseg ``CrossEntropyLoss``); logged as ``loss_ce``."""

    type: Literal["cross_entropy"] = Field("cross_entropy", description="Loss kind.")
    weight: float = Field(1.0, ge=0.0, description="Multiplier applied to this term (mmseg loss_weight).")
    class_weight: list[float] | None = Field(
        None, description="Per-class weights, one per class; null = all classes weigh 1."
    )
    avg_non_ignore: bool = Field(
        True,
        description="Average over non-ignored pixels (true) or over all pixels, ignored ones counting 0 (false).",
    )


class DiceLossConfig(Section):
    """Soft Dice loss on softmax probabilities (mmseg ``DiceLoss``); logged as ``loss_dice``."""

    type: Literal["dice"] = Field("dice", description="Loss kind.")
    weight: float = Field(1.0, ge=0.0, description="Multiplier applied to this term (mmseg loss_weight).")
    class_weight: list[float] | None = Field(
        None, description="Per-class weights of the per-class Dice terms; null = all classes weigh 1."
    )
    smooth: float = Field(1.0, ge=0.0, description="Smoothing added to numerator and denominator.")
    exponent: int = Field(2, ge=1, description="Exponent of the denominator terms.")


LossConfig = Annotated[Union[CrossEntropyLossConfig, DiceLossConfig], Field(discriminator="type")]


class OhemConfig(Section):
    """Online hard example mining of pixels (mmseg ``OHEMPixelSampler``) for the decode head's losses."""

    type: Literal["ohem"] = Field("ohem", description="Sampler kind.")
    thresh: float | None = Field(
        0.7,
        gt=0.0,
        le=1.0,
        description="Keep pixels whose predicted probability of the true class is below this; "
        "null = keep the `min_kept` pixels with the highest loss.",
    )
    min_kept: int = Field(100000, ge=1, description="Pixels kept at least, per image.")


def _default_losses(weight: float) -> list:
    return [CrossEntropyLossConfig(weight=weight)]


class _HeadCommon(Section):
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout2d probability before the classifier.")
    align_corners: bool = Field(
        False, description="align_corners of every bilinear resize of this head, its losses and inference."
    )
    losses: list[LossConfig] = Field(
        default_factory=lambda: _default_losses(1.0),
        min_length=1,
        description="Loss terms on this head's logits, each logged as '<head>.loss_<kind>'.",
    )
    sampler: OhemConfig | None = Field(None, description="Pixel sampler for the cross-entropy terms; null = none.")

    @field_validator("losses")
    @classmethod
    def _unique_loss_kinds(cls, losses: list) -> list:
        kinds = [loss.type for loss in losses]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"each loss type may appear once per head, got {kinds}")
        return losses


class _HeadBase(_HeadCommon):
    channels: int = Field(256, ge=1, description="Width of the head's convolutions.")


class _MultiLevelHead(_HeadBase):
    in_index: list[int] | None = Field(
        None, description="Encoder levels fed to the head (indices into its outputs); null = all of them."
    )


class FCNHeadConfig(_HeadBase):
    """FCN head (mmseg ``FCNHead``): a stack of 3x3 ConvModules on one level, then the classifier."""

    type: Literal["fcn"] = Field("fcn", description="Head kind.")
    in_index: int = Field(-1, description="Encoder level the head reads (index into its outputs).")
    num_convs: int = Field(2, ge=0, description="Number of 3x3 ConvModules.")
    concat_input: bool = Field(
        True, description="Concatenate the input with the conv output and fuse by a 3x3 ConvModule."
    )


class FPNHeadConfig(_MultiLevelHead):
    """Semantic FPN (mmseg ``FPN`` neck + ``FPNHead``)."""

    type: Literal["fpn"] = Field("fpn", description="Head kind.")
    channels: int = Field(128, ge=1, description="Width of the scale heads.")
    fpn_channels: int = Field(256, ge=1, description="Width of the FPN neck's lateral and output convs.")


class UPerHeadConfig(_MultiLevelHead):
    """UPerNet head (mmseg ``UPerHead``): PPM on the last level + FPN, fused by concat and a 3x3 conv."""

    type: Literal["upernet"] = Field("upernet", description="Head kind.")
    channels: int = Field(512, ge=1, description="Width of the PPM, FPN and fusion convolutions.")
    pool_scales: list[int] = Field([1, 2, 3, 6], min_length=1, description="PPM adaptive pooling sizes.")


class PSPHeadConfig(_HeadBase):
    """PSPNet head (mmseg ``PSPHead``): pyramid pooling on one level, then a 3x3 ConvModule."""

    type: Literal["psp"] = Field("psp", description="Head kind.")
    in_index: int = Field(-1, description="Encoder level the head reads (index into its outputs).")
    channels: int = Field(512, ge=1, description="Width of the pooling branches and the bottleneck.")
    pool_scales: list[int] = Field([1, 2, 3, 6], min_length=1, description="Adaptive pooling output sizes.")


class ASPPHeadConfig(_HeadBase):
    """DeepLabV3 head (mmseg ``ASPPHead``): image pooling + atrous convolutions, then a 3x3 ConvModule."""

    type: Literal["aspp"] = Field("aspp", description="Head kind.")
    in_index: int = Field(-1, description="Encoder level the head reads (index into its outputs).")
    channels: int = Field(512, ge=1, description="Width of every branch and of the bottleneck.")
    dilations: list[int] = Field(
        [1, 12, 24, 36], min_length=1, description="Dilation of each branch; 1 is a 1x1 conv, others 3x3."
    )


class SepASPPHeadConfig(ASPPHeadConfig):
    """DeepLabV3+ head (mmseg ``DepthwiseSeparableASPPHead``): ASPP with depthwise-separable 3x3
    branches, fused with a 48-channel projection of a fine level by two separable 3x3 convs."""

    type: Literal["sep_aspp"] = Field("sep_aspp", description="Head kind.")
    c1_index: int = Field(0, description="Fine encoder level fused with the ASPP output (mmseg uses inputs[0]).")
    c1_channels: int = Field(48, ge=1, description="Width of the fine level's 1x1 projection.")


class SegformerHeadConfig(_MultiLevelHead):
    """SegFormer head as MMSegmentation has it (``SegformerHead``): per level a 1x1 ConvModule
    (conv + BN + ReLU), upsample to the finest level, concat c1..c4, 1x1 ConvModule fusion."""

    type: Literal["segformer"] = Field("segformer", description="Head kind.")


class SegformerMLPHeadConfig(_MultiLevelHead):
    """SegFormer head as NVlabs and transformers have it: per level a linear projection (no norm),
    upsample to the finest level, concat c4..c1, 1x1 conv + BN + ReLU fusion."""

    type: Literal["segformer_mlp"] = Field("segformer_mlp", description="Head kind.")


class UNetHeadConfig(_HeadCommon):
    """U-Net decoder as segmentation_models_pytorch's ``Unet`` has it: from the deepest level,
    per block upsample (to the next level's size, else x2), concatenate that level (the skip),
    then two 3x3 conv-BN-ReLU; after the last skip, blocks without one climb to the image's
    size. A 3x3 convolution gives the logits. Works on any encoder whose levels halve in
    stride (resnet*, convnext*, swin*, efficientnet*, ...)."""

    type: Literal["unet"] = Field("unet", description="Head kind.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout2d probability before the classifier (smp: none).")
    decoder_channels: list[int] = Field(
        [256, 128, 64, 32, 16],
        min_length=1,
        description="Width of each decoder block, deepest first (smp's decoder_channels); one block per entry.",
    )
    attention: Literal["scse"] | None = Field(
        None, description="scSE attention on each block's concatenated input and output (smp's decoder_attention_type)."
    )
    center: bool = Field(False, description="Two 3x3 conv-BN-ReLU on the deepest level first (smp's add_center_block).")
    interpolation: Literal["nearest", "bilinear"] = Field(
        "nearest", description="How each block upsamples (smp's decoder_interpolation)."
    )


class LinearHeadConfig(_HeadCommon):
    """DINOv2's linear segmentation head (its ``BNHead``): the selected levels resized to the first
    one's size and concatenated, then BatchNorm and the 1x1 classifier. On a ViT encoder with
    ``out_indices`` of the last N blocks (and ``class_token``) this is DINOv2's linear probe."""

    type: Literal["linear"] = Field("linear", description="Head kind.")
    in_index: list[int] | None = Field(
        None, description="Encoder levels fed to the head (indices into its outputs); null = all of them."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout2d probability before the classifier.")


HeadConfig = Annotated[
    Union[
        FCNHeadConfig,
        FPNHeadConfig,
        UPerHeadConfig,
        PSPHeadConfig,
        ASPPHeadConfig,
        SepASPPHeadConfig,
        SegformerHeadConfig,
        SegformerMLPHeadConfig,
        UNetHeadConfig,
        LinearHeadConfig,
        EoMTHeadConfig,
        Mask2FormerHeadConfig,
    ],
    Field(discriminator="type"),
]


class MultiLevelNeckConfig(Section):
    """MMSegmentation's ``MultiLevelNeck`` (ViT-UPerNet): per level a 1x1 conv to ``out_channels``,
    a bilinear rescale by ``scales[i]`` and a 3x3 conv, turning one-stride ViT maps into a pyramid."""

    type: Literal["multilevel"] = Field("multilevel", description="Neck kind.")
    out_channels: int = Field(768, ge=1, description="Width of every output level.")
    scales: list[float] = Field(
        default_factory=lambda: [4.0, 2.0, 1.0, 0.5],
        min_length=1,
        description="Scale factor of each output level; [4, 2, 1, 0.5] turns stride 16 into strides 4, 8, 16, 32.",
    )

    @field_validator("scales")
    @classmethod
    def _positive(cls, scales: list[float]) -> list[float]:
        if min(scales) <= 0:
            raise ValueError(f"{scales} has a factor <= 0; give factors > 0, e.g. [4, 2, 1, 0.5]")
        return scales


class AuxHeadConfig(FCNHeadConfig):
    """Auxiliary FCN head on an intermediate level; used for training only."""

    in_index: int = Field(2, description="Encoder level the head reads (index into its outputs).")
    num_convs: int = Field(1, ge=0, description="Number of 3x3 ConvModules.")
    concat_input: bool = Field(
        False, description="Concatenate the input with the conv output and fuse by a 3x3 ConvModule."
    )
    losses: list[LossConfig] = Field(
        default_factory=lambda: _default_losses(0.4),
        min_length=1,
        description="Loss terms on the auxiliary logits, each logged as 'aux.loss_<kind>'.",
    )


class InferenceConfig(Section):
    """How ``Segmentor.predict`` turns an image into class scores (and binary scores into labels).

    With neither ``scales`` nor ``flip`` the prediction is the logits of the val pipeline's
    image. Otherwise it is test-time augmentation as MMSegmentation 1.x's ``SegTTAModel``:
    each variant's logits are resized to the original size and turned into probabilities
    (softmax; sigmoid for one class), and the prediction is their mean.
    """

    # MMSegmentation's ADE20K tta_pipeline (img_ratios), used by `hooktrain test --tta`.
    MMSEG_SCALES: ClassVar[tuple[float, ...]] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)

    mode: Literal["whole", "slide"] = Field("whole", description="Whole image at once, or sliding windows.")
    crop_size: tuple[int, int] = Field((512, 512), description="Slide window size (h, w).")
    stride: tuple[int, int] = Field((341, 341), description="Slide window stride (h, w).")
    blend: Literal["mean", "hann", "gaussian", "center"] = Field(
        "mean",
        description="How overlapping slide windows (and `hooktrain predict`'s raster tiles) are blended: mean "
        "(MMSegmentation's plain average), hann or gaussian (smooth weights falling off toward each window's "
        "edges), or center (each pixel from the window whose centre is nearest).",
    )
    flip: bool = Field(
        False,
        description="Also predict the horizontally flipped image (of every scale) and average the "
        "probabilities, as MMSegmentation's TTA does.",
    )
    scales: list[float] | None = Field(
        None,
        description="Multi-scale test: resize the original image by each factor (mmcv "
        "Resize(scale_factor, keep_ratio=True)) instead of to data.val.pipeline.scale, and average "
        "the probabilities, e.g. [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]; null = one scale.",
    )
    size_divisor: int | None = Field(
        None,
        ge=1,
        description="Pad each image (after any flip, before whole or slide inference) at the bottom and right "
        "with 0 after normalisation to a multiple of this, and crop the scores back to the image: "
        "MMSegmentation's data_preprocessor test_cfg=dict(size_divisor=...) (its Mask2Former configs: 32); "
        "null = no padding.",
    )
    threshold: float = Field(
        0.5,
        gt=0.0,
        lt=1.0,
        description="Binary segmentation (one output channel): a pixel is foreground where its "
        "sigmoid probability exceeds this (mmseg's decode_head.threshold).",
    )

    @field_validator("scales")
    @classmethod
    def _positive_scales(cls, scales: list[float] | None) -> list[float] | None:
        if scales is not None and (not scales or min(scales) <= 0):
            raise ValueError(
                f"{scales} is not a list of factors > 0; give e.g. [0.5, 0.75, 1.0, 1.25, 1.5, 1.75], "
                "or null for one scale"
            )
        return scales

    @model_validator(mode="after")
    def _positive_windows(self) -> InferenceConfig:
        if min(*self.crop_size, *self.stride) < 1:
            raise ValueError(f"crop_size {self.crop_size} and stride {self.stride} must be positive")
        return self

    def with_tta(self) -> InferenceConfig:
        """This config with MMSegmentation's test-time augmentation: its ``scales`` (or
        :attr:`MMSEG_SCALES` when null) and ``flip``."""
        return self.model_copy(update={"scales": list(self.scales or self.MMSEG_SCALES), "flip": True})


class ModelConfig(Section):
    """The recipe's ``model:`` section."""

    encoder: EncoderConfig = Field(default_factory=EncoderConfig, description="timm backbone.")
    neck: MultiLevelNeckConfig | None = Field(
        None, description="Between the encoder and the heads: MultiLevelNeck for ViT encoders; null = none."
    )
    decode_head: HeadConfig = Field(default_factory=FPNHeadConfig, description="Main decode head.")
    aux_head: AuxHeadConfig | None = Field(None, description="Auxiliary FCN head (training only); null = none.")
    inference: InferenceConfig = Field(default_factory=InferenceConfig, description="Prediction mode.")
    channels_last: bool = Field(False, description="Use channels_last memory format for model and inputs.")
    compile: bool = Field(
        False,
        description="torch.compile the training step's forward (encoder, heads, logits upsampling, losses) and "
        "the inference logits, each as one function. Parameter names and checkpoints stay the eager model's.",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default",
        description="torch.compile mode with model.compile: true. reduce-overhead (and max-autotune) replay the "
        "training step as CUDA graphs, which needs static shapes (a fixed crop and batch, as the train stream "
        "gives) and CUDA; inference then compiles without CUDA graphs, since image sizes vary.",
    )

    @model_validator(mode="after")
    def _mask_classification_alone(self) -> ModelConfig:
        if self.decode_head.type not in MASK_CLASSIFICATION_HEADS:
            return self
        extras = {"aux_head": self.aux_head, "neck": self.neck, "encoder.out_indices": self.encoder.out_indices}
        for key, value in extras.items():
            if value is not None:
                reads = "tokens" if self.decode_head.type == "eomt" else "last four levels"
                raise ValueError(
                    f"model.{key} does not apply to decode_head type {self.decode_head.type}, which reads the "
                    f"encoder's {reads} and trains with its own criterion; set model.{key}: null"
                )
        return self

    @model_validator(mode="after")
    def _mode_needs_compile(self) -> ModelConfig:
        if self.compile_mode != "default" and not self.compile:
            raise ValueError(
                f"compile_mode {self.compile_mode!r} only applies to a compiled model; set model.compile: true "
                "as well, or drop model.compile_mode"
            )
        return self

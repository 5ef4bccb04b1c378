"""EoMT (Kerssies et al., "Your ViT is Secretly an Image Segmentation Model", CVPR 2025) on a timm ViT.

The ViT's last ``num_blocks`` blocks also carry ``num_queries`` learned query tokens. Before each of
those blocks the queries predict a class and a mask; in the block, each query attends only to the
patches its mask covers (masked attention, annealed away during training through
``attn_mask_probs``). The final prediction comes from the encoder's output. Numerically this is
transformers' ``EomtForUniversalSegmentation`` (DINOv2 with registers, timm ``VisionTransformer``)
and ``EomtDinov3ForUniversalSegmentation`` (DINOv3 with RoPE, timm ``Eva``); their checkpoints
convert in :mod:`hooktrain.models.eomt_keys`.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from hooktrain.errors import UserError
from hooktrain.models.encoder import build_encoder
from hooktrain.models.mask_classifier import MaskClassifier, build_criterion
from hooktrain.models.mask_criterion import MaskClassificationLoss
from hooktrain.models.vit import is_vit
from hooktrain.recipe.mask_heads import MaskAnnealingConfig
from hooktrain.recipe.model import InferenceConfig, ModelConfig

Prediction = tuple[torch.Tensor, torch.Tensor]
"""``(mask_logits [B, Q, h, w], class_logits [B, Q, num_classes + 1])``; the last class is "no object"."""


class MaskHead(nn.Module):
    """The queries' mask embeddings: three linear layers, the activation after the first two."""

    def __init__(self, dim: int, act_layer: Callable[[], nn.Module]):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.fc3 = nn.Linear(dim, dim)
        self.act = act_layer()

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(queries)))))


class UpscaleBlock(nn.Module):
    """Doubles a feature map's resolution: 2x2 transposed convolution (stride 2), activation,
    depthwise 3x3 convolution, LayerNorm over the channels."""

    def __init__(self, dim: int, act_layer: Callable[[], nn.Module]):
        super().__init__()
        self.upsample = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
        self.act = act_layer()
        self.depthwise = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False)
        self.norm = LayerNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.depthwise(self.act(self.upsample(x))))


class EoMT(MaskClassifier):
    """EoMT on ``vit``, a whole timm ``VisionTransformer`` or ``Eva`` built with ``dynamic_img_size=True``.

    The ViT is kept as ``self.encoder``, so its parameters keep timm's names (``encoder.blocks.N...``)
    and timm's pretrained weights load into it. :meth:`predictions` returns one :data:`Prediction` per
    block run with masked attention (in training, all ``num_blocks``; in eval, those whose
    ``attn_mask_probs`` entry is above 0), then the final one. Masks are at ``2 ** num_upscale_blocks``
    times the token grid; the image's sides must be multiples of the patch size (or the ViT built with
    ``dynamic_img_pad``). ``act_layer`` (the heads' activation) defaults to the encoder MLP's.

    ``annealing`` is the model's own schedule of ``attn_mask_probs`` (:meth:`schedule`, which the
    runner calls before every iteration); without it the probabilities stay as they are (1: the
    blocks always mask). A probability strictly between 0 and 1 lifts a random share of the masks,
    in evaluation too, as EoMT's and transformers' code do.
    """

    def __init__(
        self,
        vit: nn.Module,
        num_classes: int,
        *,
        num_queries: int = 100,
        num_blocks: int = 4,
        num_upscale_blocks: int = 2,
        act_layer: Callable[[], nn.Module] | None = None,
        criterion: MaskClassificationLoss | None = None,
        annealing: MaskAnnealingConfig | None = None,
        ignore_index: int = 255,
        inference: InferenceConfig | None = None,
        channels_last: bool = False,
    ):
        super().__init__(
            criterion or MaskClassificationLoss(num_classes),
            ignore_index=ignore_index,
            inference=inference,
            channels_last=channels_last,
        )
        _check_vit(vit, num_blocks)
        self.encoder = vit
        self.num_queries = num_queries
        self.num_blocks = num_blocks
        self.annealing = annealing
        dim = vit.embed_dim
        if act_layer is None:
            act_layer = functools.partial(copy.deepcopy, vit.blocks[-1].mlp.act)
        self.query = nn.Embedding(num_queries, dim)
        self.class_head = nn.Linear(dim, num_classes + 1)
        self.mask_head = MaskHead(dim, act_layer)
        self.upscale = nn.Sequential(*[UpscaleBlock(dim, act_layer) for _ in range(num_upscale_blocks)])
        # The probability, per masked block, that a query's attention mask is kept (annealed 1 -> 0 in training).
        self.register_buffer("attn_mask_probs", torch.ones(num_blocks))

    def schedule(self, iteration: int) -> None:
        """Set ``attn_mask_probs`` for ``iteration`` steps done, by ``annealing`` (EoMT's ``mask_annealing``)."""
        if self.annealing is None:
            return
        cfg = self.annealing
        probs = [_keep_probability(iteration, start, end, cfg.power) for start, end in zip(cfg.starts, cfg.ends)]
        self.attn_mask_probs.copy_(torch.tensor(probs, dtype=self.attn_mask_probs.dtype))

    def predictions(self, image: torch.Tensor) -> list[Prediction]:
        """One :data:`Prediction` per masked block run (see the class), then the final one."""
        tokens, rope, grid = self._embed(image)
        rope_kwargs = {} if rope is None else {"rope": rope}
        first_masked = len(self.encoder.blocks) - self.num_blocks
        predictions = []
        for index, block in enumerate(self.encoder.blocks):
            attn_mask = None
            if index == first_masked:
                queries = self.query.weight.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
                tokens = torch.cat([queries, tokens], dim=1)
                if rope is not None:
                    rope_kwargs = {"rope": self._no_rotation_for_queries(rope)}
            if index >= first_masked:
                keep_prob = self.attn_mask_probs[index - first_masked]
                # in eval a block with keep_prob 0 runs unmasked (transformers would reuse an earlier block's mask)
                if self.training or keep_prob > 0:
                    prediction = self._predict(self.encoder.norm(tokens), grid)
                    predictions.append(prediction)
                    attn_mask = self._attention_mask(prediction[0], grid, keep_prob)
            tokens = block(tokens, attn_mask=attn_mask, **rope_kwargs)
        predictions.append(self._predict(self.encoder.norm(tokens), grid))
        return predictions

    def _embed(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        """Tokens ``[prefix, patches]`` as timm's model makes them, its RoPE (Eva) and the token grid."""
        patches = self.encoder.patch_embed(image)  # NHWC, as dynamic_img_size makes it
        grid = (patches.shape[1], patches.shape[2])
        if isinstance(self.encoder, Eva):
            tokens, rope = self.encoder._pos_embed(patches)
        else:
            tokens, rope = self.encoder._pos_embed(patches), None
        return self.encoder.norm_pre(tokens), rope, grid

    def _no_rotation_for_queries(self, rope: torch.Tensor) -> torch.Tensor:
        """``rope`` with identity rotations (sin 0, cos 1) for the queries in front of the tokens.

        timm's RoPE attention leaves the first ``num_prefix_tokens`` tokens as they are and rotates
        the rest with ``rope``'s rows, ``[sin | cos]`` on the last axis. With the queries in front,
        queries and prefix tokens are ``num_queries`` more tokens to leave unrotated (transformers'
        EoMT-DINOv3 rotates the patch tokens only)."""
        half = rope.shape[-1] // 2
        shape = (*rope.shape[:-2], self.num_queries, half)
        identity = torch.cat([rope.new_zeros(shape), rope.new_ones(shape)], dim=-1)
        return torch.cat([identity, rope], dim=-2)

    def _predict(self, tokens: torch.Tensor, grid: tuple[int, int]) -> Prediction:
        """Class and mask logits of the (normed) sequence ``[queries, prefix, patches]``."""
        queries = tokens[:, : self.num_queries]
        patches = tokens[:, self.num_queries + self.encoder.num_prefix_tokens :]
        patch_map = patches.transpose(1, 2).reshape(patches.shape[0], -1, *grid)
        mask_logits = torch.einsum("bqc,bchw->bqhw", self.mask_head(queries), self.upscale(patch_map))
        return mask_logits, self.class_head(queries)

    def _attention_mask(
        self, mask_logits: torch.Tensor, grid: tuple[int, int], keep_prob: torch.Tensor
    ) -> torch.Tensor:
        """Boolean mask ``[B, 1, N, N]`` (True: may attend, the convention of timm's attention and SDPA):
        each query sees the patches where its mask logit, resized to the token grid, is above 0; a query
        drawn with probability ``1 - keep_prob`` sees every patch. All other pairs are unmasked."""
        batch = mask_logits.shape[0]
        patches_start = self.num_queries + self.encoder.num_prefix_tokens
        num_tokens = patches_start + grid[0] * grid[1]
        mask = torch.ones(batch, num_tokens, num_tokens, dtype=torch.bool, device=mask_logits.device)
        sees_patch = F.interpolate(mask_logits, size=grid, mode="bilinear").flatten(2) > 0
        if keep_prob < 1:
            # the same draw, in the same order, as transformers' EoMT, so that seeded runs agree
            unmasked = torch.rand(batch, self.num_queries, device=mask.device) > keep_prob
            sees_patch |= unmasked[:, :, None]
        mask[:, : self.num_queries, patches_start:] = sees_patch
        return mask[:, None]


def _check_vit(vit: nn.Module, num_blocks: int) -> None:
    """Refuse ViTs whose token sequence EoMT cannot extend with queries."""
    if not isinstance(vit, (VisionTransformer, Eva)):
        raise TypeError(f"EoMT needs a timm VisionTransformer or Eva, got {type(vit).__name__}")
    if not vit.dynamic_img_size:
        raise ValueError("EoMT needs the ViT built with dynamic_img_size=True")
    if not isinstance(getattr(vit, "patch_drop", None), (type(None), nn.Identity)):
        raise ValueError("EoMT needs a ViT without patch dropout (patch_drop_rate=0)")
    if getattr(vit, "rope_mixed", False):
        raise ValueError("EoMT does not support per-block ('mixed') RoPE")
    if not 0 < num_blocks <= len(vit.blocks):
        raise ValueError(f"num_blocks must be in 1..{len(vit.blocks)} (the ViT's depth), got {num_blocks}")


def _keep_probability(iteration: int, start: int, end: int, power: float) -> float:
    """EoMT's ``mask_annealing``: 1 before ``start``, 0 from ``end``, ``(1 - progress) ** power`` between."""
    if iteration < start:
        return 1.0
    if iteration >= end:
        return 0.0
    return (1.0 - (iteration - start) / (end - start)) ** power


def build_eomt(cfg: ModelConfig, *, num_classes: int, ignore_index: int, in_channels: int) -> EoMT:
    """The EoMT a recipe's ``model`` section describes (``decode_head.type: eomt``): the encoder is
    built as every hooktrain ViT is (pretrained weights, ``in_channels``, ``kwargs`` such as the
    paper's ``patch_size: 16`` and ``img_size: 512``), all its blocks kept, with its final norm."""
    head = cfg.decode_head
    if not is_vit(cfg.encoder.name):
        raise UserError(
            f"model.encoder.name: decode_head type eomt needs a timm ViT, and '{cfg.encoder.name}' is not one; "
            "choose e.g. vit_small_patch14_reg4_dinov2 or vit_small_patch16_dinov3"
        )
    if cfg.encoder.grad_checkpointing:
        raise UserError("model.encoder.grad_checkpointing: EoMT runs the encoder's blocks itself; set it to false")
    for key in ("class_token", "out_norm"):
        if getattr(cfg.encoder, key):
            raise UserError(f"model.encoder.{key} does not apply to decode_head type eomt; drop it")
    encoder_cfg = cfg.encoder.model_copy(update={"out_indices": [-1], "intermediate_norm": True})
    vit = build_encoder(encoder_cfg, in_channels=in_channels).model
    if cfg.encoder.frozen:
        vit.requires_grad_(False)
    try:
        return EoMT(
            vit,
            num_classes,
            num_queries=head.num_queries,
            num_blocks=head.num_blocks,
            num_upscale_blocks=head.num_upscale_blocks,
            criterion=build_criterion(head.loss, num_classes),
            annealing=head.mask_annealing,
            ignore_index=ignore_index,
            inference=cfg.inference,
            channels_last=cfg.channels_last,
        )
    except ValueError as err:
        raise UserError(f"model.decode_head: {err}") from err

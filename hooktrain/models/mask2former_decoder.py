"""Mask2Former's transformer decoder: learned queries refined by masked cross-attention to one
pixel-decoder level at a time (cycling coarsest to finest), self-attention and an FFN; after the
initial queries and after every layer, a class head and a mask MLP predict."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hooktrain.models.pixel_decoder import NUM_LEVELS, sine_position_embedding

Prediction = tuple[torch.Tensor, torch.Tensor]
"""``(mask_logits [B, Q, h, w], class_logits [B, Q, num_classes + 1])``; the last class is "no object"."""


class Attention(nn.Module):
    """Multi-head attention with separate query, key and value projections; ``attend`` (boolean,
    broadcastable to ``[B, heads, Nq, Nk]``) is True where a query may attend to a key."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads {num_heads} does not divide the decoder's hidden_dim {dim}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attend: torch.Tensor | None = None
    ) -> torch.Tensor:
        batch, length, dim = query.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, self.num_heads, dim // self.num_heads).transpose(1, 2)

        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(key)), heads(self.v_proj(value))
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=dropout)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


class MaskedAttentionDecoderLayer(nn.Module):
    """Post-norm layer: masked cross-attention to one level, self-attention among the queries, a
    ReLU FFN, each with a residual and a LayerNorm. The queries' position embedding joins the
    attention queries (and the self-attention keys), the level's sine embedding its keys."""

    def __init__(self, dim: int, num_heads: int, feedforward: int, dropout: float = 0.0):
        super().__init__()
        self.cross_attn = Attention(dim, num_heads, dropout)
        self.cross_attn_norm = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads, dropout)
        self.self_attn_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, feedforward)
        self.fc2 = nn.Linear(feedforward, dim)
        self.ffn_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        queries: torch.Tensor,
        query_pos: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        attend: torch.Tensor,
    ) -> torch.Tensor:
        out = self.cross_attn(queries + query_pos, memory + memory_pos, memory, attend)
        queries = self.cross_attn_norm(queries + self.dropout(out))
        with_pos = queries + query_pos
        queries = self.self_attn_norm(queries + self.dropout(self.self_attn(with_pos, with_pos, queries)))
        out = self.fc2(self.dropout(F.relu(self.fc1(queries))))
        return self.ffn_norm(queries + self.dropout(out))


class MaskEmbedding(nn.Module):
    """The queries' mask embeddings: three linear layers, ReLU after the first two."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, out_dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x) if index == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MaskedAttentionDecoder(nn.Module):
    """Mask2Former's transformer decoder and its prediction heads.

    ``num_queries`` learned query features (``query_feat``) with learned position embeddings
    (``query_pos``) go through ``num_layers`` :class:`MaskedAttentionDecoderLayer` (transformers'
    ``decoder_layers - 1``, mmdet's ``num_layers``); layer ``i`` reads level ``i % 3`` of the pixel
    decoder (coarsest first), projected to ``hidden_dim`` when its width differs (or always, with
    ``enforce_input_projection``), plus a learned level embedding. Every prediction comes from the
    queries after one shared LayerNorm: the class head and a mask embedding whose dot product with
    the mask features gives the mask logits. Each layer's cross-attention sees, for each query,
    only the pixels where the previous prediction's mask, resized to that level, has a sigmoid of
    0.5 or more; a query whose mask covers no pixel sees them all.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        hidden_dim: int = 256,
        mask_channels: int = 256,
        num_queries: int = 100,
        num_heads: int = 8,
        num_layers: int = 9,
        feedforward: int = 2048,
        dropout: float = 0.0,
        enforce_input_projection: bool = False,
    ):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_pos = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(NUM_LEVELS, hidden_dim)
        project = in_channels != hidden_dim or enforce_input_projection
        self.input_proj = nn.ModuleList(
            nn.Conv2d(in_channels, hidden_dim, 1) if project else nn.Identity() for _ in range(NUM_LEVELS)
        )
        self.layers = nn.ModuleList(
            MaskedAttentionDecoderLayer(hidden_dim, num_heads, feedforward, dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_dim)
        self.class_head = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MaskEmbedding(hidden_dim, mask_channels)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Mask2Former's: Xavier for the input projections and the layers' matrices."""
        for proj in self.input_proj:
            if isinstance(proj, nn.Conv2d):
                nn.init.xavier_uniform_(proj.weight)
                nn.init.zeros_(proj.bias)
        for param in self.layers.parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)

    def forward(self, levels: list[torch.Tensor], mask_features: torch.Tensor) -> list[Prediction]:
        """Every prediction (the initial queries', then one per layer) from the pixel decoder's
        ``levels`` (coarsest first) and ``mask_features``."""
        memories, positions, sizes = [], [], []
        for index, level in enumerate(levels[:NUM_LEVELS]):
            height, width = level.shape[-2:]
            sizes.append((height, width))
            pos = sine_position_embedding(height, width, self.hidden_dim // 2, level.device, level.dtype)
            positions.append(pos[None])
            memory = self.input_proj[index](level).flatten(2) + self.level_embed.weight[index][None, :, None]
            memories.append(memory.transpose(1, 2))
        batch = mask_features.shape[0]
        queries = self.query_feat.weight[None].expand(batch, -1, -1)
        query_pos = self.query_pos.weight[None].expand(batch, -1, -1)
        predictions = [self._predict(queries, mask_features)]
        for index, layer in enumerate(self.layers):
            level = index % NUM_LEVELS
            attend = self._attention_mask(predictions[-1][0], sizes[level])
            queries = layer(queries, query_pos, memories[level], positions[level], attend)
            predictions.append(self._predict(queries, mask_features))
        return predictions

    def _predict(self, queries: torch.Tensor, mask_features: torch.Tensor) -> Prediction:
        queries = self.norm(queries)
        mask_logits = torch.einsum("bqc,bchw->bqhw", self.mask_embed(queries), mask_features)
        return mask_logits, self.class_head(queries)

    @staticmethod
    def _attention_mask(mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``[B, 1, Q, h * w]``, True where a query may attend (SDPA's convention)."""
        resized = F.interpolate(mask_logits.detach(), size=size, mode="bilinear", align_corners=False)
        # sigmoid, not the logit's sign: for |logit| below ~3e-8 float32's sigmoid rounds to 0.5
        attend = resized.sigmoid().flatten(2) >= 0.5
        attend = attend | ~attend.any(dim=-1, keepdim=True)  # not ``|=``: the ONNX exporter has no in-place or
        return attend[:, None]

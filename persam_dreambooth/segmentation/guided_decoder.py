"""SAM's mask decoder with PerSAM's two injections, by subclassing segment_anything's modules (no fork).

PerSAM (Zhang et al., ICLR 2024; reference code ``ZrrSkywalker/Personalize-SAM`` @ a7e8724, ``per_segment_anything/
modeling/transformer.py``) changes the decoder in two places, both reproduced here explicitly:

* **Target-guided attention** (:class:`GuidedAttention`): in the two *token -> image* cross-attentions of the
  transformer blocks (not the final attention, not self-attention, not image -> token), the attention probabilities
  get the location prior added *after* the softmax, followed by a second softmax over the keys::

      A  = softmax(Q K^T / sqrt(d))          # (B, heads, N_tokens, N_image)
      A' = softmax(A + attn_sim)             # attn_sim: (1 or B, 1, 1, N_image), broadcast over heads, tokens

* **Target-semantic prompting** (:class:`GuidedTwoWayTransformer`): with ``T`` the decoder tokens and ``t`` the
  target embedding ``(1, 1, C)``::

      PE  := T + t                          # the query positional encoding used everywhere
      Q0  := T + t;  Q_i := Q_{i-1}' + t    # t added to the queries before every block
      q_final := Q_last + PE + t  (= Q_last + T + 2t)

  The published code obtains these through an in-place ``+=`` on a tensor aliased with the positional encoding; we
  compute the same values without aliasing.

With ``attn_sim=None`` and ``target_embedding=None`` every module computes exactly what SAM's computes (the tests
check ``torch.equal``). :meth:`GuidedMaskDecoder.from_decoder` builds a guided copy of an existing ``MaskDecoder``
(same hyper-parameters, ``load_state_dict(strict=True)``); the original module is not modified.
"""

from __future__ import annotations

import math

import torch
from segment_anything.modeling import MaskDecoder, TwoWayTransformer
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock
from torch import Tensor, nn

__all__ = ["GuidedAttention", "GuidedTwoWayAttentionBlock", "GuidedTwoWayTransformer", "GuidedMaskDecoder"]


class GuidedAttention(Attention):
    """SAM's ``Attention`` with an optional additive bias on the attention *probabilities* (double softmax)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, attn_sim: Tensor | None = None) -> Tensor:
        """Multi-head attention of ``q`` over ``k``/``v``.

        Args:
            q: queries ``(B, N_q, C)``; k, v: keys and values ``(B, N_k, C)``.
            attn_sim: ``(1, 1, 1, N_k)``, or ``(B, 1, 1, N_k)`` with one prior per batch element (a batch across
                images), broadcast to ``(B, heads, N_q, N_k)``; added to the post-softmax attention, which is then
                soft-maxed again. ``None``: SAM's attention, unchanged.

        Returns:
            ``(B, N_q, C)``.
        """
        if attn_sim is None:
            return super().forward(q, k, v)
        q = self._separate_heads(self.q_proj(q), self.num_heads)  # (B, N_q, C') -> (B, heads, N_q, C'/heads)
        k = self._separate_heads(self.k_proj(k), self.num_heads)  # (B, N_k, C') -> (B, heads, N_k, C'/heads)
        v = self._separate_heads(self.v_proj(v), self.num_heads)
        c_per_head = q.shape[-1]
        attn = q @ k.permute(0, 1, 3, 2)  # (B, heads, N_q, N_k)
        attn = attn / math.sqrt(c_per_head)
        attn = torch.softmax(attn, dim=-1)
        # PerSAM's target-guided attention: the prior is added to probabilities (rows summing to 1), then a second
        # softmax renormalises. Kept exactly as published (docs/design/persam_method.md §1.1a), not the pre-softmax
        # variant.
        attn = torch.softmax(attn + attn_sim, dim=-1)
        out = attn @ v  # (B, heads, N_q, C'/heads)
        return self.out_proj(self._recombine_heads(out))  # (B, heads, N_q, c) -> (B, N_q, C') -> (B, N_q, C)


class GuidedTwoWayAttentionBlock(TwoWayAttentionBlock):
    """SAM's two-way block whose token -> image cross-attention accepts ``attn_sim``."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__(
            embedding_dim, num_heads, mlp_dim=mlp_dim, activation=activation,
            attention_downsample_rate=attention_downsample_rate, skip_first_layer_pe=skip_first_layer_pe,
        )
        # same name and shapes, so the state dict is SAM's
        self.cross_attn_token_to_image = GuidedAttention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )

    def forward(  # type: ignore[override]
        self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor, attn_sim: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """One block: token self-attention, token -> image (guided), MLP, image -> token.

        Shapes: queries/query_pe ``(B, N_tokens, C)``; keys/key_pe ``(B, h*w, C)``; attn_sim ``(1, 1, 1, h*w)`` or
        ``(B, 1, 1, h*w)``.
        """
        # 1. self-attention of the tokens (block 0 skips the positional encoding and the residual, as in SAM)
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)
        # 2. tokens attend to the image: the only place the location prior enters
        q = queries + query_pe
        k = keys + key_pe
        queries = queries + self.cross_attn_token_to_image(q=q, k=k, v=keys, attn_sim=attn_sim)
        queries = self.norm2(queries)
        # 3. MLP on the tokens
        queries = self.norm3(queries + self.mlp(queries))
        # 4. the image attends to the tokens (no prior here)
        q = queries + query_pe
        k = keys + key_pe
        keys = keys + self.cross_attn_image_to_token(q=k, k=q, v=queries)
        keys = self.norm4(keys)
        return queries, keys


class GuidedTwoWayTransformer(TwoWayTransformer):
    """SAM's two-way transformer with target-guided attention and target-semantic prompting."""

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__(
            depth, embedding_dim, num_heads, mlp_dim, activation=activation,
            attention_downsample_rate=attention_downsample_rate,
        )
        self.layers = nn.ModuleList(
            GuidedTwoWayAttentionBlock(
                embedding_dim=embedding_dim, num_heads=num_heads, mlp_dim=mlp_dim, activation=activation,
                attention_downsample_rate=attention_downsample_rate, skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )

    def forward(  # type: ignore[override]
        self,
        image_embedding: Tensor,
        image_pe: Tensor,
        point_embedding: Tensor,
        attn_sim: Tensor | None = None,
        target_embedding: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Run the blocks and the final token -> image attention.

        Args:
            image_embedding: ``(B, C, h, w)``; image_pe: the same shape.
            point_embedding: decoder tokens ``T`` ``(B, N_tokens, C)``.
            attn_sim: ``(1, 1, 1, h*w)`` (or ``(B, 1, 1, h*w)``, one per image) prior for the blocks' token -> image
                attention, or ``None``.
            target_embedding: ``t`` ``(1, 1, C)`` (or broadcastable to the tokens), or ``None``.

        Returns:
            ``(tokens (B, N_tokens, C), image (B, h*w, C))``.
        """
        image_embedding = image_embedding.flatten(2).permute(0, 2, 1)  # (B, C, h, w) -> (B, h*w, C)
        image_pe = image_pe.flatten(2).permute(0, 2, 1)  # (B, C, h, w) -> (B, h*w, C)
        tokens = point_embedding
        # Target-semantic prompting, published semantics (docs/design/persam_method.md §1.1c): the query positional
        # encoding is T + t, t is added to the queries before every block, and once more to the final query.
        query_pe = tokens if target_embedding is None else tokens + target_embedding
        queries = query_pe  # Q0 = T (+ t)
        keys = image_embedding
        for i, layer in enumerate(self.layers):
            if i > 0 and target_embedding is not None:
                queries = queries + target_embedding
            queries, keys = layer(queries=queries, keys=keys, query_pe=query_pe, key_pe=image_pe, attn_sim=attn_sim)
        q = queries + query_pe
        if target_embedding is not None:
            q = q + target_embedding
        k = keys + image_pe
        queries = queries + self.final_attn_token_to_image(q=q, k=k, v=keys)  # no prior in the final attention
        queries = self.norm_final_attn(queries)
        return queries, keys


class GuidedMaskDecoder(MaskDecoder):
    """SAM's ``MaskDecoder`` whose forward accepts ``attn_sim`` and ``target_embedding``.

    Build it from an existing decoder with :meth:`from_decoder`.
    """

    @classmethod
    def from_decoder(cls, decoder: MaskDecoder) -> GuidedMaskDecoder:
        """A guided copy of ``decoder``: the same hyper-parameters (read from the module) and a copy of its weights.

        The returned module shares no parameter or buffer with ``decoder``; it is on the same device and dtype and
        in the same train/eval mode.

        Raises:
            TypeError: ``decoder`` is not a ``MaskDecoder`` whose transformer is a ``TwoWayTransformer``.
        """
        if not isinstance(decoder, MaskDecoder):
            raise TypeError(f"`decoder` must be a segment_anything MaskDecoder, got {type(decoder).__name__}.")
        tr = decoder.transformer
        if not isinstance(tr, TwoWayTransformer) or len(tr.layers) == 0:
            raise TypeError(
                f"`decoder.transformer` must be a segment_anything TwoWayTransformer, got {type(tr).__name__}."
            )
        block = tr.layers[0]
        transformer = GuidedTwoWayTransformer(
            depth=tr.depth,
            embedding_dim=tr.embedding_dim,
            num_heads=tr.num_heads,
            mlp_dim=tr.mlp_dim,
            activation=type(block.mlp.act),
            attention_downsample_rate=tr.embedding_dim // block.cross_attn_token_to_image.internal_dim,
        )
        iou_head = decoder.iou_prediction_head
        hidden = iou_head.layers[0].out_features if iou_head.num_layers > 1 else decoder.transformer_dim
        guided = cls(
            transformer_dim=decoder.transformer_dim,
            transformer=transformer,
            num_multimask_outputs=decoder.num_multimask_outputs,
            activation=type(decoder.output_upscaling[2]),  # ConvT, LayerNorm2d, act, ConvT, act
            iou_head_depth=iou_head.num_layers,
            iou_head_hidden_dim=hidden,
        )
        ref = next(decoder.parameters())
        guided.to(device=ref.device, dtype=ref.dtype)
        guided.load_state_dict(decoder.state_dict(), strict=True)  # copies: nothing mutable is shared
        guided.train(decoder.training)
        return guided

    def forward(  # type: ignore[override]
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        multimask_output: bool,
        attn_sim: Tensor | None = None,
        target_embedding: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Predict masks; see ``MaskDecoder.forward``. Output slicing is SAM's (tokens 1..K or token 0).

        Shapes: image_embeddings ``(1, C, h, w)`` (one image, repeated for the ``B`` prompts, as SAM) or ``(B, C, h,
        w)`` (one image per prompt: a batch across images); image_pe ``(1, C, h, w)``; sparse ``(B, N, C)``; dense
        ``(B, C, h, w)``; attn_sim ``(1, 1, 1, h*w)`` or ``(B, 1, 1, h*w)`` (one prior per image); returns low-res
        logits ``(B, K, 4h, 4w)`` and IoU predictions ``(B, K)``, ``K = 3`` or ``1``.
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse_prompt_embeddings,
            dense_prompt_embeddings=dense_prompt_embeddings,
            attn_sim=attn_sim,
            target_embedding=target_embedding,
        )
        keep = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, keep, :, :], iou_pred[:, keep]

    def predict_masks(  # type: ignore[override]
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        attn_sim: Tensor | None = None,
        target_embedding: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """All ``num_mask_tokens`` masks and IoU predictions; see ``MaskDecoder.predict_masks``."""
        batch = sparse_prompt_embeddings.size(0)
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)  # (1 + M, C)
        output_tokens = output_tokens.unsqueeze(0).expand(batch, -1, -1)  # (1 + M, C) -> (B, 1 + M, C)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)  # (B, 1 + M + N, C)

        if image_embeddings.shape[0] == 1:  # one image for all prompts: SAM's path, unchanged
            src = torch.repeat_interleave(image_embeddings, tokens.shape[0], dim=0)  # (1, C, h, w) -> (B, C, h, w)
        elif image_embeddings.shape[0] == batch:  # a batch across images, prompt i on image i
            src = image_embeddings
        else:
            raise ValueError(
                f"`image_embeddings` must have batch size 1 or {batch} (the prompts' batch), got "
                f"{image_embeddings.shape[0]}."
            )
        src = src + dense_prompt_embeddings
        pos_src = torch.repeat_interleave(image_pe, tokens.shape[0], dim=0)  # (B, C, h, w)
        b, c, h, w = src.shape

        hs, src = self.transformer(src, pos_src, tokens, attn_sim=attn_sim, target_embedding=target_embedding)
        iou_token_out = hs[:, 0, :]  # (B, C)
        mask_tokens_out = hs[:, 1 : (1 + self.num_mask_tokens), :]  # (B, M, C)

        src = src.transpose(1, 2).view(b, c, h, w)  # (B, h*w, C) -> (B, C, h, w)
        upscaled = self.output_upscaling(src)  # (B, C/8, 4h, 4w)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # (B, M, C/8)
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)  # (B, M, 4h*4w) -> (B, M, 4h, 4w)
        iou_pred = self.iou_prediction_head(iou_token_out)  # (B, M)
        return masks, iou_pred

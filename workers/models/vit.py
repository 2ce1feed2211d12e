"""Vision Transformers (ViT-S/16, ViT-B/16) with timm's parameter names (``patch_embed.proj``,
``cls_token``, ``pos_embed``, ``blocks.N.attn.qkv``, ``blocks.N.mlp.fc1``, ``norm``,
``head``), so a timm state dict loads into encoder + classifier unchanged.

The feature is the class token after the final LayerNorm; the classifier is ``head``.
There is no decoder (docs/design.md §3.1: ImageNet-scale configs have none), so a ViT run must set
MID's cyclic-consistency weights and the teacher's reconstruction weight to 0.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.models.base import Backbone, Encoder, ModelSpec

LAYER_NORM_EPS = 1e-6  # timm's ViT


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        # Written out rather than F.scaled_dot_product_attention: MID differentiates the
        # gradient again (create_graph=True), and the fused CPU kernels have no double backward.
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTEncoder(Encoder):
    def __init__(self, spec: ModelSpec, patch_size: int, dim: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0):
        super().__init__(spec)
        num_patches = (spec.image_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(spec.in_channels, patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():  # timm's default initialisation of the linear layers
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(self.normalize(x))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))[:, 0]


class ViTHead(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.head = nn.Linear(dim, num_classes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(z)


class ViT(Backbone):
    has_decoder = False

    def __init__(self, patch_size: int, dim: int, depth: int, num_heads: int):
        self.patch_size, self.dim, self.depth, self.num_heads = patch_size, dim, depth, num_heads

    def check(self, spec: ModelSpec) -> None:
        if spec.image_size % self.patch_size:
            raise ValueError(f"a ViT with {self.patch_size}-pixel patches needs an image side divisible by "
                             f"{self.patch_size}, got {spec.image_size} (set data.image_size)")

    def encoder(self, spec):
        return ViTEncoder(spec, self.patch_size, self.dim, self.depth, self.num_heads)

    def classifier(self, spec):
        return ViTHead(self.dim, spec.num_classes)


def vit_s16() -> ViT:
    return ViT(patch_size=16, dim=384, depth=12, num_heads=6)


def vit_b16() -> ViT:
    return ViT(patch_size=16, dim=768, depth=12, num_heads=12)

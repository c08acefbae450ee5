"""A small PyTorch Lens DiT, written for the tests from the model description (shared SPEC, DiT section).

It stands in for the upstream `LensTransformer2DModel` that `lens-jax parity --reference-dit`
imports: same constructor arguments, same module and parameter names (so an upstream
`transformer/` checkpoint loads with `load_state_dict`), same forward signature, and blocks in
`transformer_blocks` whose forward returns `(text, image)`. It is checked against the goldens'
`io_dit` in tests/test_parity_tool.py. Plain torch; no upstream code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(256, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, sigma, dtype):
        half = 128
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half).to(sigma.device)
        args = sigma.float()[:, None] * freqs[None] * 1000.0
        proj = torch.cat([torch.cos(args), torch.sin(args)], -1).to(dtype)  # flip_sin_to_cos: cos first
        return self.linear_2(F.silu(self.linear_1(proj)))


class TimeTextEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim)


class GateMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def rotate(x, cos, sin):
    """Complex rotation of interleaved pairs (x[2i], x[2i+1]); x [B, T, H, D], cos/sin [T, D/2]."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    re, im = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None], sin[None, :, None]
    return torch.stack([re * c - im * s, re * s + im * c], -1).reshape(x.shape).to(x.dtype)


class JointAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.img_qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.txt_qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.norm_q, self.norm_k = RMSNorm(head_dim, 1e-6), RMSNorm(head_dim, 1e-6)
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim, 1e-6), RMSNorm(head_dim, 1e-6)
        self.to_out = nn.ModuleList([nn.Linear(heads * head_dim, dim)])
        self.to_add_out = nn.Linear(heads * head_dim, dim)

    def _qkv(self, x, proj, nq, nk, cos, sin):
        b, t, _ = x.shape
        q, k, v = proj(x).view(b, t, 3, self.heads, self.head_dim).unbind(2)  # [3, heads, head_dim] layout
        return rotate(nq(q), cos, sin), rotate(nk(k), cos, sin), v

    def forward(self, img, txt, rope, additive_mask):
        qi, ki, vi = self._qkv(img, self.img_qkv, self.norm_q, self.norm_k, rope[0], rope[1])
        qt, kt, vt = self._qkv(txt, self.txt_qkv, self.norm_added_q, self.norm_added_k, rope[2], rope[3])
        q, k, v = (torch.cat(p, 1).transpose(1, 2) for p in ((qi, qt), (ki, kt), (vi, vt)))  # [B, H, S, D]
        scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(self.head_dim) + additive_mask
        out = (scores.softmax(-1) @ v.float()).to(img.dtype).transpose(1, 2).flatten(2)
        n = img.shape[1]
        return self.to_out[0](out[:, :n]), self.to_add_out(out[:, n:])


class LensTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.img_norm1, self.img_norm2 = RMSNorm(dim, 1e-6), RMSNorm(dim, 1e-6)
        self.txt_norm1, self.txt_norm2 = RMSNorm(dim, 1e-6), RMSNorm(dim, 1e-6)
        self.attn = JointAttention(dim, heads, head_dim)
        self.img_mlp, self.txt_mlp = GateMLP(dim, int(dim / 3 * 8)), GateMLP(dim, int(dim / 3 * 8))

    def forward(self, img, txt, temb, rope, additive_mask):
        i_mod = [c[:, None] for c in self.img_mod(temb).chunk(6, -1)]  # (shift, scale, gate) x 2
        t_mod = [c[:, None] for c in self.txt_mod(temb).chunk(6, -1)]
        a_img, a_txt = self.attn(self.img_norm1(img) * (1 + i_mod[1]) + i_mod[0],
                                 self.txt_norm1(txt) * (1 + t_mod[1]) + t_mod[0], rope, additive_mask)
        img = img + i_mod[2] * a_img
        txt = txt + t_mod[2] * a_txt
        img = img + i_mod[5] * self.img_mlp(self.img_norm2(img) * (1 + i_mod[4]) + i_mod[3])
        txt = txt + t_mod[5] * self.txt_mlp(self.txt_norm2(txt) * (1 + t_mod[4]) + t_mod[3])
        return txt, img


class NormOut(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x, temb):
        scale, shift = self.linear(F.silu(temb)).chunk(2, -1)  # (scale, shift): the blocks' opposite order
        return F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


def _angles(pos, dim):
    inv = 1.0 / torch.pow(torch.tensor(10000.0), torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    return torch.outer(pos.float(), inv)


class LensTransformer2DModel(nn.Module):
    def __init__(self, patch_size=2, in_channels=128, out_channels=32, num_layers=48, attention_head_dim=64,
                 num_attention_heads=24, inner_dim=1536, enc_hidden_dim=2880, axes_dims_rope=(8, 28, 28),
                 gate_mlp=True, rms_norm=True, multi_layer_encoder_feature=True, selected_layer_index=(5, 11, 17, 23)):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        self.axes = list(axes_dims_rope)
        self.img_in = nn.Linear(in_channels, dim)
        self.txt_norm = nn.ModuleList([RMSNorm(enc_hidden_dim, 1e-5) for _ in selected_layer_index])
        self.txt_in = nn.Linear(enc_hidden_dim * len(selected_layer_index), dim)
        self.time_text_embed = TimeTextEmbed(dim)
        self.transformer_blocks = nn.ModuleList(
            [LensTransformerBlock(dim, num_attention_heads, attention_head_dim) for _ in range(num_layers)])
        self.norm_out = NormOut(dim)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * out_channels)

    def _rope(self, h, w, t, device):
        def centred(n):
            return torch.arange(-(n - n // 2), n // 2)

        hh, ww = torch.meshgrid(centred(h), centred(w), indexing="ij")
        img = torch.cat([_angles(torch.zeros(h * w), self.axes[0]), _angles(hh.reshape(-1), self.axes[1]),
                         _angles(ww.reshape(-1), self.axes[2])], 1)
        tpos = max(h // 2, w // 2) + torch.arange(t)
        txt = torch.cat([_angles(tpos, d) for d in self.axes], 1)
        return [x.to(device) for x in (img.cos(), img.sin(), txt.cos(), txt.sin())]

    def forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep, img_shapes,
                attention_kwargs=None):
        _, h, w = img_shapes[0]
        b, n, _ = hidden_states.shape
        t = encoder_hidden_states[0].shape[1]
        visible = torch.cat([torch.ones(b, n, dtype=torch.bool, device=hidden_states.device),
                             encoder_hidden_states_mask.bool()], 1)
        additive = torch.zeros(visible.shape, device=hidden_states.device).masked_fill(~visible, float("-inf"))
        img = self.img_in(hidden_states)
        txt = self.txt_in(torch.cat([norm(f) for norm, f in zip(self.txt_norm, encoder_hidden_states)], -1))
        temb = self.time_text_embed.timestep_embedder(timestep, img.dtype)
        rope = self._rope(h, w, t, img.device)
        for blk in self.transformer_blocks:  # img_mod / txt_mod apply the SiLU themselves
            txt, img = blk(img, txt, temb, rope, additive[:, None, None, :])
        return self.proj_out(self.norm_out(img, temb))

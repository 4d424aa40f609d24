"""BSQ VAE: convolutional encoder/decoder around the multi-scale bitwise quantiser.

Two encoder/decoder architectures share the quantiser and every method: ``conv`` (the released one) and
``patch`` (``VAEConfig.arch``, the embedded default's, not part of the released model): a ``patch_size``-stride
conv straight to the latent grid, residual blocks there only, and a 1x1 conv + pixel shuffle back to pixels. The
released layout spends its compute at 64x64 and 32x32 for a 64 px image; on 2 CPU cores it reaches ~20 dB in the
time the patch layout reaches ~28 dB (`benchmarks/vae_learning_speed.py`).

Contract
--------
``BSQVAE(cfg: VAEConfig)`` maps images in [-1, 1], [B, 3, H, W] (H, W multiples of ``cfg.stride``), to a
latent [B, D, H/stride, W/stride] and back. Module tree and parameter names equal the released
``vae_local`` (Infinity ``flux_vqgan.AutoEncoder``): ``encoder``, ``decoder``, ``quantizer.lfq.mask``; every
conv sits in a wrapper (``….conv.weight``) and every GroupNorm too (``….norm.weight``), so a released state dict
loads after stripping the ``vae_local.`` prefix and nothing else.

* ``encode_latent(x)`` -> latent_BDHW (fp32), ``quantize(x, schedule)`` -> `QuantizerOutput` (the VAE's own
  path, area-downsampled ``var_inputs``), ``encode(x, schedule)`` -> `MultiScaleTokens` (the decoder's labels
  and bilinear next-scale inputs, optional self-correction), ``decode(z)`` -> image clamped to [-1, 1],
  ``decode_bits(bits_list)`` -> image, ``forward(x, schedule)`` -> (reconstruction unclamped, `QuantizerOutput`)
  for training.

Differences from the published code: one 2-D architecture (no video/3-D convs, causal padding, attention
options, checkpoint loading or losses inside the model); sizes from `VAEConfig`; inputs are validated
(`InputError`); swish is ``F.silu`` (same function).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vargpt.config import SelfCorrectionConfig, VAEConfig
from vargpt.errors import InputError
from vargpt.models.quantizer import (
    MultiScaleBSQ,
    MultiScaleTokens,
    QuantizerOutput,
    Schedule,
    multiscale_bits,
    sum_codes,
)
from vargpt.scales import schedule_for_grid


class Conv(nn.Module):
    """Wrapper so the key reads ``….conv.weight`` as released."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Norm(nn.Module):
    """GroupNorm wrapper (``….norm.weight``), eps 1e-6 as released."""

    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int) -> None:
        super().__init__()
        self.norm1 = Norm(c_in, groups)
        self.conv1 = Conv(c_in, c_out, 3, padding=1)
        self.norm2 = Norm(c_out, groups)
        self.conv2 = Conv(c_out, c_out, 3, padding=1)
        self.nin_shortcut = Conv(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        # in place where the tensor is this block's own (no new 8 MB buffers at 256 px; the same floats, and the
        # same gradients: neither GroupNorm's nor the conv's backward reads its output)
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(x if self.nin_shortcut is None else self.nin_shortcut(x))


class Downsample(nn.Module):
    """3x3 stride-2 conv on the input zero-padded by one on the right and bottom only (released)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = Conv(ch, ch, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = Conv(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups)
        self.block_2 = ResnetBlock(ch, ch, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.block_1(x))


class _Level(nn.Module):
    """One resolution: ``block.{i}`` ResnetBlocks, then an optional ``downsample`` / ``upsample``."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, groups: int, resample: type[nn.Module] | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(n_blocks))
        if resample is Downsample:
            self.downsample = Downsample(c_out)
        elif resample is Upsample:
            self.upsample = Upsample(c_out)

    def forward(self, x: Tensor) -> Tensor:
        for b in self.block:
            x = b(x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch, g, n = cfg.base_ch, cfg.norm_groups, len(cfg.ch_mult)
        chans = [ch * m for m in cfg.ch_mult]
        self.conv_in = Conv(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList(
            _Level(ch if i == 0 else chans[i - 1], chans[i], cfg.num_res_blocks, g, Downsample if i < n - 1 else None)
            for i in range(n))
        self.mid = _Mid(chans[-1], g)
        self.norm_out = Norm(chans[-1], g)
        self.conv_out = Conv(chans[-1], cfg.codebook_dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """``up.{i}`` is stored at index i but run from the coarsest (i = n-1) to the finest (i = 0)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch, g, n = cfg.base_ch, cfg.norm_groups, len(cfg.ch_mult)
        chans = [ch * m for m in cfg.ch_mult]
        self.conv_in = Conv(cfg.codebook_dim, chans[-1], 3, padding=1)
        self.mid = _Mid(chans[-1], g)
        self.up = nn.ModuleList(
            _Level(chans[min(i + 1, n - 1)], chans[i], cfg.num_res_blocks + 1, g, Upsample if i > 0 else None)
            for i in range(n))
        self.norm_out = Norm(chans[0], g)
        self.conv_out = Conv(chans[0], cfg.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class PatchEncoder(nn.Module):
    """``arch="patch"``: per-patch MLP (patchify conv to 4x width, SiLU, 1x1 conv), ``num_res_blocks`` ResnetBlocks
    at the latent grid, norm, 3x3 conv out."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch, g, p = cfg.base_ch, cfg.norm_groups, cfg.patch_size
        self.conv_in = Conv(cfg.in_channels, 4 * ch, p, stride=p)
        self.proj_in = Conv(4 * ch, ch, 1)
        self.block = nn.Sequential(*(ResnetBlock(ch, ch, g) for _ in range(cfg.num_res_blocks)))
        self.norm_out = Norm(ch, g)
        self.conv_out = Conv(ch, cfg.codebook_dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.block(self.proj_in(F.silu(self.conv_in(x))))
        return self.conv_out(F.silu(self.norm_out(h)))


class PatchDecoder(nn.Module):
    """``arch="patch"``: 3x3 conv in, ``num_res_blocks + 1`` ResnetBlocks, per-patch MLP (1x1 conv to
    ``decoder_mlp_ch``, SiLU, 1x1 conv to the patch's pixels), pixel shuffle. The MLP matters: a single 1x1 conv
    makes every patch a linear mix of ``base_ch`` fixed patches, which blurs small shapes however long it trains."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch, g, p = cfg.base_ch, cfg.norm_groups, cfg.patch_size
        self.conv_in = Conv(cfg.codebook_dim, ch, 3, padding=1)
        self.block = nn.Sequential(*(ResnetBlock(ch, ch, g) for _ in range(cfg.num_res_blocks + 1)))
        self.norm_out = Norm(ch, g)
        mlp = cfg.decoder_mlp_ch
        self.proj_out = Conv(ch, mlp, 1)
        self.conv_out = Conv(mlp, cfg.in_channels * p * p, 1)
        self.patch_size = p
        self.refine = _Refine(cfg.in_channels + mlp // (p * p), cfg) if cfg.refine_blocks else None

    def forward(self, z: Tensor) -> Tensor:
        h = F.silu(self.proj_out(F.silu(self.norm_out(self.block(self.conv_in(z))))))
        img = F.pixel_shuffle(self.conv_out(h), self.patch_size)
        if self.refine is None:
            return img
        return img + self.refine(torch.cat([img, F.pixel_shuffle(h, self.patch_size)], dim=1))


class _Refine(nn.Module):
    """``VAEConfig.refine_blocks``: 3x3 conv in, ResnetBlocks at full resolution, 3x3 conv out (zero-initialised:
    a decoder that gains it starts equal to one without it)."""

    def __init__(self, c_in: int, cfg: VAEConfig) -> None:
        super().__init__()
        rc = cfg.refine_ch
        self.conv_in = Conv(c_in, rc, 3, padding=1)
        self.block = nn.Sequential(*(ResnetBlock(rc, rc, cfg.norm_groups) for _ in range(cfg.refine_blocks)))
        self.norm_out = Norm(rc, cfg.norm_groups)
        self.conv_out = Conv(rc, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.conv.weight)
        nn.init.zeros_(self.conv_out.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(self.block(self.conv_in(x)))))


def keep_unchanged(latent_BDhw: Tensor, source_BDhw: Tensor, x_BCHW: Tensor, source_BCHW: Tensor, stride: int, *,
                   tol: float = 2 / 255) -> Tensor:
    """``latent`` with the source's latent wherever the pictures agree: a position keeps the target's latent only
    if a pixel of its patch or of a neighbouring patch differs by more than ``tol`` (images in [-1, 1]). The encoder
    normalises over the whole picture, so an edit moves every latent a little and flips bits far from it; the
    source's latent there decodes to the same unchanged pixels."""
    changed = ((x_BCHW.float() - source_BCHW.float()).abs().amax(1, keepdim=True) > tol).float()
    changed = F.max_pool2d(F.max_pool2d(changed, stride), 3, stride=1, padding=1)
    return torch.where(changed.bool(), latent_BDhw, source_BDhw)


class BSQVAE(nn.Module):
    """Encoder + multi-scale BSQ + decoder (released ``vae_local`` for ``arch="conv"``)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        patch = cfg.arch == "patch"
        self.encoder = PatchEncoder(cfg) if patch else Encoder(cfg)
        self.decoder = PatchDecoder(cfg) if patch else Decoder(cfg)
        self.quantizer = MultiScaleBSQ(cfg.codebook_dim)

    @property
    def stride(self) -> int:
        return self.cfg.stride

    # ---- input checks

    def check_image(self, x: Tensor) -> None:
        """Raise `InputError` unless ``x`` is a finite float [B, C, H, W] batch with H, W multiples of the stride."""
        c, s = self.cfg.in_channels, self.stride
        if not isinstance(x, Tensor):
            raise InputError(f"image must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise InputError(f"image dtype is {x.dtype}; convert with x.float() / 127.5 - 1 (uint8 -> [-1, 1])")
        if x.ndim != 4 or x.shape[1] != c:
            raise InputError(f"image must be [B, {c}, H, W], got shape {tuple(x.shape)}; "
                             f"for HWC images use x.permute(2, 0, 1)[None], for grey/RGBA convert to RGB")
        if x.shape[2] % s or x.shape[3] % s or x.shape[2] == 0 or x.shape[3] == 0:
            raise InputError(f"image size {x.shape[2]}x{x.shape[3]} is not a multiple of the VAE stride {s}; "
                             f"resize or crop to e.g. {max(s, x.shape[2] // s * s)}x{max(s, x.shape[3] // s * s)}")
        if not torch.isfinite(x).all():
            raise InputError("image contains NaN or inf values; clean the input (torch.nan_to_num) first")

    def schedule_for(self, x_or_latent: Tensor, *, latent: bool = False) -> Schedule:
        """The default schedule (template prefix) ending at this image's latent grid."""
        h, w = x_or_latent.shape[-2:]
        return schedule_for_grid(h, w) if latent else schedule_for_grid(h // self.stride, w // self.stride)

    # ---- encode / quantise / decode

    def encode_latent(self, x: Tensor) -> Tensor:
        """Image [B, C, H, W] in [-1, 1] -> continuous latent [B, D, H/stride, W/stride] in fp32."""
        self.check_image(x)
        return self.encoder(x.to(self.encoder.conv_in.conv.weight.dtype)).float()

    def quantize(self, x: Tensor, schedule: Schedule | None = None, *, prefix: int | None = None) -> QuantizerOutput:
        """The VAE's own quantisation of an image (released ``vae.encode``)."""
        latent = self.encode_latent(x)
        return self.quantizer(latent, schedule or self.schedule_for(latent, latent=True), prefix=prefix)

    @torch.no_grad()
    def encode(self, x: Tensor, schedule: Schedule | None = None, *,
               self_correction: SelfCorrectionConfig | None = None,
               generator: torch.Generator | None = None, source: Tensor | None = None,
               source_mask: Tensor | None = None) -> MultiScaleTokens:
        """Image -> per-scale bit labels and the visual decoder's teacher-forcing inputs. ``source``: edit source
        images (same shape as ``x``) whose residuals against the running sum are recorded too (``source_BLD``); the
        target's latent then takes the source's at every position whose patch (or a neighbour's) the edit leaves
        unchanged (`keep_unchanged`), so where the picture stays, the labels are exactly what the source implies.
        ``source_mask`` [B] bool: rows without a source (False) keep their own latent."""
        latent = self.encode_latent(x)
        src = None
        if source is not None:
            src = self.encode_latent(source)
            kept = keep_unchanged(latent, src, x, source, self.stride)
            latent = kept if source_mask is None else torch.where(source_mask.view(-1, 1, 1, 1), kept, latent)
        return multiscale_bits(latent, schedule or self.schedule_for(latent, latent=True),
                               self_correction=self_correction, generator=generator, source_BDHW=src)

    def decode(self, z_BDHW: Tensor, *, channels_last: bool = False) -> Tensor:
        """Latent or summed codes [B, D, h, w] -> image [B, C, h*stride, w*stride] clamped to [-1, 1].

        ``channels_last``: the activations in NHWC (the engine's choice): oneDNN's 3x3 convolutions at 256 px run
        ~2x faster on them (fp32 on a CPU, one thread); the sums come in another order, so the pixels move by up to
        ~1e-4 (PSNR > 100 dB against the default; tests). The default keeps the released layout and its floats."""
        if z_BDHW.ndim == 5 and z_BDHW.shape[2] == 1:  # released [B, D, 1, h, w]
            z_BDHW = z_BDHW.squeeze(2)
        if z_BDHW.ndim != 4 or z_BDHW.shape[1] != self.cfg.codebook_dim:
            raise InputError(f"codes must be [B, {self.cfg.codebook_dim}, h, w], got shape {tuple(z_BDHW.shape)}")
        z = z_BDHW.to(self.decoder.conv_in.conv.weight.dtype)
        if channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        return self.decoder(z).clamp(-1, 1).contiguous()

    def decode_bits(self, bits_list: Sequence[Tensor], schedule: Schedule | None = None) -> Tensor:
        """Per-scale bits [B, h_k, w_k, D] (a prefix of a schedule is fine) -> image at the final size.

        With ``schedule`` the codes are summed at its last grid, so the first k scales alone give a coarse
        reconstruction of the full-size image.
        """
        size = tuple(schedule[-1][1:]) if schedule else None
        return self.decode(sum_codes(bits_list, size))

    def forward(self, x: Tensor, schedule: Schedule | None = None, *,
                prefix: int | None = None) -> tuple[Tensor, QuantizerOutput]:
        """Training step: (reconstruction, unclamped; quantiser output incl. the normalised residuals for losses)."""
        q = self.quantize(x, schedule, prefix=prefix)
        return self.decoder(q.quantized_BDHW.to(self.decoder.conv_in.conv.weight.dtype)), q

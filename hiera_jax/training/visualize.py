"""MAE reconstruction grids: input | masked input | reconstruction, one row per example.

Targets are per-patch normalised pixels, so a prediction is shown in pixel space by
de-normalising each patch with the mean and std of the same patch of the input (as MAE demos
do); visible patches are pasted from the input. Video rows show the first frame of each
tubelet (the frames the video targets are taken from).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from hiera_jax.models.config import HieraConfig


def _labels(x: np.ndarray, config: HieraConfig) -> np.ndarray:
    """numpy twin of `mae.pixel_labels`: [B, (T), H, W, C] -> [B, N_pred, pred_dim]."""
    p = config.pred_stride
    if config.is_video:
        x = x[:, :: config.patch_stride[0]]
        b, t, h, w, c = x.shape
        x = x.reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(b, t * (h // p) * (w // p), p * p * c)
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def _unpatchify(tokens: np.ndarray, config: HieraConfig) -> np.ndarray:
    """[B, N_pred, pred_dim] -> [B, H, W, C] (images) or [B, T', H, W, C] (video)."""
    p, c = config.pred_stride, config.in_chans
    if config.is_video:
        t, gh, gw = config.tokens_spatial_shape_final
        b = tokens.shape[0]
        x = tokens.reshape(b, t, gh, gw, p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(b, t, gh * p, gw * p, c)
    gh, gw = config.tokens_spatial_shape_final
    b = tokens.shape[0]
    x = tokens.reshape(b, gh, gw, c, p, p).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, gh * p, gw * p, c)


def reconstruction_panels(
    images: np.ndarray,
    pred: np.ndarray,
    visible: np.ndarray,
    config: HieraConfig,
    mean,
    std,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input, masked input, reconstruction) as uint8 [B, (T'), H, W, C] pictures."""
    images = np.asarray(images, np.float32)
    labels = _labels(images, config)
    mu = labels.mean(-1, keepdims=True)
    sd = np.sqrt(labels.var(-1, ddof=1, keepdims=True) + 1e-6)
    vis = np.asarray(visible, bool)[..., None]
    recon = np.where(vis, labels, np.asarray(pred, np.float32) * sd + mu)
    grey = np.zeros_like(labels) + ((0.5 - np.asarray(mean)) / np.asarray(std)).mean()
    masked = np.where(vis, labels, grey)
    mean = np.asarray(mean, np.float32)[: config.in_chans]
    std = np.asarray(std, np.float32)[: config.in_chans]

    def to_uint8(tokens):
        x = _unpatchify(tokens, config) * std + mean
        return (np.clip(x, 0.0, 1.0) * 255.0).round().astype(np.uint8)

    return to_uint8(labels), to_uint8(masked), to_uint8(recon)


def grid_image(panels, scale: int = 4, pad: int = 2) -> np.ndarray:
    """Tile panels [B, (T), H, W, C] x 3 into one uint8 RGB picture.

    Images: one row per example, columns input | masked | reconstruction. Video: three rows per
    example (input, masked, reconstruction), one column per frame.
    """
    first = panels[0]
    if first.ndim == 5:  # video
        rows = [
            [p[b, t] for t in range(first.shape[1])] for b in range(first.shape[0]) for p in panels
        ]
    else:
        rows = [[p[b] for p in panels] for b in range(first.shape[0])]
    h, w, c = rows[0][0].shape
    n_rows, n_cols = len(rows), len(rows[0])
    canvas = np.full(
        (n_rows * (h * scale + pad) + pad, n_cols * (w * scale + pad) + pad, 3), 255, np.uint8
    )
    for r, row in enumerate(rows):
        for col, tile in enumerate(row):
            tile = np.repeat(np.repeat(tile, scale, 0), scale, 1)
            if c == 1:
                tile = np.repeat(tile, 3, -1)
            y, x = pad + r * (h * scale + pad), pad + col * (w * scale + pad)
            canvas[y : y + h * scale, x : x + w * scale] = tile[..., :3]
    return canvas


def save_reconstruction_png(path, images, pred, visible, config, mean, std) -> str:
    panels = reconstruction_panels(images, pred, visible, config, mean, std)
    scale = max(1, 128 // max(config.input_size[-2:]))
    Image.fromarray(grid_image(panels, scale=scale)).save(path)
    return path

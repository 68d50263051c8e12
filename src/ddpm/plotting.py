"""Figures for the book: image grids, forward-process strips, denoising trajectories, schedule plots.

Images are tensors in [-1, 1] shaped [N, C, H, W] (or uint8 [N, H, W, C] as in the OpenAI sample format).
Every function returns a matplotlib Figure (or an animation) and draws nothing else, so notebooks decide
what to show and how to caption it.
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["CODE_COLUMN", "wrap", "to_uint8", "image_grid", "show_images", "forward_strip", "TrajectoryRecorder",
           "trajectory_figure", "TrajectoryAnimation", "trajectory_animation", "animation_html", "schedule_plot",
           "points_figure", "field_figure", "points_trajectories_figure", "provenance"]

CODE_COLUMN = 80  # characters of printed text that the book's code column shows without scrolling sideways


def wrap(text: str, width: int = CODE_COLUMN) -> str:
    """``text`` folded to the book's code column, so that a printed line never scrolls sideways."""
    return textwrap.fill(text, width=width)


def to_uint8(x: Tensor | np.ndarray) -> np.ndarray:
    """[-1, 1] tensor [N, C, H, W] -> uint8 array [N, H, W, C] (values rounded as in the OpenAI sampler).

    A uint8 array [N, H, W, C] is returned unchanged.
    """
    if isinstance(x, np.ndarray) and x.dtype == np.uint8:
        if x.ndim != 4:
            raise ValueError(f"uint8 images must have shape [N, H, W, C], got {x.shape}")
        return x
    x = torch.as_tensor(x).detach().float().cpu()
    if x.ndim != 4:
        raise ValueError(f"images must have shape [N, C, H, W], got {tuple(x.shape)}")
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def image_grid(images: Tensor | np.ndarray, nrow: int | None = None, padding: int = 2,
               pad_value: int = 255) -> np.ndarray:
    """Tile N images into one uint8 array [H', W', C] with ``nrow`` images per row (default: a square)."""
    imgs = to_uint8(images)
    n, h, w, c = imgs.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), pad_value, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = imgs[i]
    return grid


def _imshow(ax, grid: np.ndarray) -> None:
    if grid.shape[-1] == 1:
        ax.imshow(grid[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(grid, interpolation="nearest")
    ax.set_axis_off()


def show_images(images: Tensor | np.ndarray, nrow: int | None = None, title: str | None = None,
                size: float = 4.0):
    """A figure with one grid of images."""
    import matplotlib.pyplot as plt

    grid = image_grid(images, nrow)
    fig, ax = plt.subplots(figsize=(size, size * grid.shape[0] / grid.shape[1]))
    _imshow(ax, grid)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def forward_strip(schedule, x0: Tensor, timesteps: Sequence[int], generator: torch.Generator | None = None):
    """Images x_0 noised to each of ``timesteps`` by q(x_t | x_0), one column per t (0-based).

    ``schedule``: one NoiseSchedule, or a mapping name -> schedule for one labelled band of rows per schedule.
    All schedules noise the digits with the same draw of noise, so the bands differ only by the schedule.
    """
    import matplotlib.pyplot as plt

    schedules = dict(schedule) if isinstance(schedule, Mapping) else {"": schedule}
    n = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    fig, axes = plt.subplots(len(schedules), len(timesteps), squeeze=False,
                             figsize=(1.0 * len(timesteps) + 0.5, (1.0 * n + 0.3) * len(schedules) + 0.2))
    for row, (name, sched) in enumerate(schedules.items()):
        for ax, t in zip(axes[row], timesteps):
            x_t = sched.q_sample(x0, torch.full((n,), int(t), dtype=torch.long), noise)
            _imshow(ax, image_grid(x_t, nrow=1))
            if row == 0:
                ax.set_title(f"t = {int(t)}", fontsize=9)
        if name:
            axes[row][0].set_axis_on()
            axes[row][0].set_xticks([])
            axes[row][0].set_yticks([])
            for spine in axes[row][0].spines.values():
                spine.set_visible(False)
            axes[row][0].set_ylabel(name, fontsize=10)
    fig.tight_layout()
    return fig


class TrajectoryRecorder:
    """A sampler callback that keeps (t, x_t, predicted x_0) at chosen steps, or at every step.

    ``keep``: number of evenly spaced frames to keep from a run of known length (``total`` steps), or None
    for all. Tensors are copied to the CPU.
    """

    def __init__(self, keep: int | None = None, total: int | None = None):
        self.frames: list[tuple[int, Tensor, Tensor]] = []
        self._keep = None
        if keep is not None and total is not None:
            self._keep = set(np.linspace(0, total - 1, min(keep, total)).round().astype(int).tolist())
        self._count = 0

    def __call__(self, t: int, x_t: Tensor, pred_x0: Tensor) -> None:
        if self._keep is None or self._count in self._keep:
            self.frames.append((int(t), x_t.detach().cpu().clone(), pred_x0.detach().cpu().clone()))
        self._count += 1


def trajectory_figure(frames: Sequence[tuple[int, Tensor, Tensor]], index: int = 0):
    """Two rows for one sample: x_t (top) and the model's predicted x_0 (bottom) at each recorded step."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(frames), figsize=(1.3 * len(frames), 3.0), squeeze=False)
    for col, (t, x_t, x0) in enumerate(frames):
        _imshow(axes[0, col], image_grid(x_t[index:index + 1], padding=0))
        _imshow(axes[1, col], image_grid(x0[index:index + 1].clamp(-1, 1), padding=0))
        axes[0, col].set_title(f"t = {t}", fontsize=8)
    axes[0, 0].text(-0.15, 0.5, "$x_t$", transform=axes[0, 0].transAxes, ha="right", va="center")
    axes[1, 0].text(-0.15, 0.5, r"$\hat x_0$", transform=axes[1, 0].transAxes, ha="right", va="center")
    fig.tight_layout()
    return fig


GIF_LEVELS = 16  # grey levels of an animation's palette: smooth enough for digits, few enough to compress well
GIF_SCALE = 2  # screen pixels per image pixel of an embedded animation (40 px or more for a 28 px digit)


@dataclasses.dataclass(frozen=True)
class TrajectoryAnimation:
    """A denoising run of a batch as an animation: the grid of x_t (left) and of the predicted x_0 (right) per step.

    ``frames``: ``(t, x_t grid, predicted x_0 grid)`` per recorded step, the grids uint8 ``[H, W, C]`` from
    :func:`image_grid` at the images' own resolution (one pixel per image pixel); ``interval``: milliseconds per
    frame (a GIF counts in tens). :meth:`gif` encodes it, :func:`animation_html` embeds it in a page, and Jupyter
    shows it directly.
    """

    frames: tuple
    interval: int = 120

    def canvases(self) -> list[np.ndarray]:
        """The frames as uint8 images [H', W', C]: the step ``t`` on top, then the two grids under their names,
        on white. Every frame has the same size and layout, so that only the grids change from frame to frame."""
        titles = [_text_image(f"$t = {t}$") for t, _, _ in self.frames]
        names = [_text_image(name) for name in (r"$x_t$", r"predicted $\hat x_0$")]
        title_height = max(title.shape[0] for title in titles)
        name_height = max(name.shape[0] for name in names)
        h, w, c = self.frames[0][1].shape
        gap, top = 6, title_height + name_height + 4
        blank = np.full((top + h + 1, 2 * w + gap, c), 255, dtype=np.uint8)
        for column, name in enumerate(names):  # the names sit on a common baseline
            _paste(blank, name, title_height + 2 + name_height - name.shape[0], column * (w + gap) + w // 2)
        out = []
        for title, (_, left, right) in zip(titles, self.frames):
            canvas = blank.copy()
            _paste(canvas, title, title_height - title.shape[0], canvas.shape[1] // 2)
            canvas[top:top + h, :w] = left
            canvas[top:top + h, w + gap:] = right
            out.append(canvas)
        return out

    def gif(self) -> bytes:
        """The animated GIF. One global palette serves every frame (``GIF_LEVELS`` greys, or a 6x6x6 colour cube
        for RGB images), each pixel mapped to its nearest entry without dithering, so a pixel that does not change
        keeps its index; a frame stores only its changed pixels, the others transparent over the previous frame."""
        import io

        from PIL import Image

        canvases = self.canvases()
        if canvases[0].shape[-1] == 3:
            levels = np.rint(np.stack(canvases).astype(np.float32) * (5 / 255)).astype(np.uint8)
            indices = levels[..., 0] * 36 + levels[..., 1] * 6 + levels[..., 2]
            palette = [51 * v for i in range(216) for v in (i // 36, i // 6 % 6, i % 6)]
        else:
            indices = np.rint(np.stack(canvases)[..., 0].astype(np.float32) * ((GIF_LEVELS - 1) / 255))
            indices = indices.astype(np.uint8)
            palette = [round(i * 255 / (GIF_LEVELS - 1)) for i in range(GIF_LEVELS) for _ in range(3)]
        transparent = len(palette) // 3
        palette += [255, 0, 255]  # the transparent entry: shown nowhere
        images = []
        for k, index in enumerate(indices):
            if k > 0:
                index = np.where(index == indices[k - 1], transparent, index).astype(np.uint8)
            image = Image.fromarray(index)
            image.putpalette(palette)
            images.append(image)
        out = io.BytesIO()
        images[0].save(out, format="GIF", save_all=True, append_images=images[1:], duration=self.interval, loop=0,
                       transparency=transparent, disposal=1, optimize=False)
        return out.getvalue()

    def _repr_html_(self) -> str:
        return animation_html(self)


def _text_image(text: str, size: float = 9.0) -> np.ndarray:
    """``text`` (mathtext allowed) rendered black on white at 72 dpi: uint8 [h, w], one pixel per point."""
    import io

    from matplotlib import mathtext
    from matplotlib.font_manager import FontProperties
    from PIL import Image

    buffer = io.BytesIO()
    mathtext.math_to_image(text, buffer, prop=FontProperties(size=size), dpi=72, format="png")
    image = Image.open(buffer).convert("RGBA")
    return np.asarray(Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("L"))


def _paste(canvas: np.ndarray, patch: np.ndarray, top: int, centre: int) -> None:
    """Paste a grey ``patch`` [h, w] into ``canvas`` [H, W, C], horizontally centred on column ``centre``."""
    h, w = patch.shape
    left = min(max(0, centre - w // 2), max(0, canvas.shape[1] - w))
    w = min(w, canvas.shape[1] - left)
    canvas[top:top + h, left:left + w] = patch[:, :w, None]


def trajectory_animation(frames: Sequence[tuple[int, Tensor, Tensor]], nrow: int | None = None,
                         interval: int = 120) -> TrajectoryAnimation:
    """An animation of x_t (left) and predicted x_0 (right) for a batch, ``nrow`` images per row of each grid.

    ``frames`` as a :class:`TrajectoryRecorder` keeps them: ``(t, x_t [N, C, H, W], pred_x0 [N, C, H, W])`` in
    [-1, 1]. :func:`animation_html` embeds the result in a page as a GIF.
    """
    if not frames:
        raise ValueError("trajectory_animation needs at least one frame; record some with TrajectoryRecorder")
    return TrajectoryAnimation(
        tuple((int(t), image_grid(x_t, nrow), image_grid(x0.clamp(-1, 1), nrow)) for t, x_t, x0 in frames),
        interval=interval,
    )


def save_png_grid(x: Tensor, path, nrow: int | None = None) -> None:
    """Write images ``x [N, C, H, W]`` in [-1, 1] as one PNG grid (``nrow`` per row, default about sqrt(N))."""
    from pathlib import Path

    from torchvision.utils import save_image

    nrow = nrow or max(1, int(math.ceil(math.sqrt(x.shape[0]))))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((x.float().clamp(-1, 1) + 1) / 2, str(path), nrow=nrow, padding=2, pad_value=1.0)


def animation_html(anim, fps: int | None = None, dpi: int = 72, alt: str = "animation") -> str:
    """An ``<img>`` tag holding ``anim`` as an animated GIF in a data URI.

    Self-contained: unlike ``anim.to_jshtml()``, it needs no script, no style sheet from a CDN and no network, and it
    plays in the HTML book, in Jupyter and in any browser. A :class:`TrajectoryAnimation` is stored at the images'
    own resolution and shown ``GIF_SCALE`` times larger with crisp pixels (``fps`` overrides its interval); any
    other matplotlib animation is rendered by matplotlib at ``dpi`` and ``fps`` (default 8).
    """
    import base64

    if isinstance(anim, TrajectoryAnimation):
        if fps is not None:
            anim = dataclasses.replace(anim, interval=10 * round(100 / fps))
        gif = anim.gif()
        width, height = int.from_bytes(gif[6:8], "little"), int.from_bytes(gif[8:10], "little")
        size = (f'width="{GIF_SCALE * width}" height="{GIF_SCALE * height}" '
                'style="image-rendering: pixelated" ')
    else:
        gif, size = _matplotlib_gif(anim, fps or 8, dpi), ""
    data = base64.b64encode(gif).decode("ascii")
    return f'<img src="data:image/gif;base64,{data}" {size}alt="{alt}">'


def _matplotlib_gif(anim, fps: int, dpi: int) -> bytes:
    """The bytes of a matplotlib animation saved as a GIF by Pillow."""
    import os
    import tempfile

    from matplotlib.animation import PillowWriter

    handle, path = tempfile.mkstemp(suffix=".gif")
    os.close(handle)
    try:
        anim.save(path, writer=PillowWriter(fps=fps), dpi=dpi)
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


def schedule_plot(schedules: Mapping[str, "object"]):
    """alpha_bar_t and log SNR against t / T for named schedules (Nichol & Dhariwal 2021, Fig. 5)."""
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.3))
    for name, sched in schedules.items():
        frac = (np.arange(sched.T) + 1) / sched.T
        ax1.plot(frac, sched.alpha_bar.numpy(), label=name)
        ax2.plot(frac, np.log(sched.snr().numpy()), label=name)
    ax1.set(xlabel="diffusion step t / T", ylabel=r"$\bar\alpha_t$")
    ax2.set(xlabel="diffusion step t / T", ylabel=r"$\log \mathrm{SNR}(t)$")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def points_figure(panels: Mapping[str, Tensor], lim: float | None = None, size: float = 3.0):
    """Scatter plots of 2-D point sets side by side, one panel per name."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size), squeeze=False)
    for ax, (name, pts) in zip(axes[0], panels.items()):
        pts = torch.as_tensor(pts).detach().cpu()
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
        ax.set_title(name, fontsize=10)
        ax.set_aspect("equal")
        if lim is not None:
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
    fig.tight_layout()
    return fig


def _square(ax, lim: float) -> None:
    ax.set_aspect("equal")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.tick_params(labelsize=7)


def field_figure(grid: Tensor, fields: Mapping[str, Tensor], clouds: Mapping[str, Tensor] | None = None,
                 cap: float | None = None, lim: float = 1.3, size: float = 3.6):
    """Vector fields of the plane, one panel per name: an arrow from each point of ``grid`` [M, 2] along its row of
    ``fields[name]`` [M, 2], over the points ``clouds[name]`` [K, 2] in gray. An arrow longer than ``cap`` (default:
    the grid's spacing) is drawn ``cap`` long in its own direction, so that the longest arrows, far from the data,
    do not cover the others; shorter arrows keep their length."""
    import matplotlib.pyplot as plt

    grid = torch.as_tensor(grid).detach().cpu().float()
    if cap is None:
        cap = float(np.diff(np.unique(grid[:, 0].numpy())).min())
    fig, axes = plt.subplots(1, len(fields), figsize=(size * len(fields), size), squeeze=False)
    for ax, (name, field) in zip(axes[0], fields.items()):
        field = torch.as_tensor(field).detach().cpu().float()
        length = field.norm(dim=1, keepdim=True)
        field = field * (cap / length.clamp(min=cap))
        if clouds is not None and name in clouds:
            cloud = torch.as_tensor(clouds[name]).detach().cpu()
            ax.scatter(cloud[:, 0], cloud[:, 1], s=1, alpha=0.25, color="gray")
        ax.quiver(grid[:, 0], grid[:, 1], field[:, 0], field[:, 1], angles="xy", scale_units="xy", scale=1,
                  color="C0", width=0.005, headwidth=4, headlength=4, headaxislength=3.5)
        ax.set_title(name, fontsize=10)
        _square(ax, lim)
    fig.tight_layout()
    return fig


def points_trajectories_figure(frames: Sequence[tuple[int, Tensor, Tensor]], early: Sequence[int],
                               late: Sequence[int], samples: Tensor, data: Tensor | None = None, paths_from: int = 100,
                               n_paths: int = 15, lims: tuple[float, float] = (2.5, 1.3), size: float = 2.3):
    """Reverse chains of 2-D points in two rows. Top, within ``lims[0]``: the cloud x_t at each of the ``early``
    steps. Bottom, zoomed to ``lims[1]``: the cloud at each of the ``late`` steps, the final ``samples`` [N, 2], and
    the paths of the first ``n_paths`` chains from ``paths_from`` to their sample (coloured by t from yellow to
    purple, ending on dots) over ``data`` in gray.

    ``frames``: ``(t, x_t [N, 2], pred_x0 [N, 2])`` as a :class:`TrajectoryRecorder` keeps them; they must hold
    each step shown and every t below ``paths_from`` (``TrajectoryRecorder()`` keeps all).
    """
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    points = {t: x.cpu() for t, x, _ in frames}
    missing = sorted((set(early) | set(late) | set(range(paths_from + 1))) - set(points))
    if missing:
        raise ValueError(f"frames lack steps {missing[:4]}...: record every step with TrajectoryRecorder()")
    ncols = max(len(early), len(late) + 2)
    fig, axes = plt.subplots(2, ncols, figsize=(size * ncols, 2 * size + 0.2), squeeze=False)
    rows = [{f"t = {t}": points[t] for t in early}, {f"t = {t}": points[t] for t in late} | {"samples": samples}]
    for row, (panels, lim) in enumerate(zip(rows, lims)):
        for ax, (name, cloud) in zip(axes[row], panels.items()):
            ax.scatter(cloud[:, 0], cloud[:, 1], s=1, alpha=0.4)
            ax.set_title(name, fontsize=10)
            _square(ax, lim)
        for ax in axes[row, len(panels) + row:]:
            ax.set_axis_off()
    ax = axes[1, len(rows[1])]
    if data is not None:
        ax.scatter(data[:, 0], data[:, 1], s=1, alpha=0.2, color="gray")
    path = torch.stack([points[t][:n_paths] for t in range(paths_from, -1, -1)] + [samples[:n_paths].cpu()], 1)
    segments = torch.stack([path[:, :-1], path[:, 1:]], 2).reshape(-1, 2, 2)
    ax.add_collection(LineCollection(segments.numpy(), array=np.tile(np.arange(paths_from, -1, -1), len(path)),
                                     cmap="viridis", linewidths=0.8))
    ax.scatter(path[:, -1, 0], path[:, -1, 1], s=8, color="black", zorder=3)
    ax.set_title(f"paths from t = {paths_from}", fontsize=10)
    _square(ax, lims[1])
    fig.tight_layout()
    return fig


def provenance(trained, *, sampler: str, nfe: int, seed: int) -> str:
    """The line printed under a figure of samples: the training provenance of ``trained`` (a
    ``ddpm.cache.TrainedModel``: profile, device, steps, wall time, checkpoint hash) and how the samples
    were drawn (sampler, number of model evaluations, seed)."""
    return wrap(f"Provenance: {trained.provenance()}; sampler {sampler}, {nfe} model evaluations, seed {seed}.")

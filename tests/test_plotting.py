import base64
import io

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from ddpm.plotting import (GIF_LEVELS, GIF_SCALE, TrajectoryRecorder, animation_html, field_figure,  # noqa: E402
                           forward_strip, image_grid, points_trajectories_figure, schedule_plot, to_uint8,
                           trajectory_animation, trajectory_figure)
from ddpm.samplers import ddim_sample  # noqa: E402
from ddpm.schedule import NoiseSchedule  # noqa: E402


def test_to_uint8_maps_the_8_bit_grid_exactly():
    levels = torch.arange(256, dtype=torch.float64)
    x = (levels / 127.5 - 1).reshape(1, 1, 16, 16)
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 16, 16, 1)
    assert np.array_equal(out.reshape(-1), np.arange(256))
    assert to_uint8(torch.full((1, 3, 2, 2), 5.0)).max() == 255  # clamped
    with pytest.raises(ValueError, match="shape"):
        to_uint8(torch.zeros(3, 4))


def test_image_grid_layout():
    x = torch.linspace(-1, 1, 5).reshape(5, 1, 1, 1).expand(5, 1, 3, 3)
    grid = image_grid(x, nrow=2, padding=1)
    assert grid.shape == (3 * 4 + 1, 2 * 4 + 1, 1)
    assert grid[1, 1, 0] == 0 and grid[1, 5, 0] == to_uint8(x[1:2])[0, 0, 0, 0]
    assert (grid[0] == 255).all()


def test_recorder_and_figures():
    sched = NoiseSchedule.linear(100)
    rec = TrajectoryRecorder(keep=5, total=20)
    ddim_sample(lambda x, t, y=None: torch.zeros_like(x), sched, (2, 1, 4, 4), steps=20, callback=rec,
                device="cpu")
    assert len(rec.frames) == 5 and rec.frames[0][0] == 99 and rec.frames[-1][0] == 4  # trailing: 99, 94, ..., 4
    for fig in (trajectory_figure(rec.frames), forward_strip(sched, torch.zeros(2, 1, 4, 4), [0, 50, 99]),
                schedule_plot({"linear": sched, "cosine": NoiseSchedule.cosine(100)})):
        assert fig.axes
    html = animation_html(trajectory_animation(rec.frames), alt="trajectory")
    assert html.startswith('<img src="data:image/gif;base64,') and html.endswith('alt="trajectory">')
    assert "http" not in html and "<script" not in html  # self-contained: nothing fetched, nothing run
    from PIL import Image

    gif = Image.open(io.BytesIO(base64.b64decode(html.split(",", 1)[1].split('"', 1)[0])))
    assert gif.format == "GIF" and gif.n_frames == len(rec.frames)


def _gif_of(html: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(html.split(",", 1)[1].split('"', 1)[0])))


def _digit_run(n_frames: int = 40, n: int = 16, size: int = 28, seed: int = 0):
    """A fixed stand-in for the sampling page's animation: 16 ring-shaped "digits" (white strokes on black) along
    40 steps of a 1,000-step linear schedule. x_t carries the schedule's noise, drifting from frame to frame like a
    chain; the prediction of x_0 is the ring blurred less and less, as a trained model's prediction sharpens."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    radius = ((yy - (size - 1) / 2) ** 2 + (xx - (size - 1) / 2) ** 2).sqrt()
    ring_radius = 5 + 5 * torch.rand(n, 1, 1, 1, generator=g)
    schedule = NoiseSchedule.linear(1000)
    noise = torch.randn(n, 1, size, size, generator=g)
    frames = []
    for t in np.linspace(999, 0, n_frames).round().astype(int).tolist():
        a = schedule.alpha_bar[t].float()
        noise = 0.9 * noise + 0.19 ** 0.5 * torch.randn(noise.shape, generator=g)
        width = 1.0 + 3.0 * float((1 - a).sqrt())
        x0 = 2 * torch.exp(-((radius - ring_radius) ** 2) / (2 * width ** 2)) - 1
        frames.append((t, a.sqrt() * x0 + (1 - a).sqrt() * noise, x0))
    return frames


def test_the_animation_gif_is_small_exact_and_plays_every_frame():
    """40 frames of 16 digits in two panels: a few hundred kB at most (the matplotlib rendering it replaces took
    2.1 MB for this input), one global palette of GIF_LEVELS greys, and every decoded frame equal to its frame
    mapped to the nearest grey: no dithering, no per-frame palette."""
    frames = _digit_run()
    anim = trajectory_animation(frames, nrow=4)
    html = animation_html(anim, alt="a run")
    gif = _gif_of(html)
    raw = base64.b64decode(html.split(",", 1)[1].split('"', 1)[0])
    assert len(raw) < 400_000, f"the GIF takes {len(raw):,} bytes"
    assert gif.n_frames == len(frames)
    assert gif.info["duration"] == anim.interval and gif.info.get("loop") == 0
    greys = np.round(np.arange(GIF_LEVELS) * 255 / (GIF_LEVELS - 1)).astype(np.uint8)
    for k, canvas in enumerate(anim.canvases()):
        gif.seek(k)
        decoded = np.asarray(gif.convert("L"))
        expected = greys[np.rint(canvas[..., 0] * ((GIF_LEVELS - 1) / 255)).astype(int)]
        assert np.array_equal(decoded, expected), f"frame {k} differs from its quantised canvas"
    # one pixel per image pixel, shown GIF_SCALE times larger with crisp pixels
    h, w = anim.frames[0][1].shape[:2]
    assert gif.size[0] == 2 * w + 6 and gif.size[1] > h
    assert f'width="{GIF_SCALE * gif.size[0]}" height="{GIF_SCALE * gif.size[1]}"' in html
    assert "image-rendering: pixelated" in html


def test_an_unchanged_frame_costs_almost_nothing():
    """Only the pixels that change are stored: a run whose images stay the same pays for its step labels only."""
    frames = _digit_run(n_frames=2)
    still = [(t, frames[0][1], frames[0][2]) for t in range(39, -1, -1)]
    one = len(trajectory_animation(still[:1], nrow=4).gif())
    forty = len(trajectory_animation(still, nrow=4).gif())
    assert forty < one + 39 * 400, (one, forty)


def test_colour_images_animate_through_a_colour_cube():
    g = torch.Generator().manual_seed(1)
    frames = [(t, torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.rand(4, 3, 8, 8, generator=g) * 2 - 1)
              for t in (20, 10, 0)]
    anim = trajectory_animation(frames, nrow=2)
    gif = _gif_of(animation_html(anim))
    assert gif.n_frames == 3
    for k, canvas in enumerate(anim.canvases()):
        gif.seek(k)
        error = np.abs(np.asarray(gif.convert("RGB")).astype(int) - canvas.astype(int))
        assert error.max() <= 26, f"frame {k}: a colour is off by {error.max()}"  # half a step of 51
    with pytest.raises(ValueError, match="TrajectoryRecorder"):
        trajectory_animation([])


def test_a_matplotlib_animation_still_embeds():
    import matplotlib.pyplot as plt
    from matplotlib import animation

    fig, ax = plt.subplots(figsize=(1, 1))
    line, = ax.plot([0, 1], [0, 0])
    anim = animation.FuncAnimation(fig, lambda i: line.set_ydata([0, i]) or (line,), frames=3)
    gif = _gif_of(animation_html(anim, fps=4, dpi=30))
    plt.close(fig)
    assert gif.format == "GIF" and gif.n_frames == 3


def test_field_figure_caps_long_arrows_and_keeps_short_ones():
    axis = torch.linspace(-1, 1, 5)  # spacing 0.5
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    field = -grid * torch.linspace(0.1, 2.0, len(grid)).unsqueeze(1)
    fig = field_figure(grid, {"pull": field}, {"pull": torch.zeros(3, 2)})
    quiver = [c for c in fig.axes[0].collections if hasattr(c, "U")][0]
    drawn = np.hypot(quiver.U, quiver.V)
    true = field.norm(dim=1).numpy()
    assert drawn.max() <= 0.5 + 1e-6
    assert np.allclose(drawn, np.minimum(true, 0.5), atol=1e-6)
    directions = np.stack([quiver.U, quiver.V], 1) / np.maximum(drawn, 1e-12)[:, None]
    moving = true > 0
    assert np.allclose(directions[moving], (field[moving] / field[moving].norm(dim=1, keepdim=True)).numpy(), atol=1e-5)


def test_points_trajectories_figure_needs_every_late_step():
    sched = NoiseSchedule.linear(50)
    rec = TrajectoryRecorder()
    x0 = ddim_sample(lambda x, t, y=None: torch.zeros_like(x), sched, (30, 2), callback=rec, device="cpu")
    fig = points_trajectories_figure(rec.frames, early=[49, 30], late=[20, 10], samples=x0, paths_from=20,
                                     n_paths=5)
    assert len([ax for ax in fig.axes if ax.axison]) == 2 + 2 + 2
    sparse = TrajectoryRecorder(keep=5, total=50)
    ddim_sample(lambda x, t, y=None: torch.zeros_like(x), sched, (30, 2), callback=sparse, device="cpu")
    with pytest.raises(ValueError, match="TrajectoryRecorder"):
        points_trajectories_figure(sparse.frames, early=[49], late=[20], samples=x0, paths_from=20)

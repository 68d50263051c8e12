import base64
import io

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from ddpm.plotting import (TrajectoryRecorder, forward_strip, image_grid, schedule_plot, to_uint8,  # noqa: E402
                           animation_html, trajectory_animation, trajectory_figure)
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

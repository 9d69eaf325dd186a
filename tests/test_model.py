"""Tests of :mod:`tl_core.model`, for every registered backbone with random weights at a small size:
freezing by strategy (every frozen parameter gets no gradient, every trainable one does), the head,
the per-stage summary, the batch-norm policy and discriminative learning rates."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tl_core.backbones import get_backbone, list_backbones
from tl_core.model import (
    STRATEGIES,
    HeadConfig,
    TransferModel,
    build_model,
    conv_bn_pairs,
    default_trainable_stages,
    fold_batchnorm,
)

ALL = list_backbones()
HEAVY = {"vgg16", "vit_b_16"}  # a backward pass of either takes seconds on a CPU
NUM_CLASSES = 3


def _gradient_cases():
    """Every backbone and strategy; for the heavy backbones only ``partial`` (frozen and trainable
    parameters side by side) runs by default, the other two are slow tests."""
    return [
        pytest.param(n, s, marks=pytest.mark.slow) if n in HEAVY and s != "partial" else (n, s)
        for n in ALL
        for s in STRATEGIES
    ]


def small_size(name: str) -> int:
    return 224 if get_backbone(name).cam_reshape == "vit" else 64


@pytest.fixture(scope="module")
def transfer_model(random_net):
    """``transfer_model(name)``: one TransferModel per backbone for the module; tests set its strategy."""
    models: dict[str, TransferModel] = {}

    def get(name: str) -> TransferModel:
        if name not in models:
            models[name] = build_model(name, NUM_CLASSES, pretrained_module=random_net(name))
        model = models[name]
        model.zero_grad(set_to_none=True)
        return model

    return get


def _stage_params(model: TransferModel) -> dict[str, list[nn.Parameter]]:
    out: dict[str, list[nn.Parameter]] = {s: [] for s in model.spec.stage_names}
    for name, p in model.backbone.named_parameters():
        out[model.spec.stage_of(name)].append(p)
    return out


def _bn_layers(model: TransferModel) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {n: m for n, m in model.backbone.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


# --------------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize(("name", "strategy"), _gradient_cases())
def test_only_trainable_parameters_get_gradients(name, strategy, transfer_model):
    model = transfer_model(name)
    model.set_strategy(strategy)
    model.train()
    size = small_size(name)
    batch = 1 if get_backbone(name).cam_reshape == "vit" else 2  # batch norm needs 2 in train mode
    torch.manual_seed(0)
    logits = model(torch.randn(batch, 3, size, size))
    assert logits.shape == (batch, NUM_CLASSES)
    nn.functional.cross_entropy(logits, torch.arange(batch) % NUM_CLASSES).backward()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert not with_grad & set(frozen), f"frozen parameters got gradients: {sorted(with_grad & set(frozen))[:5]}"
    missing = sorted(set(trainable) - with_grad)
    assert not missing, f"trainable parameters without gradients: {missing[:5]}"
    assert all(n.startswith("head.") for n in trainable) == (strategy == "frozen")
    assert model.backbone_is_frozen == (strategy == "frozen")
    if strategy == "full":
        assert not frozen
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ALL)
def test_head_replaces_the_classifier(name, transfer_model):
    model = transfer_model(name)
    s = model.spec
    assert isinstance(model.backbone.get_submodule(s.classifier), nn.Identity)
    linears = [m for m in model.head if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and (linears[0].in_features, linears[0].out_features) == (s.feature_dim, NUM_CLASSES)
    hidden = build_model(name, 4, head=HeadConfig(hidden=32, dropout=0.1), pretrained_module=model.backbone)
    sizes = [(m.in_features, m.out_features) for m in hidden.head if isinstance(m, nn.Linear)]
    assert sizes == [(s.feature_dim, 32), (32, 4)]


# --------------------------------------------------------------------------------------------------
# Stages


@pytest.mark.parametrize("name", ALL)
def test_partial_trains_exactly_the_last_k_stages(name, transfer_model):
    model = transfer_model(name)
    names = model.spec.stage_names
    n = len(names)
    for k in sorted({1, default_trainable_stages(model.spec), n}):
        model.set_strategy("partial", trainable_stages=k)
        assert model.trainable_stages == k
        assert model.frozen_stage_names() == names[: n - k]
        for stage, params in _stage_params(model).items():
            expected = stage in names[n - k :]
            assert all(p.requires_grad == expected for p in params), f"k={k}: stage {stage}"
        assert all(p.requires_grad for p in model.head.parameters())
    model.set_strategy("partial")
    assert model.trainable_stages == default_trainable_stages(model.spec) >= 1
    for bad in (0, n + 1):
        with pytest.raises(ValueError, match=f"1..{n}"):
            model.set_strategy("partial", trainable_stages=bad)


@pytest.mark.parametrize("name", ALL)
def test_stage_summary_sums_to_the_parameter_count(name, transfer_model):
    model = transfer_model(name)
    for strategy, k in (("frozen", None), ("partial", 1), ("full", None)):
        model.set_strategy(strategy, trainable_stages=k)
        summary = model.stage_summary()
        trainable, total = model.count_params()
        assert int(summary["trainable"].sum()) == trainable
        assert int((summary["trainable"] + summary["frozen"]).sum()) == total
        assert list(summary["stage"]) == model.spec.stage_names + ["new head"]  # no "other" rows
        statuses = dict(zip(summary["stage"], summary["status"]))
        assert statuses["new head"] == "trains (new)"
        if strategy == "frozen":
            assert {statuses[s] for s in model.spec.stage_names} == {"frozen"}
        if strategy == "partial":
            assert statuses[model.spec.stage_names[-1]] == "trains"
            assert statuses[model.spec.stage_names[0]] == "frozen"


def test_trainable_stages_only_with_partial():
    model = build_model("mobilenet_v3_small", 2, weights="random")
    for strategy in ("frozen", "full"):
        with pytest.raises(ValueError, match="partial"):
            model.set_strategy(strategy, trainable_stages=2)
        with pytest.raises(ValueError, match="partial"):
            build_model(
                "mobilenet_v3_small", 2, strategy=strategy, trainable_stages=2, pretrained_module=model.backbone
            )
    with pytest.raises(ValueError, match="unknown strategy"):
        model.set_strategy("half")


def test_builder_refuses_contradictions(random_net):
    with pytest.raises(ValueError, match="either pretrained_module or weights"):
        build_model("mobilenet_v3_small", 2, weights="random", pretrained_module=random_net("mobilenet_v3_small"))
    with pytest.raises(ValueError, match="at least 2 classes"):
        build_model("mobilenet_v3_small", 1, pretrained_module=random_net("mobilenet_v3_small"))


# --------------------------------------------------------------------------------------------------
# Batch-norm policy


@pytest.mark.parametrize("name", ALL)
def test_batchnorm_of_frozen_stages_keeps_its_statistics(name, transfer_model):
    """In train mode, BN layers of frozen stages stay in eval mode (running stats unchanged by a forward
    pass); BN layers of trainable stages train and update their statistics."""
    model = transfer_model(name)
    bns = _bn_layers(model)
    if not bns:
        pytest.skip(f"{name} has no batch norm")
    names = model.spec.stage_names
    bn_stages = {model.spec.stage_of(n) for n in bns}
    # The fewest last stages that include a batch-norm layer, so both kinds are present.
    k = next(k for k in range(1, len(names)) if bn_stages & set(names[-k:]))
    model.set_strategy("partial", trainable_stages=k)
    model.eval().train()  # toggling must not undo the policy
    before = {n: m.running_mean.clone() for n, m in bns.items()}
    size = small_size(name)
    with torch.no_grad():
        model(torch.randn(4, 3, size, size) * 3 + 1)
    frozen = set(model.frozen_stage_names())
    for n, m in bns.items():
        changed = not torch.equal(before[n], m.running_mean)
        if model.spec.stage_of(n) in frozen:
            assert not m.training and not changed, f"{n} (frozen stage) updated its statistics"
        else:
            assert m.training and changed, f"{n} (trainable stage) did not train"
    model.set_strategy("full")
    model.train()
    assert all(m.training for m in bns.values())
    model.set_strategy("frozen")
    model.train()
    assert not any(m.training for m in bns.values())
    assert model.head.training  # the head's dropout does train
    model.eval()
    assert not model.head.training


# --------------------------------------------------------------------------------------------------
# Optimisation


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_discriminative_learning_rates(strategy, transfer_model):
    model = transfer_model("mobilenet_v3_small")
    model.set_strategy(strategy)
    groups = model.param_groups(lr=0.01, backbone_lr_mult=0.1, weight_decay=0.05)
    head_ids = {id(p) for p in model.head.parameters()}
    seen: list[int] = []
    for g in groups:
        ids = {id(p) for p in g["params"]}
        seen += list(ids)
        if ids <= head_ids:
            assert g["lr"] == pytest.approx(0.01) and g["lr_scale"] == 1.0
        else:
            assert not ids & head_ids
            assert g["lr"] == pytest.approx(0.001) and g["lr_scale"] == 0.1
        assert g["weight_decay"] == (0.0 if all(p.ndim <= 1 for p in g["params"]) else 0.05)
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable), "every trainable parameter in exactly one group"
    backbone_groups = [g for g in groups if g["lr_scale"] == 0.1]
    assert bool(backbone_groups) == (strategy != "frozen")
    torch.optim.AdamW(groups)  # the groups are valid optimizer input


@pytest.mark.parametrize("name", [n for n in list_backbones() if n not in ("vgg16", "vit_b_16")])
def test_fold_batchnorm_computes_the_same_features(name, random_net):
    """The frozen path's folded copy equals the network, with non-trivial batch-norm statistics."""
    net = random_net(name)
    torch.manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    size = 224 if name.startswith("vit") else 64
    x = torch.randn(3, 3, size, size)
    folded = fold_batchnorm(net, example=x)
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert (folded is not net) == has_bn
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.inference_mode():
        ref, out = net.eval()(x), folded(x)
    assert torch.allclose(out, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()) + 1e-6)


def test_fold_batchnorm_refuses_a_mismatched_fold():
    """A conv and batch norm registered side by side but not used in that order are left alone."""

    class Crossed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)
            with torch.no_grad():
                self.bn.running_mean.fill_(2.0)

        def forward(self, x):
            return self.conv(self.bn(x))  # batch norm first: folding it after the conv would be wrong

    net = Crossed().eval()
    assert fold_batchnorm(net, example=torch.randn(2, 3, 8, 8)) is net


def test_fold_batchnorm_pairs_layers_by_data_flow_not_registration_order():
    """A batch norm registered before its convolution is still folded; a conv feeding two layers is not."""

    class Reordered(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn_shared = nn.BatchNorm2d(4)
            self.conv_shared = nn.Conv2d(4, 4, 1)
            with torch.no_grad():
                for bn in (self.bn, self.bn_shared):
                    bn.running_mean.uniform_(-1, 1)
                    bn.running_var.uniform_(0.5, 2.0)

        def forward(self, x):
            y = self.conv_shared(self.bn(self.conv(x)))
            return self.bn_shared(y) + y  # the conv's output is also used unnormalised: no fold

    torch.manual_seed(0)
    net = Reordered().eval()
    assert conv_bn_pairs(net) == [("conv", "bn")]
    x = torch.randn(2, 3, 8, 8)
    folded = fold_batchnorm(net, example=x)
    assert isinstance(folded.bn, nn.Identity) and isinstance(folded.bn_shared, nn.BatchNorm2d)
    with torch.inference_mode():
        assert torch.allclose(folded(x), net(x), atol=1e-5)


def test_folding_on_one_thread_leaves_forward_passes_on_others_alone(random_net):
    """torch.fx patches ``nn.Module.__call__`` process-wide while it traces; the studio runs forward passes
    on other threads meanwhile (training, a recommendation, another session), which must not notice."""
    import threading

    net = copy.deepcopy(random_net("efficientnet_lite0")).eval()
    other = copy.deepcopy(net)
    x = torch.randn(1, 3, 64, 64)
    errors: list[BaseException] = []
    done = threading.Event()

    def forward_passes() -> None:
        with torch.inference_mode():
            while not done.is_set():
                try:
                    other(x)
                except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                    errors.append(exc)
                    return

    thread = threading.Thread(target=forward_passes)
    thread.start()
    try:
        for _ in range(5):
            assert conv_bn_pairs(net)
    finally:
        done.set()
        thread.join()
    assert not errors, errors

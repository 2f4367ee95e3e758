"""SPEC §2: backbones, cosine heads, head growth, imprinting, frozen old rows, weight transfer."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mnemonics_fast.models import (CosineLinear, SplitCosineLinear, TransferConv2d, apply_weight_transfer, build_model,
                                   grow_head, imprint_weights, resnet18, resnet32)
from mnemonics_fast.models.resnet_cifar import BasicBlock


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ ResNet-32
def test_resnet32_structure():
    net = resnet32()
    stages = [net.layer1, net.layer2, net.layer3]
    assert [len(s) for s in stages] == [5, 5, 5]
    assert [s[0].conv1.out_channels for s in stages] == [16, 32, 64]
    assert [s[0].conv1.stride[0] for s in stages] == [1, 2, 2]
    assert net.conv1.in_channels == 3 and net.conv1.out_channels == 16 and net.conv1.kernel_size == (3, 3)
    assert net.out_dim == 64
    blocks = [b for s in stages for b in s]
    assert all(isinstance(b, BasicBlock) for b in blocks)
    # Projection shortcuts (1x1 conv + BN) exactly where the shape changes: first block of stages 2 and 3.
    for i, b in enumerate(blocks):
        if i in (5, 10):
            conv, bn = b.downsample
            assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (2, 2)
            assert isinstance(bn, nn.BatchNorm2d)
        else:
            assert b.downsample is None
    # Only the very last block drops its final ReLU.
    assert [b.last_relu for b in blocks] == [True] * 14 + [False]
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 15 * 2 + 2


def test_resnet32_init():
    net = resnet32()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    # Kaiming-normal fan_out: std = sqrt(2 / (out * k * k)).
    w = net.layer3[1].conv1.weight
    expected = math.sqrt(2.0 / (64 * 9))
    assert abs(float(w.detach().std()) - expected) / expected < 0.1


def test_resnet32_output_and_no_final_relu():
    torch.manual_seed(0)
    net = resnet32().eval()
    x = torch.randn(4, 3, 32, 32, generator=_gen(1))
    f = net(x)
    assert f.shape == (4, 64)
    # No ReLU after the last residual add: the pooled feature takes negative values.
    assert (f < 0).any() and (f > 0).any()
    # It is exactly the pooled output of the last block, without a ReLU applied.
    h = net.relu(net.bn1(net.conv1(x)))
    h = net.layer3(net.layer2(net.layer1(h)))
    assert torch.allclose(f, h.mean((2, 3)), atol=1e-6)
    # Any size >= 4 works (the tests use 8x8 images).
    assert net(torch.randn(2, 3, 8, 8, generator=_gen(2))).shape == (2, 64)


def test_resnet18_structure_and_output():
    torch.manual_seed(0)
    net = resnet18().eval()
    assert net.out_dim == 512
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        assert len(layer) == 2
    assert [b.last_relu for l in (net.layer1, net.layer2, net.layer3, net.layer4) for b in l] == [True] * 7 + [False]
    f = net(torch.randn(2, 3, 64, 64, generator=_gen(3)))
    assert f.shape == (2, 512)
    assert (f < 0).any()


# ------------------------------------------------------------------ cosine heads
def test_cosine_linear_is_sigma_times_cos():
    torch.manual_seed(0)
    head = CosineLinear(16, 5)
    bound = 1 / math.sqrt(16)
    assert float(head.weight.detach().abs().max()) <= bound and float(head.sigma.detach()) == 1.0
    with torch.no_grad():
        head.sigma.fill_(3.5)
    x = torch.randn(7, 16, generator=_gen(4))
    expected = 3.5 * torch.stack([torch.stack([F.cosine_similarity(xi, wc, dim=0) for wc in head.weight])
                                  for xi in x])
    logits, cos = head(x, return_cos=True)
    assert torch.allclose(logits, expected, atol=1e-5)
    assert torch.allclose(cos, expected / 3.5, atol=1e-6)
    assert torch.allclose(head(x), logits)
    assert cos.abs().max() <= 1 + 1e-6


def test_split_cosine_linear_equals_concatenated_cosine_linear():
    torch.manual_seed(0)
    split = SplitCosineLinear(16, 4, 3)
    assert split.fc1.sigma is None and split.fc2.sigma is None        # one shared sigma
    assert [n for n, _ in split.named_parameters() if "sigma" in n] == ["sigma"]
    with torch.no_grad():
        split.sigma.fill_(2.25)
    full = CosineLinear(16, 7)
    with torch.no_grad():
        full.weight.copy_(torch.cat([split.fc1.weight, split.fc2.weight]))
        full.sigma.fill_(2.25)
    x = torch.randn(5, 16, generator=_gen(5))
    a, ca = split(x, return_cos=True)
    b, cb = full(x, return_cos=True)
    assert a.shape == (5, 7) and split.num_classes == 7
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(ca, cb, atol=1e-6)


def test_grow_head_carries_sigma_and_old_rows():
    torch.manual_seed(0)
    head = CosineLinear(8, 4)
    with torch.no_grad():
        head.sigma.fill_(4.75)
    g1 = grow_head(head, 3)
    assert isinstance(g1, SplitCosineLinear) and g1.num_old == 4 and g1.num_new == 3
    assert torch.equal(g1.fc1.weight, head.weight)
    assert float(g1.sigma.detach()) == 4.75 and g1.sigma.requires_grad
    assert not g1.fc1.weight.requires_grad and g1.fc2.weight.requires_grad
    # The next growth freezes every row so far, old and new.
    with torch.no_grad():
        g1.sigma.fill_(5.5)
    g2 = grow_head(g1, 2)
    assert g2.num_old == 7 and g2.num_new == 2
    assert torch.equal(g2.fc1.weight, torch.cat([head.weight, g1.fc2.weight]))
    assert float(g2.sigma.detach()) == 5.5


def test_imprinting_formula():
    torch.manual_seed(0)
    head = grow_head(CosineLinear(6, 3), 2)
    feats = [torch.randn(9, 6, generator=_gen(6)) * 3 + 1, torch.randn(4, 6, generator=_gen(7)) - 2]
    imprint_weights(head, feats)
    old_norm = head.fc1.weight.norm(dim=1).mean()
    for c, f in enumerate(feats):
        fn = f / f.norm(dim=1, keepdim=True)
        proto = fn.mean(0)
        expected = proto / proto.norm() * old_norm
        assert torch.allclose(head.fc2.weight[c], expected, atol=1e-6)
    with pytest.raises(ValueError):
        imprint_weights(head, feats[:1])


def test_frozen_old_rows_survive_an_optimizer_step(tmp_path):
    """The trainer's own train_model: weight decay and momentum must not move the old rows; new rows and sigma move."""
    from conftest import tiny_config
    from mnemonics_fast.methods import PhaseInfo
    from mnemonics_fast.trainer import Trainer
    from mnemonics_fast.trainer.metrics import RunLog

    cfg = tiny_config(tmp_path, **{"train.weight_decay": 0.01})
    tr = Trainer(cfg)
    tr.runlog = RunLog(tmp_path, False, False)
    torch.manual_seed(0)
    model = build_model("resnet32", (0.5,) * 3, (0.25,) * 3, num_classes=3)
    teacher = build_model("resnet32", (0.5,) * 3, (0.25,) * 3, num_classes=3).eval()
    teacher.load_state_dict(model.state_dict())
    model.grow(2)
    old_rows = model.head.fc1.weight.detach().clone()
    new_rows = model.head.fc2.weight.detach().clone()
    sigma = float(model.head.sigma.detach())
    conv = model.backbone.conv1.weight.detach().clone()

    class Loader:
        def __init__(self):
            g = _gen(8)
            self.batches = [(torch.rand(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g))
                            for _ in range(3)]

        def set_epoch(self, e):
            pass

        def __len__(self):
            return len(self.batches)

        def __iter__(self):
            return iter(self.batches)

    tr.train_model(model, teacher, Loader(), PhaseInfo(1, 3, 2), epochs=2, lr=0.1, milestones=[1])
    assert torch.equal(model.head.fc1.weight, old_rows)
    assert not torch.equal(model.head.fc2.weight, new_rows)
    assert float(model.head.sigma.detach()) != sigma
    assert not torch.equal(model.backbone.conv1.weight, conv)


def test_frozen_old_rows_across_a_real_run(lucir_run):
    """Checkpoints of a real run: phase p's old rows are exactly the rows the model had at the end of phase p-1."""
    ck = [torch.load(lucir_run.run_dir / "checkpoints" / f"phase_{p:03d}.pt", weights_only=False) for p in range(3)]
    w0 = ck[0]["model"]["head.weight"]
    assert w0.shape[0] == 2
    assert torch.equal(ck[1]["model"]["head.fc1.weight"], w0)
    prev = torch.cat([ck[1]["model"]["head.fc1.weight"], ck[1]["model"]["head.fc2.weight"]])
    assert torch.equal(ck[2]["model"]["head.fc1.weight"], prev)
    assert ck[2]["model"]["head.fc2.weight"].shape[0] == 2


# ------------------------------------------------------------------ weight transfer
def test_weight_transfer_conversion():
    torch.manual_seed(0)
    net = build_model("resnet32", (0.5,) * 3, (0.25,) * 3, num_classes=4)
    # Non-trivial BN statistics, then eval mode so that the comparison is deterministic.
    net.train()
    with torch.no_grad():
        net(torch.rand(16, 3, 8, 8, generator=_gen(9)))
    net.eval()
    x = torch.rand(4, 3, 8, 8, generator=_gen(10))
    before = net(x).detach()
    kernels = {n: m.weight.detach().clone() for n, m in net.backbone.named_modules() if isinstance(m, nn.Conv2d)}
    n = apply_weight_transfer(net.backbone)
    assert n == len(kernels) == 33
    assert not any(isinstance(m, nn.Conv2d) for m in net.backbone.modules())
    for name, w in kernels.items():
        m = net.backbone.get_submodule(name)
        assert isinstance(m, TransferConv2d)
        assert torch.equal(m.frozen_weight, w)
        assert m.scale.shape == (w.shape[0], w.shape[1], 1, 1)
        assert torch.all(m.scale == 1) and m.scale.requires_grad
    buffers = dict(net.named_buffers())
    params = dict(net.named_parameters())
    assert all(f"backbone.{n}.frozen_weight" in buffers for n in kernels)
    assert not any(n.endswith("frozen_weight") for n in params)
    # BN stays trainable.
    assert net.backbone.bn1.weight.requires_grad
    # Right after conversion nothing changes.
    assert torch.allclose(net(x), before, atol=1e-6)
    # Idempotent: a second call converts nothing and keeps the learnt scales.
    with torch.no_grad():
        net.backbone.conv1.scale.mul_(2)
    assert apply_weight_transfer(net.backbone) == 0
    assert torch.all(net.backbone.conv1.scale == 2)
    assert net.structure()["weight_transfer"]


def test_weight_transfer_kernels_frozen_in_a_real_run(icarl_run):
    """model.weight_transfer=true: kernels at the last phase equal the phase-0 conv weights; scales were trained."""
    ckdir = icarl_run.run_dir / "checkpoints"
    s0 = torch.load(ckdir / "phase_000.pt", weights_only=False)["model"]
    last = torch.load(ckdir / "phase_004.pt", weights_only=False)["model"]
    convs = [k[: -len(".weight")] for k in s0 if k.startswith("backbone.") and s0[k].dim() == 4]
    assert len(convs) == 33
    moved = 0
    for c in convs:
        assert torch.equal(last[c + ".frozen_weight"], s0[c + ".weight"])
        moved += not torch.all(last[c + ".scale"] == 1)
    assert moved > 0


def test_build_model_from_structure_roundtrip():
    torch.manual_seed(0)
    net = build_model("resnet32", (0.5,) * 3, (0.25,) * 3, num_classes=3)
    net.grow(2, weight_transfer=True)
    net.grow(2, weight_transfer=True)
    st = net.structure()
    assert st == {"arch": "resnet32", "num_old": 5, "num_new": 2, "weight_transfer": True}
    empty = build_model("resnet32", (0.5,) * 3, (0.25,) * 3, structure=st)
    empty.load_state_dict(net.state_dict())
    x = torch.rand(2, 3, 8, 8, generator=_gen(11))
    assert torch.equal(empty.eval()(x), net.eval()(x))


def test_imprinting_in_a_run_uses_eval_features_of_the_previous_model(tmp_path, monkeypatch):
    """The rows imprinted at the start of phase 1 == the formula on eval-mode, un-augmented features of the phase-0
    model (the checkpoint), times the mean norm of its rows."""
    import mnemonics_fast.trainer.loop as loop
    from conftest import run_trainer, tiny_config

    captured = []
    orig = loop.imprint_weights

    def spy(head, feats):
        orig(head, feats)
        captured.append(head.fc2.weight.detach().clone())

    monkeypatch.setattr(loop, "imprint_weights", spy)
    run = run_trainer(tiny_config(tmp_path, **{"protocol.num_phases": 1, "data.synthetic_classes": 4,
                                               "train.epochs": 1, "train.milestones": []}))
    assert len(captured) == 1
    tr = run.trainer
    state = torch.load(run.run_dir / "checkpoints" / "phase_000.pt", weights_only=False)
    model0 = build_model("resnet32", tr.ds.mean, tr.ds.std, structure=state["structure"])
    model0.load_state_dict(state["model"])
    model0.eval()
    old_norm = state["model"]["head.weight"].norm(dim=1).mean()
    for row, c in zip(captured[0], (2, 3)):
        idx = torch.nonzero(tr.y_train == c).flatten()
        with torch.no_grad():
            f = F.normalize(model0.features(tr.x_train[idx].float() / 255), dim=1)
        expected = F.normalize(f.mean(0), dim=0) * old_norm
        assert torch.allclose(row, expected, atol=1e-5)

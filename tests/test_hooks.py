"""Feature recorder: semantic stage names, hooked tensor == module output, clean hooks."""

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunetv2_recokd.hooks import FeatureRecorder, stage_channels, stage_module_paths, unwrap_network

FEATURES = [4, 8, 16]
ARCH_KWARGS = dict(
    input_channels=1, n_stages=3, features_per_stage=FEATURES, conv_op=nn.Conv3d, kernel_sizes=3,
    strides=[1, 2, 2], n_conv_per_stage=[1, 1, 1], num_classes=2, n_conv_per_stage_decoder=[1, 1],
    conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
    nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
)
ALL = ["enc0", "enc1", "enc2", "dec0", "dec1"]


@pytest.fixture
def net():
    torch.manual_seed(0)
    return PlainConvUNet(**ARCH_KWARGS, deep_supervision=True).eval()


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(1, 1, 16, 16, 16)


def total_hooks(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in module.modules())


def test_stage_module_paths(net):
    paths = stage_module_paths(net)
    assert paths == {
        "enc0": "encoder.stages.0", "enc1": "encoder.stages.1", "enc2": "encoder.stages.2",
        "dec0": "decoder.stages.1", "dec1": "decoder.stages.0",
    }
    modules = dict(net.named_modules())
    assert all(p in modules for p in paths.values())


def test_stage_module_paths_rejects_other_networks():
    with pytest.raises(TypeError, match="encoder.stages"):
        stage_module_paths(nn.Conv3d(1, 1, 1))


def test_recorded_shapes_follow_resolution_levels(net, x):
    with FeatureRecorder(net, ALL) as rec:
        net(x)
    f = rec.pop()
    assert set(f) == set(ALL)
    assert f["enc0"].shape == (1, 4, 16, 16, 16)
    assert f["enc1"].shape == (1, 8, 8, 8, 8)
    assert f["enc2"].shape == (1, 16, 4, 4, 4)
    # dec{k} sits at encoder stage k's resolution with its channels
    assert f["dec0"].shape == (1, 4, 16, 16, 16)
    assert f["dec1"].shape == (1, 8, 8, 8, 8)
    # ... which is the resolution of deep-supervision output k
    out = net(x)
    assert out[0].shape[2:] == f["dec0"].shape[2:] and out[1].shape[2:] == f["dec1"].shape[2:]


def test_recorded_tensor_equals_module_output(net, x):
    rec = FeatureRecorder(net, ALL)
    with torch.no_grad(), rec:
        net(x)
    f = rec.pop()
    with torch.no_grad():
        e0 = net.encoder.stages[0](x)
        e1 = net.encoder.stages[1](e0)
        e2 = net.encoder.stages[2](e1)
    torch.testing.assert_close(f["enc0"], e0, rtol=0, atol=0)
    torch.testing.assert_close(f["enc1"], e1, rtol=0, atol=0)
    torch.testing.assert_close(f["enc2"], e2, rtol=0, atol=0)
    # decoder stages against an independent hook on the same modules
    seen = {}
    handles = [net.decoder.stages[s].register_forward_hook(lambda m, i, o, s=s: seen.__setitem__(s, o.clone()))
               for s in (0, 1)]
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    torch.testing.assert_close(f["dec1"], seen[0], rtol=0, atol=0)
    torch.testing.assert_close(f["dec0"], seen[1], rtol=0, atol=0)
    rec.remove()


def test_recorded_features_carry_gradients(net, x):
    net.train()
    rec = FeatureRecorder(net, ["enc1"])
    with rec:
        net(x)
    feat = rec.pop()["enc1"]
    feat.pow(2).mean().backward()
    assert net.encoder.stages[0][0].convs[0].conv.weight.grad is not None
    assert net.encoder.stages[0][0].convs[0].conv.weight.grad.abs().sum() > 0


def test_nothing_recorded_outside_with(net, x):
    rec = FeatureRecorder(net, ["enc0", "dec0"])
    net(x)  # e.g. validation or inference forward
    assert rec._features == {}
    with pytest.raises(RuntimeError, match="no output"):
        rec.pop()
    with rec:
        assert rec.active
        net(x)
    assert not rec.active
    net(x)  # a forward after the block must not overwrite the recorded one
    f = rec.pop()
    assert set(f) == {"enc0", "dec0"}


def test_pop_clears(net, x):
    rec = FeatureRecorder(net, ["enc2"])
    with rec:
        net(x)
    first = rec.pop()
    assert "enc2" in first
    assert rec._features == {}
    with pytest.raises(RuntimeError):
        rec.pop()


def test_entering_again_drops_stale_features(net, x):
    rec = FeatureRecorder(net, ["enc0"])
    with rec:
        net(x)
    with rec:
        pass  # no forward: the previous step's features must not leak into this one
    with pytest.raises(RuntimeError):
        rec.pop()


def test_remove_detaches_every_hook(net, x):
    assert total_hooks(net) == 0
    rec = FeatureRecorder(net, ALL)
    assert rec.num_hooks == 5
    assert total_hooks(net) == 5
    assert len(net.encoder.stages[0]._forward_hooks) == 1
    rec.remove()
    assert rec.num_hooks == 0
    assert total_hooks(net) == 0
    for path in stage_module_paths(net).values():
        assert len(dict(net.named_modules())[path]._forward_hooks) == 0
    with pytest.raises(RuntimeError, match="removed"):
        with rec:
            pass


def test_duplicate_names_hook_once(net):
    rec = FeatureRecorder(net, ["enc0", "enc0", "dec1"])
    assert rec.names == ["enc0", "dec1"]
    assert total_hooks(net) == 2
    rec.remove()


def test_unknown_name_lists_valid_names(net):
    with pytest.raises(KeyError) as e:
        FeatureRecorder(net, ["enc0", "enc7", "bottleneck"])
    msg = str(e.value)
    assert "enc7" in msg and "bottleneck" in msg
    for name in ALL:
        assert name in msg
    assert total_hooks(net) == 0  # nothing half-registered


class CompiledLike(nn.Module):
    """Stands in for torch.compile's OptimizedModule: the real network under ._orig_mod."""

    def __init__(self, inner):
        super().__init__()
        self._orig_mod = inner

    def forward(self, x):
        return self._orig_mod(x)


def test_unwrap_network(net, x):
    assert unwrap_network(net) is net
    assert unwrap_network(CompiledLike(net)) is net
    assert unwrap_network(CompiledLike(CompiledLike(net))) is net
    rec = FeatureRecorder(CompiledLike(net), ["enc0"])
    assert rec.network is net
    assert len(net.encoder.stages[0]._forward_hooks) == 1
    with rec:
        CompiledLike(net)(x)
    assert rec.pop()["enc0"].shape == (1, 4, 16, 16, 16)


def test_stage_channels_from_arch_kwargs():
    assert stage_channels({"features_per_stage": [32, 64, 128, 256]}) == {
        "enc0": 32, "enc1": 64, "enc2": 128, "enc3": 256, "dec0": 32, "dec1": 64, "dec2": 128}


def test_stage_channels_match_the_network(net, x):
    with FeatureRecorder(net, ALL) as rec:
        net(x)
    f = rec.pop()
    assert {k: v.shape[1] for k, v in f.items()} == stage_channels({"features_per_stage": FEATURES})

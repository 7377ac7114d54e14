"""pbp_fx.layers: LayerSpec, stacked copies of a layer, norm folding."""
import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pbp_fx import layers
from pbp_fx.layers import (LayerCopies, LayerSpec, NormSpec, cat_rows, channel_view, copy_dim, every_nth_position,
                           fold_norm, runs_as_columns, split_apply, split_members, stacked_apply)

pytestmark = pytest.mark.usefixtures("seeded")

# (module factory, input shape)
LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), (4, 6)),
    "linear_nobias": (lambda: nn.Linear(6, 5, bias=False), (4, 6)),
    "linear_tokens": (lambda: nn.Linear(6, 5), (2, 7, 6)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), (2, 3, 9)),
    "conv1d_stride_dil": (lambda: nn.Conv1d(3, 4, 3, stride=2, dilation=2), (2, 3, 11)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3), (2, 3, 6, 6)),
    "conv2d_nobias_stride": (lambda: nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=False), (2, 3, 7, 7)),
    "conv2d_groups": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 5, 5)),
    "conv2d_depthwise": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4), (2, 4, 5, 5)),
    "conv2d_depthwise_mult": (lambda: nn.Conv2d(3, 6, 3, groups=3), (2, 3, 5, 5)),
    "conv2d_same": (lambda: nn.Conv2d(3, 4, 4, padding="same"), (2, 3, 6, 6)),
    "conv2d_rect_dil": (lambda: nn.Conv2d(3, 4, (3, 2), stride=(1, 2), padding=(2, 0), dilation=(2, 1)), (2, 3, 6, 7)),
    "conv2d_reflect": (lambda: nn.Conv2d(3, 4, 3, padding=(1, 2), padding_mode="reflect"), (2, 3, 6, 6)),
    "conv2d_same_reflect": (lambda: nn.Conv2d(3, 4, (4, 3), padding="same", dilation=(1, 2), padding_mode="reflect"),
                            (2, 3, 7, 7)),
    "conv1d_valid_circular": (lambda: nn.Conv1d(3, 4, 3, padding="valid", padding_mode="circular"), (2, 3, 9)),
    "conv2d_circular": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), (2, 3, 5, 5)),
    "conv2d_replicate_groups": (lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="replicate", groups=2),
                                (2, 4, 5, 5)),
    "conv3d": (lambda: nn.Conv3d(2, 3, (1, 3, 3), padding=(0, 1, 1)), (2, 2, 3, 4, 4)),
    # split_apply runs these as one batched matmul over columns (runs_as_columns)
    "conv1d_nobias_stride": (lambda: nn.Conv1d(3, 4, 5, stride=2, padding=1, bias=False), (2, 3, 12)),
    "conv1d_same_even": (lambda: nn.Conv1d(3, 4, 4, padding="same"), (2, 3, 9)),
    "conv2d_1x1_stride": (lambda: nn.Conv2d(3, 4, 1, stride=2), (2, 3, 5, 5)),
    "conv2d_1x1_padded": (lambda: nn.Conv2d(3, 4, 1, padding=1, bias=False), (2, 3, 4, 4)),
    "conv3d_1x1": (lambda: nn.Conv3d(2, 3, 1), (2, 2, 3, 4, 4)),
}
COLUMNS = {"conv1d", "conv1d_nobias_stride", "conv1d_same_even", "conv2d_1x1_stride", "conv2d_1x1_padded",
           "conv3d_1x1"}


def _copies_by_loop(layer: LayerSpec, x, weight, bias):
    """Reference: each copy run separately, stacked on the copy dim."""
    outs = [layer.apply(x, weight[m], None if bias is None else bias[m]) for m in range(weight.shape[0])]
    return torch.stack(outs, dim=copy_dim(layer.axis))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_spec_describes_the_module(name):
    make, shape = LAYERS[name]
    m = make()
    spec = LayerSpec.from_module(m)
    assert spec.channels == m.weight.shape[0]
    assert spec.params_per_copy == sum(p.numel() for p in m.parameters())
    assert spec.axis == (-1 if isinstance(m, nn.Linear) else 1)
    assert spec.bias == (m.bias is not None)
    x = torch.randn(shape)
    assert (spec.apply(x, m.weight, m.bias) - m(x)).abs().max().item() == 0.0


def test_layer_spec_is_plain_hashable_data():
    a = LayerSpec.from_module(nn.Conv2d(3, 4, 3, stride=2))
    b = LayerSpec.from_module(nn.Conv2d(3, 4, 3, stride=2))
    assert a == b and hash(a) == hash(b)
    assert a != LayerSpec.from_module(nn.Conv2d(3, 4, 3, stride=1))
    assert a.kind == "conv2d" and a.stride == (2, 2) and a.weight_shape == (4, 3, 3, 3)


@pytest.mark.parametrize("module", [nn.ReLU(), nn.BatchNorm2d(3), nn.ConvTranspose2d(3, 3, 3), nn.Embedding(4, 3)],
                         ids=lambda m: type(m).__name__)
def test_layer_spec_rejects_non_neurons(module):
    with pytest.raises(TypeError, match="not a neuron layer"):
        LayerSpec.from_module(module)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("copies", [1, 3])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_stacked_apply_equals_each_copy_separately(name, copies, pb):
    make, shape = LAYERS[name]
    spec = LayerSpec.from_module(make())
    weight = torch.randn(copies, *spec.weight_shape)
    bias = torch.randn(copies, spec.channels) if spec.bias else None
    x = torch.randn(shape)
    got = stacked_apply(spec, x, weight, bias)
    want = _copies_by_loop(spec, x, weight, bias)
    assert got.shape == want.shape
    assert got.shape[copy_dim(spec.axis)] == copies
    assert pb.max_diff(got, want) < 1e-5


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("pays", [False, True], ids=["grouped", "columns"])
@pytest.mark.parametrize("copies", [1, 3])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_split_apply_runs_each_copy_on_its_own_slice(name, copies, pays, pb, monkeypatch):
    """Either form of an ungrouped 2-D conv (grouped conv, or columns and a bmm: layers.columns_pay) gives each
    copy's layer on its slice, and each copy's weight and bias gradient from its slice alone."""
    monkeypatch.setattr(layers, "columns_pay", lambda *_: pays)
    make, shape = LAYERS[name]
    spec = LayerSpec.from_module(make())
    weight = torch.randn(copies, *spec.weight_shape, requires_grad=True)
    bias = torch.randn(copies, spec.channels, requires_grad=True) if spec.bias else None
    x = torch.randn(3 * copies - 1, *shape[1:])  # 2 samples each; copies - 1 left over that no copy sees
    got = split_apply(spec, x, weight, bias)
    slices = [x[m * 2:(m + 1) * 2] for m in range(copies)]
    want = torch.stack([spec.apply(s, weight[m], None if bias is None else bias[m]) for m, s in enumerate(slices)],
                       dim=copy_dim(spec.axis))
    assert got.shape == want.shape
    assert pb.max_diff(got, want) < 1e-5
    probe = torch.randn_like(want)
    trained = [t for t in (weight, bias) if t is not None]
    grads = torch.autograd.grad((got * probe).sum(), trained)
    for g, w in zip(grads, torch.autograd.grad((want * probe).sum(), trained)):
        assert pb.max_diff(g, w) < 1e-4
    # split_members deals any [B, ...] tensor (the site error, installed activations) alike.
    y = spec.apply(x, weight[0], None if bias is None else bias[0])
    dealt = split_members(y, copies, spec.axis)
    for m in range(copies):
        assert pb.max_diff(dealt.select(copy_dim(spec.axis), m), y[m * 2:(m + 1) * 2]) == 0.0


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_every_nth_layer_gives_every_nth_output_position(name, n, pb):
    make, shape = LAYERS[name]
    m = make()
    spec = LayerSpec.from_module(m)
    strided = spec.every_nth(n)
    if spec.kind == "linear":
        assert strided is spec  # a Linear's positions are its input's
        return
    if strided is None:  # zeros "same" padding of an even kernel pads its two sides unequally
        assert spec.padding == "same" and spec.padding_mode == "zeros"
        return
    x = torch.randn(shape)
    got = strided.apply(x, m.weight, m.bias)
    want = every_nth_position(m(x), n, spec.axis)
    assert got.shape == want.shape
    assert pb.max_diff(got, want) < 1e-5


def test_every_nth_position_keeps_batch_and_channels_whole():
    t = torch.arange(2 * 3 * 5 * 4).reshape(2, 3, 5, 4)
    assert torch.equal(every_nth_position(t, 2, 1), t[:, :, ::2, ::2])
    assert torch.equal(every_nth_position(t, 2, -1), t[:, ::2, ::2, :])  # [B, *tokens, C]
    assert every_nth_position(t, 1, 1) is t


def test_stacked_apply_keeps_each_group_with_its_copy():
    # Copy 0 is zero, copy 1 is the identity per group: a wrong row order would mix them.
    spec = LayerSpec.from_module(nn.Conv2d(4, 4, 1, groups=2, bias=False))
    w = torch.zeros(2, 4, 2, 1, 1)
    w[1, :, :, 0, 0] = torch.eye(2).repeat(2, 1)
    x = torch.randn(1, 4, 2, 2)
    z = stacked_apply(spec, x, w, None)
    assert z.shape == (1, 2, 4, 2, 2)
    assert z[:, 0].abs().max().item() == 0.0
    assert torch.allclose(z[:, 1], x)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_fold_norm_equals_eval_batchnorm(bias, affine, pb):
    conv = nn.Conv2d(3, 5, 3, bias=bias)
    bn = nn.BatchNorm2d(5, affine=affine, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        if affine:
            bn.weight.normal_()
            bn.bias.normal_()
    bn.eval()
    x = torch.randn(2, 3, 6, 6)
    w, b = fold_norm(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                     bn.weight, bn.bias, bn.eps)
    assert pb.max_diff(F.conv2d(x, w, b), bn(conv(x))) < 1e-5


def test_fold_norm_works_on_stacked_rows(pb):
    # [M, C, ...] weights with [M, C] statistics, as LayerCopies.folded() uses it.
    w, b = torch.randn(2, 3, 4), torch.randn(2, 3)
    mean, var = torch.randn(2, 3), torch.rand(2, 3) + 0.5
    gamma, beta = torch.randn(2, 3), torch.randn(2, 3)
    fw, fb = fold_norm(w, b, mean, var, gamma, beta, 1e-5)
    x = torch.randn(7, 4)
    for m in range(2):
        want = (F.linear(x, w[m], b[m]) - mean[m]) / torch.sqrt(var[m] + 1e-5) * gamma[m] + beta[m]
        assert pb.max_diff(F.linear(x, fw[m], fb[m]), want) < 1e-5


def _reference_norms(copies: LayerCopies, bn_cls, momentum):
    """Per-copy nn.BatchNorm modules holding the same parameters as a LayerCopies norm."""
    out = []
    for m in range(copies.copies):
        bn = bn_cls(copies.layer.channels, momentum=momentum)
        with torch.no_grad():
            bn.weight.copy_(copies.norm_weight[m])
            bn.bias.copy_(copies.norm_bias[m])
        out.append(bn)
    return out


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("kind", ["conv2d", "linear"])
def test_layer_copies_norm_trains_like_batchnorm(kind, momentum, pb):
    if kind == "conv2d":
        spec, bn_cls, shape = LayerSpec.from_module(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d, (5, 3, 6, 6)
    else:
        spec, bn_cls, shape = LayerSpec.from_module(nn.Linear(3, 4)), nn.BatchNorm1d, (5, 3)
    lc = LayerCopies(spec, NormSpec(momentum=momentum), 2)
    lc.reset_parameters("default")
    with torch.no_grad():
        lc.norm_weight.normal_()
        lc.norm_bias.normal_()
    refs = _reference_norms(lc, bn_cls, momentum)
    for step in range(3):
        x = torch.randn(shape) * (step + 1)
        got = lc(x)
        for m, bn in enumerate(refs):
            want = bn(spec.apply(x, lc.weight[m], lc.bias[m]))
            assert pb.max_diff(got.select(copy_dim(spec.axis), m), want) < 1e-5
    for m, bn in enumerate(refs):
        assert pb.max_diff(lc.running_mean[m], bn.running_mean) < 1e-6
        assert pb.max_diff(lc.running_var[m], bn.running_var) < 1e-5
    assert int(lc.num_batches_tracked) == 3
    lc.eval()
    x = torch.randn(shape)
    fw, fb = lc.folded()
    got = lc(x)
    assert pb.max_diff(got, stacked_apply(spec, x, fw, fb)) < 1e-5
    for m, bn in enumerate(refs):
        bn.eval()
        assert pb.max_diff(got.select(copy_dim(spec.axis), m), bn(spec.apply(x, lc.weight[m], lc.bias[m]))) < 1e-5
    assert int(lc.num_batches_tracked) == 3  # eval does not count batches


def test_layer_copies_without_norm_fold_to_their_own_weights():
    lc = LayerCopies(LayerSpec.from_module(nn.Linear(3, 4)), None, 2)
    lc.reset_parameters()
    w, b = lc.folded()
    assert torch.equal(w, lc.weight) and torch.equal(b, lc.bias)
    assert w.data_ptr() != lc.weight.data_ptr()  # a copy, not a view of the parameter
    assert not w.requires_grad


def test_layer_copies_row_tensors_lead_with_copy_and_channel():
    lc = LayerCopies(LayerSpec.from_module(nn.Conv1d(2, 5, 3)), NormSpec(), 3)
    rows = lc.row_tensors()
    assert set(rows) == {"weight", "bias", "norm_weight", "norm_bias", "running_mean", "running_var"}
    assert all(t.shape[:2] == (3, 5) for t in rows.values())
    no_affine = LayerCopies(LayerSpec.from_module(nn.Conv1d(2, 5, 3, bias=False)), NormSpec(affine=False), 1)
    assert set(no_affine.row_tensors()) == {"weight", "running_mean", "running_var"}


def test_reset_parameters_inits():
    spec = LayerSpec.from_module(nn.Linear(400, 300))
    lc = LayerCopies(spec, None, 2)
    lc.reset_parameters("default")
    bound = 1 / math.sqrt(400)
    assert lc.weight.abs().max().item() <= bound + 1e-7 and lc.bias.abs().max().item() <= bound + 1e-7
    assert not torch.equal(lc.weight[0], lc.weight[1])  # each copy its own draw
    lc.reset_parameters("normal")
    assert abs(lc.weight.std().item() - 0.01) < 1e-3 and lc.bias.abs().max().item() == 0.0
    lc.reset_parameters("kaiming", scale=0.5)
    assert abs(lc.weight.std().item() - 0.5 * math.sqrt(2 / 400)) < 2e-3
    with pytest.raises(ValueError, match="unknown init"):
        lc.reset_parameters("xavier")


def test_cat_rows_concatenates_and_sets_requires_grad():
    spec = LayerSpec.from_module(nn.Conv2d(2, 3, 3))
    a, b = LayerCopies(spec, NormSpec(), 2), LayerCopies(spec, NormSpec(), 1)
    a.reset_parameters()
    b.reset_parameters()
    with torch.no_grad():
        b.running_mean.fill_(7.0)
    out = cat_rows(spec, NormSpec(), [a.row_tensors(), b.row_tensors()], requires_grad=False)
    assert out.copies == 3
    assert torch.equal(out.weight[:2], a.weight) and torch.equal(out.weight[2:], b.weight)
    assert torch.equal(out.running_mean[2], torch.full((3,), 7.0))
    assert not any(p.requires_grad for p in out.parameters())
    assert all(p.requires_grad for p in cat_rows(spec, NormSpec(), [a.row_tensors()], True).parameters())


def test_layer_copies_follow_dtype():
    lc = LayerCopies(LayerSpec.from_module(nn.Conv2d(2, 3, 3)), NormSpec(), 2, dtype=torch.float64)
    lc.reset_parameters()
    assert all(t.dtype == torch.float64 for t in lc.row_tensors().values())
    assert lc(torch.randn(1, 2, 4, 4, dtype=torch.float64)).dtype == torch.float64


def test_channel_view_and_copy_dim():
    assert copy_dim(1) == 1 and copy_dim(-1) == -2
    v = torch.arange(3.0)
    assert channel_view(v, 4, 1).shape == (3, 1, 1)
    assert channel_view(v, 3, -1).shape == (3,)
    y = torch.zeros(2, 3, 4, 5) + channel_view(v, 4, 1)
    assert torch.equal(y[:, 2], torch.full((2, 4, 5), 2.0))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("pays", [False, True], ids=["grouped", "columns"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_split_copies_with_their_norm_equal_each_copy_on_its_slice(name, pays, pb, monkeypatch):
    """LayerCopies(split=True): the batched-matmul form (runs_as_columns) and the grouped form give
    each copy's layer and BatchNorm (batch statistics, running statistics) on its own slice."""
    monkeypatch.setattr(layers, "columns_pay", lambda *_: pays)
    make, shape = LAYERS[name]
    spec = LayerSpec.from_module(make())
    assert runs_as_columns(spec) == (name in COLUMNS)
    if spec.kind == "linear":
        return
    copies = LayerCopies(spec, NormSpec(), 3)
    copies.reset_parameters("kaiming")
    with torch.no_grad():
        copies.norm_weight.uniform_(0.5, 1.5), copies.norm_bias.normal_()
    x = torch.randn(6, *shape[1:])
    got = copies(x, split=True)
    for m in range(3):
        z = spec.apply(x[2 * m:2 * m + 2], copies.weight[m], None if copies.bias is None else copies.bias[m])
        bn = nn.BatchNorm1d(spec.channels) if z.dim() == 3 else nn.BatchNorm2d(spec.channels) if z.dim() == 4 \
            else nn.BatchNorm3d(spec.channels)
        with torch.no_grad():
            bn.weight.copy_(copies.norm_weight[m]), bn.bias.copy_(copies.norm_bias[m])
        assert pb.max_diff(got[:, m], bn(z)) < 1e-4, m
        assert pb.max_diff(copies.running_mean[m], bn.running_mean) < 1e-6
        assert pb.max_diff(copies.running_var[m], bn.running_var) < 1e-5
    got.sum().backward()
    assert copies.weight.grad is not None and bool(copies.weight.grad.abs().sum() > 0)


def test_a_2d_conv_runs_as_columns_where_its_members_have_few_output_positions_for_its_width():
    """layers.columns_pay: an ungrouped, zero-padded 2-D conv on the CPU runs as columns where a member's output
    positions times WIDE_COLUMNS are at most its columns' width (input channels x kernel positions); a narrower
    one, a grouped one, another padding mode or a 3-D conv stays a grouped conv, and without an input only the
    kernel decides."""
    positions = 4 * 3 * 3  # 4 samples a member on 3x3 maps
    width = positions * layers.WIDE_COLUMNS
    wide = LayerSpec.from_module(nn.Conv2d(-(-width // 9), 8, 3, padding=1))
    cin = wide.weight_shape[1]
    assert not runs_as_columns(wide)
    assert runs_as_columns(wide, torch.zeros(16, cin, 3, 3), 4)
    assert not runs_as_columns(wide, torch.zeros(16, cin, 4, 4), 4)  # more positions
    assert not runs_as_columns(wide, torch.zeros(16, cin, 3, 3), 2)  # one member of 2: 8 samples
    strided = LayerSpec.from_module(nn.Conv2d(cin, 8, 3, stride=2, padding=1))  # counted at the output
    assert runs_as_columns(strided, torch.zeros(16, cin, 6, 6), 4)
    narrower = LayerSpec.from_module(nn.Conv2d(width // 9 - 1, 8, 3, padding=1))
    assert not runs_as_columns(narrower, torch.zeros(16, narrower.weight_shape[1], 3, 3), 4)
    for other in (nn.Conv2d(cin, 8, 3, padding=1, groups=2), nn.Conv2d(cin, 8, 3, padding=1, padding_mode="reflect")):
        assert not runs_as_columns(LayerSpec.from_module(other), torch.zeros(16, cin, 3, 3), 4)
    assert not runs_as_columns(LayerSpec.from_module(nn.Conv3d(cin, 8, 3, padding=1)), torch.zeros(16, cin, 2, 2, 2), 4)


@pytest.mark.parametrize("padding,kernel,dilation,want", [
    ("valid", (3, 3), (1, 1), ([0, 0], [0, 0])),
    ("same", (4, 3), (1, 2), ([1, 2], [2, 2])),  # (an even kernel's odd extra pixel goes at the end, as torch's)
    (2, (3,), (1,), ([2], [2])),
    ((1, 0, 2), (3, 1, 5), (1, 1, 1), ([1, 0, 2], [1, 0, 2])),
])
def test_conv_pads_is_the_one_padding_rule_of_the_runtime_and_the_exporters(padding, kernel, dilation, want):
    from pbp_fx.layers import conv_pads

    assert conv_pads(padding, kernel, dilation) == want
    conv = nn.Conv2d(1, 1, kernel, padding=padding, dilation=dilation, bias=False) if len(kernel) == 2 else None
    if conv is not None:  # (F.pad with the pads, then an unpadded conv, is nn.Conv2d's output)
        x = torch.randn(1, 1, 9, 8)
        begins, ends = want
        padded = F.pad(x, [p for b, e in reversed(list(zip(begins, ends))) for p in (b, e)])
        assert torch.allclose(F.conv2d(padded, conv.weight, dilation=dilation), conv(x), atol=1e-6)


def test_dendrite_rows_name_the_call_and_rows_of_each_copy_in_dendrite_calls_layout():
    from pbp_fx.layers import LayerSpec, dendrite_calls, dendrite_rows

    for layer in (LayerSpec.from_module(nn.Conv1d(2, 3, 3)), LayerSpec.from_module(nn.Linear(2, 3))):
        weight = torch.randn(4, 3, *layer.weight_shape[1:])  # [K, C, ...]
        calls = dendrite_calls(layer, weight, None)
        for copy in range(4):
            call, rows = dendrite_rows(layer.kind, layer.groups, 4, 3, copy)
            assert torch.equal(calls[call][0][rows], weight[copy])
    with pytest.raises(IndexError):
        dendrite_rows("linear", 1, 2, 3, 2)


@pytest.mark.parametrize("padding", [0, "valid"])
def test_a_strided_pointwise_conv_over_a_channels_last_input_gives_the_conv_and_its_gradients(padding):
    """It runs as the strided positions and an unstrided conv (torch 2.13's oneDNN weight gradient of the strided
    1x1 conv over channels_last corrupted the heap): the same output and gradients as over a contiguous input."""
    spec = dataclasses.replace(LayerSpec.from_module(nn.Conv2d(6, 4, 1, padding=padding)), stride=(2, 3))
    conv = nn.Conv2d(6, 4, 1)
    x = torch.randn(5, 6, 7, 8)
    outs = []
    for layout in (torch.contiguous_format, torch.channels_last):
        w = conv.weight.detach().clone().requires_grad_()
        xi = x.clone(memory_format=layout).requires_grad_()
        y = spec.apply(xi, w, conv.bias)
        y.backward(torch.arange(y.numel(), dtype=y.dtype).view(y.shape).cos())
        outs.append((y, w.grad, xi.grad))
    assert outs[0][0].shape == (5, 4, 4, 3)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)


def test_a_dendrite_phase_at_candidate_stride_2_over_channels_last_pointwise_convs_runs(tmp_path):
    """Run alone on one thread, where the heap corruption ended the process (SIGABRT or SIGSEGV)."""
    script = tmp_path / "run.py"
    script.write_text(
        "import torch\nfrom torch import nn\nimport pbp_fx\ntorch.set_num_threads(1)\ntorch.manual_seed(0)\n"
        "model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1),\n"
        "                      nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))\n"
        "pm = pbp_fx.perforate(model, (torch.randn(2, 3, 8, 8),)).to(memory_format=torch.channels_last)\n"
        "pm.train()\npm.start_dendrite_phase(pool=4, split=False, stride=2)\n"
        "opt = torch.optim.SGD(list(pm.trainable_parameters()), lr=0.1)\n"
        "for step in range(6):\n"
        "    x = torch.randn(16, 3, 8, 8).contiguous(memory_format=torch.channels_last)\n"
        "    opt.zero_grad()\n"
        "    nn.functional.cross_entropy(pm(x), torch.randint(0, 3, (16,))).backward()\n"
        "    opt.step()\n"
        "print('ok')\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-2000:])

"""pbp_fx.native: the candidates' compiled calls (the covariance tap's backward, their norm and sigmoid), against
the torch ops they replace."""
import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import pbp_fx
from pbp_fx import native
from pbp_fx.covariance_tap import STAT_NAMES, candidate_gradient
from pbp_fx.layers import LayerCopies, LayerSpec, NormSpec, copy_dim, split_members

needs_kernel = pytest.mark.skipif(native.kernel() is None, reason="no C compiler to build pbp_fx.native with")


def _pool_state(p, c, generator, row_shapes=((3, 2), ())):
    stats = [torch.zeros(p, c), torch.zeros(p, c), torch.zeros(p, c), torch.tensor(0), torch.tensor(0),
             torch.tensor(0)]
    rows = [torch.randn(p, c, *shape, generator=generator) for shape in row_shapes] + [torch.zeros(p, c, 0)]
    snapshots = [r.clone() for r in rows]
    return stats, snapshots, rows


def _layouts(p, b, c, s, generator):
    """Candidate activations in the layouts the pools make: a grouped conv's [b, P*C, *S] output, the
    columns path's copies-first [P, C, b, *S], a Linear's [b, P, C] and its split bmm's [P, b, C]."""
    yield "conv", 1, torch.rand(b, p, c, s, s, generator=generator)
    yield "columns", 1, torch.rand(p, c, b, s, generator=generator).movedim(2, 0)
    yield "linear", -1, torch.rand(b, p, c, generator=generator)
    yield "linear copies first", -1, torch.rand(p, b, c, generator=generator).movedim(0, 1)


def _both(grad_y, cand, axis, stride, scale, settings, steps, generator, monkeypatch):
    """(native, torch) runs of `steps` backward passes: gradients, statistics and snapshots."""
    p, ch = cand.shape[copy_dim(axis)], cand.shape[copy_dim(axis) + 1]
    state = _pool_state(p, ch, generator)
    runs = []
    for use_kernel in (True, False):
        stats, snapshots, rows = copy.deepcopy(state)
        if not use_kernel:
            monkeypatch.setattr(native, "kernel", lambda: None)
        grads = []
        for k in range(steps):
            with torch.no_grad():
                for r in rows:
                    r.add_(0.01 * (k + 1))  # (the weights move between the batches, as an optimizer's step)
            grads.append(candidate_gradient(grad_y[k], cand, stats, snapshots, rows, True, axis, True, stride,
                                            scale, settings))
        monkeypatch.undo()
        runs.append((grads, stats, snapshots))
    return runs


@needs_kernel
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("scale", [None, 1024.0])
def test_the_kernel_gives_the_torch_ops_gradient_statistics_and_snapshots(stride, scale, monkeypatch):
    g = torch.Generator().manual_seed(0)
    p, b, c, s = 4, 6, 5, 4
    for name, axis, cand in _layouts(p, b, c, s, g):
        if axis == 1:
            cand = cand[..., ::stride, ::stride] if cand.dim() == 5 else cand[..., ::stride]
            grad_y = [torch.randn(p * b, c, *([s] * (cand.dim() - 3)), generator=g) * 3 + 5 for _ in range(6)]
        else:
            grad_y = [torch.randn(p * b, c, generator=g) * 3 + 5 for _ in range(6)]
        if axis == -1 and stride != 1:
            continue  # (a Linear without token dims sees every position)
        # warm-up 2: batches 3.. take snapshots; the 1e-4 threshold lets most of them improve
        native_run, torch_run = _both(grad_y, cand.contiguous() if name == "conv" else cand, axis,
                                      stride if axis == 1 else 1, scale, (0.9, 2, 1e-4, True), 6, g, monkeypatch)
        for got, want in zip(native_run[0], torch_run[0]):
            assert got.shape == want.shape and got.stride() == want.stride(), name
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item(), msg=name)
        for stat, got, want in zip(STAT_NAMES, native_run[1], torch_run[1]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=f"{name}: {stat}")
        assert int(native_run[1][5]) > 2, name  # (snapshots were taken)
        for got, want in zip(native_run[2], torch_run[2]):
            assert torch.equal(got, want), name


@needs_kernel
@pytest.mark.parametrize("scale", [None, 1024.0])
def test_a_batch_with_a_non_finite_error_is_seen_not_counted_as_by_the_torch_ops(scale, monkeypatch):
    g = torch.Generator().manual_seed(1)
    cand = torch.rand(6, 4, 5, 3, 3, generator=g)
    grad_y = torch.randn(24, 5, 3, 3, generator=g)
    grad_y[3, 1, 0, 0] = float("inf")
    native_run, torch_run = _both([grad_y], cand, 1, 1, scale, (0.9, 0, 1e-4, True), 1, g, monkeypatch)
    for got, want in zip(native_run[1], torch_run[1]):
        assert torch.equal(got, want)
    assert int(native_run[1][4]) == 1 and int(native_run[1][3]) == 0  # seen, not counted
    assert torch.equal(native_run[0][0], torch_run[0][0]) if scale is None else native_run[0][0].isnan().all()


@needs_kernel
def test_a_covariance_that_overflows_only_once_scaled_is_not_counted(monkeypatch):
    """A slice's covariance finite in float32, x P not: the kernel scaled it in float64, counted the batch and
    put inf into the EMA (NaN for good after the next batch); the torch ops skip it (a reviewer)."""
    g = torch.Generator().manual_seed(0)
    cand = torch.rand(8, 4, 3, generator=g)
    grad_y = [torch.randn(32, 3, generator=g) * 6e37, torch.randn(32, 3, generator=g)]
    native_run, torch_run = _both(grad_y, cand, -1, 1, None, (0.9, 0, 0.01, True), 2, g, monkeypatch)
    assert int(torch_run[1][3]) == 1 and int(torch_run[1][4]) == 2  # counted 1 of 2 seen
    for got, want in zip(native_run[1], torch_run[1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert all(bool(grad.isfinite().all()) for grad in native_run[0])


def test_off_or_without_a_compiler_the_torch_ops_run(tmp_path, monkeypatch):
    native.kernel.cache_clear()
    try:
        monkeypatch.setenv("PBP_FX_NATIVE", "0")
        assert native.kernel() is None
        native.kernel.cache_clear()
        monkeypatch.delenv("PBP_FX_NATIVE")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        for cc in (str(tmp_path / "no-such-compiler"), "cc '"):  # (missing; an unbalanced quote)
            native.kernel.cache_clear()
            monkeypatch.setenv("CC", cc)
            assert native.kernel() is None, cc
        assert not list(tmp_path.glob("pbp_fx/*.so"))  # nothing half-built left behind
        cand, grad_y = torch.rand(3, 2, 4), torch.randn(6, 4)
        stats, snapshots, rows = _pool_state(2, 4, torch.Generator().manual_seed(0))
        got = candidate_gradient(grad_y, cand, stats, snapshots, rows, True, -1, True, 1, None, (0.9, 0, 0.0, True))
        assert got.shape == cand.shape and int(stats[3]) == 1
    finally:
        native.kernel.cache_clear()


@needs_kernel
def test_the_library_is_built_once_per_compiler_into_the_cache_folder(tmp_path, monkeypatch):
    """CC may be a command with arguments (CC="ccache cc"): taken as one program name, it turned the kernel off."""
    native.kernel.cache_clear()
    try:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        assert native.kernel() is not None
        native.kernel.cache_clear()
        assert native.kernel() is not None  # (found, not built again)
        assert len(list(tmp_path.glob("pbp_fx/candidate_kernels-*.so"))) == 1
        native.kernel.cache_clear()
        monkeypatch.setenv("CC", (os.environ.get("CC") or "cc") + " -g")
        assert native.kernel() is not None
        assert len(list(tmp_path.glob("pbp_fx/candidate_kernels-*.so"))) == 2
        assert not list(tmp_path.glob("pbp_fx/tmp*"))
    finally:
        native.kernel.cache_clear()



@needs_kernel
def test_a_damaged_library_in_the_cache_is_built_again(tmp_path):
    """A truncated library ended every later process with SIGBUS when loaded (garbage bytes turned the kernels off
    for good: the same digest check). The load runs in its own process (a SIGBUS would end the test's)."""
    import shutil

    built = native.kernel()._name  # (this process's library and its digest, copied: one build less)
    os.makedirs(tmp_path / "pbp_fx")
    library = tmp_path / "pbp_fx" / os.path.basename(built)
    shutil.copy(built, library)
    shutil.copy(built + ".sha256", str(library) + ".sha256")
    whole = library.read_bytes()
    library.write_bytes(whole[:len(whole) // 2])
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    env.pop("PBP_FX_NATIVE", None)
    load = [sys.executable, "-c", "from pbp_fx import native; print(native.kernel() is not None)"]
    again = subprocess.run(load, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and again.stdout.strip() == "True", (again.returncode, again.stderr)
    assert library.stat().st_size == len(whole)

# -- the candidates' BatchNorm and sigmoid ---------------------------------------------------------------

def _norm_cases():
    """(name, layer, norm, input): layouts the pools make their layer outputs in: a grouped conv's
    [b, P*C, *S], the columns path's copies-first [P, C, b * S] (a 1-D conv, a 1x1 conv), a Linear's split
    bmm [P, b, C], a conv whose output has one position a sample (the layout's short runs)."""
    g = torch.Generator().manual_seed(0)
    yield "conv2d", nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), torch.randn(20, 8, 5, 5, generator=g)
    yield "conv2d 2x2", nn.Conv2d(8, 6, 3, stride=2), nn.BatchNorm2d(6), torch.randn(20, 8, 5, 5, generator=g)
    yield ("conv2d channels last", nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6),
           torch.randn(20, 8, 5, 5, generator=g).to(memory_format=torch.channels_last))
    yield "conv1d columns", nn.Conv1d(8, 6, 5, padding=2), nn.BatchNorm1d(6), torch.randn(20, 8, 12, generator=g)
    yield ("1x1 conv, cumulative momentum", nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6, momentum=None),
           torch.randn(20, 8, 4, 4, generator=g))
    yield "linear", nn.Linear(8, 6), nn.BatchNorm1d(6), torch.randn(20, 8, generator=g)
    yield "one position, no affine", nn.Conv2d(8, 6, 3), nn.BatchNorm2d(6, affine=False), torch.randn(20, 8, 3, 3,
                                                                                                      generator=g)


def _copies_step(copies, x, extra, use_kernel, monkeypatch):
    """One forward and backward of LayerCopies(split) with a sigmoid: (output, parameter grads, extra's grad,
    the copy after the step)."""
    copies = copy.deepcopy(copies)
    if not use_kernel:
        monkeypatch.setattr(native, "kernel", lambda: None)
    try:
        extra = None if extra is None else extra.clone().requires_grad_()
        out = copies(x, split=True, extra=extra, activation=torch.sigmoid)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    finally:
        monkeypatch.undo()
    grads = {name: p.grad for name, p in copies.named_parameters()}
    return out, grads, None if extra is None else extra.grad, copies


@needs_kernel
@pytest.mark.parametrize("with_extra", [False, True])
@pytest.mark.parametrize("case", list(_norm_cases()), ids=lambda case: case[0])
def test_the_norm_kernel_gives_batch_norm_and_sigmoid_outputs_gradients_and_running_statistics(case, with_extra,
                                                                                              monkeypatch):
    name, layer, norm, x = case
    copies = LayerCopies(LayerSpec.from_module(layer), NormSpec.from_module(norm), 4)
    copies.reset_parameters("kaiming", generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        if copies.norm_weight is not None:  # (away from the identity: a wrong affine term shows)
            copies.norm_weight.uniform_(0.5, 1.5)
            copies.norm_bias.uniform_(-0.5, 0.5)
        copies.running_mean.fill_(0.3)
        shape = copies(x, split=True).shape
    extra = torch.randn(shape, generator=torch.Generator().manual_seed(3)) if with_extra else None
    got, got_grads, got_extra, got_copies = _copies_step(copies, x, extra, True, monkeypatch)
    want, want_grads, want_extra, want_copies = _copies_step(copies, x, extra, False, monkeypatch)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert set(got_grads) == set(want_grads)
    for key, grad in want_grads.items():
        if key == "bias":  # (a bias before a BatchNorm has no gradient: rounding on both sides)
            assert got_grads[key].abs().max() < 1e-5
            continue
        torch.testing.assert_close(got_grads[key], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(), msg=key)
    if with_extra:
        torch.testing.assert_close(got_extra, want_extra, rtol=1e-4, atol=1e-6)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(got_copies, key), getattr(want_copies, key), rtol=1e-5, atol=1e-7, msg=key)


@needs_kernel
def test_the_kernels_sigmoid_is_torchs_to_float32_rounding_over_its_whole_range():
    """Through the cascade input: z = 0 leaves the norm's output at its bias (0), so the output is sigmoid(extra)."""
    extra = torch.cat([torch.linspace(-100, 100, 4001), torch.tensor([0.0, 1e-8, float("inf"), -float("inf"),
                                                                      float("nan")])])
    extra = extra[: extra.numel() // 2 * 2].view(-1, 1, 1)
    z = torch.zeros_like(extra)
    out = native.norm_sigmoid(z, extra.expand(-1, 1, 1), torch.ones(1, 1), torch.zeros(1, 1), None, None, 0.1,
                              1e-5, 1)
    want = torch.sigmoid(extra)
    assert out.isnan().sum() == want.isnan().sum() == 1  # (NaN stays NaN: a non-finite batch is seen as one)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-7, equal_nan=True)
    assert out[extra == -float("inf")].item() == 0.0 and out[extra == float("inf")].item() == 1.0
    assert (out[extra <= -89] == 0).all() and (out[extra >= -80] > 0).all()


@needs_kernel
def test_where_the_norm_kernel_does_not_apply_it_declines_and_changes_nothing():
    mean, var = torch.zeros(2, 3), torch.ones(2, 3)
    for z in (torch.randn(4, 2, 3, dtype=torch.float64),  # float64
              torch.randn(4, 2, 6)[..., ::2],  # a layout with gaps
              torch.randn(1, 2, 3)):  # one position a channel: no batch variance
        assert native.norm_sigmoid(z, None, None, None, mean, var, 0.1, 1e-5, 1) is None
    assert torch.equal(mean, torch.zeros(2, 3)) and torch.equal(var, torch.ones(2, 3))


@needs_kernel
def test_a_dendrite_phase_after_an_installed_dendrite_trains_the_same_with_the_kernels_on_or_off(monkeypatch):
    """The cascade from the installed dendrite enters the candidates' pre-activation after their norm; its weights
    train through the kernel's gradient too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 4))
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 4, (16,))
    pm = pbp_fx.perforate(model, (x[:2],))
    pm.grow()
    pm.train()
    pm.start_dendrite_phase(pool=4)
    grads = []
    for use_kernel in (True, False):
        run = copy.deepcopy(pm)
        if not use_kernel:
            monkeypatch.setattr(native, "kernel", lambda: None)
        torch.nn.functional.cross_entropy(run(x), y).backward()
        monkeypatch.undo()
        grads.append({n: p.grad for n, p in run.named_parameters() if p.grad is not None})
    assert any("cascade" in n for n in grads[1])
    assert set(grads[0]) == set(grads[1])
    for name, want in grads[1].items():
        if name.endswith("0.candidates.copies.bias"):  # (the conv's, before a BatchNorm: no gradient but rounding)
            assert grads[0][name].abs().max() < 1e-6 and want.abs().max() < 1e-6
            continue
        torch.testing.assert_close(grads[0][name], want, rtol=1e-4, atol=1e-5 * want.abs().max().item(), msg=name)


@needs_kernel
def test_a_compiler_that_refuses_the_machines_own_flags_builds_the_portable_library(tmp_path, monkeypatch):
    wrapper = tmp_path / "cc-no-march"
    wrapper.write_text('#!/bin/sh\nfor a in "$@"; do case "$a" in -march=*) echo "no -march here" >&2; exit 1;; '
                       'esac; done\nexec cc "$@"\n')
    wrapper.chmod(0o755)
    native.kernel.cache_clear()
    try:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        monkeypatch.setenv("CC", str(wrapper))
        assert native.kernel() is not None
        assert len(list(tmp_path.glob("cache/pbp_fx/candidate_kernels-*.so"))) == 1
    finally:
        native.kernel.cache_clear()


def _three_dendrites(model_fn, x, mode="pb"):
    torch.manual_seed(0)
    pm = pbp_fx.perforate(model_fn(), (x[:2],), mode=mode)
    for _ in range(3):
        pm.grow()
    with torch.no_grad():  # (a cascade and output weights of their own: zeros would hide a wrong term)
        for site in pm.sites.values():
            site.out_weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
            site.cascade.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    return pm.train()


def _neuron_step(pm, x, y, use_kernel, monkeypatch):
    """A training step's output, gradients and buffers, then the eval output; and how many times the cascade
    kernel ran."""
    ran = []
    run = copy.deepcopy(pm)
    if use_kernel:
        kernel_call = native.norm_cascade_sigmoid
        monkeypatch.setattr(native, "norm_cascade_sigmoid",
                            lambda *a, **k: ran.append(kernel_call(*a, **k)) or ran[-1])
    else:
        monkeypatch.setattr(native, "kernel", lambda: None)
    try:
        out = run(x)
        torch.nn.functional.cross_entropy(out, y).backward()
        run.eval()
        with torch.no_grad():
            evaluated = run(x)
    finally:
        monkeypatch.undo()
    grads = {n: p.grad for n, p in run.named_parameters() if p.grad is not None}
    return out, grads, dict(run.named_buffers()), evaluated, sum(r is not None for r in ran)


NEURON_MODELS = {
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(8 * 36, 4)), (16, 3, 6, 6)),
    "conv2d 3x3 outputs": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                                 nn.Flatten(), nn.Linear(8 * 9, 4)), (16, 3, 3, 3)),
    "linear": (lambda: nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4)), (16, 10)),
}


@needs_kernel
@pytest.mark.parametrize("name", list(NEURON_MODELS))
def test_installed_dendrites_norm_cascade_and_sigmoid_run_as_the_torch_ops_do(name, monkeypatch):
    model_fn, shape = NEURON_MODELS[name]
    x, y = torch.randn(*shape, generator=torch.Generator().manual_seed(3)), torch.arange(16) % 4
    pm = _three_dendrites(model_fn, x)
    got = _neuron_step(pm, x, y, True, monkeypatch)
    want = _neuron_step(pm, x, y, False, monkeypatch)
    assert got[4] == 2  # the kernel ran, training and in eval
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[3], want[3], rtol=1e-5, atol=1e-6)
    assert set(got[1]) == set(want[1]) and any("out_weight" in n for n in want[1])
    for key, grad in want[1].items():  # (atol 1e-6 at least: a conv bias before a BatchNorm has no gradient but rounding)
        torch.testing.assert_close(got[1][key], grad, rtol=1e-4, atol=max(1e-5 * grad.abs().max().item(), 1e-6),
                                   msg=key)
    for key, buf in want[2].items():
        torch.testing.assert_close(got[2][key], buf, rtol=1e-5, atol=1e-7, msg=key)


@needs_kernel
def test_dendrites_that_train_gd_mode_leave_the_cascade_kernel_out(monkeypatch):
    """gd mode trains the dendrites (and their input is not detached): their norm and cascade need the autograd
    graph the torch ops build."""
    model_fn, shape = NEURON_MODELS["conv2d"]
    x, y = torch.randn(*shape, generator=torch.Generator().manual_seed(3)), torch.arange(16) % 4
    pm = _three_dendrites(model_fn, x, mode="gd")
    got = _neuron_step(pm, x, y, True, monkeypatch)
    want = _neuron_step(pm, x, y, False, monkeypatch)
    assert got[4] == 1  # eval only
    assert any("dendrites.weight" in n for n in got[1])
    for key, grad in want[1].items():  # (atol 1e-6 at least: a conv bias before a BatchNorm has no gradient but rounding)
        torch.testing.assert_close(got[1][key], grad, rtol=1e-4, atol=max(1e-5 * grad.abs().max().item(), 1e-6),
                                   msg=key)


# -- where the kernels must step aside (a review of the norm kernel) ----------------------------------------

def _pool_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 36, 3))
    x = torch.randn(16, 3, 6, 6)
    pm = pbp_fx.perforate(model, (x[:2],))
    pm.train()
    pm.start_dendrite_phase(pool=4)
    return pm, x


@needs_kernel
def test_a_dendrite_phase_under_fake_tensors_runs_the_torch_ops(tmp_path):
    """A FakeTensor says it is on the CPU and its data_ptr() is 0: the kernel read address 0 and the process died."""
    script = tmp_path / "fake.py"
    script.write_text(
        "import sys; sys.path.insert(0, %r)\n"
        "import test_native\n"
        "from torch._subclasses.fake_tensor import FakeTensorMode\n"
        "pm, x = test_native._pool_model()\n"
        "with FakeTensorMode(allow_non_fake_inputs=True) as mode:\n"
        "    out = pm(mode.from_tensor(x))\n"
        "print(tuple(out.shape))\n" % os.path.dirname(__file__))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "(16, 3)", done.stderr[-2000:]


@needs_kernel
def test_a_second_order_gradient_through_the_copies_norm_and_sigmoid_is_the_torch_ops(monkeypatch):
    """create_graph=True (a gradient penalty): the kernel's backward is not differentiable, and the second-order
    terms were dropped without a word."""
    copies = LayerCopies(LayerSpec.from_module(nn.Linear(5, 3)), NormSpec.from_module(nn.BatchNorm1d(3)), 4)
    copies.reset_parameters("kaiming", generator=torch.Generator().manual_seed(2))
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(0))
    grads = []
    for use_kernel in (True, False):
        run = copy.deepcopy(copies)
        if not use_kernel:
            monkeypatch.setattr(native, "kernel", lambda: None)
        xs = x.clone().requires_grad_()
        (grad_x,) = torch.autograd.grad(run(xs, activation=torch.sigmoid).sum(), xs, create_graph=True)
        grad_x.pow(2).sum().backward()
        monkeypatch.undo()
        grads.append({n: p.grad for n, p in run.named_parameters()})
    for name, want in grads[1].items():
        torch.testing.assert_close(grads[0][name], want, rtol=1e-4, atol=max(1e-5 * want.abs().max().item(), 1e-6),
                                   msg=name)


@needs_kernel
def test_a_dendrite_phase_compiles_as_one_graph():
    pm, x = _pool_model()
    out = torch.compile(pm, fullgraph=True, backend="eager")(x)
    out.sum().backward()
    assert any(p.grad is not None for n, p in pm.named_parameters() if "candidates" in n)


@needs_kernel
def test_a_checkpointed_forward_counts_the_norms_batches_as_the_torch_ops_do(monkeypatch):
    """A recompute stops once its last saved tensor is made: the count after the kernel call was skipped while the
    running statistics were updated (momentum None: a cumulative average over a wrong count)."""
    copies = LayerCopies(LayerSpec.from_module(nn.Conv2d(4, 3, 3, padding=1)),
                         NormSpec.from_module(nn.BatchNorm2d(3, momentum=None)), 4)
    copies.reset_parameters("kaiming", generator=torch.Generator().manual_seed(0))
    runs = []
    for use_kernel in (True, False):
        run = copy.deepcopy(copies)
        if not use_kernel:
            monkeypatch.setattr(native, "kernel", lambda: None)
        for i in range(3):
            x = torch.randn(8, 4, 5, 5, generator=torch.Generator().manual_seed(i)) + i
            out = torch.utils.checkpoint.checkpoint(lambda x: run(x, split=True, activation=torch.sigmoid), x,
                                                    use_reentrant=False)
            out.pow(2).sum().backward()
        monkeypatch.undo()
        runs.append(run)
    assert int(runs[0].num_batches_tracked) == int(runs[1].num_batches_tracked)
    torch.testing.assert_close(runs[0].running_mean, runs[1].running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(runs[0].running_var, runs[1].running_var, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_torch_func_grad_through_the_candidates_runs_the_torch_ops():
    copies = LayerCopies(LayerSpec.from_module(nn.Linear(5, 3)), NormSpec.from_module(nn.BatchNorm1d(3)), 4)
    copies.reset_parameters("kaiming", generator=torch.Generator().manual_seed(0))
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(1))
    params = {k: v.detach() for k, v in copies.named_parameters()}
    buffers = {k: v.clone() for k, v in copies.named_buffers()}

    def loss(p):
        state = (p, {k: v.clone() for k, v in buffers.items()})
        return torch.func.functional_call(copies, state, (x,), {"split": True, "activation": torch.sigmoid}).pow(2).sum()

    grads = torch.func.grad(loss)(params)
    want = torch.autograd.grad(loss({k: v.requires_grad_() for k, v in params.items()}), params["weight"])[0]
    torch.testing.assert_close(grads["weight"], want, rtol=1e-4, atol=1e-6)


@needs_kernel
def test_per_row_tensors_of_another_size_are_declined():
    z = torch.randn(8, 4, 3)
    assert native.norm_sigmoid(z, None, None, None, torch.zeros(3), torch.ones(3), 0.1, 1e-5, 1) is None
    assert native.norm_cascade_sigmoid(torch.randn(8, 2, 3), torch.zeros(2, 3, 1), None, None, torch.zeros(2, 3),
                                       torch.ones(2, 3), True, 0.1, 1e-5, -1) is None


def _conv1d_column_cases():
    """(name, Conv1d, x): kernels, strides, paddings (also "same" with an even kernel: more on the right), a
    batch with samples left over, and inputs that are not contiguous."""
    g = torch.Generator().manual_seed(0)
    for cin, length, k, stride, pad in [(1, 40, 5, 2, 1), (3, 12, 5, 2, 1), (3, 12, 3, 1, 1), (2, 7, 1, 3, 0),
                                        (2, 7, 1, 1, 2), (3, 5, 5, 3, 0), (2, 3, 5, 1, 4), (2, 9, 4, 1, "same"),
                                        (3, 2, 3, 2, 3)]:
        conv = nn.Conv1d(cin, 4, k, stride=stride, padding=pad)
        for batch in (8, 11):
            x = torch.randn(batch, cin, length, generator=g)
            yield f"c{cin}-l{length}-k{k}-s{stride}-p{pad}-b{batch}", conv, x
        yield f"c{cin}-l{length}-k{k}-s{stride}-p{pad}-channels-last", conv, x.transpose(1, 2).contiguous().transpose(1, 2)
        yield f"c{cin}-l{length}-k{k}-s{stride}-p{pad}-strided", conv, torch.randn(8, cin, 2 * length, generator=g)[..., ::2]


@needs_kernel
@pytest.mark.parametrize("case", list(_conv1d_column_cases()), ids=lambda case: case[0])
def test_the_columns_kernel_gives_the_torch_ops_columns_exactly(case, monkeypatch):
    from pbp_fx import layers

    _, conv, x = case
    spec = LayerSpec.from_module(conv)
    for members in (1, 4):
        got, spatial = layers._columns(spec, x, members)
        with monkeypatch.context() as m:
            m.setattr(native, "columns_1d", lambda *args: None)
            want, want_spatial = layers._columns(spec, x, members)
        assert spatial == want_spatial == tuple(conv(x).shape[2:])
        assert got.shape == want.shape and torch.equal(got, want)


@needs_kernel
def test_the_columns_kernel_declines_where_the_input_needs_its_gradient_or_is_not_float32():
    x = torch.randn(8, 2, 10)
    assert native.columns_1d(x, 4, 3, 1, 1, 10) is not None
    assert native.columns_1d(x.requires_grad_(), 4, 3, 1, 1, 10) is None
    assert native.columns_1d(torch.randn(8, 2, 10, dtype=torch.float64), 4, 3, 1, 1, 10) is None
    assert native.columns_1d(torch.randn(3, 2, 10), 4, 3, 1, 1, 10) is None  # (fewer samples than members)


_ASAN_RUN = """
import sys
sys.path.insert(0, {tests!r})
import torch
from torch import nn
from pbp_fx import native
from pbp_fx.covariance_tap import candidate_gradient
import test_native
assert native.kernel() is not None, "no library"
for name, layer, norm, x in test_native._norm_cases():  # the norm kernel, forward and backward, both walks
    copies = test_native.LayerCopies(test_native.LayerSpec.from_module(layer), test_native.NormSpec.from_module(norm), 4)
    extra = torch.randn(copies(x, split=True).shape)
    out = copies(x, split=True, extra=extra.requires_grad_(), activation=torch.sigmoid)
    out.backward(torch.randn(out.shape))
    extra = extra.detach().clone()
    extra.view(-1)[::7] = float("nan")  # (the sigmoid of NaN)
    copies(x, split=True, extra=extra, activation=torch.sigmoid)
for name in test_native.NEURON_MODELS:  # the cascade kernel, row and block walks, training and eval
    model_fn, shape = test_native.NEURON_MODELS[name]
    x = torch.randn(*shape)
    pm = test_native._three_dendrites(model_fn, x)
    pm(x).sum().backward()
    pm.eval()(x)
g = torch.Generator().manual_seed(0)
for stride in (1, 2):  # the covariance kernel, reading the error in place and copied; a non-finite batch
    for layout, axis, cand in test_native._layouts(4, 6, 5, 4, g):
        if axis == 1:
            cand = cand[..., ::stride, ::stride] if cand.dim() == 5 else cand[..., ::stride]
            grad_y = torch.randn(24, 5, *([4] * (cand.dim() - 3)))
        else:
            grad_y = torch.randn(24, 5)
        grad_y[0].fill_(float("nan") if stride == 2 else 1.0)
        stats, snapshots, rows = test_native._pool_state(4, 5, g)
        candidate_gradient(grad_y, cand.contiguous() if layout == "conv" else cand, stats, snapshots, rows, True,
                           axis, True, stride if axis == 1 else 1, None, (0.9, 0, 1e-4, True))
for error in ("same layout", "split view", "copied"):  # the covariance and norm backward as one call
    for layout_of in ("grouped conv", "columns"):
        test_native.test_the_tap_and_norm_backward_as_one_call_gives_the_two_calls_results(3, 1024.0, 4.0, error,
                                                                                           True, True, layout_of)
test_native.test_the_tap_and_norm_call_leaves_a_batch_not_counted_unwritten_and_declines_what_it_cannot_take()
from pbp_fx import layers
for name, conv, x in test_native._conv1d_column_cases():  # the columns kernel
    layers._columns(layers.LayerSpec.from_module(conv), x, 4)
print("clean")
"""


@needs_kernel
def test_the_kernels_read_and_write_only_their_own_memory_under_address_sanitizer(tmp_path):
    """An unoptimised AddressSanitizer and UndefinedBehaviorSanitizer build of every kernel over every walk: a read
    after free (the error's block offsets) was visible only at -O0; the sigmoid of NaN converted NaN to an integer."""
    libasan = subprocess.run(["cc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(libasan) or not os.path.exists(libasan):
        pytest.skip("no AddressSanitizer runtime beside cc")
    wrapper = tmp_path / "cc-asan"
    wrapper.write_text('#!/bin/sh\nexec cc "$@" -O0 -g -fsanitize=address,undefined -fno-omit-frame-pointer\n')
    wrapper.chmod(0o755)
    script = tmp_path / "asan_run.py"
    script.write_text(_ASAN_RUN.format(tests=os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, CC=str(wrapper), XDG_CACHE_HOME=str(tmp_path / "cache"), LD_PRELOAD=libasan,
               ASAN_OPTIONS="detect_leaks=0", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("clean"), (done.stdout + done.stderr)[-3000:]
    assert "AddressSanitizer" not in done.stderr and "runtime error" not in done.stderr, done.stderr[-3000:]


@needs_kernel
@pytest.mark.parametrize("grown", [False, True])
def test_the_norm_sigmoid_and_tap_as_one_node_train_as_the_two_nodes_do(grown, monkeypatch):
    """EagerNormTap (one autograd node for the candidates' norm, sigmoid and tap, whose backward is one kernel call)
    against the same kernels as two nodes: the same gradients and statistics to float32 rounding (the fused call
    sums in another order), the same counters and running statistics; a retained graph's second backward is warned
    of and not counted."""
    from pbp_fx import covariance_tap, site

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 6, 5, stride=2, padding=1), nn.BatchNorm1d(6), nn.ReLU(inplace=True),
                          nn.Conv1d(6, 4, 3), nn.BatchNorm1d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 5, 3))
    x, y = torch.randn(16, 2, 16), torch.randint(0, 3, (16,))
    pm = pbp_fx.perforate(model, (x[:2],))
    if grown:
        pm.grow()
    pm.train()
    pm.start_dendrite_phase(pool=4)
    fused_calls = []
    one_node = site.EagerNormTap

    class Counted(one_node):
        @classmethod
        def apply(cls, *args):
            fused_calls.append(args[1].shape)
            return one_node.apply(*args)

    class TwoNodes:
        @staticmethod
        def apply(y, z, extra, weight, bias, norm, tap, unheld):
            c = native.norm_sigmoid_apply((z, extra, weight, bias, *norm))
            return covariance_tap.EagerTap.apply(y, c, *tap, unheld)

    fused_backward = native.candidate_norm_backward
    fused_done = []

    def counted_backward(*args):
        done = fused_backward(*args)
        fused_done.append(done is not None)
        return done

    runs = []
    for node in (Counted, TwoNodes):
        run = copy.deepcopy(pm)
        monkeypatch.setattr(site, "EagerNormTap", node)
        monkeypatch.setattr(native, "candidate_norm_backward", counted_backward)
        for _ in range(3):
            run.zero_grad()
            torch.nn.functional.cross_entropy(run(x), y).backward()
        loss = torch.nn.functional.cross_entropy(run(x), y)
        loss.backward(retain_graph=True)
        with pytest.warns(UserWarning, match="second backward"):
            loss.backward()
        monkeypatch.undo()
        runs.append(({n: p.grad for n, p in run.named_parameters() if p.grad is not None},
                     {n: b for n, b in run.named_buffers() if "candidates" in n}))
    assert len(fused_calls) == 2 * 4  # both conv sites, every forward
    assert fused_done == [True] * (2 * 4)  # every first backward of both sites: one call (the second: two)
    (grads, buffers), (want_grads, want_buffers) = runs
    assert set(grads) == set(want_grads) and any("norm_weight" in n for n in grads)
    for name, want in [*want_grads.items(), *want_buffers.items()]:
        got = grads[name] if name in grads else buffers[name]
        if want.is_floating_point():
            # (atol: a conv bias before the norm has a gradient of rounding noise, ~1e-8 on both sides)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)
        else:
            assert torch.equal(got, want), name


def _norm_saved(z, extra, affine, generator):
    """(saved, layout, eps) for norm_sigmoid_backward after the forward kernel on z (and extra)."""
    p, ch = z.shape[1], z.shape[2]
    weight, bias = ((torch.rand(p, ch, generator=generator) + 0.5, torch.randn(p, ch, generator=generator))
                    if affine else (None, None))
    args = native.norm_sigmoid_arguments(z, extra, weight, bias, torch.zeros(p, ch), torch.ones(p, ch), 0.1, 1e-5, 1)
    out, mean, invstd = native.norm_sigmoid_forward(*args)
    return (args[0], out, weight, bias, args[1], mean, invstd), args[8], args[7]


@needs_kernel
@pytest.mark.parametrize("members", [4, 3])
@pytest.mark.parametrize("scale, left_out", [(None, 1.0), (1024.0, 4.0), (None, 9.0)])
@pytest.mark.parametrize("error", ["same layout", "split view", "copied"])
@pytest.mark.parametrize("extra, affine", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("layout_of", ["grouped conv", "columns"])
def test_the_tap_and_norm_backward_as_one_call_gives_the_two_calls_results(members, scale, left_out, error, extra,
                                                                          affine, layout_of):
    g = torch.Generator().manual_seed(members)
    b, ch, s = 6, 5, ((3, 7) if layout_of == "grouped conv" else (11,))
    if layout_of == "grouped conv":  # [b, P, C, *S]
        z = torch.randn(b, members, ch, *s, generator=g) * 2 + 0.5
    else:  # a 1-D conv's columns: [P, C, b, L] in memory
        z = (torch.randn(members, ch, b, *s, generator=g) * 2 + 0.5).movedim(2, 0)
    ex = torch.randn(z.shape, generator=g) if extra else None
    if ex is not None:
        ex = torch.empty_like(z).copy_(ex)
    saved, layout, eps = _norm_saved(z, ex, affine, g)
    site_error = torch.randn(b * members, ch, *s, generator=g) * 0.1 + 0.02
    if error == "split view":  # (a site error dealt to the members: read in place where it can be)
        d = split_members(site_error, members, 1)
    elif error == "copied":  # (positions not innermost: copied into c's layout first)
        d = split_members(site_error.transpose(1, -1).contiguous().transpose(1, -1), members, 1)
    else:
        d = split_members(site_error, members, 1).contiguous()
    if scale is not None:
        d = d * scale
    state = _pool_state(members, ch, g)
    needs = (True, extra, affine, affine)
    settings = (0.9, 1, 1e-4, True)
    fused_state, two_state = copy.deepcopy(state), copy.deepcopy(state)
    with torch.no_grad():
        for step in range(3):  # (past the warm-up: snapshots taken)
            done = native.candidate_norm_backward(d, *fused_state, scale, settings, left_out, saved, layout, needs)
            counted, g_c = native.candidate_gradient(saved[1], d, *two_state, 1, scale, settings, left_out)
            want = native.norm_sigmoid_backward(g_c, saved, layout, eps, needs)
            assert done is not None and done[0] is counted is True
            for got_t, want_t, name in zip(done[1], want, ("dz", "g", "dweight", "dbias")):
                assert (got_t is None) == (want_t is None), name
                if want_t is not None:
                    torch.testing.assert_close(got_t, want_t, rtol=1e-5, atol=1e-6 * want_t.abs().max().item(),
                                               msg=f"{name}, step {step}")
            for got_s, want_s in zip(sum(fused_state, []), sum(two_state, [])):
                # (covariances summed in another order: a small one differs relative to the largest)
                torch.testing.assert_close(got_s, want_s, rtol=1e-5,
                                           atol=1e-6 * float(want_s.abs().amax(dim=None)) if want_s.numel() else 0)
    assert int(fused_state[0][5]) > 1  # (snapshots were taken)


@needs_kernel
@pytest.mark.parametrize("conv", [nn.Conv1d, nn.Conv2d])
def test_a_float32_model_trains_its_candidates_alike_whatever_torchs_default_dtype(conv):
    """The kernels' own tensors (the norm's batch statistics and affine gradients, a 1-D conv's columns) are float32
    under torch.set_default_dtype(torch.float64) too: allocated in the default dtype, the norm's weight gradients
    were float32 bits read as float64 values."""
    torch.manual_seed(0)
    two_d = conv is nn.Conv2d
    model = nn.Sequential(conv(2, 6, 3, padding=1), (nn.BatchNorm2d if two_d else nn.BatchNorm1d)(6), nn.ReLU(),
                          nn.Flatten(), nn.Linear(96 if two_d else 24, 3))
    x = torch.randn(16, 2, 4, 4) if two_d else torch.randn(16, 2, 4)
    pm = pbp_fx.perforate(model, (x[:2],))
    pm.train()
    pm.start_dendrite_phase(pool=4)
    runs = []
    for default in (torch.float32, torch.float64):
        run = copy.deepcopy(pm)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(default)
        try:
            run(x).sum().backward()
        finally:
            torch.set_default_dtype(previous)
        runs.append({n: p.grad for n, p in run.named_parameters() if p.grad is not None})
    assert any("norm_weight" in n for n in runs[0]) and set(runs[0]) == set(runs[1])
    for name, want in runs[0].items():
        assert runs[1][name].dtype == torch.float32 and torch.equal(runs[1][name], want), name


@needs_kernel
def test_a_site_error_is_dealt_to_the_members_once_a_backward_where_the_one_call_does_not_apply(monkeypatch):
    """A Linear site with a norm (positions not innermost) runs the two calls; deciding so comes before the error is
    dealt, which a declined one call had done a second time at every step."""
    from pbp_fx import covariance_tap

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(16, 8)
    pm = pbp_fx.perforate(model, (x[:2],))
    pm.train()
    pm.start_dendrite_phase(pool=4)
    dealt, one_call = [], []
    deal, fused = covariance_tap._dealt_error, native.candidate_norm_backward
    monkeypatch.setattr(covariance_tap, "_dealt_error", lambda *args: (dealt.append(1), deal(*args))[1])
    monkeypatch.setattr(native, "candidate_norm_backward", lambda *args: (one_call.append(1), fused(*args))[1])
    pm(x).sum().backward()
    assert len(pm.sites) == 2 and len(dealt) == 2 and not one_call


@needs_kernel
@pytest.mark.parametrize("scaled", [False, True])
def test_a_batch_not_counted_through_the_one_call_gives_the_two_calls_gradients(scaled, monkeypatch):
    """A non-finite site error through EagerNormTap's one-call backward: the batch seen, not counted, and the
    candidates' gradients those of the two calls (zero; NaN under a GradScaler, which then skips the step)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(96, 3))
    x = torch.randn(16, 2, 4, 4)
    pm = pbp_fx.perforate(model, (x[:2],))
    pm.train()
    pm.start_dendrite_phase(pool=4)
    if scaled:
        pm.grad_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    runs = []
    for one_call in (True, False):
        run = copy.deepcopy(pm)
        if not one_call:
            monkeypatch.setattr(native, "candidate_norm_backward", lambda *args: None)
        run(x).sum().backward()  # (one counted batch first)
        run.zero_grad()
        (run(x).sum() * float("inf")).backward()
        monkeypatch.undo()
        runs.append(({n: p.grad for n, p in run.named_parameters() if "candidates" in n and p.grad is not None},
                     {n: b.clone() for n, b in run.named_buffers() if "candidates" in n}))
    (grads, buffers), (want_grads, want_buffers) = runs
    assert set(grads) == set(want_grads) and any("copies.weight" in n for n in grads)
    for name, want in want_grads.items():
        conv = "sites.0." in name
        assert (want.isnan().all() if scaled else not want.any()) or not conv, name
        assert torch.equal(grads[name], want) or (scaled and grads[name].isnan().all() and want.isnan().all()), name
    for name, want in want_buffers.items():
        torch.testing.assert_close(buffers[name], want, rtol=1e-5, atol=1e-7, equal_nan=True, msg=name)
    conv_pool = {n.rsplit(".", 1)[1]: b for n, b in buffers.items() if "sites.0." in n}
    assert int(conv_pool["batches_seen"]) == 2 and int(conv_pool["steps"]) == 1


@needs_kernel
@torch.no_grad()  # (as in a backward without create_graph)
def test_the_tap_and_norm_call_leaves_a_batch_not_counted_unwritten_and_declines_what_it_cannot_take():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 4, 5, 3, 3, generator=g)
    saved, layout, eps = _norm_saved(z, None, True, g)
    d = torch.randn(z.shape, generator=g)
    d[0, 0, 0, 0, 0] = float("inf")
    stats, snapshots, rows = _pool_state(4, 5, g)
    done = native.candidate_norm_backward(d, stats, snapshots, rows, None, (0.9, 0, 1e-4, True), 1.0, saved, layout,
                                          (True, False, True, True))
    assert done == (False, None)
    assert int(stats[3]) == 0 and int(stats[4]) == 1  # (seen, not counted)
    assert not stats[0].any() and not stats[2].any()
    args = (d.abs(), stats, snapshots, rows, None, (0.9, 0, 1e-4, True), 1.0, saved, layout, (True, False, True, True))
    assert native.candidate_norm_backward(*args) is not None
    with torch.enable_grad():  # (create_graph: the differentiable torch ops run)
        assert native.candidate_norm_backward(*args) is None
    lin = torch.randn(6, 4, 5, generator=g)  # (a Linear's candidates: positions are not innermost)
    saved_lin, layout_lin, _ = _norm_saved(lin, None, True, g)
    assert native.candidate_norm_backward(torch.randn(lin.shape, generator=g), stats, snapshots, rows, None,
                                          (0.9, 0, 1e-4, True), 1.0, saved_lin, layout_lin,
                                          (True, False, True, True)) is None


@needs_kernel
@pytest.mark.parametrize("layout", ["conv", "linear"])
def test_the_covariance_kernel_keeps_float32_precision_for_an_error_with_a_large_mean(layout):
    """The kernel's error centring lost half a unit of the error's offset on conv layouts (the library's
    -fassociative-math turned (d - a) - b into d - (a + b)): 0.49 of C at an offset 1e4 x the error's spread."""
    g = torch.Generator().manual_seed(1)
    p, ch = 4, 8
    c = torch.rand((25, p, ch, 19) if layout == "conv" else (25, p, ch), generator=g)
    dims = (0, 3) if layout == "conv" else (0,)
    for offset in (1.0, 100.0, 1e4):
        d = offset + 0.01 * torch.randn(c.shape, generator=g) + 0.003 * c
        grad_y = d.movedim(1, 0).reshape(p * 25, *c.shape[2:]).contiguous()  # member m's samples m*25..
        c64, d64 = c.double(), d.double()
        want = p * ((c64 - c64.mean(dims, keepdim=True)) * (d64 - d64.mean(dims, keepdim=True))).sum(dims)
        stats, snapshots, rows = _pool_state(p, ch, g, row_shapes=((1,),))
        assert native.candidate_gradient(c, split_members(grad_y, p, 1 if layout == "conv" else -1), stats,
                                         snapshots, rows, 1, None, (0.5, 0, 1e-4, False), 1.0) is not None
        cov = stats[0].double() / 0.5  # (ema = (1 - 0.5) C after one batch without bias correction)
        assert ((cov - want).abs().max() / want.abs().max()).item() < 2e-6, offset


def _dendrite_pool_run(seed=0):
    """A perforated MNIST-1D CNN in its dendrite phase (pool 4, split) with a batch: (model, x, y)."""
    from pbp_fx.models import mnist1d_cnn

    torch.manual_seed(seed)
    pm = pbp_fx.perforate(mnist1d_cnn.build_model(), mnist1d_cnn.example_inputs())
    pm.train()
    pm.start_dendrite_phase(pool=4)
    g = torch.Generator().manual_seed(seed)
    shape = mnist1d_cnn.example_inputs()[0].shape[1:]
    return pm, torch.randn(40, *shape, generator=g), torch.randint(0, 10, (40,), generator=g)


def _step(pm, x, y):
    """One backward, on x shifted by the steps counted so far (a new batch each time)."""
    pm.zero_grad()
    shift = 0.1 * int(next(iter(pm.sites.values())).candidates.steps)
    torch.nn.functional.cross_entropy(pm(x + shift), y).backward()


@needs_kernel
def test_a_pools_kernel_arguments_follow_its_tensors_when_they_are_replaced_or_moved(monkeypatch):
    """The pool's checked kernel arguments are reused from step to step; a statistic replaced by another tensor,
    a weight whose memory moved (.data reassigned) and a copy of the model each get their own, so the kernel
    never writes into a tensor the pool no longer holds."""
    pm, x, y = _dendrite_pool_run()
    for _ in range(2):
        _step(pm, x, y)
    pools = [s.candidates for s in pm.sites.values()]
    twin = copy.deepcopy(pm)
    old_ema = [p.ema for p in pools]
    for p in pools:
        p.ema = p.ema.clone()
        p.copies.weight.data = p.copies.weight.data.clone()
    before = [e.clone() for e in old_ema]
    _step(pm, x, y)
    for p, old, was in zip(pools, old_ema, before):
        assert torch.equal(old, was)  # (the replaced tensor is left alone)
    with monkeypatch.context() as m:  # the same step as torch ops, from the twin (its own, fresh arguments)
        m.setattr(native, "kernel", lambda: None)
        torch_twin = copy.deepcopy(twin)
        _step(torch_twin, x, y)
    _step(twin, x, y)
    for p, t, tt in zip(pools, (s.candidates for s in twin.sites.values()),
                        (s.candidates for s in torch_twin.sites.values())):
        for name in ("ema", "ema_sq", "best"):
            torch.testing.assert_close(getattr(p, name), getattr(tt, name), rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(getattr(t, name), getattr(tt, name), rtol=1e-4, atol=1e-6)
        assert int(p.steps) == int(t.steps) == int(tt.steps) == 3


def test_a_kernel_out_of_memory_raises_memory_error_and_refused_arguments_a_runtime_error():
    """The kernels return -2 where a work space cannot be allocated (it used to read as refused arguments)."""
    t = torch.zeros(3, 4)
    with pytest.raises(MemoryError, match=r"the cascade kernel could not allocate its work space \(shape \[3, 4\]\)"):
        native._check(-2, "cascade", t)
    with pytest.raises(RuntimeError, match=r"the norm kernel refused its arguments \(shape \[3, 4\]\)"):
        native._check(-1, "norm", t)
    native._check(0, "norm", t)
    native._check(1, "covariance", t)


def test_a_batch_of_one_trains_channels_last_candidates_as_contiguous_ones_with_the_torch_ops(monkeypatch):
    """torch 2.13's CPU batch_norm backward gave a batch of one a wrong input gradient where the stacked copies'
    channels_last view met a dense gradient (EMA off by 7e-4 of 0.04, weights by 0.02); the kernel was right."""
    monkeypatch.setattr(native, "kernel", lambda: None)

    def dendrite_phase(layout):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                              nn.Linear(6 * 8 * 8, 3))
        pm = pbp_fx.perforate(model, (torch.randn(2, 3, 8, 8),)).to(memory_format=layout)
        pm.train()
        pm.start_dendrite_phase(pool=4, generator=torch.Generator().manual_seed(1))
        opt = torch.optim.SGD(list(pm.trainable_parameters()), lr=0.1)
        g = torch.Generator().manual_seed(2)
        for _ in range(3):
            x = torch.randn(1, 3, 8, 8, generator=g).contiguous(memory_format=layout)
            opt.zero_grad()
            nn.functional.cross_entropy(pm(x), torch.randint(0, 3, (1,), generator=g)).backward()
            opt.step()
        pool = pm.sites["0"].candidates
        return pool.ema.clone(), pool.copies.weight.detach().clone()

    dense, channels_last = dendrite_phase(torch.contiguous_format), dendrite_phase(torch.channels_last)
    assert dense[0].abs().max() > 1e-3
    for a, b in zip(dense, channels_last):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

"""pbp_fx.native: the covariance tap's backward as one compiled call, against the torch ops it replaces."""
import copy
import os

import pytest
import torch

from pbp_fx import native
from pbp_fx.covariance_tap import STAT_NAMES, candidate_gradient
from pbp_fx.layers import copy_dim

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
        assert len(list(tmp_path.glob("pbp_fx/covariance_kernel-*.so"))) == 1
        native.kernel.cache_clear()
        monkeypatch.setenv("CC", (os.environ.get("CC") or "cc") + " -g")
        assert native.kernel() is not None
        assert len(list(tmp_path.glob("pbp_fx/covariance_kernel-*.so"))) == 2
        assert not list(tmp_path.glob("pbp_fx/tmp*"))
    finally:
        native.kernel.cache_clear()

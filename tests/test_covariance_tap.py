"""pbp_fx.covariance_tap: the statistics update, decided on the host (CPU) or by masks (devices)."""
import torch

from pbp_fx.covariance_tap import fold_batch


def _state(p=3, c=4, rows=((3, 4, 2, 5), (3, 4))):
    stats = [torch.zeros(p, c), torch.zeros(p, c), torch.zeros(p, c), torch.tensor(0), torch.tensor(0), torch.tensor(0)]
    params = [torch.randn(*shape, generator=torch.Generator().manual_seed(i)) for i, shape in enumerate(rows)]
    snapshots = [t.clone() for t in params]
    return stats, snapshots, params


def test_host_and_masked_decisions_give_the_same_statistics():
    g = torch.Generator().manual_seed(0)
    settings = (0.9, 4, 0.01, True)  # decay, warm-up, threshold, bias correction
    runs = {host: _state() for host in (True, False)}
    for step in range(40):
        cov = torch.randn(3, 4, generator=g) * (1 + step / 10)
        if step == 7:
            cov[1, 2] = float("nan")  # a step GradScaler skips: seen, not counted
        for rows in (runs[True][2], runs[False][2]):
            for r in rows:
                r.add_(0.01 * step)  # the candidates train: snapshots must pick the right rows
        for host, (stats, snapshots, rows) in runs.items():
            sign = fold_batch(stats, snapshots, rows, cov.clone(), settings, host=host)
            again = fold_batch(stats, snapshots, rows, cov.clone() * 5, settings, new=torch.tensor(False), host=host)
            assert torch.equal(sign, again)  # a retained graph's second backward changes nothing
    (a, sa, _), (b, sb, _) = runs[True], runs[False]
    assert int(a[4]) == int(b[4]) == 40 and int(a[3]) == int(b[3]) == 39  # seen, counted
    for x, y in zip(a + sa, b + sb):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    assert int(a[5]) > 4  # some snapshot was taken after the warm-up

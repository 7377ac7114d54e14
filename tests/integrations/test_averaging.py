"""Averaged copies (torch.optim.swa_utils.AveragedModel, a ModelEmaV3-style EMA) across restructures."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import pbp_fx
from pbp_fx.integrations.averaging import StaleAverageError, follow, structure, track


class ModelEma(nn.Module):
    """An EMA in the style of timm's ModelEmaV3 (timm does not install here): a frozen deep copy
    lerped towards the live model's parameters and buffers, over zipped parameter lists."""

    def __init__(self, model: nn.Module, decay: float = 0.9):
        super().__init__()
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema_v, model_v in zip(self.module.parameters(), model.parameters()):
            ema_v.lerp_(model_v, 1.0 - self.decay)
        for ema_b, model_b in zip(self.module.buffers(), model.buffers()):
            ema_b.copy_(model_b)

    def forward(self, *args):
        return self.module(*args)


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    pm = pbp_fx.perforate(model, torch.zeros(2, 6))
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    return pm, x, y


def _tensors(module: nn.Module) -> dict:
    return {n: t.detach().clone() for n, t in module.state_dict().items() if isinstance(t, torch.Tensor)}


def _train(pm, opt, x, y, steps=5):
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(pm(x), y).backward()
        opt.step()


@pytest.mark.parametrize("kind", ["swa", "ema"])
def test_averaged_copy_follows_every_restructure(kind):
    pm, x, y = _setup()
    ctl = pbp_fx.PhaseController(pm, pbp_fx.PBConfig(patience=1, improvement=10.0, dendrite_patience=1,
                                                     max_dendrite_epochs=2, max_dendrites=2, pool=2, retries=1))
    avg = AveragedModel(pm, multi_avg_fn=get_ema_multi_avg_fn(0.9)) if kind == "swa" else ModelEma(pm)
    update = avg.update_parameters if kind == "swa" else avg.update
    track(avg, pm)
    restructures, most_dendrites = 0, 0
    for _ in range(12):
        _train(pm, ctl.optimizer, x, y)
        update(pm)
        before = _tensors(avg.module)
        decision = ctl.step(0.0)  # never improves by 10: phases switch every epoch or two
        if decision == "restructured" or decision == "complete":
            with pytest.raises(StaleAverageError, match=r"stale: .* call pbp_fx.integrations.averaging.follow"):
                avg(x)
            follow(avg, pm)
            restructures += 1
            most_dendrites = max(most_dendrites, *pm.num_dendrites.values())
            # Entries that kept their name and shape keep their average; new ones start at the live values.
            live = _tensors(pm)
            for name, value in _tensors(avg.module).items():
                if name in before and before[name].shape == value.shape:
                    assert torch.equal(value, before[name]), name
                else:
                    assert torch.equal(value, live[name]), name
        assert structure(avg.module) == structure(pm)
        avg(x)  # a fresh copy is usable
        update(pm)  # and averaging pairs the right tensors again
        if decision == "complete":
            break
    # Dendrite phase, install, retry, complete (the best state, without dendrites, is restored).
    assert restructures >= 4 and most_dendrites >= 1


def test_reset_restarts_the_average_from_the_live_model():
    pm, x, y = _setup()
    ctl = pbp_fx.PhaseController(pm, pbp_fx.PBConfig(patience=1, improvement=10.0, pool=2))
    swa = AveragedModel(pm)
    _train(pm, ctl.optimizer, x, y)
    swa.update_parameters(pm)
    assert ctl.step(0.0) == "continue" and ctl.step(0.0) == "restructured"  # dendrite phase started
    follow(swa, pm, reset=True)
    assert int(swa.n_averaged) == 0
    live = _tensors(pm)
    assert all(torch.equal(v, live[k]) for k, v in _tensors(swa.module).items())


def test_an_averaged_copy_followed_into_a_dendrite_phase_keeps_its_own_buffers():
    """The copy follow() made held the live model's phase-start buffers and put them back over its averaged
    BatchNorm statistics at every forward."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.bn, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(F.relu(self.bn(self.c(x))).mean((2, 3)))

    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 3, (16,))
    pm = pbp_fx.perforate(Net(), (x,))
    ema = track(AveragedModel(pm, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True), pm)

    def step(opt, scale=1.0):
        loss = F.cross_entropy(pm(x * scale), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update_parameters(pm)

    pm.train()
    opt = torch.optim.SGD(pm.parameters(), lr=0.1)
    for _ in range(3):
        step(opt)
    pm.start_dendrite_phase(pool=2)
    follow(ema, pm)
    opt = torch.optim.SGD(list(pm.trainable_parameters()), lr=0.1)
    for _ in range(3):
        step(opt, scale=3.0)
    averaged = dict(ema.module.named_buffers())
    name = next(n for n in averaged if n.endswith("bn.running_var"))
    before = averaged[name].clone()
    assert not torch.equal(before, dict(pm.named_buffers())[name])
    ema.eval()
    with torch.no_grad():
        ema(x)
    assert torch.equal(dict(ema.module.named_buffers())[name], before)

"""PhaseSchedule alone: scripted score sequences in, actions out (no model, no torch)."""
import subprocess
import sys

import pytest

from pbp_fx.config import ConfigError, PBConfig
from pbp_fx.errors import TrainingError
from pbp_fx.schedule import Kind, PhaseSchedule

C, S, G, T, I, D = Kind.CONTINUE, Kind.START_DENDRITES, Kind.GROW, Kind.RETRY, Kind.INSTALL, Kind.COMPLETE


def _run(schedule, steps):
    """steps: scores (neuron phase) or (score, candidate_progress) pairs."""
    out = []
    for s in steps:
        score, progress = s if isinstance(s, tuple) else (s, False)
        out.append(schedule.step(score, progress).kind)
    return out


def test_the_module_does_not_import_torch():
    # pbp_fx/__init__ imports torch; load the module file on its own.
    code = ("import importlib.util, sys, types; pkg = types.ModuleType('pbp_fx'); pkg.__path__ = ['pbp_fx']; "
            "sys.modules['pbp_fx'] = pkg; import pbp_fx.schedule; print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


def test_neuron_phase_ends_after_patience_then_dendrites_install_after_dendrite_patience():
    s = PhaseSchedule(PBConfig(patience=2, dendrite_patience=2, max_dendrites=3))
    assert _run(s, [0.5, 0.6, 0.6, 0.59]) == [C, C, C, S]
    assert s.phase == "dendrite" and s.best_epoch == 2
    assert _run(s, [(0.6, True), (0.6, False), (0.6, False)]) == [C, C, I]
    assert s.phase == "neuron" and s.dendrites == 1 and s.rounds == 1


def test_new_best_is_flagged_only_on_a_gain_above_improvement():
    s = PhaseSchedule(PBConfig(patience=5, improvement=0.05))
    flags = [s.step(x).new_best for x in [0.5, 0.54, 0.56, 0.57, 0.62]]
    assert flags == [True, False, True, False, True]
    assert s.best_score == 0.62


def test_minimize():
    s = PhaseSchedule(PBConfig(patience=2, improvement=0.05, maximize=False))
    assert _run(s, [1.0, 0.97, 0.96]) == [C, C, S]
    assert s.best_score == 1.0


def test_neuron_epochs_caps_a_neuron_phase():
    s = PhaseSchedule(PBConfig(patience=100, neuron_epochs=3))
    assert _run(s, [0.1, 0.2, 0.3]) == [C, C, S]


def test_max_dendrite_epochs_caps_a_dendrite_phase_despite_progress():
    s = PhaseSchedule(PBConfig(patience=1, dendrite_patience=10, max_dendrite_epochs=3))
    _run(s, [0.5, 0.5])
    assert _run(s, [(0.5, True)] * 3) == [C, C, I]


def test_retry_after_a_round_without_gain_then_complete_when_retries_are_spent():
    s = PhaseSchedule(PBConfig(patience=1, dendrite_patience=1, max_dendrites=5, retries=1))
    assert _run(s, [0.5, 0.5]) == [C, S]       # round 0 ends
    assert _run(s, [0.5]) == [I]               # dendrite 1
    assert _run(s, [0.5]) == [T]               # no new best: retry, rewinding to K = 0
    assert s.dendrites == 0 and s.retries_left == 0 and s.phase == "dendrite"
    assert _run(s, [0.5]) == [I]
    assert _run(s, [0.5]) == [D]               # still no gain and no retries left
    assert s.done and s.dendrites == 0
    assert s.step(0.99).kind is D              # stays complete


def test_an_accepted_round_refills_the_retries():
    s = PhaseSchedule(PBConfig(patience=1, dendrite_patience=1, max_dendrites=5, retries=1))
    _run(s, [0.5, 0.5, 0.5])                   # round 0, dendrite 1 installed
    assert _run(s, [0.5]) == [T]               # retry (0 left)
    assert _run(s, [0.5, 0.7, 0.7]) == [I, C, S]  # the retried round gains: accepted
    assert s.retries_left == 1 and s.dendrites == 1


def test_max_dendrites_completes_keeping_the_dendrites():
    s = PhaseSchedule(PBConfig(patience=1, dendrite_patience=1, max_dendrites=2))
    out = _run(s, [0.5, 0.5, 0.5, 0.6, 0.6, 0.6, 0.7, 0.7])
    assert out == [C, S, I, C, S, I, C, D]
    assert s.dendrites == 2 and s.best_score == 0.7 and s.done


def test_gd_mode_grows_without_a_dendrite_phase():
    s = PhaseSchedule(PBConfig(mode="gd", patience=1, max_dendrites=2, retries=0))
    assert _run(s, [0.5, 0.5]) == [C, G]
    assert s.phase == "neuron" and s.dendrites == 1
    assert _run(s, [0.7, 0.7]) == [C, G]
    assert _run(s, [0.7]) == [D]               # no gain, no retries: rewinds to K = 1
    assert s.dendrites == 1


def test_gd_retry_regrows():
    s = PhaseSchedule(PBConfig(mode="gd", patience=1, max_dendrites=3, retries=1))
    assert _run(s, [0.5, 0.5, 0.5]) == [C, G, T]
    assert s.dendrites == 1  # rewound to 0, grew 1


def test_stop_completes_from_any_phase():
    s = PhaseSchedule(PBConfig(patience=1))
    _run(s, [0.5, 0.5])
    assert s.phase == "dendrite"
    assert s.stop("epoch cap").kind is D
    assert s.done and s.phase == "neuron" and s.dendrites == 0


def test_non_finite_scores_before_a_best_or_in_a_dendrite_phase_are_refused_and_change_nothing():
    """In a dendrite phase a NaN went on (and an inf installed), both into the history."""
    s = PhaseSchedule(PBConfig())
    assert not s.takes_divergence
    with pytest.raises(TrainingError, match=r"not finite\) before any finite best: check the validation data and the "
                                            r"metric for NaN/Inf, or a learning rate that diverges at once"):
        s.step(float("nan"))
    assert s.state_dict() == PhaseSchedule(PBConfig()).state_dict()
    s = PhaseSchedule(PBConfig(patience=1))
    _run(s, [0.5, 0.5])
    assert s.phase == "dendrite"
    before = s.state_dict()
    for bad in (float("nan"), float("inf")):
        with pytest.raises(TrainingError, match=r"not finite\) in a dendrite phase, whose frozen model's output"):
            s.step(bad, candidate_progress=True)
    assert s.state_dict() == before


def test_state_dict_resumes_identically():
    cfg = PBConfig(patience=2, dendrite_patience=1, max_dendrites=3, retries=1)
    seq = [0.5, 0.6, 0.6, 0.6, (0.6, True), 0.6, 0.62, 0.62, 0.62, 0.62, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]
    whole = PhaseSchedule(cfg)
    expected = _run(whole, seq)
    for cut in range(len(seq)):
        a = PhaseSchedule(cfg)
        first = _run(a, seq[:cut])
        b = PhaseSchedule(cfg)
        b.load_state_dict(a.state_dict())
        assert first + _run(b, seq[cut:]) == expected
        assert b.state_dict() == whole.state_dict()


def test_a_resume_under_other_retries_counts_the_retries_used_against_the_new_number():
    """Saved with retries=2 after one retry, resumed with retries=0: the warning said the run continues with
    0, but the saved 'retries_left' gave it 1 more (a reviewer)."""
    a = PhaseSchedule(PBConfig(patience=1, dendrite_patience=1, max_dendrites=5, retries=2))
    assert _run(a, [0.5, 0.5, 0.5, 0.5]) == [C, S, I, T]  # one retry used, one left
    for retries, left in [(0, 0), (1, 0), (2, 1), (4, 3)]:
        b = PhaseSchedule(PBConfig(patience=1, dendrite_patience=1, max_dendrites=5, retries=retries))
        b.load_state_dict(a.state_dict())
        assert b.retries_left == left
    older = {k: v for k, v in a.state_dict().items() if k != "retries_used"}  # (written before it was saved)
    b = PhaseSchedule(PBConfig(patience=1, dendrite_patience=1, max_dendrites=5, retries=0))
    b.load_state_dict(older)
    assert b.retries_left == 0 and _run(b, [0.5, 0.5]) == [I, D]


def test_a_schedule_takes_a_dict_or_none_as_its_config():
    assert PhaseSchedule({"patience": 3}).config == PBConfig(patience=3)
    assert PhaseSchedule().config == PBConfig()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_score_after_a_best_ends_the_neuron_phase_at_once(bad):
    """A diverged neuron phase (NaN weights) raised, leaving the model diverged and the run unfinished."""
    s = PhaseSchedule(PBConfig(patience=5, max_dendrites=2))
    _run(s, [0.5, 0.6])
    assert s.takes_divergence
    a = s.step(bad)
    assert a.kind is Kind.START_DENDRITES and not a.new_best and a.note.startswith(f"score {bad}: diverged; neuron")
    assert (s.best_score, s.best_epoch, s.phase) == (0.6, 2, "dendrite")
    s.step(0.6, candidate_progress=False)  # (dendrite_patience 3 by default)
    _run(s, [0.6, 0.6])
    assert s.phase == "neuron" and s.dendrites == 1
    a = s.step(bad)  # a round that set no best and diverged: retried, from the best weights (0 dendrites)
    assert a.kind is Kind.RETRY and s.dendrites == 0
    s = PhaseSchedule(PBConfig(patience=1, dendrite_patience=1, max_dendrites=1))
    _run(s, [0.5, 0.5, (0.5, False), 0.7])  # a dendrite installed, then a new best
    a = s.step(bad)  # at max_dendrites: the run ends, at its best
    assert a.kind is Kind.COMPLETE and s.done and (s.best_epoch, s.dendrites) == (4, 1)


def test_the_end_without_a_new_best_names_the_retries_it_had():
    """With retries=0 the note said 'no new best after retries'."""
    for retries, note in ((0, "no new best"), (1, "no new best after 1 retry"), (2, "no new best after 2 retries")):
        s = PhaseSchedule(PBConfig(patience=1, retries=retries, dendrite_patience=1, max_dendrite_epochs=1))
        notes = [s.step(score, False).note for score in [0.5] + [0.4] * 12 if not s.done]
        assert any(n.startswith(note) and (retries or "after" not in n) for n in notes), notes


def test_a_sites_progress_rule_is_plain_data():
    """The dendrite phase's stop test lives here, as the other phase decisions (CandidatePool only measures)."""
    from pbp_fx.schedule import site_progressed

    assert not site_progressed(0, 5, 1.0, 0.0, 0.0, 0.01)  # (no batch counted: no progress)
    assert site_progressed(3, 5, 0.0, 0.0, 1.0, 0.01)  # (warming up: not stale)
    assert site_progressed(6, 5, 0.2, 0.01, 0.1, 0.5)  # (a gain of 100 %, beyond the noise)
    assert not site_progressed(6, 5, 0.2, 0.2, 0.1, 0.5)  # (within the noise)
    assert not site_progressed(6, 5, 0.75, 0.5, 0.25, 0.5)  # (a gain of exactly the noise: not beyond it)
    assert not site_progressed(6, 5, 0.104, 0.0, 0.1, 0.05)  # (a gain of 4 % under the 5 % asked)


def test_an_equal_score_is_no_new_best_even_at_improvement_0():
    """improvement=0: a gain must still be > 0, or a plateau would reset the patience every epoch."""
    s = PhaseSchedule(PBConfig(patience=2, improvement=0.0))
    assert s.step(0.5).new_best
    again = s.step(0.5)
    assert not again.new_best and again.kind is Kind.CONTINUE
    assert s.step(0.5).kind is Kind.START_DENDRITES


def test_a_resume_after_a_retry_keeps_the_retries_used():
    """The retries left are state: a run resumed after a retry must not get them back."""
    cfg = PBConfig(patience=1, dendrite_patience=1, retries=1, max_dendrites=3)
    scores = [0.5] * 7  # best, stale: start; install; no new best: retry; install; no new best: complete

    def run(s, part):
        return [s.step(v, False).kind for v in part]

    expected = run(PhaseSchedule(cfg), scores)
    assert Kind.RETRY in expected and expected[-1] is Kind.COMPLETE
    for cut in range(len(scores)):
        first = PhaseSchedule(cfg)
        before = run(first, scores[:cut])
        resumed = PhaseSchedule(cfg)
        resumed.load_state_dict(first.state_dict())
        assert before + run(resumed, scores[cut:]) == expected, cut


def test_a_numpy_or_tensor_score_is_kept_as_a_float_so_the_state_is_json():
    """PhaseSchedule.step(np.float32(0.5)) kept the numpy scalar as best_score: json.dumps(state_dict()) failed."""
    import json

    import numpy as np
    import torch

    schedule = PhaseSchedule(PBConfig(patience=5))
    schedule.step(np.float32(0.5))
    schedule.step(torch.tensor(0.75))
    assert type(schedule.best_score) is float and schedule.best_score == 0.75
    assert json.loads(json.dumps(schedule.state_dict()))["best_score"] == 0.75
    with pytest.raises(ConfigError, match="takes the epoch's validation score as a number, got str '0.5'"):
        schedule.step("0.5")


def test_a_dendrite_phase_resumed_under_a_lower_max_dendrites_installs_nothing():
    """A state saved in round 2's dendrite phase, resumed with max_dendrites 1, installed dendrite 2 (a reviewer)."""
    first = PhaseSchedule(PBConfig(patience=1, dendrite_patience=1, max_dendrites=3))
    for score in (0.5, 0.5, 0.5, 0.6, 0.6):  # neuron, dendrite (install 1), neuron (a best), stale: round 2 starts
        first.step(score)
    assert (first.phase, first.dendrites) == ("dendrite", 1)
    lowered = PhaseSchedule(PBConfig(patience=1, dendrite_patience=1, max_dendrites=1))
    lowered.load_state_dict(first.state_dict())
    action = lowered.step(0.6)
    assert action.kind is Kind.COMPLETE and lowered.done and lowered.phase == "neuron" and lowered.dendrites == 1
    assert action.note == "max_dendrites (1) reached: the round's candidates dropped"

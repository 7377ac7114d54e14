"""PBConfig / TrainConfig: validation, dict round trip, replace."""
import dataclasses
import inspect
import json
import math
import re

import pytest

from pbp_fx.config import ConfigError, PBConfig, TrainConfig, read_settings


@pytest.mark.parametrize("cls,field,value,match", [
    (PBConfig, "pool", 0, "pool=0: must be at least 1"),
    (PBConfig, "pool", -3, "at least 1"),
    (PBConfig, "pool", 2.5, "whole number"),
    (PBConfig, "pool", True, "whole number"),
    (PBConfig, "patience", 0, "patience=0"),
    (PBConfig, "max_dendrites", 0, "max_dendrites"),
    (PBConfig, "candidate_lr", 0.0, "greater than 0"),
    (PBConfig, "candidate_lr", -1.0, "greater than 0"),
    (PBConfig, "candidate_lr", math.nan, "finite"),
    (PBConfig, "candidate_lr", math.inf, "finite"),
    (PBConfig, "ema_decay", 1.0, "less than 1"),
    (PBConfig, "improvement", -0.1, "at least 0"),
    (PBConfig, "retries", -1, "at least 0"),
    (PBConfig, "neuron_epochs", 0, "at least 1"),
    (PBConfig, "candidate_stride", 0, "candidate_stride=0: must be at least 1"),
    (PBConfig, "mode", "sgd", "one of 'pb', 'gd'"),
    (PBConfig, "maximize", "yes", "true or false"),
    (TrainConfig, "epochs", 0, "epochs=0"),
    (TrainConfig, "lr", math.nan, "finite"),
    (TrainConfig, "batch_size", 0, "at least 1"),
    (TrainConfig, "frontend", "jit", "'auto', 'fx', 'export'"),
])
def test_bad_values_name_field_value_and_range(cls, field, value, match):
    with pytest.raises(ConfigError, match=match) as info:
        cls(**{field: value})
    assert info.value.field == field and "\n" not in str(info.value)


@pytest.mark.parametrize("cls", [PBConfig, TrainConfig])
def test_dict_round_trip_is_json_safe(cls):
    cfg = cls()
    d = json.loads(json.dumps(cfg.to_dict()))
    assert cls.from_dict(d) == cfg


def test_replace_validates_and_refuses_unknown_names():
    cfg = PBConfig()
    assert cfg.replace(pool=8).pool == 8 and cfg.pool == 4
    with pytest.raises(ConfigError, match="pool=0"):
        cfg.replace(pool=0)
    with pytest.raises(ConfigError, match="no setting 'pools'"):
        cfg.replace(pools=2)
    with pytest.raises(ConfigError, match="no setting"):
        PBConfig.from_dict({"pools": 2})


def test_frozen():
    with pytest.raises(Exception):
        PBConfig().pool = 3


def test_dendrite_phase_kwargs_carry_every_candidate_setting():
    cfg = PBConfig(pool=3, pool_split=False, candidate_stride=2, candidate_init="normal")
    assert cfg.dendrite_phase_kwargs() == {"pool": 3, "init": "normal", "ema": 0.99, "warmup": None,
                                           "threshold": 0.01, "bias_correction": True, "split": False, "stride": 2}


def test_numpy_numbers_are_accepted_and_stored_as_python_numbers():
    import numpy as np

    cfg = PBConfig(pool=np.int64(3), candidate_lr=np.float32(0.5), maximize=np.bool_(False))
    assert type(cfg.pool) is int and cfg.pool == 3 and type(cfg.candidate_lr) is float
    assert cfg.maximize is False  # (numpy's bool was refused as "must be true or false")
    assert json.loads(json.dumps(cfg.to_dict()))["pool"] == 3
    with pytest.raises(ConfigError, match="pool=2.5: must be a whole number"):
        PBConfig(pool=2.5)


def test_whole_valued_floats_are_the_whole_numbers_they_name(tmp_path):
    """`patience: 10.0` in a file (or a JSON writer's 10.0) was refused as "must be a whole number"."""
    cfg = PBConfig(patience=10.0, pool=4e0, warmup=0.0)
    assert (cfg.patience, cfg.pool, cfg.warmup) == (10, 4, 0) and type(cfg.patience) is int
    path = tmp_path / "s.json"
    path.write_text('{"patience": 10.0, "epochs": 2e2}')
    pb, train = read_settings(str(path))
    assert PBConfig(**pb).patience == 10 and type(TrainConfig(**train).epochs) is int
    assert json.loads(json.dumps(PBConfig(patience=10.0).to_dict()))["patience"] == 10
    for value, match in [(2.5, "pool=2.5: must be a whole number"), (math.inf, "whole number"),
                         (math.nan, "whole number"), (1e30, "at most 9223372036854775807")]:
        with pytest.raises(ConfigError, match=match):
            PBConfig(pool=value)


def test_every_entry_point_takes_a_config_or_a_dict_and_refuses_the_rest():
    """PhaseController(pm, {...}) and fit(config={...}) failed with an AttributeError; perforate's
    settings raised a plain ValueError, not the ConfigError the API documents."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import pbp_fx

    assert PBConfig.coerce({"patience": 3}) == PBConfig(patience=3) and PBConfig.coerce(None) is None
    x = torch.randn(8, 3)
    with pytest.raises(ConfigError, match="activation 'gelu' is not supported"):
        pbp_fx.perforate(torch.nn.Linear(3, 2), (x,), activation="gelu")
    with pytest.raises(ConfigError, match="mode 'x'"):
        pbp_fx.perforate(torch.nn.Linear(3, 2), (x,), mode="x")
    with pytest.raises(ConfigError, match="frontend='xx'"):
        pbp_fx.perforate(torch.nn.Linear(3, 2), (x,), frontend="xx")
    pm = pbp_fx.perforate(torch.nn.Linear(3, 2), (x,))
    with pytest.raises(ConfigError, match="pool=0"):
        pm.start_dendrite_phase(pool=0)
    # (a misspelt keyword was a bare TypeError naming the internal CandidatePool.__init__: a reviewer)
    with pytest.raises(ConfigError, match=r"^start_dendrite_phase\(\): unknown setting 'pol': use pool, init, "
                                          r"init_scale, generator or the pool's ema, warmup, threshold, "
                                          r"bias_correction, split, stride$"):
        pm.start_dendrite_phase(pol=3)
    # (by hand it took what PBConfig refuses: a NaN init_scale gave correlations of 0 and a NaN install blamed
    # candidate_lr, split='no' was True; a string init_scale or a generator of 3 were torch's TypeErrors; a reviewer)
    for given, why in [({"init_scale": float("nan")}, "give a finite number > 0"), ({"init_scale": "1"}, "give a"),
                       ({"warmup": -5}, "must be at least 0"), ({"threshold": float("nan")}, "must be a finite number"),
                       ({"split": "no"}, "must be true or false"), ({"generator": 3}, "give a CPU torch.Generator"),
                       ({"init": "x"}, "must be one of 'kaiming'"), ({"ema": 1.0}, "must be greater than 0 and less than 1")]:
        (arg, value), = given.items()
        with pytest.raises(ConfigError, match=rf"^start_dendrite_phase\({arg}={re.escape(repr(value))}\): {why}"):
            pm.start_dendrite_phase(**given)
    assert pm.phase == "neuron" and all(s.candidates is None for s in pm.sites.values())
    from pbp_fx.site import POOL_SETTINGS, CandidatePool
    assert set(POOL_SETTINGS) <= set(inspect.signature(CandidatePool.__init__).parameters)
    pbp_fx.perforate(torch.nn.Linear(3, 2), (x,)).start_dendrite_phase(
        pool=2, **dict(zip(POOL_SETTINGS, (0.9, 3, 0.02, False, False, 2))))
    with pytest.raises(ConfigError, match="grow"):
        pm.grow(init="x")
    assert pbp_fx.PhaseController(pm, {"patience": 3}).config.patience == 3
    with pytest.raises(ConfigError, match="must be a PBConfig .*got int"):
        pbp_fx.PhaseController(pm, 3)
    with pytest.raises(ConfigError, match="has no setting 'patiense': did you mean 'patience'.$"):
        pbp_fx.PhaseController(pm, {"patiense": 3})
    loader = DataLoader(TensorDataset(x, torch.randint(0, 2, (8,))), batch_size=4)
    run = pbp_fx.fit(pm, loader, loader, config={"patience": 1, "max_dendrites": 1}, training={"epochs": 2})
    assert len(run.epochs) == 2
    with pytest.raises(ConfigError, match="fit's training must be a TrainConfig"):
        pbp_fx.fit(pm, loader, loader, training=[2])


def test_unknown_settings_mixed_keys_and_huge_numbers_are_config_errors():
    """PBConfig(bogus=1) raised the dataclass's TypeError; from_dict({1: 2, "x": 3}) a sort TypeError;
    candidate_lr=10**400 an OverflowError."""
    from pbp_fx import PBConfig, TrainConfig
    from pbp_fx.config import ConfigError

    for make, words in ((lambda: PBConfig(bogus=1), "PBConfig has no setting 'bogus': use one of"),
                        (lambda: TrainConfig(bogus=1), "TrainConfig has no setting 'bogus'"),
                        (lambda: PBConfig.from_dict({1: 2, "x": 3}), "PBConfig has no setting 1"),
                        (lambda: PBConfig(candidate_lr=10 ** 400), "candidate_lr=")):
        with pytest.raises(ConfigError, match=words):
            make()


def test_an_optional_setting_written_as_the_word_none_is_told_to_write_null():
    """A config file's `warmup: None` (a string) was refused with '... (or None)', which is what the
    user wrote: the message names the file form, null."""
    with pytest.raises(ConfigError, match=r"warmup='None': .* \(or None: none as a flag, null in a JSON or YAML "
                                          r"file\)"):
        PBConfig.from_dict({"warmup": "None"})


def test_bare_yaml_values_read_as_yaml_1_2_reads_them(tmp_path):
    """PyYAML's YAML 1.1 rules read `lr: 1:30.0` as 90.0 (sexagesimal), `1_000.0` as 1000.0 while
    `seed: 1_000` was refused, and `maximize: yes` as True: silently, where the README promises YAML 1.2."""
    pytest.importorskip("yaml")
    path = tmp_path / "s.yaml"
    path.write_text("lr: 1:30.0\ncandidate_lr: 1_000.0\nseed: 1_000\nmaximize: yes\nepochs: 0:30\n")
    assert read_settings(str(path)) == ({"candidate_lr": "1_000.0", "maximize": "yes"},
                                        {"lr": "1:30.0", "seed": "1_000", "epochs": "0:30"})
    with pytest.raises(ConfigError, match=r"^lr='1:30.0': must be "):
        TrainConfig(lr=read_settings(str(path))[1]["lr"])
    path.write_text("lr: .5\ncandidate_lr: 2.\nmaximize: True\nwarmup: ~\nseed: +3\nneuron_epochs: null\n"
                    "max_dendrites: 1E1\n")
    assert read_settings(str(path)) == ({"candidate_lr": 2.0, "maximize": True, "warmup": None, "neuron_epochs": None,
                                         "max_dendrites": 10.0}, {"lr": 0.5, "seed": 3})
    path.write_text("lr: .inf\ncandidate_lr: -.Inf\n")
    settings = read_settings(str(path))
    assert settings[1]["lr"] == math.inf and settings[0]["candidate_lr"] == -math.inf


def test_a_settings_file_may_merge_yaml_mappings_and_start_with_a_byte_order_mark(tmp_path):
    """YAML merge keys (`<<: *defaults`) were refused as 'not valid YAML'; a JSON file with a UTF-8
    byte-order mark as 'not valid JSON (... decode using utf-8-sig)'."""
    from pbp_fx.config import read_settings

    pytest.importorskip("yaml")
    (tmp_path / "m.yaml").write_text("<<: {epochs: 2, patience: 1}\npatience: 4\nlr: 1e-2\n")
    assert read_settings(str(tmp_path / "m.yaml")) == ({"patience": 4}, {"epochs": 2, "lr": 0.01})
    (tmp_path / "twice.yaml").write_text("<<: {epochs: 2}\npool: 2\npool: 3\n")
    with pytest.raises(ConfigError, match="setting 'pool' is given twice"):
        read_settings(str(tmp_path / "twice.yaml"))
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + b'{"pool": 2}')
    assert read_settings(str(tmp_path / "bom.json")) == ({"pool": 2}, {})


def test_yaml_whole_numbers_read_as_yaml_1_2_and_json_read_them(tmp_path):
    """YAML 1.1 rules read `epochs: 010` as 8 and `patience: 1:30` as 90 (sexagesimal), silently,
    while `0o10` stayed a string."""
    pytest.importorskip("yaml")
    path = tmp_path / "s.yaml"
    path.write_text("epochs: 010\nbatch_size: 0o20\npool: 0x4\nseed: -0\n")
    assert read_settings(str(path)) == ({"pool": 4}, {"epochs": 10, "batch_size": 16, "seed": 0})
    path.write_text("patience: 1:30\n")
    with pytest.raises(ConfigError, match=r"patience='1:30': must be a whole number"):
        PBConfig(**read_settings(str(path))[0])
    path.write_text("epochs: !!str 5\nseed: -0x10\n")  # (a tagged string; YAML 1.2 signs decimals only)
    assert read_settings(str(path)) == ({}, {"epochs": "5", "seed": "-0x10"})
    # A tagged string that YAML 1.1 also reads as a string (1e-3) was taken for a number.
    path.write_text("lr: !!str 1e-3\ncandidate_lr: !!float 1e-3\npool: !!int 4\n")
    assert read_settings(str(path)) == ({"candidate_lr": 1e-3, "pool": 4}, {"lr": "1e-3"})


def test_a_runs_summary_is_a_config_file_and_other_nesting_is_refused(tmp_path):
    """README says summary.json's "config" and "training" together are a --config file: given the file itself,
    it was refused as "'config' is no setting but a flag of the command: give --config" (a reviewer)."""
    pb, training = PBConfig(patience=7, pool=2), TrainConfig(epochs=40, lr=0.01)
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"model": "m.py", "epochs": 12, "seed": 0, "test": 0.5,
                                "config": pb.to_dict(), "training": training.to_dict()}))
    got_pb, got_training = read_settings(str(path))
    assert PBConfig(**got_pb) == pb and TrainConfig(**got_training) == training  # (epochs: the cap, not 12 run)
    path.write_text(json.dumps({"config": {"patience": 5}, "epochs": 20}))
    with pytest.raises(ConfigError, match=r"'config' holds a mapping: the settings go in one flat mapping"):
        read_settings(str(path))


def test_mode_gd_names_the_dendrite_phase_settings_it_does_not_read():
    assert PBConfig(mode="gd", pool=5, v_init=1.0, patience=3).unused_settings() == ["pool", "v_init"]
    assert PBConfig(mode="gd").unused_settings() == [] and PBConfig(pool=5).unused_settings() == []


def test_a_flag_of_the_command_in_a_config_file_is_named_as_a_flag(tmp_path):
    """`{"device": "cpu"}` in a --config file said "no setting 'device' ... (train --help lists them as flags)",
    while --help does list --device."""
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"patience": 3, "device": "cpu"}))
    with pytest.raises(ConfigError, match=r"'device' is no setting but a flag of the command: give --device on the "
                                          r"command line, and drop it from the file"):
        read_settings(str(path))
    path.write_text(json.dumps({"dist-timeout": 5}))
    with pytest.raises(ConfigError, match=r"give --dist-timeout on the command line"):
        read_settings(str(path))


def test_a_toml_file_is_told_toml_is_not_read(tmp_path):
    """A .toml config was refused as 'not valid JSON (Expecting value at line 1)' (a reviewer)."""
    path = tmp_path / "settings.toml"
    path.write_text("patience = 5\n")
    with pytest.raises(ConfigError, match=r"settings.toml: TOML is not read: write the settings as JSON, or as YAML"):
        read_settings(str(path))


def test_a_setting_beside_a_summarys_mappings_is_refused(tmp_path):
    """{"config": {...}, "training": {...}, "pool": 2, "seed": 9} ran with pool 4 and seed 0, silently, and so did a
    summary.json whose top-level seed was edited (a reviewer); a run's own summary still reads."""
    summary = {"model": "m.py", "mode": "pb", "seed": 0, "epochs": 3, "maximize": True, "val": 0.5,
               "config": PBConfig().to_dict(), "training": TrainConfig().to_dict(), "include": None, "exclude": None}
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    assert read_settings(str(path)) == (PBConfig().to_dict(), TrainConfig().to_dict())
    for extra, name in (({"pool": 2}, "pool"), ({"seed": 9}, "seed"), ({"maximize": False}, "maximize")):
        path.write_text(json.dumps({**summary, **extra}))
        with pytest.raises(ConfigError, match=f"'{name}' is .* in its '(config|training)' mapping but "):
            read_settings(str(path))
    config = {k: v for k, v in summary["config"].items() if k != "pool"}  # (a hand-written file of both shapes)
    path.write_text(json.dumps({**summary, "config": config, "pool": 2}))
    with pytest.raises(ConfigError, match="'pool' beside its \"config\" and \"training\" mappings is not read .*set "
                                          "'pool' inside them"):
        read_settings(str(path))
    # the documented edit, inside the mappings, beside the run's unchanged record: both copies named
    for mapping, name in (("training", "seed"), ("config", "maximize")):
        edited = {**summary, mapping: {**summary[mapping], name: not summary[name] if name == "maximize" else 3}}
        path.write_text(json.dumps(edited))
        with pytest.raises(ConfigError, match=f"'{name}' is (3|False) in its '{mapping}' mapping but (0|True) beside "
                                              f"it .*give both copies the value meant, or drop '{name}'"):
            read_settings(str(path))


def test_only_a_close_misspelling_gets_a_suggestion():
    from pbp_fx.config import near_name

    names = [f.name for f in dataclasses.fields(PBConfig)]
    assert near_name("patiance", names) == "patience" and near_name("candidate_lrr", names) == "candidate_lr"
    assert near_name("patient_zero", names) is None and near_name(3, names) is None


def test_the_activation_and_mode_names_are_the_ones_the_sites_and_the_onnx_bodies_implement():
    from pbp_fx.config import ACTIVATION_NAMES, MODES
    from pbp_fx.exporters.functions import _ACT_OPS
    from pbp_fx.site import ACTIVATIONS, MODES as SITE_MODES

    assert set(ACTIVATIONS) == set(_ACT_OPS) == set(ACTIVATION_NAMES)
    assert SITE_MODES is MODES
    assert PBConfig.activation in ACTIVATION_NAMES and PBConfig.mode in MODES


def test_the_defaults_the_readme_documents_are_the_configs():
    """The README's API table quotes PBConfig's defaults: a changed default must change it too."""
    from pathlib import Path

    readme = Path(__file__).resolve().parent.parent / "README.md"
    line = next(row for row in readme.read_text().splitlines() if row.startswith("| `pbp_fx.PBConfig("))
    documented = dict(re.findall(r"(\w+)=([\w.+-]+)", line.split("`")[1]))
    assert len(documented) >= 8
    config = PBConfig()
    for name, text in documented.items():
        assert getattr(config, name) == type(getattr(config, name))(float(text)), name

"""PBConfig and TrainConfig: every setting of a PB run, its default written once, validated once.

    cfg = PBConfig(patience=10, max_dendrites=2)       # ConfigError here if a value is bad
    cfg.replace(pool=8).to_dict()                       # JSON-safe; PBConfig.from_dict(d) reads it back

A field's metadata holds its help text and allowed values; the CLI builds its `train` flags
from it (`cli_fields`), so a new field is a new flag with no other edit.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import PBError

# The graph capture frontends (pbp_fx.tracing.trace) and what each does, for every flag and setting that picks one.
FRONTENDS = ("auto", "fx", "export", "parts")
ACTIVATION_NAMES = ("sigmoid", "tanh", "relu")  # a dendrite's activation (site.ACTIVATIONS, the ONNX bodies)
MODES = ("pb", "gd")
# start_dendrite_phase's keyword arguments -> the PBConfig settings they take.
DENDRITE_PHASE_ARGS = {"pool": "pool", "init": "candidate_init", "ema": "ema_decay", "warmup": "warmup",
                       "threshold": "snapshot_threshold", "bias_correction": "bias_correction", "split": "pool_split",
                       "stride": "candidate_stride"}
FRONTEND_HELP = ("auto (symbolic tracing, else torch.export, also where fx's graph misses Linear/Conv weights; where "
                 "neither captures the root's forward, parts), fx, export, or parts (the root's forward runs as "
                 "Python, its submodules that trace are captured in place)")

__all__ = ["PBConfig", "TrainConfig", "ConfigError", "setting", "cli_fields"]


class ConfigError(PBError, ValueError):
    """A setting has a value outside its allowed range (named with the value and the range).

    `field`, `value` and `reason` (the text after "name=value: ") let a front end such as the
    CLI name the setting its own way (`--pool 0: must be at least 1 ...`).
    """

    def __init__(self, message: str, field: Optional[str] = None, value: Any = None, reason: str = ""):
        super().__init__(message)
        self.field, self.value, self.reason = field, value, reason


MAX_INT = 2**63 - 1  # the largest whole-number setting (int64), a seed included


def setting(default: Any, help: str, *, choices: tuple = (), low: Optional[float] = None,
            high: Optional[float] = None, open_low: bool = False, open_high: bool = False,
            optional: bool = False):
    """A dataclass field with its help text and allowed values (checked by `_check`)."""
    return field(default=default, metadata={
        "help": help, "choices": tuple(choices), "low": low, "high": high,
        "open_low": open_low, "open_high": open_high, "optional": optional})


def _range_text(meta: dict) -> str:
    if meta["choices"]:
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    low, high = meta["low"], meta["high"]
    parts = []
    def number(v) -> str:
        return str(v) if isinstance(v, int) else f"{v:g}"

    if low is not None:
        parts.append(f"{'greater than' if meta['open_low'] else 'at least'} {number(low)}")
    if high is not None:
        parts.append(f"{'less than' if meta['open_high'] else 'at most'} {number(high)}")
    text = " and ".join(parts)
    return text + (" (or None: none as a flag, null in a JSON or YAML file)" if meta["optional"] else "")


def _finite(value: numbers.Real) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float's range (10**400)
        return False


def _check(obj) -> None:
    """Raise ConfigError for the first field of `obj` whose value is of the wrong type or out of range."""
    hints = {f.name: f.type for f in dataclasses.fields(obj)}
    for f in dataclasses.fields(obj):
        meta, value, name = f.metadata, getattr(obj, f.name), f.name
        if value is None and meta.get("optional"):
            continue
        kind = hints[name].replace("Optional[", "").rstrip("]")
        bad = None
        if kind == "bool":
            if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):  # numpy's bool
                value = bool(value)
                object.__setattr__(obj, name, value)
            if not isinstance(value, bool):
                bad = "true or false"
        elif kind == "int":
            if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)) \
                    and _finite(value) and float(value).is_integer():
                value = int(value)  # a whole-valued float (`patience: 10.0` in a file): the number it names
                object.__setattr__(obj, name, value)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                bad = "a whole number"
            elif type(value) is not int:  # numpy's integers: stored as Python ints (to_dict writes JSON)
                value = int(value)
                object.__setattr__(obj, name, value)
        elif kind == "float":
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not _finite(value):
                bad = "a finite number"
            elif type(value) not in (int, float):
                value = float(value)
                object.__setattr__(obj, name, value)
        elif kind == "str" and not isinstance(value, str):
            bad = "a string"
        if bad is None and meta.get("choices") and value not in meta["choices"]:
            bad = ""
        if bad is None and kind in ("int", "float"):
            low, high = meta.get("low"), meta.get("high")
            if low is not None and (value <= low if meta["open_low"] else value < low):
                bad = ""
            if high is not None and (value >= high if meta["open_high"] else value > high):
                bad = ""
        if bad is None and kind == "int" and not -MAX_INT <= value <= MAX_INT:
            # (counts end up in tensors and torch's int64: a warm-up of 1e23 failed in the first dendrite phase)
            bad, meta = "", {**meta, "high": MAX_INT if meta.get("high") is None else meta["high"]}
            meta["low"] = -MAX_INT if meta.get("low") is None else meta["low"]
        if bad is not None:
            allowed = _range_text(meta)
            what = ", ".join(x for x in (bad, allowed) if x)
            reason = f"must be {what} ({meta.get('help', '')})"
            shown = _shown(value)
            raise ConfigError(f"{name}={shown}: {reason}", name, value, reason)


def _shown(value) -> str:
    """A setting's value as an error shows it: its repr, cut short past 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


class _Settings:
    """to_dict / from_dict / replace shared by the config dataclasses."""

    def __new__(cls, *args, **kwargs):
        cls._refuse_unknown(kwargs)  # (before the dataclass __init__, whose TypeError names no valid setting)
        return super().__new__(cls)

    @classmethod
    def _refuse_unknown(cls, names_given) -> None:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(names_given) - names, key=str)  # (keys of mixed types: 1 and "x")
        if unknown:
            near = near_name(unknown[0], names)
            raise ConfigError(f"{cls.__name__} has no setting {unknown[0]!r}: "
                              + (f"did you mean {near!r}?" if near else f"use one of {', '.join(sorted(names))}"))

    def __post_init__(self) -> None:
        _check(self)

    def to_dict(self) -> dict:
        """Plain JSON-safe values, by field name."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """The config of a dict written by to_dict(); unknown names are refused."""
        if not isinstance(d, dict):
            raise ConfigError(f"{cls.__name__}.from_dict needs a dict, got {type(d).__name__}")
        cls._refuse_unknown(d)
        return cls(**d)

    @classmethod
    def coerce(cls, value, where: str = "config"):
        """`value` as this config: None and an instance as they are, a dict through from_dict;
        anything else is refused in one line."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls.from_dict(value)
        raise ConfigError(f"{where} must be a {cls.__name__} (or a dict of its settings), got {type(value).__name__}")

    def replace(self, **changes):
        """A copy with `changes` applied (validated like a new config)."""
        self._refuse_unknown(changes)
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class PBConfig(_Settings):
    """Every Perforated Backpropagation setting (docs/algorithm.md); defaults live here only."""

    mode: str = setting("pb", "pb: correlation-trained dendrites; gd: random dendrites trained by backprop",
                        choices=MODES)
    activation: str = setting("sigmoid", "dendrite activation", choices=ACTIVATION_NAMES)
    max_dendrites: int = setting(3, "dendrites per site at most", low=1)
    patience: int = setting(30, "neuron-phase epochs without validation gain before the next round", low=1)
    improvement: float = setting(1e-3, "smallest validation gain that counts (absolute, score units)", low=0)
    neuron_epochs: Optional[int] = setting(None, "cap on one neuron phase, in epochs (None: no cap)",
                                           low=1, optional=True)
    dendrite_patience: int = setting(3, "dendrite-phase epochs without correlation gain before install", low=1)
    max_dendrite_epochs: int = setting(60, "cap on one dendrite phase, in epochs", low=1)
    dendrite_improvement: float = setting(0.01, "relative rise of a site's best candidate's mean "
                                          "|correlation| (beyond its standard error) that counts as progress", low=0)
    retries: int = setting(2, "fresh rounds after a round that gave no new best", low=0)
    maximize: bool = setting(True, "a higher validation score is better (false: lower, e.g. a loss that a "
                             "model file's own metric returns)")
    pool: int = setting(4, "candidate dendrites per site", low=1)
    pool_split: bool = setting(True, "each candidate trains on its own 1/pool of every batch (pool costs one "
                               "layer's work); false: every candidate sees the whole batch")
    candidate_stride: int = setting(1, "candidates see every n-th position of each spatial or token dim of a "
                                    "site (a d-D conv pool costs ~1/n^d); 1: every position", low=1)
    candidate_init: str = setting("kaiming", "initialisation of the candidates",
                                  choices=("kaiming", "default", "normal"))
    candidate_lr: float = setting(0.02, "learning rate in the dendrite phase", low=0, open_low=True)
    v_init: float = setting(0.0, "an installed dendrite's output weight V starts at -v_init * sign(C~) per channel "
                            "(> 0: in the direction that C~ says lowers the loss; 0: the output is unchanged)")
    ema_decay: float = setting(0.99, "decay of the per-batch covariance moving average", low=0, high=1,
                               open_low=True, open_high=True)
    bias_correction: bool = setting(True, "covariance moving average as the exact decay-weighted mean of the "
                                    "batches so far (else it starts from 0)")
    warmup: Optional[int] = setting(None, "batches before the best correlation and snapshots are tracked "
                                    "(None: round(1 / (1 - ema_decay)), the EMA's averaging length)",
                                    low=0, optional=True)
    snapshot_threshold: float = setting(0.01, "relative gain of |C~| that takes a new weight snapshot", low=0)

    def dendrite_phase_kwargs(self) -> dict:
        """The keyword arguments of PerforatedModel.start_dendrite_phase for these settings."""
        return {arg: getattr(self, name) for arg, name in DENDRITE_PHASE_ARGS.items()}

    @classmethod
    def check_dendrite_phase_kwargs(cls, where: str, **kwargs) -> None:
        """Refuse what these settings' checks refuse among start_dendrite_phase's keyword arguments, named as
        passed there (ConfigError `where(arg=value): why`)."""
        try:
            cls(**{DENDRITE_PHASE_ARGS[arg]: value for arg, value in kwargs.items()})
        except ConfigError as exc:
            arg = next(a for a, name in DENDRITE_PHASE_ARGS.items() if name == exc.field)
            raise ConfigError(f"{where}({arg}={_shown(exc.value)}): {exc.reason}", arg, exc.value, exc.reason) from None

    # What mode "gd" never reads: it grows random dendrites, V at 0, and runs no dendrite phase.
    DENDRITE_PHASE_ONLY = ("dendrite_patience", "max_dendrite_epochs", "dendrite_improvement", "pool", "pool_split",
                           "candidate_stride", "candidate_init", "candidate_lr", "v_init", "ema_decay",
                           "bias_correction", "warmup", "snapshot_threshold")

    def unused_settings(self) -> list[str]:
        """The settings given other than their defaults that this config's mode does not read."""
        if self.mode != "gd":
            return []
        default = PBConfig()
        return [n for n in self.DENDRITE_PHASE_ONLY if getattr(self, n) != getattr(default, n)]


@dataclass(frozen=True)
class TrainConfig(_Settings):
    """How a job trains (not PB settings): epochs, learning rate, batch, seed, capture frontend."""

    epochs: int = setting(800, "epoch cap over all phases", low=1)
    lr: float = setting(1e-3, "neuron-phase Adam learning rate", low=0, open_low=True)
    batch_size: int = setting(100, "training batch size (with train --nproc: the global batch)", low=1, high=2**31 - 1)
    seed: int = setting(0, "seed of torch, numpy and Python's random (model init, data split, shuffling, augmentation)", low=0, high=MAX_INT)
    frontend: str = setting("auto", f"graph capture: {FRONTEND_HELP}", choices=FRONTENDS)


# `pbp-fx train` / `compare` flags that are no PBConfig/TrainConfig setting.
_RUN_FLAGS = ("device", "nproc", "dist_timeout", "out", "include", "exclude", "resume", "no_progress", "jobs", "seeds",
              "width", "arms", "pb_run", "no_latency", "config", "debug")


def read_settings(path: str) -> tuple[dict, dict]:
    """(PBConfig settings, TrainConfig settings) of a JSON or YAML (.yaml/.yml) file holding one
    flat mapping of setting names to values, such as {**pb.to_dict(), **training.to_dict()}
    (dashes allowed for underscores, as the flags spell them), or a run's summary.json, whose
    "config" and "training" mappings are those. An unknown name, an unreadable file or another
    shape is refused in one line naming the file."""
    import json

    where = f"--config {path}"
    try:
        with open(path, encoding="utf-8-sig") as f:  # (a byte-order mark, as some Windows editors write, is dropped)
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read it ({exc.strerror if isinstance(exc, OSError) else exc.reason})"
                          ) from None
    def unique(pairs):
        if not all(isinstance(k, str) for k, _ in pairs):  # (a YAML list or mapping as a key is unhashable)
            raise ConfigError(f"{where}: it must hold one mapping of setting names to values, e.g. "
                              '{"patience": 10, "epochs": 300}')
        keys = [k.replace("-", "_") for k, _ in pairs]
        twice = sorted({k for k in keys if keys.count(k) > 1}, key=str)
        if twice:
            raise ConfigError(f"{where}: setting {twice[0]!r} is given twice: keep one")
        return dict(pairs)

    try:
        if path.lower().endswith((".yaml", ".yml")):
            data = _read_yaml(text, where, unique)
        else:
            try:
                data = json.loads(text, object_pairs_hook=unique)
            except json.JSONDecodeError as exc:
                if path.lower().endswith(".toml"):  # (read as JSON, it said only "not valid JSON")
                    raise ConfigError(f"{where}: TOML is not read: write the settings as JSON, or as YAML in a "
                                      ".yaml/.yml file") from None
                raise ConfigError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno}); a .yaml/.yml file is "
                                  "read as YAML") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply: it must hold one flat mapping of settings") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ConfigError(f"{where}: it must hold one mapping of setting names to values, e.g. "
                          '{"patience": 10, "epochs": 300}')
    if isinstance(data.get("config"), dict) and isinstance(data.get("training"), dict):
        data = _settings_of_a_run(data, where)
    nested = next((k for k, v in data.items() if isinstance(v, dict)), None)
    if nested is not None:
        raise ConfigError(f"{where}: {nested!r} holds a mapping: the settings go in one flat mapping of names to "
                          'values, e.g. {"patience": 10, "epochs": 300} (a run\'s summary.json is read too: its '
                          '"config" and "training" together)')
    data = {k.replace("-", "_"): v for k, v in data.items()}
    pb_names = {f.name for f in cli_fields(PBConfig)}
    train_names = {f.name for f in cli_fields(TrainConfig)}
    unknown = sorted(set(data) - pb_names - train_names)
    flags_only = [k for k in unknown if k in _RUN_FLAGS]
    if flags_only:  # (where and how a run goes, not what it trains: a flag of the command alone)
        raise ConfigError(f"{where}: {flags_only[0]!r} is no setting but a flag of the command: give "
                          f"--{flags_only[0].replace('_', '-')} on the command line, and drop it from the file")
    if unknown:
        near = near_name(unknown[0], pb_names | train_names)
        raise ConfigError(f"{where}: no setting {unknown[0]!r}: " + (f"did you mean {near!r}?" if near else
                          "use PBConfig's or TrainConfig's field names (pbp-fx train --help lists them as flags)"))
    return ({k: v for k, v in data.items() if k in pb_names}, {k: v for k, v in data.items() if k in train_names})


def near_name(name, names) -> Optional[str]:
    """The one of `names` that `name` most likely misspells (difflib's closest above 0.75), or None."""
    if not isinstance(name, str):
        return None
    close = difflib.get_close_matches(name, sorted(names), n=1, cutoff=0.75)
    return close[0] if close else None


def _settings_of_a_run(data: dict, where: str) -> dict:
    """The settings of a run's summary.json (compare.json): its "config" and "training" mappings. Its
    results sit beside them, some under setting names ("seed", "mode", "maximize": copies of the
    settings; "epochs": the epochs it ran); a setting name there whose value the mappings do not hold
    (an edited summary, a hand-written file with both shapes) would do nothing: refused."""
    settings = {**data["config"], **data["training"]}
    names = {f.name for cls in (PBConfig, TrainConfig) for f in cli_fields(cls)} - {"epochs"}
    missing = object()
    for key, value in data.items():
        name = key.replace("-", "_")
        inside = settings.get(name, missing)
        if name in names and inside is not missing and inside != value:  # (an edit of one copy: which one is meant?)
            mapping = "config" if name in data["config"] else "training"
            raise ConfigError(f"{where}: {name!r} is {inside!r} in its {mapping!r} mapping but {value!r} beside it "
                              f"(the run's record of it): give both copies the value meant, or drop {key!r} "
                              "beside the mappings")
        if name in names and inside is missing:
            raise ConfigError(f"{where}: {key!r} beside its \"config\" and \"training\" mappings is not read (in a "
                              f"run's summary the settings are inside them): set {name!r} inside them, or write one "
                              "flat mapping of settings")
    return settings


def _read_yaml(text: str, where: str, unique) -> Any:
    """YAML through PyYAML's safe loader; a key given twice is refused (`unique`), and a value
    written bare reads as YAML 1.2 (and JSON) read it (`_yaml_1_2_scalar`), where PyYAML follows
    YAML 1.1; a quoted or tagged value is what it says."""
    try:
        import yaml
    except ImportError:
        raise ConfigError(f"{where}: reading YAML needs PyYAML (pip install pyyaml), or write the file as JSON") from None

    tagged = set()  # ids of the scalar nodes written with a tag (`!!str 1e-3` is the string it says)

    class Loader(yaml.SafeLoader):
        def compose_scalar_node(self, anchor):
            explicit = self.peek_event().tag not in (None, "!")
            node = super().compose_scalar_node(anchor)
            if explicit:
                tagged.add(id(node))
            return node

    def mapping(loader, node):
        def value(v):
            if isinstance(v, yaml.ScalarNode) and v.style is None and id(v) not in tagged:  # written bare
                return _yaml_1_2_scalar(v.value)
            return loader.construct_object(v, deep=True)
        own = [(k, v) for k, v in node.value if k.tag != "tag:yaml.org,2002:merge"]
        unique([(loader.construct_object(k, deep=True), v) for k, v in own])  # (its own keys once each)
        loader.flatten_mapping(node)  # merge keys (`<<: *defaults`): the merged values first, its own win
        pairs = [(loader.construct_object(k, deep=True), v) for k, v in node.value]
        if not all(isinstance(k, str) for k, _ in pairs):
            unique(pairs)  # (refuses them: one mapping of setting names to values)
        return {k: value(v) for k, v in pairs}

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        data = yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({' '.join(str(exc).split())})") from None
    return data


def _yaml_1_2_scalar(text: str) -> Any:
    """A bare YAML value as YAML 1.2's core schema (and JSON) reads it: YAML 1.1 (PyYAML) read
    `1e-3` as a string, `010` as 8, `1:30.0` as 90.0, `1_000.0` as 1000.0 and `yes`/`off` as
    booleans; here the first two are numbers and the rest strings (which the settings refuse)."""
    if re.fullmatch(r"null|Null|NULL|~|", text):
        return None
    if re.fullmatch(r"true|True|TRUE|false|False|FALSE", text):
        return text[0] in "tT"
    whole = _yaml_whole_number(text)
    if whole is not None:
        return whole
    if re.fullmatch(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?", text):
        return float(text)
    if re.fullmatch(r"[-+]?\.(inf|Inf|INF)", text):
        return -math.inf if text[0] == "-" else math.inf
    if re.fullmatch(r"\.(nan|NaN|NAN)", text):
        return math.nan
    return text


def _yaml_whole_number(text: str) -> Optional[int]:
    """A whole number as YAML 1.2 (and JSON) reads it: decimal (010 is 10, where YAML 1.1 read 8),
    0o octal, 0x hexadecimal; None for anything else."""
    match = re.fullmatch(r"(?:()(0o[0-7]+)|()(0x[0-9a-fA-F]+)|([-+]?)([0-9]+))", text)
    if match is None:
        return None
    _, octal, _, hexadecimal, sign, decimal = match.groups()  # (a sign on decimals only, as YAML 1.2)
    number = int(octal[2:], 8) if octal else int(hexadecimal[2:], 16) if hexadecimal else int(decimal)
    return -number if sign == "-" else number


def cli_fields(cls) -> list[dataclasses.Field]:
    """The fields of a config class, in order, for generating command-line flags."""
    return list(dataclasses.fields(cls))

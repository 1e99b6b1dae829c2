"""The one config system of relax: typed dataclasses filled from YAML presets and overrides.

Every command reads its settings the same way. A stage's section is a dataclass, the
source of truth (``relax.train.config`` for sample / sft / filter / grpo,
``relax.eval.strategies.EvalConfig``, ``relax.serve.config.ServeConfig``,
``relax.demo.config.DemoConfig``); a preset in ``configs/`` may only set fields that
exist there, and an override ``optim.learning_rate=1e-6`` is parsed as YAML and checked
against the field's type. Nested sections may be frozen dataclasses: a ``relay:``
section *is* a ``relax.RelayConfig`` with nested ``slm:`` / ``llm:`` ``SamplingConfig``,
checked by its own ``__post_init__`` (a bad value is a one-line ``ConfigError`` naming
the key).

Layers, later ones winning: the dataclass's defaults, the preset (one section of it),
``settings`` (what command-line flags set), the ``key=value`` overrides. The eos and pad
ids of every ``RelayConfig`` a config holds are the tokenizer's unless a layer sets
them (``special_ids``): filled here, for every stage, in one place.

Presets are found by name (``preset_dir``) or as a YAML path. This module imports no
model code and no jax, so a command can still set XLA flags after reading its config.
"""

import copy
import dataclasses
import importlib.resources
import os
import types
import typing
from typing import Any

import yaml

from relax.errors import ConfigError
from relax.relay.config import RelayConfig


def check(cfg, field, ok, rule, hint=None):
    """A ConfigError "FIELD must be RULE, got VALUE" unless ``ok`` (for a section's
    ``__post_init__``). ``from_dict`` puts the section in front (``run.dtype must be
    ...``), so the message names the key to fix."""
    if not ok:
        raise ConfigError(f"{field} must be {rule}, got {getattr(cfg, field)!r}", hint)


def check_choice(cfg, field, choices):
    value = getattr(cfg, field)
    check(cfg, field, value in choices, " or ".join(choices))


def _type_name(tp):
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, where):
    """``value`` as type ``tp`` (the field's annotation), or a ConfigError naming ``where``."""
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # X | None: None or an X
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) == 1:
            return _coerce(value, others[0], where)
        return value
    if tp is tuple or typing.get_origin(tp) is tuple:
        item = args[0] if args else Any
        if isinstance(value, str):  # a flag or override: "5,6" or "(5, 6)"
            value = [yaml.safe_load(v) for v in value.strip("()[] ").split(",") if v.strip()]
        elif isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool and isinstance(value, bool):
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # PyYAML reads "1e-6" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, (str, int, float)) or (tp is str and value is None):
        return "" if value is None else str(value)
    if tp is dict and isinstance(value, dict):
        return dict(value)
    raise ConfigError(
        f"{where}: expected {_type_name(tp)}, got {value!r}", f"set {where}=<{_type_name(tp)}>"
    )


def from_dict(cls, data, where="", base=None):
    """Build dataclass ``cls`` from a nested dict over its defaults (or ``base``).

    Nested dataclass fields (frozen ones too, e.g. ``relay: RelayConfig`` with
    its ``slm:`` / ``llm:`` ``SamplingConfig``) are built from nested mappings
    over their current value; tuple and ``X | None`` fields are coerced. Unknown
    keys, wrong types and values the dataclass itself rejects (its
    ``__post_init__`` checks) are one-line ConfigErrors naming the dotted key.
    ``where`` is the dotted prefix of ``data`` in the preset (e.g. "grpo.").
    """
    base = copy.deepcopy(cls() if base is None else base)
    if data is None:
        return base
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where.rstrip('.') or cls.__name__}: expected a mapping, got {data!r}",
            f"set its fields with dotted keys, e.g. {where}FIELD=VALUE",
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - fields
    if unknown:
        raise ConfigError(
            f"unknown keys {sorted(where + str(k) for k in unknown)}",
            f"known keys{' of ' + where.rstrip('.') if where else ''}: {', '.join(sorted(fields))}",
        )
    values = {}
    for name, value in data.items():
        current = getattr(base, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{where}{name}: expected a mapping, got {value!r}",
                    f"set its fields with dotted keys, e.g. {where}{name}.FIELD=VALUE",
                )
            values[name] = from_dict(type(current), value, f"{where}{name}.", current)
        else:
            values[name] = _coerce(value, hints[name], f"{where}{name}")
    try:
        return dataclasses.replace(base, **values)
    except ConfigError as e:  # a check of this section: its message starts with the field
        raise ConfigError(f"{where}{e.message}", e.hint) from None
    except (TypeError, ValueError) as e:  # the dataclass's own checks (ranges, choices)
        raise ConfigError(f"{where.rstrip('.') or cls.__name__}: {e}") from None


def _set_path(tree, dotted, value):
    keys = dotted.split(".")
    for k in keys[:-1]:
        sub = tree.get(k)
        if not isinstance(sub, dict):
            sub = tree[k] = {}
        tree = sub
    tree[keys[-1]] = value


def _set_default(tree, dotted, value):
    """Set ``dotted`` in ``tree`` unless it (or a non-mapping above it) is already set."""
    *heads, last = dotted.split(".")
    for k in heads:
        if k not in tree or tree[k] is None:
            tree[k] = {}
        if not isinstance(tree[k], dict):
            return  # a wrong value there: from_dict reports it
        tree = tree[k]
    tree.setdefault(last, value)


def with_defaults(data, defaults):
    """A copy of the nested dict ``data`` with each dotted key of ``defaults`` set where unset."""
    data = copy.deepcopy(data or {})
    for key, value in defaults.items():
        _set_default(data, key, value)
    return data


def merge(preset=None, section=None, overrides=(), settings=None):
    """The settings of a preset (its ``section``; None: the whole file), ``settings`` and
    ``overrides``, merged into one nested dict (``build`` turns it into a config).

    ``settings``: dotted key -> value, None skipped (what command-line flags set).
    ``overrides``: ``key=value`` strings, values parsed as YAML (``steps=10`` is an int,
    ``relay.llm.temperature=0.5`` a float). Dotted keys reach nested sections."""
    data = {}
    if preset:
        doc = read_yaml(preset)
        if section is not None:
            if section not in doc:
                raise ConfigError(
                    f"{preset}: no '{section}:' section", f"it has {', '.join(sorted(doc))}"
                )
            doc = doc[section] or {}
        data = copy.deepcopy(doc)
    for key, value in (settings or {}).items():
        if value is not None:
            _set_path(data, key, value)
    return apply_overrides(data, overrides)


def build(cls, data, special_ids=None):
    """A ``cls`` config from ``merge``'s dict; with ``special_ids`` (``(eos_ids, pad_id)``,
    ``relax.tokenizer.special_ids`` of the run's tokenizer), every ``RelayConfig`` section
    of ``cls`` that leaves eos_ids or pad_id unset takes them."""
    if special_ids is not None:
        eos, pad = special_ids
        defaults = {}
        for r in relay_sections(cls):
            defaults[f"{r}.eos_ids"], defaults[f"{r}.pad_id"] = list(eos), pad
        data = with_defaults(data, defaults)
    return from_dict(cls, data)


def load_config(cls, preset=None, section=None, overrides=(), settings=None, special_ids=None):
    """A ``cls`` config from a YAML preset (its ``section``), ``settings``, then ``key=value``
    overrides (``merge``), eos and pad ids from ``special_ids`` where unset (``build``)."""
    return build(cls, merge(preset, section, overrides, settings), special_ids)


def relay_sections(cls):
    """The dotted names of the ``RelayConfig`` sections of dataclass ``cls`` (nested ones
    too: ``["grpo.relay", "eval.relay", ...]``), found in its default instance."""

    def walk(cfg, prefix):
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if isinstance(value, RelayConfig):
                yield prefix + f.name
            elif dataclasses.is_dataclass(value):
                yield from walk(value, f"{prefix}{f.name}.")

    return list(walk(cls(), ""))


def apply_overrides(data, overrides):
    """Set each ``key=value`` of ``overrides`` (dotted key, value parsed as YAML) in ``data``."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value", "write KEY=VALUE")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        _set_path(data, key.strip(), value)
    return data


def read_yaml(path):
    """A YAML mapping from ``path``; a missing file or a non-mapping is a ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError(f"no config file {path}", "pass a YAML path or a preset name")
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML", " ".join(str(e).split())) from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(doc).__name__}")
    return doc


def preset_dir():
    """The folder of the named presets (``relax sft --config train-tiny``, ``relax demo``).

    The presets live in the repository's top-level ``configs/``. An installed wheel ships
    them inside the package, as ``relax/configs/`` (``setup.py`` maps that folder there);
    a source checkout (an editable install, or ``PYTHONPATH``) reads ``configs/`` beside
    the package. The working directory never matters: a path to a YAML file is the way to
    pass a preset of one's own.
    """
    installed = importlib.resources.files("relax") / "configs"
    if installed.is_dir():
        return str(installed)
    return os.path.join(os.path.dirname(str(importlib.resources.files("relax"))), "configs")


CONFIG_DIR = preset_dir()


def preset_names(config_dir=CONFIG_DIR):
    """The named presets (file names without ``.yaml``), sorted."""
    if not os.path.isdir(config_dir):
        return []
    return sorted(f[: -len(".yaml")] for f in os.listdir(config_dir) if f.endswith(".yaml"))


def resolve_preset(spec, config_dir=CONFIG_DIR, flag="--config"):
    """A preset path: ``spec`` itself if it is a file, else ``config_dir/spec.yaml``; a
    ConfigError naming ``flag`` and listing the presets otherwise."""
    if os.path.isfile(spec):
        return spec
    named = os.path.join(config_dir, spec if spec.endswith(".yaml") else spec + ".yaml")
    if os.path.isfile(named):
        return named
    names = preset_names(config_dir)
    raise ConfigError(
        f"{flag} {spec}: no such file, and no preset {spec!r}",
        f"presets: {', '.join(names)}" if names else f"no presets found in {config_dir}",
    )


def to_dict(cfg):
    """The config as a plain nested dict (for logging next to the metrics)."""
    return dataclasses.asdict(cfg)

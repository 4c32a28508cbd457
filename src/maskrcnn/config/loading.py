"""Loading and checking configs: dicts and YAML files into the schema, ``key=value`` overrides,
the range checks of each value and the checks that involve several keys."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
import warnings
from pathlib import Path
from typing import Any

import yaml

from maskrcnn.config.presets import PRESETS
from maskrcnn.config.schema import Config, ConfigError, _to_plain


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return _from_dict(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for alt in typing.get_args(tp):
            if alt is type(None) and value is None:
                return None
            try:
                return _coerce(value, alt, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if errors else f"config key '{key}': bad value {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"config key '{key}' must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, (str, float)) and not isinstance(value, bool):  # 1e3 (YAML: a string), 1000.0
            try:
                as_float = float(value)
            except ValueError:
                as_float = float("nan")
            if as_float.is_integer():
                value = int(as_float)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            hint = " (an empty string is written '')" if value is None else \
                " (YAML reads on/off/yes/no as true/false)" if isinstance(value, bool) else ""
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}{hint}")
        return value
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _numbers(value: Any) -> list:
    """The numbers of a value: itself, or those of a (nested) list."""
    return [v for item in value for v in _numbers(item)] if isinstance(value, tuple) else [value]


def _check_choice(f: dataclasses.Field, value: Any, key: str) -> None:
    """The allowed values or range a field declares (``_choice``, ``_at_least``, ``_above``, ``_between``);
    a range applies to every number of a list (anchor sizes, per-stage IoUs ...)."""
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"config key '{key}' must be one of {list(choices)}, got {value!r}")
    m = f.metadata
    # `not x >= low` rather than `x < low`: NaN fails every comparison and so every bound
    for v in _numbers(value):
        name, got = (f"'{key}' values", f"got {v!r} in {_to_plain(value)!r}") if isinstance(value, tuple) \
            else (f"'{key}'", f"got {v!r}")
        if "max" in m and not m["min"] <= v <= m["max"]:
            low = "" if m["min"] == float("-inf") else f"at least {m['min']} and "
            raise ConfigError(f"config key {name} must be {low}at most {m['max']}, {got}")
        if "below" in m and not m["min"] <= v < m["below"]:
            raise ConfigError(f"config key {name} must be at least {m['min']} and below {m['below']}, {got}")
        if "min" in m and not v >= m["min"]:
            raise ConfigError(f"config key {name} must be at least {m['min']}, {got}")
        if "above" in m and not v > m["above"]:
            raise ConfigError(f"config key {name} must be greater than {m['above']}, {got}")


def check_config(cfg: Config) -> Config:
    """The checks that involve several keys (each key's own range is checked when it is set): run on
    a finished config, since overrides arrive one at a time and may pass through inconsistent states."""
    s, i, m, d = cfg.solver, cfg.model.input, cfg.model, cfg.data
    if any(b <= a for a, b in zip(s.steps, s.steps[1:])):
        raise ConfigError(f"config key 'solver.steps' must be increasing, got {list(s.steps)}")
    if s.schedule == "step" and s.steps and s.steps[-1] > s.max_iter:
        # legitimate (a short run of a long recipe, as detectron2 allows), but rarely meant: say so
        warnings.warn(f"config key 'solver.steps' {list(s.steps)} goes beyond solver.max_iter={s.max_iter}: the "
                      f"learning rate will not decay at those steps (scale them with max_iter, or set "
                      f"solver.schedule=cosine)", stacklevel=2)
    for phase in ("train", "test"):
        low = max(_numbers(getattr(i, f"min_size_{phase}")))
        if getattr(i, f"max_size_{phase}") < low:
            raise ConfigError(f"config key 'model.input.max_size_{phase}' ({getattr(i, f'max_size_{phase}')}) must "
                              f"be at least model.input.min_size_{phase} ({low})")
    for head in ("rpn", "roi_heads"):
        h = getattr(m, head)
        if h.bg_iou_thresh > h.fg_iou_thresh:
            raise ConfigError(f"config key 'model.{head}.bg_iou_thresh' ({h.bg_iou_thresh}) must not exceed "
                              f"model.{head}.fg_iou_thresh ({h.fg_iou_thresh})")
    if s.ims_per_batch % s.accumulate_steps:
        raise ConfigError(f"config key 'solver.ims_per_batch' ({s.ims_per_batch}) must be divisible by "
                          f"solver.accumulate_steps ({s.accumulate_steps}): each pass takes an equal share")
    t = cfg.train
    needs = {"segm/AP": ("model.mask_on", m.mask_on), "keypoints/AP": ("model.keypoint_on", m.keypoint_on),
             "val_loss": ("train.val_loss", t.val_loss)}
    if t.best_metric in needs and not needs[t.best_metric][1]:
        raise ConfigError(f"config key 'train.best_metric' is {t.best_metric} but {needs[t.best_metric][0]} is false")
    if t.early_stop_patience and t.best_metric == "none":
        raise ConfigError("config key 'train.early_stop_patience' needs a train.best_metric to watch (it is none)")
    if t.early_stop_patience and not t.eval_period:
        raise ConfigError("config key 'train.early_stop_patience' needs train.eval_period > 0: without periodic "
                          "evaluations there is nothing to stop on")
    if d.shapes_max_radius < d.shapes_min_radius:
        raise ConfigError(f"config key 'data.shapes_max_radius' ({d.shapes_max_radius}) must be at least "
                          f"data.shapes_min_radius ({d.shapes_min_radius})")
    return cfg


def _from_dict(cls: type, data: dict, prefix: str = "", base: Any = None) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    obj = base if base is not None else cls()
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{key}'{hint}; valid keys here: {sorted(fields)}")
        tp = hints[k]
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            value = _from_dict(tp, v, key, base=getattr(obj, k))
        else:
            value = _coerce(v, tp, key)
        _check_choice(fields[k], value, key)
        setattr(obj, k, value)
    return obj


def merge(cfg: Config, data: dict) -> Config:
    """A copy of ``cfg`` with the (nested) values of ``data`` applied, each checked."""
    import copy

    return _from_dict(Config, data, "", base=copy.deepcopy(cfg))


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``["model.roi_heads.score_thresh=0.3", ...]`` (values parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like dotted.key=value")
        key, raw = item.split("=", 1)
        nested: dict = {}
        cur = nested
        parts = key.strip().split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = yaml.safe_load(raw)
        cfg = merge(cfg, nested)
    return cfg


def load_yaml(path: str | Path) -> Config:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping at the top level")
    base_name = data.pop("_base_", None)
    if base_name is None:
        base = Config()
    elif str(base_name) in PRESETS:
        base = PRESETS[str(base_name)]()
    else:
        base = load_yaml((path.parent / str(base_name)) if not Path(str(base_name)).is_absolute() else base_name)
    try:
        return merge(base, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None



"""Recipes as files, and the one place where a run's options are layered:

    defaults (aps.config) < a recipe file < the run's saved config (on --resume) < the command line

A recipe is a TOML (or JSON) file whose sections are TrainConfig's groups, [task], [flow], [image_flow],
[objective], [optimisation] and [run], each holding options of its group only, e.g.

    description = "sr x4 on MNIST"
    [task]
    prior = "checkpoints/mnist-prior"
    operator = "sr"
    op_arg = ["factor=4"]
    [objective]
    fkl_weight = 1.0

A recipe may start from another: a top-level `base = "image-wide"` (a shipped name or a file) reads that
recipe first and this file's options over it, so a recipe says only what it changes.

Shipped recipes live in aps/recipes/ (package data) and are named without the suffix; without --recipe,
train.py starts from the one aps/recipes/defaults.toml names for the task's kind (mixture problem or
image prior, optionally per operator). `train.py --dry-run` prints the resolved configuration in this
format, each non-default value marked with where it came from, so its output is itself a recipe.

On --resume the run continues as it was configured: every option comes from its config.json. An option
given on the command line that changes the run is applied and said ("resume: --lr 0.001 -> 0.00025"),
or refused where the run cannot change it (task, architecture, seed, EMA or fp16 on or off).
"""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .config import TrainConfig, section
from .errors import ApsError

SHIPPED = resources.files("aps") / "recipes"  # package data: an installed aps finds them
DEFAULTS = "defaults.toml"
PER_COMMAND = ("out", "resume", "dry_run", "recipe")  # said on each command, never by a recipe or a saved run
FIXED_ON_RESUME = TrainConfig.ARCH_FIELDS + ("seed",)  # the saved random state carries the seed


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def shipped() -> list[str]:
    """Names of the recipes that ship with aps (train.py --recipe NAME)."""
    return sorted(p.name[:-5] for p in SHIPPED.iterdir() if p.name.endswith(".toml") and p.name != DEFAULTS)


def _parse(text: str, label: str, suffix: str) -> dict:
    try:
        data = json.loads(text) if suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise ApsError(f"recipe {label} is not valid {'JSON' if suffix == '.json' else 'TOML'}: {err}") from None
    if not isinstance(data, dict):
        raise ApsError(f"recipe {label}: want sections of options, got {type(data).__name__}")
    return data


def _load(name_or_file: str) -> tuple[str, dict]:
    """(label, parsed content) of a recipe file or a shipped recipe's name."""
    path = Path(name_or_file)
    if path.suffix in (".toml", ".json") or path.exists():
        if not path.is_file():
            raise ApsError(f"recipe file not found: {path}")
        return str(path), _parse(path.read_text(), str(path), path.suffix)
    resource = SHIPPED / f"{name_or_file}.toml"
    if not resource.is_file():
        raise ApsError(f"unknown recipe {name_or_file!r}: give a .toml or .json file, or one of {', '.join(shipped())}")
    return name_or_file, _parse(resource.read_text(), name_or_file, ".toml")


def _checked(value, f: dataclasses.Field, where: str):
    """value as field f's type, or ApsError naming where it was read."""
    kind = {"int": int, "float": float, "str": str, "bool": bool, "list": list}.get(f.type, f.type)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    if not ok:
        want = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
                list: "a list of strings"}.get(kind, kind)
        raise ApsError(f"{where} must be {want}, got {value!r}")
    if f.metadata.get("choices") and value not in f.metadata["choices"]:
        raise ApsError(f"{where} must be one of {', '.join(f.metadata['choices'])}, got {value!r}")
    return value


def read_recipe(name_or_file: str, cls=TrainConfig) -> dict:
    """The options a recipe sets, {field: value}, its base's included (see `recipe_layers`)."""
    values = {}
    for _, layer in recipe_layers(name_or_file, cls):
        values.update(layer)
    return values


def recipe_layers(name_or_file: str, cls=TrainConfig, _seen: tuple = ()) -> list[tuple[str, dict]]:
    """[(label, {field: value})] of a recipe, its base's layers first (a top-level `base = NAME`), each option
    checked against its section: an unknown section or key, a key in another section's place, a value of the
    wrong type or a cycle of bases is an ApsError naming the file and key."""
    label, data = _load(name_or_file)
    if label in _seen:
        raise ApsError(f"recipe {label}: its bases form a cycle ({' -> '.join((*_seen, label))})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    sections = sorted({section(f) for f in fields.values()})
    layers, values = [], {}
    for name, options in data.items():
        if name == "description" and isinstance(options, str):
            continue
        if name == "base" and isinstance(options, str):
            base = options
            if not Path(base).is_absolute() and Path(label).is_file() and (Path(label).parent / base).is_file():
                base = str(Path(label).parent / base)  # a file next to this one
            layers = recipe_layers(base, cls, (*_seen, label))
            continue
        if name not in sections or not isinstance(options, dict):
            raise ApsError(f"recipe {label}: unknown section [{name}] (sections: {', '.join(sections)}; "
                           f"and a top-level description and base)")
        for key, value in options.items():
            f = fields.get(key)
            if f is None or section(f) != name:
                hint = f" (it belongs in [{section(f)}])" if f is not None else ""
                raise ApsError(f"recipe {label}: [{name}] has no option {key!r}{hint}")
            if key in PER_COMMAND:
                raise ApsError(f"recipe {label}: {key!r} is given on the command line ({flag(key)}), not in a recipe")
            values[key] = _checked(value, f, f"recipe {label}: [{name}] {key}")
    return [*layers, (label, values)]


def default_recipe(given: dict) -> str:
    """The recipe defaults.toml names for the task kind of the given options (image prior or mixture problem)."""
    table = tomllib.loads((SHIPPED / DEFAULTS).read_text())
    if given.get("prior"):
        return table.get("image_operator", {}).get(given.get("operator", ""), table["image"])
    return table["mixture"]


def description(name_or_file: str) -> str:
    """A recipe's top-level description ("" if none)."""
    return _load(name_or_file)[1].get("description", "")


@dataclass
class Resolved:
    """A resolved configuration: the config, where each option set by a layer came from, and what a resume changed."""
    cfg: TrainConfig
    source: dict = field(default_factory=dict)  # field -> "recipe NAME" | "checkpoint" | "command line"
    notes: list = field(default_factory=list)  # "resume: --lr 0.001 -> 0.00025", one per applied change


def _show(value) -> str:
    return json.dumps(value) if isinstance(value, (str, list)) else repr(value)


def resume_changes(saved: TrainConfig, cfg: TrainConfig, out) -> list[str]:
    """What cfg changes in the saved run, one line each; ApsError for a change the run cannot take."""
    notes = []
    for f in dataclasses.fields(cfg):
        old, new = getattr(saved, f.name), getattr(cfg, f.name)
        if f.name in PER_COMMAND + ("init_from",) or old == new:
            continue
        if f.name in FIXED_ON_RESUME:
            raise ApsError(f"--resume: the run in {out} was trained with {flag(f.name)} {_show(old)}; it cannot "
                           f"change to {_show(new)} on resume (start a new run with --init-from {out})")
        if f.name == "ema_decay" and (old > 0) != (new > 0):
            raise ApsError(f"--resume: the run in {out} was trained with --ema-decay {old}; the EMA cannot be "
                           f"turned {'on' if new > 0 else 'off'} on resume (start a new run with --init-from {out})")
        if f.name == "mixed_precision" and "fp16" in (old, new):
            raise ApsError(f"--resume: the run in {out} was trained with --mixed-precision {old}; fp16 (a loss scaler "
                           f"in the training state) cannot be turned {'on' if new == 'fp16' else 'off'} on resume")
        notes.append(f"resume: {flag(f.name)} {_show(old)} -> {_show(new)}")
    return notes


def saved_config(out, cls=TrainConfig) -> TrainConfig:
    """The config of the run in folder `out` (config.json, grouped or flat)."""
    from .checkpoint import CONFIG, read_config

    if not (Path(out) / CONFIG).is_file():
        raise ApsError(f"--resume: no run to resume in {out} (no {CONFIG})")
    return cls.from_dict(read_config(out)["train"])


def resolve(given: dict, cls=TrainConfig) -> Resolved:
    """Layer the options given explicitly ({field: value}, see aps.config.explicit_args) over a recipe, or on
    --resume over the run's saved config, over the defaults; validated."""
    values, source = cls().to_dict(), {}

    def put(layer: dict, where: str):
        for key, value in layer.items():
            values[key], source[key] = value, where

    notes = []
    if given.get("resume"):
        out = given.get("out", values["out"])
        if given.get("recipe"):
            raise ApsError(f"--resume continues the run in {out} as it was configured: give the options to change "
                           f"instead of --recipe")
        if given.get("init_from"):
            raise ApsError("--init-from starts a new run and --resume continues one: give one of them")
        saved = saved_config(out, cls)
        put({k: v for k, v in saved.to_dict().items() if k not in PER_COMMAND or k == "recipe"}, "checkpoint")
        changed = {**values, **{k: v for k, v in given.items() if k not in PER_COMMAND}}
        notes = resume_changes(saved, cls(**changed), out)
    else:
        name = given.get("recipe") or default_recipe(given)
        for label, layer in recipe_layers(name, cls):
            put(layer, f"recipe {label}")
        if not given.get("recipe"):
            put({"recipe": name}, f"the default for the task's kind ({DEFAULTS})")
    put({k: v for k, v in given.items() if not (k == "recipe" and not v)}, "command line")
    return Resolved(cls(**values).validate(), source, notes)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return ("-" if value < 0 else "") + ("nan" if math.isnan(value) else "inf")
    return json.dumps(value) if isinstance(value, (str, list, tuple)) else repr(value)


def to_toml(cfg, source: dict | None = None, sections=None, header: str = "") -> str:
    """cfg (a TrainConfig) as recipe TOML: sections in order, each non-default value followed by where it came
    from (`source`); `sections` limits the output (per-command options are left out of a recipe)."""
    default = type(cfg)()
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    groups = cfg.to_groups()
    for name, options in groups.items():
        if sections is not None and name not in sections:
            continue
        lines += ["", f"[{name}]"]
        for key, value in options.items():
            if key in PER_COMMAND and sections is not None:
                continue
            text = f"{'# ' if key in PER_COMMAND else ''}{key} = {_toml_value(value)}"  # per command: not a recipe's
            where = (source or {}).get(key)
            if where and (value != getattr(default, key) or where == "command line"):
                text = f"{text:<40} # {where}"
            lines.append(text)
    return "\n".join(lines).lstrip("\n") + "\n"


def describe(run: Resolved) -> str:
    """What train.py --dry-run prints: the resolved configuration as recipe TOML, grouped by section, each
    non-default value marked with its source (recipe / checkpoint / command line), and what a resume changes."""
    cfg = run.cfg
    layers = ["defaults", f"the run in {cfg.out}" if cfg.resume else f"recipe {cfg.recipe}", "command line"]
    header = "\n".join([f"train.py configuration: {' < '.join(layers)}", *run.notes])
    return to_toml(cfg, run.source, header=header)

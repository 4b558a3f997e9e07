"""Recipes as files and the layering of options: defaults < recipe < the saved run (on --resume) < the command line."""
import json
import tomllib
from pathlib import Path

import pytest

from cli_helpers import ROOT, assert_one_line_error, run

from aps.config import TrainConfig
from aps.errors import ApsError
from aps.recipe import PER_COMMAND, read_recipe, resolve, shipped

SHIPPED_FLOWS = sorted(p.parent.name for p in (ROOT / "checkpoints").glob("*/flow.safetensors"))


def flat_toml(text: str) -> dict:
    return {k: v for group in tomllib.loads(text).values() if isinstance(group, dict) for k, v in group.items()}


@pytest.mark.parametrize("name", SHIPPED_FLOWS)
def test_dry_run_of_a_shipped_recipe_prints_its_checkpoints_config(name):
    """`train.py --recipe NAME --dry-run` gives every option the shipped checkpoint's config.json records (the
    recipe is its last stage; init_from, where that stage started, and the per-command options aside)."""
    assert name in shipped()
    proc = run("train.py", "--recipe", name, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    printed = flat_toml(proc.stdout)
    recorded = json.loads((ROOT / "checkpoints" / name / "config.json").read_text())["train"]
    recorded = TrainConfig.from_dict(recorded).to_dict()  # old flat files read as grouped ones do
    compared = [k for k in recorded if k not in PER_COMMAND + ("init_from",)]
    assert len(compared) > 40 and {k: printed[k] for k in compared} == {k: recorded[k] for k in compared}
    assert f"# recipe {name}" in proc.stdout  # each non-default value says where it came from


def test_every_shipped_recipe_reads_and_resolves():
    for name in shipped():
        values = read_recipe(name)
        given = {} if values.get("prior") or values.get("problem") else {"mcgdiff": "2,1,0"}
        if "glow_levels" in values and not values.get("prior"):
            given = {"prior": "p", "operator": "denoise"}
        cfg = resolve({**given, "recipe": name}).cfg
        assert all(getattr(cfg, k) == v for k, v in values.items()), name


def test_defaults_are_the_recipe_of_the_tasks_kind():
    mixture = resolve({"mcgdiff": "2,1,0"})
    assert mixture.cfg.recipe == "mixture-gated" and mixture.cfg.flow_base_gate and mixture.cfg.flow_base_components == 25
    assert mixture.source["flow_base_gate"] == "recipe mixture-gated"
    image = resolve({"prior": "p", "operator": "sr", "op_arg": ["factor=4"]})
    assert image.cfg.recipe == "image-wide" and image.cfg.aps_weight == 0 and image.cfg.fkl_weight == 1
    assert image.cfg.glow_hidden == 160 and image.cfg.lr == 1e-3 and image.source["glow_hidden"] == "recipe image-wide"
    assert image.cfg.flow_base_components == 0  # the mixture recipe is not applied to images


def test_command_line_beats_the_recipe_even_at_the_default_value(tmp_path):
    proc = run("train.py", "--recipe", "mnist-sr-flow", "--lr", "0.001", "--no-class-template", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    printed = flat_toml(proc.stdout)
    assert printed["lr"] == 0.001 and printed["class_template"] is False and printed["batch_size"] == 64
    line = next(l for l in proc.stdout.splitlines() if l.startswith("lr ="))
    assert line.endswith("# command line")
    # the dry run is itself a recipe: the same configuration back
    (tmp_path / "r.toml").write_text(proc.stdout)
    again = run("train.py", "--recipe", tmp_path / "r.toml", "--dry-run")
    assert again.returncode == 0, again.stderr
    assert flat_toml(again.stdout) == printed


def test_a_json_recipe(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"task": {"mcgdiff": "2,1,0"}, "optimisation": {"lr": 1}, "flow": {"flow_layers": 3}}))
    cfg = resolve({"recipe": str(path)}).cfg
    assert cfg.mcgdiff == "2,1,0" and cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.flow_layers == 3
    assert cfg.n_z == TrainConfig().n_z  # what the file leaves out is the default, not another recipe's


@pytest.mark.parametrize("text, needle", [
    ("[flows]\nflow_layers = 2\n", "unknown section [flows]"),
    ("[flow]\nflow_layerz = 2\n", "[flow] has no option 'flow_layerz'"),
    ("[flow]\nn_z = 2\n", "it belongs in [objective]"),
    ("[objective]\nn_z = 'two'\n", "n_z must be an integer"),
    ("[objective]\nn_z = true\n", "n_z must be an integer"),
    ("[run]\nmixed_precision = 'fp8'\n", "must be one of"),
    ("[run]\nout = 'runs/x'\n", "'out' is given on the command line"),
    ("[task\n", "not valid TOML"),
])
def test_a_bad_recipe_is_one_line_naming_the_file_and_key(tmp_path, text, needle):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ApsError, match=None) as err:
        read_recipe(str(path))
    assert needle in str(err.value) and str(path) in str(err.value)
    if text.startswith("[flow]\nn_z"):  # and through the script: one line, exit 2
        assert_one_line_error(run("train.py", "--recipe", path, "--mcgdiff", "2,1,0"), "train.py", "[objective]")


def test_unknown_recipe_name():
    assert_one_line_error(run("train.py", "--recipe", "no-such-recipe", "--dry-run"), "train.py", "mnist-sr-flow")


# -- resume: the run continues as it was configured; a change is applied and said, or refused

def saved_run(tmp_path, **changes) -> tuple[Path, TrainConfig]:
    """A run folder holding only the config.json of a run with a non-default value in every group."""
    task = {"prior": "checkpoints/mnist-prior", "operator": "sr", "op_arg": ["factor=4"], "data": "mnist"}
    cfg = TrainConfig.from_dict({**read_recipe("image-calibrated"), **task, "steps": 100000, "mixed_precision": "bf16",
                                 "ema_decay": 0.999, "max_seconds": 1234.0, "recipe": "mnist-sr-flow",
                                 "out": str(tmp_path), **changes})
    meta = {"format": "aps-flow", "format_version": 1, "step": 3, "flow": {}, "task": {}, "train": cfg.to_groups()}
    (tmp_path / "config.json").write_text(json.dumps(meta))
    return tmp_path, cfg


def test_resume_restores_every_option(tmp_path):
    out, saved = saved_run(tmp_path)
    got = resolve({"out": str(out), "resume": True})
    assert got.notes == []
    for k, v in saved.to_dict().items():
        if k not in ("resume",):
            assert getattr(got.cfg, k) == v, k  # nothing returns to its default
    assert got.cfg.resume and got.source["lr"] == "checkpoint"


@pytest.mark.parametrize("group, option, value, shown", [
    ("objective", "aps_weight", 0.0, "resume: --aps-weight 0.001 -> 0.0"),
    ("objective", "temper_start", 0.5, "resume: --temper-start 1.0 -> 0.5"),
    ("optimisation", "lr", 1e-3, "resume: --lr 0.00025 -> 0.001"),
    ("optimisation", "steps", 8000, "resume: --steps 100000 -> 8000"),
    ("run", "max_seconds", 0.0, "resume: --max-seconds 1234.0 -> 0.0"),
    ("run", "ema_decay", 0.99, "resume: --ema-decay 0.999 -> 0.99"),
    ("run", "mixed_precision", "no", 'resume: --mixed-precision "bf16" -> "no"'),
])
def test_resume_applies_and_says_a_change(tmp_path, group, option, value, shown):
    out, saved = saved_run(tmp_path)
    got = resolve({"out": str(out), "resume": True, option: value})
    assert got.notes == [shown] and getattr(got.cfg, option) == value
    assert got.source[option] == "command line" and got.cfg.batch_size == saved.batch_size
    assert resolve({"out": str(out), "resume": True, option: getattr(saved, option)}).notes == []  # the same: silent


@pytest.mark.parametrize("group, option, value, needle", [
    ("task", "operator", "denoise", "--operator \"sr\""),
    ("task", "op_arg", ["factor=2"], "--op-arg"),
    ("task", "data", "digits8", "--data"),
    ("flow", "flow_layers", 3, "--flow-layers 8"),
    ("image flow", "glow_hidden", 32, "--glow-hidden 64"),
    ("image flow", "class_template", False, "--class-template"),
    ("run", "seed", 1, "--seed 0"),
    ("run", "ema_decay", 0.0, "the EMA cannot be turned off"),
    ("run", "init_from", "elsewhere", "--init-from starts a new run"),
    ("run", "recipe", "mnist-denoise-flow", "instead of --recipe"),
    ("run", "mixed_precision", "fp16", "fp16 (a loss scaler"),
])
def test_resume_refuses_a_change_the_run_cannot_take(tmp_path, group, option, value, needle):
    out, _ = saved_run(tmp_path)
    with pytest.raises(ApsError) as err:
        resolve({"out": str(out), "resume": True, option: value})
    assert needle in str(err.value)


def test_resume_turning_the_ema_on_is_refused(tmp_path):
    out, _ = saved_run(tmp_path, ema_decay=0.0)
    with pytest.raises(ApsError, match="the EMA cannot be turned on"):
        resolve({"out": str(out), "resume": True, "ema_decay": 0.99})


def test_resume_of_a_flat_config_json(tmp_path):
    """config.json files written before the sections (the shipped checkpoints') resume as grouped ones do."""
    shipped_meta = json.loads((ROOT / "checkpoints" / "mnist-classifier-flow" / "config.json").read_text())
    assert "lr" in shipped_meta["train"]  # flat
    (tmp_path / "config.json").write_text(json.dumps(shipped_meta))
    got = resolve({"out": str(tmp_path), "resume": True, "steps": 5})
    assert got.cfg.likelihood_weight == 30 and got.cfg.lr == 2.5e-4 and got.notes == ["resume: --steps 100000 -> 5"]
    assert got.cfg.flow_base_gate is False  # an option the file predates: its default


def test_resume_without_a_run(tmp_path):
    assert_one_line_error(run("train.py", "--out", tmp_path, "--resume"), "train.py", "no run to resume")


def test_a_recipe_starts_from_its_base(tmp_path):
    """`base = NAME` reads the base first and the file over it; --dry-run says which layer set each value."""
    (tmp_path / "mine.toml").write_text('base = "image-wide"\n[optimisation]\nlr = 0.0005\n')
    (tmp_path / "more.toml").write_text('base = "mine.toml"\n[image_flow]\nglow_cond = 32\n')  # a file next to it
    run_ = resolve({"prior": "p", "operator": "sr", "recipe": str(tmp_path / "more.toml")})
    wide = read_recipe("image-wide")
    assert run_.cfg.lr == 5e-4 and run_.cfg.glow_cond == 32 and run_.cfg.glow_hidden == wide["glow_hidden"] == 160
    assert run_.source["glow_hidden"] == "recipe image-wide"
    assert run_.source["lr"] == f"recipe {tmp_path / 'mine.toml'}"
    assert run_.source["glow_cond"] == f"recipe {tmp_path / 'more.toml'}"
    assert read_recipe(str(tmp_path / "more.toml")) == {**wide, "lr": 5e-4, "glow_cond": 32}
    # each shipped per-operator recipe is image-wide for its task (a two-stage one: its first stage; the second
    # changes only the LR, the steps and the APS weight, and starts from the first stage's weights)
    for name in set(SHIPPED_FLOWS) - {"mnist-classifier-flow"}:  # (the guided flow is another recipe's)
        values = read_recipe(name)
        if values.get("init_from"):
            assert values["init_from"] == f"runs/{name}-stage1" and values["aps_weight"] > 0, name
            first = read_recipe(f"{name}-stage1")
            assert {k: v for k, v in first.items() if k in wide} == wide, name
            assert {k for k in set(values) | set(first) if values.get(k) != first.get(k)} <= \
                {"lr", "steps", "aps_weight", "init_from", "max_seconds", "sample_every", "description"}, name
        else:
            assert {k: v for k, v in values.items() if k in wide} == wide, name


@pytest.mark.parametrize("text, needle", [
    ('base = "no-such-recipe"\n', "unknown recipe 'no-such-recipe'"),
    ('base = "loop.toml"\n', "cycle"),
])
def test_a_bad_base_is_one_line(tmp_path, text, needle):
    path = tmp_path / "loop.toml"
    path.write_text(text)
    assert_one_line_error(run("train.py", "--recipe", path, "--dry-run"), "train.py", needle)

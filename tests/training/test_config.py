"""The training configuration: one source of defaults, shared keys over recipes, numeric checks, the
official length, the checks before a run, and the shape of the training package (no import cycle, short
functions)."""

from __future__ import annotations

import ast
import dataclasses
import logging
from pathlib import Path

import pytest
import yaml

from sa2va_pipeline.training.config import TrainingConfig, load_training_config

ROOT = Path(__file__).resolve().parents[2]
YAML = ROOT / "conf/base/parameters_training.yml"
PACKAGE = ROOT / "src/sa2va_pipeline/training"


def _yaml() -> dict:
    return yaml.safe_load(YAML.read_text())["training"]


def _leaves(values: dict, where: str = "") -> dict[str, object]:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and value and key not in ("overrides", "lr_by_group"):
            out.update(_leaves(value, f"{where}{key}."))
        else:
            out[where + key] = value
    return out


def _default_leaves(cls=TrainingConfig, where: str = "") -> dict[str, object]:
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out.update(_default_leaves(type(default), f"{where}{f.name}."))
        else:
            out[where + f.name] = list(default) if isinstance(default, tuple) else default
    return out


def test_yaml_names_every_setting_and_its_shared_values_are_the_defaults():
    params = _yaml()
    recipes = params.pop("recipes")
    shared, defaults = _leaves(params), _default_leaves()
    shared.pop("recipe")  # "auto" is resolved to a name
    assert set(shared) <= set(defaults), sorted(set(shared) - set(defaults))
    for key, value in shared.items():
        assert value == defaults[key], f"{YAML.name}: training.{key} = {value!r} but the dataclass default is {defaults[key]!r}"
    for name, block in recipes.items():
        in_recipe = set(_leaves(block))
        assert not in_recipe & set(shared), f"recipes.{name} sets shared keys (they would be dead): {in_recipe & set(shared)}"
        missing = set(defaults) - set(shared) - in_recipe - {"recipe"}
        assert not missing, f"neither the shared settings nor recipes.{name} name {sorted(missing)}"


def test_a_shared_override_wins_over_the_recipe_and_is_reported(caplog):
    params = _yaml()
    assert load_training_config(params).optimizer.lr == 2e-3  # the tiny recipe's
    with caplog.at_level(logging.INFO, logger="sa2va_pipeline.training.config"):
        config = load_training_config({**params, "optimizer": {**params["optimizer"], "lr": 1e-2}})
    assert config.optimizer.lr == 1e-2
    assert "training.optimizer.lr is set both" in caplog.text
    # the recipe still holds everything else it sets
    assert config.trainable.sam2_image_encoder and config.schedule.time_budget_s == 200


def test_official_recipe_has_the_official_length():
    from sa2va_pipeline.training.trainer import planned_steps

    official = load_training_config({**_yaml(), "model": {"checkpoint": "/models/Sa2VA-1B"}})
    assert (official.schedule.epochs, official.schedule.repeats) == (1, 100)
    official.batch_size, official.grad_accumulation = 2, 16  # global batch 32 on one device
    assert planned_steps(official, 1219) == 3810  # ceil(1219 x 100 / 32)


def test_loss_and_object_settings_reach_the_model_call():
    config = load_training_config(_yaml())
    assert config.loss.forward_kwargs() == {
        "mask_loss": "points", "llm_weight": 1.0, "bce_weight": 2.0, "dice_weight": 0.5, "num_points": 12544,
        "oversample_ratio": 3.0, "importance_sample_ratio": 0.75, "cldice_weight": 0.0, "cldice_iterations": 5,
    }
    assert config.max_objects_per_image == 5
    import inspect

    from sa2va_pipeline.model.sa2va import Sa2VA

    accepted = inspect.signature(Sa2VA.training_forward).parameters
    assert set(config.loss.forward_kwargs()) <= set(accepted)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"optimizer": {"lr": 1e45}}, "training.optimizer.lr"),
        ({"optimizer": {"lr": float("nan")}}, "training.optimizer.lr"),
        ({"optimizer": {"warmup_ratio": 1.5}}, "training.optimizer.warmup_ratio"),
        ({"optimizer": {"betas": [0.9, 1.0]}}, "training.optimizer.betas.1"),
        ({"batch_size": -2}, "training.batch_size"),
        ({"batch_size": 2.5}, "training.batch_size"),
        ({"grad_accumulation": 0}, "training.grad_accumulation"),
        ({"lora": {"dropout": 1.0}}, "training.lora.dropout"),
        ({"loss": {"bce_weight": float("inf")}}, "training.loss.bce_weight"),
        ({"schedule": {"time_budget_s": -5}}, "training.schedule.time_budget_s"),
        ({"checkpoint": {"keep_last": 0}}, "training.checkpoint.keep_last"),
        ({"eval": {"thresholds": [0.5, 1.5]}}, "training.eval.thresholds"),
        ({"optimizer": {"lr": "fast"}}, "training.optimizer.lr"),
        ({"checkpoint": {"resume": "../elsewhere"}}, "training.checkpoint.resume"),
    ],
)
def test_absurd_numbers_are_refused_naming_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_training_config({**override, "recipe": "tiny"})


@pytest.mark.parametrize("setting", [False, True, "reduce-overhead"])
def test_compile_takes_true_false_or_a_mode(setting):
    from sa2va_pipeline.training.config import compile_mode, compile_uses_cudagraphs

    config = load_training_config({"recipe": "tiny", "compile": setting, "pad_to_multiple": 64})
    assert config.compile == setting and config.pad_to_multiple == 64
    assert compile_mode(setting) == (setting if isinstance(setting, str) else None)  # None: torch's default
    assert compile_uses_cudagraphs(setting, "cuda:0") == (setting == "reduce-overhead")
    assert not compile_uses_cudagraphs(setting, "cpu")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"compile": "max-autotune"}, "training.compile"),
        ({"compile": "max-autotune-no-cudagraphs"}, "training.compile"),
        ({"compile": "yes"}, "training.compile"),
        ({"compile": 1}, "training.compile"),
        ({"pad_to_multiple": 0}, "training.pad_to_multiple"),
        ({"pad_to_multiple": -64}, "training.pad_to_multiple"),
        ({"pad_to_multiple": 2.5}, "training.pad_to_multiple"),
        ({"pad_to_multiple": True}, "training.pad_to_multiple"),
        ({"pad_to_multiple": "wide"}, "training.pad_to_multiple"),
    ],
)
def test_bad_compile_and_padding_settings_are_refused(override, key):
    from sa2va_pipeline.training.config import TrainingConfigError

    with pytest.raises(TrainingConfigError, match=key.replace(".", r"\.")):
        load_training_config({**override, "recipe": "tiny"})
    assert load_training_config({"recipe": "tiny"}).pad_to_multiple is None  # default: pad to the longest


def test_data_checks_stop_before_training():
    from sa2va_pipeline.training.recipe import check_training_data

    sample = {"id": "a", "image": None, "masks": None, "phrases": ["vessel"]}
    with pytest.raises(ValueError, match="val split is empty"):
        check_training_data([sample] * 10, [], {})
    with pytest.raises(ValueError, match="train split holds 3 image.*min_train_samples = 4"):
        check_training_data([sample] * 3, [sample], {})
    check_training_data([sample] * 3, [sample], {"min_train_samples": 3})


def _imports(path: Path) -> set[str]:
    """Modules of sa2va_pipeline.training this file imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sa2va_pipeline.training."):
            out.add(node.module.split(".")[2])
        elif isinstance(node, ast.ImportFrom) and node.module == "sa2va_pipeline.training":
            out.update(alias.name for alias in node.names)
    return out


def test_training_package_has_no_import_cycle():
    graph = {p.stem: _imports(p) - {p.stem} for p in PACKAGE.glob("*.py")}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if not state.get(nxt):
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in graph:
        if not state.get(module):
            visit(module, [module])


def test_training_functions_stay_short():
    long = []
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if length > 80 and "long because" not in doc:
                    long.append(f"{path.name}:{node.name} ({length} lines)")
    assert not long, long

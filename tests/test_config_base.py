"""moerge's one configuration base (moerge/config_base.py) as each config family uses it: the same error
for the same mistake, and one rule for relative paths (relative to the YAML file that names them)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

import merge.recipe
import moerge.up
import moerge.zoo.config
import router.config
import serving.config
from moerge.config_base import ConfigError

LINEAR = {"shared": {"method": "linear"}, "gate": {"init": "random"}}  # a recipe that needs no base
# family → (what its errors call it, a minimal valid config, its loader)
FAMILIES: dict[str, tuple[str, dict[str, Any], Callable[[Path], Any]]] = {
    "merge": (
        "merge recipe",
        {"experts": [{"name": "a", "path": "a"}], "shared": {"method": "linear"}, "gate": {"init": "random"}},
        merge.recipe.load_recipe,
    ),
    "router": (
        "router config",
        {"experts": {"a": {"files": ["a.jsonl"]}, "b": {"files": ["b.jsonl"]}}},
        router.config.load_config,
    ),
    "serving": (
        "serve config",
        {"experts": {"a": {"backend": "vllm", "model": "./a"}}},
        serving.config.load_config,
    ),
    "up": ("topology", {"experts": {"a": {"model": "./a"}}}, moerge.up.load_topology),
    "zoo": ("zoo config", {}, moerge.zoo.config.load_zoo_config),
}


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_one_config_error_class_under_every_name() -> None:
    assert router.config.ConfigError is ConfigError
    assert serving.config.ConfigError is ConfigError
    assert moerge.zoo.config.ZooConfigError is ConfigError
    assert issubclass(merge.recipe.RecipeError, ConfigError) and issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_same_mistake_gives_the_same_error_in_every_family(family: str, tmp_path: Path) -> None:
    what, valid, load = FAMILIES[family]
    assert load(_write(tmp_path / "ok.yaml", valid)) is not None
    path = _write(tmp_path / "bad.yaml", {**valid, "typo": 1.5})
    with pytest.raises(ConfigError) as err:
        load(path)
    assert err.value.field == "typo" and err.value.source == str(path)
    assert str(err.value).splitlines() == [
        f"{path}: invalid {what}",
        "  typo: Extra inputs are not permitted (got 1.5)",
    ]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_unreadable_files_are_config_errors_naming_the_file(family: str, tmp_path: Path) -> None:
    _, _, load = FAMILIES[family]
    with pytest.raises(ConfigError, match=r"cannot read .* file not found") as err:
        load(tmp_path / "nope.yaml")
    assert err.value.source == str(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("[1, 2]\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level, got list"):
        load(tmp_path / "list.yaml")


def test_list_items_are_named_by_index_and_values_are_shown(tmp_path: Path) -> None:
    data = {"experts": [{"name": "a", "path": "a"}, {"name": "b", "path": "b", "weight": -1}]}
    with pytest.raises(merge.recipe.RecipeError) as err:
        merge.recipe.load_recipe(_write(tmp_path / "r.yaml", {**data, **LINEAR}))
    assert err.value.field == "experts[1].weight"
    assert "  experts[1].weight: Input should be greater than 0 (got -1)" in str(err.value).splitlines()


def test_secrets_are_never_echoed() -> None:
    data = {"experts": {"a": {"backend": "openai", "url": "http://127.0.0.1:1/v1", "api_key": 1234567}}}
    with pytest.raises(
        ConfigError, match=r"experts\.a\.openai\.api_key: Input should be a valid string"
    ) as err:
        serving.config.parse_config(data)
    assert "1234567" not in str(err.value)


# -- relative paths: relative to the file that names them, wherever the process runs ----------------


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The config lives in tmp/cfg; the process runs in tmp/elsewhere."""
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    return tmp_path / "cfg"


def test_merge_recipe_paths(elsewhere: Path) -> None:
    recipe = merge.recipe.load_recipe(
        _write(
            elsewhere / "recipe.yaml",
            {
                "base": "../models/base",
                "experts": [{"name": "a", "path": "experts/a", "data": [{"path": "data/a.jsonl"}]}],
                **LINEAR,
            },
        )
    )
    assert recipe.base == (elsewhere.parent / "models" / "base").resolve()
    assert recipe.experts[0].path == (elsewhere / "experts" / "a").resolve()
    assert recipe.experts[0].data[0].path == (elsewhere / "data" / "a.jsonl").resolve()


def test_router_config_paths(elsewhere: Path) -> None:
    config = router.config.load_config(
        _write(
            elsewhere / "router.yaml",
            {
                "experts": {"a": {"files": ["data/a.jsonl"]}, "b": {"files": ["../b.jsonl"]}},
                "encoder": {"model": "encoders/mini"},
            },
        )
    )
    assert config.experts["a"].files == [(elsewhere / "data" / "a.jsonl").resolve()]
    assert config.experts["b"].files == [(elsewhere.parent / "b.jsonl").resolve()]
    assert config.encoder.model == str((elsewhere / "encoders" / "mini").resolve())
    bundled = router.config.parse_config({"experts": {"a": {"files": ["a"]}, "b": {"files": ["b"]}}})
    assert bundled.encoder.model == "bundled"


def test_serve_config_paths(elsewhere: Path) -> None:
    config = serving.config.load_config(
        _write(
            elsewhere / "serve.yaml",
            {
                "experts": {
                    "a": {"backend": "vllm", "model": "./models/a"},
                    "hub": {"backend": "vllm", "model": "HuggingFaceTB/SmolLM2-135M"},
                },
                "lora": {
                    "fam": {
                        "base": {"backend": "vllm", "model": "../base"},
                        "adapters": {"math": "adapters/math"},
                    }
                },
                "lora_state_file": "state/lora.json",
                "routers": {"r": {"artifact": "routers/r"}},
                "decision_log": {"enabled": True, "url": "sqlite:///logs/d.db"},
            },
        )
    )
    here = elsewhere.resolve()
    assert config.experts["a"].model == str(here / "models" / "a")  # type: ignore[union-attr]
    assert config.experts["hub"].model == "HuggingFaceTB/SmolLM2-135M"  # type: ignore[union-attr]
    assert config.lora["fam"].base.model == str(here.parent / "base")  # type: ignore[union-attr]
    assert config.lora["fam"].adapters["math"].path == str(here / "adapters" / "math")
    assert config.lora_state_file == str(here / "state" / "lora.json")
    assert config.routers["r"].artifact == str(here / "routers" / "r")
    assert config.decision_log.url == f"sqlite:///{here / 'logs' / 'd.db'}"
    default = serving.config.load_config(_write(elsewhere / "other" / "serve.yaml", FAMILIES["serving"][1]))
    assert default.decision_log.url == f"sqlite:///{here / 'other' / 'moerge-decisions.db'}"


def test_topology_paths_and_the_gateway_config_it_generates(elsewhere: Path, tmp_path: Path) -> None:
    topo_file = _write(
        elsewhere / "topo.yaml",
        {
            "experts": {"a": {"model": "../models/a"}},
            "gateway": {"routers": {"r": {"artifact": "routers/r"}}, "decision_log": {"enabled": True}},
        },
    )
    topo = moerge.up.load_topology(topo_file)
    here = elsewhere.resolve()
    assert topo.experts["a"].model == str(here.parent / "models" / "a")
    plan = moerge.up.make_plan(topo)
    assert plan.serve_config.routers["r"].artifact == str(here / "routers" / "r")
    assert plan.serve_config.decision_log.url == f"sqlite:///{here / 'moerge-decisions.db'}"
    # the generated file lives in a run folder, and still means the topology's paths
    generated = _write(tmp_path / "run" / "gateway.yaml", plan.gateway_config)
    again = serving.config.load_config(generated)
    assert again.routers["r"].artifact == str(here / "routers" / "r")
    assert again.decision_log.url == plan.serve_config.decision_log.url


def test_zoo_config_paths(elsewhere: Path) -> None:
    config = moerge.zoo.config.load_zoo_config(
        _write(elsewhere / "zoo.yaml", {"base": {"checkpoint": "ckpt", "gguf": "../m.gguf"}})
    )
    assert config.base.checkpoint == (elsewhere / "ckpt").resolve()
    assert config.base.gguf == (elsewhere.parent / "m.gguf").resolve()


def test_configs_built_from_data_are_relative_to_the_current_folder(elsewhere: Path) -> None:
    cwd = Path.cwd()
    recipe = merge.recipe.parse_recipe({"experts": [{"name": "a", "path": "a"}], **LINEAR})
    assert recipe.experts[0].path == cwd / "a"
    serve = serving.config.parse_config({"experts": {"a": {"backend": "vllm", "model": "./a"}}})
    assert serve.experts["a"].model == str(cwd / "a")  # type: ignore[union-attr]
    train = router.config.parse_config({"experts": {"a": {"files": ["a"]}, "b": {"files": ["b"]}}})
    assert train.experts["a"].files == [cwd / "a"]


@pytest.mark.parametrize("family", ["merge", "router", "up", "zoo"])
def test_configs_that_are_never_changed_are_frozen(family: str, tmp_path: Path) -> None:
    _, valid, load = FAMILIES[family]
    config = load(_write(tmp_path / "c.yaml", valid))
    name = next(iter(type(config).model_fields))
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        setattr(config, name, getattr(config, name))

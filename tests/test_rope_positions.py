"""serving.engine_args.check_rope_positions: no engine runs a RoPE model past its position table.

With VLLM_ALLOW_LONG_MAX_MODEL_LEN set, vLLM starts an engine whose max_model_len is past the model's
max_position_embeddings, and positions past the table write NaN into the KV cache (see
tests/test_serving_e2e.py::test_long_generation_logprobs_stay_finite): refused, by field, in-process and
under `moerge up`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from moerge.up import load_topology, make_plan
from serving.backends.inprocess import parse_engine_args
from serving.config import ConfigError
from serving.engine_args import check_rope_positions

ALLOW = {"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}


def model_dir(tmp_path: Path, **config: Any) -> str:
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"max_position_embeddings": 256, **config}))
    return str(folder)


def test_past_the_table_is_refused_by_field(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"engine_args\.max_model_len=8192 is past .*max_position_embeddings=256"
    ):
        check_rope_positions(model_dir(tmp_path), {"max-model-len": 8192}, ALLOW)


@pytest.mark.parametrize(
    ("args", "env", "config"),
    [
        ({"max_model_len": 8192}, {}, {}),  # vLLM itself refuses it without the variable
        ({"max_model_len": 256}, ALLOW, {}),
        ({"max_model_len": 8192, "hf_overrides": {"max_position_embeddings": 8192}}, ALLOW, {}),
        ({"max_model_len": 8192, "hf_overrides": '{"max_position_embeddings": 8192}'}, ALLOW, {}),
        ({"max_model_len": 8192}, ALLOW, {"rope_scaling": {"rope_type": "yarn", "factor": 32.0}}),
        ({}, ALLOW, {}),  # vLLM takes the model's own length
    ],
)
def test_within_the_table_passes(tmp_path: Path, args: dict, env: dict, config: dict) -> None:
    check_rope_positions(model_dir(tmp_path, **config), args, env)


def test_model_ids_are_left_to_vllm() -> None:
    check_rope_positions("HuggingFaceTB/SmolLM2-135M", {"max_model_len": 10**6}, ALLOW)


def test_in_process_engine_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    with pytest.raises(ValueError, match=r"expert 'math': engine_args\.max_model_len=4096 is past"):
        parse_engine_args(model_dir(tmp_path), "math", {"max_model_len": 4096})


def test_moerge_up_names_the_expert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    topo = tmp_path / "up.yaml"
    expert = {"model": model_dir(tmp_path), "args": {"max_model_len": 4096}}
    topo.write_text(yaml.safe_dump({"experts": {"math": expert}}))
    monkeypatch.delenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", raising=False)
    make_plan(load_topology(topo))  # fine without the variable: vLLM refuses by itself
    topo.write_text(yaml.safe_dump({"experts": {"math": {**expert, "env": ALLOW}}}))
    with pytest.raises(ConfigError, match=r"experts\.math\.args\.max_model_len=4096 is past") as err:
        make_plan(load_topology(topo))
    assert err.value.field == "experts.math.args"

"""A config's `engine_args` as vLLM command-line flags: one mapping and one list of reserved names.

The in-process backend (which parses the flags with vLLM's own parser), `moerge up` (which passes them
to `vllm serve` processes) and the config checks all use these, so a setting means the same everywhere:
`enforce_eager: false` is `--no-enforce-eager` for a flag vLLM can negate, and nothing at all for a
plain switch whose default is already off (`disable_log_stats: false`); `null` leaves vLLM's default.
May import: the standard library and serving.vllm_boundary.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from serving.vllm_boundary import negatable_flags

# Set by moerge itself from the expert's entry (its model, its name, its address).
RESERVED_ENGINE_ARGS = frozenset({"model", "model_tag", "served_model_name", "host", "port"})
# Never passed on, whatever the config says: moerge does not run model code from a checkpoint.
REFUSED_ENGINE_ARGS = frozenset({"trust_remote_code"})


def normalized(key: str) -> str:
    return key.replace("-", "_")


def check_engine_args(args: Mapping[str, Any], set_by: str = "moerge") -> None:
    """ValueError naming the offending keys: reserved ones, and the refused ones set to anything true."""
    keys = {normalized(k): v for k, v in args.items()}
    if refused := sorted(k for k in REFUSED_ENGINE_ARGS if keys.get(k)):
        raise ValueError(f"{', '.join(refused)} is refused: moerge never runs model code")
    if reserved := sorted(RESERVED_ENGINE_ARGS & keys.keys()):
        raise ValueError(
            f"{', '.join(reserved)}: set by {set_by} (use the expert's `model`, its name and its port)"
        )


def engine_flags(args: Mapping[str, Any], negatable: Callable[[str], bool] | None = None) -> list[str]:
    """`{max_model_len: 256, enforce_eager: true}` → `--max-model-len 256 --enforce-eager`.

    `negatable(flag)` says whether vLLM has `--no-<flag>` (default: ask vLLM's own parser).
    """
    can_negate = negatable or (lambda flag: flag in negatable_flags())
    out: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            if value:
                out.append(flag)
            elif can_negate(flag):
                out.append("--no-" + flag[2:])
            # else: a plain switch, off unless given: false is its default
        elif isinstance(value, list):
            out += [flag, *(str(v) for v in value)]
        elif isinstance(value, dict):
            out += [flag, json.dumps(value)]
        else:
            out += [flag, str(value)]
    return out


def check_rope_positions(
    model: str, args: Mapping[str, Any], env: Mapping[str, str], field: str = "engine_args"
) -> None:
    """ValueError when an engine would run a RoPE model past its position table.

    vLLM refuses a `max_model_len` beyond the model's `max_position_embeddings` unless
    VLLM_ALLOW_LONG_MAX_MODEL_LEN is set; with it, positions past the table read outside it (vLLM 0.32's
    CPU rotary kernel has no bounds check): NaN keys and values land in the KV cache, and later requests
    that reuse those blocks answer NaN logprobs. Extending the table (`hf_overrides`) is safe: plain RoPE
    has no weights. Checked for local checkpoint folders with plain (unscaled) RoPE.
    """
    if env.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "").strip().lower() not in ("1", "true"):
        return
    keys = {normalized(k): v for k, v in args.items()}
    length = keys.get("max_model_len")
    config_file = Path(model) / "config.json"
    if not isinstance(length, int) or not config_file.is_file():
        return
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # vLLM reports an unreadable config itself
    overrides = keys.get("hf_overrides")
    if isinstance(overrides, str):
        try:
            overrides = json.loads(overrides)
        except ValueError:
            overrides = None
    if isinstance(overrides, dict):
        config = {**config, **overrides}
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    scaled = isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) != "default"
    table = config.get("max_position_embeddings")
    if scaled or not isinstance(table, int) or length <= table:
        return
    raise ValueError(
        f"{field}.max_model_len={length} is past the model's max_position_embeddings={table} "
        "(VLLM_ALLOW_LONG_MAX_MODEL_LEN is set): positions past its RoPE table write NaN into the KV cache, "
        "which later requests read; extend the table with "
        f"{field}.hf_overrides: {{max_position_embeddings: {length}}} (RoPE has no weights) or lower "
        "max_model_len"
    )

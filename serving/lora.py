"""PEFT LoRA adapters served by vLLM: the checks vLLM applies, made before an engine starts, and the zero adapter.

`check_adapter` reads an adapter folder the way vLLM 0.32 does (`vllm/lora/peft_helper.py`,
`vllm/config/lora.py`) and returns every reason vLLM would refuse it, so a bad adapter fails at config
load with its name and field instead of at the first request. Only the safetensors format is accepted:
`adapter_model.bin` is a pickle, and loading a pickle runs code.

`write_zero_adapter` writes an adapter with B = 0 (and A = 0) shaped like another one: its output is
the base model's exactly. moerge serves the base of a LoRA engine through it, because vLLM's CPU LoRA
kernels (`vllm/lora/ops/torch_ops/lora_ops.py`) gather each row's weights with
`lora_weights[row_index]`, and the index of a row without an adapter is -1: in a batch that also holds
adapter rows (the `no_lora` shortcut of `punica_cpu.py` only skips batches made of no-adapter rows
alone), that row gets the weights of the *last* LoRA slot (`max_loras - 1`) added, whichever adapter
sits there. The GPU kernels skip index -1; the CPU ones do not. A base request that is an adapter
request (the zero adapter) never has index -1.
May import: the standard library, safetensors (lazily).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

# vllm/config/lora.py: MaxLoRARanks (tests/test_lora_serving.py checks this against vLLM's own).
ALLOWED_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
# vllm/lora/peft_helper.py `_init_is_supported`: inits that only set the initial weights.
_SUPPORTED_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """The adapter's adapter_config.json; ValueError if it cannot be read."""
    file = Path(path) / CONFIG_FILE
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise ValueError(f"{CONFIG_FILE} not found in {path}") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{file}: not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: not a JSON object")
    return data


def check_adapter(path: str | Path, max_lora_rank: int) -> list[str]:
    """Every reason vLLM would refuse the adapter at `path`, as `field: reason` (empty: servable)."""
    folder = Path(path)
    if not folder.is_dir():
        return [f"path: not a directory: {folder}"]
    problems = []
    pickles = [name for name in PICKLE_FILES if (folder / name).exists()]
    if pickles:
        problems.append(f"path: {', '.join(pickles)} is a pickle and is refused (save it as {WEIGHTS_FILE})")
    if not (folder / WEIGHTS_FILE).is_file():
        problems.append(f"path: {WEIGHTS_FILE} not found in {folder}")
    try:
        cfg = read_adapter_config(folder)
    except ValueError as err:
        return [*problems, f"path: {err}"]
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        problems.append(f"peft_type: {cfg.get('peft_type')!r} is not LORA")
    ranks = {"r": cfg.get("r")}
    ranks.update({f"rank_pattern.{k}": v for k, v in (cfg.get("rank_pattern") or {}).items()})
    for field, rank in ranks.items():
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            problems.append(f"{field}: {rank!r} is not a positive integer")
        elif rank > max_lora_rank:
            problems.append(f"{field}: rank {rank} is greater than max_lora_rank {max_lora_rank}")
    alpha = cfg.get("lora_alpha")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        problems.append(f"lora_alpha: {alpha!r} is not a number")
    if not cfg.get("target_modules"):
        problems.append("target_modules: missing or empty")
    if cfg.get("use_dora"):
        problems.append("use_dora: DoRA is not supported by vLLM")
    if cfg.get("lora_bias"):
        problems.append("lora_bias: LoRA bias is not supported by vLLM")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias: {cfg.get('bias')!r} is not supported (only 'none')")
    if cfg.get("modules_to_save"):
        problems.append(
            f"modules_to_save: {cfg['modules_to_save']} (trained full modules) are not supported by vLLM"
        )
    if cfg.get("trainable_token_indices"):
        problems.append("trainable_token_indices: trained embedding rows are not supported by vLLM")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _SUPPORTED_INITS:
        problems.append(f"init_lora_weights: {init!r} modifies the base weights; vLLM refuses it")
    for field in ("alora_invocation_tokens", "layer_replication", "use_bdlora", "use_qalora"):
        if cfg.get(field):
            problems.append(f"{field}: not supported by vLLM")
    return problems


def write_zero_adapter(source: str | Path, out: str | Path) -> Path:
    """An adapter shaped like `source` with every LoRA weight 0: served, it reproduces the base exactly.

    Written into a temporary folder renamed into place, so a reader never sees half an adapter.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    source, out = Path(source), Path(out)
    cfg = read_adapter_config(source)
    tensors = {}
    with safe_open(str(source / WEIGHTS_FILE), framework="pt") as fh:
        for key in fh.keys():  # noqa: SIM118 - safe_open handles have keys(), no __iter__
            tensors[key] = fh.get_tensor(key).zero_()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    save_file(tensors, str(tmp / WEIGHTS_FILE))
    (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=1))
    (tmp / "moerge_zero_adapter.json").write_text(json.dumps({"shaped_like": str(source)}))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out

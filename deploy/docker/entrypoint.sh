#!/bin/sh
# One image, two roles: `gateway CONFIG [moerge serve options]` or `expert [vllm serve options]`.
# `up TOPOLOGY` runs `moerge up`; anything else is executed as given (e.g. `bash`).
set -e
case "${1:-}" in
  gateway) shift; exec moerge serve "$@" ;;
  # vLLM's OpenAI server module, which `vllm serve` runs (works whichever distribution provides vLLM).
  expert) shift; exec python -m vllm.entrypoints.openai.api_server "$@" ;;
  up) shift; exec moerge up "$@" ;;
  "") exec moerge --help ;;
  *) exec "$@" ;;
esac

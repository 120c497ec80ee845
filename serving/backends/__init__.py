"""Backends: where an expert runs. In-process vLLM engines, or remote OpenAI-compatible servers."""

from serving.backends.base import Backend, BackendUnavailable, JSONResult, StreamResult

__all__ = ["Backend", "BackendUnavailable", "JSONResult", "StreamResult"]

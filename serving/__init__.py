"""serving/: the OpenAI-compatible gateway in front of vLLM backends."""

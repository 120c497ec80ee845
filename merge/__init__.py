"""merge/: homogeneous fine-tunes of one base → one Mixtral-layout MoE checkpoint vLLM loads natively."""

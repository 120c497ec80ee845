"""The demo expert zoo: real SmolLM2-135M experts, their MoE, a heterogeneous expert and a router.

`moerge zoo build` runs the stages in `moerge.zoo.build`; each stage is cached and resumable
(`moerge.zoo.stages`). The layout under OUT is a contract with `bench/quality.py`:
data/{domain}.{train,heldout}.jsonl, base/, experts/{math,code,text}/, moe/, hetero/<name>/, router/,
serve.yaml, manifest.json.
"""

"""The configs the zoo writes for the other tools: the merge recipe, the router config, the serve config.

All paths inside them are relative to OUT (where they are written), so a zoo folder can be moved whole.
"""

from __future__ import annotations

from typing import Any

import yaml

from moerge.zoo.config import ZooConfig
from serving.lora import ALLOWED_RANKS

HEADER = "# Written by `moerge zoo build`; paths are relative to this file.\n"


def dump(data: dict[str, Any], comment: str = "") -> str:
    return HEADER + comment + yaml.safe_dump(data, sort_keys=False, width=110)


def moe_recipe(cfg: ZooConfig) -> dict[str, Any]:
    """base + the dense experts; calibration prompts from each expert's own train split."""
    return {
        "base": "base",
        "experts": [
            {
                "name": name,
                "path": f"experts/{name}",
                "data": [
                    {
                        "path": f"data/{spec.domain}.train.jsonl",
                        "limit": cfg.merge.max_prompts,
                        **({"response_field": "response"} if cfg.merge.calibrate_on_answers else {}),
                    }
                ],
            }
            for name, spec in cfg.finetune.experts.items()
        ],
        "shared": {"method": cfg.merge.shared_method},
        "gate": {
            "init": cfg.merge.gate_init,
            "max_prompts": cfg.merge.max_prompts,
            "max_tokens": cfg.merge.max_tokens,
            "ridge_lambda": cfg.merge.ridge_lambda,
        },
        "experts_per_token": cfg.merge.experts_per_token,
        "dtype": cfg.base.dtype,
    }


def router_config(cfg: ZooConfig) -> dict[str, Any]:
    """Train split files only (holdout fraction 0). With `classes: domains` one class per domain, mapped
    to its served expert by `serve_as`; else one class per served expert, fed by all its domains."""
    stage = cfg.router
    by_domain = stage.classes == "domains"
    if by_domain:
        experts = {
            d: {
                "files": [f"data/{d}.train.jsonl"],
                "holdout": {"fraction": 0.0},
                "max_train": max(2, stage.max_train // len(domains)),
            }
            for domains in stage.served.values()
            for d in domains
        }
        label_map = {d: d for d in experts}
    else:
        experts = {
            name: {
                "files": [f"data/{d}.train.jsonl" for d in domains],
                "holdout": {"fraction": 0.0},
                "max_train": stage.max_train,
                # `base` = knowledge + general: 139 general rows must not drown in 8,000 knowledge rows
                "balance_field": "domain" if stage.balance_domains else None,
            }
            for name, domains in stage.served.items()
        }
        label_map = {d: name for name, domains in stage.served.items() for d in domains}
    serve_as = {d: name for name, domains in stage.served.items() for d in domains} if by_domain else None
    return {
        "kind": cfg.router.kind,
        "seed": 0,
        "experts": experts,
        "encoder": {
            "model": "bundled",
            "max_seq_length": 128,
            "precision": "auto",
            "batch_size": 64,
            "pool_layers": "all" if cfg.router.pool_layers == "all" else None,
        },
        "classifier": {"model": cfg.router.classifier, "C": cfg.router.C, "class_weight": "balanced"},
        "fast_path": {"enabled": cfg.router.fast_path},
        "novelty": {
            "enabled": bool(stage.novelty),
            "quantile": stage.novelty_quantile,
            "classes": stage.novelty or None,
        },
        "policy": {"confidence_floor": 0.3, "fallback": stage.catch_all if by_domain else stage.fallback},
        "all_heads": True,
        "label_field": "domain",
        "label_map": label_map,
        **({"serve_as": serve_as} if serve_as else {}),
    }


def adapter_name(expert: str) -> str:
    """The served name of the zoo's LoRA expert `expert` (`math` → `math-lora`)."""
    return f"{expert}-lora"


def _engine(model: str, description: str, fallback: str, max_len: int) -> dict[str, Any]:
    return {
        "backend": "vllm",
        "model": model,
        "description": description,
        "engine_args": {"max_model_len": max_len, "enforce_eager": True},
        "fallback": fallback,
    }


def _base_and_adapters(cfg: ZooConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(experts, lora): with LoRA experts, the base is a LoRA family's engine that also serves every
    adapter as an expert of its own; with FFN fine-tunes, the base is a plain engine."""
    base = _engine("./base", "SmolLM2-135M-Instruct (dense generalist)", "moe", cfg.serve.max_model_len)
    if cfg.finetune.kind != "lora":
        return {"base": base}, {}
    adapters = {
        adapter_name(name): {
            "path": f"./experts/{name}",
            "description": f"SmolLM2-135M + the {spec.domain} LoRA adapter (unmerged, on the base's engine)",
            "fallback": "base",
        }
        for name, spec in cfg.finetune.experts.items()
    }
    family = {
        "base": base,
        "base_expert": "base",
        "max_lora_rank": min(r for r in ALLOWED_RANKS if r >= cfg.finetune.lora.rank),
        "adapters": adapters,
    }
    return {}, {"smollm2": family}


def serve_config(cfg: ZooConfig) -> dict[str, Any]:
    """In-process vLLM engines for the MoE, the base (with the LoRA experts as adapters on its engine)
    and the hetero expert; `auto` → the learned router (domains → the MoE), `adapters` → the same router
    sending the MoE's domains to their adapters instead, `merge-vs-adapters` → an A/B test of the two."""
    hetero = cfg.hetero.name
    names = ", ".join(cfg.finetune.experts)
    experts: dict[str, Any] = {
        "moe": _engine(
            "./moe",
            f"SmolLM2-135M experts ({names}) merged into one MoE",
            "base",
            cfg.serve.max_model_len,
        ),
    }
    base, lora = _base_and_adapters(cfg)
    experts |= base
    experts[hetero] = _engine(
        f"./hetero/{hetero}",
        "GPT-2 trained from scratch for exact arithmetic (own tokenizer)",
        "base",
        cfg.serve.hetero_max_model_len,
    )
    routers: dict[str, Any] = {
        "learned": {"artifact": "./router", "fallback": cfg.router.fallback},
        "coin": {"kind": "random", "params": {"seed": 0}},
    }
    experiments: dict[str, Any] = {
        "router-ab": {
            "arms": {
                "control": {"router": "coin", "weight": 1},
                "learned": {"router": "learned", "weight": 1},
            },
            "control": "control",
            "assign_by": "user",
        }
    }
    routing_models = {"auto": "learned", "ab": "router-ab"}
    if lora:
        moe_domains = set(cfg.router.served.get("moe", []))
        routers["adapters"] = {
            "artifact": "./router",
            "fallback": cfg.router.fallback,
            "serve_as": {
                spec.domain: adapter_name(name)
                for name, spec in cfg.finetune.experts.items()
                if spec.domain in moe_domains
            },
        }
        experiments["merge-vs-adapters"] = {
            "arms": {
                "merged": {"router": "learned", "weight": 1},
                "adapters": {"router": "adapters", "weight": 1},
            },
            "control": "merged",
            "assign_by": "user",
        }
        routing_models |= {"adapters": "adapters", "merge-vs-adapters": "merge-vs-adapters"}
    out: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": cfg.serve.port, "log_decisions": True},
        "experts": experts,
    }
    if lora:
        out["lora"] = lora
    return out | {"routers": routers, "experiments": experiments, "routing_models": routing_models}


SERVE_COMMENT = """# moerge serve runs/zoo/serve.yaml — `auto` routes with the learned router (math, code, text → the
# merged MoE); `adapters` routes the same way but sends those domains to their LoRA adapters, served
# unmerged on the base's engine; `merge-vs-adapters` A/B tests the two and `ab` the learned router
# against a coin flip (both sticky per OpenAI `user`). Every expert can also be asked by name.
"""

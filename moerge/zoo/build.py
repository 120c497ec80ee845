"""`moerge zoo build`: the stages in order, each cached (see `moerge.zoo.stages`), with progress bars.

data → base → experts/{math,code,text} → moe → hetero/<name> → router → eval → serve.yaml. Heavy
imports happen inside the stages, so a fully cached build finishes in seconds.
May import: moerge.zoo, and merge/ and router/ inside the stages that use them (plus transformers).
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moerge.zoo import serveconf
from moerge.zoo.config import ZooConfig
from moerge.zoo.smollm2 import locate_gguf
from moerge.zoo.splits import read_rows, source_files
from moerge.zoo.stages import Pipeline, Stage, StageResult, digest_outputs, file_sha256

# (description, total) → advance(completed, loss=None); total None: indeterminate.
BarFactory = Callable[[str, int | None], Callable[..., None]]


def _no_bar(_description: str, _total: int | None) -> Callable[..., None]:
    return lambda *args, **kwargs: None


class ZooBuild:
    """One build of the zoo into `out` from `data_dir` with the recipe `cfg`."""

    def __init__(
        self,
        out: Path,
        data_dir: Path,
        cfg: ZooConfig,
        *,
        force: bool = False,
        bar: BarFactory = _no_bar,
        log: Callable[[str], None] = print,
    ) -> None:
        self.out = Path(out).resolve()
        self.data_dir = Path(data_dir)
        self.cfg = cfg
        self.bar = bar
        self.log = log
        self.sources = source_files(self.data_dir)  # fail fast, naming the missing folder or file
        self.gguf = None if cfg.base.checkpoint is not None else (cfg.base.gguf or locate_gguf())
        if cfg.base.checkpoint is not None and not (Path(cfg.base.checkpoint) / "config.json").is_file():
            raise FileNotFoundError(f"base.checkpoint: no config.json in {cfg.base.checkpoint}")
        self.pipeline = Pipeline(self.out, force=force, log=log)

    # ---- stages ----

    def stages(self) -> list[Stage]:
        cfg = self.cfg
        hetero = cfg.hetero.name
        experts = list(cfg.finetune.experts)
        out = [
            Stage(
                "data",
                ["data"],
                {
                    "spec": cfg.data.model_dump(mode="json"),
                    "hetero": hetero,
                    "sources": {d: file_sha256(p) for d, p in self.sources.items()},
                },
                self._data,
            ),
            Stage("base", ["base"], self._base_params(), self._base),
        ]
        tune = cfg.finetune.model_dump(mode="json", exclude={"experts", "threads"})
        for index, (name, spec) in enumerate(cfg.finetune.experts.items()):
            out.append(
                Stage(
                    f"expert:{name}",
                    [f"experts/{name}"],
                    {"domain": spec.domain, "index": index, **tune},
                    functools.partial(self._expert, name=name, index=index),
                    after=["data", "base"],
                )
            )
        expert_stages = [f"expert:{n}" for n in experts]
        out += [
            Stage(
                "moe",
                ["moe", "moe-recipe.yaml"],
                cfg.merge.model_dump(mode="json"),
                self._moe,
                after=["data", "base", *expert_stages],
            ),
            Stage(
                f"hetero:{hetero}",
                [f"hetero/{hetero}"],
                cfg.hetero.model_dump(mode="json", exclude={"threads"}),
                self._hetero,
                after=["data", "base"],
            ),
            Stage(
                "router",
                ["router", "router.yaml"],
                cfg.router.model_dump(mode="json"),
                self._router,
                after=["data"],
            ),
            Stage(
                "eval",
                ["eval/nll.json"],
                cfg.eval.model_dump(mode="json"),
                self._eval,
                after=["data", "base", *expert_stages, "moe"],
            ),
            Stage(
                "serve",
                ["serve.yaml"],
                cfg.serve.model_dump(mode="json"),
                self._serve,
                after=["moe", "base", f"hetero:{hetero}", "router"],
            ),
        ]
        return out

    def run(self) -> dict[str, Any]:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the stages draw their own bars
        hf_logging.set_verbosity_error()
        started = time.perf_counter()
        results: list[StageResult] = []
        for stage in self.stages():
            results.append(self.pipeline.run(stage))
        summary = self.summary(results, round(time.perf_counter() - started, 1))
        self.pipeline.manifest.data["summary"] = summary
        self.pipeline.manifest.save()
        return summary

    # ---- stage bodies: each writes under `tmp` exactly the outputs it declares ----

    def _data(self, tmp: Path) -> dict[str, Any]:
        from moerge.zoo.splits import write_splits

        tick = self.bar("data: split train/held-out", None)
        counts = write_splits(self.data_dir, tmp / "data", self.cfg.data, self.cfg.hetero.name)
        tick(1)
        return {"rows": counts}

    def _base_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"dtype": self.cfg.base.dtype}
        if self.cfg.base.checkpoint is not None:
            params["checkpoint"] = digest_outputs(
                Path(self.cfg.base.checkpoint).parent, [Path(self.cfg.base.checkpoint).name]
            )
        else:
            assert self.gguf is not None
            params["gguf"] = {"name": Path(self.gguf).name, "size": Path(self.gguf).stat().st_size}
        return params

    def _base(self, tmp: Path) -> dict[str, Any]:
        tick = self.bar("base: SmolLM2 GGUF → safetensors", None)
        if self.cfg.base.checkpoint is not None:
            shutil.copytree(self.cfg.base.checkpoint, tmp / "base")
            tick(1)
            return {"source": str(self.cfg.base.checkpoint)}
        from moerge.zoo.smollm2 import dequantise

        (tmp / "base").mkdir()
        info = dequantise(Path(self.gguf), tmp / "base", self.cfg.base.dtype)  # type: ignore[arg-type]
        tick(1)
        return info

    def _expert(self, tmp: Path, name: str, index: int) -> dict[str, Any]:
        from moerge.zoo.finetune import finetune_expert

        spec = self.cfg.finetune
        domain = spec.experts[name].domain
        advance = self.bar(f"expert {name}: fine-tune on {domain}", spec.steps)
        rows = read_rows(self.out / "data" / f"{domain}.train.jsonl")
        return finetune_expert(
            self.out / "base",
            rows,
            tmp / "experts" / name,
            spec,
            seed_offset=index,
            on_step=lambda step, total, loss: advance(step, loss=loss),
        )

    def _moe(self, tmp: Path) -> dict[str, Any]:
        from merge.build import merge_experts
        from merge.recipe import parse_recipe

        recipe_data = serveconf.moe_recipe(self.cfg)
        text = serveconf.dump(
            recipe_data, "# The MoE of the zoo's experts: moerge merge moe-recipe.yaml moe\n"
        )
        (tmp / "moe-recipe.yaml").write_text(text)
        recipe = parse_recipe(recipe_data, base=self.out)
        advance = self.bar("moe: merge experts (layers)", None)
        report = merge_experts(
            recipe,
            tmp / "moe",
            progress=lambda _stage, done, total: advance(done, total=total),
            recipe_text=text,
        )
        keep = (
            "num_experts",
            "experts_per_token",
            "gate_init",
            "shared_method",
            "mean_own_share",
            "unused_experts",
            "seconds",
            "peak_rss_mib",
        )
        return {k: report[k] for k in keep}

    def _hetero(self, tmp: Path) -> dict[str, Any]:
        from moerge.zoo.hetero import arithmetic_accuracy, train_hetero

        spec = self.cfg.hetero
        rows = read_rows(self.out / "data" / f"{spec.name}.train.jsonl")
        held = read_rows(self.out / "data" / f"{spec.name}.heldout.jsonl")
        advance = self.bar(f"hetero {spec.name}: train GPT-2 from scratch", spec.steps)
        folder = tmp / "hetero" / spec.name
        metrics = train_hetero(rows, folder, spec, on_step=lambda step, total, loss: advance(step, loss=loss))
        score = self.bar(f"hetero {spec.name}: exact match vs base", 2)
        metrics["heldout"] = arithmetic_accuracy(folder, held[: spec.eval_rows], max_new_tokens=24)
        score(1)
        metrics["base_heldout"] = arithmetic_accuracy(
            self.out / "base", held[: spec.base_eval_rows], max_new_tokens=32
        )
        score(2)
        return metrics

    def _router(self, tmp: Path) -> dict[str, Any]:
        from router.artifact import load_router
        from router.base import RoutingRequest
        from router.config import parse_config
        from router.train import train_router

        data = serveconf.router_config(self.cfg)
        (tmp / "router.yaml").write_text(
            serveconf.dump(data, "# The zoo's router: moerge router train router.yaml router\n")
        )
        train_cfg = parse_config(data, self.out)
        bars: dict[str, Callable[..., None]] = {}

        def progress(description: str, total: int) -> Callable[[int], None]:
            advance = self.bar(f"router: {description}", total)
            done = [0]

            def step(n: int) -> None:
                done[0] += n
                advance(done[0])

            bars[description] = step
            return step

        info = train_router(train_cfg, tmp / "router", progress=progress, log=lambda m: None)
        router = load_router(tmp / "router")
        label_map = info["label_map"]
        correct, seen, per_domain = 0, 0, {}
        domains = [d for ds in self.cfg.router.served.values() for d in ds]
        score = self.bar("router: held-out accuracy", len(domains))
        for i, domain in enumerate(domains):
            rows = read_rows(self.out / "data" / f"{domain}.heldout.jsonl")[: self.cfg.router.eval_rows]
            decisions = router.decide_batch([RoutingRequest.from_prompt(r["prompt"]) for r in rows])
            hits = sum(d.expert == label_map[domain] for d in decisions)
            per_domain[domain] = round(hits / max(len(rows), 1), 4)
            correct, seen = correct + hits, seen + len(rows)
            score(i + 1)
        return {
            "classes": info["experts"],
            "label_map": label_map,
            "train_rows": info["training"]["train_rows"],
            "validation_accuracy": info["training"]["validation_accuracy"].get("hybrid:features"),
            "heldout_accuracy": round(correct / max(seen, 1), 4),
            "heldout_rows": seen,
            "heldout_accuracy_by_domain": per_domain,
        }

    def _eval(self, tmp: Path) -> dict[str, Any]:
        from moerge.zoo.evaluate import Candidate, improvement_summary, nll_matrix

        experts = self.cfg.finetune.experts
        top_k = self.cfg.merge.experts_per_token
        other = 2 if top_k == 1 else 1
        candidates = [Candidate(n, self.out / "experts" / n) for n in experts]
        candidates.append(Candidate(f"moe-top{top_k}", self.out / "moe", top_k))
        if other <= len(experts):
            candidates.append(Candidate(f"moe-top{other}", self.out / "moe", other))
        domains = ["math", "code", "text", "knowledge", "general"]
        heldout = {d: self.out / "data" / f"{d}.heldout.jsonl" for d in domains}
        advance = self.bar("eval: held-out NLL (batches)", None)
        result = nll_matrix(
            self.out / "base",
            candidates,
            heldout,
            self.cfg.eval,
            self.cfg.finetune.threads,
            tick=lambda done, total: advance(done, total=total),
        )
        own = {n: s.domain for n, s in experts.items()}
        result["expert_vs_base"] = improvement_summary(result["nll"], own)
        result["moe_vs_expert"] = {
            n: {
                "domain": d,
                "expert": result["nll"][n][d],
                **{c.name: result["nll"][c.name][d] for c in candidates if c.name.startswith("moe")},
            }
            for n, d in own.items()
        }
        (tmp / "eval").mkdir()
        (tmp / "eval" / "nll.json").write_text(json.dumps(result, indent=2))
        return result

    def _serve(self, tmp: Path) -> dict[str, Any]:
        data = serveconf.serve_config(self.cfg)
        (tmp / "serve.yaml").write_text(serveconf.dump(data, serveconf.SERVE_COMMENT))
        return {"experts": list(data["experts"]), "routing_models": data["routing_models"]}

    # ---- summary ----

    def summary(self, results: list[StageResult], seconds: float) -> dict[str, Any]:
        stages = self.pipeline.manifest.stages
        metric = lambda name: stages.get(name, {}).get("metrics", {})  # noqa: E731
        hetero = metric(f"hetero:{self.cfg.hetero.name}")
        return {
            "this_run_seconds": seconds,
            "skipped": [r.name for r in results if r.skipped],
            "built": [r.name for r in results if not r.skipped],
            "build_seconds_per_stage": {name: record.get("seconds") for name, record in stages.items()},
            "build_seconds_total": round(sum(float(r.get("seconds", 0)) for r in stages.values()), 1),
            "expert_vs_base": metric("eval").get("expert_vs_base"),
            "moe_vs_expert": metric("eval").get("moe_vs_expert"),
            "hetero_exact_match": hetero.get("heldout", {}).get("exact_match"),
            "base_exact_match": hetero.get("base_heldout", {}).get("exact_match"),
            "router_heldout_accuracy": metric("router").get("heldout_accuracy"),
        }


def build_zoo(
    out: Path,
    data_dir: Path,
    cfg: ZooConfig | None = None,
    *,
    force: bool = False,
    bar: BarFactory = _no_bar,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build (or bring up to date) the zoo under `out`; returns the summary also stored in the manifest."""
    return ZooBuild(out, data_dir, cfg or ZooConfig(), force=force, bar=bar, log=log).run()

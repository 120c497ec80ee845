"""The merge itself: stream N dense experts layer by layer into one MoE (or one dense model).

The MoE class follows from the experts' architecture (`merge/outputs/`): Llama/Mistral → Mixtral,
Qwen2 → Qwen2-MoE (optionally with the base's FFN as shared expert), Qwen3 → Qwen3-MoE. For the Qwen
outputs a layer where every expert's FFN equals the base's stays one dense FFN (`mlp_only_layers`).
Every written checkpoint passes the load-completeness check (`merge/completeness.py`) before it is
put in place.

Memory stays bounded by one decoder layer of every input plus the calibration hidden states: each tensor
is read lazily, merged or copied, written into the current shard, and dropped.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merge.adapter import AdapterCheckpoint, open_expert
from merge.calibration import (
    LayerwiseForward,
    load_calibration_prompts,
    routing_shares,
    tokenize_calibration,
)
from merge.card import hash_inputs_in_background, write_model_card
from merge.checkpoint import TOKENIZER_FILES, CheckpointError, DenseCheckpoint, check_compatible
from merge.completeness import LoadCheck, check_checkpoint
from merge.gates import arrow_gate, arrow_prototype, init_gate
from merge.layout import in_layer_name, is_ffn, layer_of
from merge.methods import kth_smallest_magnitude, merge_task_vectors, merge_tensor, trim_threshold
from merge.outputs import ModelClass, MoEPlan, moe_class_for
from merge.recipe import CALIBRATED_GATES, Recipe, RecipeError
from merge.resources import PeakRSS
from merge.tokenizer import load_tokenizer
from merge.writer import DTYPES, ShardWriter, atomic_output_dir, check_output_dir

FFN_PROJS = ("gate_proj", "up_proj", "down_proj")
CHUNK_ELEMENTS = 4 * 1024 * 1024  # rows of a big matrix merged at once (16 MiB per float32 copy)
BLOCK_ELEMENTS = 128 * 1024  # entries merged at once on the block path: every float32 temporary fits in cache
BLOCK_WORKERS = 4  # threads merging blocks (at most torch's thread count)
BLOCKWISE_METHODS = {"ties", "task_arithmetic"}  # deterministic: the block size cannot change the result
EMBED_NAME = "model.embed_tokens.weight"
UNUSED_SHARE = 0.01  # an expert getting under 1% of a layer's calibration tokens is flagged as unused
Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class MergeInputs:
    """The opened checkpoints a recipe names, checked compatible."""

    base: DenseCheckpoint | None
    experts: list[DenseCheckpoint]

    @property
    def ffn_sources(self) -> list[DenseCheckpoint]:
        return self.experts + ([self.base] if self.base is not None else [])

    @property
    def reference(self) -> DenseCheckpoint:
        return self.experts[0]


def open_inputs(recipe: Recipe) -> MergeInputs:
    """Open the base and every expert (a dense folder or a LoRA adapter of the base), checked compatible."""
    base = DenseCheckpoint.open("base", recipe.base) if recipe.base is not None else None
    experts = [open_expert(e.name, e.path, base) for e in recipe.experts]
    check_compatible(([base] if base else []) + experts)
    return MergeInputs(base=base, experts=experts)


class SharedMerger:
    """Merges one named tensor across the experts with the recipe's method (a fresh float32 tensor)."""

    def __init__(self, recipe: Recipe, inputs: MergeInputs) -> None:
        self.recipe = recipe
        self.inputs = inputs
        self.weights = [e.weight for e in recipe.experts]
        self.generator = torch.Generator().manual_seed(recipe.shared.seed)
        # Blocks are merged on a few threads, each block's ops on one (torch releases the GIL): the same
        # per-block arithmetic, so the same bits, on every core (OpenMP inside each tiny op was 2x slower).
        self.pool = ThreadPoolExecutor(max_workers=min(BLOCK_WORKERS, torch.get_num_threads()))

    def __enter__(self) -> SharedMerger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __call__(self, name: str) -> torch.Tensor:
        shape = self.inputs.reference.shape(name)
        if self._blockwise():
            # One OpenMP thread per op: each block's element-wise ops are too short to split, and on a
            # shared machine every parallel region waits for its slowest thread (2x slower with two).
            with one_thread():
                return self._merge_blocks(name, shape)
        if len(shape) != 2 or shape[0] * shape[1] <= CHUNK_ELEMENTS:
            return self._merge(name, None, None)
        # Big matrices (embeddings, lm_head) are merged in row chunks so that N float32 copies of them
        # never sit in memory together; TIES gets each expert's whole-tensor trim threshold first.
        thresholds = None
        if self.recipe.shared.method == "ties" and self.recipe.shared.density < 1.0:
            base = self.inputs.base
            assert base is not None, "TIES needs the base (checked by the recipe)"
            whole = base.tensor(name)
            thresholds = [
                trim_threshold(e.task_vector(name, whole), self.recipe.shared.density)
                for e in self.inputs.experts
            ]
            del whole
        step = max(1, CHUNK_ELEMENTS // shape[1])
        out = torch.empty(shape, dtype=DTYPES[self.recipe.dtype])
        for start in range(0, shape[0], step):
            rows = (start, min(start + step, shape[0]))
            out[rows[0] : rows[1]] = self._merge(name, rows, thresholds)
        return out

    def _blockwise(self) -> bool:
        """Dense checkpoints merged with a deterministic task-vector method: read every tensor once in its
        stored dtype and merge it in cache-sized blocks (bit for bit the whole-tensor result)."""
        base = self.inputs.base
        return (
            self.recipe.shared.method in BLOCKWISE_METHODS
            and base is not None
            and type(base) is DenseCheckpoint
            and all(type(e) is DenseCheckpoint for e in self.inputs.experts)
        )

    def _merge_blocks(self, name: str, shape: list[int]) -> torch.Tensor:
        spec = self.recipe.shared
        assert self.inputs.base is not None
        base = self.inputs.base.raw(name).reshape(-1)
        experts = [e.raw(name).reshape(-1) for e in self.inputs.experts]
        n = base.numel()
        blocks = [(start, min(start + BLOCK_ELEMENTS, n)) for start in range(0, n, BLOCK_ELEMENTS)]
        thresholds = None
        if spec.method == "ties" and spec.density < 1.0:
            # Each expert's whole-tensor trim threshold (|τ|'s kthvalue), found from |τ| block by block.
            keep = int(round(spec.density * n))
            thresholds = []
            for expert in experts:

                def magnitude(i: int, expert: torch.Tensor = expert) -> torch.Tensor:
                    a, b = blocks[i]
                    return (expert[a:b].float() - base[a:b].float()).abs_()

                thresholds.append(
                    kth_smallest_magnitude(magnitude, len(blocks), n - keep + 1, self.pool.map)
                    if keep > 0
                    else float("inf")
                )
        # Same output dtype as the row-chunked path: big matrices come back in the output dtype.
        big = len(shape) == 2 and shape[0] * shape[1] > CHUNK_ELEMENTS
        out = torch.empty(n, dtype=DTYPES[self.recipe.dtype] if big else torch.float32)

        def merge_block(i: int) -> None:
            a, b = blocks[i]
            base32 = base[a:b].float()
            out[a:b] = merge_task_vectors(
                spec.method,
                [expert[a:b].float() - base32 for expert in experts],
                self.weights,
                base32,
                scale=spec.scale,
                density=spec.density,
                trim_thresholds=thresholds,
            )

        for _ in self.pool.map(merge_block, range(len(blocks))):
            pass
        return out.view(shape)

    def _merge(self, name: str, rows: tuple[int, int] | None, thresholds: list[float] | None) -> torch.Tensor:
        spec = self.recipe.shared
        if spec.method == "linear" or self.inputs.base is None:
            tensors = [e.tensor(name, rows) for e in self.inputs.experts]
            return merge_tensor(
                spec.method, tensors, self.weights, None, scale=spec.scale, density=spec.density
            )
        # Task vectors straight from each expert: a LoRA expert's is s·B·A, not (W + s·B·A) − W.
        base = self.inputs.base.tensor(name, rows)
        taus = [e.task_vector(name, base, rows) for e in self.inputs.experts]
        return merge_task_vectors(
            spec.method,
            taus,
            self.weights,
            base,
            scale=spec.scale,
            density=spec.density,
            generator=self.generator,
            trim_thresholds=thresholds,
        )


@contextmanager
def one_thread() -> Iterator[None]:
    """Run small tensor ops on one thread: on this shared machine a parallel region waits for its slowest
    thread (TIES blocks and Arrow's thin matrix products measured 2-5x slower on two threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def layer_arrow_gate(recipe: Recipe, inputs: MergeInputs, layer: int) -> torch.Tensor:
    """Arrow's data-free gate for one layer: each expert's prototype from its FFN-input task vectors
    (a LoRA expert's exact s·B·A, a full fine-tune's W − W_base); the base, if it joins, gets a zero row."""
    assert inputs.base is not None  # the recipe refuses gate.init=arrow without a base
    names = [f"model.layers.{layer}.mlp.{proj}.weight" for proj in ("gate_proj", "up_proj")]
    base = [inputs.base.tensor(name) for name in names]
    prototypes = []
    with one_thread():
        for expert in inputs.experts:
            deltas = [expert.task_vector(name, b) for name, b in zip(names, base, strict=True)]
            prototypes.append(arrow_prototype(deltas, seed=recipe.gate.seed))
        if recipe.base_as_expert:
            prototypes.append(torch.zeros_like(prototypes[0]))
        return arrow_gate(torch.stack(prototypes), recipe.gate.arrow_temperature, recipe.gate.arrow_mirror)


def _layer_names(names: list[str], layer: int) -> list[str]:
    return [n for n in names if layer_of(n) == layer]


def output_class(recipe: Recipe, inputs: MergeInputs) -> ModelClass:
    """The MoE class the experts' architecture maps to, with the recipe's output options checked against it."""
    arch = inputs.reference.config["architectures"][0]
    try:
        cls = moe_class_for(arch)
    except ValueError as err:
        raise CheckpointError(f"{inputs.reference.name}: {err}") from err
    if recipe.output.shared_expert != "none" and not cls.supports_shared_expert:
        raise RecipeError(
            f"output.shared_expert={recipe.output.shared_expert}: the output class {cls.architecture} "
            f"(for {arch} experts) has no shared expert; only Qwen2MoeForCausalLM has one"
        )
    return cls


def _read_ffn(src: DenseCheckpoint, layer: int) -> dict[str, torch.Tensor]:
    """One layer's FFN: a dense checkpoint's in its stored dtype (copied through as is, no float32 copy),
    a LoRA expert's as float32 (base + s·B·A)."""
    read = src.raw if type(src) is DenseCheckpoint else src.tensor
    return {p: read(f"model.layers.{layer}.mlp.{p}.weight") for p in FFN_PROJS}


def _same_ffn(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(
        torch.equal(a[p], b[p]) if a[p].dtype == b[p].dtype else torch.equal(a[p].float(), b[p].float())
        for p in FFN_PROJS
    )


@dataclass
class MergePlan:
    """What a merge writes, fixed before the first tensor is read: the inputs, the output class and sizes."""

    recipe: Recipe
    inputs: MergeInputs
    cls: ModelClass
    dense: bool
    names: list[str]  # every tensor name of the reference expert
    layers: int
    hidden: int
    expert_labels: list[str]  # the recipe's experts, then "base" if it joins as one
    shared_expert: bool  # the base's FFN is each layer's shared expert
    wants_base_ffn: bool  # the base's FFN is read in every layer (shared expert, or dense-layer detection)
    mirrored: bool  # Arrow with mirrored experts: each expert is written twice, under +v and −v

    @property
    def num_experts(self) -> int:
        return self.recipe.num_experts

    @property
    def routed_experts(self) -> int:
        return self.num_experts * (2 if self.mirrored else 1)


def plan_merge(recipe: Recipe, dense: bool) -> MergePlan:
    """Open and check the inputs and fix the output's class and options (step 1 of a merge)."""
    inputs = open_inputs(recipe)
    ref = inputs.reference
    cls = output_class(recipe, inputs)
    shared_expert = recipe.output.shared_expert == "base"
    if not dense and recipe.gate.init in CALIBRATED_GATES and not _has_data(recipe):
        raise ValueError(f"gate.init={recipe.gate.init} needs calibration data")
    return MergePlan(
        recipe=recipe,
        inputs=inputs,
        cls=cls,
        dense=dense,
        names=list(ref.weight_map),
        layers=int(ref.value("num_hidden_layers")),
        hidden=int(ref.value("hidden_size")),
        expert_labels=recipe.expert_names + (["base"] if recipe.base_as_expert else []),
        shared_expert=shared_expert,
        wants_base_ffn=shared_expert or (cls.supports_dense_layers and recipe.output.dense_unchanged_layers),
        mirrored=not dense and recipe.gate.init == "arrow" and recipe.gate.arrow_mirror,
    )


def _has_data(recipe: Recipe) -> bool:
    return any(e.data or e.positive_prompts for e in recipe.experts)


def start_calibration(plan: MergePlan) -> LayerwiseForward | None:
    """The layer-by-layer forward over every expert's calibration prompts, or None for a merge without
    them (a dense merge, or data-free gates)."""
    recipe = plan.recipe
    if plan.dense or not _has_data(recipe):
        return None
    ref = plan.inputs.reference
    prompts = load_calibration_prompts(recipe.experts, recipe.gate.max_prompts)
    calibration = tokenize_calibration(
        load_tokenizer(ref.path), prompts, recipe.gate.max_tokens, recipe.gate.use_chat_template
    )
    compute = torch.float32 if recipe.dtype == "float32" else torch.bfloat16
    return LayerwiseForward(ref.config, calibration, compute)


class Gates:
    """Each layer's router matrix, by the recipe's `gate.init`: Arrow's from the weights, cheap_embed's once
    from the token embeddings, the others fitted on the layer's FFN inputs (or data-free: random, uniform)."""

    def __init__(self, plan: MergePlan, forward: LayerwiseForward | None) -> None:
        self.plan = plan
        self.spec = plan.recipe.gate
        self.forward = forward
        self.rng = torch.Generator().manual_seed(self.spec.seed)
        self.from_embeddings: torch.Tensor | None = None

    def at_embeddings(self, embed: torch.Tensor) -> None:
        """Start the calibration forward at the merged embeddings (cheap_embed's gate is fitted there)."""
        if self.forward is None:
            return
        features = self.forward.embed(embed)
        if self.spec.init == "cheap_embed":
            self.from_embeddings = self._fit(features)

    def for_layer(self, layer: int, ffn_inputs: torch.Tensor | None) -> torch.Tensor:
        """The gate of `layer`, whose FFN inputs are `ffn_inputs` (None without calibration data)."""
        if self.spec.init == "arrow":
            return layer_arrow_gate(self.plan.recipe, self.plan.inputs, layer)
        if self.from_embeddings is not None:
            return self.from_embeddings
        return self._fit(ffn_inputs)

    def _fit(self, x: torch.Tensor | None) -> torch.Tensor:
        if x is None:  # data-free inits only look at the hidden size
            x, labels = torch.zeros(1, self.plan.hidden), torch.zeros(1, dtype=torch.long)
        else:
            assert self.forward is not None
            labels = self.forward.cal.token_labels
        return init_gate(
            self.spec.init,
            x,
            labels,
            self.plan.num_experts,
            ridge_lambda=self.spec.ridge_lambda,
            generator=self.rng,
        )


@dataclass
class LayerOutcome:
    """What the per-layer loop found: the layers kept dense and each routed layer's gate statistics."""

    dense_layers: list[int]
    gate_stats: list[dict[str, Any]]


def write_tensors(plan: MergePlan, gates: Gates, writer: ShardWriter, tick: Progress) -> LayerOutcome:
    """Steps 2-4: the embeddings, then each layer's shared weights, FFNs and gate, then the rest."""
    with SharedMerger(plan.recipe, plan.inputs) as merger:
        return _write_all(plan, gates, writer, tick, merger)


def _write_all(
    plan: MergePlan, gates: Gates, writer: ShardWriter, tick: Progress, merger: SharedMerger
) -> LayerOutcome:
    embed = merger(EMBED_NAME)
    writer.add(EMBED_NAME, embed)
    gates.at_embeddings(embed)
    del embed
    outcome = LayerOutcome(dense_layers=[], gate_stats=[])
    for layer in range(plan.layers):
        tick("layers", layer, plan.layers)
        in_layer = _layer_names(plan.names, layer)
        shared = {}
        for name in in_layer:
            if not is_ffn(name):
                shared[in_layer_name(name)] = merger(name)
                writer.add(name, shared[in_layer_name(name)])
        if plan.dense:
            for name in in_layer:
                if is_ffn(name):
                    writer.add(name, merger(name))
        else:
            write_moe_ffn(plan, layer, shared, gates, writer, outcome)
        del shared
    if not plan.dense and len(outcome.dense_layers) == plan.layers:
        raise RecipeError(
            "every layer's expert FFNs equal the base's: an MoE would route between identical "
            "experts; write a dense merge (--dense) or set output.dense_unchanged_layers: false"
        )
    tick("layers", plan.layers, plan.layers)
    for name in plan.names:
        if layer_of(name) is None and name != EMBED_NAME:
            writer.add(name, merger(name))
    writer.close()
    return outcome


@dataclass
class LayerFFNs:
    """One MoE layer's FFN tensors as written: routed experts, optional shared expert and its gate."""

    routed: list[dict[str, torch.Tensor]]
    shared: dict[str, torch.Tensor] | None
    shared_gate: torch.Tensor | None


def write_moe_ffn(
    plan: MergePlan,
    layer: int,
    shared: dict[str, torch.Tensor],
    gates: Gates,
    writer: ShardWriter,
    outcome: LayerOutcome,
) -> None:
    """One layer's FFN part of an MoE: kept dense where every expert has the base's FFN, else the routed
    experts (run through the calibration forward with the layer's gate) and the gate."""
    recipe, cls, forward = plan.recipe, plan.cls, gates.forward
    ffns = [_read_ffn(src, layer) for src in plan.inputs.ffn_sources[: plan.num_experts]]
    base = plan.inputs.base
    base_ffn = _read_ffn(base, layer) if base is not None and plan.wants_base_ffn else None
    if (
        base_ffn is not None
        and cls.supports_dense_layers
        and recipe.output.dense_unchanged_layers
        and all(_same_ffn(ffn, base_ffn) for ffn in ffns[: len(recipe.experts)])
    ):
        outcome.dense_layers.append(layer)  # every expert kept the base's FFN here: no routing needed
        for proj, tensor in base_ffn.items():
            writer.add(cls.dense_ffn_name(layer, proj), tensor, finite=type(base) is DenseCheckpoint)
        if forward is not None:
            forward.attention(shared)
            forward.dense(base_ffn)
        return
    parts = _layer_ffns(plan, ffns, base_ffn)
    if forward is not None:
        gate = gates.for_layer(layer, forward.attention(shared))
        top1 = forward.route(gate, parts.routed, recipe.experts_per_token, parts.shared, parts.shared_gate)
        labels = forward.cal.token_labels
        outcome.gate_stats.append(_layer_stat(layer, top1 % plan.num_experts, labels, plan.expert_labels))
    else:
        gate = gates.for_layer(layer, None)
    writer.add(cls.gate_name(layer), gate)
    # Tensors copied through from dense checkpoints were checked for NaN/Inf when read (`raw`).
    sources = plan.inputs.ffn_sources[: plan.num_experts]
    as_read = {
        id(t)
        for src, ffn in zip(sources, ffns, strict=True)
        if type(src) is DenseCheckpoint
        for t in ffn.values()
    }
    for e, ffn in enumerate(parts.routed):
        for proj, tensor in ffn.items():
            writer.add(cls.expert_name(layer, e, proj), tensor, finite=id(tensor) in as_read)
    if parts.shared is not None:
        for proj, tensor in parts.shared.items():
            writer.add(cls.shared_expert_name(layer, proj), tensor)
    if parts.shared_gate is not None:
        writer.add(cls.shared_gate_name(layer), parts.shared_gate)


def _layer_ffns(
    plan: MergePlan, ffns: list[dict[str, torch.Tensor]], base_ffn: dict[str, torch.Tensor] | None
) -> LayerFFNs:
    """The routed experts (scaled by 1-β beside a shared expert; twice over when mirrored) and the shared
    expert with its gate."""
    shared_ffn, shared_gate = None, None
    if plan.shared_expert and base_ffn is not None:
        # Each token's FFN output = (1-β)·routed experts + β·base FFN at init: the shared expert
        # gate is 0 (sigmoid = 1/2), so the base's down projection carries 2β, the experts' 1-β.
        beta = plan.recipe.output.shared_expert_weight
        shared_ffn = {**base_ffn, "down_proj": base_ffn["down_proj"].float() * (2 * beta)}
        ffns = [{**f, "down_proj": f["down_proj"].float() * (1 - beta)} for f in ffns]
    if plan.cls.shared_gate_always or shared_ffn is not None:
        shared_gate = torch.zeros(1, plan.hidden)
    if plan.mirrored:
        ffns = ffns + ffns  # the same tensors, written twice: expert i and i + N
    return LayerFFNs(routed=ffns, shared=shared_ffn, shared_gate=shared_gate)


def finish_checkpoint(tmp: Path, plan: MergePlan, outcome: LayerOutcome) -> LoadCheck:
    """Step 5: config.json, the load-completeness check, the tokenizer."""
    ref, recipe = plan.inputs.reference, plan.recipe
    moe = MoEPlan(
        num_experts=plan.routed_experts,
        experts_per_token=recipe.experts_per_token,
        dtype=recipe.dtype,
        dense_layers=tuple(outcome.dense_layers),
        shared_expert_intermediate_size=int(ref.value("intermediate_size")) if plan.shared_expert else 0,
    )
    _write_config(tmp, ref, recipe, plan.dense, plan.cls, moe)
    check = check_checkpoint(tmp)
    check.raise_if_incomplete()
    _copy_tokenizer(ref.path, tmp)
    return check


def merge_report(
    plan: MergePlan,
    outcome: LayerOutcome,
    check: LoadCheck,
    writer: ShardWriter,
    inputs: dict[str, dict[str, str]],
) -> dict[str, Any]:
    """Step 6: what was written and how the gates route the calibration tokens (no timing yet)."""
    recipe, dense, stats = plan.recipe, plan.dense, outcome.gate_stats
    layer_shared = [n for n in plan.names if n.startswith("model.layers.") and not is_ffn(n)]
    report: dict[str, Any] = {
        "mode": "dense" if dense else "moe",
        "architecture": check.architecture,
        "dense_layers": [] if dense else outcome.dense_layers,
        "shared_expert": None if dense else recipe.output.shared_expert,
        "experts": plan.expert_labels,
        "lora_experts": [e.name for e in plan.inputs.experts if isinstance(e, AdapterCheckpoint)],
        "num_experts": 1 if dense else plan.num_experts,
        "routed_experts": 1 if dense else plan.routed_experts,
        "experts_per_token": recipe.experts_per_token,
        "shared_method": recipe.shared.method,
        "gate_init": None if dense else recipe.gate.init,
        "dtype": recipe.dtype,
        "layers": plan.layers,
        "shared_tensors_per_layer": len(layer_shared) // max(plan.layers, 1),
        "output_bytes": writer.total_bytes,
        "gate_stats": stats,
        "unused_experts": sorted({u for s in stats for u in s["unused"]}),
        "mean_own_share": _mean_own_share(stats, plan.expert_labels),
    }
    report["load_check"] = {k: v for k, v in check.summary().items() if k != "problems"}
    report["inputs"] = inputs
    return report


def merge_experts(
    recipe: Recipe,
    out_dir: Path,
    *,
    dense: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    recipe_text: str | None = None,
) -> dict[str, Any]:
    """Merge `recipe` into `out_dir` atomically; returns the merge report (also written as merge-report.json).

    The steps: open and check the inputs (`plan_merge`), start the calibration forward, write every tensor
    layer by layer (`write_tensors`: shared weights, expert FFNs, gates), finish the checkpoint (config,
    load check, tokenizer), then the report; the folder is put in place only once all of it succeeded.
    """
    out_dir = Path(out_dir).resolve()
    check_output_dir(out_dir, overwrite)
    started = time.perf_counter()
    tick = progress or (lambda stage, done, total: None)
    with PeakRSS() as rss:
        plan = plan_merge(recipe, dense)
        hashes = hash_inputs_in_background(recipe)  # the inputs are checked: hash them beside the merge
        gates = Gates(plan, start_calibration(plan))
        with atomic_output_dir(out_dir, overwrite) as tmp:
            writer = ShardWriter(tmp, recipe.dtype)
            outcome = write_tensors(plan, gates, writer, tick)
            check = finish_checkpoint(tmp, plan, outcome)
            report = merge_report(plan, outcome, check, writer, hashes())
            report["seconds"] = round(time.perf_counter() - started, 3)
            report["peak_rss_mib"] = round(rss.peak_mib, 1)  # the peak up to the report, as written in it
            report["rss_before_mib"] = round(rss.start_mib, 1)
            (tmp / "merge-report.json").write_text(json.dumps(report, indent=2))
            write_model_card(tmp, recipe, report, recipe_text)
    return report


def _layer_stat(layer: int, top1: torch.Tensor, labels: torch.Tensor, experts: list[str]) -> dict[str, Any]:
    shares = routing_shares(top1, labels, len(experts))
    counts = torch.bincount(top1[labels >= 0], minlength=len(experts)).float()
    load = (counts / counts.sum().clamp_min(1)).tolist()
    return {
        "layer": layer,
        "own_share": {e: round(shares[i][i], 4) for i, e in enumerate(experts)},
        "share_matrix": [[round(v, 4) for v in row] for row in shares],
        "load": {e: round(load[i], 4) for i, e in enumerate(experts)},
        "unused": [e for i, e in enumerate(experts) if load[i] < UNUSED_SHARE],
    }


def _mean_own_share(stats: list[dict[str, Any]], experts: list[str]) -> dict[str, float]:
    if not stats:
        return {}
    return {e: round(sum(s["own_share"][e] for s in stats) / len(stats), 4) for e in experts}


def _write_config(
    tmp: Path, ref: DenseCheckpoint, recipe: Recipe, dense: bool, cls: ModelClass, plan: MoEPlan
) -> None:
    if dense:
        config = dict(ref.config)
        config["dtype"] = recipe.dtype
        config.pop("torch_dtype", None)
    else:
        assert cls.build_config is not None
        config = cls.build_config(ref.config, plan)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)

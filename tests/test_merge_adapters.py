"""PEFT LoRA adapters as merge inputs: the same MoE as their peft-materialised checkpoints, and every refusal.

The adapters are made by the real `peft` library on a tiny random-init Llama (head_dim 64); the full
checkpoints they are compared with are peft's own `merge_and_unload` of the same adapters.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from merge.adapter import AdapterCheckpoint, open_expert
from merge.build import merge_experts
from merge.checkpoint import CheckpointError, DenseCheckpoint
from merge.recipe import Recipe
from merge.tiny import TINY_DOMAINS, build_tokenizer, domain_prompts, tiny_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# One plain adapter, one rsLoRA adapter, one with per-module ranks and alphas.
LORA_SETTINGS: dict[str, dict[str, Any]] = {
    "math": {"r": 4, "lora_alpha": 8},
    "code": {"r": 8, "lora_alpha": 16, "use_rslora": True},
    "text": {"r": 4, "lora_alpha": 4, "rank_pattern": {"q_proj": 8}, "alpha_pattern": {"down_proj": 16}},
}


@dataclass(frozen=True)
class LoraZoo:
    base: Path
    adapters: dict[str, Path]
    full: dict[str, Path]  # peft's merge_and_unload of each adapter, saved as a full checkpoint
    data: dict[str, Path]


def make_adapter(base: Path, out: Path, seed: int, **settings: Any) -> None:
    """A real peft adapter with random non-zero A and B (B starts at zero in peft: perturbed here)."""
    model = LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(target_modules=TARGETS, **settings))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(str(out))


def peft_merged(base: Path, adapter: Path) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    assert isinstance(merged, LlamaForCausalLM)
    return merged


@pytest.fixture(scope="module")
def lora_zoo(tmp_path_factory: pytest.TempPathFactory) -> LoraZoo:
    root = tmp_path_factory.mktemp("lora-zoo")
    tok = build_tokenizer(root / "base")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config(len(tok))).save_pretrained(str(root / "base"))
    adapters, full, data = {}, {}, {}
    for seed, (domain, settings) in enumerate(LORA_SETTINGS.items()):
        adapters[domain] = root / f"lora-{domain}"
        make_adapter(root / "base", adapters[domain], seed, **settings)
        full[domain] = root / f"full-{domain}"
        peft_merged(root / "base", adapters[domain]).save_pretrained(str(full[domain]))
        tok.save_pretrained(full[domain])
        data[domain] = root / f"{domain}.jsonl"
        rows = [json.dumps({"prompt": p}) for p in domain_prompts(domain, 24, seed=1)]
        data[domain].write_text("\n".join(rows) + "\n")
    return LoraZoo(base=root / "base", adapters=adapters, full=full, data=data)


def recipe(zoo: LoraZoo, paths: dict[str, Path], **overrides: Any) -> Recipe:
    raw: dict[str, Any] = {
        "base": str(zoo.base),
        "experts": [
            {"name": d, "path": str(paths[d]), "data": [{"path": str(zoo.data[d]), "limit": 16}]}
            for d in TINY_DOMAINS
        ],
        "shared": {"method": "ties", "seed": 3},
        "gate": {"init": "random", "seed": 5},
        "dtype": "float32",
    }
    raw.update(overrides)
    return Recipe.model_validate(raw)


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def assert_same_moe(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], shared_tol: float) -> None:
    assert got.keys() == want.keys()
    for key in want:
        if ".experts." in key or ".gate." in key:
            # FFN experts: W + (B·A)·s computed as peft computes it, float32: bit for bit.
            assert torch.equal(got[key], want[key]), (key, (got[key] - want[key]).abs().max())
        else:
            # Shared tensors: the adapter's task vector is s·B·A itself; the full checkpoint's is
            # (W + s·B·A) − W, which differs from it by float32 rounding of W.
            diff = (got[key].float() - want[key].float()).abs().max().item()
            assert diff <= shared_tol, (key, diff)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "task_arithmetic", "linear"])
def test_adapters_merge_like_their_peft_materialised_checkpoints(
    lora_zoo: LoraZoo, tmp_path: Path, method: str
) -> None:
    shared = {"method": method, "seed": 3, "density": 0.7}
    merge_experts(recipe(lora_zoo, lora_zoo.adapters, shared=shared), tmp_path / "lora")
    merge_experts(recipe(lora_zoo, lora_zoo.full, shared=shared), tmp_path / "full")
    got, want = read_all(tmp_path / "lora"), read_all(tmp_path / "full")
    assert_same_moe(got, want, shared_tol=1e-6)
    # The adapters changed the shared tensors (the comparison is not between two copies of the base).
    base = load_file(str(lora_zoo.base / "model.safetensors"))
    q = "model.layers.1.self_attn.q_proj.weight"
    assert (got[q] - base[q]).abs().max() > 1e-3


def test_dense_merge_of_adapters_matches_full_checkpoints(lora_zoo: LoraZoo, tmp_path: Path) -> None:
    merge_experts(recipe(lora_zoo, lora_zoo.adapters), tmp_path / "lora", dense=True)
    merge_experts(recipe(lora_zoo, lora_zoo.full), tmp_path / "full", dense=True)
    got, want = read_all(tmp_path / "lora"), read_all(tmp_path / "full")
    assert got.keys() == want.keys() and any(".mlp." in k for k in got)
    for key in want:
        assert (got[key] - want[key]).abs().max() <= 1e-6, key


@pytest.fixture(scope="module")
def bf16_zoo(lora_zoo: LoraZoo, tmp_path_factory: pytest.TempPathFactory) -> tuple[LoraZoo, dict[str, Path]]:
    """The same adapters on a bfloat16 copy of the base: peft's bf16 checkpoints, and exact float32 ones."""
    root = tmp_path_factory.mktemp("lora-bf16")
    base = root / "base"
    LlamaForCausalLM.from_pretrained(str(lora_zoo.base), dtype=torch.bfloat16).save_pretrained(str(base))
    full16, full32 = {}, {}
    for domain, adapter in lora_zoo.adapters.items():
        for folder, dtype in ((full16, torch.bfloat16), (full32, torch.float32)):
            folder[domain] = root / f"full-{domain}-{str(dtype).split('.')[-1]}"
            model = LlamaForCausalLM.from_pretrained(str(base), dtype=dtype)
            PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().save_pretrained(
                str(folder[domain])
            )
    for folder in (base, *full16.values(), *full32.values()):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(lora_zoo.base / name, folder / name)
    return LoraZoo(base=base, adapters=lora_zoo.adapters, full=full16, data=lora_zoo.data), full32


@pytest.mark.parametrize("method", ["ties", "dare_ties", "linear"])
def test_bfloat16_merge_is_the_exact_merge_rounded_once(
    bf16_zoo: tuple[LoraZoo, dict[str, Path]], tmp_path: Path, method: str
) -> None:
    """On a bf16 base: adapters give the float32 merge of exact W + s·B·A rounded once to bf16, bit for
    bit; peft's bf16 checkpoints (W + s·B·A already rounded, τ recovered from rounded weights) are further off.
    """
    zoo, full32 = bf16_zoo
    shared = {"method": method, "seed": 3}
    merge_experts(recipe(zoo, zoo.adapters, dtype="bfloat16", shared=shared), tmp_path / "lora")
    merge_experts(recipe(zoo, zoo.full, dtype="bfloat16", shared=shared), tmp_path / "full16")
    merge_experts(recipe(zoo, full32, dtype="float32", shared=shared), tmp_path / "exact")
    got, full16, exact = (read_all(tmp_path / n) for n in ("lora", "full16", "exact"))
    err_lora = err_full = 0.0
    for key, want in exact.items():
        assert got[key].dtype == torch.bfloat16
        assert torch.equal(got[key], want.to(torch.bfloat16)), (key, (got[key].float() - want).abs().max())
        err_lora += (got[key].float() - want).abs().sum().item()
        err_full += (full16[key].float() - want).abs().sum().item()
    assert err_lora < err_full


def test_a_recipe_mixing_adapters_and_a_full_checkpoint(lora_zoo: LoraZoo, tmp_path: Path) -> None:
    mixed = dict(lora_zoo.adapters, code=lora_zoo.full["code"])
    ridge = {"init": "ridge", "max_prompts": 16}
    report = merge_experts(recipe(lora_zoo, mixed, gate=ridge), tmp_path / "mixed")
    merge_experts(recipe(lora_zoo, lora_zoo.full, gate=ridge), tmp_path / "full")
    got, want = read_all(tmp_path / "mixed"), read_all(tmp_path / "full")
    for key in want:
        if ".experts." in key:
            assert torch.equal(got[key], want[key]), key
        else:  # shared tensors to rounding; gates fitted on hidden states computed from them
            assert torch.allclose(got[key], want[key], atol=1e-4, rtol=1e-4), (
                key,
                (got[key] - want[key]).abs().max(),
            )
    assert report["lora_experts"] == ["math", "text"]
    assert set(report["inputs"]) == {"base", "math", "code", "text", "data"}
    assert "adapter_config.json" in report["inputs"]["math"]
    assert "adapter_model.safetensors" in report["inputs"]["math"]


@pytest.mark.parametrize("domain", list(LORA_SETTINGS))
def test_every_tensor_equals_peft_merge(lora_zoo: LoraZoo, domain: str) -> None:
    """Scale α/r, rsLoRA's α/√r, rank_pattern and alpha_pattern, exactly as peft merges them."""
    base = DenseCheckpoint.open("base", lora_zoo.base)
    adapter = open_expert(domain, lora_zoo.adapters[domain], base)
    assert isinstance(adapter, AdapterCheckpoint)
    want = peft_merged(lora_zoo.base, lora_zoo.adapters[domain]).state_dict()
    for key in base.weight_map:
        assert torch.equal(adapter.tensor(key), want[key]), key
    settings = LORA_SETTINGS[domain]
    down = adapter.factors["model.layers.0.mlp.down_proj.weight"]
    q = adapter.factors["model.layers.0.self_attn.q_proj.weight"]
    if settings.get("use_rslora"):
        assert down.scale == pytest.approx(16 / math.sqrt(8))
    if settings.get("rank_pattern"):
        assert q.scale == pytest.approx(4 / 8) and down.scale == pytest.approx(16 / 4)


def test_task_vector_is_exactly_s_b_a_and_untouched_tensors_are_the_base(lora_zoo: LoraZoo) -> None:
    base = DenseCheckpoint.open("base", lora_zoo.base)
    adapter = open_expert("code", lora_zoo.adapters["code"], base)
    key = "model.layers.1.mlp.up_proj.weight"
    prefix = "base_model.model.model.layers.1.mlp.up_proj"
    with safe_open(str(lora_zoo.adapters["code"] / "adapter_model.safetensors"), framework="pt") as fh:
        a, b = fh.get_tensor(f"{prefix}.lora_A.weight"), fh.get_tensor(f"{prefix}.lora_B.weight")
    assert torch.equal(adapter.task_vector(key, base.tensor(key)), (b @ a) * (16 / math.sqrt(8)))
    # A row chunk (big tensors are merged in chunks) is B[rows]·A: a smaller GEMM, whose kernel may sum
    # the r products in another order (float32 rounding, far below bf16's).
    chunk = adapter.task_vector(key, base.tensor(key, (3, 9)), (3, 9))
    want = ((b @ a) * (16 / math.sqrt(8)))[3:9]
    assert (chunk - want).abs().max() <= 1e-5 * want.abs().max()
    norm = "model.layers.1.input_layernorm.weight"
    assert torch.equal(adapter.tensor(norm), base.tensor(norm))
    assert not adapter.task_vector(norm, base.tensor(norm)).any()


def test_fan_in_fan_out_is_honoured_as_peft_does(
    lora_zoo: LoraZoo, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """peft resets fan_in_fan_out to false for nn.Linear (Llama stores [out, in]) and merges B·A as is."""
    adapter = copy_adapter(lora_zoo, tmp_path, lambda c: c.update(fan_in_fan_out=True))
    base = DenseCheckpoint.open("base", lora_zoo.base)
    with caplog.at_level(logging.WARNING, logger="merge.adapter"):
        opened = open_expert("fifo", adapter, base)
    assert "fan_in_fan_out=true" in caplog.text
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        want = peft_merged(lora_zoo.base, adapter).state_dict()
    for key in base.weight_map:
        assert torch.equal(opened.tensor(key), want[key]), key


def copy_adapter(
    zoo: LoraZoo,
    tmp_path: Path,
    config_edit: Callable[[dict[str, Any]], Any] | None = None,
    tensor_edit: Callable[[dict[str, torch.Tensor]], Any] | None = None,
    domain: str = "math",
) -> Path:
    dst = tmp_path / f"bad-{domain}"
    shutil.copytree(zoo.adapters[domain], dst)
    if config_edit is not None:
        config = json.loads((dst / "adapter_config.json").read_text())
        config_edit(config)
        (dst / "adapter_config.json").write_text(json.dumps(config))
    if tensor_edit is not None:
        tensors = load_file(str(dst / "adapter_model.safetensors"))
        tensor_edit(tensors)
        save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


def merge_expecting(zoo: LoraZoo, tmp_path: Path, adapter: Path, *needles: str) -> None:
    paths = dict(zoo.adapters, math=adapter)
    with pytest.raises(CheckpointError) as info:
        merge_experts(recipe(zoo, paths), tmp_path / "out")
    message = str(info.value)
    assert message.startswith("math: "), message
    for needle in needles:
        assert needle in message, (needle, message)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


LAYER0_Q = "base_model.model.model.layers.0.self_attn.q_proj"


def _rename_q(tensors: dict[str, torch.Tensor]) -> None:
    for which in ("A", "B"):
        tensors[f"{LAYER0_Q}x.lora_{which}.weight"] = tensors.pop(f"{LAYER0_Q}.lora_{which}.weight")


def _widen_a(tensors: dict[str, torch.Tensor]) -> None:
    a = tensors[f"{LAYER0_Q}.lora_A.weight"]
    tensors[f"{LAYER0_Q}.lora_A.weight"] = torch.zeros(a.shape[0], a.shape[1] + 1)


REFUSALS: list[tuple[str, Any, Any, tuple[str, ...]]] = [
    ("peft_type", lambda c: c.update(peft_type="IA3"), None, ("peft_type='IA3'", "LORA")),
    ("dora", lambda c: c.update(use_dora=True), None, ("use_dora=True", "DoRA")),
    ("lora_bias", lambda c: c.update(lora_bias=True), None, ("lora_bias=True",)),
    ("bias", lambda c: c.update(bias="all"), None, ("bias='all'",)),
    ("modules_to_save", lambda c: c.update(modules_to_save=["lm_head"]), None, ("modules_to_save",)),
    (
        "trainable_tokens",
        lambda c: c.update(trainable_token_indices=[1, 2]),
        None,
        ("trainable_token_indices",),
    ),
    ("pissa", lambda c: c.update(init_lora_weights="pissa"), None, ("init_lora_weights='pissa'",)),
    ("unknown_field", lambda c: c.update(future_variant={"on": True}), None, ("future_variant",)),
    ("rank", lambda c: c.update(r=8), None, ("at r=8", "lora_A [4, 256]")),
    ("alpha", lambda c: c.update(lora_alpha=float("nan")), None, ("lora_alpha=nan",)),
    (
        "target_modules",
        lambda c: c.update(target_modules=[*TARGETS, "foo_proj"]),
        None,
        ("target_modules", "foo_proj"),
    ),
    (
        "missing_module",
        None,
        _rename_q,
        ("target module model.layers.0.self_attn.q_projx", "not in the base"),
    ),
    ("shape", None, _widen_a, ("model.layers.0.self_attn.q_proj", "[4, 129]", "do not fit")),
    (
        "nan",
        None,
        lambda t: t[f"{LAYER0_Q}.lora_B.weight"].__setitem__((0, 0), float("nan")),
        (f"{LAYER0_Q}.lora_B.weight", "NaN"),
    ),
    (
        "embeddings",
        None,
        lambda t: t.update({"base_model.model.model.embed_tokens.weight": torch.zeros(4, 128)}),
        ("embed_tokens", "trained embeddings"),
    ),
    (
        "embedding_lora",
        None,
        lambda t: t.update({"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 512)}),
        ("lora_embedding_A", "trained embeddings"),
    ),
    (
        "dora_vector",
        None,
        lambda t: t.update({f"{LAYER0_Q}.lora_magnitude_vector": torch.ones(128)}),
        ("lora_magnitude_vector", "DoRA"),
    ),
    (
        "unpaired",
        None,
        lambda t: t.pop(f"{LAYER0_Q}.lora_B.weight"),
        ("no lora_B for module model.layers.0.self_attn.q_proj",),
    ),
]


@pytest.mark.parametrize(
    ("config_edit", "tensor_edit", "needles"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_bad_adapter_is_refused_naming_the_field(
    lora_zoo: LoraZoo, tmp_path: Path, config_edit: Any, tensor_edit: Any, needles: tuple[str, ...]
) -> None:
    merge_expecting(lora_zoo, tmp_path, copy_adapter(lora_zoo, tmp_path, config_edit, tensor_edit), *needles)


def test_pickle_adapter_is_refused_unread(lora_zoo: LoraZoo, tmp_path: Path) -> None:
    adapter = copy_adapter(lora_zoo, tmp_path)
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(b"never unpickled")
    merge_expecting(
        lora_zoo, tmp_path, adapter, "no adapter_model.safetensors", "adapter_model.bin", "pickle"
    )


def test_adapter_without_config_is_refused(lora_zoo: LoraZoo, tmp_path: Path) -> None:
    adapter = copy_adapter(lora_zoo, tmp_path)
    (adapter / "adapter_config.json").unlink()
    merge_expecting(lora_zoo, tmp_path, adapter, "no adapter_config.json")


def test_adapter_needs_the_recipes_base(lora_zoo: LoraZoo, tmp_path: Path) -> None:
    raw = recipe(lora_zoo, lora_zoo.adapters, shared={"method": "linear"}).model_dump()
    raw["base"] = None
    with pytest.raises(CheckpointError, match=r"math: .* is a PEFT LoRA adapter; set the recipe's `base`"):
        merge_experts(Recipe.model_validate(raw), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_other_base_model_name_is_a_warning(
    lora_zoo: LoraZoo, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    adapter = copy_adapter(lora_zoo, tmp_path, lambda c: c.update(base_model_name_or_path="org/other-model"))
    with caplog.at_level(logging.WARNING, logger="merge.adapter"):
        merge_experts(recipe(lora_zoo, dict(lora_zoo.adapters, math=adapter)), tmp_path / "out")
    assert "math: adapter config base_model_name_or_path='org/other-model' differs" in caplog.text
    assert (tmp_path / "out" / "config.json").is_file()
    caplog.clear()
    base = DenseCheckpoint.open("base", lora_zoo.base)
    with caplog.at_level(logging.WARNING, logger="merge.adapter"):
        open_expert("math", lora_zoo.adapters["math"], base)  # saved by peft with the base's own path
    assert "base_model_name_or_path" not in caplog.text


@pytest.mark.vllm
@pytest.mark.timeout(600)
def test_adapter_moe_loads_in_vllm_natively(lora_zoo: LoraZoo, tmp_path: Path) -> None:
    """Adapters merged with mirrored Arrow gates (2N routed experts, top-2): vLLM's Mixtral loader takes
    the layout and generates what transformers does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    out = tmp_path / "moe"
    merge_experts(recipe(lora_zoo, lora_zoo.adapters, gate={"init": "arrow"}, experts_per_token=2), out)
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 2 * len(TINY_DOMAINS)
    prompts = ["If we compute 12 + 5 we get", "def total_fn(x):"]
    llm = LLM(model=str(out), enforce_eager=True, max_model_len=128, dtype="float32", seed=0)
    try:
        assert llm.llm_engine.model_config.hf_config.architectures == ["MixtralForCausalLM"]
        outputs = llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0))
    finally:
        del llm
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    for prompt, result in zip(prompts, outputs, strict=True):
        ids = tok(prompt, return_tensors="pt").input_ids
        want = model.generate(ids, max_new_tokens=4, do_sample=False)[0, ids.shape[1] :].tolist()
        assert list(result.outputs[0].token_ids)[:2] == want[:2], (prompt, result.outputs[0].token_ids, want)


def peft_arrow_prototypes(zoo: LoraZoo, layer: int) -> torch.Tensor:
    """Each adapter's Arrow prototype from its peft file: the top right singular vector (full SVD) of
    [s·B·A of gate_proj; s·B·A of up_proj], sign fixed so its largest entry is positive."""
    rows = []
    for domain in TINY_DOMAINS:
        config = json.loads((zoo.adapters[domain] / "adapter_config.json").read_text())
        deltas = []
        with safe_open(str(zoo.adapters[domain] / "adapter_model.safetensors"), framework="pt") as fh:
            for proj in ("gate_proj", "up_proj"):
                prefix = f"base_model.model.model.layers.{layer}.mlp.{proj}"
                a, b = fh.get_tensor(f"{prefix}.lora_A.weight"), fh.get_tensor(f"{prefix}.lora_B.weight")
                r = a.shape[0]
                alpha = config.get("alpha_pattern", {}).get(proj, config["lora_alpha"])
                scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
                deltas.append((b @ a) * scale)
        v = torch.linalg.svd(torch.cat(deltas), full_matrices=False).Vh[0]
        rows.append(v if v[v.abs().argmax()] >= 0 else -v)
    return torch.stack(rows)


@pytest.mark.parametrize("mirror", [True, False])
def test_arrow_gates_need_no_data_and_are_each_adapters_top_singular_vector(
    lora_zoo: LoraZoo, tmp_path: Path, mirror: bool
) -> None:
    """gate.init=arrow with no calibration data at all: every layer's gate is the adapters' Arrow
    prototypes / T (mirrored: [+v; −v] over the experts written twice), from adapters and from their
    materialised checkpoints alike."""
    gate = {"init": "arrow", "arrow_temperature": 0.5, "arrow_mirror": mirror}
    no_data = [{"name": d, "path": str(lora_zoo.adapters[d])} for d in TINY_DOMAINS]
    report = merge_experts(
        recipe(lora_zoo, lora_zoo.adapters, experts=no_data, gate=gate, experts_per_token=2), tmp_path / "a"
    )
    full = [{"name": d, "path": str(lora_zoo.full[d])} for d in TINY_DOMAINS]
    merge_experts(
        recipe(lora_zoo, lora_zoo.full, experts=full, gate=gate, experts_per_token=2), tmp_path / "f"
    )
    got, from_full = read_all(tmp_path / "a"), read_all(tmp_path / "f")
    n = len(TINY_DOMAINS)
    assert report["gate_stats"] == [] and report["routed_experts"] == (2 * n if mirror else n)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["num_local_experts"] == report["routed_experts"]
    for layer in range(int(config["num_hidden_layers"])):
        want = peft_arrow_prototypes(lora_zoo, layer) / 0.5
        want = torch.cat([want, -want]) if mirror else want
        for written in (got, from_full):
            gate_w = written[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
            assert gate_w.shape == want.shape
            assert (gate_w - want).abs().max() <= 1e-3 * want.abs().max(), layer
        if mirror:
            for e in range(n):
                for proj in ("w1", "w2", "w3"):
                    prefix = f"model.layers.{layer}.block_sparse_moe.experts"
                    assert torch.equal(
                        got[f"{prefix}.{e}.{proj}.weight"], got[f"{prefix}.{e + n}.{proj}.weight"]
                    )


def test_mirrored_linear_gate_routes_exactly_as_arrow() -> None:
    """Mixtral's routing (softmax of x·Wᵀ, top-k, renormalised) over the mirrored rows [+v; −v] picks the
    same experts with the same weights as PEFT Arrow's softmax over the top-k of |x·v| / T."""
    from merge.gates import arrow_gate

    generator = torch.Generator().manual_seed(0)
    prototypes = torch.nn.functional.normalize(torch.randn(4, 64, generator=generator), dim=1)
    x = torch.randn(256, 64, generator=generator) * 3
    for k in (1, 2, 3):
        w = arrow_gate(prototypes, 0.7, mirror=True)
        probs = torch.softmax(x @ w.T, dim=-1)
        weights, chosen = probs.topk(k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        sim = (x @ prototypes.T).abs()
        top, idx = sim.topk(k, dim=-1)
        assert torch.equal(chosen % 4, idx), k
        assert torch.allclose(weights, torch.softmax(top / 0.7, dim=-1), atol=1e-6), k


def test_arrow_prototype_sign_is_fixed_and_a_zero_delta_has_none() -> None:
    from merge.gates import arrow_prototype

    generator = torch.Generator().manual_seed(1)
    delta = torch.randn(48, 4, generator=generator) @ torch.randn(4, 64, generator=generator)
    v = arrow_prototype([delta[:24], delta[24:]])
    assert v[v.abs().argmax()] > 0 and torch.equal(v, arrow_prototype([-delta]))
    assert not arrow_prototype([torch.zeros(8, 64)]).any()

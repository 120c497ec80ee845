"""End-to-end merges of the tiny experts: layout, equivalence, gate quality, bad input, atomicity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM, MixtralForCausalLM

from merge.build import merge_experts
from merge.calibration import CalibrationText, tokenize_calibration
from merge.card import hash_inputs_in_background, input_hashes
from merge.checkpoint import CheckpointError
from merge.evaluate import load_causal_lm, routing_shares
from merge.recipe import Recipe, RecipeError, load_recipe
from merge.tiny import TINY_DOMAINS, TinyZoo, build_tokenizer, domain_prompts, tiny_config


def recipe_dict(zoo: TinyZoo, **overrides) -> dict:
    raw = {
        "base": str(zoo.base),
        "experts": [
            {"name": d, "path": str(zoo.experts[d]), "data": [{"path": str(zoo.data[d]), "limit": 48}]}
            for d in TINY_DOMAINS
        ],
        "shared": {"method": "ties"},
        "dtype": "float32",
    }
    raw.update(overrides)
    return raw


def make_recipe(zoo: TinyZoo, **overrides) -> Recipe:
    return Recipe.model_validate(recipe_dict(zoo, **overrides))


@pytest.fixture(scope="session")
def tiny_moe(tiny_zoo: TinyZoo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("moe") / "moe"
    merge_experts(make_recipe(tiny_zoo), out)
    return out


def test_moe_layout_is_vllm_native(tiny_moe: Path) -> None:
    config = json.loads((tiny_moe / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert config["num_local_experts"] == 3 and config["num_experts_per_tok"] == 1
    names = set(json.loads((tiny_moe / "model.safetensors.index.json").read_text())["weight_map"])
    for layer in range(2):
        assert f"model.layers.{layer}.block_sparse_moe.gate.weight" in names
        for e in range(3):
            for w in ("w1", "w2", "w3"):
                assert f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight" in names
    assert not any(".mlp." in n for n in names), "dense FFN names must not survive"
    for required in ("tokenizer.json", "chat_template.jinja", "generation_config.json", "README.md"):
        assert (tiny_moe / required).is_file(), required
    report = json.loads((tiny_moe / "merge-report.json").read_text())
    assert report["peak_rss_mib"] > 0 and len(report["gate_stats"]) == 2
    assert report["architecture"] == "MixtralForCausalLM" and report["load_check"]["complete"]
    assert set(report["inputs"]) == {"base", "math", "code", "text", "data"}
    card = (tiny_moe / "README.md").read_text()
    assert report["inputs"]["math"]["model.safetensors"] in card


def test_expert_ffns_are_copied_exactly(tiny_zoo: TinyZoo, tiny_moe: Path) -> None:
    moe = load_file(str(tiny_moe / "model-00001.safetensors"))
    code = load_file(str(tiny_zoo.experts["code"] / "model.safetensors"))
    assert torch.equal(
        moe["model.layers.1.block_sparse_moe.experts.1.w1.weight"],
        code["model.layers.1.mlp.gate_proj.weight"],
    )
    assert torch.equal(
        moe["model.layers.1.block_sparse_moe.experts.1.w2.weight"],
        code["model.layers.1.mlp.down_proj.weight"],
    )
    assert torch.equal(
        moe["model.layers.1.block_sparse_moe.experts.1.w3.weight"], code["model.layers.1.mlp.up_proj.weight"]
    )


def _force_expert(model: MixtralForCausalLM, expert: int) -> None:
    """Override every layer's router output so that all tokens go to `expert` with weight 1."""

    def hook(module, args, output):
        logits = output[0]
        forced = torch.full_like(logits, -1e4)
        forced[:, expert] = 1e4
        n = logits.shape[0]
        return (
            forced,
            torch.ones(n, 1, dtype=output[1].dtype),
            torch.full((n, 1), expert, dtype=output[2].dtype),
        )

    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(hook)


@pytest.mark.parametrize("method", ["ties", "linear", "dare_ties"])
def test_moe_with_gate_forced_to_i_equals_expert_i(
    tiny_zoo_shared_attention: TinyZoo, tmp_path: Path, method: str
) -> None:
    zoo = tiny_zoo_shared_attention
    out = tmp_path / "moe"
    merge_experts(make_recipe(zoo, shared={"method": method}), out)
    ids = torch.tensor([[5, 17, 42, 99, 7, 300, 12, 64]])
    for index, domain in enumerate(TINY_DOMAINS):
        moe = MixtralForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        _force_expert(moe, index)
        expert = LlamaForCausalLM.from_pretrained(str(zoo.experts[domain]), dtype=torch.float32).eval()
        with torch.inference_mode():
            got, want = moe(ids).logits, expert(ids).logits
        # float32 end to end; the linear mean of three equal tensors may differ in the last bit.
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (domain, (got - want).abs().max())


def test_data_driven_gates_beat_uniform_on_held_out_prompts(tiny_zoo: TinyZoo, tmp_path: Path) -> None:
    held_out = {d: domain_prompts(d, 12, seed=12345) for d in TINY_DOMAINS}
    mean_share = {}
    for init in ("ridge", "hidden", "uniform"):
        out = tmp_path / init
        merge_experts(make_recipe(tiny_zoo, gate={"init": init}), out)
        model, tok = load_causal_lm(out)
        shares = routing_shares(model, tok, held_out)
        mean_share[init] = sum(sum(layer.values()) for layer in shares) / (len(shares) * len(TINY_DOMAINS))
    assert mean_share["uniform"] == pytest.approx(1 / 3, abs=1e-6)  # uniform sends everything to expert 0
    assert mean_share["ridge"] > 0.8 > mean_share["uniform"]
    assert mean_share["hidden"] > mean_share["uniform"]


def test_answers_follow_their_prompt_in_the_calibration_set(tiny_zoo: TinyZoo) -> None:
    tok = load_causal_lm(tiny_zoo.base)[1]
    prompt, answer = "x = 1 + 2 " * 20, "the answer is three"
    cal = tokenize_calibration(
        tok,
        [(0, CalibrationText(prompt, answer)), (1, CalibrationText("hello"))],
        32,
        use_chat_template=False,
    )
    prompt_ids = (
        tok(prompt, add_special_tokens=True)["input_ids"] + tok("\n", add_special_tokens=False)["input_ids"]
    )
    answer_ids = tok(answer, add_special_tokens=False)["input_ids"]
    row = cal.input_ids[0][cal.mask[0]].tolist()
    assert row == (prompt_ids[-16:] + answer_ids)[:32]  # the prompt keeps half, from the end
    assert cal.input_ids[1][cal.mask[1]].tolist() == tok("hello", add_special_tokens=True)["input_ids"]
    assert cal.token_labels.tolist() == [0] * len(row) + [1] * int(cal.mask[1].sum())


def test_gates_fitted_on_answers_route_answers_home(tiny_zoo: TinyZoo, tmp_path: Path) -> None:
    """Answers from each domain's own generator: the gate fitted on them sends held-out text home."""
    raw = recipe_dict(tiny_zoo)
    for i, (domain, expert) in enumerate(zip(TINY_DOMAINS, raw["experts"], strict=True)):
        path = tmp_path / f"{domain}.jsonl"
        prompts, answers = domain_prompts(domain, 48, seed=7 + i), domain_prompts(domain, 48, seed=70 + i)
        rows = [{"prompt": p, "response": a} for p, a in zip(prompts, answers, strict=True)]
        rows.append({"prompt": "a row with no answer counts as its prompt alone"})
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        expert["data"] = [{"path": str(path), "response_field": "response"}]
    report = merge_experts(Recipe.model_validate(raw), tmp_path / "moe")
    assert not report["unused_experts"]
    model, tok = load_causal_lm(tmp_path / "moe")
    shares = routing_shares(model, tok, {d: domain_prompts(d, 12, seed=12345) for d in TINY_DOMAINS})
    assert sum(sum(layer.values()) for layer in shares) / (len(shares) * len(TINY_DOMAINS)) > 0.8


def test_non_string_answer_is_refused(tiny_zoo: TinyZoo, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok", "response": "fine"}\n{"prompt": "ok", "response": 5}\n')
    raw = recipe_dict(tiny_zoo)
    raw["experts"][2]["data"] = [{"path": str(bad), "response_field": "response"}]
    with pytest.raises(
        RecipeError, match=r"experts\[text\]\.data: .*bad\.jsonl:2 field 'response' is not a string"
    ):
        merge_experts(Recipe.model_validate(raw), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_uniform_gates_flag_unused_experts(tiny_zoo: TinyZoo, tmp_path: Path) -> None:
    report = merge_experts(make_recipe(tiny_zoo, gate={"init": "uniform"}), tmp_path / "u")
    assert report["unused_experts"] == ["code", "text"]


def _gates(out: Path) -> list[torch.Tensor]:
    moe = load_file(str(out / "model-00001.safetensors"))
    return [moe[f"model.layers.{layer}.block_sparse_moe.gate.weight"] for layer in range(2)]


def test_cheap_embed_gates_route_held_out_prompts_from_token_embeddings(
    tiny_zoo: TinyZoo, tmp_path: Path
) -> None:
    report = merge_experts(make_recipe(tiny_zoo, gate={"init": "cheap_embed"}), tmp_path / "c")
    assert report["gate_init"] == "cheap_embed" and len(report["gate_stats"]) == 2
    first, second = _gates(tmp_path / "c")
    assert torch.equal(first, second)  # one gate, fitted once on the token embeddings, at every layer
    model, tok = load_causal_lm(tmp_path / "c")
    shares = routing_shares(model, tok, {d: domain_prompts(d, 12, seed=12345) for d in TINY_DOMAINS})
    mean_share = sum(sum(layer.values()) for layer in shares) / (len(shares) * len(TINY_DOMAINS))
    assert (
        mean_share > 0.45
    )  # uniform gates give 1/3 (test_data_driven_gates_beat_uniform_on_held_out_prompts)


def test_random_gates_need_no_data_and_follow_their_seed(tiny_zoo: TinyZoo, tmp_path: Path) -> None:
    raw = recipe_dict(tiny_zoo, gate={"init": "random", "seed": 3})
    for expert in raw["experts"]:
        del expert["data"]
    report = merge_experts(Recipe.model_validate(raw), tmp_path / "r")
    assert report["gate_init"] == "random" and report["gate_stats"] == []  # no data: nothing to measure
    generator = torch.Generator().manual_seed(3)
    for gate in _gates(tmp_path / "r"):  # one draw per layer, in layer order, from gate.seed
        assert torch.equal(gate, torch.randn(3, 128, generator=generator) * 0.02)
    model = MixtralForCausalLM.from_pretrained(str(tmp_path / "r"))
    with torch.inference_mode():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize("init", ["hidden", "ridge", "cheap_embed"])
def test_gates_fitted_on_prompts_are_refused_without_them(
    tiny_zoo: TinyZoo, tmp_path: Path, init: str
) -> None:
    raw = recipe_dict(tiny_zoo, gate={"init": init})
    del raw["experts"][2]["data"]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(
        RecipeError, match=rf"gate\.init={init} needs data or positive_prompts for every expert"
    ):
        load_recipe(path)
    with pytest.raises(RecipeError, match="missing for: text"):
        load_recipe(path)


def test_base_joins_as_expert(tiny_zoo: TinyZoo, tmp_path: Path) -> None:
    report = merge_experts(make_recipe(tiny_zoo, base_as_expert=True, experts_per_token=2), tmp_path / "b")
    assert report["experts"] == ["math", "code", "text", "base"]
    model = MixtralForCausalLM.from_pretrained(str(tmp_path / "b"))
    assert model.config.num_local_experts == 4


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"])
def test_dense_merge_loads_as_llama(tiny_zoo: TinyZoo, tmp_path: Path, method: str) -> None:
    merge_experts(make_recipe(tiny_zoo, shared={"method": method}), tmp_path / "d", dense=True)
    model = LlamaForCausalLM.from_pretrained(str(tmp_path / "d"))
    with torch.inference_mode():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_existing_output_is_refused_without_overwrite(tiny_zoo: TinyZoo, tmp_path: Path) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        merge_experts(make_recipe(tiny_zoo), out)
    assert (out / "keep.txt").read_text() == "mine"
    merge_experts(make_recipe(tiny_zoo), out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_crash_mid_merge_leaves_nothing(tiny_zoo: TinyZoo, tmp_path: Path) -> None:
    def explode(stage: str, done: int, total: int) -> None:
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge_experts(make_recipe(tiny_zoo), tmp_path / "out", progress=explode)
    assert list(tmp_path.iterdir()) == []


# ---- bad input: a clear error naming the expert and the field, and nothing written ----


def _copy_expert(zoo: TinyZoo, tmp_path: Path, domain: str = "code") -> Path:
    dst = tmp_path / f"broken-{domain}"
    shutil.copytree(zoo.experts[domain], dst)
    return dst


def _merge_expecting(zoo: TinyZoo, tmp_path: Path, broken: Path, match: str) -> None:
    raw = recipe_dict(zoo)
    raw["experts"][1]["path"] = str(broken)
    out = tmp_path / "out"
    with pytest.raises((CheckpointError, RecipeError), match=match):
        merge_experts(Recipe.model_validate(raw), out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_differing_hidden_size_is_refused(tiny_zoo: TinyZoo, tmp_path: Path) -> None:
    broken = _copy_expert(tiny_zoo, tmp_path)
    cfg = tiny_config(512)
    cfg.hidden_size, cfg.num_attention_heads = 192, 3
    LlamaForCausalLM(cfg).save_pretrained(broken)
    _merge_expecting(tiny_zoo, tmp_path, broken, r"code: hidden_size=192 differs")


def test_differing_layer_count_is_refused(tiny_zoo: TinyZoo, tmp_path: Path) -> None:
    broken = _copy_expert(tiny_zoo, tmp_path)
    LlamaForCausalLM(tiny_config(512, layers=3)).save_pretrained(broken)
    _merge_expecting(tiny_zoo, tmp_path, broken, "code: num_hidden_layers=3 differs")


def test_differing_tokenizer_is_refused(tiny_zoo: TinyZoo, tmp_path: Path) -> None:
    broken = _copy_expert(tiny_zoo, tmp_path)
    build_tokenizer(broken, vocab_size=400)
    _merge_expecting(tiny_zoo, tmp_path, broken, "code: tokenizer vocabulary differs")


@pytest.mark.parametrize("tensor", ["self_attn.q_proj", "mlp.down_proj"])  # merged / copied through
def test_nan_weights_are_refused(tiny_zoo: TinyZoo, tmp_path: Path, tensor: str) -> None:
    broken = _copy_expert(tiny_zoo, tmp_path)
    tensors = load_file(str(broken / "model.safetensors"))
    tensors[f"model.layers.1.{tensor}.weight"][0, 0] = float("nan")
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    name = tensor.replace(".", r"\.")
    _merge_expecting(
        tiny_zoo, tmp_path, broken, rf"code: tensor model\.layers\.1\.{name}\.weight contains NaN"
    )


def test_input_hashes_in_background(tiny_zoo: TinyZoo, monkeypatch: pytest.MonkeyPatch) -> None:
    """The report's sha256 come from a thread beside the merge: the same as hashing in line, errors re-raised."""
    recipe = make_recipe(tiny_zoo)
    assert hash_inputs_in_background(recipe)() == input_hashes(recipe)

    def unreadable(_: Recipe) -> dict:
        raise OSError("disk gone")

    monkeypatch.setattr("merge.card.input_hashes", unreadable)
    wait = hash_inputs_in_background(recipe)
    with pytest.raises(OSError, match="disk gone"):
        wait()


def test_unsupported_architecture_lists_supported(tiny_zoo: TinyZoo, tmp_path: Path) -> None:
    broken = _copy_expert(tiny_zoo, tmp_path)
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (broken / "config.json").write_text(json.dumps(config))
    _merge_expecting(
        tiny_zoo, tmp_path, broken, "code: architecture GPT2LMHeadModel is not supported; supported: Llama"
    )


def test_missing_weights_and_pickle_are_refused(tiny_zoo: TinyZoo, tmp_path: Path) -> None:
    broken = _copy_expert(tiny_zoo, tmp_path)
    (broken / "model.safetensors").rename(broken / "pytorch_model.bin")
    _merge_expecting(tiny_zoo, tmp_path, broken, "code: no .safetensors weights .*pickle")


def test_missing_expert_folder(tiny_zoo: TinyZoo, tmp_path: Path) -> None:
    _merge_expecting(tiny_zoo, tmp_path, tmp_path / "nowhere", "code: path .* is not a model folder")


def test_unreadable_data_is_refused(tiny_zoo: TinyZoo, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "ok"}\n\xff\xfe not utf8\n')
    raw = recipe_dict(tiny_zoo)
    raw["experts"][2]["data"] = [{"path": str(bad)}]
    with pytest.raises(RecipeError, match=r"experts\[text\]\.data: .*bad\.jsonl:2 is not UTF-8"):
        merge_experts(Recipe.model_validate(raw), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"shared": {"method": "slerp"}}, "shared.method"),
        ({"shared": {"method": "ties", "density": 1.5}}, "shared.density"),
        ({"experts_per_token": 9}, "experts_per_token=9 exceeds"),
        ({"gate": {"init": "magic"}}, "gate.init"),
        ({"base": None}, "needs `base`"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_recipe_errors_name_the_field(tiny_zoo: TinyZoo, tmp_path: Path, patch: dict, message: str) -> None:
    raw = recipe_dict(tiny_zoo)
    raw.update(patch)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_duplicate_expert_names(tiny_zoo: TinyZoo, tmp_path: Path) -> None:
    raw = recipe_dict(tiny_zoo)
    raw["experts"][1]["name"] = "math"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError, match="repeated: math"):
        load_recipe(path)


@pytest.mark.parametrize("method", ["ties", "linear", "task_arithmetic"])
def test_row_chunked_merge_equals_whole_tensor_merge(
    tiny_zoo: TinyZoo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """Big matrices are merged in row chunks to bound memory; the result must not change."""
    import merge.build

    recipe = make_recipe(tiny_zoo, shared={"method": method, "density": 0.5})
    merge_experts(recipe, tmp_path / "whole", dense=True)
    monkeypatch.setattr(merge.build, "CHUNK_ELEMENTS", 5000)  # the 512x128 embedding → 14 chunks
    merge_experts(recipe, tmp_path / "chunked", dense=True)
    whole = load_file(str(tmp_path / "whole" / "model-00001.safetensors"))
    chunked = load_file(str(tmp_path / "chunked" / "model-00001.safetensors"))
    assert whole.keys() == chunked.keys()
    for name in whole:
        assert torch.equal(whole[name], chunked[name]), name


def _all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_block_merge_equals_the_row_chunked_merge(
    tiny_zoo: TinyZoo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, dtype: str
) -> None:
    """The block path (each tensor read once in its stored dtype, merged in cache-sized blocks, the lean
    sign consensus) writes the same bits as the whole-tensor / row-chunked path, gates included."""
    import merge.build

    recipe = make_recipe(tiny_zoo, shared={"method": method, "density": 0.5}, dtype=dtype)
    monkeypatch.setattr(merge.build, "BLOCKWISE_METHODS", set())
    merge_experts(recipe, tmp_path / "chunked")
    monkeypatch.setattr(merge.build, "BLOCKWISE_METHODS", {"ties", "task_arithmetic"})
    monkeypatch.setattr(merge.build, "BLOCK_ELEMENTS", 3000)  # not a divisor of any tensor's size
    merge_experts(recipe, tmp_path / "blocks")
    chunked, blocks = _all_tensors(tmp_path / "chunked"), _all_tensors(tmp_path / "blocks")
    assert chunked.keys() == blocks.keys()
    for name in chunked:
        assert torch.equal(chunked[name].view(torch.uint8), blocks[name].view(torch.uint8)), name


def test_calibration_forward_is_the_written_moes_forward(tiny_zoo: TinyZoo, tmp_path: Path) -> None:
    """The layer-by-layer pass that fits the gates (attention on batches cut to their longest prompt,
    top-2 routing on the packed real tokens) gives the hidden states transformers computes for the MoE
    that was written: else each gate would be fitted on states the served model never produces."""
    from safetensors import safe_open

    from merge.calibration import BATCH, LayerwiseForward, rms_norm
    from merge.tokenizer import load_tokenizer

    out = tmp_path / "moe"
    merge_experts(make_recipe(tiny_zoo, experts_per_token=2), out)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    weights = {}
    for name, file in index.items():
        with safe_open(str(out / file), framework="pt") as fh:
            weights[name] = fh.get_tensor(name)
    texts = [CalibrationText(p) for d in TINY_DOMAINS for p in domain_prompts(d, 16, seed=3)]
    cal = tokenize_calibration(load_tokenizer(out), list(enumerate(texts)), 64, use_chat_template=False)
    forward = LayerwiseForward(json.loads((out / "config.json").read_text()), cal, torch.float32)
    assert len(texts) > BATCH and any(width < cal.input_ids.shape[1] for _, width in forward._batches)
    model = MixtralForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.inference_mode():
        states = model(cal.input_ids, attention_mask=cal.mask.long(), output_hidden_states=True).hidden_states
    forward.embed(weights["model.embed_tokens.weight"])
    layers = model.config.num_hidden_layers
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        shared = {
            n[len(prefix) :]: t
            for n, t in weights.items()
            if n.startswith(prefix) and "block_sparse" not in n
        }
        experts = [
            {
                proj: weights[f"{prefix}block_sparse_moe.experts.{e}.{w}.weight"]
                for proj, w in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3"))
            }
            for e in range(3)
        ]
        forward.attention(shared)
        forward.route(weights[f"{prefix}block_sparse_moe.gate.weight"], experts, 2)
        assert forward.hidden is not None
        got = forward.hidden[cal.mask]
        if layer == layers - 1:  # transformers' last hidden state is after the final norm
            got = rms_norm(got, weights["model.norm.weight"], model.config.rms_norm_eps)
        want = states[layer + 1][cal.mask]
        assert torch.allclose(got, want, atol=1e-4), (layer, (got - want).abs().max())

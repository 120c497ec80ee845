"""Router pieces that need no encoder: config, data reading and split, linear heads, gates, policy, rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from router.base import Decision, RoutingRequest, create_router, router_kinds
from router.config import ConfigError, Holdout, load_config, parse_config
from router.data import DataError, cap_rows, cap_rows_balanced, read_jsonl, split_rows
from router.gates import TokenGates, select_aggregate
from router.linear import fit_linear, fit_temperature, softmax
from router.policy import DecisionMaker, Policy, PolicySettings
from router.text import clean_text, context_text, routing_text

ROOT = Path(__file__).resolve().parents[1]
EXPERTS = ["math", "code", "general"]


# -- config --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("router*.yaml")), ids=lambda p: p.name)
def test_every_example_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert len(cfg.experts) >= 2
    for spec in cfg.experts.values():
        assert all(f.is_absolute() for f in spec.files)


def test_example_configs_exist() -> None:
    assert (ROOT / "examples" / "router-shared-data.yaml").is_file()


def _minimal(**extra: object) -> dict:
    return {"experts": {"a": {"files": ["a.jsonl"]}, "b": {"files": ["b.jsonl"]}}, **extra}


def test_config_error_names_the_field(tmp_path: Path) -> None:
    bad = _minimal()
    bad["experts"]["a"]["holdout"] = {"fraction": 1.5}
    with pytest.raises(ConfigError, match=r"experts\.a\.holdout\.fraction: .*less than 1.*1\.5"):
        parse_config(bad, tmp_path)


def test_config_forbids_extra_fields(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"classifer: Extra inputs are not permitted"):
        parse_config(_minimal(classifer={"C": 1}), tmp_path)


def test_config_rejects_unknown_fallback_and_single_expert(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="policy.fallback 'zzz' is not one of"):
        parse_config(_minimal(policy={"fallback": "zzz"}), tmp_path)
    with pytest.raises(ConfigError, match="at least 2 experts"):
        parse_config({"experts": {"a": {"files": ["a.jsonl"]}}}, tmp_path)
    with pytest.raises(ConfigError, match=r"kind: .*expected a trained router head, one of \[.*'hybrid'"):
        parse_config(_minimal(kind="perplexity"), tmp_path)


def test_config_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_minimal()))
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.experts["a"].files == [(tmp_path / "a.jsonl").resolve()]
    assert cfg.resolved_label_map() == {"a": "a", "b": "b"}


# -- data ----------------------------------------------------------------------------------------------
def test_read_jsonl_errors_name_file_and_line(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.jsonl: no usable rows"):
        read_jsonl(empty)
    cases = {
        b'{"prompt": "ok"}\n\xff\xfe broken\n': "2: not valid UTF-8",
        b'{"prompt": "ok"}\n{"prompt": "   "}\n': "2: empty or whitespace-only",
        b'{"prompt": 3}\n': "1: missing `prompt` string",
        b'{"prompt": "ok"\n': "1: not valid JSON",
        b'["prompt"]\n': "1: not a JSON object",
    }
    for content, message in cases.items():
        path = tmp_path / "bad.jsonl"
        path.write_bytes(content)
        with pytest.raises(DataError, match=f"bad.jsonl:{message}"):
            read_jsonl(path)
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n\xff\n{"prompt": ""}\n\n{"prompt": "fine"}\n')
    assert [r["prompt"] for r in read_jsonl(path, on_bad_rows="skip")] == ["ok", "fine"]


def _rows(n: int) -> list[dict]:
    return [{"id": f"r{i}", "prompt": f"p{i}", "subject": f"s{i % 10}", "tpl": f"t{i % 7}"} for i in range(n)]


def test_split_holds_out_whole_groups_deterministically() -> None:
    spec = Holdout.model_validate({"groups": [{"field": "subject", "fraction": 0.2}], "fraction": 0.1})
    a = split_rows(_rows(500), spec, seed=0, salt="x")
    b = split_rows(list(reversed(_rows(500))), spec, seed=0, salt="x")
    assert sorted(r["id"] for r in a.held) == sorted(r["id"] for r in b.held)  # order-independent
    held_subjects = set(a.held_groups["subject"])
    assert len(held_subjects) == 2
    assert not held_subjects & {r["subject"] for r in a.kept}  # no training row of a held-out subject
    assert {r["id"] for r in a.kept}.isdisjoint({r["id"] for r in a.held})
    assert len(a.kept) + len(a.held) == 500
    rows_share = sum(r["heldout"] == "rows" for r in a.held) / 400
    assert 0.05 < rows_share < 0.15
    assert {r["id"] for r in split_rows(_rows(500), spec, 0, "y").held} != {r["id"] for r in a.held}


def test_cap_rows_balanced_shares_the_cap_across_sources() -> None:
    """A 10-row source keeps all its rows beside a 1,000-row one; the rest of the cap goes to the large one."""
    rows = [{"id": f"k{i}", "domain": "knowledge"} for i in range(1000)]
    rows += [{"id": f"g{i}", "domain": "general"} for i in range(10)]
    rows += [{"id": f"m{i}", "domain": "math"} for i in range(300)]
    kept = cap_rows_balanced(rows, 100, 0, "domain")
    counts = {d: sum(r["domain"] == d for r in kept) for d in ("knowledge", "general", "math")}
    assert counts == {"general": 10, "knowledge": 45, "math": 45}
    assert (
        cap_rows_balanced(rows, 100, 0, "domain") == kept
        and cap_rows_balanced(rows, None, 0, "domain") == rows
    )
    assert len(cap_rows_balanced(rows, 101, 0, "domain")) == 101


def test_cap_rows_is_deterministic() -> None:
    rows = _rows(100)
    assert cap_rows(rows, 10, 0) == cap_rows(rows, 10, 0)
    assert len(cap_rows(rows, 10, 0)) == 10 and cap_rows(rows, None, 0) == rows


# -- linear heads, calibration, gates --------------------------------------------------------------------
def test_fit_linear_matches_sklearn_predictions() -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(m, 1.0, (80, 6)) for m in (0.0, 1.5, 3.0)]) * rng.uniform(0.1, 10, 6)
    y = np.repeat([0, 1, 2], 80)
    model = fit_linear(x, y, 3, "logreg", 1.0, "balanced")
    mu, sd = x.mean(0), x.std(0) + 1e-6
    ref = LogisticRegression(C=1.0, max_iter=3000, class_weight="balanced").fit((x - mu) / sd, y)
    assert np.array_equal(model.logits(x).argmax(1), ref.predict((x - mu) / sd))
    for kind in ("linear-svm", "ridge"):
        assert (fit_linear(x, y, 3, kind).logits(x).argmax(1) == y).mean() > 0.7
    binary = fit_linear(x[:160], y[:160], 2)
    assert binary.coef.shape == (2, 6) and (binary.logits(x[:160]).argmax(1) == y[:160]).mean() > 0.8
    with pytest.raises(ValueError, match="every class needs training examples"):
        fit_linear(x[:160], y[:160], 3)


def test_temperature_scaling_reduces_overconfidence() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 2000)
    logits = rng.normal(0, 1, (2000, 3))
    logits[np.arange(2000), y] += 1.0
    t = fit_temperature(logits * 10, y)  # 10x overconfident logits → T near 10
    assert 5 < t < 20
    assert np.allclose(softmax(np.array([[1.0, 1.0]])), 0.5)


def test_gates_point_at_their_experts_tokens() -> None:
    rng = np.random.default_rng(0)
    d = 16
    directions = np.eye(d)[:3]
    tokens = [directions[e] + 0.3 * rng.normal(size=(200, d)) for e in range(3)]
    tokens = [t / np.linalg.norm(t, axis=1, keepdims=True) for t in tokens]
    gates = TokenGates.fit(np.stack([t.sum(0) for t in tokens]), np.array([200.0] * 3), top_k=1)
    batch = np.stack([t[:10] for t in tokens])  # one "prompt" of 10 tokens per expert
    mask = np.ones((3, 10), bool)
    mask[:, 7:] = False
    feats = gates.aggregate(batch.astype(np.float32), mask)
    assert feats.shape == (3, 9)
    for aggregate in ("mean", "max", "votes"):
        assert list(select_aggregate(feats, aggregate, 3).argmax(1)) == [0, 1, 2]
    votes = select_aggregate(feats, "votes", 3)
    assert np.allclose(votes.sum(1), 1.0)
    with pytest.raises(ValueError, match="aggregate must be one of"):
        select_aggregate(feats, "median", 3)


# -- policy (multi-turn, floor, fallback) ----------------------------------------------------------------
def _maker(floor: float = 0.5, stickiness: float = 0.25) -> DecisionMaker:
    settings = PolicySettings(confidence_floor=floor, stickiness=stickiness)
    return DecisionMaker(Policy(EXPERTS, "general", settings), "test", "v1")


def test_policy_floor_fallback_and_previous_expert() -> None:
    maker = _maker()
    confident = maker.decide(np.array([0.9, 0.05, 0.05]), None, "classifier", {})
    assert (confident.expert, confident.reason) == ("math", "classifier")
    unsure = maker.decide(np.array([0.4, 0.35, 0.25]), None, "classifier", {})
    assert (unsure.expert, unsure.reason, unsure.details["would_be"]) == (
        "general",
        "below-floor→fallback",
        "math",
    )
    maker = _maker(stickiness=0.0)
    kept = maker.decide(np.array([0.4, 0.35, 0.25]), "code", "classifier", {})
    assert (kept.expert, kept.reason) == ("code", "below-floor→previous-expert")
    assert maker.no_text("code", {}).reason == "empty-prompt→previous-expert"
    assert maker.no_text(None, {}).expert == "general"


def test_policy_stickiness_keeps_a_conversation_unless_the_turn_is_clear() -> None:
    maker = _maker(floor=0.0, stickiness=0.25)
    ambiguous = maker.decide(np.array([0.55, 0.45, 0.0]), "code", "classifier", {})
    assert ambiguous.expert == "code" and ambiguous.reason == "classifier+previous-expert-prior"
    assert ambiguous.details["prior"] == "code"
    clear = maker.decide(np.array([0.95, 0.05, 0.0]), "code", "classifier", {})
    assert clear.expert == "math" and clear.reason == "classifier"
    assert abs(sum(clear.scores.values()) - 1.0) < 1e-5
    with pytest.raises(ValueError, match="fallback 'nope'"):
        Policy(EXPERTS, "nope")
    with pytest.raises(ValueError, match=r"confidence_floor\n.*less than or equal to 1"):
        PolicySettings(confidence_floor=1.5)
    with pytest.raises(ValueError, match=r"stickiness\n.*less than 1"):
        PolicySettings(stickiness=1.0)
    with pytest.raises(ValueError, match=r"context_threshold\n.*greater than or equal to 0"):
        PolicySettings(context_threshold=-0.1)


def test_policy_novel_prompts_go_to_the_fallback_or_stay_in_their_conversation() -> None:
    maker = _maker(floor=0.3, stickiness=0.0)
    p = np.array([0.9, 0.05, 0.05])
    novel = maker.decide(p, None, "classifier", {}, ("math", 0.41))
    assert (novel.expert, novel.reason) == ("general", "novel→fallback")
    assert novel.details == {"would_be": "math", "similarity": 0.41}
    assert maker.decide(p, "code", "classifier", {}, ("math", 0.41)).reason == "novel→previous-expert"
    # a verdict about another expert than the pick (the prior moved it) does not apply
    assert maker.decide(p, None, "classifier", {}, ("code", 0.41)).expert == "math"


def test_policy_serve_as_maps_classes_to_served_experts() -> None:
    """Classes math/code share one served expert: decisions name it, scores sum over its classes, the class
    stays in the details, and a previous served expert pulls towards the most probable of its classes."""
    settings = PolicySettings(confidence_floor=0.3, stickiness=0.25)
    policy = Policy(["math", "code", "general"], "general", settings, serve_as={"math": "moe", "code": "moe"})
    assert policy.served_experts == ["moe", "general"]
    maker = DecisionMaker(policy, "test", "v1")
    d = maker.decide(np.array([0.5, 0.2, 0.3]), None, "classifier", {})
    assert (d.expert, d.details["class"], d.reason) == ("moe", "math", "classifier")
    assert d.scores == {"moe": 0.7, "general": 0.3}
    # general wins alone (0.45), but the previous expert `moe` stands for code (its likelier class)
    sticky = maker.decide(np.array([0.15, 0.4, 0.45]), "moe", "classifier", {})
    assert (sticky.expert, sticky.details["class"]) == ("moe", "code")
    assert sticky.reason == "classifier+previous-expert-prior"
    assert maker.no_text("moe", {}).expert == "moe" and maker.no_text(None, {}).expert == "general"
    with pytest.raises(ValueError, match="not have"):
        Policy(["math", "general"], "general", serve_as={"physics": "moe"})
    with pytest.raises(ValueError, match="both a class"):
        Policy(["math", "general"], "general", serve_as={"math": "general", "general": "base"})


def test_config_serve_as_is_validated(tmp_path: Path) -> None:
    experts = {e: {"files": [str(tmp_path / f"{e}.jsonl")], "where": {"domain": e}} for e in EXPERTS}
    config = parse_config({"experts": experts, "serve_as": {"math": "moe", "code": "moe"}}, tmp_path)
    assert config.served_label_map() == {"math": "moe", "code": "moe", "general": "general"}
    with pytest.raises(ConfigError, match="serve_as: \\['physics'\\] are not classes"):
        parse_config({"experts": experts, "serve_as": {"physics": "moe"}}, tmp_path)


def _unit(v: list[float]) -> np.ndarray:
    x = np.array(v, np.float32)
    return x / np.linalg.norm(x)


def test_novelty_check_thresholds_and_verdicts() -> None:
    """Thresholds are a quantile of each expert's validation similarities; the fallback is never checked;
    a prompt far from its picked expert's bank is novel, one near it is not."""
    from router.novelty import NoveltyCheck

    rng = np.random.default_rng(0)
    centers = [_unit([1, 0, 0, 0]), _unit([0, 1, 0, 0]), _unit([0, 0, 1, 0])]

    def around(c: np.ndarray, n: int) -> np.ndarray:
        x = c + 0.1 * rng.standard_normal((n, 4)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    bank = np.concatenate([around(c, 40) for c in centers])
    labels = np.repeat(np.arange(3), 40)
    valid = np.concatenate([around(c, 20) for c in centers])
    valid_labels = np.repeat(np.arange(3), 20)
    check = NoveltyCheck.fit(bank, labels, valid, valid_labels, 3, skip=2, k=3, quantile=0.1)
    assert np.isfinite(check.thresholds[:2]).all() and check.thresholds[2] == -np.inf
    own = check.similarity(valid, valid_labels)
    for expert in (0, 1):  # about 10 % of each expert's validation rows are below its threshold
        assert 0 < (own[valid_labels == expert] < check.thresholds[expert]).mean() <= 0.15
    far = _unit([0, 0, 0, 1])[None, :]
    flagged, similarity = check.novel(np.concatenate([far, far, centers[0][None, :]]), np.array([0, 2, 0]))
    assert flagged.tolist() == [True, False, False] and similarity[0] < 0.5
    loo = check.similarity(bank[:1], np.array([0]), exclude_self=True)
    assert loo[0] < check.similarity(bank[:1], np.array([0]))[0]
    again = NoveltyCheck.from_artifact(check.tensors(), check.params())
    assert np.allclose(again.thresholds, check.thresholds) and again.k == 3
    assert check.params()["thresholds"].keys() == {0, 1}
    with pytest.raises(ValueError, match="bank .* and labels .* disagree"):
        NoveltyCheck(bank, labels[:-1], check.thresholds)
    with pytest.raises(ValueError, match="must name one of the 3 experts"):
        NoveltyCheck(bank, labels + 1, check.thresholds)


def test_novelty_config_needs_validation_rows(tmp_path: Path) -> None:
    config = {
        "experts": {e: {"files": [str(tmp_path / f"{e}.jsonl")]} for e in EXPERTS},
        "novelty": {"enabled": True},
        "validation_fraction": 0.0,
    }
    with pytest.raises(ConfigError, match="validation_fraction > 0"):
        parse_config(config, tmp_path)
    with pytest.raises(ConfigError, match="novelty.classes: \\['physics'\\] are not classes"):
        parse_config(
            {**config, "validation_fraction": 0.1, "novelty": {"enabled": True, "classes": ["physics"]}},
            tmp_path,
        )
    with pytest.raises(ConfigError, match="'general' is the fallback"):
        policy = {"fallback": "general"}
        novelty = {"enabled": True, "classes": ["general"]}
        parse_config({**config, "validation_fraction": 0.1, "novelty": novelty, "policy": policy}, tmp_path)
    with pytest.raises(ConfigError, match="novelty.quantile"):
        parse_config(
            {**config, "validation_fraction": 0.1, "novelty": {"enabled": True, "quantile": 1.5}}, tmp_path
        )


# -- text extraction ----------------------------------------------------------------------------------
def test_routing_text_takes_latest_user_turn_and_never_raises() -> None:
    request = RoutingRequest(
        [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "answer"},
            {"role": "user", "content": [{"type": "text", "text": "second"}, {"type": "image_url"}]},
        ]
    )
    assert routing_text(request).text == "second"
    assert routing_text(RoutingRequest([{"role": "system", "content": "x"}])).empty
    assert routing_text(RoutingRequest("not a list")).notes["malformed_messages"]  # type: ignore[arg-type]
    assert routing_text(RoutingRequest([None, 3, {"role": "user", "content": 5}])).empty  # type: ignore[list-item]
    cleaned = clean_text("a\ud800b")
    assert cleaned.text == "a?b" and cleaned.notes["replaced_invalid_code_points"]
    assert clean_text("x" * 100, max_chars=10).notes["chars_cut"] == 90


# -- registry and the untrained kinds ---------------------------------------------------------------
def test_registry_knows_every_kind() -> None:
    expected = {
        "hybrid",
        "classifier",
        "token-gates",
        "centroid",
        "knn",
        "random",
        "fixed",
        "rules",
        "perplexity",
    }
    assert expected <= set(router_kinds())
    with pytest.raises(ValueError, match="unknown router kind 'nope'"):
        create_router("nope", experts=EXPERTS)
    with pytest.raises(ValueError, match="pass artifact=PATH"):
        create_router("hybrid", experts=EXPERTS)


def test_rules_router_names_the_rule_and_its_default() -> None:
    router = create_router(
        "rules", experts=EXPERTS, rules=[{"pattern": r"\bdef\b|```", "expert": "code"}], default="general"
    )
    hit, miss = router.decide_batch(
        [RoutingRequest.from_prompt("def f(): pass"), RoutingRequest.from_prompt("hello")]
    )
    assert hit.expert == "code" and hit.reason.startswith("rule:0:")
    assert miss.expert == "general" and miss.reason == "no-rule→default"
    with pytest.raises(ValueError, match="unknown expert"):
        create_router("rules", experts=EXPERTS, rules=[{"pattern": "x", "expert": "zzz"}])
    with pytest.raises(ValueError, match="pattern"):
        create_router("rules", experts=EXPERTS, rules=[{"pattern": "(", "expert": "code"}])


def test_perplexity_router_softmax_and_scorer_failure() -> None:
    router = create_router(
        "perplexity", experts=EXPERTS, scorer=lambda text, ex: {"math": 1.0, "code": 3.0, "general": 2.0}
    )
    decision = router.decide(RoutingRequest.from_prompt("2+2"))
    assert decision.expert == "math" and decision.reason == "perplexity"

    def broken(text: str, experts: object) -> dict:
        raise RuntimeError("backend down")

    failed = create_router("perplexity", experts=EXPERTS, scorer=broken, fallback="general").decide(
        RoutingRequest.from_prompt("x")
    )
    assert failed.expert == "general" and failed.reason == "scorer-error→fallback"


def test_decision_serialises() -> None:
    d = Decision("math", {"math": 1.0}, 1.0, "fixed", "1", "fixed", {"truncated": True})
    assert json.loads(json.dumps(d.as_dict()))["details"] == {"truncated": True}


def test_context_text_appends_earlier_user_turns_latest_first() -> None:
    messages = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "reply"},
        {"role": "user", "content": "two"},
        {"role": "user", "content": "three"},
    ]
    assert context_text(RoutingRequest(messages), turns=1).text == "three\n\ntwo"
    assert context_text(RoutingRequest(messages), turns=5).text == "three\n\ntwo\n\none"
    assert context_text(RoutingRequest(messages[:1]), turns=1) is None
    assert context_text(RoutingRequest(messages), turns=0) is None
    assert context_text(RoutingRequest("junk"), turns=1) is None  # type: ignore[arg-type]


def test_config_pool_layers(tmp_path: Path) -> None:
    base = {"experts": {"a": {"files": ["a.jsonl"]}, "b": {"files": ["b.jsonl"]}}}
    assert parse_config(base, tmp_path).encoder.pool_layers is None  # default: today's last-layer pooling
    for value in ([1, 2, 3], "all"):
        cfg = parse_config({**base, "encoder": {"pool_layers": value}}, tmp_path)
        assert cfg.encoder.pool_layers == value
    for bad, message in (
        ([], "at least one layer"),
        ([-1, 2], "start at 0"),
        ("some", "encoder.pool_layers"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_config({**base, "encoder": {"pool_layers": bad}}, tmp_path)


# -- the head registry: a new head is one module and its registration ----------------------------------
def test_a_new_head_is_one_registration(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A head registered like router/heads/*.py is at once a valid `kind`, has its own validated config
    section with defaults, is fit by the same loop as the others and is rebuilt from router.json."""
    from pydantic import Field

    import router.heads.base as registry
    from router.config import train_config_model
    from router.heads.base import Features, FitData, Head, HeadType, LoadData, load_heads, register_head
    from router.validation import Strict

    class PriorOptions(Strict):
        smoothing: float = Field(1.0, gt=0)

    class PriorHead(Head):  # the training prior, whatever the prompt
        kind = "prior"

        def __init__(self, counts: np.ndarray, temperature: float = 1.0) -> None:
            super().__init__(temperature)
            self.counts = counts

        def logits(self, f: Features) -> np.ndarray:
            return np.tile(np.log(self.counts / self.counts.sum()), (len(f.sentence), 1))

        def tensors(self) -> dict[str, np.ndarray]:
            return {"prior.counts": self.counts}

    def fit(data: FitData, options: PriorOptions, variant: str) -> Head:
        counts = np.bincount(data.y[data.rows], minlength=data.n) + options.smoothing
        return PriorHead(counts.astype(np.float32))

    def load(data: LoadData, params: registry.TemperatureParams) -> Head:
        return PriorHead(data.tensors["prior.counts"], params.temperature)

    monkeypatch.setattr(registry, "_HEADS", dict(registry._HEADS))
    register_head(HeadType("prior", "the class prior", fit, load, options=PriorOptions, options_key="prior"))

    cfg = parse_config(_minimal(kind="prior", prior={"smoothing": 2.0}), tmp_path)
    assert cfg.kind == "prior" and cfg.head_options()["prior"] == PriorOptions(smoothing=2.0)
    assert parse_config(_minimal(), tmp_path).head_options()["prior"] == PriorOptions()
    assert "prior" in cfg.trained_kinds() and "prior" in train_config_model().model_fields
    with pytest.raises(ConfigError, match=r"prior\.smoothing: Input should be greater than 0"):
        parse_config(_minimal(prior={"smoothing": -1}), tmp_path)

    y = np.array([0, 0, 0, 1])
    data = FitData(np.zeros((4, 2)), np.zeros((4, 6)), y, np.ones(4, bool), 2, 0, cfg.head_options())
    head = registry.head_type("prior").fit(data, cfg.head_options()["prior"], "")
    rebuilt = load_heads(head.tensors(), {"prior": head.params()}, 2)["prior"]
    # counts 3, 1 + smoothing 2
    assert np.allclose(rebuilt.proba(Features(np.zeros((1, 2)))), [[5 / 8, 3 / 8]])
    with pytest.raises(ValueError, match=r"heads\.prior\.temperature: Field required"):
        load_heads(head.tensors(), {"prior": {}}, 2)
    with pytest.raises(ValueError, match=r"heads \['mlp'\] are not known"):
        load_heads({}, {"mlp": {}}, 2)


def test_a_malformed_router_json_is_a_spec_error_naming_fields() -> None:
    from router.schema import SpecError, parse_spec

    with pytest.raises(SpecError, match=r"heads: Input should be a valid dictionary \(got 'x'\)"):
        parse_spec({"format": "moerge-router/1", "policy": 3, "encoder": [], "heads": "x"})
    with pytest.raises(SpecError, match="must be a JSON object"):
        parse_spec([])
    with pytest.raises(SpecError, match=r"format None; this moerge reads .*moerge router train"):
        parse_spec({"kind": "hybrid"})

"""Feature/classifier sweep for the shared-data router (not a test): how the numbers in router/README.md's
"What raised held-out accuracy" table were measured.

`encode` runs MiniLM once over the training and held-out rows of examples/router-shared-data.yaml (the
same split and 3,000-row caps as `moerge router train`) and caches, per row, the mean-pooled states of
every layer, max-pooled states of layers 3/4/6 and the unit token states of layers 3/4/6 (for the gates).
`run SPEC[:MODEL[:C]]…` then fits a classifier on a feature combination — e.g. `mean1+mean2+mean6+gate6`
(meanL: mean pool of layer L, 0 = embeddings; maxL: max pool; gateL: the token-gate aggregates of layer
L, gates fit like router/gates.py) — and prints one JSON line: accuracy on two group validation splits
carved from the TRAINING rows (router/train.py's recipe, salts `validation` and `validation2`: whole P3
datasets/templates and MMLU subjects held out, plus 10% of rows), and, fit on all training rows, accuracy
on the held-out split by kind of hold-out. Choose by `val_mean`; the held-out columns are for reporting.
Plain argmax (no temperature, no confidence floor). One thread; ~12 min to encode, seconds to minutes a fit.

    OMP_NUM_THREADS=1 .venv/bin/python bench/router_sweep.py encode --cache /tmp/router-exp
    OMP_NUM_THREADS=1 .venv/bin/python bench/router_sweep.py run --cache /tmp/router-exp \\
        mean6+gate6 mean1+mean2+mean3+mean4+mean5+mean6+gate6:linear-svm:0.01
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from router.config import load_config  # noqa: E402
from router.data import BadRows, cap_rows, load_expert_rows, row_key, split_rows  # noqa: E402

CONFIG = ROOT / "examples" / "router-shared-data.yaml"
MAX_LAYERS = (3, 4, 6)


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def encode(cache: Path) -> None:
    import torch

    from router.encoder import Encoder

    torch.set_num_threads(1)
    cache.mkdir(parents=True, exist_ok=True)
    cfg = load_config(CONFIG)
    rows: list[dict[str, Any]] = []
    meta: list[dict[str, Any]] = []
    for label, (name, spec) in enumerate(cfg.experts.items()):
        every = load_expert_rows(name, spec, "error", BadRows())
        split = split_rows(every, spec.holdout, cfg.seed, f"heldout:{name}")
        for part, chosen in (
            ("train", cap_rows(split.kept, spec.max_train, cfg.seed)),
            ("heldout", split.held),
        ):
            for r in chosen:
                rows.append(r)
                meta.append(
                    {
                        "y": label,
                        "part": part,
                        "group": r.get("heldout", "train"),
                        "key": row_key(r),
                        **{k: r.get(k) for k in ("dataset", "subject", "source")},
                    }
                )
    enc = Encoder("bundled", cfg.encoder.max_seq_length, "auto", threads=1)
    texts = [r["prompt"] for r in rows]
    n, d = len(texts), enc.dim
    depth = len(enc._net.encoder.layer) + 1
    means = np.zeros((n, depth, d), np.float16)
    maxes = np.zeros((n, len(MAX_LAYERS), d), np.float16)
    tokens: dict[int, dict[int, np.ndarray]] = {layer: {} for layer in MAX_LAYERS}
    order = np.argsort([len(t) for t in texts], kind="stable")
    started = time.time()
    for s in range(0, n, 64):
        idx = order[s : s + 64]
        with torch.inference_mode():
            inputs, _ = enc._tokenize([texts[i] for i in idx])
            states = enc._net(**inputs, output_hidden_states=True).hidden_states
        att = inputs["attention_mask"].bool()
        w = att.unsqueeze(-1).float()
        mask = att.clone()
        mask[:, 0] = False
        mask[torch.arange(len(idx)), att.sum(1) - 1] = False
        for layer in range(depth):
            means[idx, layer] = ((states[layer].float() * w).sum(1) / w.sum(1)).numpy()
        for j, layer in enumerate(MAX_LAYERS):
            h = states[layer].float()
            maxes[idx, j] = h.masked_fill(~att.unsqueeze(-1), -1e4).max(1).values.numpy()
            hn = torch.nn.functional.normalize(h, dim=-1)
            for b, i in enumerate(idx):
                tokens[layer][int(i)] = hn[b][mask[b]].half().numpy()
        print(f"{s + len(idx)}/{n} {time.time() - started:.0f}s", file=sys.stderr, flush=True)
    for layer in MAX_LAYERS:
        arrays = [tokens[layer][i] for i in range(n)]
        np.save(cache / f"tok{layer}.npy", np.concatenate(arrays))
        np.save(cache / "toklens.npy", np.array([len(a) for a in arrays]))
    np.save(cache / "means.npy", means)
    np.save(cache / "maxes.npy", maxes)
    (cache / "meta.json").write_text(json.dumps(meta))


class Sweep:
    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.cfg = load_config(CONFIG)
        self.meta = json.loads((cache / "meta.json").read_text())
        self.y = np.array([m["y"] for m in self.meta])
        self.group = np.array([m["group"] for m in self.meta])
        part = np.array([m["part"] for m in self.meta])
        self.train, self.heldout = part == "train", part == "heldout"
        self.means = np.load(cache / "means.npy", mmap_mode="r")
        self.maxes = np.load(cache / "maxes.npy", mmap_mode="r")
        self.lens = np.load(cache / "toklens.npy")
        self.offsets = np.concatenate([[0], np.cumsum(self.lens)])
        self.valid = {"v1": self.validation("validation"), "v2": self.validation("validation2")}
        self._gates: dict[tuple[int, str], np.ndarray] = {}

    def validation(self, salt: str) -> np.ndarray:
        """router/train.py's validation recipe on the training rows, with another salt per split."""
        chosen = np.zeros(len(self.meta), bool)
        for label, (name, spec) in enumerate(self.cfg.experts.items()):
            idx = np.flatnonzero(self.train & (self.y == label))
            own = [{k: v for k, v in self.meta[i].items() if v is not None} for i in idx]
            for r in own:
                r["prompt"] = r["id"] = r["key"]
            recipe = spec.holdout.model_copy(update={"fraction": 0.1})
            held = {r["key"] for r in split_rows(own, recipe, self.cfg.seed, f"{salt}:{name}").held}
            chosen[[i for i in idx if self.meta[i]["key"] in held]] = True
        return chosen

    def gate_features(self, layer: int, fit_key: str) -> np.ndarray:
        if (layer, fit_key) in self._gates:
            return self._gates[(layer, fit_key)]
        fit_rows = self.train & ~self.valid[fit_key] if fit_key in self.valid else self.train
        tokens = np.load(self.cache / f"tok{layer}.npy", mmap_mode="r")
        n = int(self.y.max()) + 1
        row_of = np.repeat(np.arange(len(self.lens)), self.lens)
        sums, counts = np.zeros((n, tokens.shape[1])), np.zeros(n)
        step = 200_000
        for s in range(0, len(tokens), step):
            t, r = np.asarray(tokens[s : s + step], np.float32), row_of[s : s + step]
            for e in range(n):
                m = fit_rows[r] & (self.y[r] == e)
                sums[e] += t[m].sum(0)
                counts[e] += m.sum()
        means = sums / counts[:, None]
        center = means.mean(0)
        gates = unit(means - center)
        aff = np.zeros((len(tokens), n), np.float32)
        for s in range(0, len(tokens), step):
            aff[s : s + step] = unit(np.asarray(tokens[s : s + step], np.float32) - center) @ gates.T
        nz, starts = self.lens > 0, self.offsets[:-1]
        out = np.zeros((len(self.lens), 3 * n), np.float32)
        out[nz, :n] = np.add.reduceat(aff, starts[nz], axis=0) / self.lens[nz, None]
        out[nz, n : 2 * n] = np.maximum.reduceat(aff, starts[nz], axis=0)
        top = (aff == aff.max(1, keepdims=True)).astype(np.float32)
        out[nz, 2 * n :] = np.add.reduceat(top, starts[nz], axis=0) / self.lens[nz, None]
        self._gates[(layer, fit_key)] = out
        return out

    def features(self, spec: list[str], fit_key: str) -> np.ndarray:
        parts = []
        for s in spec:
            if s.startswith("mean"):
                parts.append(unit(self.means[:, int(s[4:])]))
            elif s.startswith("max"):
                parts.append(unit(self.maxes[:, MAX_LAYERS.index(int(s[3:]))]))
            elif s.startswith("gate"):
                parts.append(self.gate_features(int(s[4:]), fit_key))
            else:
                raise SystemExit(f"unknown feature {s!r} (meanL, maxL, gateL)")
        return np.concatenate(parts, 1)

    def run(self, spec: list[str], model: str, c: float) -> dict[str, Any]:
        from router.linear import fit_linear

        started = time.time()
        n = int(self.y.max()) + 1
        result: dict[str, Any] = {"spec": "+".join(spec), "model": model, "C": c}
        scores = []
        for key, valid in self.valid.items():
            x = self.features(spec, key)
            fit = self.train & ~valid
            lm = fit_linear(x[fit], self.y[fit], n, model=model, c=c)
            scores.append(float((lm.logits(x[valid]).argmax(1) == self.y[valid]).mean()))
        result["val"] = [round(v, 4) for v in scores]
        result["val_mean"] = round(float(np.mean(scores)), 4)
        x = self.features(spec, "all")
        pred = fit_linear(x[self.train], self.y[self.train], n, model=model, c=c).logits(x).argmax(1)
        ho = self.heldout
        result["heldout"] = {"all": round(float((pred[ho] == self.y[ho]).mean()), 4)}
        for g in sorted(set(self.group[ho])):
            m = ho & (self.group == g)
            result["heldout"][g] = round(float((pred[m] == self.y[m]).mean()), 4)
        result["seconds"] = round(time.time() - started)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["encode", "run"])
    parser.add_argument("specs", nargs="*", help="FEATURES[:MODEL[:C]], e.g. mean6+gate6:logreg:1.0")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/router-exp"))
    args = parser.parse_intermixed_args()
    warnings.filterwarnings("ignore")
    if args.command == "encode":
        encode(args.cache)
        return
    sweep = Sweep(args.cache)
    for item in args.specs:
        parts = item.split(":")
        model = parts[1] if len(parts) > 1 else "logreg"
        c = float(parts[2]) if len(parts) > 2 else 1.0
        print(json.dumps(sweep.run(parts[0].split("+"), model, c)), flush=True)


if __name__ == "__main__":
    main()

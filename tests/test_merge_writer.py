"""merge/writer.py: the output swap (--overwrite) keeps the old checkpoint until the new one is in place,
non-finite tensors are refused, and a recipe's weights must be finite numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merge import writer
from merge.recipe import Recipe
from merge.writer import ShardWriter, atomic_output_dir, exchange


def write_checkpoint(out: Path, text: str, overwrite: bool = False) -> None:
    with atomic_output_dir(out, overwrite) as tmp:
        (tmp / "model.txt").write_text(text)


def test_overwrite_swaps_in_one_step(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_checkpoint(out, "old")
    write_checkpoint(out, "new", overwrite=True)
    assert (out / "model.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no hidden folder left behind"
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    assert exchange(a, b), "this Linux filesystem swaps folders atomically"
    assert (b / "x").read_text() == "a" and not (a / "x").exists()


def test_failed_swap_keeps_the_old_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an atomic exchange, the second rename failing (here: injected) puts the old output back."""
    out = tmp_path / "out"
    write_checkpoint(out, "old")
    monkeypatch.setattr(writer, "exchange", lambda a, b: False)
    real_rename = Path.rename

    def rename(self: Path, target: Path) -> Path:
        if ".partial-" in self.name:
            raise OSError("disk on fire")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="disk on fire"):
        write_checkpoint(out, "new", overwrite=True)
    assert (out / "model.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e5])  # 1e5 overflows float16
def test_non_finite_tensors_are_refused(tmp_path: Path, bad: float) -> None:
    out = tmp_path / "out"
    error = pytest.raises(ValueError, match=r"merged tensor w contains (NaN|Inf)")
    with error, atomic_output_dir(out, False) as tmp:
        shards = ShardWriter(tmp, "float16")
        shards.add("ok", torch.ones(2))
        shards.add("w", torch.tensor([1.0, bad]))
    assert list(tmp_path.iterdir()) == []


def test_finite_tensors_are_written(tmp_path: Path) -> None:
    with atomic_output_dir(tmp_path / "out", False) as tmp:
        shards = ShardWriter(tmp, "bfloat16")
        shards.add("w", torch.tensor([1.0, -2.0]))
        shards.close()
    assert load_file(str(tmp_path / "out" / "model-00001.safetensors"))["w"].tolist() == [1.0, -2.0]


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_recipe_weights_must_be_finite(value: str) -> None:
    import yaml

    raw = yaml.safe_load(f"experts: [{{name: a, path: /a, weight: {value}, positive_prompts: [x]}}]")
    with pytest.raises(ValueError, match="experts.0.weight"):
        Recipe.model_validate(raw)

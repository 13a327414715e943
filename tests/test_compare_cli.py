"""``compare.py`` (``upi_lightning.compare_cli``): two tiny checkpoints end to end, resume, bad ``--models``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from upi_lightning import compare_cli
from upi_lightning.attacks.comparison import TABLE_METRICS
from upi_lightning.compare_cli import compare_main, parse_compare_args
from upi_lightning.errors import UPIError

SMALL = [
    "--data=upi_lightning.data.SyntheticDataModule",
    "--data.num_train=512",
    "--data.num_test=128",
    "--attack.budgets=[{norm: l2, eps: 1.0}]",
    "--attack.methods=[upi_grad, random, per_sample]",
    "--attack.fit_samples=16",
    "--attack.eval_samples=16",
    "--attack.batch_size=16",
    "--attack.k=20",
    "--attack.figure_images=2",
    "--attack.upi_grad.epochs=1",
    "--attack.baselines.random_draws=2",
    "--attack.baselines.per_sample_steps=2",
    "--attack.baselines.per_sample_restarts=2",
    "--attack.baselines.per_sample_hold_label=true",
    "--attack.baselines.per_sample_dissimilarity=topk_mass",
    "--robust.budgets=[{norm: linf, eps: 0.1}, {norm: l2, eps: 1.5}]",
    "--robust.steps=2",
    "--robust.samples=8",
    "--progress=false",
]


@pytest.fixture(scope="module")
def two_models(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The trained checkpoint and a copy with its weights shaken: two different models of the same data."""
    saved = torch.load(checkpoint, weights_only=True)
    generator = torch.Generator().manual_seed(0)
    saved["state_dict"] = {
        key: value + 0.05 * torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
        for key, value in saved["state_dict"].items()
    }
    other = tmp_path_factory.mktemp("other") / "shaken.ckpt"
    torch.save(saved, other)
    return [f"base={checkpoint}", f"shaken={other}"]


def test_compare_writes_every_model_method_and_metric_and_resumes(two_models: list[str], tmp_path: Path) -> None:
    compared = compare_main(["--models", *two_models, *SMALL, f"--output={tmp_path}"])
    on_disk = json.loads((tmp_path / "compare.json").read_text())
    assert on_disk == json.loads(json.dumps(compared))
    assert [model["name"] for model in on_disk["models"]] == ["base", "shaken"]
    for model in on_disk["models"]:
        assert 0 <= model["clean_accuracy"] <= 1 and 0 < model["topk_mass_share"] <= 1
        assert [(row["norm"], row["eps"]) for row in model["robust_accuracy"]] == [("linf", 0.1), ("l2", 1.5)]
        assert all(row["accuracy"] <= model["clean_accuracy"] for row in model["robust_accuracy"])
    rows = {(row["model"], row["method"]): row["metrics"] for row in on_disk["results"]}
    assert set(rows) == {(m, a) for m in ("base", "shaken") for a in ("upi_grad", "random", "per_sample")}
    assert all(name in metrics for metrics in rows.values() for name in TABLE_METRICS)
    assert rows["base", "per_sample"]["flip_rate"] == 0  # the label is held
    assert "kendall_std" in rows["shaken", "random"]
    table = (tmp_path / "compare.md").read_text()
    assert "comparable only within one model" in table and "| per_sample | shaken |" in table
    assert " ± " in table and "PGD acc LINF ε = 0.1" in table
    assert (tmp_path / "compare.png").stat().st_size > 10_000 and (tmp_path / "compare.pdf").is_file()
    written = sorted((tmp_path / "base").rglob("*.json")) + sorted((tmp_path / "shaken").rglob("*.json"))
    times = {path: path.stat().st_mtime_ns for path in written if path.name != "report.json"}
    assert any(path.name == "profile.json" for path in times)
    again = compare_main(["--models", *two_models, *SMALL, f"--output={tmp_path}"])
    assert again["results"] == compared["results"] and again["models"] == compared["models"]
    assert {path: path.stat().st_mtime_ns for path in times} == times  # nothing refitted or reprofiled
    profile = tmp_path / "base" / "profile.json"  # as if written before an option that is null now existed,
    saved = json.loads(profile.read_text())  # by a version that kept chunk_size in the identity:
    del saved["identity"]["run"]["options"]["attack"]["upi_grad"]["step_size"]
    saved["identity"]["run"]["options"]["attack"]["upi_grad"]["chunk_size"] = 4
    profile.write_text(json.dumps(saved))
    written = profile.stat().st_mtime_ns
    assert compare_main(["--models", *two_models, *SMALL, f"--output={tmp_path}"])["models"] == compared["models"]
    assert profile.stat().st_mtime_ns == written  # resumed, as the attack runs are


def test_bad_models_are_one_line(two_models: list[str], tmp_path: Path) -> None:
    cases = {
        "at least two": ["--models", two_models[0]],
        "no checkpoint at": ["--models", two_models[0], f"other={tmp_path / 'missing.ckpt'}"],
        "'base' is given twice": ["--models", two_models[0], two_models[0]],
        "is not NAME=CKPT": ["--models", two_models[0], "no/name"],
        "not --ckpt": ["--models", *two_models, f"--ckpt={two_models[0].split('=')[1]}"],
    }
    for message, args in cases.items():
        with pytest.raises(UPIError, match=message) as error:
            parse_compare_args([*args, *SMALL])
        assert "\n" not in str(error.value)


def test_a_model_of_other_classes_is_refused_before_the_first_attack(
    two_models: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = torch.load(two_models[0].split("=")[1], weights_only=True)
    saved["hyper_parameters"]["num_classes"] = 9  # its head cut to 9 classes: a readable model of other data
    heads = [key for key, value in saved["state_dict"].items() if value.shape[:1] == (10,)]
    saved["state_dict"] |= {key: saved["state_dict"][key][:9] for key in heads}
    torch.save(saved, tmp_path / "nine.ckpt")
    monkeypatch.setattr(compare_cli, "run_attack", lambda config: pytest.fail("attacked before checking"))
    with pytest.raises(UPIError, match=r"trained on images \(1, 28, 28\) with 9 classes, but the data has"):
        compare_main(["--models", two_models[0], f"nine={tmp_path / 'nine.ckpt'}", *SMALL, f"--output={tmp_path}"])


def test_one_argument_of_the_first_models_data_changes_alone(two_models: list[str]) -> None:
    config = parse_compare_args(["--models", *two_models, "--data.num_test=96"])
    assert config.data.class_path.endswith(".SyntheticDataModule") and config.data.init_args.num_test == 96
    assert config.data.init_args.num_train == 512  # the rest as the first model's checkpoint records it

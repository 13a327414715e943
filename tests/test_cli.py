from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import REPO, scalar_points
from upi_lightning.attack_cli import attack_main
from upi_lightning.cli import train_cli
from upi_lightning.module import Classifier
from upi_lightning.perturbation import UniversalPerturbation

SYNTHETIC = [
    "--data=upi_lightning.data.SyntheticDataModule",
    "--data.num_train=256",
    "--data.num_test=64",
    "--data.batch_size=32",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def test_fit_writes_a_checkpoint_that_reloads_to_the_same_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cli = train_cli(
        [
            "fit",
            *SYNTHETIC,
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=1",
        ]
    )
    last = Path(cli.last_checkpoint_path).resolve()
    assert last.name == "last.ckpt" and last.parents[2] == (tmp_path / "runs" / "default").resolve()
    assert sorted(p.name for p in last.parent.iterdir()) == ["best-epoch00.ckpt", "last.ckpt"]
    assert list((last.parent.parent).glob("events.out.tfevents.*"))
    assert "hp_metric" not in scalar_points(last.parent.parent)  # no placeholder -1 in the dashboard
    restored = Classifier.load_from_checkpoint(last, map_location="cpu", weights_only=True)
    assert list(restored.hparams.input_shape) == [1, 28, 28] and restored.hparams.num_classes == 10
    x = torch.rand(5, 1, 28, 28)
    cli.model.eval()
    restored.eval()
    torch.testing.assert_close(restored(x), cli.model(x), rtol=0, atol=0)


@pytest.mark.parametrize("config", sorted(path.name for path in (REPO / "configs").glob("*.yaml")))
def test_training_configs_log_no_placeholder_hp_metric(config: str) -> None:
    logger = yaml.safe_load((REPO / "configs" / config).read_text()).get("trainer", {}).get("logger")
    if logger is not None:  # attack configs have no trainer logger
        assert logger["init_args"]["default_hp_metric"] is False


def test_last_checkpoint_follows_its_step_trigger_before_any_validation_and_holds_the_final_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cli = train_cli(["fit", *SYNTHETIC, "--trainer.max_steps=7", "--last_checkpoint.every_n_train_steps=3"])
    folder = Path(cli.trainer.logger.log_dir) / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]  # no validation ran: no best yet
    saved = torch.load(folder / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 7  # saved at 3 and 6 (mid-epoch 0 of 8 batches), then at the end: the final state
    assert cli.instantiated("last_checkpoint")._last_global_step_saved == 7


def run_train(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True, timeout=120, cwd=REPO
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fit", "--model.arch=resnet9000", *SYNTHETIC], "error: Unknown model arch 'resnet9000'"),
        (["fit", "--model.lrr=0.1", *SYNTHETIC], "error: "),
        (
            [
                "fit",
                "--data=upi_lightning.data.MNISTDataModule",
                "--data.root=/nonexistent/mnist",
                "--data.download=false",
            ],
            "error: MNIST not found under /nonexistent/mnist",
        ),
        (
            ["fit", "--data=upi_lightning.data.NpzDataModule", "--data.path=/nonexistent/data.npz"],
            "error: No .npz file at /nonexistent/data.npz",
        ),
        (
            [
                "fit",
                "--model.regularizers",
                '[{"class_path": "upi_lightning.regularizers.IGNorm", "init_args": {"weigth": 1}}]',
                *SYNTHETIC,
            ],
            "error: IGNorm has no option 'weigth'; its options: weight, norm, eps",
        ),
    ],
    ids=["unknown-model", "config-typo", "wrong-data-root", "missing-npz", "regularizer-typo"],
)
def test_bad_input_gives_a_one_line_error(args: list[str], message: str) -> None:
    result = run_train(*args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert "Traceback" not in result.stderr


def test_help_and_print_config() -> None:
    assert "--model.arch" in run_train("fit", "--help").stdout
    config = run_train("fit", "--config", "configs/mnist.yaml", "--print_config").stdout
    assert "MNISTDataModule" in config and "arch: small_cnn" in config


def test_attack_py_reports_a_data_error_from_init_as_one_line() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "attack.py"),
            "--ckpt=/no.ckpt",
            "--data=upi_lightning.data.NpzDataModule",
            "--data.path=/no.npz",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: No .npz file at /no.npz; set data.path to a file with arrays " + (
        "train_images, train_labels, test_images, test_labels."
    )


def test_attack_on_two_processes_writes_the_one_process_report(checkpoint: Path, tmp_path: Path) -> None:
    """``--trainer.devices 2`` (DDP over gloo, spawned): every method's numbers and files equal one process's."""
    common = [
        f"--config={REPO / 'configs' / 'attack_quickstart.yaml'}",
        f"--ckpt={checkpoint}",
        "--attack.fit_samples=64",
        "--attack.eval_samples=64",
        "--attack.batch_size=32",
        "--attack.upi_pca.solver=svd",  # exact: an unconverged power iterate amplifies summation-order rounding
        "--progress=false",
    ]
    one = attack_main([*common, f"--output={tmp_path / 'one'}"])
    two = attack_main(
        [
            *common,
            f"--output={tmp_path / 'two'}",
            "--trainer.accelerator=cpu",
            "--trainer.devices=2",
            "--trainer.strategy=ddp_spawn",
        ]
    )
    assert one is not None and two is not None and two["machine"].endswith("2 processes")
    assert [(r["method"], r["norm"]) for r in two["results"]] == [(r["method"], r["norm"]) for r in one["results"]]
    for single, double in zip(one["results"], two["results"], strict=True):
        for key, value in single["metrics"].items():
            assert double["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (single["method"], key)
    for path in sorted((tmp_path / "one" / "perturbations").glob("*.pt")):
        alone = UniversalPerturbation.load(path).delta
        shared = UniversalPerturbation.load(tmp_path / "two" / "perturbations" / path.name).delta
        torch.testing.assert_close(shared, alone, atol=1e-5, rtol=0)
    assert (tmp_path / "two" / "report.md").is_file() and list((tmp_path / "two").glob("figure_*.png"))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--trainer.devices=2", "--trainer.strategy=bogus"], "invalid strategy name: `strategy='bogus'`"),
        (["--trainer.devices=0"], "`Fabric(devices=0)` value is not a valid input"),
    ],
)
def test_bad_device_flags_of_attack_py_are_one_line(flags: list[str], message: str) -> None:
    data = "--data=upi_lightning.data.SyntheticDataModule"
    result = subprocess.run(
        [sys.executable, str(REPO / "attack.py"), "--ckpt=/no.ckpt", data, *flags],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: Invalid --trainer settings") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

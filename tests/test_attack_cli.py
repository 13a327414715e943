"""The ``attack.py`` command line (``upi_lightning.attack_cli``): data from the checkpoint, flags, devices."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from jsonargparse import ArgumentParser

from tests.helpers import write_payload
from upi_lightning.attack_cli import DeviceSettings, attack_parser, parse_attack_args
from upi_lightning.attacks.run_folder import identity_difference
from upi_lightning.checkpoints import load_classifier, stored_datamodule
from upi_lightning.compare_cli import compare_parser
from upi_lightning.errors import CheckpointMismatchError, UPIError


def test_ckpt_alone_rebuilds_the_data_module_it_was_trained_on(checkpoint: Path, tmp_path: Path) -> None:
    config = parse_attack_args([f"--ckpt={checkpoint}"])
    assert config.data.class_path == "upi_lightning.data.synthetic.SyntheticDataModule"
    assert (config.data.init_args.num_train, config.data.init_args.num_test) == (512, 128)
    assert config.data.init_args.batch_size == 32
    given = parse_attack_args([f"--ckpt={checkpoint}", "--data=upi_lightning.data.SyntheticDataModule"])
    assert given.data.init_args.num_train == 2048  # a --data of one's own wins
    for changed in (
        [f"--ckpt={checkpoint}", "--data.num_test=96"],
        ["--data.num_test", "96", "--ckpt", str(checkpoint)],
    ):
        one = parse_attack_args(changed)  # one argument of the recorded module changed, the others kept
        assert one.data.class_path.endswith(".SyntheticDataModule") and one.data.init_args.num_test == 96
        assert (one.data.init_args.num_train, one.data.init_args.batch_size) == (512, 32)
    config_file = tmp_path / "attack.yaml"  # the checkpoint named in a config file, one data argument changed
    config_file.write_text(f"ckpt: {checkpoint}\n")
    from_file = parse_attack_args([f"--config={config_file}", "--data.num_test", "96"])
    assert (from_file.data.init_args.num_test, from_file.data.init_args.num_train) == (96, 512)
    with pytest.raises(UPIError, match="No checkpoint at"):
        parse_attack_args([f"--ckpt={tmp_path / 'missing.ckpt'}", "--data.num_test=96"])


def test_a_checkpoint_that_records_no_data_module_asks_for_data(checkpoint: Path, tmp_path: Path) -> None:
    saved = torch.load(checkpoint, weights_only=True)
    del saved["datamodule_hyper_parameters"]  # as checkpoints of earlier versions
    torch.save(saved, tmp_path / "old.ckpt")
    with pytest.raises(UPIError, match=r"does not record the data module .* give --data"):
        parse_attack_args([f"--ckpt={tmp_path / 'old.ckpt'}"])
    with pytest.raises(UPIError, match="--model needs --data"):
        parse_attack_args(["--model=torchvision.resnet18"])
    with pytest.raises(UPIError, match="No checkpoint at"):
        stored_datamodule(tmp_path / "missing.ckpt")
    perturbation = write_payload(tmp_path / "upi.pt")  # a perturbation file given as the checkpoint
    with pytest.raises(CheckpointMismatchError, match=r"upi.pt is not a checkpoint of train.py \(no state_dict\)"):
        parse_attack_args([f"--ckpt={perturbation}"])
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointMismatchError, match=r"tensor.pt is not a checkpoint of train.py"):
        load_classifier(tmp_path / "tensor.pt")  # Lightning's own loader raised IndexError


def test_one_flag_style_with_the_dashed_alias_and_one_way_to_choose_the_device(checkpoint: Path) -> None:
    config = parse_attack_args([f"--ckpt={checkpoint}", "--eval_ckpt=a.ckpt", "--eval-ckpt=b.ckpt"])
    assert config.eval_ckpt == ["a.ckpt", "b.ckpt"]
    with pytest.raises(SystemExit):
        attack_parser().parse_args([f"--ckpt={checkpoint}", "--device=cpu"])  # --trainer.accelerator does it
    assert DeviceSettings(accelerator="cpu").fabric().device == torch.device("cpu")
    assert not DeviceSettings(devices=[0]).several() and not DeviceSettings().several()
    assert DeviceSettings(devices=2).several() and DeviceSettings(strategy="ddp").several()


@pytest.mark.parametrize("parser", [attack_parser, compare_parser], ids=["attack", "compare"])
def test_print_config_writes_a_config_that_reads_back(
    parser: Callable[[], ArgumentParser], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["--data=upi_lightning.data.SyntheticDataModule", "--print_config"])
    printed = capsys.readouterr().out
    assert "Unable to serialize" not in printed and "- norm: l2\n    eps: 1.0" in printed
    (tmp_path / "config.yaml").write_text(printed)
    config = parser().parse_args([f"--config={tmp_path / 'config.yaml'}"])
    assert config.attack.budgets[0].norm == "l2" and config.attack.budgets[0].eps == 1.0


def test_run_files_of_earlier_versions_hold_default_budgets_as_their_repr() -> None:
    current = {"options": {"attack": {"budgets": [{"norm": "l2", "eps": 1.0}], "target": "label"}}}
    older = {"options": {"attack": {"budgets": ["Budget(norm='l2', eps=1.0)"]}}}
    assert identity_difference(older, current) is None
    other = {"options": {"attack": {"budgets": ["Budget(norm='linf', eps=0.1)"]}}}
    assert identity_difference(other, current) == (
        'options.attack.budgets: [{"norm": "linf", "eps": 0.1}] there, [{"norm": "l2", "eps": 1.0}] now'
    )

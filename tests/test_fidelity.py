"""Fidelity to the reference code (issue #9): builder teachers trained here, cached teachers of an older
architecture version, checkpoints in the reference's (CRD/CMI model zoo) key names, Tiny-ImageNet's generator."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from cpsc_ray.config import Config, load_config, with_values
from cpsc_ray.errors import InputError
from cpsc_ray.method.generators import ConditionalBatchNorm2d, UpsampleGenerator, build_generator
from cpsc_ray.method.models import ARCH_VERSIONS, build_model
from cpsc_ray.runs.teacher import (
    TeacherCard,
    card_path,
    load_teacher,
    resolve_weights,
    train_teacher,
    weights_exist,
    write_teacher,
)
from cpsc_ray.runs.teacher import train as teacher_training


def digits_resnet18(num_classes: int = 10) -> nn.Module:
    """A user's torchvision ResNet-18 with a 1-channel 3x3 stem for the 16 px digits."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    return model


def test_builder_teacher_trains_and_loads(tmp_path):
    cfg = with_values(
        load_config("digits", ["teacher_training.epochs=2"]),
        {"teacher.arch": None, "teacher.builder": "test_fidelity:digits_resnet18", "teacher.feature_layer": "avgpool"},
    )
    path = train_teacher(cfg, out=tmp_path, progress=False)
    card = json.loads(card_path(path).read_text())
    assert card["arch"] == "test_fidelity:digits_resnet18"
    assert card["test_acc"] > 0.3  # chance is 0.1: it learnt
    teacher = load_teacher(with_values(cfg, {"teacher.weights": str(path)}))
    assert teacher.card.arch == card["arch"] and teacher.model.model.fc.out_features == 10


def digits_with(values: dict) -> Config:
    return with_values(load_config("digits"), values)


def test_teacher_cached_under_an_older_arch_version_is_not_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("CPSC_RAY_CACHE", str(tmp_path))
    cfg = digits_with({"teacher.arch": "vgg11_bn"})
    with monkeypatch.context() as old:
        old.setitem(ARCH_VERSIONS, "vgg11_bn", 1)
        stale = Path(resolve_weights(cfg))
    card = TeacherCard("vgg11_bn", "digits", 10, 16, 1, [0.3], [0.3])
    write_teacher(stale, build_model("vgg11_bn", 10, 1).state_dict(), card)
    # Written before versions existed: the card has no arch_version.
    card_path(stale).write_text(json.dumps({k: v for k, v in asdict(card).items() if k != "arch_version"}))

    assert resolve_weights(cfg) != str(stale) and not weights_exist(resolve_weights(cfg))
    trained = []
    monkeypatch.setattr(teacher_training, "train_teacher", lambda cfg, progress: trained.append(cfg))
    teacher_training.ensure_teacher(cfg, progress=False)
    assert trained, "teacher.weights=auto must train the current version, not reuse the stale one"

    with pytest.raises(InputError, match="vgg11_bn version 1, but vgg11_bn is now version 2") as info:
        load_teacher(with_values(cfg, {"teacher.weights": str(stale)}))
    assert "\n" not in str(info.value) and "retrain" in str(info.value)


# Our names -> the reference's (CRD/CMI zoo), as read from its network/vgg.py and network/wresnet.py.
TO_ZOO = {
    "vgg": [(r"^stages\.(\d+)\.", r"block\1.")],
    "wrn": [(r"^block(\d+)\.(\d+)\.", r"block\1.layer.\2."), (r"\.shortcut\.", ".convShortcut."), (r"^bn\.", "bn1.")],
}


def zoo_checkpoint(arch: str, path: Path) -> nn.Module:
    """A randomly initialised model (random BN statistics too), saved as the zoo saves it; returns the model."""
    model = build_model(arch, 10, 1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            nn.init.normal_(m.weight)
    state = {}
    for key, value in model.state_dict().items():
        for pattern, replacement in TO_ZOO[arch[:3]]:
            key = re.sub(pattern, replacement, key)
        state[key] = value
    torch.save({"state_dict": state, "best_acc": 0.9}, path)
    return model.eval()


@pytest.mark.parametrize("arch", ["vgg11_bn", "vgg8_bn", "wrn_16_2", "wrn_40_1"])
def test_zoo_named_checkpoint_loads_and_computes_the_same(arch, tmp_path):
    source = zoo_checkpoint(arch, tmp_path / "teacher.pt")
    teacher = load_teacher(digits_with({"teacher.arch": arch, "teacher.weights": str(tmp_path / "teacher.pt")}))
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(teacher.model(x), source(x))


def test_zoo_named_checkpoint_with_a_wrong_key_names_it(tmp_path):
    zoo_checkpoint("wrn_16_2", tmp_path / "teacher.pt")
    saved = torch.load(tmp_path / "teacher.pt", weights_only=True)
    state = saved["state_dict"]
    state["block1.layer.0.bn3.weight"] = state.pop("block1.layer.0.bn2.weight")
    del state["fc.bias"]
    torch.save(saved, tmp_path / "teacher.pt")
    with pytest.raises(InputError) as info:
        load_teacher(digits_with({"teacher.arch": "wrn_16_2", "teacher.weights": str(tmp_path / "teacher.pt")}))
    message = str(info.value)
    assert "\n" not in message
    assert "missing from the file: block1.0.bn2.weight, fc.bias;" in message
    assert "the model lacks: block1.layer.0.bn3.weight;" in message


def test_tiny_imagenet_runs_the_references_upsample_generator_at_64px():
    cfg = load_config("tiny_imagenet_resnet34_resnet18")
    assert cfg.generator.arch == "upsample"
    g = build_generator(cfg.generator.arch, cfg.generator.nz, cfg.generator.ngf, 3, 64, 200)
    assert isinstance(g, UpsampleGenerator) and g.project.out_features == 2 * cfg.generator.ngf * 16 * 16
    assert isinstance(g.norm_out, ConditionalBatchNorm2d)
    assert g(torch.randn(2, cfg.generator.nz), torch.tensor([0, 199])).shape == (2, 3, 64, 64)


def test_a_teacher_recipe_field_added_later_keeps_the_cache_slots_of_teachers_trained_before_it(monkeypatch):
    monkeypatch.setenv("CPSC_RAY_CACHE", "/cache")
    # The slot the digits default's teacher had before teacher_training.label_smoothing existed.
    assert (
        resolve_weights(load_config("digits"))
        == "/cache/teachers/digits-digits_teacher-4a53c1e3502c/teacher.safetensors"
    )
    smoothed = resolve_weights(load_config("digits", ["teacher_training.label_smoothing=0.1"]))
    assert smoothed != resolve_weights(load_config("digits"))

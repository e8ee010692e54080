"""Bad input gets a one-line error that names the field and the fix, and loses nothing written."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from cpsc_ray.cli import main
from cpsc_ray.config import flatten, load_config, with_values
from cpsc_ray.errors import InputError
from cpsc_ray.method.models import build_model
from cpsc_ray.runs.assembly import prepare_engine
from cpsc_ray.runs.checkpoints import CheckpointError, read_checkpoint
from cpsc_ray.runs.teacher import load_teacher
from cpsc_ray.storage import Storage


def error_of(fn, *args) -> str:
    with pytest.raises(InputError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_key_names_it():
    assert "loss.alpah: unknown key" in error_of(load_config, "digits", ["loss.alpah=1"])


def test_wrong_type_names_field_and_value():
    message = error_of(load_config, "digits", ["train.epochs=many"])
    assert "train.epochs" in message and "'many'" in message


def test_unknown_config_lists_shipped_ones():
    assert "digits" in error_of(load_config, "nonsense", [])


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    assert "not valid YAML" in error_of(load_config, str(bad), [])


def test_override_without_equals():
    assert "dotted.key=value" in error_of(load_config, "digits", ["loss.alpha"])


def test_reference_dynamics_preset_fills_the_fields_left_unset():
    reference = load_config("digits", ["dynamics=reference"])
    assert reference.generator.reset_optimizer and reference.generator.lr_milestones == []
    assert reference.loss.ce_on == "probabilities" and reference.loss.base_temperature == 0.07
    own = load_config("digits", ["dynamics=reference", "generator.lr_milestones=[0.5]"])
    assert own.generator.lr_milestones == [0.5] and own.generator.reset_optimizer
    fixed = load_config("digits", ["generator.lr_milestones=[0.5]"])
    assert not fixed.generator.reset_optimizer and fixed.loss.ce_on == "logits"
    # Changing the preset of a whole config (as tuning and finalize do) fills its fields afresh.
    switched = with_values(fixed, {"dynamics": "reference"})
    assert switched.generator.reset_optimizer and switched.generator.lr_milestones == []
    back = with_values(switched, {"dynamics": "fixed"})
    assert not back.generator.reset_optimizer and back.loss.ce_on == "logits"


# The reference code's CIFAR-100 run as its README's command and its code set it (CPSC_DFKD.py): the values
# that decide what it computes. Per-step Adam re-creation is reset_optimizer; its generator scheduler steps an
# optimizer nothing uses (no decay); its CE takes softmax outputs; IKD is plain MSE except on CIFAR-10.
REFERENCE_CIFAR100 = {
    "train.epochs": 600,
    "train.iterations_per_epoch": 50,
    "train.batch_size": 512,
    "train.g_steps": 6,
    "train.s_steps": 5,
    "student.lr": 0.1,
    "student.momentum": 0.9,
    "student.weight_decay": 5e-4,
    "student.warmup_fraction": 10 / 600,
    "generator.lr": 1e-3,
    "generator.beta1": 0.5,
    "generator.beta2": 0.999,
    "generator.lr_milestones": [],
    "generator.reset_optimizer": True,
    "generator.nz": 256,
    "generator.kind": "conditional",
    "loss.alpha": 5.0,
    "loss.beta": 1.0,
    "loss.gamma": 0.7,
    "loss.eta": 0.7,
    "loss.eta_student": 0.7,
    "loss.temperature": 0.07,
    "loss.base_temperature": 0.07,
    "loss.ce_on": "probabilities",
    "loss.ikd_form": "mse",
    "loss.bn_form": "raw",
    "loss.kd_temperature": None,
    "loss.gate_pseudo_labels": False,
    "loss.gate_contrast": False,
    "loss.adversarial": 1.0,
    "loss.adversarial_warmup": 0.0,
    "loss.train_projection_head": False,
}


@pytest.mark.parametrize("config", ["cifar100_resnet34_resnet18", "cifar10_resnet34_resnet18"])
def test_the_reference_preset_resolves_to_the_reference_code_s_run(config):
    resolved = flatten(load_config(config, ["dynamics=reference"]))
    expected = {**REFERENCE_CIFAR100, "loss.ikd_form": "log" if config.startswith("cifar10_") else "mse"}
    assert {key: resolved[key] for key in expected} == expected


def test_teacher_arch_and_builder_are_exclusive():
    assert "exactly one of teacher.arch" in error_of(load_config, "digits", ["teacher.builder=x:y"])


@pytest.mark.parametrize(
    "overrides",
    [["loss.eta=0"], ["generator.kind=unconditional", "loss.eta=0", "loss.eta_student=0"]],
)
def test_an_agreement_target_needs_a_conditional_generator_with_its_ce(overrides):
    message = error_of(load_config, "digits", ["loss.agreement_target=0.7", *overrides])
    assert "loss.agreement_target" in message and "loss.agreement_target=0" in message


def test_cifar_needs_teacher_weights_and_data_root(digits_cfg):
    from cpsc_ray.data import load_splits

    cfg = with_values(digits_cfg, {"data.dataset": "cifar10", "teacher.arch": "resnet18", "teacher.weights": None})
    assert "teacher.weights: required" in error_of(load_teacher, cfg)
    assert "data.root" in error_of(lambda: load_splits(cfg.data, augment=False))


def _save(tmp_path, model, name="t.pt", card=None):
    path = tmp_path / name
    torch.save(model.state_dict(), path)
    if card is not None:
        path.with_suffix(".json").write_text(json.dumps(card))
    return path


def test_teacher_with_other_class_count(digits_cfg, tmp_path, capsys):
    path = _save(tmp_path, build_model("digits_teacher", 5, 1))
    message = error_of(load_teacher, with_values(digits_cfg, {"teacher.weights": str(path)}))
    assert "teacher.weights" in message and "size mismatch" in message
    runs = tmp_path / "runs"
    assert main(["distill", f"teacher.weights={path}", f"output_dir={runs}"]) == 2
    assert "size mismatch" in capsys.readouterr().err and not runs.exists()  # no half-made run directory


def test_teacher_card_with_other_input_size(digits_cfg, tmp_path):
    card = {
        "arch": "digits_teacher",
        "dataset": "digits",
        "num_classes": 10,
        "input_size": 32,
        "channels": 1,
        "mean": [0.3],
        "std": [0.3],
    }
    path = _save(tmp_path, build_model("digits_teacher", 10, 1), card=card)
    message = error_of(load_teacher, with_values(digits_cfg, {"teacher.weights": str(path)}))
    assert "input_size=32" in message and "data.dataset=digits" in message


def test_stated_class_count_must_match_dataset(digits_cfg):
    message = error_of(load_teacher, with_values(digits_cfg, {"teacher.num_classes": 100}))
    assert "teacher.num_classes" in message and "100" in message


def test_missing_teacher_file(digits_cfg, tmp_path):
    message = error_of(load_teacher, with_values(digits_cfg, {"teacher.weights": str(tmp_path / "none.pt")}))
    assert "does not exist" in message


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("damaged.safetensors", "header too large"),
        ("damaged.pt", "Unsupported operand"),
        ("pickled-model.pt", "Unsupported global: GLOBAL torch.nn.modules.linear.Linear"),
    ],
)
def test_a_teacher_file_that_does_not_load_is_named_with_the_reason(digits_cfg, tmp_path, name, reason):
    path = tmp_path / name
    if name.startswith("pickled"):
        torch.save(torch.nn.Linear(2, 2), path)
    else:
        path.write_bytes(b"not a teacher")
    message = error_of(load_teacher, with_values(digits_cfg, {"teacher.weights": str(path)}))
    assert message.startswith(f"teacher.weights: {path} is not a loadable weights file (") and reason in message


def byo(digits_cfg, tmp_path, builder, **extra):
    model = getattr(__import__("byo_models"), builder)()
    path = _save(tmp_path, model)
    values = {"teacher.arch": None, "teacher.builder": f"byo_models:{builder}", "teacher.weights": str(path), **extra}
    return with_values(digits_cfg, values)


def test_a_teacher_without_a_linear_head_asks_for_feature_layer(digits_cfg, tmp_path):
    message = error_of(load_teacher, byo(digits_cfg, tmp_path, "conv_only_cnn"))
    assert message.startswith("teacher.feature_layer:") and "no linear classifier layer" in message


def test_the_feature_tap_finds_the_head_of_a_torchvision_model_without_avgpool(digits_cfg, tmp_path):
    """MobileNetV2 has no ``avgpool``: with no feature_layer named, the tap reads the input of its last linear
    layer (``classifier.1``), the pooled 1280-wide feature the classifier sees."""
    teacher = load_teacher(byo(digits_cfg, tmp_path, "torchvision_mobilenet_v2"))
    images = torch.randn(4, 1, 16, 16)
    logits, features = teacher.model(images, return_features=True)
    inner = teacher.model.model
    expected = torch.flatten(F.adaptive_avg_pool2d(inner.features(images), 1), 1)
    assert features.shape == (4, 1280) and torch.allclose(features, expected, atol=1e-6)
    assert torch.allclose(logits, inner.classifier(expected), atol=1e-6)


def test_feature_layer_that_does_not_exist_lists_layers(digits_cfg, tmp_path):
    message = error_of(load_teacher, byo(digits_cfg, tmp_path, "plain_cnn", **{"teacher.feature_layer": "avgpool"}))
    assert "no layer 'avgpool'" in message and "'4'" not in message and "4" in message


def test_builder_teacher_distils_through_a_feature_tap(digits_cfg, tmp_path):
    cfg = byo(digits_cfg, tmp_path, "plain_cnn", **{"teacher.feature_layer": "4", "output_dir": str(tmp_path / "runs")})
    engine = prepare_engine(cfg).engine
    metrics = engine.train_epoch()
    # An 8-wide teacher feature vs a 64-wide student's: the projection head maps between them.
    assert metrics["g_scl"] is not None and engine.synthesizer.head is not None


def test_teacher_without_bn_and_positive_beta(digits_cfg, tmp_path):
    cfg = byo(digits_cfg, tmp_path, "no_bn_cnn", **{"teacher.feature_layer": "3"})
    assert "loss.beta=0" in error_of(prepare_engine, cfg)
    assert prepare_engine(with_values(cfg, {"loss.beta": 0.0})).engine.synthesizer.bn_prior is None


def test_unimportable_builder(digits_cfg, tmp_path):
    cfg = with_values(digits_cfg, {"teacher.arch": None, "teacher.builder": "no_such_module:f"})
    assert "teacher.builder" in error_of(load_teacher, cfg)


def test_damaged_checkpoint_is_named(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "state.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "ckpt" / "meta.json").write_text("{}")
    with pytest.raises(CheckpointError, match="ckpt"):
        read_checkpoint(Storage(str(tmp_path / "ckpt")))
    assert (tmp_path / "ckpt" / "state.pt").read_bytes() == b"not a checkpoint"


def test_resume_of_unknown_run(tiny_cfg, capsys):
    assert main(["distill", "--resume", "nothing-here", f"output_dir={tiny_cfg.output_dir}"]) == 2
    assert "--resume nothing-here" in capsys.readouterr().err


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("key", ["student.arch", "teacher.arch"])
def test_an_unknown_model_name_fails_before_anything_is_written(key, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["distill", f"{key}=resnet_nope", f"output_dir={runs}"]) == 2
    assert f"{key}: unknown model 'resnet_nope'; choose one of:" in one_line_error(capsys) and not runs.exists()


def test_a_location_pyarrow_cannot_open(capsys):
    assert main(["finalize", "exp", "--storage", "nosuch://bucket/runs"]) == 2
    assert "nosuch://bucket/runs: not a location pyarrow can open" in one_line_error(capsys)


def _tuned_experiment(root, base: dict) -> None:
    """An experiment as tune leaves it before any trial reported: its record, no results yet."""
    from cpsc_ray.cluster.tune.record import ExperimentRecord
    from cpsc_ray.layout import RootDir

    record = ExperimentRecord(
        base=base,
        experiment="exp",
        method="random+fifo",
        metric="val_acc",
        trials="",
        rounds="",
        workers=1,
        gpus_per_worker=0.0,
        cpus_per_worker=1.0,
        checkpoint_every=1,
        keep_checkpoints=3,
        population_based=False,
        searched_keys=[],
        options={},
    )
    record.write(RootDir(str(root)))


def test_finalize_of_unusable_experiments(tmp_path, capsys):
    _tuned_experiment(tmp_path, {"loss": {"alpah": 1.0}})
    assert main(["finalize", "exp", "--storage", str(tmp_path)]) == 2
    assert "exp's base config: loss.alpah: unknown key" in one_line_error(capsys)
    _tuned_experiment(tmp_path, {})
    assert main(["finalize", "exp", "--storage", str(tmp_path)]) == 2
    assert "no cpsc-ray results here" in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # no "-final" run begun


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--space is required for a new experiment"),
        (["--space", "no_such_space.yaml"], "no_such_space.yaml"),
        (["--space", "digits_pbt", "--scheduler", "pbt", "--seed-from", "nothing"], "no cpsc-ray results here"),
        (["--resume", "nothing"], "--resume: no Tune experiment at"),
    ],
)
def test_tune_refuses_bad_input_before_writing_or_starting_ray(args, message, tmp_path, capsys, monkeypatch):
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started before the input was checked")

    # As if no Ray ran yet (the session's shared instance may): a start would fail the test.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    runs = tmp_path / "runs"
    assert main(["tune", *args, "--storage", str(runs)]) == 2
    assert message in one_line_error(capsys) and not runs.exists()

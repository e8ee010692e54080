"""Search-space files: the shipped ones load, and each kind of error names the file, the key and the fix."""

from __future__ import annotations

import pytest

from cpsc_ray.cluster.tune.search_space import SearchSpaceError, available_spaces, load_search_space


def write(tmp_path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


def error(tmp_path, text: str, pbt: bool = False) -> str:
    with pytest.raises(SearchSpaceError) as info:
        space = load_search_space(write(tmp_path, text))
        if pbt:
            space.check_perturbable()
    assert str(tmp_path / "space.yaml") in str(info.value)
    return str(info.value)


def test_shipped_spaces_load_by_name():
    names = available_spaces()
    assert {"cpsc_optuna", "cpsc_pbt", "digits_optuna", "digits_pbt", "cpsc_optuna_cifar10"} <= set(names)
    for name in names:
        space = load_search_space(name)
        assert space.params and set(space.to_tune()) == set(space.params)
    for name in ("cpsc_pbt", "digits_pbt"):
        load_search_space(name).check_perturbable()
    optuna = load_search_space("cpsc_optuna")
    assert {
        "loss.alpha",
        "loss.beta",
        "loss.gamma",
        "loss.eta",
        "loss.temperature",
        "loss.kd_temperature",
        "generator.lr",
        "student.lr",
        "train.g_steps",
        "train.s_steps",
        "generator.nz",
        "generator.ngf",
        # what issue 9's root cause names: the schedule's shape and the IKD and BN forms
        "student.warmup_fraction",
        "generator.lr_milestones",
        "loss.ikd_form",
        "loss.bn_form",
        # issue 19's knobs: the student's own pseudo-label weight, its gate, the generator's warm-up
        "loss.eta_student",
        "loss.gate_pseudo_labels",
        "loss.gate_contrast",
        "loss.adversarial_warmup",
        # and whether the generator is conditional at all, which depends on the teacher (issue 19's zoo)
        "generator.kind",
        # and a memory of past images for the student, and its share of each batch
        "student.replay_images",
        "student.replay_fraction",
        # and the contrastive term over instances rather than pseudo-labels
        "loss.contrast_instances",
    } == set(optuna.params)
    pbt = load_search_space("cpsc_pbt").params
    knobs = {"loss.eta_student", "loss.adversarial_warmup", "loss.gate_pseudo_labels", "loss.gate_contrast"}
    assert knobs | {"student.warmup_fraction", "loss.bn_form"} <= set(pbt)
    for name in names:  # issue 19: a search can turn the generator's pseudo-label pull off
        assert load_search_space(name).params["loss.eta"].bounds[0] == 0, name


def test_pbt_steps_a_choice_along_its_values_and_pb2_refuses_one_of_names():
    space = load_search_space("cpsc_pbt")
    mutations = space.pbt_mutations()
    # Ray multiplies a tune.choice by 0.8 or 1.2 ("raw" * 1.2 fails, 0 stays 0): a list it steps along
    assert mutations["loss.bn_form"] == ["standardized", "raw"]
    assert mutations["loss.eta"] == [0.0, 0.03, 0.1, 0.3, 1.0, 3.0]
    assert mutations["train.g_steps"] == list(range(1, 9))
    with pytest.raises(SearchSpaceError, match=r"loss.gate_pseudo_labels is a choice of \[True, False\]"):
        space.check_perturbable("pb2")
    load_search_space("digits_pbt").check_perturbable("pb2")  # numbers only: PB2 can model it


def test_unknown_key_suggests_the_right_one(tmp_path):
    message = error(tmp_path, "params:\n  loss.alpah: {distribution: uniform, low: 1, high: 2}\n")
    assert "loss.alpah is not a run-config key" in message and "did you mean loss.alpha" in message


def test_unknown_distribution(tmp_path):
    message = error(tmp_path, "params:\n  loss.alpha: {distribution: lognormal, low: 1, high: 2}\n")
    assert "loss.alpha" in message and "unknown distribution 'lognormal'" in message and "loguniform" in message


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("{distribution: uniform, low: 2, high: 1}", "empty range"),
        ("{distribution: int, low: 3, high: 3}", "empty range"),
        ("{distribution: choice, values: []}", "non-empty list"),
        ("{distribution: loguniform, low: 0, high: 1}", "low > 0"),
    ],
)
def test_empty_or_impossible_ranges(tmp_path, spec, expected):
    assert expected in error(tmp_path, f"params:\n  loss.alpha: {spec}\n")


def test_a_model_shaping_key_cannot_be_perturbed_by_pbt(tmp_path):
    message = error(tmp_path, "params:\n  generator.nz: {distribution: choice, values: [32, 64]}\n", pbt=True)
    assert "generator.nz cannot be perturbed mid-run" in message and "--seed-from" in message


def test_values_outside_the_config_constraints_are_refused(tmp_path):
    message = error(tmp_path, "params:\n  train.g_steps: {distribution: int, low: 0, high: 3}\n")
    assert "train.g_steps" in message


def test_missing_params_and_unknown_names(tmp_path):
    assert "params:" in error(tmp_path, "loss.alpha: {distribution: uniform, low: 1, high: 2}\n")
    with pytest.raises(SearchSpaceError, match="cpsc_pbt"):
        load_search_space("no_such_space")


def test_seed_defaults_starts_the_first_trial_at_the_configs_own_values(digits_cfg):
    from cpsc_ray.cli import build_parser
    from cpsc_ray.cluster.tune import driver as tune_module
    from cpsc_ray.config import flatten

    space = load_search_space("digits_pbt", digits_cfg)
    point = tune_module.defaults_point(digits_cfg, space)
    assert set(point) == set(space.params) and all(point[k] == flatten(digits_cfg)[k] for k in point)
    args = build_parser().parse_args(["tune", "--space", "digits_pbt", "--seed-defaults"])
    assert args.seed_defaults


def test_seed_defaults_refuses_a_default_optuna_cannot_start_from(digits_cfg, tmp_path):
    """The digits config's generator.nz (64) is not among cpsc_optuna's choices: refused before Ray starts."""
    from cpsc_ray.cluster.tune.driver import TuneOptions, run_tune

    options = TuneOptions(space="cpsc_optuna", search="optuna", seed_defaults=True, storage=str(tmp_path))
    with pytest.raises(SearchSpaceError) as info:
        run_tune(digits_cfg, options)
    message = str(info.value)
    assert "generator.nz=64" in message and "[128, 256, 512]" in message and "generator.nz=128" in message
    assert not list(tmp_path.rglob("*.json"))  # nothing was started

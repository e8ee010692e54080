"""Model registry, the (logits, features) API, generators and the class-conditional BN block."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cpsc_ray.errors import InputError
from cpsc_ray.method.generators import ConditionalBatchNorm2d, build_generator
from cpsc_ray.method.models import MODELS, build_model

FEATURE_DIMS = {
    "resnet18": 512,
    "resnet34": 512,
    "wrn_16_1": 64,
    "wrn_16_2": 128,
    "wrn_40_1": 64,
    "wrn_40_2": 128,
    "vgg8_bn": 512,
    "vgg11_bn": 512,
    "digits_teacher": 128,
    "digits_student": 64,
}


def test_registry_holds_every_model_of_the_issue():
    assert set(MODELS.names()) == set(FEATURE_DIMS)


def test_unknown_model_names_the_choices():
    with pytest.raises(InputError, match="resnet18"):
        build_model("resnet19", 10)


@pytest.mark.parametrize("name", sorted(FEATURE_DIMS))
def test_models_give_logits_and_penultimate_features(name):
    channels, size = (1, 16) if name.startswith("digits") else (3, 32)
    model = build_model(name, num_classes=7, channels=channels).eval()
    x = torch.randn(2, channels, size, size)
    logits, features = model(x, return_features=True)
    assert logits.shape == (2, 7)
    assert features.shape == (2, FEATURE_DIMS[name]) == (2, model.feature_dim)
    assert torch.equal(model(x), logits)


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_resnets_take_64x64_tiny_imagenet_input(name):
    assert build_model(name, 200).eval()(torch.randn(1, 3, 64, 64)).shape == (1, 200)


# The CRD/CMI zoo's VGG (the reference's): pools before stages 1-3, and before the last stage only at 64 px.
VGG_STAGE_SIDES = {16: [16, 8, 4, 2, 2], 32: [32, 16, 8, 4, 4], 64: [64, 32, 16, 8, 4]}


@pytest.mark.parametrize("size", sorted(VGG_STAGE_SIDES))
@pytest.mark.parametrize("name", ["vgg8_bn", "vgg11_bn"])
def test_vgg_stage_shapes_match_the_model_zoo(name, size):
    widths = [64, 128, 256, 512, 512]  # both end their stages with these widths
    model = build_model(name, num_classes=5).eval()
    shapes = []
    for stage in model.stages:
        stage.register_forward_hook(lambda module, inputs, output: shapes.append(tuple(output.shape)))
    model(torch.randn(1, 3, size, size))
    assert shapes == [(1, w, side, side) for w, side in zip(widths, VGG_STAGE_SIDES[size])]


def test_conditional_bn_gives_each_class_its_own_output_for_the_same_input():
    block = ConditionalBatchNorm2d(num_classes=3, channels=4)
    nn.init.normal_(block.scale.weight)
    nn.init.normal_(block.shift.weight)
    x = torch.randn(1, 4, 5, 5).repeat(3, 1, 1, 1)
    out = block(x, torch.tensor([0, 1, 2]))
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])
    # Same class, same input, same output: the difference comes from the class embedding only.
    assert torch.allclose(block(x, torch.tensor([1, 1, 1]))[0], out[1])


def test_conditional_bn_starts_as_plain_normalisation():
    block = ConditionalBatchNorm2d(num_classes=3, channels=2)
    x = torch.randn(8, 2, 3, 3)
    assert torch.allclose(block(x, torch.zeros(8, dtype=torch.long)), nn.BatchNorm2d(2, affine=False)(x), atol=1e-6)


@pytest.mark.parametrize("arch, size", [("upsample", 32), ("upsample", 16), ("dcgan", 64)])
@pytest.mark.parametrize("channels", [1, 3])
def test_generators_shapes(arch, size, channels):
    generator = build_generator(arch, nz=16, ngf=8, channels=channels, image_size=size, num_classes=5)
    assert generator(torch.randn(4, 16), torch.tensor([0, 1, 2, 3])).shape == (4, channels, size, size)


@pytest.mark.parametrize("size", [16, 32, 64])
def test_auto_is_the_reference_choice_upsample_at_every_size(size):
    assert type(build_generator("auto", 8, 4, 3, size, 10)).__name__ == "UpsampleGenerator"


def test_unconditional_generator_ignores_labels():
    generator = build_generator("upsample", 8, 4, 3, 32, 10, conditional=False).eval()
    z = torch.randn(2, 8)
    assert torch.equal(generator(z, torch.tensor([0, 1])), generator(z, torch.tensor([5, 9])))
    assert not any(isinstance(m, ConditionalBatchNorm2d) for m in generator.modules())


def test_conditional_generator_depends_on_labels():
    generator = build_generator("upsample", 8, 4, 3, 32, 10)
    for m in generator.modules():
        if isinstance(m, ConditionalBatchNorm2d):
            nn.init.normal_(m.scale.weight)
    generator.eval()
    z = torch.randn(2, 8)
    assert not torch.allclose(generator(z, torch.tensor([0, 1])), generator(z, torch.tensor([5, 9])))


def test_generator_rejects_sizes_its_architecture_cannot_make():
    with pytest.raises(ValueError, match="divisible by 16"):
        build_generator("dcgan", 8, 4, 3, 40, 10)


def test_a_registry_refuses_a_name_twice_and_names_the_field_of_an_unknown_one():
    from cpsc_ray.data import DATASETS
    from cpsc_ray.method.generators import GENERATORS, UpsampleGenerator
    from cpsc_ray.registry import Registry

    registry: Registry[int] = Registry("widget")
    assert registry.register("a")(1) == 1 and registry.get("a") == 1 and "a" in registry
    with pytest.raises(ValueError, match="widget 'a' is registered twice"):
        registry.add("a", 2)
    for entries, key in ((MODELS, "student.arch"), (GENERATORS, "generator.arch"), (DATASETS, "data.dataset")):
        with pytest.raises(InputError, match=rf"^{key}: unknown .* 'nope'; choose one of: .*\(cpsc-ray models\)$"):
            entries.get("nope", key)
    assert GENERATORS.get("auto") is GENERATORS.get("upsample") is UpsampleGenerator

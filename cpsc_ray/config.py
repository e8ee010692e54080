"""Typed run configuration: defaults here, a YAML file over them, dotted overrides over that.

Every field has a default taken from METHOD.md (the reference CIFAR-100 run) unless noted;
the shipped configs in ``cpsc_ray/configs`` set budgets for each dataset.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cpsc_ray.errors import InputError
from cpsc_ray.reference import REFERENCE_FIELDS, reference_dynamics


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    dataset: Literal["digits", "cifar10", "cifar100", "tiny_imagenet", "imagefolder"] = Field(
        "digits", description="the teacher's dataset: its test split scores the student (cpsc-ray models)"
    )
    root: str | None = Field(None, description="directory holding the dataset files (not needed for digits)")
    image_size: int | None = Field(
        None, ge=8, description="digits: side length to upsample to (default 16); imagefolder: resize target"
    )
    val_size: int = Field(300, ge=0, description="real training images held out for model selection (0: none)")
    split_seed: int = Field(0, description="seed of the fixed train/val(/test) split")
    num_workers: int = Field(0, ge=0, description="DataLoader workers for teacher training and evaluation")


class TeacherConfig(Section):
    arch: str | None = Field(None, description="registry model name (cpsc-ray models)")
    builder: str | None = Field(None, description="'package.module:function' that returns the model")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the builder")
    weights: str | None = Field(
        None,
        description="weights file (.pt state dict or .safetensors); 'auto': the cached teacher, trained if missing",
    )
    feature_layer: str | None = Field(
        None,
        description="module whose output is the penultimate feature, for models without return_features (unset: "
        "the input of the last linear layer the model calls)",
    )
    num_classes: int | None = Field(None, ge=2, description="stated class count; checked against the dataset")
    input_size: int | None = Field(None, ge=8, description="stated input side length; checked against the dataset")
    channels: int | None = Field(None, ge=1, description="stated input channels; checked against the dataset")
    mean: list[float] | None = Field(None, description="input normalisation mean (default: the dataset's)")
    std: list[float] | None = Field(None, description="input normalisation std (default: the dataset's)")

    @model_validator(mode="after")
    def _one_source(self) -> "TeacherConfig":
        if (self.arch is None) == (self.builder is None):
            raise ValueError("set exactly one of teacher.arch (a registry name) or teacher.builder ('module:function')")
        return self


class TeacherTrainingConfig(Section):
    seed: int = Field(0, description="seed of the teacher's training (distillation seeds share one teacher)")
    epochs: int = Field(200, ge=1, description="epochs over the real training split")
    batch_size: int = Field(128, ge=1, description="real images per SGD step")
    lr: float = Field(0.1, gt=0, description="SGD base learning rate, cosine-annealed to 0")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="SGD weight decay")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the training cross-entropy")


class StudentConfig(Section):
    arch: str = Field("resnet18", description="registry model name (cpsc-ray models)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the model's builder")
    lr: float = Field(0.1, gt=0, description="SGD base learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="SGD weight decay")
    warmup_fraction: float = Field(10 / 600, ge=0, lt=1, description="linear warm-up, as a fraction of the run")
    replay_images: int = Field(
        0,
        ge=0,
        description="a memory of past synthetic images the student keeps learning from, in images per worker (CMI's "
        "and Fast-Datafree's data pool; it is checkpointed); 0: the student sees only fresh images",
    )
    replay_fraction: float = Field(
        0.5, ge=0, le=1, description="with student.replay_images: the share of each student batch drawn from the memory"
    )


class GeneratorConfig(Section):
    kind: Literal["conditional", "unconditional"] = Field(
        "conditional",
        description="the synthesizer that makes the student's images (cpsc-ray models lists them): conditional: a "
        "generator with per-class batch-norm modulation (CPSC-DFKD's); unconditional: its plain batch-norm twin "
        "(with loss.eta=0 loss.eta_student=0 the better student on six of seven zoo teachers: BENCHMARKS.md, issue 19)",
    )
    arch: Literal["auto", "upsample", "dcgan"] = Field(
        "auto",
        description="upsample: the reference code's generator at any size (METHOD.md's 32x32 one; side divisible "
        "by 4); dcgan: the paper's 64x64 DCGAN-like one (side divisible by 16), unused by the reference code; "
        "auto: the reference's choice, upsample (cpsc-ray models)",
    )
    nz: int = Field(256, ge=1, description="length of the noise vector z")
    ngf: int = Field(64, ge=1, description="width: the channels of the last stage (earlier stages are multiples)")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    beta1: float = Field(0.5, ge=0, lt=1, description="Adam beta1")
    beta2: float = Field(0.999, ge=0, lt=1, description="Adam beta2")
    lr_milestones: list[float] = Field(
        default_factory=lambda: [0.5, 0.75],
        description="fractions of the run where the lr is multiplied by lr_gamma: the generator learns at its "
        "full rate through the first half and settles with the student in the second (METHOD.md's 50/600 and "
        "150/600 froze it early in short runs; the reference's rate never decays)",
    )
    lr_gamma: float = Field(0.1, gt=0, description="factor applied to the lr at each of lr_milestones")
    reset_optimizer: bool = Field(
        False,
        description="clear Adam's state before every generator step, as the reference's per-step new Adam does: "
        "each update is then about lr * sign(grad)",
    )

    @model_validator(mode="after")
    def _milestones_in_run(self) -> "GeneratorConfig":
        if any(not 0 <= m <= 1 for m in self.lr_milestones):
            raise ValueError(
                f"generator.lr_milestones: fractions of the run in [0, 1] expected, got {self.lr_milestones}"
            )
        return self


class LossConfig(Section):
    alpha: float = Field(5.0, ge=0, description="IKD (L2 logit) weight")
    beta: float = Field(1.0, ge=0, description="BN-statistics prior weight")
    gamma: float = Field(0.7, ge=0, description="pseudo-supervised contrastive weight")
    eta: float = Field(
        1.0,
        ge=0,
        description="weight of the generator's pseudo-label cross-entropy CE(teacher, y), on logits (ce_on): what "
        "makes the images those of the class asked for (BENCHMARKS.md, issue 19)",
    )
    eta_student: float = Field(
        0.1, ge=0, description="weight of the student's pseudo-label cross-entropy CE(student, y) (METHOD.md: eta)"
    )
    gate_pseudo_labels: bool = Field(
        True,
        description="the student's pseudo-label CE counts only images the teacher assigns to their pseudo-label "
        "(a label an image does not show teaches the student noise)",
    )
    gate_contrast: bool = Field(
        False,
        description="SupCon: an image the teacher does not assign to its pseudo-label has no positive but its own "
        "other view",
    )
    contrast_instances: bool = Field(
        False,
        description="the contrastive term over instances, not pseudo-labels: each image's only positive is its own "
        "other view and every other image is a negative (CMI's instance discrimination, which spreads the images "
        "apart), where SupCon pulls the images of one pseudo-label together",
    )
    agreement_target: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="0: off. Otherwise the teacher's agreement with the pseudo-labels the generator is steered to: "
        "after each generator step its pseudo-label CE weight is eta times a multiplier, itself multiplied by "
        "exp(agreement_rate * (target - the step's agreement)) and kept within [1/100, 100], so the conditioning "
        "holds on any teacher with the CE it needs (needs loss.eta > 0 and the conditional generator)",
    )
    agreement_rate: float = Field(
        0.05, gt=0, description="loss.agreement_target's step: the multiplier's log moves by rate * the shortfall"
    )
    adversarial: float = Field(
        1.0,
        ge=0,
        description="weight of the generator's adversarial terms, -(KD + alpha * IKD) (METHOD.md: 1); 0: the "
        "generator does not seek student-teacher disagreement (an ablation; the student keeps its KD and IKD)",
    )
    adversarial_warmup: float = Field(
        0.25,
        ge=0,
        lt=1,
        description="fraction of the run over which the generator's adversarial terms (-KD, -alpha * IKD) ramp "
        "linearly from 0 to their weight, so the generator learns its classes before it turns adversarial",
    )
    temperature: float = Field(0.07, gt=0, description="SupCon temperature")
    base_temperature: float = Field(
        0.07, gt=0, description="SupCon base temperature: the loss is scaled by temperature / base_temperature"
    )
    bn_form: Literal["raw", "standardized"] = Field(
        "standardized",
        description="BN prior: standardized (each layer's gaps in units of its running statistics, averaged over "
        "layers: a pull that does not grow with the teacher's depth) or raw (L2 gaps summed over layers: "
        "DeepInversion, the reference; on a 20-BN ResNet-18 its gradient drowned the pseudo-label CE's 25-140x)",
    )
    ce_on: Literal["logits", "probabilities"] = Field(
        "logits", description="pseudo-label CE on logits, or on softmax outputs (the reference's double softmax)"
    )
    kd_temperature: float | None = Field(None, gt=0, description="KD softmax temperature; unset: plain softmax")
    ikd_form: Literal["mse", "log"] = Field(
        "log",
        description="log: -log(MSE) for G and log||t-s||_2 for S (the reference's CIFAR-10 form, scale-free); "
        "mse: MSE on both sides (its form elsewhere, which let deep teachers' runs collapse)",
    )
    train_projection_head: bool = Field(
        False, description="train the student->teacher feature head with the generator (default: fixed random)"
    )


class TrainConfig(Section):
    epochs: int = Field(600, ge=1, description="distillation epochs")
    iterations_per_epoch: int = Field(50, ge=1, description="iterations per epoch: g_steps, then s_steps")
    batch_size: int = Field(512, ge=2, description="global synthetic batch, split across workers")
    g_steps: int = Field(6, ge=1, description="generator steps per iteration, each on a fresh synthetic batch")
    s_steps: int = Field(5, ge=1, description="student steps per iteration, each on a fresh synthetic batch")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when visible, else the CPU")
    amp: bool = Field(False, description="bf16 autocast (mixed precision), on CUDA and on CPU")
    channels_last: bool = Field(True, description="channels_last memory format (faster convolutions on CPU and GPU)")
    compile: bool = Field(False, description="torch.compile the teacher, student and generator")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        "default",
        description="torch.compile's mode when train.compile: reduce-overhead replays each compiled graph as a CUDA "
        "graph on CUDA (one launch instead of hundreds: the fixed-shape steps of small models are launch-bound)",
    )
    checkpoint_every: int = Field(1, ge=1, description="epochs between full-state checkpoints")


class EvalConfig(Section):
    every: int = Field(1, ge=1, description="epochs between evaluations (the last epoch is always evaluated)")
    batch_size: int = Field(512, ge=1, description="real images per evaluation batch")
    probe_per_class: int = Field(20, ge=0, description="probe images per class for the data-free proxy (0: no proxy)")
    probe_steps: int = Field(200, ge=1, description="optimisation steps that synthesize the probe set")
    probe_lr: float = Field(0.05, gt=0, description="learning rate of the probe set's synthesis")
    term_gradients: bool = Field(
        False,
        description="once per epoch, measure each generator-loss term's gradient norm at the generator "
        "(g_grad_<term> columns; one extra forward and a backward per term)",
    )


class Config(Section):
    name: str = Field("run", description="run name: its directory under output_dir (a taken name gets a suffix)")
    dynamics: Literal["fixed", "reference"] = Field(
        "fixed",
        description="reference: the reference code's optimizer, CE, SupCon scaling and constant generator lr "
        "(fills those fields where the config leaves them unset)",
    )
    seed: int = Field(0, description="seed of the distillation: initial weights, noise and labels")
    output_dir: str = Field("runs", description="local directory or URI under which run directories are created")
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=lambda: TeacherConfig(arch="resnet34"))
    teacher_training: TeacherTrainingConfig = Field(default_factory=TeacherTrainingConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="before")
    @classmethod
    def _dynamics_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("dynamics") == "reference":
            data = {**data}
            data_section = data.get("data")
            dataset = data_section.get("dataset", "digits") if isinstance(data_section, dict) else "digits"
            for (section, field), value in reference_dynamics(dataset).items():
                if isinstance(data.get(section, {}), dict):
                    data[section] = {field: value, **data.get(section, {})}
        return data

    @model_validator(mode="after")
    def _agreement_steers_conditioning(self) -> "Config":
        if self.loss.agreement_target and (self.loss.eta == 0 or self.generator.kind != "conditional"):
            raise ValueError(
                "loss.agreement_target steers the generator's pseudo-label CE, so it needs loss.eta > 0 and "
                f"generator.kind=conditional (got eta {self.loss.eta}, kind {self.generator.kind}); "
                "set loss.agreement_target=0 to turn it off"
            )
        return self


SHIPPED_CONFIGS = importlib.resources.files("cpsc_ray") / "configs"


def shipped_config_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in SHIPPED_CONFIGS.iterdir() if p.name.endswith(".yaml"))


def parse_scalar(text: str) -> Any:
    """Parse an override value the way YAML would, so `loss.alpha=2` is a number and `x=[1,2]` a list."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise InputError(f"{dotted}: {part!r} is a value, not a section")
        node = child
    node[leaf] = value


def _read_yaml(source: str) -> tuple[dict[str, Any], str]:
    path = Path(source)
    if not path.suffix and not path.exists():
        shipped = SHIPPED_CONFIGS / f"{source}.yaml"
        if not shipped.is_file():
            raise InputError(
                f"config {source!r}: no such file and no shipped config of that name; "
                f"give a YAML path or one of: {', '.join(shipped_config_names())}"
            )
        return yaml.safe_load(shipped.read_text()) or {}, f"shipped config {source!r}"
    if not path.is_file():
        raise InputError(f"config {source!r}: file not found; give a YAML path or a shipped config name")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise InputError(f"config {source}: not valid YAML{where} ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(tree, dict):
        raise InputError(f"config {source}: expected a mapping of sections at the top level")
    return tree, str(path)


def describe_validation_error(err: ValidationError, where: str) -> str:
    lines = []
    for problem in err.errors():
        field = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        if problem["type"] == "extra_forbidden":
            keys_here = f"cpsc-ray config --show {'.'.join(str(p) for p in problem['loc'][:-1])}".rstrip()
            lines.append(f"{field}: unknown key (check its spelling against `{keys_here}`)")
        else:
            got = problem.get("input")
            shown = f" (got {got!r})" if not isinstance(got, dict) else ""
            lines.append(f"{field}: {problem['msg']}{shown}")
    return f"{where}: " + "; ".join(lines)


def validate_tree(tree: dict[str, Any], where: str) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise InputError(describe_validation_error(err, where)) from None


def load_config(source: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a run config from a YAML path or a shipped config name, then apply `a.b=value` overrides."""
    tree, where = _read_yaml(source) if source else ({}, "defaults")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise InputError(f"override {item!r}: expected dotted.key=value, e.g. loss.alpha=2")
        set_dotted(tree, key.strip(), parse_scalar(text))
    return validate_tree(tree, where if not overrides else f"{where} with overrides")


def flatten(config: Config) -> dict[str, Any]:
    """Dotted key -> value for every field of every section (list and dict values stay whole)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and "." not in prefix:
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            out[prefix] = node

    walk("", config.model_dump())
    return out


def with_values(config: Config, values: dict[str, Any]) -> Config:
    """A copy of `config` with dotted keys replaced, validated as a whole."""
    tree = config.model_dump()
    if "dynamics" in values:  # a changed preset fills its fields afresh, as in a new config
        for section, field in REFERENCE_FIELDS:
            tree[section].pop(field)
    for key, value in values.items():
        set_dotted(tree, key, value)
    return validate_tree(tree, "config with " + ", ".join(sorted(values)))


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(), sort_keys=False)

"""Training a teacher on real data (SGD, cosine, standard augmentation), and doing so when a config names the
cached teacher (``teacher.weights=auto``) that is not there yet."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from cpsc_ray.config import Config
from cpsc_ray.data import load_splits
from cpsc_ray.method.device import pick_device
from cpsc_ray.method.models import ARCH_VERSIONS
from cpsc_ray.runs.evaluation import materialize, top1
from cpsc_ray.runs.teacher.card import WEIGHTS_NAME, TeacherCard, resolve_weights, weights_exist, write_teacher
from cpsc_ray.runs.teacher.load import build_teacher_model, check_classes


def teacher_path(cfg: Config, out: Path | None = None) -> Path:
    """Where ``train_teacher`` writes the configured teacher: under ``out``, else in its cache slot."""
    auto = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"weights": "auto"})})
    return out / WEIGHTS_NAME if out else Path(resolve_weights(auto))


def train_teacher(
    cfg: Config, out: Path | None = None, device: torch.device | None = None, progress: bool = True
) -> Path:
    """Train the configured teacher (registry arch or builder) on real data (SGD, cosine, standard augmentation)
    and write ``teacher.safetensors`` plus its JSON card; the val hold-out is excluded from training."""
    target = teacher_path(cfg, out)
    device = device or pick_device(cfg.train.device)
    tcfg = cfg.teacher_training
    torch.manual_seed(tcfg.seed)
    splits = load_splits(cfg.data, augment=True)
    arch = cfg.teacher.arch or cfg.teacher.builder
    model = build_teacher_model(cfg.teacher, splits.info.num_classes, splits.info.channels)
    check_classes(model, splits.info)  # a builder's kwargs set its class count: fail before training, not after
    model.to(device)
    loader = DataLoader(
        splits.train,
        batch_size=tcfg.batch_size,
        shuffle=True,
        drop_last=len(splits.train) > tcfg.batch_size,
        num_workers=cfg.data.num_workers,
        generator=torch.Generator().manual_seed(tcfg.seed),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=tcfg.lr, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay)
    steps = tcfg.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    bar = tqdm(range(tcfg.epochs), desc=f"teacher {arch}", disable=not progress, leave=False)
    for _ in bar:
        model.train()
        for images, labels in loader:
            loss = F.cross_entropy(model(images.to(device)), labels.to(device), label_smoothing=tcfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    card = TeacherCard(
        arch=arch,
        dataset=splits.info.name,
        num_classes=splits.info.num_classes,
        input_size=splits.info.image_size,
        channels=splits.info.channels,
        mean=list(splits.info.mean),
        std=list(splits.info.std),
        test_acc=top1(model, materialize(splits.test), device),
        val_acc=top1(model, materialize(splits.val), device) if splits.val is not None else None,
        epochs=tcfg.epochs,
        seed=tcfg.seed,
        arch_version=ARCH_VERSIONS.get(cfg.teacher.arch),
    )
    write_teacher(target, {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, card)
    return target


def ensure_teacher(cfg: Config, progress: bool = True) -> Config:
    """A config whose teacher.weights is a concrete file: ``auto`` trains and caches it when missing."""
    path = resolve_weights(cfg)
    if cfg.teacher.weights == "auto" and not weights_exist(path):
        print(
            f"no cached teacher for this config: training {cfg.teacher.arch or cfg.teacher.builder} "
            f"on {cfg.data.dataset} -> {path}"
        )
        train_teacher(cfg, progress=progress)
    return cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"weights": path})})

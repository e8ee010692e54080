"""Teachers: ours (trained by ``cpsc-ray teacher``) or the user's own (a registry arch or ``package.module:function``,
plus weights). ``card``: the sidecar and where a teacher's files live; ``load``: the model, its weights and the
checks against the data; ``train``: training one, when asked or when ``teacher.weights=auto`` finds none cached."""

from cpsc_ray.runs.teacher.card import (
    WEIGHTS_NAME,
    TeacherCard,
    card_path,
    resolve_weights,
    weights_exist,
    write_teacher,
)
from cpsc_ray.runs.teacher.load import Teacher, build_teacher_model, load_teacher
from cpsc_ray.runs.teacher.train import ensure_teacher, teacher_path, train_teacher

__all__ = [
    "WEIGHTS_NAME",
    "Teacher",
    "TeacherCard",
    "build_teacher_model",
    "card_path",
    "ensure_teacher",
    "load_teacher",
    "resolve_weights",
    "teacher_path",
    "train_teacher",
    "weights_exist",
    "write_teacher",
]

"""Teachers: ours (trained by ``cpsc-ray teacher``) or the user's own (registry arch or
``package.module:function``, plus weights)."""

from cpsc_ray.runs.teacher.load import (
    WEIGHTS_NAME,
    Teacher,
    TeacherCard,
    build_teacher_model,
    card_path,
    load_teacher,
    resolve_weights,
    train_teacher,
    weights_exist,
)

__all__ = [
    "WEIGHTS_NAME",
    "Teacher",
    "TeacherCard",
    "build_teacher_model",
    "card_path",
    "load_teacher",
    "resolve_weights",
    "train_teacher",
    "weights_exist",
]

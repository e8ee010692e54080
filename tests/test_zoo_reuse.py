"""benchmarks/teacher_zoo.py reuses a finished cell only for a run that computes the same: the hashes it matches a
row against are those that earlier versions of the script wrote for this config, and only while the options
added since are off. ``zoo_cell_ff3f018.yaml`` is a zoo cell's resolved config as written at commit ff3f018;
the expected hashes are what ``config_hash`` at each commit named computed for it with the weights below."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from cpsc_ray.config import Config, with_values

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from teacher_zoo import config_hash, config_hashes  # noqa: E402

# Before train.compile_mode, student.replay_images, loss.contrast_instances, loss.agreement_target.
WRITTEN_AT = {
    "ff3f018": "0ee4cab52b591b59",
    "e13bad6": "cc5a885e7c0b2419",
    "cc93c24": "c9cfa2b103a2bda2",
    "c126999": "a4b1df8075a867d6",
}


@pytest.fixture
def cell(tmp_path) -> tuple[Config, Path]:
    weights = tmp_path / "teacher.safetensors"
    weights.write_bytes(b"teacher weights")
    tree = yaml.safe_load((Path(__file__).parent / "zoo_cell_ff3f018.yaml").read_text())
    return Config.model_validate(tree), weights


def test_a_cell_matches_the_hashes_earlier_versions_wrote_for_it(cell):
    cfg, weights = cell
    hashes = config_hashes(cfg, weights)
    assert hashes[0] == config_hash(cfg, weights)
    assert hashes[1:] == [WRITTEN_AT[commit] for commit in ("c126999", "cc93c24", "e13bad6", "ff3f018")]


@pytest.mark.parametrize(
    "override, versions",
    [
        ({"loss.agreement_target": 0.7}, 1),  # no earlier version could steer the CE weight
        ({"loss.contrast_instances": True}, 2),  # today's and c126999's, which could contrast instances
        ({"student.replay_images": 16384}, 3),  # and cc93c24's, which had the memory
        ({"train.compile_mode": "reduce-overhead"}, 4),  # and e13bad6's, which had compile_mode
        ({"loss.eta": 0.5}, 5),  # another config, as every version wrote it
    ],
)
def test_another_config_matches_no_row_of_this_one(cell, override, versions):
    cfg, weights = cell
    hashes = config_hashes(with_values(cfg, override), weights)
    assert len(hashes) == versions
    assert not set(hashes) & set(config_hashes(cfg, weights))


def test_the_teacher_weights_are_part_of_every_hash(cell, tmp_path):
    cfg, weights = cell
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"another teacher")
    assert not set(config_hashes(cfg, weights)) & set(config_hashes(cfg, other))

"""params.yaml validation: every problem stops with a message naming the file and the key."""

import copy
import re
from pathlib import Path

import pytest
import yaml

from pipeline.config import ParamsError, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((REPO / "params.yaml").read_text())


def broken(path: str, value=None, delete: bool = False) -> dict:
    p = copy.deepcopy(DEFAULT)
    *parents, last = path.split(".")
    node = p
    for k in parents:
        node = node[k]
    if delete:
        del node[last]
    else:
        node[last] = value
    return p


def test_default_and_presets_load():
    assert load_params(REPO / "params.yaml").model.backbone == "resnet18"
    for preset in sorted((REPO / "params").glob("*.yaml")):
        p = load_params(preset)
        assert p.model.backbone == "resnet101" and p.data.embedded is None


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("warmup.optim.lr", -0.1, r"warmup\.optim\.lr: Input should be greater than 0"),
        ("warmup.optim.lrr", 0.1, r"warmup\.optim\.lrr: unknown key"),
        ("adapt.optim.iters", "many", r"adapt\.optim\.iters: Input should be a valid integer"),
        ("data.source.kind", "carla", r"data\.source\.kind: Input should be 'gta5', 'synthia' or 'cityscapes'"),
        ("data.num_classes", 16, r"data\.num_classes: GTA5 has 19 classes, got 16"),
        ("data.num_classes", 21, r"data\.num_classes: Input should be 19, 16 or 13"),
        ("warmup.view.crop", [512, 512], r"warmup\.view\.crop: crop \[512, 512\] is larger than the source image"),
        ("adapt.tau", 0, r"adapt\.tau: Input should be greater than 0"),
        ("adapt.ema_momentum", 1.5, r"adapt\.ema_momentum: Input should be less than or equal to 1"),
        (
            "data.embedded.target_style",
            {"fog": 1},
            r"data\.embedded\.target_style: .*unknown style knob\(s\) \['fog'\]",
        ),
        ("data.embedded.target_style", {"person_rate": -1}, r"target_style: .*person_rate must be >= 0, got -1"),
        (
            "data.embedded.source_style",
            {"class_frequency": {"truck": -0.5}},
            r"source_style: .*class_frequency: multipliers must be >= 0, got \{'truck': -0.5\}",
        ),
        ("data.embedded.target_style", {"ego_vehicle": 1.5}, r"target_style: .*ego_vehicle < 1"),
        (
            "distill.rounds",
            {
                "1": {"teacher": "models/adapt", "student_init": "previous"},
                "3": {"teacher": "x", "student_init": "previous"},
            },
            r"rounds: keys must be 1\.\.N",
        ),
        ("distill.rounds", {"1": {"teacher": "models/adapt"}}, r"distill\.rounds\.1\.student_init: Field required"),
        (
            "distill.rounds",
            {"1": {"teacher": "models/adapt", "student_init": "pretrained"}},
            r"student_weights: required, round 1 has student_init 'pretrained'",
        ),
        ("warmup.optim.schedule_iters", 10, r"schedule_iters: 10 is below iters"),
    ],
)
def test_bad_values_name_the_key(path, value, message):
    with pytest.raises(ParamsError, match=message):
        parse_params(broken(path, value))


def test_missing_section_named():
    with pytest.raises(ParamsError, match=r"adapt: Field required"):
        parse_params(broken("adapt", delete=True))


def _leaves(node: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in node.items():
        key = f"{prefix}{k}"
        # Style sections are overrides of the generator's styles (may be empty); rounds are user-keyed.
        if isinstance(v, dict) and v and k not in ("source_style", "target_style", "rounds"):
            out += _leaves(v, key + ".")
        else:
            out.append(key)
    return out


def test_every_knob_is_required():
    """No code defaults: each key of params.yaml, removed on its own, fails validation naming its path."""
    keys = _leaves(DEFAULT)
    assert "adapt.structure_kl.weight" in keys and "adapt.optim.poly_power" in keys and len(keys) >= 150
    for key in keys:
        with pytest.raises(ParamsError, match="  " + re.escape(key) + ": Field required"):
            parse_params(broken(key, delete=True))


def test_presets_write_every_knob():
    """The paper presets set every key the default sets (except the embedded generator's own section)."""
    want = {k for k in _leaves(DEFAULT) if not k.startswith("data.embedded.")}
    for preset in sorted((REPO / "params").glob("*.yaml")):
        have = set(_leaves(yaml.safe_load(preset.read_text())))
        assert want - have == set(), preset.name


def test_synthia_class_count():
    p = broken("data.embedded", None)
    p["data"]["source"] = {"kind": "synthia", "root": "x", "resize": None}
    p["data"]["target"] = {"kind": "cityscapes", "root": "y", "resize": None}
    with pytest.raises(ParamsError, match="SYNTHIA has 16 classes"):
        parse_params(p)
    p["data"]["num_classes"] = 13
    assert parse_params(p).data.num_classes == 13


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ParamsError, match=r"nope\.yaml: parameter file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: [unclosed\n")
    with pytest.raises(ParamsError, match=r"bad\.yaml: not valid YAML"):
        load_params(bad)
    bad.write_text(yaml.safe_dump(broken("model.backbone", "vgg16")))
    with pytest.raises(ParamsError, match=r"bad\.yaml: invalid parameters\n  model\.backbone"):
        load_params(bad)

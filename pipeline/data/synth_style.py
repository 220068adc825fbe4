"""Knobs of the embedded generator: the look of each domain (``SynthStyle``) and the dataset's size and seed
(``SynthConfig``), with the default source and target styles.

Kept apart from the renderer (``pipeline.data.synth``) so that parameter validation, which every stage runs, does
not depend on the drawing code: an edit of the renderer reruns only the `generate` stage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

# Expected number of items per image in a neutral style; scaled by the style's rates and class_frequency.
BASE_RATES: dict[str, float] = {
    "car": 3.0,
    "parked car": 2.0,
    "truck": 0.35,
    "bus": 0.25,
    "train": 0.12,
    "person": 2.5,
    "rider": 0.5,
    "motorcycle": 0.25,  # parked, without rider
    "bicycle": 0.35,  # parked, without rider
    "pole": 1.5,  # plain poles and street lamps; lights and signs come on their own poles
    "traffic light": 0.9,
    "traffic sign": 1.4,
    "tree": 2.0,
    "static": 0.6,
    # Facade segment weights (relative, not counts).
    "building": 6.0,
    "vegetation": 1.2,
    "wall": 1.0,
    "fence": 1.0,
    "terrain": 1.0,
}
PERSON_CLASSES = ("person", "rider", "bicycle")
VEHICLE_CLASSES = ("car", "parked car", "truck", "bus", "train", "motorcycle")


@dataclass
class SynthStyle:
    """Look of one domain. All colour values are on the 0..255 scale.

    texture_strength: amplitude of per-class procedural texture (grain on road, blotches on buildings,
        leafy noise on vegetation, clouds in the sky), as a relative brightness modulation; 0 = flat.
    noise_std: std of additive Gaussian sensor noise per pixel and channel.
    blur_sigma: Gaussian optical blur, in output pixels (applied before the sensor noise).
    palette_shift: length (RGB distance) of a fixed per-class colour offset added to every colour of that
        class, in a random direction drawn once per domain from ``palette_seed``; the main colour gap.
    palette_seed: seed of that per-class offset table (kept apart from the scene seed so the gap stays
        the same when only the scenes are re-drawn).
    saturation: colour saturation factor (1 = palette as is, >1 more saturated, <1 washed out).
    brightness: global brightness multiplier.
    brightness_jitter: per-image random brightness change (relative std).
    gamma: output gamma (>1 darkens mid-tones).
    colour_cast: per-channel RGB multipliers (global tint, e.g. a warm cast (1.08, 1.0, 0.88)).
    shadow_strength: darkness of random cast shadows across the scene (0 = none, 0.5 = half as bright).
    horizon: mean horizon row as a fraction of the image height (camera pitch).
    horizon_jitter: per-image uniform jitter of the horizon, as a fraction of the height.
    camera_height: camera height above the road in metres (sets the ground perspective and object scale).
    object_scale: multiplier on the world size of objects (vehicles, persons, bikes).
    colour_jitter: std of the per-instance colour variation of objects and facades.
    person_rate: multiplier on the expected number of persons, riders and bicycles per image.
    vehicle_rate: multiplier on the expected number of cars, trucks, buses, trains and motorcycles.
    class_frequency: extra per-item multipliers on top of the rates, keyed by a ``BASE_RATES`` name
        (e.g. ``{"truck": 0.4}``; facade names building/vegetation/wall/fence/terrain weight segment types).
    ego_vehicle: height of the ego-vehicle bonnet at the image bottom, as a fraction of the height
        (labelled 'ego vehicle', i.e. ignored, as in Cityscapes); 0 = none.
    thin_scale: multiplier on the world width of thin structures (poles and their arms, traffic-light boxes,
        sign plates, fence rails and slats, bicycle tyres and frames). A toy-world exaggeration, the same in
        both default domains: at 128x256 and a stride-8 model, real-size poles (0.18 m) are under one output
        cell and no model could learn them.
    """

    texture_strength: float = 0.0
    noise_std: float = 0.0
    blur_sigma: float = 0.0
    palette_shift: float = 0.0
    palette_seed: int = 0
    saturation: float = 1.0
    brightness: float = 1.0
    brightness_jitter: float = 0.05
    gamma: float = 1.0
    colour_cast: tuple[float, float, float] = (1.0, 1.0, 1.0)
    shadow_strength: float = 0.0
    horizon: float = 0.42
    horizon_jitter: float = 0.03
    camera_height: float = 1.5
    object_scale: float = 1.0
    colour_jitter: float = 14.0
    person_rate: float = 1.0
    vehicle_rate: float = 1.0
    class_frequency: dict[str, float] = field(default_factory=dict)
    ego_vehicle: float = 0.0
    thin_scale: float = 2.5

    def __post_init__(self) -> None:
        self.colour_cast = tuple(float(c) for c in self.colour_cast)  # type: ignore[assignment]
        if len(self.colour_cast) != 3:
            raise ValueError(f"colour_cast needs 3 values (R, G, B), got {self.colour_cast}")
        unknown = set(self.class_frequency) - set(BASE_RATES)
        if unknown:
            raise ValueError(f"class_frequency: unknown names {sorted(unknown)}; known: {sorted(BASE_RATES)}")
        if not 0.05 <= self.horizon <= 0.95:
            raise ValueError(f"horizon must be within 0.05..0.95 of the height, got {self.horizon}")
        for name in (
            "noise_std",
            "blur_sigma",
            "palette_shift",
            "texture_strength",
            "camera_height",
            "object_scale",
            "brightness",
            "gamma",
            "saturation",
            "thin_scale",
            "brightness_jitter",
            "horizon_jitter",
            "colour_jitter",
            "shadow_strength",
            "person_rate",
            "vehicle_rate",
            "ego_vehicle",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        bad = {k: v for k, v in self.class_frequency.items() if not v >= 0}
        if bad:
            raise ValueError(f"class_frequency: multipliers must be >= 0, got {bad}")
        if self.shadow_strength > 1 or self.ego_vehicle >= 1:
            raise ValueError(
                f"shadow_strength must be <= 1 and ego_vehicle < 1 (fractions), got {self.shadow_strength}, "
                f"{self.ego_vehicle}"
            )
        if self.camera_height <= 0 or self.object_scale <= 0:
            raise ValueError("camera_height and object_scale must be > 0")

    def rate(self, name: str) -> float:
        r = BASE_RATES[name] * self.class_frequency.get(name, 1.0)
        if name in PERSON_CLASSES:
            r *= self.person_rate
        if name in VEHICLE_CLASSES:
            r *= self.vehicle_rate
        return r

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["colour_cast"] = list(self.colour_cast)  # YAML/JSON friendly
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], base: SynthStyle | None = None) -> SynthStyle:
        """Style from a (possibly partial) dict; missing keys come from ``base`` (default: class defaults)."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SynthStyle keys {sorted(unknown)}")
        start = base.to_dict() if base is not None else {}
        start.update(d)
        return cls(**start)


def source_style() -> SynthStyle:
    """Default source look: a game renderer (flat, clean, saturated, high camera)."""
    return SynthStyle(
        saturation=1.25,
        horizon=0.40,
        camera_height=1.6,
        brightness_jitter=0.05,
        # Toy-world sizes (both domains): persons, bikes and vehicles large enough for a stride-8 model at 128x256.
        object_scale=1.4,
    )


def target_style() -> SynthStyle:
    """Default target look: a car-mounted camera in real streets."""
    return SynthStyle(
        texture_strength=0.3,
        noise_std=8.0,
        blur_sigma=0.7,
        # A moderate per-class colour shift (RGB length 35): classes stay recognisable by colour, as GTA5 and
        # Cityscapes ones do; texture, lighting, noise, blur and camera make most of the gap.
        palette_shift=35.0,
        palette_seed=1,
        saturation=0.7,
        brightness=0.92,
        brightness_jitter=0.12,
        gamma=1.1,
        colour_cast=(1.04, 1.0, 0.92),
        shadow_strength=0.35,
        horizon=0.47,
        camera_height=1.3,
        object_scale=1.25,  # ~0.9x the source's: smaller objects, as Cityscapes vs GTA5
        colour_jitter=20.0,
        person_rate=2.0,
        vehicle_rate=1.0,
        class_frequency={"truck": 0.4, "bus": 0.7, "bicycle": 1.5, "car": 1.3, "tree": 1.5, "fence": 1.5},
        ego_vehicle=0.07,
    )


@dataclass
class SynthConfig:
    """What to generate. ``seed`` draws the scenes; the styles draw the look of each domain.

    Cities: target train images go round-robin over ``train_cities``, val images over ``val_cities``
    (disjoint, as in Cityscapes); image ``i`` is ``<city>_<i // n_cities:06d>_000019``.
    """

    seed: int = 0
    height: int = 128
    width: int = 256
    n_source: int = 400
    n_target_train: int = 300
    n_target_val: int = 100
    source_style: SynthStyle = field(default_factory=source_style)
    target_style: SynthStyle = field(default_factory=target_style)
    train_cities: tuple[str, ...] = ("arvenfeld", "brisholm", "corvanne")
    val_cities: tuple[str, ...] = ("dunmarrow",)

    def __post_init__(self) -> None:
        self.train_cities = tuple(self.train_cities)
        self.val_cities = tuple(self.val_cities)
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy SeedSequence), got {self.seed}")
        if self.height < 8 or self.width < 8:
            raise ValueError(f"image size too small: {self.height}x{self.width}")
        if min(self.n_source, self.n_target_train, self.n_target_val) < 0:
            raise ValueError("image counts must be >= 0")
        if not self.train_cities or not self.val_cities:
            raise ValueError("need at least one train city and one val city")
        if set(self.train_cities) & set(self.val_cities):
            raise ValueError("train and val cities must be disjoint")
        for c in self.train_cities + self.val_cities:
            if not c.isalnum() or "_" in c:
                raise ValueError(f"city name must be alphanumeric (no '_'), got {c!r}")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["source_style"] = self.source_style.to_dict()
        d["target_style"] = self.target_style.to_dict()
        d["train_cities"] = list(self.train_cities)
        d["val_cities"] = list(self.val_cities)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SynthConfig:
        """Config from a (possibly partial) dict; partial styles are completed from the domain defaults."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SynthConfig keys {sorted(unknown)}")
        kw = dict(d)
        for key, default in (("source_style", source_style), ("target_style", target_style)):
            if key in kw and not isinstance(kw[key], SynthStyle):
                kw[key] = SynthStyle.from_dict(dict(kw[key]), base=default())
        return cls(**kw)

"""The ``scenes`` benchmark: seeded images of shapes on real photographs, with one-word questions.

A scene is a crop of one of scikit-image's bundled photographs (dimmed, desaturated and slightly
blurred, so that it is real texture but never looks like an object), cut into a 3 x 3 grid, with 1 to
:data:`MAX_OBJECTS` objects in distinct cells. Each object has a shape (:data:`SHAPES`), a colour
(:data:`COLOURS`, its exact shade jittered a little) and a size (:data:`SIZES`, its extent relative to
the cell), and is drawn anti-aliased (4x supersampled) at a small random offset inside its cell.

Questions (:data:`QUESTION_TYPES`) have one-word, lowercase answers:

- ``count``: "How many objects are there?", "How many red objects are there?", "How many circles are
  there?"; the answer is a digit, ``"0"`` to ``"6"`` (digits, not words: one token in most tokenizers).
- ``colour``: "What colour is the square?" (only when there is one square), "What colour is the object
  in the top-left cell?"; the answer is one of :data:`COLOURS`.
- ``shape``: "What shape is the blue object?" (only when there is one blue object), "What shape is in
  the top-left cell?"; the answer is one of :data:`SHAPES`.
- ``existence``: "Is there a green triangle?"; ``"yes"`` or ``"no"``, each with probability 1/2. A "no"
  always names a colour or a shape that is in the scene, and half the time (when possible) both, in
  different objects, so that neither the colour nor the shape alone settles it.
- ``location``: "Where is the red circle?" (or "the small red circle", the shortest description that is
  unique); the answer is one of :data:`CELLS`.

Every question picks its answer first, among the answers the scene can give to that type (uniformly,
but for counts, where the larger ones are rarer in scenes and are weighted up), and then a subject with
that answer, so the answers are spread about evenly;
:func:`chance_accuracy` gives the majority-class rate per type on a set of questions.

Each question records the grid cells its answer depends on (:attr:`Question.cells`, indices into
:data:`CELLS`): the cells of the objects that make the answer what it is. For a count, the cells of the
counted objects; for colour, shape and location, the cell of the object asked about; for an existence
"yes", the cells of the matching objects. An answer made by absence (a count of ``"0"``, an existence
"no") depends on no single cell and records none; a per-cell breakdown leaves it out.

Splits never share a seed: the scene ``(split, index)`` has the seed ``3 * index + SPLITS.index(split)``
(:func:`seed_for`), so the three splits are the three residues modulo 3, disjoint by construction, and a
scene depends only on its split and index, never on how many are generated. The same seed gives the same
layout at every image size; only the rendering changes.

Run ``python -m tokencomp.analysis.scenes --out DIR --n 8`` to save a few scenes as PNG with their
questions in JSON, or ``python -m tokencomp.analysis.scenes --summary 2000 --split test`` to print the
answer distribution and chance level per question type.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import numbers
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from tokencomp.errors import InvalidParameterError
from tokencomp.validation import check_choice, check_int

__all__ = [
    "BACKGROUNDS",
    "CELLS",
    "COLOURS",
    "MAX_OBJECTS",
    "QUESTION_TYPES",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "Question",
    "Scene",
    "SceneObject",
    "answer_distribution",
    "answer_vocabulary",
    "chance_accuracy",
    "dataset",
    "iter_dataset",
    "make_scene",
    "questions_for",
    "save_examples",
    "scene_from_seed",
    "seed_for",
    "split_of",
    "summary",
]

SPLITS = ("train", "validation", "test")
SHAPES = ("circle", "square", "triangle", "star", "cross")
# the nominal RGB of each colour; an object's shade is this plus up to +-_SHADE_JITTER per channel
COLOURS = ("red", "green", "blue", "yellow", "white", "purple")
_RGB = {
    "red": (220, 40, 40),
    "green": (40, 185, 60),
    "blue": (45, 85, 235),
    "yellow": (240, 215, 40),
    "white": (245, 245, 245),
    "purple": (160, 60, 210),
}
# the object's extent (bounding box side) as a fraction of its cell's side
SIZES = ("small", "medium", "large")
_EXTENT = {"small": 0.42, "medium": 0.6, "large": 0.78}
# the 3 x 3 grid, row by row: cell i is row i // 3, column i % 3 ("top" is the top-middle cell)
CELLS = ("top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right")
QUESTION_TYPES = ("count", "colour", "shape", "existence", "location")
MAX_OBJECTS = 6
# scikit-image's bundled photographs (real scenes and textures) the backgrounds are cut from
BACKGROUNDS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "motorcycle",
    "camera",
    "grass",
    "gravel",
    "brick",
    "clock",
    "coins",
)
MIN_IMAGE_SIZE = 48

# the weight of each count 0..6 when a count question picks its answer among the counts a scene can give: large
# counts are possible only in scenes with many objects, so they are preferred there. These are the weights
# that make the answers exactly uniform over the scene distribution (fitted by iterative proportional
# scaling on 4000 training layouts), raised to the power 0.75, so that a scene of many objects is still
# asked about a part of them about a third of the time; on the 2011 count questions among the first 10000
# training questions each answer comes out at 12-17 % (uniform: 14.3 %).
_COUNT_WEIGHTS = (0.042, 0.0462, 0.0871, 0.1977, 0.3389, 0.8042, 1.0)
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
_SUPERSAMPLE = 4
_SHADE_JITTER = 10
# the background's tone: saturation kept, and the range its brightness is mapped into (objects are brighter
# or far more saturated than any background pixel)
_BG_SATURATION = (0.1, 0.35)
_BG_LOW = (15.0, 40.0)
_BG_HIGH = (105.0, 140.0)
# a fixed salt, so that the scenes change only when this generator's version does
_SALT = int.from_bytes(hashlib.sha256(b"tokencomp.analysis.scenes/v1").digest()[:16], "little")
_OWNER = "scenes"

RngLike = Union[None, int, np.random.Generator]


# ----------------------------------------------------------------------------------------------------------
# data types


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene.

    Attributes
    ----------
    shape, colour, size : str
        One of :data:`SHAPES`, :data:`COLOURS` and :data:`SIZES`.
    cell : int
        Its grid cell, an index into :data:`CELLS`.
    rgb : tuple of int
        The exact fill colour drawn (the colour's nominal RGB, jittered a little).
    centre : tuple of float
        Its centre ``(x, y)`` in pixels of the rendered image.
    extent : float
        The side of its bounding box in pixels.
    """

    shape: str
    colour: str
    size: str
    cell: int
    rgb: tuple[int, int, int]
    centre: tuple[float, float]
    extent: float

    @property
    def cell_name(self) -> str:
        """The cell's name in :data:`CELLS`."""
        return CELLS[self.cell]

    @property
    def box(self) -> tuple[int, int, int, int]:
        """The pixel box ``(x0, y0, x1, y1)`` (end exclusive) that holds the object."""
        x, y = self.centre
        h = self.extent / 2
        return (math.floor(x - h), math.floor(y - h), math.ceil(x + h), math.ceil(y + h))


@dataclass(frozen=True)
class Scene:
    """A generated image and what is in it.

    Attributes
    ----------
    split : str
        One of :data:`SPLITS`.
    index : int
        Its index in the split.
    seed : int
        :func:`seed_for` ``(split, index)``; :func:`scene_from_seed` rebuilds the scene from it.
    image : numpy.ndarray
        ``[image_size, image_size, 3]`` uint8, read-only. :meth:`pil` gives a PIL image.
    objects : tuple of SceneObject
        The objects, in no particular order, at most one per cell.
    background : str
        The photograph (one of :data:`BACKGROUNDS`) the background was cut from.
    """

    split: str
    index: int
    seed: int
    image: np.ndarray = field(repr=False, compare=False)
    objects: tuple[SceneObject, ...]
    background: str

    @property
    def image_size(self) -> int:
        """The image's side in pixels."""
        return int(self.image.shape[0])

    def pil(self) -> Image.Image:
        """The image as an RGB ``PIL.Image``."""
        return Image.fromarray(self.image, "RGB")

    def object_in(self, cell: int) -> SceneObject | None:
        """The object in grid cell ``cell`` (an index into :data:`CELLS`), or ``None`` if it is empty."""
        return next((o for o in self.objects if o.cell == cell), None)

    def cell_box(self, cell: int) -> tuple[int, int, int, int]:
        """The pixel box ``(x0, y0, x1, y1)`` (end exclusive) of grid cell ``cell``."""
        edges = _cell_edges(self.image_size)
        r, c = divmod(cell, 3)
        return (edges[c], edges[r], edges[c + 1], edges[r + 1])

    def to_dict(self) -> dict[str, Any]:
        """Everything but the image, JSON-ready."""
        return {
            "split": self.split,
            "index": self.index,
            "seed": self.seed,
            "image_size": self.image_size,
            "background": self.background,
            "objects": [{**asdict(o), "cell_name": o.cell_name} for o in self.objects],
        }


@dataclass(frozen=True)
class Question:
    """A question about a scene, with its one-word answer.

    Attributes
    ----------
    text : str
        The question, e.g. ``"How many red objects are there?"``.
    answer : str
        The lowercase one-word answer, one of :func:`answer_vocabulary` ``(type)``.
    type : str
        One of :data:`QUESTION_TYPES`.
    cells : tuple of int
        The grid cells (indices into :data:`CELLS`, ascending) of the objects the answer depends on;
        empty when the answer is made by absence (a count of ``"0"``, an existence "no").
    template : str
        ``type/subject``, how the question names what it asks about: ``count/all``, ``count/colour``,
        ``count/shape``, ``colour/shape``, ``colour/cell``, ``shape/colour``, ``shape/cell``,
        ``existence/yes``, ``existence/no-binding`` (colour and shape both in the scene, not together),
        ``existence/no-partial`` (only one of them in the scene), ``location/colour-shape``,
        ``location/size-colour-shape``.
    """

    text: str
    answer: str
    type: str
    cells: tuple[int, ...]
    template: str

    @property
    def cell_names(self) -> tuple[str, ...]:
        """:attr:`cells` as names in :data:`CELLS`."""
        return tuple(CELLS[c] for c in self.cells)

    def to_dict(self) -> dict[str, Any]:
        """The question, JSON-ready (with the cells' names)."""
        return {**asdict(self), "cells": list(self.cells), "cell_names": list(self.cell_names)}


# ----------------------------------------------------------------------------------------------------------
# seeds


def seed_for(split: str, index: int) -> int:
    """The seed of scene ``index`` of ``split``: ``3 * index + SPLITS.index(split)``.

    The three splits are the three residues modulo 3, so no two splits ever share a seed.
    """
    split = check_choice(_OWNER, "split", split, SPLITS)
    index = check_int(_OWNER, "index", index, low=0)
    return 3 * index + SPLITS.index(split)


def split_of(seed: int) -> tuple[str, int]:
    """The ``(split, index)`` whose seed is ``seed`` (the inverse of :func:`seed_for`)."""
    seed = check_int(_OWNER, "seed", seed, low=0)
    return SPLITS[seed % 3], seed // 3


def _stream(seed: int, *key: int) -> np.random.Generator:
    """An independent random stream for ``seed`` and a purpose ``key`` (0: the scene, 1: questions)."""
    return np.random.default_rng(np.random.SeedSequence(_SALT, spawn_key=(seed, *key)))


# ----------------------------------------------------------------------------------------------------------
# scenes


def make_scene(split: str, index: int, image_size: int = 336) -> Scene:
    """Scene ``index`` of ``split``, rendered at ``image_size`` x ``image_size`` pixels.

    Parameters
    ----------
    split : str
        One of :data:`SPLITS`.
    index : int
        ``>= 0``. The same ``(split, index)`` always gives the same scene.
    image_size : int, default 336
        The image's side in pixels, ``>= 48`` (224 and 336 are the usual sizes). The layout (objects,
        cells, offsets, background crop) does not depend on it.

    Returns
    -------
    Scene
    """
    return scene_from_seed(seed_for(split, index), image_size)


def scene_from_seed(seed: int, image_size: int = 336) -> Scene:
    """The scene whose seed is ``seed`` (see :func:`seed_for`), at ``image_size`` pixels."""
    split, index = split_of(seed)
    size = _check_size(image_size)
    rng = _stream(seed, 0)
    background, bg_plan = _plan_background(rng)
    layout = _plan_objects(rng)
    canvas = _render_background(background, bg_plan, size)
    objects = tuple(_place(canvas, size, *item) for item in layout)
    image = np.asarray(canvas, dtype=np.uint8).copy()
    image.setflags(write=False)
    return Scene(split=split, index=index, seed=seed, image=image, objects=objects, background=background)


def _check_size(image_size: Any) -> int:
    if not isinstance(image_size, numbers.Integral) or isinstance(image_size, bool) or image_size < MIN_IMAGE_SIZE:
        raise InvalidParameterError(
            f"{_OWNER}: parameter 'image_size' must be an integer >= {MIN_IMAGE_SIZE} (the side of the square "
            f"image in pixels; each grid cell needs room for an object); got {image_size!r}. Use e.g. 224 or 336."
        )
    return int(image_size)


def _cell_edges(size: int) -> np.ndarray:
    return np.round(np.linspace(0, size, 4)).astype(int)


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> Image.Image:
    """A bundled photograph as an RGB PIL image, loaded once."""
    from .data import bundled_images

    return Image.fromarray(bundled_images([name])[0][1], "RGB")


def _plan_background(rng: np.random.Generator) -> tuple[str, dict[str, Any]]:
    """Which photograph, which square crop (in fractions of it) and which tone; independent of the size."""
    name = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    side = rng.uniform(0.35, 1.0)
    plan = {
        "side": side,
        "corner": rng.uniform(0.0, 1.0, 2),  # where the crop sits in the room left for it
        "flip": bool(rng.random() < 0.5),
        "blur": rng.uniform(0.3, 1.5),  # box-blur radius in pixels at 336 px
        "saturation": rng.uniform(*_BG_SATURATION),
        "range": (rng.uniform(*_BG_LOW), rng.uniform(*_BG_HIGH)),
    }
    return name, plan


def _render_background(name: str, plan: dict[str, Any], size: int) -> Image.Image:
    photo = _photo(name)
    w, h = photo.size
    side = plan["side"] * min(w, h)
    x0, y0 = plan["corner"] * (w - side, h - side)
    crop = photo.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + side, y0 + side), reducing_gap=2.0)
    if plan["flip"]:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    crop = crop.filter(ImageFilter.BoxBlur(plan["blur"] * size / 336))
    rgb = np.asarray(crop, dtype=np.float32)
    grey = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    rgb = grey[..., None] + plan["saturation"] * (rgb - grey[..., None])
    low, high = plan["range"]
    rgb = low + (high - low) / 255.0 * rgb
    return Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8), "RGB")


def _plan_objects(rng: np.random.Generator) -> list[tuple[str, str, str, int, tuple[int, int, int], np.ndarray]]:
    """The objects: ``(shape, colour, size, cell, rgb, offset)`` with ``offset`` in [-1, 1]^2 of the room left.

    The number of objects is uniform in 1..6; the number of distinct colours (and, independently, of shapes)
    is uniform in 1..n, so that counts up to 6 and repeated attributes are common.
    """
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = rng.choice(len(CELLS), n, replace=False)
    colours = _palette(rng, COLOURS, n)
    shapes = _palette(rng, SHAPES, n)
    sizes = rng.integers(len(SIZES), size=n)
    jitter = rng.integers(-_SHADE_JITTER, _SHADE_JITTER + 1, size=(n, 3))
    offsets = rng.uniform(-1.0, 1.0, size=(n, 2))
    out = []
    for i in range(n):
        rgb = tuple(int(v) for v in np.clip(np.add(_RGB[colours[i]], jitter[i]), 0, 255))
        out.append((shapes[i], colours[i], SIZES[sizes[i]], int(cells[i]), rgb, offsets[i]))
    return out


def _palette(rng: np.random.Generator, names: Sequence[str], n: int) -> list[str]:
    """``n`` values of ``names``: ``k`` distinct ones (``k`` uniform in 1..min(n, len)), each used at least once."""
    k = int(rng.integers(1, min(n, len(names)) + 1))
    chosen = rng.choice(len(names), k, replace=False)
    picks = np.concatenate([chosen, rng.choice(chosen, n - k)])
    return [names[i] for i in rng.permutation(picks)]


def _place(
    canvas: Image.Image,
    size: int,
    shape: str,
    colour: str,
    size_name: str,
    cell: int,
    rgb: tuple[int, int, int],
    offset: np.ndarray,
) -> SceneObject:
    """Draw one object into its cell of ``canvas`` and describe it."""
    edges = _cell_edges(size)
    r, c = divmod(cell, 3)
    x0, y0, x1, y1 = int(edges[c]), int(edges[r]), int(edges[c + 1]), int(edges[r + 1])
    cw, ch = x1 - x0, y1 - y0
    extent = _EXTENT[size_name] * min(cw, ch)
    # the centre moves at most 80 % of the room the object leaves in its cell, so it never touches a border
    cx = cw / 2 + 0.8 * offset[0] * (cw - extent) / 2
    cy = ch / 2 + 0.8 * offset[1] * (ch - extent) / 2
    s = _SUPERSAMPLE
    mask = Image.new("L", (cw * s, ch * s), 0)
    _draw(ImageDraw.Draw(mask), shape, cx * s, cy * s, extent * s / 2)
    canvas.paste(rgb, (x0, y0, x1, y1), mask.reduce(s))
    return SceneObject(shape, colour, size_name, cell, rgb, (float(x0 + cx), float(y0 + cy)), float(extent))


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float) -> None:
    """Fill ``shape`` with half-extent ``r`` around ``(cx, cy)`` (in the mask's pixels)."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        return
    points = _OUTLINES[shape] * r + (cx, cy)
    draw.polygon([tuple(p) for p in points.tolist()], fill=255)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angle = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radius = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    xy = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    # centre the star's bounding box vertically (its lowest points are above y = 1)
    return xy - (0.0, (xy[:, 1].max() + xy[:, 1].min()) / 2)


_ARM = 0.32  # the cross's half arm width, relative to its half extent
# unit outlines in [-1, 1]^2 (y down), scaled by the half extent
_OUTLINES = {
    "square": np.array([(-0.88, -0.88), (0.88, -0.88), (0.88, 0.88), (-0.88, 0.88)]),
    "triangle": np.array([(0.0, -0.93), (1.0, 0.8), (-1.0, 0.8)]),
    "star": _star(),
    "cross": np.array(
        [
            (-_ARM, -1),
            (_ARM, -1),
            (_ARM, -_ARM),
            (1, -_ARM),
            (1, _ARM),
            (_ARM, _ARM),
            (_ARM, 1),
            (-_ARM, 1),
            (-_ARM, _ARM),
            (-1, _ARM),
            (-1, -_ARM),
            (-_ARM, -_ARM),
        ],
        dtype=float,
    ),
}


# ----------------------------------------------------------------------------------------------------------
# questions


def questions_for(scene: Scene, rng: RngLike = None, types: Sequence[str] = QUESTION_TYPES) -> list[Question]:
    """One question of each type in ``types`` that ``scene`` allows, in the order of ``types``.

    Every type but ``location`` is always possible; ``location`` needs an object that a colour and a
    shape (or a size, a colour and a shape) describe uniquely, and is left out when none is (about 3 %
    of the scenes).

    Parameters
    ----------
    scene : Scene
    rng : None, int or numpy.random.Generator, optional
        The randomness of the questions. ``None`` (the default) derives it from the scene's seed, one
        independent stream per type, so a type's question does not depend on which other types are asked.
        An integer seeds such streams instead; a Generator is used as it is, for every type in turn.
    types : sequence of str, default QUESTION_TYPES
        Which question types, a subset of :data:`QUESTION_TYPES`.

    Returns
    -------
    list of Question
    """
    types = _check_types(types)
    out = []
    for t in types:
        q = _ASK[t](scene, _question_rng(scene, rng, t))
        if q is not None:
            out.append(q)
    return out


def _check_types(types: Any) -> tuple[str, ...]:
    if isinstance(types, str):
        types = (types,)
    types = tuple(types)
    bad = [t for t in types if t not in QUESTION_TYPES]
    if bad or not types:
        raise InvalidParameterError(
            f"{_OWNER}: parameter 'types' must be a non-empty sequence of question types from "
            f"{', '.join(QUESTION_TYPES)}; got {list(types)!r} (unknown: {bad!r}). Pass e.g. types=('count', 'shape')."
        )
    return types


def _question_rng(scene: Scene, rng: RngLike, qtype: str) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    key = QUESTION_TYPES.index(qtype)
    if rng is None:
        return _stream(scene.seed, 1, key)
    seed = check_int(_OWNER, "rng", rng, low=0)
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(key,)))


def _pick(rng: np.random.Generator, values: Sequence[Any]) -> Any:
    return values[int(rng.integers(len(values)))]


def _cells(objects: Sequence[SceneObject]) -> tuple[int, ...]:
    return tuple(sorted(o.cell for o in objects))


def _ask_count(scene: Scene, rng: np.random.Generator) -> Question:
    """The answer among the counts the scene can give (all, by a colour, by a shape), then a subject with it."""
    options = [("all", "", list(scene.objects))]
    for attr, names in (("colour", COLOURS), ("shape", SHAPES)):
        options += [(attr, name, [o for o in scene.objects if getattr(o, attr) == name]) for name in names]
    values = sorted({len(objs) for _, _, objs in options})
    weights = np.array([_COUNT_WEIGHTS[v] for v in values])
    value = values[int(rng.choice(len(values), p=weights / weights.sum()))]
    template, name, objs = _pick(rng, [opt for opt in options if len(opt[2]) == value])
    if template == "all":
        text = "How many objects are there?"
    elif template == "colour":
        text = f"How many {name} objects are there?"
    else:
        text = f"How many {_PLURAL[name]} are there?"
    return Question(text, str(value), "count", _cells(objs), f"count/{template}")


def _unique(scene: Scene, obj: SceneObject, *attrs: str) -> bool:
    key = tuple(getattr(obj, a) for a in attrs)
    return sum(tuple(getattr(o, a) for a in attrs) == key for o in scene.objects) == 1


def _ask_attribute(scene: Scene, rng: np.random.Generator, asked: str, by: str) -> Question:
    """A colour or shape question: the answer uniformly among the scene's values, then an object with it."""
    value = _pick(rng, sorted({getattr(o, asked) for o in scene.objects}))
    obj = _pick(rng, [o for o in scene.objects if getattr(o, asked) == value])
    if _unique(scene, obj, by) and rng.random() < 0.5:
        subject = f"the {getattr(obj, by)}" if by == "shape" else f"the {getattr(obj, by)} object"
        text, template = f"What {asked} is {subject}?", f"{asked}/{by}"
    elif asked == "colour":
        text, template = f"What colour is the object in the {obj.cell_name} cell?", "colour/cell"
    else:
        text, template = f"What shape is in the {obj.cell_name} cell?", "shape/cell"
    return Question(text, value, asked, (obj.cell,), template)


def _ask_colour(scene: Scene, rng: np.random.Generator) -> Question:
    return _ask_attribute(scene, rng, "colour", "shape")


def _ask_shape(scene: Scene, rng: np.random.Generator) -> Question:
    return _ask_attribute(scene, rng, "shape", "colour")


def _ask_existence(scene: Scene, rng: np.random.Generator) -> Question:
    present = sorted({(o.colour, o.shape) for o in scene.objects})
    if rng.random() < 0.5:
        colour, shape = _pick(rng, present)
        matching = [o for o in scene.objects if (o.colour, o.shape) == (colour, shape)]
        return Question(f"Is there a {colour} {shape}?", "yes", "existence", _cells(matching), "existence/yes")
    colours, shapes = {o.colour for o in scene.objects}, {o.shape for o in scene.objects}
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    binding = [p for p in absent if p[0] in colours and p[1] in shapes]
    partial = [p for p in absent if (p[0] in colours) != (p[1] in shapes)]
    kind = "binding" if binding and (not partial or rng.random() < 0.5) else "partial"
    colour, shape = _pick(rng, binding if kind == "binding" else partial)
    return Question(f"Is there a {colour} {shape}?", "no", "existence", (), f"existence/no-{kind}")


def _ask_location(scene: Scene, rng: np.random.Generator) -> Question | None:
    described = []
    for o in scene.objects:
        if _unique(scene, o, "colour", "shape"):
            described.append((o, f"{o.colour} {o.shape}", "location/colour-shape"))
        elif _unique(scene, o, "size", "colour", "shape"):
            described.append((o, f"{o.size} {o.colour} {o.shape}", "location/size-colour-shape"))
    if not described:
        return None
    obj, name, template = _pick(rng, described)
    return Question(f"Where is the {name}?", obj.cell_name, "location", (obj.cell,), template)


_ASK = {
    "count": _ask_count,
    "colour": _ask_colour,
    "shape": _ask_shape,
    "existence": _ask_existence,
    "location": _ask_location,
}


# ----------------------------------------------------------------------------------------------------------
# datasets and answer statistics


def iter_dataset(
    split: str, n: int, *, image_size: int = 336, per_scene: int = len(QUESTION_TYPES)
) -> Iterator[tuple[Scene, Question]]:
    """The first ``n`` ``(scene, question)`` pairs of ``split``, scene by scene (see :func:`dataset`)."""
    split = check_choice(_OWNER, "split", split, SPLITS)
    n = check_int(_OWNER, "n", n, low=0)
    _check_size(image_size)
    per_scene = check_int(_OWNER, "per_scene", per_scene, low=1, high=len(QUESTION_TYPES))
    made, index = 0, 0
    while made < n:
        scene = make_scene(split, index, image_size)
        first = index * per_scene
        types = [QUESTION_TYPES[(first + j) % len(QUESTION_TYPES)] for j in range(per_scene)]
        for q in questions_for(scene, types=types)[: n - made]:
            yield scene, q
            made += 1
        index += 1


def dataset(
    split: str, n: int, *, image_size: int = 336, per_scene: int = len(QUESTION_TYPES)
) -> list[tuple[Scene, Question]]:
    """The first ``n`` questions of ``split`` with their scenes.

    Scene ``i`` (``0, 1, ...``) is asked ``per_scene`` question types, the next ones in the cycle of
    :data:`QUESTION_TYPES` (scene 0 the first ``per_scene`` types, scene 1 the following ones, ...), so
    every type is asked about equally often; a ``location`` question the scene does not allow is left
    out. The pairs of one scene share the same :class:`Scene` object (one image to encode). The result
    of a smaller ``n`` is a prefix of a larger one's.

    Parameters
    ----------
    split : str
        One of :data:`SPLITS`.
    n : int
        The number of questions, ``>= 0``.
    image_size : int, default 336
        The images' side in pixels, ``>= 48``.
    per_scene : int, default 5
        Questions per scene, 1 to ``len(QUESTION_TYPES)``.

    Returns
    -------
    list of (Scene, Question)
        Each scene holds its image: about 340 kB at 336 px; use :func:`iter_dataset` for many.
    """
    return list(iter_dataset(split, n, image_size=image_size, per_scene=per_scene))


def answer_vocabulary(qtype: str | None = None) -> tuple[str, ...]:
    """Every answer a question of type ``qtype`` can have (all types: the union, sorted).

    ``count``: ``"0"`` to ``"6"``; ``colour``: :data:`COLOURS`; ``shape``: :data:`SHAPES`;
    ``existence``: ``"no"``, ``"yes"``; ``location``: :data:`CELLS`.
    """
    per_type = {
        "count": tuple(str(i) for i in range(MAX_OBJECTS + 1)),
        "colour": COLOURS,
        "shape": SHAPES,
        "existence": ("no", "yes"),
        "location": CELLS,
    }
    if qtype is None:
        return tuple(sorted({a for v in per_type.values() for a in v}))
    return per_type[check_choice(_OWNER, "qtype", qtype, QUESTION_TYPES)]


def answer_distribution(questions: Sequence[Question | tuple[Scene, Question]]) -> dict[str, Counter]:
    """How often each answer occurs, per question type (types with no question are left out)."""
    out: dict[str, Counter] = {}
    for q in _questions(questions):
        out.setdefault(q.type, Counter())[q.answer] += 1
    return {t: out[t] for t in QUESTION_TYPES if t in out}


def chance_accuracy(questions: Sequence[Question | tuple[Scene, Question]]) -> dict[str, float]:
    """The accuracy of always giving each type's most frequent answer, per type and ``"overall"``.

    ``"overall"`` is that same guesser (it knows the question's type, nothing else) over all the questions.
    Accepts questions or the ``(scene, question)`` pairs of :func:`dataset`.
    """
    dist = answer_distribution(questions)
    if not dist:
        raise InvalidParameterError(
            f"{_OWNER}: chance_accuracy needs at least one question; got none. Pass e.g. dataset('test', 2000)."
        )
    out = {t: max(c.values()) / sum(c.values()) for t, c in dist.items()}
    out["overall"] = sum(max(c.values()) for c in dist.values()) / sum(sum(c.values()) for c in dist.values())
    return out


def _questions(items: Sequence[Question | tuple[Scene, Question]]) -> Iterator[Question]:
    for item in items:
        q = item[1] if isinstance(item, tuple) else item
        if not isinstance(q, Question):
            raise InvalidParameterError(
                f"{_OWNER}: expected Question objects or (Scene, Question) pairs; got {type(q).__name__}. "
                "Pass the output of questions_for() or dataset()."
            )
        yield q


def summary(questions: Sequence[Question | tuple[Scene, Question]]) -> str:
    """A plain-text table: per type, the number of questions, the answer counts and the chance level."""
    dist = answer_distribution(questions)
    chance = chance_accuracy(questions)
    lines = [f"{'type':<10} {'n':>5} {'chance':>7}  answers"]
    for t, c in dist.items():
        answers = ", ".join(f"{a}: {k}" for a, k in sorted(c.items()))
        lines.append(f"{t:<10} {sum(c.values()):>5} {chance[t]:>7.3f}  {answers}")
    lines.append(f"{'overall':<10} {sum(sum(c.values()) for c in dist.values()):>5} {chance['overall']:>7.3f}")
    return "\n".join(lines)


def save_examples(out: str | Path, n: int = 8, *, split: str = "test", image_size: int = 336) -> Path:
    """Save scenes ``0..n-1`` of ``split`` as ``scene-XXXX.png`` and all their questions in ``scenes.json``.

    Returns the path of ``scenes.json``.
    """
    n = check_int(_OWNER, "n", n, low=1)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(n):
        scene = make_scene(split, index, image_size)
        name = f"scene-{index:04d}.png"
        scene.pil().save(folder / name)
        records.append({**scene.to_dict(), "file": name, "questions": [q.to_dict() for q in questions_for(scene)]})
    path = folder / "scenes.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def _main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tokencomp.analysis.scenes", description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="save scenes 0..n-1 as PNG and their questions as JSON into this folder")
    parser.add_argument("--n", type=int, default=8, help="how many scenes to save (default 8)")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--size", type=int, default=336, help="image side in pixels (default 336)")
    parser.add_argument("--summary", type=int, metavar="N", help="print answer counts and chance for N questions")
    args = parser.parse_args(argv)
    if args.out is None and args.summary is None:
        parser.error("give --out DIR and/or --summary N")
    if args.out is not None:
        print(save_examples(args.out, args.n, split=args.split, image_size=args.size))
    if args.summary is not None:
        print(f"split {args.split}, {args.summary} questions")
        # the questions do not depend on the image size: render the smallest images, for speed
        print(summary([q for _, q in iter_dataset(args.split, args.summary, image_size=MIN_IMAGE_SIZE)]))


if __name__ == "__main__":
    _main()

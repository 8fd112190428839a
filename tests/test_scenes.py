"""The scenes benchmark: determinism, disjoint splits, answers re-derived from the objects and the pixels."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokencomp.analysis import scenes as S
from tokencomp.errors import InvalidParameterError

PLURAL = {"circles": "circle", "squares": "square", "triangles": "triangle", "stars": "star", "crosses": "cross"}
NOMINAL = {
    "red": (220, 40, 40),
    "green": (40, 185, 60),
    "blue": (45, 85, 235),
    "yellow": (240, 215, 40),
    "white": (245, 245, 245),
    "purple": (160, 60, 210),
}


def _digest(scene):
    return hashlib.sha256(scene.image.tobytes()).hexdigest()


# ------------------------------------------------------------------------------------------------
# an oracle written apart from the generator: it reads the question's words and the objects list


def _matching(scene, **attrs):
    return [o for o in scene.objects if all(getattr(o, k) == v for k, v in attrs.items())]


def _one(objs):
    assert len(objs) == 1, f"the question's subject is not unique: {objs}"
    return objs[0]


def _oracle_count(scene, text):
    if text == "How many objects are there?":
        objs = list(scene.objects)
    elif m := re.fullmatch(r"How many (\w+) objects are there\?", text):
        objs = _matching(scene, colour=m[1])
    else:
        m = re.fullmatch(r"How many (\w+) are there\?", text)
        objs = _matching(scene, shape=PLURAL[m[1]])
    return str(len(objs)), objs


def _oracle_colour(scene, text):
    if m := re.fullmatch(r"What colour is the object in the ([\w-]+) cell\?", text):
        obj = _one([o for o in scene.objects if S.CELLS[o.cell] == m[1]])
    else:
        obj = _one(_matching(scene, shape=re.fullmatch(r"What colour is the (\w+)\?", text)[1]))
    return obj.colour, [obj]


def _oracle_shape(scene, text):
    if m := re.fullmatch(r"What shape is in the ([\w-]+) cell\?", text):
        obj = _one([o for o in scene.objects if S.CELLS[o.cell] == m[1]])
    else:
        obj = _one(_matching(scene, colour=re.fullmatch(r"What shape is the (\w+) object\?", text)[1]))
    return obj.shape, [obj]


def _oracle_existence(scene, text):
    colour, shape = re.fullmatch(r"Is there a (\w+) (\w+)\?", text).groups()
    objs = _matching(scene, colour=colour, shape=shape)
    return ("yes" if objs else "no"), objs


def _oracle_location(scene, text):
    words = re.fullmatch(r"Where is the ([\w ]+)\?", text)[1].split()
    attrs = dict(zip(("colour", "shape"), words[-2:]))
    if len(words) == 3:
        attrs["size"] = words[0]
    obj = _one(_matching(scene, **attrs))
    return S.CELLS[obj.cell], [obj]


ORACLE = {
    "count": _oracle_count,
    "colour": _oracle_colour,
    "shape": _oracle_shape,
    "existence": _oracle_existence,
    "location": _oracle_location,
}


def _check_question(scene, q):
    answer, objs = ORACLE[q.type](scene, q.text)
    assert q.answer == answer, (q, scene.objects)
    # the cells the answer depends on: the objects that make it; none for an answer made by absence
    assert q.cells == tuple(sorted(o.cell for o in objs)), (q, scene.objects)
    assert q.answer in S.answer_vocabulary(q.type)
    assert q.template.split("/")[0] == q.type


# ------------------------------------------------------------------------------------------------
# determinism and seeds


def test_same_split_and_index_give_the_same_bytes_and_questions():
    for split in S.SPLITS:
        a, b = S.make_scene(split, 7), S.make_scene(split, 7)
        assert a.image.tobytes() == b.image.tobytes()
        assert a.objects == b.objects and a == b
        assert S.questions_for(a) == S.questions_for(b)


def test_a_scene_does_not_depend_on_how_many_are_generated():
    small = S.dataset("validation", 12, image_size=64)
    large = S.dataset("validation", 40, image_size=64)
    assert [(s.seed, q) for s, q in small] == [(s.seed, q) for s, q in large[:12]]
    assert (
        S.make_scene("validation", 5, 64).image.tobytes() == next(s for s, _ in large if s.index == 5).image.tobytes()
    )


def test_splits_never_share_a_seed_and_give_different_images():
    seeds = {split: {S.seed_for(split, i) for i in range(20000)} for split in S.SPLITS}
    assert all(len(v) == 20000 for v in seeds.values())
    assert not (
        seeds["train"] & seeds["validation"] or seeds["train"] & seeds["test"] or seeds["validation"] & seeds["test"]
    )
    for split in S.SPLITS:
        for i in (0, 1, 12345, 10**9):
            assert S.split_of(S.seed_for(split, i)) == (split, i)
    digests = [_digest(S.make_scene(split, i, 64)) for split in S.SPLITS for i in range(40)]
    assert len(set(digests)) == len(digests)


def test_scene_from_seed_is_make_scene():
    scene = S.make_scene("test", 11, 96)
    again = S.scene_from_seed(scene.seed, 96)
    assert (again.split, again.index) == ("test", 11)
    assert again.image.tobytes() == scene.image.tobytes()


def test_question_streams_are_independent_per_type_and_seedable():
    scene = S.make_scene("train", 3, 64)
    every = {q.type: q for q in S.questions_for(scene)}
    for t in S.QUESTION_TYPES:
        assert S.questions_for(scene, types=(t,)) == ([every[t]] if t in every else [])
    assert S.questions_for(scene, 5) == S.questions_for(scene, 5)
    a = S.questions_for(scene, np.random.default_rng(0))
    b = S.questions_for(scene, np.random.default_rng(0))
    assert a == b and len(a) >= 4


# ------------------------------------------------------------------------------------------------
# answers right by construction


def test_every_answer_and_its_cells_match_an_independent_oracle():
    for split in S.SPLITS:
        for scene, q in S.iter_dataset(split, 600, image_size=48):
            _check_question(scene, q)


@settings(max_examples=60, deadline=None)
@given(split=st.sampled_from(S.SPLITS), index=st.integers(0, 10**9), seed=st.integers(0, 2**32))
def test_property_questions_of_any_scene_match_the_oracle(split, index, seed):
    scene = S.make_scene(split, index, 48)
    assert 1 <= len(scene.objects) <= S.MAX_OBJECTS
    assert len({o.cell for o in scene.objects}) == len(scene.objects)
    questions = S.questions_for(scene, seed)
    assert {q.type for q in questions} >= set(S.QUESTION_TYPES) - {"location"}
    for q in questions:
        _check_question(scene, q)


@pytest.mark.parametrize("size", [224, 336])
def test_each_object_is_drawn_in_its_colour_at_its_place_and_empty_cells_hold_no_object_colour(size):
    for index in range(12):
        scene = S.make_scene("test", index, size)
        img = scene.image.astype(int)
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            patch = img[y0:y1, x0:x1]
            exact = np.abs(patch - np.array(o.rgb)).max(axis=-1) <= 2
            assert exact.mean() > 0.25, (o, exact.mean())  # a star fills the least of its box, ~0.35
            # the drawn pixels span about the object's extent around its centre
            ys, xs = np.nonzero(exact)
            for lo, hi, centre in ((xs.min(), xs.max(), o.centre[0] - x0), (ys.min(), ys.max(), o.centre[1] - y0)):
                assert 0.75 * o.extent <= hi + 1 - lo <= o.extent + 1, (o, lo, hi)
                assert abs((lo + hi + 1) / 2 - centre) < 0.1 * o.extent, (o, lo, hi)
        for cell in range(9):
            x0, y0, x1, y1 = scene.cell_box(cell)
            patch = img[y0:y1, x0:x1]
            seen = {c for c, rgb in NOMINAL.items() if (np.abs(patch - np.array(rgb)).max(axis=-1) <= 25).sum() >= 10}
            obj = scene.object_in(cell)
            assert seen == ({obj.colour} if obj else set()), (index, cell, seen, obj)


@pytest.mark.parametrize("size", [224, 336])
def test_images_at_224_and_336_have_the_same_layout(size):
    scene, ref = S.make_scene("train", 4, size), S.make_scene("train", 4, 336)
    assert scene.image.shape == (size, size, 3) and scene.image.dtype == np.uint8
    assert not scene.image.flags.writeable
    assert scene.image_size == size and scene.pil().size == (size, size)
    assert [(o.shape, o.colour, o.size, o.cell, o.rgb) for o in scene.objects] == [
        (o.shape, o.colour, o.size, o.cell, o.rgb) for o in ref.objects
    ]
    for o, r in zip(scene.objects, ref.objects):
        assert np.allclose(np.array(o.centre) / size, np.array(r.centre) / 336, atol=1.5 / size)
    assert S.questions_for(scene) == S.questions_for(ref)


# ------------------------------------------------------------------------------------------------
# balance and chance


@pytest.fixture(scope="module")
def test_split():
    return [q for _, q in S.iter_dataset("test", 2000, image_size=48)]


def test_every_type_is_asked_about_equally_often_with_every_answer(test_split):
    per_type = Counter(q.type for q in test_split)
    assert set(per_type) == set(S.QUESTION_TYPES)
    # one question of each type per scene; a location question only when an object is uniquely described
    assert len({per_type[t] for t in S.QUESTION_TYPES if t != "location"}) == 1
    assert 0.95 * per_type["count"] <= per_type["location"] <= per_type["count"]
    dist = S.answer_distribution(test_split)
    for t, counts in dist.items():
        vocab = S.answer_vocabulary(t)
        assert set(counts) == set(vocab), t
        share = np.array([counts[a] for a in vocab]) / sum(counts.values())
        # each answer within a factor of ~1.6 of uniform (400 questions: sampling noise is ~25 % relative)
        assert share.max() < 1.6 / len(vocab) and share.min() > 0.55 / len(vocab), (t, counts)
    assert 0.45 <= dist["existence"]["yes"] / per_type["existence"] <= 0.55


def test_chance_accuracy_is_the_majority_rate(test_split):
    chance = S.chance_accuracy(test_split)
    dist = S.answer_distribution(test_split)
    for t in S.QUESTION_TYPES:
        assert chance[t] == pytest.approx(max(dist[t].values()) / sum(dist[t].values()))
        assert chance[t] < 1.6 / len(S.answer_vocabulary(t))
    assert chance["overall"] == pytest.approx(sum(max(c.values()) for c in dist.values()) / len(test_split))
    hand = [
        S.Question("a", "yes", "existence", (), "existence/yes"),
        S.Question("b", "yes", "existence", (), "existence/yes"),
        S.Question("c", "no", "existence", (), "existence/no-partial"),
        S.Question("d", "3", "count", (), "count/all"),
    ]
    assert S.chance_accuracy(hand) == {"count": 1.0, "existence": 2 / 3, "overall": 3 / 4}
    assert S.chance_accuracy([(None, q) for q in hand]) == S.chance_accuracy(hand)


def test_answer_vocabulary():
    assert S.answer_vocabulary("count") == ("0", "1", "2", "3", "4", "5", "6")
    assert S.answer_vocabulary("existence") == ("no", "yes")
    assert S.answer_vocabulary("location") == S.CELLS
    every = S.answer_vocabulary()
    assert len(every) == 7 + len(S.COLOURS) + len(S.SHAPES) + 2 + 9 == len(set(every))
    assert all(a == a.lower() and " " not in a for a in every)


def test_per_scene_spreads_the_types_over_scenes():
    pairs = S.dataset("train", 50, image_size=48, per_scene=2)
    assert len(pairs) == 50
    by_scene = Counter(s.index for s, _ in pairs)
    assert max(by_scene.values()) <= 2
    assert Counter(q.type for _, q in pairs).keys() == set(S.QUESTION_TYPES)
    assert S.dataset("train", 0) == []


# ------------------------------------------------------------------------------------------------
# errors and the example writer


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: S.make_scene("tets", 0), ["split", "tets", "train"]),
        (lambda: S.make_scene("test", -1), ["index", "-1"]),
        (lambda: S.make_scene("test", 0, 20), ["image_size", "20", "48"]),
        (lambda: S.make_scene("test", 0, 224.0), ["image_size", "224.0"]),
        (lambda: S.make_scene("test", 0, True), ["image_size"]),
        (lambda: S.dataset("test", -3), ["'n'", "-3"]),
        (lambda: S.dataset("test", 3, per_scene=6), ["per_scene", "6"]),
        (lambda: S.questions_for(S.make_scene("test", 0, 48), types=("colour", "size")), ["types", "size", "count"]),
        (lambda: S.questions_for(S.make_scene("test", 0, 48), -2), ["rng", "-2"]),
        (lambda: S.answer_vocabulary("size"), ["qtype", "size"]),
        (lambda: S.chance_accuracy([]), ["at least one"]),
        (lambda: S.chance_accuracy(["what?"]), ["Question", "str"]),
    ],
)
def test_bad_arguments_say_what_was_given_and_what_is_allowed(call, words):
    with pytest.raises(InvalidParameterError) as info:
        call()
    for word in words:
        assert word in str(info.value)


def test_save_examples_and_the_module_command(tmp_path, capsys):
    path = S.save_examples(tmp_path / "ex", 3, image_size=64)
    records = json.loads(path.read_text())
    assert [r["index"] for r in records] == [0, 1, 2]
    assert all((tmp_path / "ex" / r["file"]).is_file() and r["questions"] for r in records)
    assert records[0]["objects"][0]["cell_name"] in S.CELLS
    S._main(["--summary", "20", "--split", "validation"])
    out = capsys.readouterr().out
    assert "overall" in out and "existence" in out

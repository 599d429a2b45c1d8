"""Tests of the embedded world: determinism, splits, the scene parser, and the text about scenes."""

import numpy as np

import world


def blur(img, sigma):
    """A tiny separable Gaussian blur of a uint8 [H, W, 3] picture (edges padded by replication), written
    here rather than taken from world.py, so that the parser is not tested against its own blur."""
    r = np.arange(-3, 4)
    k = np.exp(-r * r / (2 * sigma * sigma))
    k /= k.sum()
    x = np.pad(img.astype(np.float32), ((3, 3), (3, 3), (0, 0)), mode='edge')
    x = sum(k[i] * x[i:i + img.shape[0]] for i in range(7))
    return sum(k[i] * x[:, i:i + img.shape[1]] for i in range(7))


def decoder_like(img, sigma, noise, rng):
    return np.clip(np.round(blur(img, sigma) + rng.normal(0, noise, img.shape)), 0, 255).astype(np.uint8)


def test_same_seed_gives_the_same_world_and_other_seeds_differ():
    def draw(seed):
        rng = np.random.default_rng(seed)
        s = world.sample_scene(rng)
        return (s, world.render(s, rng=rng).tobytes(), world.render(s).tobytes(), world.caption(s, rng),
                world.question_answer(s, rng), world.text_document(rng))
    assert draw(3) == draw(3)
    assert all(draw(3)[i] != draw(4)[i] for i in (0, 1, 3, 5))


def test_render_without_rng_is_deterministic_and_centred():
    s = (world.Obj(4, 'red', 'square', 'large'),)
    img = world.render(s)
    assert img.dtype == np.uint8 and img.shape == (world.RES, world.RES, 3)
    assert (world.render(s) == img).all() and (img[0, 0] == world.BACKGROUND).all()
    assert (img[16, 16] == world.COLORS['red']).all()
    assert (img == img[::-1, ::-1]).all()  # a square in the middle cell is symmetric


def test_train_split_never_shows_a_held_out_combination_and_the_test_split_always_does():
    rng = np.random.default_rng(0)
    colors, shapes = set(), set()
    for _ in range(2000):
        s = world.sample_scene(rng)
        assert not any((o.color, o.shape) in world.HELDOUT_COMBOS for o in s)
        colors |= {o.color for o in s}
        shapes |= {o.shape for o in s}
        assert any((o.color, o.shape) in world.HELDOUT_COMBOS for o in world.sample_scene(rng, heldout=True))
    assert colors == set(world.COLORS) and shapes == set(world.SHAPES)


def test_scenes_have_one_to_three_objects_in_distinct_cells_sorted_by_place():
    rng = np.random.default_rng(1)
    counts = set()
    for _ in range(500):
        s = world.sample_scene(rng)
        counts.add(len(s))
        assert list(s) == sorted(s) and len({o.place for o in s}) == len(s) == len({(o.color, o.shape) for o in s})
    assert counts == {1, 2, 3}
    assert all(len(world.sample_scene(rng, n)) == n for n in (1, 2, 3))


def test_parser_reads_back_every_rendered_scene_exactly():
    rng = np.random.default_rng(2)
    for _ in range(500):
        s = world.sample_scene(rng)
        assert world.parse(world.render(s)) == s
        assert world.parse(world.render(s, rng=rng)) == s          # with position jitter
    for _ in range(50):
        s = world.sample_scene(rng)
        assert world.parse(world.render(s, 64, rng=rng)) == s      # another resolution
        assert world.parse(world.render(s) / 255.0) == s            # a float picture in [0, 1]


def test_parser_survives_decoder_like_blur_and_noise():
    rng = np.random.default_rng(3)
    scenes = [world.sample_scene(rng) for _ in range(300)]
    hits = [world.parse(decoder_like(world.render(s, rng=rng), 0.8, 8, rng)) == s for s in scenes]
    # measured: 1.000 (300/300) at sigma 0.8 px, noise 8/255; 0.99 at sigma 1.2, noise 16; 0.93-0.95 at sigma 1.5
    assert np.mean(hits) >= 0.95


def test_parser_survives_a_dim_or_brighter_background_decoder():
    rng = np.random.default_rng(4)
    scenes = [world.sample_scene(rng) for _ in range(100)]
    dim = [world.parse(decoder_like(16 + 0.75 * (world.render(s, rng=rng) - 16.0), 0.8, 8, rng)) == s
           for s in scenes]
    shifted = [world.parse(decoder_like(world.render(s, rng=rng) + 15.0, 0.8, 8, rng)) == s for s in scenes]
    assert np.mean(dim) >= 0.95 and np.mean(shifted) >= 0.95  # measured: 1.00 and 1.00


def test_parser_sees_empty_and_noise_pictures_as_empty_scenes():
    assert world.parse(world.render(())) == ()
    noise = np.random.default_rng(5).normal(16, 8, (32, 32, 3)).clip(0, 255).astype(np.uint8)
    assert world.parse(noise) == ()


def test_parser_keeps_same_coloured_neighbours_apart():
    s = (world.Obj(0, 'magenta', 'triangle', 'large'), world.Obj(1, 'magenta', 'square', 'large'),
         world.Obj(3, 'magenta', 'circle', 'large'))
    assert world.parse(decoder_like(world.render(s), 1.2, 0, np.random.default_rng(6))) == s


def test_captions_mention_every_object():
    rng = np.random.default_rng(7)
    markers = ('and a ', ': a ', 'there is a ', 'object', 'a picture of ')  # one per template
    seen = set()
    for _ in range(300):
        s = world.sample_scene(rng, 2)
        c = world.caption(s, rng)
        seen |= {m for m in markers if m in c}
        assert c == c.lower()
        for o in s:
            assert o.color in c and o.shape in c and o.size in c and world.PLACES[o.place] in c
    assert seen == set(markers)


def test_answers_are_true_of_the_scene():
    rng = np.random.default_rng(8)
    kinds = set()
    for _ in range(1000):
        s = world.sample_scene(rng)
        q, a = world.question_answer(s, rng)
        at = lambda o: q.endswith(f"the {world.PLACES[o.place]}?")
        named = lambda o: q.endswith(f" {o.color} {o.shape}?")
        if q.startswith('what color is the object at'):
            kinds.add('color')
            assert [o.color for o in s if at(o)] == [a]
        elif q.startswith('what shape is at'):
            kinds.add('shape')
            assert [o.shape for o in s if at(o)] == [a]
        elif q.startswith('where is the'):
            kinds.add('place')
            assert [world.PLACES[o.place] for o in s if named(o)] == [a]
        elif q.startswith('how many'):
            kinds.add('count')
            assert a == str(len(s))
        elif q.startswith('what size'):
            kinds.add('size')
            assert [o.size for o in s if named(o)] == [a]
        elif q.startswith('is there anything at'):
            kinds.add('anything')
            assert a == ('yes' if any(at(o) for o in s) else 'no')
        else:
            kinds.add('exists')
            assert q.startswith('is there a') and a == ('yes' if any(named(o) for o in s) else 'no')
            assert not any(q.endswith(f" {c} {sh}?") for c, sh in world.HELDOUT_COMBOS) or a == 'yes'
    assert len(kinds) == 7


def test_answers_come_from_the_candidate_sets_eval_scores_against():
    rng = np.random.default_rng(9)
    options = set(world.COLORS) | set(world.SHAPES) | set(world.PLACES) | set(world.SIZES) | {'yes', 'no', '1', '2', '3'}
    answers = [world.question_answer(world.sample_scene(rng), rng)[1] for _ in range(500)]
    assert set(answers) <= options
    assert 0.3 < np.mean([a == 'yes' for a in answers if a in ('yes', 'no')]) < 0.7  # 'no' is not a free win


def test_text_documents_are_short_deterministic_and_varied():
    docs = [world.text_document(np.random.default_rng(i)) for i in range(500)]
    assert all(0 < len(d) < 300 for d in docs)
    assert all(1 <= d.count('.') <= 4 for d in docs)
    assert docs == [world.text_document(np.random.default_rng(i)) for i in range(500)]
    assert len(set(docs)) > 450
    assert not any(f"{c} {s}" in d for d in docs for c, s in world.HELDOUT_COMBOS)

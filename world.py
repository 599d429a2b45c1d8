"""
The embedded world: small pictures of 1-3 coloured shapes on a 3x3 grid, their captions, questions about
them, and text-only documents. Nothing to download; every random function takes an explicit numpy Generator,
so the same seed gives the same data on every machine.

    scene = sample_scene(rng)         # (Obj(place=0, color='red', shape='circle', size='small'), ...)
    img = render(scene)               # uint8 [32, 32, 3]
    parse(img) == scene               # the scene parser reads a picture back, also a decoder's blurry one
    caption(scene, rng), question_answer(scene, rng), text_document(rng)

A few colour x shape pairs (HELDOUT_COMBOS) never appear in training scenes or texts: generating them
measures compositional generalisation. Every colour and every shape still appears in training.
"""

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

RES = 32
SHAPES = ('circle', 'square', 'triangle')
COLORS = {'red': (230, 30, 30), 'green': (40, 200, 60), 'blue': (50, 90, 240),
          'yellow': (235, 220, 40), 'magenta': (220, 50, 220), 'cyan': (40, 220, 230)}
SIZES = ('small', 'large')
PLACES = ('top left', 'top', 'top right', 'left', 'center', 'right', 'bottom left', 'bottom', 'bottom right')
# a Latin square: each held-out colour and each held-out shape appears once, so every colour and every shape
# keeps 2+ training partners
HELDOUT_COMBOS = frozenset({('red', 'triangle'), ('green', 'circle'), ('blue', 'square')})

BACKGROUND = (16, 16, 16)
# half-extent of a shape and the jitter of its centre, as fractions of a grid cell (at res 32: 6.4 and 9 px
# across, jitter up to 0.85 px). 0.42 + 0.08 <= 0.5: an object never leaves its cell
HALF = {'small': 0.30, 'large': 0.42}
JITTER = 0.08


@dataclass(frozen=True, order=True)
class Obj:
    place: int   # index into PLACES; first, so that sorting a scene orders it by place
    color: str
    shape: str
    size: str


def describe(o):
    return f"{o.size} {o.color} {o.shape}"


def where(o):
    return f"the {PLACES[o.place]}"


# -----------------------------------------------------------------------------
# scenes and pictures


def sample_scene(rng, n_objects=None, heldout=False):
    """n_objects (default: uniform 1..3) objects in distinct cells with distinct (colour, shape), so that
    "the red circle" names one object. heldout=True: the first object drawn uses a held-out pair."""
    n = int(rng.integers(1, 4)) if n_objects is None else int(n_objects)
    places = rng.choice(len(PLACES), size=n, replace=False)
    seen = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELDOUT_COMBOS]
    objs, used = [], set()
    for i, place in enumerate(places):
        pool = [cs for cs in (sorted(HELDOUT_COMBOS) if heldout and i == 0 else seen) if cs not in used]
        color, shape = pool[int(rng.integers(len(pool)))]
        used.add((color, shape))
        objs.append(Obj(int(place), color, shape, SIZES[int(rng.integers(len(SIZES)))]))
    return tuple(sorted(objs))


def cell_center(place, res):
    row, col = divmod(place, 3)
    return (row + 0.5) * res / 3, (col + 0.5) * res / 3  # (y, x) in pixels


def inside(shape, dy, dx, half):
    """Whether points at offset (dy, dx) from a shape's centre lie inside it (half = half-extent, pixels)."""
    if shape == 'circle':
        return dx * dx + dy * dy <= half * half
    if shape == 'square':  # the circle's bounding box: full corners keep it apart from a blurred circle
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == 'triangle':  # apex up; the half-width grows from 0 at the apex to `half` at the base
        return (dy >= -half) & (dy <= half) & (np.abs(dx) <= (dy + half) / 2)
    raise ValueError(f"unknown shape {shape!r}")


def coverage(shape, cy, cx, half, ys, xs, ss=4):
    """Fraction of each pixel (ys, xs: integer pixel coordinates) a shape centred at (cy, cx) covers, from
    ss x ss samples per pixel. Anti-aliasing makes a picture a smooth function of the object's position:
    with hard pixel-centre tests a square's width jumps between 7 and 8 pixels under a 0.05 px shift, and a
    small disc can come out as an exact square. Arguments broadcast, so many candidates rasterise at once."""
    sub = (np.arange(ss) + 0.5) / ss
    dy = (ys - cy)[..., None, None] + sub[:, None]
    dx = (xs - cx)[..., None, None] + sub[None, :]
    return inside(shape, dy, dx, half).mean((-2, -1))


def render(scene, res=RES, rng=None):
    """uint8 [res, res, 3]: flat colours on a dark background, edges anti-aliased. With rng each object moves
    a little inside its cell (up to JITTER of a cell); without rng the picture is fully deterministic."""
    img = np.zeros((res, res, 3), np.float32) + BACKGROUND
    ys, xs = np.mgrid[0:res, 0:res]
    cell = res / 3
    for o in scene:
        cy, cx = cell_center(o.place, res)
        if rng is not None:
            cy, cx = cy + rng.uniform(-JITTER, JITTER) * cell, cx + rng.uniform(-JITTER, JITTER) * cell
        a = coverage(o.shape, cy, cx, HALF[o.size] * cell, ys, xs)[..., None]
        img = img * (1 - a) + np.array(COLORS[o.color], np.float32) * a
    return np.round(img).astype(np.uint8)


# -----------------------------------------------------------------------------
# the scene parser: colour amount per pixel -> connected components -> shape and size by matching blurred
# templates -> place by the shape's centre. Fill ratio alone (0.79 / 1.0 / 0.5) blurs away on 6 px shapes,
# so each component is compared with every (shape, size), rasterised exactly like render and blurred at a
# few widths: a blurry picture is matched by an equally blurry hypothesis, and all of the object's pixels
# take part, not only those above a threshold.

_PALETTE = np.array(list(COLORS.values()), np.float32) - np.array(BACKGROUND, np.float32)  # (C, 3)
_SIGMAS = (0.0, 0.5, 0.8, 1.1, 1.4, 1.8)  # blur widths (pixels at res 32) a decoder's output may have


def blur_matrix(n, sigma):
    """[n, n] Gaussian blur along one axis, rows renormalised at the edges; blurring an image is G @ x @ G.T."""
    if sigma == 0:
        return np.eye(n, dtype=np.float32)
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    g = np.exp(-d * d / (2 * sigma * sigma))
    return (g / g.sum(1, keepdims=True)).astype(np.float32)


def components(mask, cells):
    """4-connected components of a boolean [H, W] mask as an int map (-1 = not in the mask). Pixels in
    different grid cells (`cells`, int [H, W]) never connect: objects live inside their cells, and two
    same-coloured neighbours that blur into each other stay two objects. Every pixel takes the smallest
    index among its neighbours until nothing changes (a few dozen vectorised steps)."""
    h, w = mask.shape
    none = h * w
    lab = np.where(mask, np.arange(none).reshape(h, w), none)
    down, right = cells[1:] == cells[:-1], cells[:, 1:] == cells[:, :-1]  # may connect across these edges
    while True:
        m = lab.copy()
        m[1:] = np.where(down, np.minimum(m[1:], lab[:-1]), m[1:])
        m[:-1] = np.where(down, np.minimum(m[:-1], lab[1:]), m[:-1])
        m[:, 1:] = np.where(right, np.minimum(m[:, 1:], lab[:, :-1]), m[:, 1:])
        m[:, :-1] = np.where(right, np.minimum(m[:, :-1], lab[:, 1:]), m[:, :-1])
        m = np.where(mask, m, none)
        if (m == lab).all():
            return np.where(mask, lab, -1)
        lab = m


@lru_cache(maxsize=8)
def _candidates(res):
    """The comparison window's half-width, its blur matrices, and per (shape, size) the half-extent and
    how far the centroid sits below the shape's centre."""
    cell = res / 3
    r = int(np.ceil(0.6 * cell)) + 2                       # window half-width: a large shape plus its blur
    blurs = np.stack([blur_matrix(2 * r + 1, s * res / 32) for s in _SIGMAS])      # (S, n, n)
    # a rasterised triangle's centroid sits half/3 below its centre (mass gathers at the base)
    cands = [(shape, size, HALF[size] * cell, HALF[size] * cell / 3 if shape == 'triangle' else 0.0)
             for shape in SHAPES for size in SIZES]
    return r, blurs, cands


def classify(strength, near, cy, cx, res):
    """The (shape, size, centre) whose blurred template best explains `strength` (float [n, n], colour
    amount in [0, 1] in a window centred on pixel (round(cy), round(cx)), zero outside `near`), comparing
    only the `near` pixels. (cy, cx) is the object's mass centroid; the centre is returned as (y, x)."""
    r, blurs, cands = _candidates(res)
    y0, x0 = int(round(cy)) - r, int(round(cx)) - r
    ys, xs = np.mgrid[y0:y0 + 2 * r + 1, x0:x0 + 2 * r + 1]
    best, best_err = None, np.inf
    for shape, size, half, drop in cands:
        t = coverage(shape, cy - drop, cx, half, ys, xs).astype(np.float32)   # (n, n)
        tb = (blurs @ t @ blurs.transpose(0, 2, 1)) * near                     # (S, n, n), one per blur
        # a decoder may paint a little too dim or too bright: fit the amplitude, within limits
        gain = np.clip((tb * strength).sum((1, 2)) / ((tb * tb).sum((1, 2)) + 1e-6), 0.7, 1.3)
        err = ((gain[:, None, None] * tb - strength) ** 2).sum((1, 2)).min()
        if err < best_err:
            best, best_err = (shape, size, cy - drop, cx), err
    return best


def parse(img):
    """Read a picture (uint8 [H, W, 3], or float in [0, 1]) back into a Scene. Colours are measured from the
    picture's median (its background). A pixel belongs to the palette colour that explains it best, if it
    carries at least half of that colour: a half-intensity threshold keeps a blurred shape's outline where it
    was. Specks are ignored; at most one object (the most massive) per cell, so the result is a valid Scene."""
    img = np.asarray(img)
    img = img.astype(np.float32) * (255.0 if np.issubdtype(img.dtype, np.floating) else 1.0)
    res = img.shape[0]
    cell = res / 3
    r = _candidates(res)[0]
    x = img.reshape(-1, 3)
    x = x - np.median(x, 0)  # the background covers most of a picture; a decoder may shift it a little
    amount = x @ _PALETTE.T / (_PALETTE ** 2).sum(1)                                # (P, C)
    resid = ((x[:, None, :] - amount[:, :, None] * _PALETTE[None]) ** 2).sum(-1)   # (P, C)
    label = np.where(amount > 0, resid, np.inf).argmin(1)
    strong = (amount[np.arange(len(x)), label] >= 0.5).reshape(res, res)
    label = label.reshape(res, res)
    amount = np.clip(amount, 0, 1).reshape(res, res, -1)
    rows = np.minimum((np.arange(res) + 0.5) // cell, 2).astype(int)  # the cell row of each pixel's centre
    cells = rows[:, None] * 3 + rows[None, :]
    pad = lambda a: np.pad(a, r)  # windows may hang over the picture's edge
    found = {}
    for c, color in enumerate(COLORS):
        comp = components(strong & (label == c), cells)
        for k in np.unique(comp[comp >= 0]):
            mask = comp == k
            if mask.sum() < 4 * (res / 32) ** 2:  # noise or colour fringes
                continue
            # compare within 2 px of the object's pixels and inside its cell only: a neighbour's blurred
            # edge (cyan, say, carries a lot of green) stays out of the comparison
            near = mask.copy()
            for _ in range(2):  # grow by one pixel in every direction (in place; numpy buffers overlaps)
                near[1:] |= near[:-1]
                near[:-1] |= near[1:]
                near[:, 1:] |= near[:, :-1]
                near[:, :-1] |= near[:, 1:]
            near &= (cells == cells[mask][0]) & ((comp < 0) | mask)
            s = amount[..., c] * near
            cy, cx = (np.array(np.nonzero(near)) + 0.5) @ s[near] / s.sum()  # mass centroid (blur keeps it)
            iy, ix = int(round(cy)) + r, int(round(cx)) + r
            win = lambda a: pad(a)[iy - r:iy + r + 1, ix - r:ix + r + 1]
            shape, size, sy, sx = classify(win(s), win(near).astype(np.float32), cy, cx, res)
            place = min(max(int(sy // cell), 0), 2) * 3 + min(max(int(sx // cell), 0), 2)
            if place not in found or s.sum() > found[place][0]:
                found[place] = (s.sum(), Obj(place, color, shape, size))
    return tuple(sorted(o for _, o in found.values()))


# -----------------------------------------------------------------------------
# text: captions, questions and answers, text-only documents

_NUMBERS = ('no', 'one', 'two', 'three', 'four', 'five', 'six')
_CORNERS = {'circle': 'no corners', 'square': 'four corners', 'triangle': 'three corners'}


def caption(scene, rng):
    """One of five templates, objects in random order; each object's size, colour, shape and place appear."""
    objs = list(scene)
    rng.shuffle(objs)
    n = len(objs)
    k = int(rng.integers(5))
    if k == 0:
        return ' and '.join(f"a {describe(o)} at {where(o)}" for o in objs) + '.'
    if k == 1:
        return '; '.join(f"{PLACES[o.place]}: a {describe(o)}" for o in objs) + '.'
    if k == 2:
        return ' '.join(f"there is a {describe(o)} in {where(o)}." for o in objs)
    if k == 3:
        return f"{_NUMBERS[n]} object{'s' if n > 1 else ''}: " + ', '.join(
            f"a {o.color} {o.shape} ({o.size}, {PLACES[o.place]})" for o in objs) + '.'
    return 'a picture of ' + ', '.join(f"a {o.size} {o.shape} in {o.color} at {where(o)}" for o in objs) + '.'


QUESTION_KINDS = ('color', 'shape', 'place', 'count', 'size', 'is there', 'anything at')


def question_answer(scene, rng, kind=None):
    """A question about the scene and its short answer: a colour, shape, place, size, 'yes'/'no' or a count
    '1'-'3'. Objects are named by place or by colour and shape, both unique within a scene. kind: one of
    QUESTION_KINDS (in that order: what color is the object at P, what shape is at P, where is the C S, how
    many, what size is the C S, is there a C S, is there anything at P), or None for a uniform draw."""
    o = scene[int(rng.integers(len(scene)))]
    k = int(rng.integers(7)) if kind is None else QUESTION_KINDS.index(kind)
    if k == 0:
        return f"what color is the object at {where(o)}?", o.color
    if k == 1:
        return f"what shape is at {where(o)}?", o.shape
    if k == 2:
        return f"where is the {o.color} {o.shape}?", PLACES[o.place]
    if k == 3:
        return "how many objects are there?", str(len(scene))
    if k == 4:
        return f"what size is the {o.color} {o.shape}?", o.size
    if k == 5:  # half the time about an object that is there, so 'no' is not always right
        if rng.random() < 0.5:
            color, shape = o.color, o.shape
        else:  # never name a held-out pair in training text, not even to deny it
            pairs = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELDOUT_COMBOS]
            color, shape = pairs[int(rng.integers(len(pairs)))]
        present = any((p.color, p.shape) == (color, shape) for p in scene)
        return f"is there a {color} {shape}?", 'yes' if present else 'no'
    place = o.place if rng.random() < 0.5 else int(rng.integers(len(PLACES)))
    return f"is there anything at the {PLACES[place]}?", 'yes' if any(p.place == place for p in scene) else 'no'


def yes_no_question(scene, rng, kind, answer):
    """A question of kind 'is there' or 'anything at' about the scene whose answer is `answer` ('yes' or 'no'):
    yes about an object of the scene (its colour and shape, or its place), no about a training colour x
    shape pair the scene lacks, or an empty place. Asked in pairs on one picture (data.py's qa_balance), the
    same picture answers both ways, so no constant answer is right more than half the time."""
    o = scene[int(rng.integers(len(scene)))]
    if kind == 'is there':
        if answer == 'yes':
            color, shape = o.color, o.shape
        else:
            there = {(p.color, p.shape) for p in scene}
            pairs = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELDOUT_COMBOS and (c, s) not in there]
            color, shape = pairs[int(rng.integers(len(pairs)))]
        return f"is there a {color} {shape}?", answer
    if kind == 'anything at':
        if answer == 'yes':
            place = o.place
        else:
            empty = [i for i in range(len(PLACES)) if all(p.place != i for p in scene)]
            place = empty[int(rng.integers(len(empty)))]
        return f"is there anything at the {PLACES[place]}?", answer
    raise ValueError(f"{kind!r} is not a yes/no question kind")


def relation(a, b):
    """Where a is seen from b, in words ('to the left of', 'above', ...)."""
    (ra, ca), (rb, cb) = divmod(a.place, 3), divmod(b.place, 3)
    parts = []
    if ra != rb:
        parts.append('above' if ra < rb else 'below')
    if ca != cb:
        parts.append('to the left of' if ca < cb else 'to the right of')
    return ' and '.join(parts)


def text_document(rng):
    """A short text-only document about the world (1-4 sentences, < 300 characters): stories, counts,
    comparisons, facts. Built from training scenes, so held-out pairs never appear in text either."""
    scene = sample_scene(rng, 3)
    a, b, c = (scene[i] for i in rng.permutation(3))  # a scene is sorted by place; stories need not be
    k = int(rng.integers(6))
    if k == 0:
        return (f"first there was a {describe(a)} at {where(a)}. then a {describe(b)} appeared at {where(b)}. "
                f"the {a.color} {a.shape} stayed where it was.")
    if k == 1:
        n, m = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        return (f"in the box there are {_NUMBERS[n]} {a.color} {a.shape}{'s' * (n > 1)} and {_NUMBERS[m]} "
                f"{b.color} {b.shape}{'s' * (m > 1)}. together that makes {_NUMBERS[n + m]} things to count.")
    if k == 2:
        return (f"a {a.shape} has {_CORNERS[a.shape]}. the {a.color} {a.shape} is {a.size} and "
                f"the {b.color} {b.shape} is {b.size}.")
    if k == 3:
        return (f"the {a.color} {a.shape} moved from {where(a)} to {where(c)}. then it moved to {where(b)}. "
                f"nothing else moved, so the picture still shows one {a.size} {a.shape}.")
    if k == 4:
        return f"the {a.color} {a.shape} is {relation(a, b)} the {b.color} {b.shape}."
    bigger = 'as big as' if a.size == b.size else ('bigger than' if a.size == 'large' else 'smaller than')
    return (f"this picture shows three objects. the {describe(a)} is {bigger} the {describe(b)}. "
            f"the {c.color} {c.shape} sits at {where(c)}.")

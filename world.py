"""
The embedded world: small procedural pictures of 1-3 objects, their captions, questions about them, and
text-only documents. No download; everything is a pure function of an explicit numpy Generator, so the
same seed gives the same data on every machine.

    scene = sample_scene(rng)           # (Obj(place=0, color='red', shape='circle', size='small'), ...)
    img = render(scene)                 # uint8 [32, 32, 3]
    parse(img) == scene                 # the scene parser reads pictures back (also blurry decoder output)
    caption(scene, rng), question_answer(scene, rng), text_document(rng)

Some colour x shape combinations never appear in training (HELDOUT_COMBOS): generating them tests
compositional generalisation. Every colour and every shape still appears in training with other partners.
"""

from dataclasses import dataclass

import numpy as np

RES = 32
SHAPES = ('circle', 'square', 'triangle')
COLORS = {'red': (230, 40, 40), 'green': (40, 200, 60), 'blue': (50, 90, 240),
          'yellow': (235, 220, 40), 'magenta': (220, 50, 220), 'cyan': (40, 220, 230)}
SIZES = ('small', 'large')
PLACES = ('top left', 'top', 'top right', 'left', 'center', 'right', 'bottom left', 'bottom', 'bottom right')
HELDOUT_COMBOS = frozenset({('red', 'triangle'), ('green', 'circle'), ('blue', 'square')})
CHANCE = {'color': 1 / len(COLORS), 'shape': 1 / len(SHAPES), 'place': 1 / len(PLACES), 'size': 1 / len(SIZES)}
BACKGROUND = np.array([16, 16, 16], np.float32)
# object half-extent and position jitter, as fractions of a grid cell: a large object plus jitter stays
# inside its cell, so objects never touch and the parser sees one component per object
HALF = {'small': 0.30, 'large': 0.43}
JITTER = 0.04


@dataclass(frozen=True, order=True)
class Obj:
    place: int   # index into PLACES (first, so a sorted scene is ordered by place)
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
    """1-3 objects in distinct cells with distinct (colour, shape). heldout=False: no held-out combination;
    heldout=True: the first drawn object uses one (the compositional test split)."""
    n = int(rng.integers(1, 4)) if n_objects is None else n_objects
    places = rng.choice(len(PLACES), size=n, replace=False)
    seen = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELDOUT_COMBOS]
    unseen = sorted(HELDOUT_COMBOS)
    objs, used = [], set()
    for i, place in enumerate(places):
        pool = unseen if (heldout and i == 0) else seen
        pool = [cs for cs in pool if cs not in used]
        color, shape = pool[int(rng.integers(len(pool)))]
        used.add((color, shape))
        objs.append(Obj(int(place), color, shape, SIZES[int(rng.integers(len(SIZES)))]))
    return tuple(sorted(objs))


def shape_mask(shape, cx, cy, half, res, window=None):
    """Boolean mask of a shape centred at (cx, cy) with half-extent `half` (pixels): [res, res], or over
    the rows/columns of `window` = (y0, y1, x0, x1)."""
    y0, y1, x0, x1 = window or (0, res, 0, res)
    ys, xs = np.mgrid[y0:y1, x0:x1] + 0.5
    dx, dy = xs - cx, ys - cy
    if shape == 'circle':
        return dx * dx + dy * dy <= half * half
    if shape == 'square':
        s = half * 0.86  # a square of the circle's area, so size does not give shape away
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == 'triangle':  # pointing up: width grows linearly from the apex to the base
        return (dy >= -half) & (dy <= half) & (np.abs(dx) <= (dy + half) / 2)
    raise ValueError(f"unknown shape {shape!r}")


def cell_center(place, res):
    cell = res / 3
    row, col = divmod(place, 3)
    return (col + 0.5) * cell, (row + 0.5) * cell


def render(scene, res=RES, rng=None):
    """uint8 [res, res, 3]. With rng, each object moves by a small jitter inside its cell."""
    img = np.tile(BACKGROUND.astype(np.uint8), (res, res, 1))
    cell = res / 3
    for o in scene:
        cx, cy = cell_center(o.place, res)
        if rng is not None:
            cx, cy = cx + rng.uniform(-JITTER, JITTER) * cell, cy + rng.uniform(-JITTER, JITTER) * cell
        img[shape_mask(o.shape, cx, cy, HALF[o.size] * cell, res)] = COLORS[o.color]
    return img


# -----------------------------------------------------------------------------
# the scene parser: colour masks -> connected components -> shape and size by template -> place by centroid

_PALETTE = np.array(list(COLORS.values()), np.float32) - BACKGROUND  # (C, 3)


def components(mask):
    """4-connected components of a boolean mask, as lists of (y, x)."""
    seen = np.zeros_like(mask)
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, comp = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            comp.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(comp)
    return out


_OFFSETS = (-0.4, 0.0, 0.4)
_SIGMAS = (0.0, 0.7, 1.2)  # the blur a decoder may add; templates are compared at each


def gaussian_blur(x, sigma):
    """Separable Gaussian blur of a 2-D float array (edges padded by replication)."""
    if sigma == 0:
        return x
    r = np.arange(-3, 4)
    k = np.exp(-r ** 2 / (2 * sigma * sigma))
    k /= k.sum()
    p = np.pad(x, 3, mode='edge')
    x = sum(k[i] * p[i:i + x.shape[0], 3:-3] for i in range(7))
    return sum(k[i] * np.pad(x, ((0, 0), (3, 3)), mode='edge')[:, i:i + x.shape[1]] for i in range(7))


def classify(strength, cy, cx, res):
    """The (shape, size) whose template best explains the colour strength map (float [h, w] around the
    object, 1 = full colour) in squared error. Templates are rasterised like render and blurred at a few
    widths, so a blurry decoder output is compared with an equally blurry template."""
    cell = res / 3
    best, best_err = None, np.inf
    y0, x0 = max(int(cy - 0.6 * cell), 0), max(int(cx - 0.6 * cell), 0)
    window = (y0, y0 + strength.shape[0], x0, x0 + strength.shape[1])
    for shape in SHAPES:
        for size in SIZES:
            half = HALF[size] * cell
            # the component's centroid is not the shape's centre for a triangle: its mass sits low by half/3
            oy = half / 3 if shape == 'triangle' else 0.0
            for dy in _OFFSETS:
                for dx in _OFFSETS:
                    t = shape_mask(shape, cx + dx, cy - oy + dy, half, res, window).astype(np.float32)
                    for sigma in _SIGMAS:
                        err = ((gaussian_blur(t, sigma) - strength) ** 2).sum()
                        if err < best_err:
                            best, best_err = (shape, size), err
    return best


def parse(img):
    """Read a picture (uint8 [H, W, 3] or float in [0, 1]) back into a Scene. Each pixel gets the palette
    colour that explains it best and counts as that colour's object where it carries at least half of the
    colour's strength: a half-intensity threshold, which keeps blurred shapes at their true size."""
    img = np.asarray(img, np.float32)
    if img.max() <= 1.0:
        img = img * 255
    res = img.shape[0]
    x = img.reshape(-1, 3) - BACKGROUND                                    # (P, 3)
    alpha = x @ _PALETTE.T / (_PALETTE ** 2).sum(1)                        # (P, C): amount of each colour
    resid = ((x[:, None, :] - alpha[:, :, None] * _PALETTE[None]) ** 2).sum(-1)
    label = resid.argmin(1)
    strong = alpha[np.arange(len(x)), label] >= 0.5
    label = np.where(strong, label, -1).reshape(res, res)
    names = list(COLORS)
    objs = []
    for c, color in enumerate(names):
        for comp in components(label == c):
            if len(comp) < 4 + (res // 32) ** 2 * 2:  # specks from noise or colour fringes
                continue
            ys, xs = np.array(comp).T
            cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
            cell = res / 3
            # this object's colour strength in a window around it, other objects' pixels zeroed
            near = np.zeros((res, res), bool)
            near[np.clip(ys[:, None] + np.arange(-2, 3), 0, res - 1).ravel(),
                 np.repeat(xs, 5)] = True
            near |= np.roll(near, 1, 1) | np.roll(near, -1, 1) | np.roll(near, 2, 1) | np.roll(near, -2, 1)
            y0, x0 = max(int(cy - 0.6 * cell), 0), max(int(cx - 0.6 * cell), 0)
            y1, x1 = min(int(cy + 0.6 * cell) + 1, res), min(int(cx + 0.6 * cell) + 1, res)
            strength = np.where(near, np.clip(alpha[:, c].reshape(res, res), 0, 1), 0)[y0:y1, x0:x1]
            shape, size = classify(strength, cy, cx, res)
            if shape == 'triangle':
                cy -= HALF[size] * cell / 3  # back to the shape's centre before finding its cell
            row, col = min(int(cy // cell), 2), min(int(cx // cell), 2)
            objs.append(Obj(row * 3 + col, color, shape, size))
    return tuple(sorted(objs))


# -----------------------------------------------------------------------------
# text: captions, questions, documents


def caption(scene, rng):
    """One of several templates; every object's size, colour, shape and place is mentioned."""
    objs = list(scene)
    rng.shuffle(objs)
    k = int(rng.integers(4))
    if k == 0:
        return ' and '.join(f"a {describe(o)} at {where(o)}" for o in objs) + '.'
    if k == 1:
        return '; '.join(f"{PLACES[o.place]}: a {describe(o)}" for o in objs) + '.'
    if k == 2:
        return ' '.join(f"there is a {describe(o)} in {where(o)}." for o in objs)
    n = len(objs)
    return f"{n} object{'s' if n > 1 else ''}: " + ', '.join(
        f"a {o.color} {o.shape} ({o.size}, {PLACES[o.place]})" for o in objs) + '.'


def question_answer(scene, rng):
    """A question about the scene and its one-word (or one-place) answer. Objects are named by place or by
    colour and shape, which are unique within a scene."""
    o = scene[int(rng.integers(len(scene)))]
    k = int(rng.integers(6))
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
    color, shape = list(COLORS)[int(rng.integers(len(COLORS)))], SHAPES[int(rng.integers(len(SHAPES)))]
    present = any((p.color, p.shape) == (color, shape) for p in scene)
    return f"is there a {color} {shape}?", 'yes' if present else 'no'


_CORNERS = {'circle': 'no corners', 'square': 'four corners', 'triangle': 'three corners'}
_NUMBERS = ('no', 'one', 'two', 'three', 'four', 'five')


def text_document(rng):
    """A short text-only document about the world: stories, counts and facts (< 300 characters)."""
    a, b = sample_scene(rng, 2)
    k = int(rng.integers(4))
    if k == 0:
        return (f"first there was a {describe(a)} at {where(a)}. then a {describe(b)} appeared at "
                f"{where(b)}, and the {a.shape} stayed where it was.")
    if k == 1:
        n, m = int(rng.integers(6)), int(rng.integers(6))
        return (f"in the box there are {_NUMBERS[n]} {a.color} things and {_NUMBERS[m]} {b.shape}s. "
                f"that makes {_NUMBERS[n + m] if n + m < 6 else 'many'} things to count.")
    if k == 2:
        return (f"a {a.shape} has {_CORNERS[a.shape]}. a {b.shape} has {_CORNERS[b.shape]}. "
                f"the {a.color} one is {a.size} and the {b.color} one is {b.size}.")
    return (f"the {a.color} {a.shape} moved from {where(a)} to {where(b)}. "
            f"nothing else moved, so the picture now shows one {a.size} {a.shape}.")

"""
The embedded world's moving pictures: videos of bouncing objects, and an egocentric view moving over a
procedural map by actions written as text (the "world model" data). Nothing to download; every random
function takes an explicit numpy Generator, and a map is a pure function of its id, so the same seed gives
the same data on every machine.

    frames, text = sample_video(rng)                  # uint8 [8, 32, 32, 3], "a small red circle moves ..."
    frames, actions, positions = sample_trajectory(rng, map_id=3)   # actions [(dx, dy), ...]
    format_action(2, -1) == 'action: dx=+2, dy=-1';  format_words(2, -1) == 'right x2, up'
    parse_action('right x2, up') == (2, -1);  estimate_shift(frames[0], frames[1]) ~= actions[0]
    read_video('clip.mp4', res=32, fps=1);  write_gif('rollout.gif', frames)

Coordinates here are (x, y) = (column, row), as in actions; world.py's helpers take (y, x).
"""

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib.util import find_spec

import imageio.v3 as iio
import numpy as np
from PIL import Image

import world

# -----------------------------------------------------------------------------
# moving objects

MAX_SPEED = 2  # pixels per frame, per axis


@dataclass(eq=False)
class Mover:
    color: str
    shape: str
    size: str
    xy: np.ndarray  # float [F, 2]: the centre (x, y) in each frame
    v: np.ndarray   # int [F, 2]: the velocity (vx, vy) for the step from frame f (flipped after a bounce)


def half_extent(size, res):
    """Half-extent in pixels, the same as a still picture's objects (world.render)."""
    return world.HALF[size] * res / 3


def simulate(xy0, v0, n_frames, lo, hi):
    """Constant velocity with elastic bounces: a step that would cross lo or hi (the centre's limits, which
    keep the object's extent inside the frame) is mirrored at that wall and the velocity component flips.
    |v| <= MAX_SPEED is far below hi - lo, so one reflection per step is enough."""
    xys, vs = [np.array(xy0, np.float64)], [np.array(v0, np.int64)]
    for _ in range(n_frames - 1):
        xy = xys[-1] + vs[-1]
        xys.append(np.where(xy < lo, 2 * lo - xy, np.where(xy > hi, 2 * hi - xy, xy)))
        vs.append(np.where((xy < lo) | (xy > hi), -vs[-1], vs[-1]))
    return np.stack(xys), np.stack(vs)


def sample_movers(rng, n_frames=8, res=world.RES, heldout=False):
    """1-2 objects drawn like a still scene (world.sample_scene: distinct colour x shape pairs, held-out
    pairs only with heldout=True), each starting at a random point inside its scene cell (so that the text
    can name where it starts) with an integer velocity, components in -MAX_SPEED..MAX_SPEED, not both 0."""
    scene = world.sample_scene(rng, int(rng.integers(1, 3)), heldout=heldout)
    cell = res / 3
    movers = []
    for o in scene:
        half = half_extent(o.size, res)
        cy, cx = world.cell_center(o.place, res)
        # +-0.45 of a cell keeps the start inside the cell; clipping to the walls cannot leave it either
        xy0 = np.clip(np.array([cx, cy]) + rng.uniform(-0.45, 0.45, 2) * cell, half, res - half)
        while True:
            v0 = rng.integers(-MAX_SPEED, MAX_SPEED + 1, 2)
            if v0.any():
                break
        xy, v = simulate(xy0, v0, n_frames, half, res - half)
        movers.append(Mover(o.color, o.shape, o.size, xy, v))
    return movers


def render_movers(movers, res=world.RES):
    """uint8 [F, res, res, 3], anti-aliased exactly like world.render; later objects are drawn on top.
    All frames rasterise at once: coverage broadcasts over a leading frame axis."""
    n = len(movers[0].xy)
    img = np.zeros((n, res, res, 3), np.float32) + world.BACKGROUND
    ys, xs = np.mgrid[0:res, 0:res]
    for m in movers:
        cx, cy = m.xy[:, 0, None, None], m.xy[:, 1, None, None]
        a = world.coverage(m.shape, cy, cx, half_extent(m.size, res), ys, xs)[..., None]
        img = img * (1 - a) + np.array(world.COLORS[m.color], np.float32) * a
    return np.round(img).astype(np.uint8)


def direction(vx, vy):
    """'up and to the right', 'left', ... (y grows downwards, so vy < 0 is up)."""
    h = 'right' if vx > 0 else 'left' if vx < 0 else ''
    u = 'down' if vy > 0 else 'up' if vy < 0 else ''
    return f"{u} and to the {h}" if h and u else h or u


def motion_text(movers, rng, res=world.RES):
    """Each object's size, colour, shape, speed and first direction; one template also names where it
    starts. 'bouncing' is said only of objects that hit a wall in this clip, so the text stays true."""
    k = int(rng.integers(2))
    parts = []
    for m in movers:
        vx, vy = m.v[0]
        speed = 'quickly' if max(abs(vx), abs(vy)) > 1 else 'slowly'
        bounces = bool((m.v != m.v[0]).any())
        if k == 0:
            parts.append(f"a {m.size} {m.color} {m.shape} moves {speed} {direction(vx, vy)}"
                         + (", bouncing off the walls" if bounces else ""))
        else:
            col, row = (np.minimum(m.xy[0] // (res / 3), 2)).astype(int)
            parts.append(f"the {m.color} {m.shape} ({m.size}) starts at the {world.PLACES[row * 3 + col]} and "
                         f"heads {direction(vx, vy)} {speed}" + (" until it hits a wall" if bounces else ""))
    return ('. ' if k == 0 else '; ').join(parts) + '.'


def sample_video(rng, n_frames=8, res=world.RES, heldout=False):
    """(frames uint8 [n_frames, res, res, 3], text). sample_movers(rng) on a generator in the same state
    gives the objects' positions and velocities behind these frames."""
    movers = sample_movers(rng, n_frames, res, heldout)
    return render_movers(movers, res), motion_text(movers, rng, res)


# -----------------------------------------------------------------------------
# navigation: an egocentric res x res view moving over a larger map

MAP_SIZE = 96
N_TRAIN_MAPS = 64
HELDOUT_MAP_BASE, N_HELDOUT_MAPS = 1_000_000, 16  # a separate range, so that the splits can never overlap
MAX_STEP = 4
_MAP_SEED = 0x6D6170  # mixed with the map id: maps are unrelated to any other stream of the world


def map_ids(split):
    """The map ids of 'train' or 'heldout'; held-out maps are never seen in training."""
    if split == 'train':
        return range(N_TRAIN_MAPS)
    if split == 'heldout':
        return range(HELDOUT_MAP_BASE, HELDOUT_MAP_BASE + N_HELDOUT_MAPS)
    raise ValueError(f"unknown split {split!r}: expected 'train' or 'heldout'")


def value_noise(rng, size, cell):
    """Smooth noise in [-1, 1], float [size, size, 3]: random values on a grid with spacing `cell`,
    interpolated with a smoothstep so the texture has no visible grid lines."""
    g = rng.uniform(-1, 1, (size // cell + 2, size // cell + 2, 3))
    i, f = np.divmod(np.arange(size) / cell, 1)
    i, f = i.astype(int), (f * f * (3 - 2 * f))[:, None]
    rows = g[i] * (1 - f)[..., None] + g[i + 1] * f[..., None]                  # (size, n, 3)
    return rows[:, i] * (1 - f.T)[..., None] + rows[:, i + 1] * f.T[..., None]  # (size, size, 3)


@lru_cache(maxsize=256)
def make_map(map_id, size=MAP_SIZE):
    """uint8 [size, size, 3], a pure function of map_id (read-only: it is cached and shared). The
    background is dark, low-contrast noise at three scales (16, 8 and 4 px), so that every patch of the map
    looks different from its neighbours, which motion estimation needs; on it stand 8-15 landmarks, world
    shapes in world colours at world sizes, never touching. Each colour x shape pair stands at most once (so
    8-15: there are 15 training pairs, held-out pairs never appear): two identical high-contrast landmarks
    in one view correlate with each other and were the cause of most wrong motion estimates."""
    if int(map_id) < 0:
        raise ValueError(f"map ids are non-negative integers, got {map_id!r}")
    rng = np.random.default_rng([_MAP_SEED, int(map_id)])
    noise = sum(w * value_noise(rng, size, c) for c, w in ((16, 1.0), (8, 0.7), (4, 0.5)))
    img = np.clip(36 + 16 * noise, 0, 255)  # std ~10 grey levels: dark, and far below the landmarks
    pairs = [(c, s) for c in world.COLORS for s in world.SHAPES if (c, s) not in world.HELDOUT_COMBOS]
    big = half_extent('large', world.RES)
    n_marks, centres = int(rng.integers(8, len(pairs) + 1)), []
    for _ in range(200):  # rejection sampling; a crowded map simply ends up with fewer landmarks
        if len(centres) == n_marks:
            break
        c = rng.uniform(big + 1, size - big - 1, 2)
        if all(np.hypot(*(c - d)) > 2 * big + 2 for d in centres):
            centres.append(c)
    for (cx, cy), k in zip(centres, rng.permutation(len(pairs))):
        color, shape = pairs[k]
        half = half_extent(world.SIZES[int(rng.integers(2))], world.RES)
        # rasterise only the landmark's neighbourhood: the whole map for each would cost ~10x more
        y0, y1, x0, x1 = int(cy - half) - 1, int(cy + half) + 2, int(cx - half) - 1, int(cx + half) + 2
        a = world.coverage(shape, cy, cx, half, *np.mgrid[y0:y1, x0:x1])[..., None]
        img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - a) + np.array(world.COLORS[color]) * a
    img = np.round(img).astype(np.uint8)
    img.flags.writeable = False
    return img


def view(map_img, x, y, res=world.RES):
    """The res x res crop whose top-left corner is (x, y), a copy; it must lie inside the map."""
    h, w = map_img.shape[:2]
    if x != int(x) or y != int(y) or not (0 <= x <= w - res and 0 <= y <= h - res):
        raise ValueError(f"a {res}x{res} view at (x={x}, y={y}) does not fit in a {w}x{h} map")
    x, y = int(x), int(y)
    return map_img[y:y + res, x:x + res].copy()


def sample_trajectory(rng, map_id, n_frames=8, res=world.RES, max_step=MAX_STEP):
    """(frames uint8 [F, res, res, 3], actions [(dx, dy)] * (F - 1), positions [(x, y)] * F): a random
    start, then random moves; frame f + 1 is exactly view(map, x + dx, y + dy). Each component is drawn
    uniformly from the moves in -max_step..max_step that keep the view inside the map (the range is clipped
    before drawing, so nothing is resampled and every step uses the generator the same way)."""
    m = make_map(map_id)
    lim_x, lim_y = m.shape[1] - res, m.shape[0] - res
    x, y = int(rng.integers(0, lim_x + 1)), int(rng.integers(0, lim_y + 1))
    positions, actions = [(x, y)], []
    for _ in range(n_frames - 1):
        dx = int(rng.integers(max(-max_step, -x), min(max_step, lim_x - x) + 1))
        dy = int(rng.integers(max(-max_step, -y), min(max_step, lim_y - y) + 1))
        x, y = x + dx, y + dy
        actions.append((dx, dy))
        positions.append((x, y))
    return np.stack([view(m, px, py, res) for px, py in positions]), actions, positions


def heldout_walk(rng, n_frames):
    """A walk of n_frames over a random held-out map: (map id, frames, actions, positions), as
    sample_trajectory returns them; what eval.py scores a world model on and sample.py shows."""
    ids = map_ids('heldout')
    map_id = ids[int(rng.integers(len(ids)))]
    return (map_id, *sample_trajectory(rng, map_id, n_frames))


# -----------------------------------------------------------------------------
# actions as text: 'action: dx=+2, dy=-1' (the paper's format) or word commands 'right x2, up'

def format_action(dx, dy):
    return f"action: dx={int(dx):+d}, dy={int(dy):+d}"


def format_words(dx, dy):
    """x is the column, y the row: dx > 0 is right, dy < 0 is up; 'stay' for no move."""
    parts = [f"{word}{f' x{abs(d)}' if abs(d) > 1 else ''}"
             for d, word in ((int(dx), 'right' if dx > 0 else 'left'), (int(dy), 'down' if dy > 0 else 'up'))
             if d]
    return ', '.join(parts) or 'stay'


_NUMERIC = re.compile(r'action:\s*dx\s*=\s*([+-]?\d+)\s*,\s*dy\s*=\s*([+-]?\d+)')
_WORD = re.compile(r'(left|right|up|down)(?:\s*x\s*(\d+))?')
_STEP = {'left': (0, -1), 'right': (0, 1), 'up': (1, -1), 'down': (1, 1)}  # word -> (axis, sign)


def parse_action(text):
    """(dx, dy) from either form (case and spaces are free; the size of a move is not limited here);
    anything else raises ValueError."""
    def fail(why):
        raise ValueError(f"cannot read the action {text!r} ({why}): expected 'action: dx=+2, dy=-1' or "
                         f"word commands such as 'right x2, up' (left/right/up/down with an optional xN, "
                         f"each axis at most once, or 'stay' alone)")
    t = text.strip().lower() if isinstance(text, str) else fail('not a string')
    if m := _NUMERIC.fullmatch(t):
        return int(m[1]), int(m[2])
    if t.startswith('action') or 'dx' in t or 'dy' in t:
        fail('a malformed numeric action')
    if t == 'stay':
        return 0, 0
    move = [None, None]
    for part in (p.strip() for p in t.split(',')):
        if not (m := _WORD.fullmatch(part)):
            fail(f"{part!r} is not a direction with an optional count" if part else 'an empty part')
        (axis, sign), n = _STEP[m[1]], int(m[2] or 1)
        if n == 0 or move[axis] is not None:
            fail('a zero count' if n == 0 else f"the {'xy'[axis]} axis named twice")
        move[axis] = sign * n
    return move[0] or 0, move[1] or 0


# -----------------------------------------------------------------------------
# motion estimation, to score a world model: how far did the camera move between two frames?

def estimate_shift(a, b, candidates=5):
    """(dx, dy) floats such that b looks like a seen from (x + dx, y + dy), as actions are written.
    Phase correlation proposes: the cross-power spectrum normalised towards unit magnitude keeps mostly
    phase, whose inverse FFT peaks at the shift. A Hann window stops the frame edges (which do not move)
    from peaking at zero; the channels' spectra are summed. For blurry frames as a decoder paints them,
    |cross|^0.8 rather than |cross| and a Gaussian weight on frequency (sigma 0.25 cycles/px) damp the
    highest frequencies, which blur removes and noise fills: measured on held-out maps, 97.8% rather than
    93% of moves exact at blur 0.8 px + noise 4, 83% rather than 61% at 1.4 px + 8. Direct comparison
    decides: a landmark entering at an edge can outshine the texture and peak elsewhere (6 in 24,000 true
    pairs), so of the few highest local maxima the one under which the frames' overlap differs least wins.
    A parabola through that mismatch and its neighbours' gives the sub-pixel part."""
    a, b = (np.asarray(z, np.float64) for z in (a, b))
    if a.shape != b.shape:
        raise ValueError(f"frames of different shapes {a.shape} and {b.shape}")
    a, b = (z.reshape(*z.shape[:2], -1) for z in (a, b))  # [H, W] or [H, W, C] -> [H, W, C]
    h, w = a.shape[:2]
    hann = lambda n, m: np.outer(np.hanning(n + 2)[1:-1], np.hanning(m + 2)[1:-1])[..., None]
    fa, fb = (np.fft.fft2((z - z.mean((0, 1))) * hann(h, w), axes=(0, 1)) for z in (a, b))
    cross = (fa * np.conj(fb)).sum(-1)
    ky, kx = np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None]
    weight = np.exp(-(ky * ky + kx * kx) / (2 * 0.25 ** 2)) / (np.abs(cross) ** 0.8 + 1e-12)
    r = np.fft.ifft2(cross * weight).real
    peaks = r >= np.max([np.roll(r, (sy, sx), (0, 1)) for sy in (-1, 0, 1) for sx in (-1, 0, 1)], 0)
    wrap = lambda i, n: int(i) - n if i > n // 2 else int(i)  # the FFT's circular shift -> a signed shift
    shifts = [(wrap(iy, h), wrap(ix, w)) for iy, ix in sorted(zip(*np.nonzero(peaks)), key=lambda p: -r[p])]

    def mismatch(dy, dx):  # b[i, j] shows what a shows at [i + dy, j + dx]
        pa = a[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)]
        pb = b[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
        return ((pa - pb) ** 2).mean()
    dy, dx = min(shifts[:candidates], key=lambda s: mismatch(*s))
    # sub-pixel: compare the same part of b (and Hann-weighted, so content at its border matters little)
    # under the shift and its four neighbours; 0 mismatch is an exact match, which needs no refinement
    ys, xs = slice(max(0, 1 - dy), min(h, h - 1 - dy)), slice(max(0, 1 - dx), min(w, w - 1 - dx))
    part = b[ys, xs]
    wt = hann(*part.shape[:2])
    ssd = lambda ey, ex: (wt * (a[ys.start + dy + ey:ys.stop + dy + ey,
                                   xs.start + dx + ex:xs.stop + dx + ex] - part) ** 2).mean()
    c = ssd(0, 0)
    if c == 0:
        return float(dx), float(dy)

    def refine(left, right):
        curv = left - 2 * c + right
        return float(np.clip(0.5 * (left - right) / curv, -0.5, 0.5)) if curv > 0 else 0.0
    return dx + refine(ssd(0, -1), ssd(0, 1)), dy + refine(ssd(-1, 0), ssd(1, 0))


# -----------------------------------------------------------------------------
# files: read real clips into the world's frame size; write rollouts as GIFs

STREAMS = ('.mp4', '.m4v', '.mov', '.avi', '.mkv', '.webm')  # need ffmpeg; everything else goes to pillow


def stream_backend():
    """The imageio plugin that reads MP4 and the like here: 'pyav', 'FFMPEG', or None (neither installed)."""
    return 'pyav' if find_spec('av') else 'FFMPEG' if find_spec('imageio_ffmpeg') else None


def square_crop(frame, res):
    """Centre-crop to a square (keeps the aspect ratio) and box-average to res x res (PIL's BOX filter is
    an exact area average when shrinking)."""
    h, w = frame.shape[:2]
    s = min(h, w)
    frame = frame[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return np.asarray(Image.fromarray(np.ascontiguousarray(frame[..., :3])).resize((res, res), Image.BOX))


def read_video(path, res=world.RES, fps=None):
    """uint8 [F, res, res, 3] from a GIF (or any animation pillow reads) or, with PyAV or imageio-ffmpeg
    installed, an MP4/MOV/AVI/MKV/WebM. With fps, and a file that states its timing, the frames are those on
    screen at times 0, 1/fps, 2/fps, ... (subsampling a faster clip). Without fps, a GIF frame shown k times
    as long as the shortest one counts k times: GIF writers (Pillow's included) merge identical consecutive
    frames into one longer frame, and this undoes that."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no video file at {path!r}")
    plugin = 'pillow'
    if os.path.splitext(path)[1].lower() in STREAMS:
        plugin = stream_backend()
        if plugin is None:
            raise RuntimeError(f"reading {path!r} needs a video backend: pip install av (or imageio-ffmpeg)")
    try:
        with iio.imopen(path, 'r', plugin=plugin) as f:
            if plugin == 'pillow':  # per-frame durations, in ms
                n = f.properties(index=None).n_images
                frames = [square_crop(f.read(index=i, mode='RGB'), res) for i in range(n)]
                dur = [f.metadata(index=i).get('duration') for i in range(n)]
                dur = [d / 1000 for d in dur] if all(dur) else None
            else:  # a constant frame rate
                rate = f.metadata().get('fps')
                frames = [square_crop(x, res) for x in f.iter()]
                dur = [1 / rate] * len(frames) if rate and np.isfinite(rate) else None
    except Exception as e:  # imageio and its backends raise many types for a bad file
        raise ValueError(f"cannot read video {path!r}: {e}") from e
    if not frames:
        raise ValueError(f"no frames in video {path!r}")
    frames = np.stack(frames)
    if dur is None:
        return frames
    dur = np.array(dur)
    if fps is None:
        return np.repeat(frames, np.maximum(1, np.round(dur / dur.min()).astype(int)), axis=0)
    starts = np.cumsum(dur) - dur
    ticks = np.arange(0, dur.sum() - 1e-9, 1 / fps)
    return frames[np.searchsorted(starts, ticks + 1e-9, side='right') - 1]


def write_gif(path, frames, fps=4, scale=1):
    """Write frames (uint8 [F, H, W, 3], or floats in [0, 1]) as a looping GIF; scale > 1 enlarges each
    pixel to scale x scale so 32 px frames are visible. Stack rows first for comparisons, e.g.
    np.concatenate([predicted, truth], axis=1) puts the prediction above the ground truth. Each frame gets
    its own 256-colour palette by Pillow's max-coverage quantizer, undithered: measured on map views, the
    default median cut drops a small landmark's colour (errors up to 134 levels); this one errs by <= 9."""
    frames = np.asarray(frames)
    if np.issubdtype(frames.dtype, np.floating):
        frames = np.round(np.clip(frames, 0, 1) * 255)
    frames = frames.astype(np.uint8).repeat(scale, axis=1).repeat(scale, axis=2)
    ims = [Image.fromarray(f).quantize(256, method=Image.Quantize.MAXCOVERAGE, dither=Image.Dither.NONE)
           for f in frames]
    ims[0].save(path, format='GIF', save_all=True, append_images=ims[1:], duration=round(1000 / fps), loop=0)

"""
Documents from shards (shards.py reads them): image-text shards give caption->image and image->caption
documents, video shards video and action documents, text shards text documents, each in the mixture's share
like the world's (data.WorldData asks; docs/data.md).

    sd = ShardData(cfg, tok, res=32, n_latent=16, seed=1337)
    sd.start_streams(n_groups=world * grad_accum, slots=max(1, data_workers), states=ckpt_states)
    sd.begin('train', position, index)         # the batch being built (data.WorldData.get)
    doc = sd.document('caption2image', 'train', p_uncond=0.1)
    sd.take_states()                           # {reader: state} of the readers this batch advanced

A batch at (position, global micro index g) reads reader g * slots + position % slots of each stream: a loader
worker always builds the same positions of the same g, so each reader lives in one process, and train.py keeps
the last state of each from the batches it trained on. Pictures and frames are decoded, converted (any mode or
bit depth) and cropped + resized in the data workers, and travel in the batch as uint8 pixels: the frozen
encoder runs on the training device (data.encode_pending). A sample that does not decode, a picture without a
caption or a clip too short is skipped, counted and named once (shards.Reader.count_bad).
"""

import hashlib
import io
import json
import tempfile

import numpy as np
from PIL import Image
from tqdm import tqdm

import data
import documents
import folders
import shards
import video
from configurator import fail

PICTURE_EXT = ('jpg', 'jpeg', 'png', 'webp', 'bmp', 'tif', 'tiff', 'gif')
CLIP_EXT = ('mp4', 'm4v', 'mov', 'avi', 'mkv', 'webm', 'gif')
STREAM_OF = {'caption2image': 'image', 'image2caption': 'image', 'video': 'video', 'action': 'action',
             'text': 'text'}
KNOB_OF = {'image': 'image_shards', 'video': 'video_shards', 'action': 'video_shards', 'text': 'text_shards'}
FORMATS = {'image_shards': shards.TAR, 'video_shards': shards.TAR, 'text_shards': shards.JSONL + shards.PARQUET}


class Unusable(ValueError):
    """A sample that reads but cannot make a document (no caption, a clip too short): why."""


# -----------------------------------------------------------------------------
# samples -> documents


def first_of(sample, exts):
    return next((e for e in exts if e in sample), None)


def caption_of(sample):
    """The caption: the .txt member, else the `caption` (or `text`) of the .json member (img2dataset writes
    both)."""
    if sample.get('txt'):
        return sample['txt'].decode('utf-8', 'replace').strip()
    if sample.get('json'):
        meta = json.loads(sample['json'])
        return str(meta.get('caption') or meta.get('text') or '').strip() if isinstance(meta, dict) else ''
    return ''


def decode_picture(raw, res):
    """A picture file's bytes -> uint8 [res, res, 3]: any mode or bit depth made RGB (data.to_rgb8, alpha over
    black, a GIF's first frame), centre-cropped to a square and box-resized (video.square_crop), as
    folders.read_picture does. A large JPEG is decoded at a reduced scale first (DCT scaling, never below
    res), which is most of the speed."""
    with Image.open(io.BytesIO(raw)) as img:
        img.draft('RGB', (res, res))
        if img.mode in ('P', 'PA'):
            img = img.convert('RGBA')
        elif img.mode in ('CMYK', 'YCbCr', 'LAB', 'HSV', '1'):
            img = img.convert('RGB')
        arr = np.asarray(img)
    if not (arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3):
        arr = data.to_rgb8(arr)
    return video.square_crop(arr, res)


def decode_clip(raw, ext, res, fps):
    """A clip file's bytes -> uint8 [F, res, res, 3] sampled at fps (0: every frame), as video.read_video."""
    with tempfile.NamedTemporaryFile(suffix='.' + ext) as f:
        f.write(raw)
        f.flush()
        return video.read_video(f.name, res, fps or None)


def split_text(text, tok, longest):
    """A text cut into consecutive pieces of at most `longest` tokens, at a space where one is near: a long
    document becomes several rows' worth instead of losing its tail."""
    pieces, text = [], text.strip()
    fits = lambda n: len(tok.encode(text[:n])) <= longest
    while text:
        hi = min(len(text), 16 * longest)
        if fits(hi):
            n = hi
        else:
            lo = 0                      # fits(lo) and not fits(hi): bisect the longest prefix that fits
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if fits(mid) else (lo, mid)
            n = max(lo, 1)
        if n < len(text):
            space = text.rfind(' ', n // 2, n)
            n = space + 1 if space > 0 else n
        if text[:n].strip():
            pieces.append(text[:n].strip())
        text = text[n:].lstrip()
    return pieces


def cut(text, tok, longest):
    return folders.cut(text, tok, longest) if longest > 0 else ''


# -----------------------------------------------------------------------------
# the shard lists of a run


def shard_lists(cfg):
    """{stream: (training shards, held-out shards or None)} for the streams the knobs name (action documents
    read video_shards too); val_shards names held-out shards among them (None: held out by key hash). Fails
    with one sentence on a knob that names no shard or a shard of an unknown format."""
    out, named = {}, set(shards.expand(cfg['val_shards'])) if cfg['val_shards'] else set()
    for stream, knob in (('image', 'image_shards'), ('video', 'video_shards'), ('text', 'text_shards')):
        if not cfg[knob]:
            continue
        paths = shards.expand(cfg[knob], FORMATS[knob])
        if not paths:
            fail(f"{knob}={cfg[knob]!r} names no shard (no file matches; a folder needs "
                 f"{'/'.join(FORMATS[knob][:3])}... files)")
        foreign = [p for p in paths if not p.lower().split('?')[0].endswith(FORMATS[knob])]
        if foreign:
            fail(f"{knob}: {foreign[0]} is not a {' / '.join(FORMATS[knob])} shard")
        why = next(filter(None, map(shards.missing_reader, paths)), None)
        if why:
            fail(why)
        if not named:
            out[stream] = (paths, None)
            continue
        train, val = [p for p in paths if p not in named], [p for p in paths if p in named]
        if not train or not val:
            fail(f"val_shards leaves {knob} {'no training' if not train else 'no held-out'} shard: name some of "
                 f"its shards, not all (or leave val_shards empty to hold out samples by key hash)")
        out[stream] = (train, val)
    stray = sorted(named - {p for _, val in out.values() for p in val or ()})
    if stray:
        fail(f"val_shards names {stray[0]}, which is in no shard list (image_shards, video_shards, text_shards)")
    if 'video' in out:
        out['action'] = out['video']
    return out


def fingerprint(paths):
    return f"{len(paths)}:{hashlib.sha1(chr(10).join(paths).encode()).hexdigest()[:12]}"


def layout(cfg, n_groups, slots):
    """What a checkpoint's reader states depend on: the number of readers (processes x grad_accum, and
    max(1, data_workers) per micro-batch) and each shard list."""
    return {'groups': n_groups, 'slots': slots,
            'lists': {s: fingerprint(train) for s, (train, _) in shard_lists(cfg).items()}}


def check_layout(saved, now, path):
    """Refuse, in one sentence, a resume whose readers would not continue exactly: another split of the
    shards among readers, or other shard lists."""
    if saved is None:
        return
    if (saved['groups'], saved['slots']) != (now['groups'], now['slots']):
        fail(f"cannot resume {path} on shards exactly: its readers were split for processes x grad_accum = "
             f"{saved['groups']} and max(1, data_workers) = {saved['slots']}, this run has {now['groups']} and "
             f"{now['slots']} (a reader's place and shuffle buffer cannot be re-split): resume with those, or "
             f"start in another out_dir")
    changed = [s for s in saved['lists'] if s in now['lists'] and saved['lists'][s] != now['lists'][s]]
    if changed:
        fail(f"cannot resume {path} on shards: {KNOB_OF[changed[0]]} lists other shards than the checkpoint's "
             f"({saved['lists'][changed[0]].split(':')[0]} then, {now['lists'][changed[0]].split(':')[0]} now): "
             f"pass the same shards, or start in another out_dir")


def first_pictures(cfg, n, res):
    """The first n training pictures of image_shards in list order (held-out ones left out), decoded as
    documents decode them: uint8 [m, res, res, 3], m <= n (fewer when the shards hold fewer). What the encoder
    is fitted on and an RAE trains on (rae.build_encoder), as an image_folder's pictures are."""
    full = {**{k: '' for k in FORMATS}, 'val_shards': '', 'shard_val_share': data.KNOBS['shard_val_share'], **cfg}
    train, val = shard_lists(full)['image']
    keep = None if val is not None else (lambda key: not shards.held_out(key, full['shard_val_share']))
    reader = shards.Reader(train, 0, 1, 0, 1, 'image_shards', keep, shuffle=False, max_bad=1.0)
    out = []
    with tqdm(total=n, desc=f"reading up to {n} pictures of image_shards for the encoder", leave=False) as bar:
        while len(out) < n:
            ref, item = reader.next()
            if ref[0] > 0:     # one pass over the shards: they hold fewer
                break
            try:
                out.append(decode_picture(item[first_of(item, PICTURE_EXT)], res))
                bar.update(1)
            except Exception:  # no picture member, or one that does not decode (named when training reads it)
                continue
    if not out:
        fail(f"image_shards {cfg['image_shards']!r} holds no picture that decodes")
    return np.stack(out)


# -----------------------------------------------------------------------------
# checks before any long work


def probe(knob, paths, stream):
    """Read the first sample of the first readable of a list's first three shards: the list is of the kind
    its knob says (a picture member, a clip member, a text field), or one sentence says what is wrong."""
    errors = []
    for p in paths[:3]:
        try:
            gen = shards.records(p)
            _, _, key, item = next(gen)
            gen.close()
        except StopIteration:
            errors.append(f"{p} is empty")
            continue
        except Exception as e:  # unreadable: a missing file, a 404, a corrupt header
            errors.append(f"{p}: {type(e).__name__}: {str(e)[:160]}")
            continue
        if stream == 'text':
            if isinstance(item, shards.Bad):
                errors.append(f"{p}: {item}")
                continue
            return
        ext = first_of(item, PICTURE_EXT if stream == 'image' else CLIP_EXT)
        if ext is None:
            fail(f"the first sample of {p} ({key}: {', '.join(sorted(k for k in item if k != '__key__'))}) has "
                 f"no {'picture' if stream == 'image' else 'video'} member: is {knob} the right kind of shard?")
        if ext in CLIP_EXT[:-1] and not video.stream_backend():
            fail(f"{p} holds .{ext} clips: reading them needs a video backend: pip install av (or imageio-ffmpeg)")
        return
    fail(f"{knob}: none of its first shards reads ({errors[0]})")


def check(cfg, kinds, tok, n_latent):
    """The shard knobs, before any long work: values, lists, formats, the first sample of each list, the
    mixture and block_size. Returns the set of the mixture's kinds that shards serve."""
    if cfg['shard_buffer'] < 1 or not 0 <= cfg['shard_val_share'] < 1 or not 0 < cfg['shard_max_bad'] <= 1:
        fail(f"shard_buffer must be at least 1, shard_val_share in [0, 1) and shard_max_bad in (0, 1], got "
             f"{cfg['shard_buffer']}, {cfg['shard_val_share']}, {cfg['shard_max_bad']}")
    if cfg['val_shards'] and not any(cfg[k] for k in FORMATS):
        fail("val_shards names held-out shards of image_shards, video_shards or text_shards: set one of them")
    if cfg['image_shards'] and cfg['image_folder'] or cfg['video_shards'] and cfg['video_folder']:
        fail("pictures come from image_shards or image_folder, clips from video_shards or video_folder: not both")
    lists = shard_lists(cfg)
    if 'image' in lists and 'qa' in kinds:
        fail("question documents need the world's scenes: with image_shards, the mixture may hold text, "
             "caption2image, image2caption, video and action documents")
    served = {k for k in kinds if STREAM_OF.get(k) in lists}
    for stream in sorted({'video' if STREAM_OF[k] == 'action' else STREAM_OF[k] for k in served}):
        probe(KNOB_OF[stream], lists[stream][0], stream)
    for knob, kind_names in (('image_shards', 'caption2image or image2caption'), ('video_shards', 'video or action'),
                             ('text_shards', 'text')):
        if cfg[knob] and not any(KNOB_OF[STREAM_OF[k]] == knob for k in served):
            folders.warn(f"{knob} is set but the mixture {cfg['mixture']!r} draws no {kind_names} document")
    T, n = cfg['block_size'], cfg['video_frames']
    if {'caption2image', 'image2caption'} & served and T < n_latent + 5:
        fail(f"block_size={T} cannot hold a picture with a caption ({n_latent} latents + 5)")
    clip = n * (n_latent + 2) + 2 + n
    if {'video', 'action'} & served and T < clip:
        fail(f"block_size={T} cannot hold a clip of {n} frames with its text (~{clip} tokens): use block_size >= "
             f"{clip} or fewer video_frames")
    return served


# -----------------------------------------------------------------------------
# the streams of a run


class ShardData:
    """The shard streams of a run: documents of the kinds they serve, drawn reader by reader."""

    def __init__(self, cfg, tok, res, n_latent, seed):
        self.tok, self.res, self.n_latent, self.seed, self.T = tok, res, n_latent, seed, cfg['block_size']
        self.frames, self.fps = cfg['video_frames'], cfg['video_fps']
        self.buffer, self.val_share, self.max_bad = cfg['shard_buffer'], cfg['shard_val_share'], cfg['shard_max_bad']
        self.lists = shard_lists(cfg)
        self.start_streams(1, 1, {})   # made: (reader, ref) -> (kind, document) of samples put back
        self.val, self.val_next, self.val_key, self.at, self.last = {}, {}, '', (0, 0), None

    def serves(self, kind):
        return STREAM_OF.get(kind) in self.lists

    def start_streams(self, n_groups, slots, states):
        """The training readers' layout (n_groups global micro indices x slots positions) and where each
        starts: {reader name: state} from a checkpoint (none: from the beginning)."""
        self.layout, self.saved, self.readers, self.touched = (n_groups, slots), dict(states or {}), {}, set()
        self.made = {}

    def make_reader(self, stream, split, rank, n, state):
        train, val = self.lists[stream]
        held = split == 'val'
        paths = train if val is None or not held else val
        keep = None if val is not None else (lambda key, s=self.val_share: shards.held_out(key, s) == held)
        expand = {'text': lambda text: split_text(text, self.tok, self.T - 2),
                  'action': lambda s: [s] if s.get('actions') else []}.get(stream)
        return shards.Reader(paths, rank, n, self.seed, 1 if held else self.buffer, KNOB_OF[stream], keep, expand,
                             shuffle=not held, max_bad=self.max_bad, state=state)

    def reader(self, stream, split):
        if split != 'train':
            key = (self.val_key, stream)
            if key not in self.val:
                self.val[key] = self.make_reader(stream, 'val', 0, 1, None)
            return self.val[key]
        (position, index), (n_groups, slots) = self.at, self.layout
        if index >= n_groups:
            raise shards.DataError(f"micro-batch index {index} is outside the readers' layout ({n_groups} groups)")
        name = f"{stream}:{index * slots + position % slots}"
        if name not in self.readers:
            self.readers[name] = self.make_reader(stream, 'train', index * slots + position % slots,
                                                  n_groups * slots, self.saved.get(name))
        self.touched.add(name)
        return self.readers[name]

    def begin(self, split, position, index, mixture, replay):
        """A batch of (split, position, index) is about to be built. Held-out batches are a function of the
        position: each mixture's held-out streams start from the beginning at position 0, and a position asked
        out of order is reached by replaying the ones before (replay(j) builds batch j)."""
        if split == 'train':
            self.at = (position, index)
            return
        self.val_key = mixture
        if self.val_next.get(mixture) == position:
            self.val_next[mixture] = position + 1
            return
        for key in [k for k in self.val if k[0] == mixture]:
            self.made = {k: v for k, v in self.made.items() if k[0] is not self.val[key]}
            del self.val[key]
        self.val_next[mixture] = 0
        for j in range(position):
            replay(j)
        self.val_next[mixture] = position + 1

    def document(self, kind, split, p_uncond=0.0):
        """The next usable sample of the kind's stream as a document; unusable ones are counted and named. Its
        random draws (caption dropout, a clip's start and targets) come from (seed, kind, the sample's ref), so
        a document made again, after a resume, is the same."""
        r = self.reader(STREAM_OF[kind], split)
        while True:
            ref, item = r.next()
            made, doc = self.made.pop((r, tuple(ref)), (None, None))
            if made != kind:
                rng = np.random.default_rng([self.seed, documents.KINDS.index(kind), *ref])
                try:
                    doc = self.make_document(kind, item, rng, p_uncond)
                except Exception as e:  # PIL, imageio and json raise many types for a member that does not decode
                    key = item.get('__key__', '') if isinstance(item, dict) else f"at byte {ref[2]}"
                    r.count_bad(r.path(ref[0], ref[1]), key, f"{type(e).__name__}: {str(e)[:160]}", read=True)
                    continue
            r.ok += 1
            self.last = (doc, r, ref, item, kind)
            return doc

    def put_back(self, doc):
        """The last document did not fit the rows: its sample goes back to its reader, to come first next
        (and its document with it, not decoded again)."""
        if self.last is not None and self.last[0] is doc:
            _, r, ref, item, kind = self.last
            r.ok -= 1
            r.put_back(ref, item)
            self.made[(r, tuple(ref))] = (kind, doc)
            self.last = None

    def take_states(self):
        """{reader: state} of the training readers advanced since the last call (what a Batch carries)."""
        out = {name: self.readers[name].state() for name in sorted(self.touched)}
        self.touched = set()
        return out

    def make_document(self, kind, item, rng, p_uncond):
        T, n_latent = self.T, self.n_latent
        if kind == 'text':
            return [item]
        if kind in ('caption2image', 'image2caption'):
            ext = first_of(item, PICTURE_EXT)
            if ext is None:
                raise Unusable("no picture member (.jpg, .png, .webp, ...)")
            caption = caption_of(item)
            if not caption:
                raise Unusable("no caption (a .txt member, or a caption in the .json)")
            caption = cut(caption, self.tok, T - n_latent - 4)
            picture = decode_picture(item[ext], self.res)
            if kind == 'image2caption':
                return [documents.Visual(picture, False), caption]
            text = '' if rng.random() < p_uncond else caption
            return [text, documents.Visual(picture, True)] if text else [documents.Visual(picture, True)]
        ext, n = first_of(item, CLIP_EXT), self.frames
        if ext is None:
            raise Unusable("no video member (.mp4, .gif, .webm, ...)")
        frames = decode_clip(item[ext], ext, self.res, self.fps)
        if len(frames) < n:
            raise Unusable(f"{len(frames)} frames at video_fps={self.fps:g}, fewer than video_frames={n}")
        room = T - n * (n_latent + 2) - 2
        if kind == 'action':
            lines = [a.strip() for a in item['actions'].decode('utf-8', 'replace').splitlines() if a.strip()]
            if len(lines) < len(frames) - 1:
                raise Unusable(f"{len(lines)} action lines for {len(frames)} frames (one a step between frames)")
        start = int(rng.integers(len(frames) - n + 1))
        target = list(rng.random(n - 1) < 0.5) + [True]
        caption = caption_of(item) if kind == 'video' else ''
        doc = [cut(caption, self.tok, room)] if caption else []
        for i in range(n):
            if i and kind == 'action':
                doc.append(cut(lines[start + i - 1], self.tok, room // (n - 1)))
            doc.append(documents.Visual(frames[start + i], bool(target[i])))
        return doc

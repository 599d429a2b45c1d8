"""
Your own pictures and videos beside the embedded world: two folders become documents behind the world's own
boundaries (the frozen encoder, the latent cache, packing, the mixture). The world stays the default.

    image_folder/          pictures imageio reads: PNG, JPEG, BMP, TIFF, WebP (a GIF: its first frame)
        captions.jsonl     one {"file": "cat.png", "caption": "a cat on a sofa"} a line, and/or
        cat.txt            the caption of cat.png beside it (captions.jsonl wins where both give one)
    video_folder/          GIFs; MP4 / MOV / AVI / MKV / WebM too where PyAV or imageio-ffmpeg is installed
        walk.gif
        walk.txt           optional: its caption (a video document: the caption, then the frames)
        walk.actions       optional: one action line per step between sampled frames (action documents)

With image_folder, caption->image and image->caption documents take their pictures and captions from it
(question documents need the world's scenes and are refused); with video_folder, video and action documents
take their clips from it, sampled at video_fps frames a second (0: every frame).

A file is held out when the sha1 of its name falls below VAL_SHARE: deterministic, and no file changes side
when others are added. Pictures and frames are read once, centre-cropped to a square and resized to
image_size, and kept as uint8 in a memory-mapped cache; their latents in a latent cache (data.latent_cache).
Both are keyed by the folder's file names, sizes and modification times (latents by the encoder's weights
too): adding, editing or removing a file builds new caches and never serves stale ones; nothing already
built is removed. Grayscale, alpha, palette and 16-bit pictures are converted (data.to_rgb8).

Bad files: a picture or video that does not read, a picture without a caption, or an actions file with too few
lines is skipped with one warning naming it; when more than MAX_BAD of a folder's files are bad, or none is
usable, the run stops with one sentence.
"""

import hashlib
import json
import os
import re
import sys
from functools import lru_cache
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from tqdm import tqdm

import data
import documents
import video
from configurator import fail, remove_orphans

PICTURE_EXT = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.gif')
VIDEO_EXT = ('.gif', *video.STREAMS)
VAL_SHARE = 0.1   # held-out share of the files (by name hash)
MAX_BAD = 0.2     # more than this share of a folder's files unusable stops the run


def held_out(name):
    return int.from_bytes(hashlib.sha1(name.encode()).digest()[:4], 'big') / 2 ** 32 < VAL_SHARE


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def check_bad(folder, what, n_files, bad):
    """Stop with one sentence when a folder has nothing usable or too many bad files."""
    if n_files - len(bad) < 1:
        fail(f"{folder} has no usable {what} ({len(bad)} bad: {', '.join(n for n, _ in bad[:3])}...)")
    if len(bad) > MAX_BAD * n_files:
        fail(f"{len(bad)} of the {n_files} {what} in {folder} are unusable (more than {MAX_BAD:.0%}): "
             f"{'; '.join(f'{n}: {why}' for n, why in bad[:3])}")


def fingerprint(folder, names):
    """A key for a list of files: their names, sizes and modification times."""
    h = hashlib.sha1(os.path.abspath(folder).encode())
    for name in names:
        st = os.stat(os.path.join(folder, name))
        h.update(f'{name}\0{st.st_size}\0{st.st_mtime_ns}\0'.encode())
    return h.hexdigest()[:12]


def read_picture(path, res):
    """Any picture file -> uint8 [res, res, 3]: converted to RGB, centre-cropped to a square, resized."""
    return video.square_crop(data.to_rgb8(iio.imread(path, index=0)), res)


def frame_cache(name, items, read, res, cache_dir, desc):
    """Read each item once (read(item) -> uint8 [F, res, res, 3], or an exception for a bad one) into one
    memory-mapped file of frames: -> (uint8 [n, res, res, 3], [(item, first frame, frames)], [(item, why)]).
    Frames are appended as they are read, never held all at once; an index beside the file records what was
    kept and what was bad, so a rebuilt-from-cache run still names its bad files."""
    path = Path(cache_dir) / f'{name}.u8'
    index = path.with_suffix('.json')
    if path.exists() and index.exists():
        try:
            meta = json.loads(index.read_text())
            frames = np.memmap(path, np.uint8, 'r', shape=(meta['n'], res, res, 3)) if meta['n'] else np.zeros(
                (0, res, res, 3), np.uint8)
            return frames, [tuple(k) for k in meta['kept']], [tuple(b) for b in meta['bad']]
        except (ValueError, KeyError, OSError) as e:  # truncated, or an index of another file
            os.replace(path, path.with_name(path.name + '.corrupt'))
            warn(f"picture cache {path} is unusable ({e}): moved to {path.name}.corrupt, rebuilding it")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path.parent, re.escape(name))
    tmp = path.with_name(f'{name}.{os.getpid()}.tmp.u8')
    kept, bad, n = [], [], 0
    with open(tmp, 'wb') as f:
        for item in tqdm(items, desc=desc):
            try:
                x = np.ascontiguousarray(read(item), dtype=np.uint8)
            except Exception as e:  # a truncated or foreign file: imageio and its plugins raise many types
                bad.append((item, f"{type(e).__name__}: {str(e)[:120]}"))
                continue
            f.write(x.tobytes())
            kept.append((item, n, len(x)))
            n += len(x)
    index.write_text(json.dumps({'n': n, 'kept': kept, 'bad': bad}))
    os.replace(tmp, path)  # last: a cache file is there only with its index
    return frame_cache(name, items, read, res, cache_dir, desc)


def split_cache(folder, names, split, knob, what, prefix, read, res, cache_dir):
    """frame_cache of a split's files among `names` (the held-out ones for 'val'), keyed by prefix and their
    fingerprint: -> (frames, kept, bad, key). A split with no file stops the run."""
    names = [n for n in names if held_out(n) == (split == 'val')]
    if not names:
        fail(f"{knob} {folder} has no {'held-out' if split == 'val' else 'training'} {what} ({VAL_SHARE:.0%} of "
             f"the files are held out, by a hash of the name): add {what}s")
    key = f"{prefix}-{fingerprint(folder, names)}"
    return (*frame_cache(key, names, read, res, cache_dir, f"reading {len(names)} {split} {what}s"), key)


def read_captions(folder, names):
    """{file: caption} from captions.jsonl and from <stem>.txt beside a file (the former wins)."""
    caps = {}
    for name in names:
        txt = os.path.join(folder, os.path.splitext(name)[0] + '.txt')
        if os.path.isfile(txt):
            caps[name] = Path(txt).read_text(encoding='utf-8', errors='replace').strip()
    jsonl = os.path.join(folder, 'captions.jsonl')
    if os.path.isfile(jsonl):
        for i, line in enumerate(Path(jsonl).read_text(encoding='utf-8').splitlines()):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                caps[str(entry['file'])] = str(entry['caption']).strip()
            except (ValueError, KeyError, TypeError):
                fail(f"{jsonl} line {i + 1} is not {{\"file\": ..., \"caption\": ...}}: {line[:80]!r}")
    return caps


def cut(caption, tok, longest):
    """The caption, cut to at most `longest` tokens (at a word)."""
    while len(tok.encode(caption)) > longest:
        caption = caption[:max(1, len(caption) * 3 // 4)].rsplit(' ', 1)[0]
    return caption


def listing(folder, exts, what):
    if not os.path.isdir(folder):
        fail(f"{what} {folder!r} is not a folder")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(exts) and not n.startswith('.'))
    if not names:
        fail(f"{what} {folder} holds no {'/'.join(e.lstrip('.') for e in exts[:4])}... files")
    return names


def cut_all(captions, tok, longest, folder):
    """Every caption of {file: caption} cut to `longest` tokens, with one warning if any was longer."""
    long = [n for n, c in captions.items() if len(tok.encode(c)) > longest]
    if long:
        warn(f"{len(long)} captions in {folder} are longer than {longest} tokens (what block_size leaves beside "
             f"the pictures): cut to fit (the first: {long[0]})")
    return {n: cut(c, tok, longest) if n in long else c for n, c in captions.items()}


@lru_cache(maxsize=None)
def open_images(folder, res, cache_dir):
    """The ImageFolder of a folder, one per process (the RAE build and the dataset share it, so each bad
    file is named once)."""
    return ImageFolder(folder, res, cache_dir)


@lru_cache(maxsize=None)
def open_videos(folder, res, cache_dir, fps):
    return VideoFolder(folder, res, cache_dir, fps)


class ImageFolder:
    """A folder of captioned pictures: pictures(split) and pool(split, encoder, tok, longest)."""

    def __init__(self, folder, res, cache_dir):
        """Lists the files and reads the captions (fast: the pictures are read by the first pictures())."""
        self.folder, self.res, self.cache_dir = folder, res, cache_dir
        self.names = listing(folder, PICTURE_EXT, 'image_folder')
        caps = read_captions(folder, self.names)
        self.captions = {n: caps[n] for n in self.names if caps.get(n)}
        self.bad = [(n, 'no caption (captions.jsonl or a .txt beside it)') for n in self.names if not caps.get(n)]
        for name, why in self.bad:
            warn(f"skipping {os.path.join(folder, name)}: {why}")
        check_bad(folder, 'pictures', len(self.names), self.bad)
        self.cached, self.pools = {}, {}

    def pictures(self, split):
        """(uint8 [n, res, res, 3] memory-mapped, their captions) of a split's readable pictures."""
        if split not in self.cached:
            frames, kept, bad, key = split_cache(
                self.folder, self.captions, split, 'image_folder', 'picture', f"pictures-{split}-{self.res}",
                lambda n: read_picture(os.path.join(self.folder, n), self.res)[None], self.res, self.cache_dir)
            for name, why in bad:
                warn(f"skipping {os.path.join(self.folder, name)}: {why}")
            self.bad += bad
            check_bad(self.folder, 'pictures', len(self.names), self.bad)
            self.cached[split] = frames, [self.captions[k[0]] for k in kept], key
        return self.cached[split][:2]

    def pool(self, split, encoder, tok, longest):
        """(captions, latents [n, N, d]) of a split: what caption->image and image->caption documents draw;
        captions cut to `longest` tokens."""
        if split not in self.pools:
            frames, captions = self.pictures(split)
            latents = data.latent_cache(encoder, split, len(frames), self.cache_dir, pictures=frames,
                                        tag=self.cached[split][2])
            cut_captions = cut_all(dict(enumerate(captions)), tok, longest, self.folder)
            self.pools[split] = [cut_captions[i] for i in range(len(captions))], latents
        return self.pools[split]


class VideoFolder:
    """A folder of clips, optionally captioned or with actions: document(kind, rng, split, n_frames)."""

    def __init__(self, folder, res, cache_dir, fps):
        self.folder, self.res, self.cache_dir, self.fps = folder, res, cache_dir, fps
        self.names = listing(folder, VIDEO_EXT, 'video_folder')
        streams = [n for n in self.names if n.lower().endswith(video.STREAMS)]
        if streams and not video.stream_backend():
            fail(f"{os.path.join(folder, streams[0])} (and {len(streams) - 1} more) need a video backend: "
                 f"pip install av (or imageio-ffmpeg)")
        self.captions = read_captions(folder, self.names)
        self.actions, self.bad = {}, []
        for n in self.names:
            path = os.path.join(folder, os.path.splitext(n)[0] + '.actions')
            if os.path.isfile(path):
                self.actions[n] = [a.strip() for a in Path(path).read_text(encoding='utf-8').splitlines()
                                   if a.strip()]
        self.cached, self.pools = {}, {}

    def clips(self, split, n_frames):
        """(uint8 frames [n, res, res, 3], [(name, first, count)]) of a split's readable videos of at least
        n_frames sampled frames."""
        if split not in self.cached:
            frames, kept, bad, key = split_cache(
                self.folder, self.names, split, 'video_folder', 'video', f"frames-{split}-{self.res}-{self.fps:g}",
                lambda n: video.read_video(os.path.join(self.folder, n), self.res, self.fps or None), self.res,
                self.cache_dir)
            short = [(n, f"{c} frames at video_fps={self.fps:g}, fewer than video_frames={n_frames}")
                     for n, s, c in kept if c < n_frames]
            for name, why in bad + short:
                warn(f"skipping {os.path.join(self.folder, name)}: {why}")
            self.bad += bad + short
            check_bad(self.folder, 'videos', len(self.names), self.bad)
            self.cached[split] = frames, [k for k in kept if k[2] >= n_frames], key
        return self.cached[split][:2]

    def latents(self, split, n_frames, encoder):
        if split not in self.pools:
            frames, kept = self.clips(split, n_frames)
            self.pools[split] = data.latent_cache(encoder, f'{split}-frames', len(frames), self.cache_dir,
                                                  pictures=frames, tag=self.cached[split][2])
        return self.pools[split]

    def document(self, kind, rng, split, n_frames, encoder, tok, longest):
        """A clip of n_frames consecutive sampled frames from a random video, each its own visual block (the
        targets as documents.video_document draws them); 'video': after the video's caption if it has one;
        'action': with the video's action line between consecutive frames."""
        _, kept = self.clips(split, n_frames)
        z = self.latents(split, n_frames, encoder)
        if kind == 'action':
            kept = [k for k in kept if len(self.actions.get(k[0], [])) >= k[2] - 1]
            if not kept:
                fail(f"action documents need a video in {self.folder} ({split} split) with a .actions file of "
                     f"one line per step between sampled frames")
        name, first, count = kept[int(rng.integers(len(kept)))]
        start = int(rng.integers(count - n_frames + 1))
        target = list(rng.random(n_frames - 1) < 0.5) + [True]
        doc = [cut(self.captions[name], tok, longest)] if kind == 'video' and self.captions.get(name) else []
        for i in range(n_frames):
            if i and kind == 'action':
                doc.append(self.actions[name][start + i - 1])
            lat = np.array(z[first + start + i])   # float16, as batches carry it
            doc.append(documents.Visual(None, bool(target[i]), torch.from_numpy(lat)))
        return doc

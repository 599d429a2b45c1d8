"""
Write a folder of pictures or clips as WebDataset shards: the layout img2dataset writes and image_shards /
video_shards read (docs/data.md). Each sample is consecutive members of one tar: {key}.png (the file's own
bytes, never re-encoded) + {key}.txt (its caption) + {key}.json (key, file, caption) and, for a clip with
actions, {key}.actions.

    pip install scikit-learn; python prepare_digits.py         # the offline example: digits/ (1,797 pictures)
    python prepare_shards.py --folder=digits --per_shard=256   # -> digits-shards/00000.tar ... 00007.tar
    python train.py config/digits.py --image_folder= --image_shards='digits-shards/{00000..00007}.tar'

The folder is read as image_folder and video_folder read it (folders.py): pictures and clips, captions from
captions.jsonl or a .txt beside the file, actions from a .actions file beside a clip. A picture without a
caption is left out with a warning. Shards are written to a temp name and renamed, with fixed times and owners,
so the same folder gives the same bytes; shards of an earlier, longer conversion in `out` are removed.
"""

import io
import json
import os
import re
import sys
import tarfile
from pathlib import Path

from tqdm import tqdm

import folders
from configurator import configure, fail, knobs

# -----------------------------------------------------------------------------
folder = ''               # the folder to convert (image_folder's or video_folder's layout)
out = ''                  # where the shards go ('' = <folder>-shards)
per_shard = 1000          # samples per shard (img2dataset writes 10,000; a few hundred MB a shard suits streaming)
# -----------------------------------------------------------------------------
SHARD = re.compile(r'^\d{5}\.tar$')


def write_shard(path, samples):
    """samples: [(key, {ext: bytes})] -> one tar at path, members in order (key.ext), with fixed times and
    owners; written to a temp name and renamed."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with tarfile.open(tmp, 'w', format=tarfile.PAX_FORMAT) as tar:
        for key, members in samples:
            for ext, raw in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(raw), 0, 0o644
                tar.addfile(info, io.BytesIO(raw))
    os.replace(tmp, path)


def sample_keys(names):
    """{file name: key}: the stem with dots made underscores (a key ends at its first dot), made unique."""
    keys, used = {}, set()
    for name in names:
        key = base = os.path.splitext(name)[0].replace('.', '_')
        i = 1
        while key in used:
            key, i = f"{base}_{i}", i + 1
        used.add(key)
        keys[name] = key
    return keys


def samples(folder):
    """[(key, {ext: bytes})] of a folder's usable files, in name order, and the names left out."""
    names = folders.listing(folder, tuple(dict.fromkeys(folders.PICTURE_EXT + folders.VIDEO_EXT)), 'folder')
    captions = folders.read_captions(folder, names)
    out, left_out = [], []
    for name, key in sample_keys(names).items():
        actions = Path(folder, os.path.splitext(name)[0] + '.actions')
        is_clip = name.lower().endswith(folders.VIDEO_EXT) and not name.lower().endswith('.gif') or actions.is_file()
        if not captions.get(name) and not is_clip:
            left_out.append(name)
            continue
        ext = os.path.splitext(name)[1].lower().lstrip('.')
        members = {'jpg' if ext == 'jpeg' else ext: (Path(folder) / name).read_bytes()}
        if captions.get(name):
            members['txt'] = captions[name].encode('utf-8')
        if actions.is_file():
            members['actions'] = actions.read_bytes()
        members['json'] = json.dumps({'key': key, 'file': name, 'caption': captions.get(name, '')}).encode()
        out.append((key, members))
    return out, left_out


def main(argv):
    cfg = configure(knobs(globals()), argv, __doc__)
    if not cfg['folder']:
        fail("name the folder to convert: --folder=my_pictures")
    if cfg['per_shard'] < 1:
        fail(f"per_shard must be at least 1, got {cfg['per_shard']}")
    dest = cfg['out'] or cfg['folder'].rstrip('/') + '-shards'
    todo, left_out = samples(cfg['folder'])
    for name in left_out:
        folders.warn(f"leaving out {os.path.join(cfg['folder'], name)}: no caption (captions.jsonl or a .txt "
                     f"beside it)")
    if not todo:
        fail(f"{cfg['folder']} has no picture with a caption and no clip")
    os.makedirs(dest, exist_ok=True)
    n = -(-len(todo) // cfg['per_shard'])
    for i in tqdm(range(n), desc=f"writing {n} shards to {dest}"):
        write_shard(os.path.join(dest, f"{i:05d}.tar"), todo[i * cfg['per_shard']:(i + 1) * cfg['per_shard']])
    stale = sorted(f for f in os.listdir(dest) if SHARD.match(f) and int(f[:5]) >= n)
    for f in stale:
        os.remove(os.path.join(dest, f))
    print(f"wrote {len(todo)} samples in {n} shards to {dest}/{{00000..{n - 1:05d}}}.tar"
          f"{f' ({len(left_out)} left out)' if left_out else ''}"
          f"{f', removed {len(stale)} older shards' if stale else ''}")


if __name__ == '__main__':
    main(sys.argv[1:])

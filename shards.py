"""
Sharded datasets as streams: each reader reads its own share of a list of shards, shuffled, and can stop and
continue at the next sample (docs/data.md).

    paths = expand('cc3m/{00000..00331}.tar')      # a glob, {a..b} ranges, a comma list, a folder, http(s) URLs
    r = Reader(paths, rank=3, n_readers=8, seed=1337, buffer=512, name='image_shards')
    ref, sample = r.next()                           # sample: {'jpg': b'...', 'txt': b'...'} (a tar) or a str
    state = r.state()                                # a few ints and lists: torch.save / weights_only safe
    r2 = Reader(paths, 3, 8, 1337, 512, state=state) # continues with exactly the sample r would give next

Formats: tars in the WebDataset layout (what img2dataset writes: {key}.jpg + {key}.txt + {key}.json, members of
one sample next to each other; .tar.gz too), JSON lines with a `text` field (.jsonl, .jsonl.gz, .jsonl.zst with
the zstandard package), parquet with a `text` column (with pyarrow; local files). Everything but parquet is
read forward only, so a local file, a gzip stream and an HTTP body are read by the same code; a local plain file
or a server that answers Range requests is entered at an offset without reading what comes before.

The order is a pure function of (seed, epoch): every epoch permutes the shard list, reader r of n takes the
shards r, r + n, r + 2n, ... of the permutation, or, with fewer shards than readers, one shard and every m-th
sample of it. A shuffle buffer of `buffer` samples mixes the samples of the reader's shards; which sample leaves
it is a hash of (seed, reader, draw), so a reader's state is its place in the shards (epoch, shard, byte offset)
plus the buffer as references to re-read: nothing grows with the number of shards or samples.
"""

import glob
import gzip
import hashlib
import json
import os
import re
import sys
import tarfile
from importlib.util import find_spec

import numpy as np
import requests

TAR = ('.tar', '.tar.gz', '.tgz')
JSONL = ('.jsonl', '.jsonl.gz', '.jsonl.zst', '.json.gz', '.json.zst', '.jsonl.zstd')
PARQUET = ('.parquet',)
TIMEOUT_S = 60            # an http(s) shard must start answering within this many seconds
MIN_COUNTED = 32          # a reader judges its share of bad samples only after this many
MAX_NAMED = 1000          # bad samples named per process; past that they are only counted (memory stays flat)
_warned = set()           # (shard, key) pairs already named in a warning


class DataError(ValueError):
    """Data that cannot be used: one sentence for the user (train.py prints it and stops)."""


def warn_once(shard, key, why):
    """Name a bad sample on stderr, once per process, up to MAX_NAMED of them."""
    if (shard, key) in _warned or len(_warned) > MAX_NAMED:
        return
    _warned.add((shard, key))
    if len(_warned) > MAX_NAMED:
        print(f"warning: {MAX_NAMED} bad samples named in this process: the others are counted (bad_samples in "
              f"log.jsonl), not named", file=sys.stderr)
        return
    print(f"warning: skipping {shard}{f' sample {key}' if key else ''}: {why}", file=sys.stderr)


# -----------------------------------------------------------------------------
# listing


def braces(spec):
    """'a{00..02}b' -> ['a00b', 'a01b', 'a02b'] (zero padding kept, several ranges multiply; WebDataset's and
    img2dataset's way of naming a shard list)."""
    m = re.search(r'\{(\d+)\.\.(\d+)\}', spec)
    if not m:
        return [spec]
    lo, hi = m[1], m[2]
    width = len(lo) if lo.startswith('0') or len(lo) == len(hi) else 0
    return [s for i in range(int(lo), int(hi) + 1)
            for s in braces(spec[:m.start()] + str(i).zfill(width) + spec[m.end():])]


def is_url(path):
    return path.startswith(('http://', 'https://'))


def expand(spec, exts=TAR + JSONL + PARQUET):
    """A knob's value -> the list of shards it names, in its order (globs sorted, duplicates dropped): comma-
    separated entries, each a path, a glob, a folder (its files ending in one of exts) or an http(s) URL, with
    {a..b} ranges. Entries that match nothing are left out (check() names them)."""
    out = []
    for entry in (e.strip() for e in spec.split(',')):
        for item in braces(entry) if entry else []:
            if is_url(item):
                out.append(item)
            elif os.path.isdir(item):
                out += sorted(os.path.join(item, n) for n in os.listdir(item) if n.lower().endswith(exts))
            elif glob.has_magic(item):
                out += sorted(glob.glob(item))
            elif os.path.exists(item):
                out.append(item)
    return list(dict.fromkeys(out))


def kind_of(path):
    """'tar' | 'jsonl' | 'parquet' | None, from the name."""
    name = path.lower().split('?')[0]
    for kind, exts in (('tar', TAR), ('jsonl', JSONL), ('parquet', PARQUET)):
        if name.endswith(exts):
            return kind
    return None


def missing_reader(path):
    """None, or the sentence that says which package reading this shard needs."""
    name = path.lower().split('?')[0]
    if name.endswith(('.zst', '.zstd')) and not find_spec('zstandard'):
        return f"{path} is zstd-compressed: reading it needs the zstandard package (pip install zstandard)"
    if name.endswith(PARQUET) and not find_spec('pyarrow'):
        return f"{path} is parquet: reading it needs pyarrow (pip install pyarrow), or convert it to .jsonl.gz"
    if name.endswith(PARQUET) and is_url(path):
        return f"{path}: parquet shards must be local files (parquet is read by random access)"
    return None


# -----------------------------------------------------------------------------
# bytes: files, decompressors and HTTP bodies, read forward


class ByteStream:
    """A binary stream read forward with read(n), readline() and skip(n), counting `pos`, the offset in the
    (uncompressed) stream of the next byte handed out. skip() seeks where the file can (a local plain file) and
    otherwise reads and drops. `size`, where known, makes a skip past the end an error (a truncated file)."""

    CHUNK = 1 << 16

    def __init__(self, raw, pos=0, seekable=False, size=None, closers=()):
        self.raw, self.pos, self.seekable, self.size, self.closers = raw, pos, seekable, size, closers
        self.buf, self.at = b'', 0

    def _fill(self, n):
        """Make at least n bytes available in the buffer, unless the stream ends first."""
        parts, have = [self.buf[self.at:]], len(self.buf) - self.at
        while have < n:
            chunk = self.raw.read(max(self.CHUNK, n - have))
            if not chunk:
                break
            parts.append(chunk)
            have += len(chunk)
        self.buf, self.at = b''.join(parts), 0

    def read(self, n):
        if len(self.buf) - self.at < n:
            self._fill(n)
        out = self.buf[self.at:self.at + n]
        self.at += len(out)
        self.pos += len(out)
        return out

    def readline(self):
        while True:
            i = self.buf.find(b'\n', self.at)
            if i >= 0:
                return self.read(i + 1 - self.at)
            have = len(self.buf) - self.at
            self._fill(have + self.CHUNK)
            if len(self.buf) - self.at == have:
                return self.read(have)

    def skip(self, n):
        if self.seekable and n > len(self.buf) - self.at:
            self.pos += n
            self.buf, self.at = b'', 0
            self.raw.seek(self.pos)
        else:
            while n > 0:
                got = len(self.read(min(n, self.CHUNK)))
                if not got:
                    raise DataError(f"ends at byte {self.pos}, inside a member: truncated")
                n -= got
        if self.size is not None and self.pos > self.size:
            raise DataError(f"ends at byte {self.size}, inside a member: truncated")

    def close(self):
        for c in (*self.closers, self.raw):
            c.close()


def decompressor(raw, path):
    name = path.lower().split('?')[0]
    if name.endswith(('.gz', '.tgz')):
        return gzip.GzipFile(fileobj=raw, mode='rb')
    if name.endswith(('.zst', '.zstd')):
        import zstandard  # optional (missing_reader names it)
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return None


def open_stream(path, offset=0):
    """A ByteStream of a shard's (uncompressed) bytes from `offset` on: a local file is seeked, a URL asked
    for a Range (a server that ignores it is read from the start and skipped), a compressed stream is
    decompressed from its start and skipped forward."""
    compressed = path.lower().split('?')[0].endswith(('.gz', '.tgz', '.zst', '.zstd'))
    if is_url(path):
        ranged = offset and not compressed
        r = requests.get(path, stream=True, timeout=TIMEOUT_S, headers={'Range': f'bytes={offset}-'} if ranged else {})
        r.raise_for_status()
        r.raw.decode_content = False   # the shard's bytes as stored
        start = offset if ranged and r.status_code == 206 else 0
        length = r.headers.get('Content-Length')
        size = start + int(length) if length and length.isdigit() and not compressed else None
        raw, closers = r.raw, (r,)
    else:
        raw, start, closers = open(path, 'rb'), 0, ()
        size = None if compressed else os.path.getsize(path)
        if offset and not compressed:
            raw.seek(offset)
            start = offset
    inner = decompressor(raw, path)
    if inner is not None:
        stream = ByteStream(inner, closers=(*closers, raw))
    else:
        stream = ByteStream(raw, start, seekable=not is_url(path), size=size, closers=closers)
    if stream.pos < offset:
        stream.skip(offset - stream.pos)
    return stream


# -----------------------------------------------------------------------------
# records: samples of a tar, lines of a JSONL file, rows of a parquet file


class Bad(str):
    """A record that is there but unusable (a line that is not JSON, no text field): the reason why."""


def split_name(name):
    """A tar member's name -> (sample key, extension), the WebDataset rule: the key is the path up to the first
    dot of the file name, the extension the rest, lower-cased ('a/b.c.jpg' -> ('a/b', 'c.jpg'))."""
    folder, _, base = name.rpartition('/')
    stem, dot, ext = base.partition('.')
    return (folder + '/' if folder else '') + stem, ext.lower() if dot else ''


def pax_path(data):
    """The path of a pax extended header's records ('%d path=...\\n' lines), or None."""
    for rec in data.decode('utf-8', 'surrogateescape').split('\n'):
        _, _, kv = rec.partition(' ')
        k, eq, v = kv.partition('=')
        if eq and k == 'path':
            return v
    return None


def tar_samples(f, index, want):
    """(offset, index, key, {ext: bytes} or None) for each sample of a tar stream positioned at a header: a
    sample is a run of consecutive members with the same key, its offset that of its first header; the members'
    data are read only when want(index, key) (else skipped: a local file is seeked past them). A stream that
    ends inside a header or a member, or without the end-of-archive block, raises DataError after the samples
    read before."""
    key = members = long_name = None
    start = at = f.pos
    while True:
        header_at = f.pos
        block = f.read(512)
        if len(block) < 512 or block == bytes(512):
            if key is not None:
                yield start, index, key, members
            if len(block) < 512:
                raise DataError(f"ends at byte {f.pos} without the end-of-archive block: truncated")
            return
        try:
            info = tarfile.TarInfo.frombuf(block, 'utf-8', 'surrogateescape')
        except tarfile.HeaderError as e:
            raise DataError(f"has a bad tar header at byte {header_at} ({e})") from None
        padded = -(-info.size // 512) * 512
        if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE, tarfile.XGLTYPE):
            data = f.read(info.size)
            f.skip(padded - len(data))
            if len(data) < info.size:
                raise DataError(f"ends at byte {f.pos}, inside a member: truncated")
            if long_name is None:
                at = header_at
            if info.type == tarfile.GNUTYPE_LONGNAME:
                long_name = data.rstrip(b'\0').decode('utf-8', 'surrogateescape')
            elif info.type == tarfile.XHDTYPE:
                long_name = pax_path(data) or long_name
            continue
        name = long_name or info.name
        first_header = at if long_name is not None else header_at
        long_name = None
        if not info.isreg() or name.rsplit('/', 1)[-1].startswith('._'):   # folders, links, macOS resource forks
            f.skip(padded)
            continue
        k, ext = split_name(name)
        if k != key:
            if key is not None:
                yield start, index, key, members
                index += 1
            key, start = k, first_header
            members = {'__key__': k} if want(index, k) else None
        if members is None:
            f.skip(padded)
            continue
        data = f.read(info.size)
        if len(data) < info.size:
            raise DataError(f"ends at byte {f.pos}, inside {name}: truncated")
        members[ext] = data
        f.skip(padded - info.size)


def jsonl_records(f, index, want):
    """(offset, index, key, text or Bad) for each non-blank line of a JSON-lines stream; the key is the text
    itself (its hash decides the held-out split: the same text is held out wherever it appears)."""
    while True:
        at = f.pos
        line = f.readline()
        if not line:
            return
        if not line.strip():
            continue
        try:
            text = json.loads(line)['text']
            if not isinstance(text, str) or not text.strip():
                raise TypeError
            key = text
        except (ValueError, KeyError, TypeError, IndexError):
            text = key = Bad(f"line {index + 1} at byte {at} is not a JSON object with a non-empty text field")
        yield at, index, key, (text if want(index, key) else None)
        index += 1


def parquet_records(path, offset, want):
    """(row, row, key, text or Bad) for each row of a parquet file's `text` column from row `offset` on, one
    row group in memory at a time."""
    import pyarrow.parquet as pq  # optional (missing_reader names it)
    pf = pq.ParquetFile(path)
    if 'text' not in pf.schema_arrow.names:
        raise DataError(f"has no text column (columns: {', '.join(pf.schema_arrow.names[:8])})")
    row = 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if row + n > offset:
            for i, text in enumerate(pf.read_row_group(g, columns=['text']).column('text').to_pylist()):
                if row + i >= offset:
                    ok = isinstance(text, str) and text.strip()
                    key = text if ok else Bad(f"row {row + i} has no text")
                    yield row + i, row + i, key, (key if want(row + i, key) else None)
        row += n


def records(path, offset=0, index=0, want=lambda i, k: True):
    """The records of a shard from `offset` (a record's start, as yielded; index: its number in the shard):
    (offset, index, key, item), item None where want(index, key) is false. Raises on an unreadable or truncated
    shard, after the records read before."""
    kind = kind_of(path)
    if kind == 'parquet':
        yield from parquet_records(path, offset, want)
        return
    f = open_stream(path, offset)
    try:
        yield from (tar_samples if kind == 'tar' else jsonl_records)(f, index, want)
    finally:
        f.close()


def read_at(path, refs):
    """{(offset, index): item} of the records of one shard at the given (offset, index) pairs, in one forward
    pass from the first (the others' data skipped, seeked past where the file allows)."""
    refs = sorted(set(refs))
    wanted, indices, out = set(refs), {i for _, i in refs}, {}
    gen = records(path, refs[0][0], refs[0][1], lambda i, k: i in indices)
    try:
        for at, i, key, item in gen:
            if (at, i) in wanted:
                out[(at, i)] = item
            if len(out) == len(refs):
                return out
    finally:
        gen.close()
    raise DataError(f"cannot read {path} again at the offsets a checkpoint recorded: has it changed since?")


def held_out(key, share):
    """Is a sample held out? The first 4 bytes of the sha1 of its key, as a fraction, below share: the same
    sample is on the same side whatever the shards, readers or seed."""
    raw = key.encode('utf-8', 'surrogateescape')
    return share > 0 and int.from_bytes(hashlib.sha1(raw).digest()[:4], 'big') / 2 ** 32 < share


def draw(seed, reader, n):
    """The n-th random draw of a reader: a hash, so the buffer needs no generator state to resume."""
    return int.from_bytes(hashlib.blake2b(f'{seed},{reader},{n}'.encode(), digest_size=8).digest(), 'big')


# -----------------------------------------------------------------------------
# a reader: one disjoint, shuffled, resumable stream


class Reader:
    """Reader `rank` of `n_readers` over a shard list: next() -> (ref, item), endlessly, epoch after epoch.
    keep(key): which samples belong to this split (the held-out hash); expand(item) -> the pieces one record
    becomes (a long text: several rows' worth; a clip without actions for action documents: none).
    shuffle=False reads the shards in list order (the held-out stream). A ref (epoch, shard slot, offset,
    record, piece) names an item so that it can be read again: the state holds the buffer as refs."""

    def __init__(self, shards, rank, n_readers, seed, buffer, name='shards', keep=None, expand=None,
                 shuffle=True, max_bad=0.2, state=None):
        self.shards, self.rank, self.n, self.seed, self.size = shards, rank, n_readers, seed, max(1, buffer)
        self.name, self.keep, self.expand = name, keep or (lambda key: True), expand or (lambda item: [item])
        self.shuffle, self.max_bad = shuffle, max_bad
        self.shares = {}
        state = state or {}
        self.pos = tuple(state.get('pos', (0, 0, 0, 0, 0)))   # where the shard reading continues
        self.drawn, self.ok, self.bad = state.get('drawn', 0), state.get('ok', 0), state.get('bad', 0)
        self.read, self.lost = state.get('read', 0), state.get('lost', 0)   # items read; bad records and shards
        self.buffer = self.fetch(state.get('buffer', []))
        self.pushback = self.fetch(state.get('pushback', []))
        self.items = self.stream()

    def share(self, epoch):
        """[(shard, stride, phase)] read in an epoch: whole shards, or one shard's samples i with
        i % stride == phase when there are fewer shards than readers."""
        if epoch not in self.shares:
            n_s = len(self.shards)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n_s) if self.shuffle else np.arange(n_s)
            if n_s >= self.n:
                share = [(int(s), 1, 0) for s in perm[self.rank::self.n]]
            else:
                s = self.rank % n_s
                share = [(int(perm[s]), len(range(s, self.n, n_s)), self.rank // n_s)]
            self.shares = {k: v for k, v in self.shares.items() if k >= epoch - 2}   # a few epochs, not all
            self.shares[epoch] = share
        return self.shares[epoch]

    def path(self, epoch, slot):
        return self.shards[self.share(epoch)[slot][0]]

    def stream(self):
        """(ref, item) from self.pos on, across epochs; self.pos is set before each item leaves, so a state
        taken after it names the next one. A shard that cannot be read (or ends early) counts as one bad sample
        and the reader goes on with the next."""
        dry, got = 0, True   # got: this epoch gave an item (assumed of an epoch the state began inside)
        while True:
            epoch, slot, offset, index, skip = self.pos
            share = self.share(epoch)
            if slot >= len(share):
                dry, got = (0 if got else dry + 1), False
                if dry >= 2 + len(self.shards) // max(1, len(share)):    # every shard had its turn, and more
                    raise DataError(f"{self.name}: reader {self.rank} of {self.n} found nothing to read in {dry} "
                                    f"epochs in a row ({len(share)} shards an epoch): fewer samples than readers "
                                    f"(processes x grad_accum x data_workers), or none of this kind or split")
                self.pos = (epoch + 1, 0, 0, 0, 0)
                continue
            shard, stride, phase = share[slot]
            path = self.shards[shard]
            try:
                for at, i, key, item in records(path, offset, index,
                                                lambda i, k: i % stride == phase and self.keep(k)):
                    if item is None:
                        continue
                    resumed = at == offset and skip > 0      # the record the state stopped in
                    if isinstance(item, Bad):
                        self.pos = (epoch, slot, at, i, 1)
                        if not resumed:
                            self.count_bad(path, '', item)
                        continue
                    pieces = self.expand(item)
                    for k in range(skip if resumed else 0, len(pieces)):
                        self.pos = (epoch, slot, at, i, k + 1)
                        got = True
                        self.read += 1
                        yield (epoch, slot, at, i, k), pieces[k]
            except Exception as e:   # a truncated or unreadable shard: tarfile, gzip, zstd, requests raise many types
                self.count_bad(path, '', f"{type(e).__name__}: {str(e)[:160]}")
            self.pos = (epoch, slot + 1, 0, 0, 0)

    def fetch(self, refs):
        """[(ref, item)] of refs, read again (grouped by shard, one pass each)."""
        refs = [tuple(r) for r in refs]
        by_path = {}
        for r in refs:
            by_path.setdefault(self.path(r[0], r[1]), []).append((r[2], r[3]))
        got = {p: read_at(p, pairs) for p, pairs in by_path.items()}
        return [(r, self.expand(got[self.path(r[0], r[1])][(r[2], r[3])])[r[4]]) for r in refs]

    def next(self):
        """The next (ref, item): a put-back one first, else a random one of the buffer (refilled first)."""
        if self.pushback:
            return self.pushback.pop()
        while len(self.buffer) < self.size:
            self.buffer.append(next(self.items))
        j = draw(self.seed, self.rank, self.drawn) % len(self.buffer) if self.shuffle else 0
        self.drawn += 1
        self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
        return self.buffer.pop()

    def put_back(self, ref, item):
        """An item taken but not used (its document did not fit the rows): next() gives it again first."""
        self.pushback.append((ref, item))

    def count_bad(self, shard, key, why, read=False):
        """Count and name a bad sample (read=True: an item this reader read, whose document failed) or a bad
        record or shard; past max_bad of what this reader read, stop."""
        self.bad += 1
        self.lost += not read
        warn_once(shard, key, why)
        seen = self.read + self.lost
        if seen >= MIN_COUNTED and self.bad > self.max_bad * seen:
            raise DataError(f"{self.bad} of the {seen} samples that reader {self.rank} of {self.name} read are bad "
                            f"(more than shard_max_bad={self.max_bad:g}); the last: {shard}"
                            f"{f' sample {key}' if key else ''}: {why}")

    def state(self):
        """Where the reader stands, as plain ints and lists (checkpoints load it with weights_only=True)."""
        return {'pos': list(self.pos), 'buffer': [list(r) for r, _ in self.buffer],
                'pushback': [list(r) for r, _ in self.pushback], 'drawn': self.drawn, 'ok': self.ok, 'bad': self.bad,
                'read': self.read, 'lost': self.lost}

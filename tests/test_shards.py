"""Sharded data (shards.py, shard_data.py, prepare_shards.py): tiny shards built here (a few tars, a corrupt
member, a picture without a caption, a truncated tar, an unreadable one, a text shard) are streamed across
readers disjointly, every sample once an epoch; readers resume to the sample; memory stays flat as the shards
grow; bad samples are counted, named and stop the run past a share; the held-out split follows the key; the
converter writes what the folders read; train.py trains on shards and resumes bit-identically."""

import gzip
import io
import json
import os
import subprocess
import sys
import tracemalloc
from contextlib import nullcontext

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

import data
import documents
import folders
import parallel
import pipeline
import prepare_shards
import rae
import shard_data
import shards
import tokenizer
import train
import video
import world
from conftest import ROOT, run_script, run_train, tiny_config
from loader import Loader
from model import Transfusion
from optim import configure_optimizer
from test_folders import picture_folder
from test_reliability import serve

RES = 16


def png(img, mode):
    """A world picture as PNG bytes in one of four modes: RGB, grayscale, palette, 16-bit grayscale."""
    buf = io.BytesIO()
    if mode == 1:
        Image.fromarray(img[..., 0]).save(buf, 'PNG')
    elif mode == 2:
        Image.fromarray(img).quantize(64).save(buf, 'PNG')
    elif mode == 3:
        iio.imwrite(buf, img[..., 1].astype(np.uint16) * 257, extension='.png')
    else:
        Image.fromarray(img).save(buf, 'PNG')
    return buf.getvalue()


def image_shards(folder, n_shards=4, per_shard=6, broken=True, seed=0):
    """n_shards tars of captioned world pictures (captions in .txt, or only in .json as img2dataset also
    writes them); with broken, one corrupt picture member, one picture without a caption, a truncated tar
    and a tar that is not one. -> the glob naming them."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    for s in range(n_shards + int(broken)):
        samples = []
        for i in range(per_shard):
            scene = world.sample_scene(rng, 1)
            caption = world.caption(scene, rng)
            members = {'png': png(world.render(scene, RES, rng=rng), i % 4)}
            members.update({'json': json.dumps({'caption': caption}).encode()} if i % 3 == 1 else
                           {'txt': caption.encode()})
            samples.append((f"{s:03d}{i:04d}", members))
        if broken and s == 0:
            samples[2][1]['png'] = b'\x89PNG\r\n\x1a\n not really a picture'
        if broken and s == 1:
            samples[3][1].pop('txt')
        path = folder / f"{s:05d}.tar"
        prepare_shards.write_shard(path, samples)
        if broken and s == n_shards:      # the last one is cut inside its fourth sample's first member
            fourth = [at for at, *_ in shards.records(str(path))][3]
            path.write_bytes(path.read_bytes()[:fourth + 700])
    if broken:
        (folder / 'zz_not_a.tar').write_bytes(b'this is not a tar file\n' * 40)
    return str(folder / '*.tar')


def readable_keys(spec):
    """Every key the tars of a spec yield, each shard read until it ends or breaks."""
    keys = []
    for p in shards.expand(spec):
        try:
            for _, _, k, _ in shards.records(p):
                keys.append(k)
        except shards.DataError:
            pass
    return keys


def text_shard(path, n=40, seed=0):
    """JSON lines of world text (gzip), one line far longer than a row, one line that is not JSON."""
    rng = np.random.default_rng(seed)
    lines = [json.dumps({'text': world.text_document(rng), 'id': i}) for i in range(n)]
    lines[5] = json.dumps({'text': ' '.join(world.text_document(rng) for _ in range(40))})
    lines[9] = '{"text": unquoted'
    with gzip.open(path, 'wt') as f:
        f.write('\n'.join(lines) + '\n')
    return str(path)


def knobs(**kw):
    """A run's config with the smoke shapes at RES pixels and the shard knobs given."""
    cfg = {**pipeline.run_knobs(), 'encoder': 'pixel', 'image_size': RES, 'patch_size': 8, 'block_size': 64,
           'batch_size': 3, 'mixture': 'caption2image=0.5,text=0.5', 'shard_buffer': 4, 'shard_val_share': 0.2}
    cfg.update(kw)
    return cfg


ENCODERS = {}


def dataset(cfg, seed=7):
    """The run's dataset, as train.py makes it (each pixel encoder fitted once per test session)."""
    key = (cfg['image_size'], cfg['patch_size'], cfg['image_shards'])
    if key not in ENCODERS:
        ENCODERS[key] = rae.build_encoder(cfg)
    return pipeline.make_dataset(cfg, tokenizer.get_tokenizer(cfg['tokenizer']), ENCODERS[key], None, seed)


def same_batch(a, b):
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)


# -----------------------------------------------------------------------------
# streams: disjoint, complete, resumable, flat


@pytest.mark.parametrize('n_readers', [1, 3, 5, 8])
def test_every_sample_is_read_once_an_epoch_by_exactly_one_reader(tmp_path, n_readers):
    spec = image_shards(tmp_path / 'shards')     # 6 tars: 5 read (one of them only in part), 1 unreadable
    paths = shards.expand(spec)
    seen = {}
    for r in range(n_readers):   # 8 readers > 6 shards: readers share a shard, each every m-th sample of it
        reader = shards.Reader(paths, r, n_readers, seed=3, buffer=4, name='image_shards', max_bad=1.0)
        items = [reader.next() for _ in range(90 // n_readers + 30)]    # ~3 epochs of reading
        for ref, item in items:
            seen.setdefault(ref[0], []).append((r, item['__key__']))
    want = sorted(readable_keys(spec))
    for epoch in (0, 1):
        keys = [k for _, k in seen[epoch]]
        assert sorted(keys) == want, f"epoch {epoch}: every readable sample once"
    readers_of = {}
    for r, k in seen[0]:
        readers_of.setdefault(k, set()).add(r)
    assert all(len(rs) == 1 for rs in readers_of.values())
    orders = [[k for _, k in seen[e]] for e in (0, 1)]
    assert orders[0] != orders[1]    # each epoch permutes the shards (and the buffer mixes their samples)


def test_a_reader_resumes_from_its_state_with_exactly_the_next_sample(tmp_path):
    spec = image_shards(tmp_path / 'shards')
    paths = shards.expand(spec)
    text = [text_shard(tmp_path / 'a.jsonl.gz'), text_shard(tmp_path / 'b.jsonl.gz', seed=1)]
    for paths, expand in ((paths, None), (text, lambda t: data_pieces(t))):
        a = shards.Reader(paths, 1, 2, seed=5, buffer=5, expand=expand, max_bad=1.0)
        for stop in (3, 11, 17):   # mid-shard, in the buffer's churn, across an epoch's end
            while a.drawn < stop:
                a.next()
            state = a.state()
            b = shards.Reader(paths, 1, 2, seed=5, buffer=5, expand=expand, max_bad=1.0, state=state)
            ahead = [a.next() for _ in range(25)]
            assert [x[0] for x in ahead] == [x[0] for x in (b.next() for _ in range(25))]
            assert json.loads(json.dumps(state)) == state    # plain ints and lists


def data_pieces(text):
    return shard_data.split_text(text, tokenizer.get_tokenizer('byte'), 30)


def test_batches_resume_mid_epoch_exactly_and_workers_build_the_same_batches(tmp_path):
    cfg = knobs(image_shards=image_shards(tmp_path / 'shards'), text_shards=text_shard(tmp_path / 't.jsonl.gz'),
                shard_max_bad=0.5)
    ds = dataset(cfg)
    loader = Loader(ds, 0, grad_accum=2, world=1, workers=0)
    batches = [next(loader)[2] for _ in range(16)]     # positions 0-7, two micro-batches each
    assert len(batches[0].pending) and batches[0].pixels.dtype == torch.uint8   # pictures travel as pixels
    states = {}
    for b in batches[:10]:      # what train.py keeps: the last state of each reader it trained on
        states.update(b.streams)
    resumed = Loader(dataset(cfg), 5, grad_accum=2, world=1, workers=0, streams=states)
    for want in batches[10:]:
        assert same_batch(want, next(resumed)[2])
    ahead = Loader(dataset(cfg), 0, grad_accum=2, world=1, workers=2)   # background processes, as on a GPU
    two = [next(ahead)[2] for _ in range(6)]
    direct = Loader(dataset(cfg), 0, grad_accum=2, world=1, workers=2)
    assert all(same_batch(a, b) for a, b in zip(two, [next(direct)[2] for _ in range(6)]))
    assert all(b.streams for b in two)


def test_memory_stays_flat_over_ten_times_as_many_shards(tmp_path):
    def peak(n_shards):
        spec = image_shards(tmp_path / f'm{n_shards}', n_shards=n_shards, per_shard=4, broken=False)
        reader = shards.Reader(shards.expand(spec), 0, 1, seed=0, buffer=8)
        tracemalloc.start()
        for _ in range(n_shards * 4 + 8):     # an epoch and more
            reader.next()
        state = reader.state()
        size = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return size, state
    (small, s1), (large, s10) = peak(3), peak(30)
    assert large < 1.5 * small + 20_000, (small, large)
    assert len(s10['buffer']) == len(s1['buffer']) == 7     # the state does not grow either


# -----------------------------------------------------------------------------
# training on shards


def test_a_few_training_steps_on_image_text_and_text_shards(tmp_path):
    cfg = knobs(image_shards=image_shards(tmp_path / 'shards', broken=False),
                text_shards=text_shard(tmp_path / 't.jsonl.gz'), shard_max_bad=0.5)
    ds = dataset(cfg)
    tok = ds.tok
    torch.manual_seed(0)
    model = Transfusion(tiny_config(vocab_size=tok.vocab_size, d_latent=ds.encoder.d_latent,
                                    n_latent=ds.encoder.n_tokens))
    opt = configure_optimizer(model, 'adamw', 1e-3, 0.02, 0.1, (0.9, 0.95), 'cpu')
    run = parallel.Setup({'grad_accum': 1, 'seed': 0, 'grad_clip': 1.0}, torch.device('cpu'), nullcontext(),
                         encoder=ds.encoder)
    batches = Loader(ds, 0)
    losses = torch.stack([train.train_step(model, opt, batches, i, run)[0] for i in range(3)])
    assert torch.isfinite(losses).all() and (losses[:, 0] > 0).all() and (losses[:, 1] > 0).any()  # text, flow
    assert set(run.streams) == {'image:0', 'text:0'} and run.streams['image:0']['ok'] > 0
    held = pipeline.held_out_losses(model, ds, 2)
    assert held['val_text_ppl'] > 1 and held['val_flow_loss'] > 0
    assert pipeline.held_out_losses(model, ds, 2) == held      # the held-out streams restart each time


# -----------------------------------------------------------------------------
# bad samples, held-out split, formats, sources


def test_bad_samples_are_skipped_counted_and_named_and_too_many_stop_with_one_sentence(tmp_path, capsys):
    cfg = knobs(image_shards=image_shards(tmp_path / 'shards'), mixture='caption2image=1', shard_buffer=1)
    sd = dataset(cfg).shards
    sd.begin('train', 0, 0, '', None)
    docs = [sd.document('caption2image', 'train') for _ in range(24)]
    assert all(isinstance(d[-1], documents.Visual) and d[-1].image.shape == (RES, RES, 3) for d in docs)
    state = sd.take_states()['image:0']
    err = capsys.readouterr().err
    assert state['bad'] == 4 and state['ok'] == 24         # corrupt, no caption, truncated, not a tar
    for words in ('0000002', 'UnidentifiedImageError', '0010003', 'no caption', '00004.tar', 'truncated',
                  'zz_not_a.tar', 'bad tar header'):
        assert words in err
    worse = knobs(image_shards=image_shards(tmp_path / 'shards'), mixture='caption2image=1', shard_max_bad=0.05,
                  shard_buffer=1)
    sd = dataset(worse).shards
    sd.begin('train', 0, 0, '', None)
    with pytest.raises(shards.DataError, match=r'of the \d+ samples that reader 0 of image_shards read are bad'):
        for _ in range(60):
            sd.document('caption2image', 'train')


def test_the_held_out_split_follows_the_key_or_names_shards(tmp_path):
    spec = image_shards(tmp_path / 'shards', broken=False)
    cfg = knobs(image_shards=spec, mixture='caption2image=1', shard_val_share=0.25)
    sd = dataset(cfg).shards
    train, val = (sd.make_reader('image', split, 0, 1, None) for split in ('train', 'val'))
    train_keys = {train.next()[1]['__key__'] for _ in range(24)}
    val_keys = {val.next()[1]['__key__'] for _ in range(24)}
    assert train_keys and val_keys and not train_keys & val_keys
    assert len(train_keys | val_keys) == 24 and val_keys == {k for k in train_keys | val_keys
                                                             if shards.held_out(k, 0.25)}
    named = knobs(image_shards=spec, val_shards=str(tmp_path / 'shards' / '00003.tar'), mixture='caption2image=1')
    lists = shard_data.shard_lists(named)['image']
    assert len(lists[0]) == 3 and lists[1] == [str(tmp_path / 'shards' / '00003.tar')]
    ds = dataset(named)
    a, b = ds.get('val', 1), ds.get('val', 1)        # out of order: replayed from the start, the same batch
    assert same_batch(a, b) and not same_batch(a, ds.get('val', 0))


def test_text_shards_are_cut_into_rows_and_compressed_or_columnar_ones_read(tmp_path, monkeypatch):
    tok = tokenizer.get_tokenizer('world')
    path = text_shard(tmp_path / 't.jsonl.gz')
    texts = [t for _, _, _, t in shards.records(path)]
    assert isinstance(texts[9], shards.Bad) and 'line 10' in texts[9]
    pieces = shard_data.split_text(texts[5], tok, 62)
    assert len(pieces) > 3 and all(len(tok.encode(p)) <= 62 for p in pieces)
    assert ' '.join(pieces).split() == texts[5].split()      # nothing lost, cut at spaces
    monkeypatch.setattr(shards, 'find_spec', lambda name: None)
    assert 'pip install zstandard' in shards.missing_reader('x/part-0.jsonl.zst')
    assert 'pip install pyarrow' in shards.missing_reader('x/part-0.parquet')
    monkeypatch.undo()
    if shards.find_spec('zstandard'):
        import zstandard
        raw = gzip.decompress(open(path, 'rb').read())
        (tmp_path / 't.jsonl.zst').write_bytes(zstandard.ZstdCompressor().compress(raw))
        assert [t for *_, t in shards.records(str(tmp_path / 't.jsonl.zst'))] == texts
    if shards.find_spec('pyarrow'):
        import pyarrow
        import pyarrow.parquet as pq
        good = [t for t in texts if not isinstance(t, shards.Bad)]
        pq.write_table(pyarrow.table({'text': good}), tmp_path / 't.parquet', row_group_size=7)
        assert [t for *_, t in shards.records(str(tmp_path / 't.parquet'), 10, 10)] == good[10:]


def test_video_shards_give_video_and_action_documents_of_their_clips(tmp_path):
    """GIF clips in a tar: a walk with one action line per step, moving objects with a caption, one clip too
    short; action documents read only the clips with actions, video documents every clip."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(3):
        frames, steps, _ = video.sample_trajectory(rng, video.map_ids('train')[0], 6)
        video.write_gif(tmp_path / 'w.gif', frames, fps=4)
        samples.append((f"walk{i}", {'gif': (tmp_path / 'w.gif').read_bytes(),
                                     'actions': ''.join(video.format_action(*s) + '\n' for s in steps).encode()}))
    frames, text = video.sample_video(rng, 6)
    video.write_gif(tmp_path / 'm.gif', frames, fps=4)
    samples.append(('movers', {'gif': (tmp_path / 'm.gif').read_bytes(), 'txt': text.encode()}))
    video.write_gif(tmp_path / 's.gif', frames[:2], fps=4)
    samples.append(('short', {'gif': (tmp_path / 's.gif').read_bytes(), 'txt': b'too short'}))
    prepare_shards.write_shard(tmp_path / 'clips.tar', samples)
    cfg = knobs(video_shards=str(tmp_path / 'clips.tar'), mixture='video=0.5,action=0.5', video_frames=4,
                block_size=128, shard_val_share=0.0, shard_buffer=2, shard_max_bad=1.0)
    pipeline.check(cfg)
    sd = dataset(cfg).shards
    sd.begin('train', 0, 0, '', None)
    actions = [sd.document('action', 'train') for _ in range(6)]
    for doc in actions:
        assert [type(s) for s in doc] == [documents.Visual, str] * 3 + [documents.Visual] and doc[1].startswith('action: dx=')
        assert doc[-1].target and doc[0].image.shape == (RES, RES, 3) and doc[0].latents is None
    clips = [sd.document('video', 'train') for _ in range(8)]
    assert any(isinstance(d[0], str) and d[0] == text for d in clips)      # the movers' caption, then frames
    assert sum(isinstance(s, documents.Visual) for s in clips[0]) == 4
    assert sd.take_states()['video:0']['bad'] >= 1                         # the short clip, named once


def test_shards_stream_from_http_as_from_disk(tmp_path):
    spec = image_shards(tmp_path / 'www', broken=False)
    server = serve(tmp_path / 'www')
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{{00000..00003}}.tar"
        local, remote = (shards.Reader(shards.expand(s), 0, 2, seed=1, buffer=3) for s in (spec, url))
        assert [local.next() for _ in range(15)] == [remote.next() for _ in range(15)]
        again = shards.Reader(shards.expand(url), 0, 2, seed=1, buffer=3, state=local.state())
        assert [local.next() for _ in range(5)] == [again.next() for _ in range(5)]
    finally:
        server.shutdown()
        server.server_close()


def test_the_encoder_is_fitted_on_the_shards_own_training_pictures(tmp_path):
    cfg = knobs(image_shards=image_shards(tmp_path / 'shards'), shard_val_share=0.2)
    pictures = shard_data.first_pictures(cfg, 100, RES)
    usable = [k for k in readable_keys(cfg['image_shards']) if not shards.held_out(k, 0.2) and k != '0000002']
    assert len(pictures) == len(usable) == 20      # every training picture that decodes, once
    fitted = rae.build_encoder(cfg).state_dict()
    want = rae.PixelEncoder(RES, 8).fit(data.image_tensor(pictures)).state_dict()
    assert all(torch.equal(fitted[k], want[k]) for k in want)
    assert rae.rae_key({**cfg, 'encoder': 'vit'}) != rae.rae_key({**cfg, 'encoder': 'vit', 'image_shards': ''})


def test_mistakes_are_refused_in_one_sentence_before_any_long_work(tmp_path):
    spec = image_shards(tmp_path / 'shards', broken=False)
    (tmp_path / 'clips').mkdir()
    prepare_shards.write_shard(tmp_path / 'clips' / 'c.tar', [('k', {'mp3': b'x', 'txt': b'a song'})])
    for kw, words in ((dict(image_shards=spec, mixture='qa=1'), "question documents need the world's scenes"),
                      (dict(image_shards=str(tmp_path / 'none*.tar')), 'names no shard'),
                      (dict(text_shards=spec), 'is not a .jsonl'),
                      (dict(image_shards=str(tmp_path / 'clips' / 'c.tar')), 'has no picture member'),
                      (dict(image_shards=spec, image_folder=str(tmp_path)), 'not both'),
                      (dict(image_shards=spec, val_shards=spec), 'leaves image_shards no training shard'),
                      (dict(image_shards=spec, block_size=8), 'cannot hold a picture')):
        with pytest.raises(SystemExit, match=words):
            pipeline.check(knobs(**kw))
    now = {'groups': 2, 'slots': 2, 'lists': {'image': '4:abc'}}
    with pytest.raises(SystemExit, match=r'processes x grad_accum = 2 and max\(1, data_workers\) = 2, this run '
                                         r'has 2 and 1'):
        shard_data.check_layout(now, {**now, 'slots': 1}, 'ck.pt')
    with pytest.raises(SystemExit, match='image_shards lists other shards'):
        shard_data.check_layout(now, {**now, 'lists': {'image': '5:abd'}}, 'ck.pt')


def test_the_converter_writes_a_folder_as_shards_that_read_as_the_folder_does(tmp_path, capsys):
    folder = picture_folder(tmp_path / 'pics')
    (folder / 'lonely.png').write_bytes((folder / 'pic_000.png').read_bytes())   # no caption: left out
    out = tmp_path / 'out'
    prepare_shards.main([f'--folder={folder}', f'--out={out}', '--per_shard=10'])
    assert sorted(os.listdir(out)) == ['00000.tar', '00001.tar', '00002.tar']
    assert 'lonely.png' in capsys.readouterr().err
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    prepare_shards.main([f'--folder={folder}', f'--out={out}', '--per_shard=10'])
    assert before == {n: (out / n).read_bytes() for n in os.listdir(out)}        # the same bytes again
    caps = folders.read_captions(str(folder), os.listdir(folder))
    got = 0
    for _, _, key, sample in (r for p in shards.expand(str(out)) for r in shards.records(p)):
        name = json.loads(sample['json'])['file']
        assert sample['txt'].decode() == caps[name]
        if name != 'broken.png':
            want = folders.read_picture(folder / name, RES)
            assert np.array_equal(shard_data.decode_picture(sample[name.rsplit('.', 1)[1]], RES), want), name
            got += 1
    assert got == 24


# -----------------------------------------------------------------------------
# processes: 2 ranks x 2 workers; train.py on shards, killed and resumed


KEYS_SCRIPT = '''
import json, sys
from contextlib import nullcontext
sys.path.insert(0, {root!r})
import torch, torch.distributed as dist
import parallel, shard_data, tokenizer
from loader import Loader
dist.init_process_group('gloo')
rank, world = dist.get_rank(), dist.get_world_size()
run = parallel.Setup({{}}, torch.device('cpu'), nullcontext(), ddp=True, rank=rank, world=world,
                     cpu_group=dist.new_group(backend='gloo'))
sd = shard_data.ShardData({cfg!r}, tokenizer.get_tokenizer('byte'), 16, 4, seed=11)

class Keys:   # what a batch reads of the image stream: (reader, epoch, key) of 3 samples, and the readers' states
    def start_streams(self, *args):
        sd.start_streams(*args)
    def get(self, split, position, index):
        sd.begin(split, position, index, '', None)
        r = sd.reader('image', split)
        return [(r.rank, ref[0], item['__key__']) for ref, item in (r.next() for _ in range(3))], sd.take_states()

loader = Loader(Keys(), 0, grad_accum=1, world=world, rank=rank, workers=2)
got = []
for position in range(40):
    keys, states = next(loader)[2]
    got += keys
    run.streams.update(states)              # as train.py keeps them
    if position == 19:
        saved = run.gather_streams()        # what a checkpoint after 20 steps holds: every rank's readers
resumed = Loader(Keys(), 20, grad_accum=1, world=world, rank=rank, workers=2, streams=saved)
again = [k for _ in range(20) for k in next(resumed)[2][0]]
parts = [None] * world
dist.all_gather_object(parts, {{'got': got, 'again': again, 'saved': sorted(saved)}})
if rank == 0:
    json.dump(parts, open({out!r}, 'w'))
'''


@pytest.mark.slow
def test_two_processes_with_two_workers_each_read_every_sample_once_an_epoch_and_resume_exactly(tmp_path):
    spec = image_shards(tmp_path / 'shards')
    cfg = knobs(image_shards=spec, shard_buffer=4, shard_max_bad=1.0, shard_val_share=0.0)
    script = tmp_path / 'keys.py'
    script.write_text(KEYS_SCRIPT.format(root=ROOT, cfg=cfg, out=str(tmp_path / 'keys.json')))
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        str(script)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    parts = json.loads((tmp_path / 'keys.json').read_text())
    got = [tuple(x) for part in parts for x in part['got']]
    assert {x[0] for x in got} == {0, 1, 2, 3}                 # 2 ranks x 2 workers: 4 readers
    epoch0 = [k for _, e, k in got if e == 0]
    assert sorted(epoch0) == sorted(readable_keys(spec))       # every sample once, none twice
    owner = {}
    for reader, e, k in got:
        assert owner.setdefault((e, k), reader) == reader      # each epoch's samples split disjointly
    # the states gathered from both ranks after 20 steps: fresh loaders continue every reader exactly
    assert all(part['saved'] == ['image:0', 'image:1', 'image:2', 'image:3'] for part in parts)
    assert all(part['again'] == part['got'][60:] for part in parts)


@pytest.mark.slow
def test_train_py_on_image_and_text_shards_resumes_bit_identical(tmp_path):
    spec = image_shards(tmp_path / 'shards')
    text = text_shard(tmp_path / 't.jsonl.gz')
    args = ['config/smoke.py', f'--image_shards={spec}', f'--text_shards={text}',
            '--mixture=caption2image=0.5,text=0.5',
            '--data_workers=2', '--batch_size=2', '--block_size=256', '--eval_batches=1', '--log_interval=1',
            '--eval_interval=2', '--shard_buffer=8', '--shard_val_share=0.2', '--shard_max_bad=0.5',
            f'--cache_dir={tmp_path / "cache"}']
    r = run_train(*args, '--max_iters=4', f'--out_dir={tmp_path / "whole"}')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'not really a picture' not in r.stderr and 'UnidentifiedImageError' in r.stderr
    for max_iters, more in ((2, []), (4, ['--init_from=resume'])):
        r = run_train(*args, f'--max_iters={max_iters}', f'--out_dir={tmp_path / "cut"}', *more)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = (torch.load(tmp_path / d / 'ckpt.pt', weights_only=True) for d in ('whole', 'cut'))
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    assert a['streams'] == b['streams'] and a['stream_layout']['slots'] == 2
    log = [json.loads(line) for line in (tmp_path / 'whole' / 'log.jsonl').read_text().splitlines()]
    b_val = [json.loads(line) for line in (tmp_path / 'cut' / 'log.jsonl').read_text().splitlines()][-1]
    assert any(e.get('bad_samples', 0) > 0 for e in log) and any('val_flow_loss' in e for e in log)
    r = run_train(*args[:4], '--data_workers=0', '--max_iters=6', '--init_from=resume', f'--out_dir={tmp_path / "cut"}')
    assert r.returncode != 0 and 'max(1, data_workers) = 2, this run has 1 and 1' in r.stderr
    # eval.py: text perplexity and diffusion loss on the shards' held-out samples; the world's parts skipped
    r = run_script('eval.py', f'--ckpt={tmp_path / "cut" / "ckpt.pt"}', '--n_batches=1', '--t_grid=0.5',
                   f'--out={tmp_path / "eval.json"}')
    assert r.returncode == 0 and 'scored on the embedded world only' in r.stdout, r.stderr[-3000:]
    res = json.loads((tmp_path / 'eval.json').read_text())
    assert res['text_ppl'] > 1 and res['diffusion_loss_mean'] > 0 and 'understanding' not in res
    # the same held-out rows as train.py's last eval (train.py ran them under bf16 autocast, eval.py in fp32)
    assert res['text_ppl'] == pytest.approx(np.exp(b_val['val_text_loss']), rel=1e-3)


@pytest.mark.slow
def test_two_processes_on_shards_save_every_ranks_readers_and_resume_bit_identical(tmp_path):
    """torchrun, 2 processes (gloo), a data worker each: the checkpoint holds both ranks' readers, and a run
    stopped and resumed ends with the weights and reader states of one that was not (each rank keeps only the
    readers it advanced, so one rank's stale copy never overwrites another's)."""
    args = ['config/smoke.py', f'--image_shards={image_shards(tmp_path / "shards")}',
            f'--text_shards={text_shard(tmp_path / "t.jsonl.gz")}', '--mixture=caption2image=0.5,text=0.5',
            '--data_workers=1', '--batch_size=2', '--block_size=256', '--eval_batches=1', '--eval_interval=100',
            '--shard_val_share=0.2', '--shard_max_bad=0.5', '--dtype=float32', f'--cache_dir={tmp_path / "cache"}']
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py']
    for out, max_iters, more in (('whole', 4, []), ('cut', 2, []), ('cut', 4, ['--init_from=resume'])):
        r = subprocess.run([*torchrun, *args, f'--max_iters={max_iters}', f'--out_dir={tmp_path / out}', *more],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = (torch.load(tmp_path / d / 'ckpt.pt', weights_only=True) for d in ('whole', 'cut'))
    assert sorted(a['streams']) == ['image:0', 'image:1', 'text:0', 'text:1']
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model']) and a['streams'] == b['streams']

"""Your own data (folders.py): a folder of captioned pictures and a folder of clips become documents; bad files
are named once and skipped; caches follow the files; the held-out split follows the names."""

import json
import os

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

import documents
import folders
import rae
import tokenizer
import video
import world
from conftest import run_main, run_script, run_train

SMOKE_FOLDER = ['config/smoke.py', '--max_iters=4', '--eval_interval=4', '--eval_batches=1',
                '--mixture=caption2image=0.5,image2caption=0.5']


def names_with_held_out(n, prefix='pic', ext='.png', n_val=3):
    """n file names, n_val of them held out (by the name hash)."""
    val, train, i = [], [], 0
    while len(val) < n_val or len(train) < n - n_val:
        name = f"{prefix}_{i:03d}{ext}"
        (val if folders.held_out(name) else train).append(name)
        i += 1
    return sorted(val[:n_val] + train[:n - n_val])


def picture_folder(path, n=24):
    """World pictures as PNGs in several modes (RGB, grayscale, RGBA, palette, 16-bit), captions in
    captions.jsonl except one in a .txt beside its picture, and one corrupt file."""
    path.mkdir()
    rng = np.random.default_rng(0)
    caps = []
    for i, name in enumerate(names_with_held_out(n)):
        scene = world.sample_scene(rng, 1)
        img = world.render(scene, 32, rng=rng)
        kind = i % 5
        if kind == 1:
            iio.imwrite(path / name, img[..., 0])
        elif kind == 2:
            iio.imwrite(path / name, np.concatenate([img, np.full((32, 32, 1), 255, np.uint8)], -1))
        elif kind == 3:
            Image.fromarray(img).quantize(64).save(path / name)
        elif kind == 4:
            iio.imwrite(path / name, img[..., 1].astype(np.uint16) * 257)
        else:
            iio.imwrite(path / name, img)
        caps.append({'file': name, 'caption': world.caption(scene, rng)})
    (path / caps[0]['file']).with_suffix('.txt').write_text(caps[0]['caption'])
    (path / 'captions.jsonl').write_text(''.join(json.dumps(c) + '\n' for c in caps[1:]))
    (path / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not really a picture')
    with open(path / 'captions.jsonl', 'a') as f:
        f.write(json.dumps({'file': 'broken.png', 'caption': 'a picture that does not read'}) + '\n')
    return path


def test_the_held_out_split_follows_the_name_and_no_file_moves_when_others_are_added():
    names = [f"img{i}.jpg" for i in range(2000)]
    held = [n for n in names if folders.held_out(n)]
    assert 0.08 < len(held) / len(names) < 0.12
    assert [n for n in names[:1000] if folders.held_out(n)] == [n for n in held if n in names[:1000]]


def test_a_picture_file_of_any_mode_is_read_as_a_square_rgb_picture_of_the_size(tmp_path):
    wide = np.zeros((20, 40), np.uint16)
    wide[:, 10:30] = 65535                      # a white square in the middle of a 16-bit grey strip
    iio.imwrite(tmp_path / 'wide.png', wide)
    got = folders.read_picture(tmp_path / 'wide.png', 8)
    assert got.shape == (8, 8, 3) and got.dtype == np.uint8 and (got == 255).all()  # the centre square


@pytest.mark.slow
def test_a_folder_with_a_corrupt_picture_trains_names_it_once_and_new_pictures_rebuild_the_cache(tmp_path):
    folder = picture_folder(tmp_path / 'pics')
    cache, out = tmp_path / 'cache', tmp_path / 'out'
    args = [*SMOKE_FOLDER, f'--image_folder={folder}', f'--cache_dir={cache}', f'--out_dir={out}']
    r = run_train(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sum('broken.png' in line for line in r.stderr.splitlines()) == 1 and 'skipping' in r.stderr
    first = set(os.listdir(cache))
    assert any(n.startswith('pictures-train') for n in first) and any(n.startswith('latents-pixel-train') for n in first)

    name = next(n for n in (f"new_{i}.png" for i in range(100)) if not folders.held_out(n))
    iio.imwrite(folder / name, world.render(world.sample_scene(np.random.default_rng(1), 1), 32))
    (folder / name).with_suffix('.txt').write_text('a new picture')
    r = run_train(*args[:-1], f'--out_dir={tmp_path / "out2"}')
    assert r.returncode == 0, r.stderr[-2000:]
    second = set(os.listdir(cache))
    assert first < second                                # the old caches stay, new ones were built
    assert any(n.startswith('pictures-train') for n in second - first)

    # a checkpoint of your pictures: held-out losses on them, the world's parser skipped, no text perplexity
    # for a model that read no text document; drawing a caption
    r = run_script('eval.py', f'--ckpt={out}/ckpt.pt', '--n_batches=1', f'--out={tmp_path / "eval.json"}')
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / 'eval.json').read_text())
    assert res['diffusion_loss_mean'] > 0 and 'gen_1obj_seen' not in res and 'understanding' not in res
    assert res['text_ppl'] is None and res['text_loss_per_byte'] is None and res['caption_ppl'] > 1
    r = run_script('sample.py', f'--ckpt={out}/ckpt.pt', '--mode=t2i', '--n=2', '--steps=2',
                   '--prompt=a small red circle', f'--out_dir={tmp_path / "s"}')
    assert r.returncode == 0 and (tmp_path / 's' / 't2i.png').exists(), r.stderr[-2000:]


def test_a_folder_of_mostly_bad_files_stops_with_one_sentence(tmp_path):
    folder = tmp_path / 'pics'
    folder.mkdir()
    for i in range(5):
        iio.imwrite(folder / f'p{i}.png', np.zeros((8, 8, 3), np.uint8))   # no captions at all
    r = run_main('train.py', *SMOKE_FOLDER, f'--image_folder={folder}', f'--out_dir={tmp_path}')
    assert r.returncode != 0 and 'no usable pictures' in r.stderr and 'Traceback' not in r.stderr
    r = run_main('train.py', *SMOKE_FOLDER, f'--image_folder={tmp_path / "nowhere"}', f'--out_dir={tmp_path}')
    assert r.returncode != 0 and 'is not a folder' in r.stderr and 'Traceback' not in r.stderr


def test_question_documents_need_the_world_and_are_refused_with_an_image_folder(tmp_path):
    r = run_main('train.py', 'config/smoke.py', f'--image_folder={tmp_path}', '--mixture=caption2image=0.5,qa=0.5')
    assert r.returncode != 0 and "question documents need the world's scenes" in r.stderr


def clip_folder(path):
    """GIFs of a walk over a map, with actions, and of moving objects, with a caption."""
    path.mkdir()
    rng = np.random.default_rng(0)
    for name in names_with_held_out(8, 'walk', '.gif'):
        frames, steps, _ = video.sample_trajectory(rng, video.map_ids('train')[0], 6)
        video.write_gif(path / name, frames, fps=4)
        (path / name).with_suffix('.actions').write_text(''.join(video.format_action(*s) + '\n' for s in steps))
    frames, text = video.sample_video(rng, 6)
    video.write_gif(path / 'movers.gif', frames, fps=4)
    (path / 'movers.txt').write_text(text)
    (path / 'truncated.gif').write_bytes(b'GIF89a\x20\x00')
    return path


def test_a_folder_of_clips_gives_action_documents_with_its_action_lines(tmp_path):
    folder = clip_folder(tmp_path / 'clips')
    enc = rae.build_encoder({'encoder': 'pixel'})
    vf = folders.VideoFolder(str(folder), 32, str(tmp_path / 'cache'), fps=0.0)
    doc = vf.document('action', np.random.default_rng(0), 'train', 4, enc, tokenizer.get_tokenizer('world'), 100)
    pictures = [s for s in doc if isinstance(s, documents.Visual)]
    lines = [s for s in doc if isinstance(s, str)]
    assert len(pictures) == 4 and len(lines) == 3 and all(line.startswith('action: dx=') for line in lines)
    assert pictures[-1].target and pictures[0].latents.shape == (16, 192)
    # the latents are the frames', encoded once: decoding gives back a frame of one of the walks
    frame = enc.decode(pictures[0].latents[None])[0]
    assert torch.isfinite(frame).all()


@pytest.mark.slow
def test_video_documents_train_from_a_folder_with_a_truncated_gif(tmp_path):
    folder = clip_folder(tmp_path / 'clips')
    r = run_train('config/smoke.py', '--max_iters=3', '--eval_interval=3', '--eval_batches=1',
                  f'--video_folder={folder}', '--mixture=text=0.2,video=0.4,action=0.4',
                  f'--cache_dir={tmp_path / "cache"}', f'--out_dir={tmp_path / "out"}')
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'truncated.gif' in r.stderr and 'val_action_flow_loss' in (tmp_path / 'out' / 'log.jsonl').read_text()


def test_an_mp4_without_a_video_backend_is_refused_with_the_fix(tmp_path, monkeypatch):
    (tmp_path / 'clip.mp4').write_bytes(b'\x00' * 100)
    monkeypatch.setattr(video, 'stream_backend', lambda: None)
    with pytest.raises(SystemExit, match='pip install av'):
        folders.VideoFolder(str(tmp_path), 32, str(tmp_path / 'cache'), fps=1.0)

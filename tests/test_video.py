"""Tests of the embedded world's moving pictures: bouncing objects, navigation on maps, actions as text,
motion estimation, and video files."""

from importlib.util import find_spec

import numpy as np
import pytest

import video
import world


def test_videos_and_trajectories_are_deterministic_for_a_seed_and_differ_across_seeds():
    def draw(seed):
        rng = np.random.default_rng(seed)
        frames, text = video.sample_video(rng)
        tf, actions, positions = video.sample_trajectory(rng, map_id=3)
        return frames.tobytes(), text, tf.tobytes(), actions, positions
    assert draw(1) == draw(1)
    assert all(x != y for x, y in zip(draw(1), draw(2)))
    frames, text = video.sample_video(np.random.default_rng(0), n_frames=5, res=48)
    assert frames.shape == (5, 48, 48, 3) and frames.dtype == np.uint8 and text.endswith('.')


def test_a_bounce_mirrors_the_step_at_the_wall_and_flips_the_velocity():
    xy, v = video.simulate((5.5, 20.0), (-2, 1), 4, lo=3.0, hi=29.0)
    assert np.allclose(xy, [(5.5, 20), (3.5, 21), (4.5, 22), (6.5, 23)])  # 3.5 - 2 = 1.5 -> 2 * 3 - 1.5
    assert (v == [(-2, 1), (-2, 1), (2, 1), (2, 1)]).all()


def test_objects_move_at_constant_velocity_and_bounce_inside_the_frame():
    bounces = 0
    for seed in range(200):
        for m in video.sample_movers(np.random.default_rng(seed), n_frames=12):
            half = video.half_extent(m.size, world.RES)
            lo, hi = half, world.RES - half
            assert (m.xy >= lo - 1e-9).all() and (m.xy <= hi + 1e-9).all()     # the whole shape stays in
            assert m.v[0].any() and (np.abs(m.v) <= video.MAX_SPEED).all()
            for f in range(len(m.xy) - 1):
                step = m.xy[f] + m.v[f]
                for k in range(2):
                    if m.v[f + 1, k] == m.v[f, k]:                              # free flight
                        assert m.xy[f + 1, k] == pytest.approx(step[k])
                    else:                                                       # a bounce: mirrored at a wall
                        bounces += 1
                        assert m.v[f + 1, k] == -m.v[f, k]
                        wall = lo if step[k] < lo else hi
                        assert m.xy[f + 1, k] == pytest.approx(2 * wall - step[k])
    assert bounces > 50


def test_frames_show_the_objects_where_their_positions_say():
    """The colour mass of a lone circle or square is centred on its position (anti-aliasing keeps it
    exact to a small fraction of a pixel), and a video is exactly its movers rendered."""
    checked = 0
    for seed in range(60):
        movers = video.sample_movers(np.random.default_rng(seed))
        frames, _ = video.sample_video(np.random.default_rng(seed))
        assert (frames == video.render_movers(movers)).all()
        if len(movers) == 1 and movers[0].shape != 'triangle':
            m = movers[0]
            col = np.array(world.COLORS[m.color], float) - world.BACKGROUND
            amount = (frames.astype(float) - world.BACKGROUND) @ col / (col @ col)   # [F, H, W]
            ys, xs = np.mgrid[0:world.RES, 0:world.RES] + 0.5
            cx = (amount * xs).sum((1, 2)) / amount.sum((1, 2))
            cy = (amount * ys).sum((1, 2)) / amount.sum((1, 2))
            assert np.abs(np.stack([cx, cy], 1) - m.xy).max() < 0.1
            checked += 1
    assert checked >= 5


def test_text_names_each_object_and_its_direction_and_says_bouncing_only_when_it_bounces():
    for seed in range(40):
        movers = video.sample_movers(np.random.default_rng(seed))
        _, text = video.sample_video(np.random.default_rng(seed))
        for m in movers:
            assert m.color in text and m.shape in text and m.size in text
            assert video.direction(*m.v[0]) in text
        bounced = any((m.v != m.v[0]).any() for m in movers)
        assert bounced == ('bouncing' in text or 'hits a wall' in text)
    assert video.direction(1, -2) == 'up and to the right' and video.direction(-1, 0) == 'left'


def test_heldout_combos_never_appear_in_training_videos():
    for seed in range(300):
        for m in video.sample_movers(np.random.default_rng(seed)):
            assert (m.color, m.shape) not in world.HELDOUT_COMBOS
    for seed in range(20):
        movers = video.sample_movers(np.random.default_rng(seed), heldout=True)
        assert any((m.color, m.shape) in world.HELDOUT_COMBOS for m in movers)


def test_each_trajectory_frame_is_the_view_after_the_action():
    rng = np.random.default_rng(0)
    seen = set()
    for map_id in list(video.map_ids('train'))[:20] + list(video.map_ids('heldout'))[:4]:
        m = video.make_map(map_id)
        for _ in range(10):
            frames, actions, positions = video.sample_trajectory(rng, map_id)
            assert frames.shape == (8, 32, 32, 3) and len(actions) == 7 and len(positions) == 8
            assert (frames[0] == video.view(m, *positions[0])).all()
            for f, (dx, dy) in enumerate(actions):
                assert max(abs(dx), abs(dy)) <= video.MAX_STEP
                x, y = positions[f]
                assert positions[f + 1] == (x + dx, y + dy)
                assert (frames[f + 1] == video.view(m, x + dx, y + dy)).all()
                seen.add((dx, dy))
    assert len(seen) == 81  # every move in [-4, 4]^2 is used
    with pytest.raises(ValueError, match='does not fit'):
        video.view(m, 65, 0)


def test_train_and_heldout_maps_are_disjoint_deterministic_and_different():
    train, held = set(video.map_ids('train')), set(video.map_ids('heldout'))
    assert len(train) == video.N_TRAIN_MAPS and held and not train & held
    maps = {i: video.make_map(i) for i in sorted(train)[:16] + sorted(held)}
    assert len({m.tobytes() for m in maps.values()}) == len(maps)
    first = maps[3].copy()
    video.make_map.cache_clear()
    assert (video.make_map(3) == first).all() and not video.make_map(3).flags.writeable
    m = video.make_map(3)
    assert m.shape == (video.MAP_SIZE, video.MAP_SIZE, 3) and m.dtype == np.uint8
    with pytest.raises(ValueError):
        video.map_ids('test')


def test_action_text_round_trips_for_every_move():
    for dx in range(-4, 5):
        for dy in range(-4, 5):
            assert video.parse_action(video.format_action(dx, dy)) == (dx, dy)
            assert video.parse_action(video.format_words(dx, dy)) == (dx, dy)
    assert video.format_action(2, -1) == 'action: dx=+2, dy=-1'
    assert video.format_action(0, 3) == 'action: dx=+0, dy=+3'
    assert video.format_words(2, -1) == 'right x2, up' and video.format_words(0, 0) == 'stay'
    assert video.format_words(-1, 4) == 'left, down x4'
    for text, move in [('left', (-1, 0)), ('left x3', (-3, 0)), ('left, up x2', (-1, -2)),
                       ('up x2, left', (-1, -2)), ('  Right X2 , Down ', (2, 1)), ('STAY', (0, 0)),
                       ('action: dx=3, dy=-0', (3, 0)), ('action:dx=-4,dy=+4', (-4, 4))]:
        assert video.parse_action(text) == move


@pytest.mark.parametrize('text', ['', 'jump', 'left right', 'left, right', 'up, down x2', 'left x0', 'left,',
                                  'stay, left', 'action: dx=+1', 'action: dx=+1.5, dy=0', 'dx=+1, dy=+2',
                                  'action: dy=+1, dx=+2', None])
def test_malformed_action_text_raises_a_clear_value_error(text):
    with pytest.raises(ValueError) as e:
        video.parse_action(text)
    msg = str(e.value)
    assert repr(text) in msg and "expected 'action: dx=+2, dy=-1'" in msg and '\n' not in msg


def test_estimate_shift_recovers_true_actions_on_heldout_maps():
    """Every move in [-4, 4]^2 on every held-out map, at random places (1296 pairs): all exact."""
    rng = np.random.default_rng(0)
    for map_id in video.map_ids('heldout'):
        m = video.make_map(map_id)
        lim = m.shape[0] - 32
        for dx in range(-4, 5):
            for dy in range(-4, 5):
                x = int(rng.integers(max(0, -dx), lim - max(0, dx) + 1))
                y = int(rng.integers(max(0, -dy), lim - max(0, dy) + 1))
                assert video.estimate_shift(video.view(m, x, y), video.view(m, x + dx, y + dy)) == (dx, dy)


def test_estimate_shift_sees_sub_pixel_and_blurred_motion():
    """Half a pixel (an interpolated in-between view) within 0.25 px on average, and a blurred, noisy
    frame as a decoder paints it still gives the exact move in >= 90% of cases (97.8% measured)."""
    rng = np.random.default_rng(1)
    sub, exact = [], 0
    for k in range(160):
        m = video.make_map(list(video.map_ids('heldout'))[k % 16]).astype(np.float64)
        dx, dy = (int(v) for v in rng.integers(-3, 4, 2))
        x, y = int(rng.integers(4, 60)), int(rng.integers(4, 60))
        a = m[y:y + 32, x:x + 32]
        half = (m[y + dy:y + dy + 32, x + dx:x + dx + 32] + m[y + dy:y + dy + 32, x + dx + 1:x + dx + 33]) / 2
        sub.append(abs(video.estimate_shift(a, half)[0] - (dx + 0.5)))
        b = m[y + dy:y + dy + 32, x + dx:x + dx + 32]
        g = world.blur_matrix(32, 0.8)  # a Gaussian blur of 0.8 px: G @ channel @ G.T
        b = np.stack([g @ b[..., c] @ g.T for c in range(3)], -1)
        ex, ey = video.estimate_shift(a, np.clip(b + rng.normal(0, 4, b.shape), 0, 255))
        exact += (round(ex), round(ey)) == (dx, dy)
    assert np.mean(sub) < 0.25 and exact >= 0.9 * 160


def test_gif_written_then_read_gives_the_frames_back(tmp_path):
    rng = np.random.default_rng(0)
    objects, _ = video.sample_video(rng)
    views, actions, _ = video.sample_trajectory(rng, map_id=0)
    views = np.concatenate([views[:3], views[2:3], views[3:]])   # a repeated frame, as after 'stay'
    for frames in (objects, views):
        video.write_gif(tmp_path / 'a.gif', frames, fps=4)
        back = video.read_video(tmp_path / 'a.gif')
        assert back.shape == frames.shape and back.dtype == np.uint8
        assert np.abs(back.astype(int) - frames).max() <= 10          # a 256-colour palette per frame
        every_other = video.read_video(tmp_path / 'a.gif', fps=2)    # 4 fps written, 2 fps read
        assert (every_other == back[::2]).all()
    video.write_gif(tmp_path / 'big.gif', objects / 255.0, fps=2, scale=4)  # floats, enlarged 4x
    assert np.abs(video.read_video(tmp_path / 'big.gif').astype(int) - objects).max() <= 10
    assert video.read_video(tmp_path / 'big.gif', res=16).shape == (8, 16, 16, 3)


def test_a_missing_or_corrupt_video_raises_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match='nothere.gif'):
        video.read_video(tmp_path / 'nothere.gif')
    (tmp_path / 'bad.gif').write_bytes(b'GIF89a this is not a picture')
    with pytest.raises(ValueError, match='bad.gif'):
        video.read_video(tmp_path / 'bad.gif')
    (tmp_path / 'bad.mp4').write_bytes(b'\0' * 64)
    backend = find_spec('av') or find_spec('imageio_ffmpeg')
    with pytest.raises(ValueError if backend else RuntimeError, match='bad.mp4'):
        video.read_video(tmp_path / 'bad.mp4')


def test_mp4_is_read_at_the_requested_rate_when_pyav_is_installed(tmp_path):
    pytest.importorskip('av')
    import imageio.v3 as iio
    frames = np.zeros((20, 48, 64, 3), np.uint8)
    for i in range(20):
        frames[i, :, 8 + 2 * i:16 + 2 * i] = 200                   # a bar moving right, non-square frames
    iio.imwrite(tmp_path / 'a.mp4', frames, plugin='pyav', codec='libx264', fps=10)
    assert video.read_video(tmp_path / 'a.mp4').shape == (20, 32, 32, 3)
    assert video.read_video(tmp_path / 'a.mp4', res=16, fps=2).shape == (4, 16, 16, 3)


# -----------------------------------------------------------------------------
# clips in training, rollouts and the world-model scores

import torch  # noqa: E402

import data  # noqa: E402
import documents  # noqa: E402
import eval as evaluation  # noqa: E402
import rae  # noqa: E402
import generate  # noqa: E402
import tokenizer  # noqa: E402
from model import ModelConfig, Transfusion, dense_mask, latent_times  # noqa: E402

ENC = rae.PixelEncoder(32, 8).fit(torch.rand(8, 3, 32, 32))   # 16 tokens x 192 dims: small and fast


def encoded(doc):
    for s in doc:
        if isinstance(s, documents.Visual):
            s.latents = ENC.encode(data.image_tensor([s.image]))[0]
    return doc


def test_an_action_clip_is_one_noised_block_per_frame_each_seeing_only_the_past_and_its_action():
    tok = tokenizer.Tokenizer()
    doc = encoded(documents.video_document('action', np.random.default_rng(0), 'train', 3))
    batch = data.pack([[doc]], tok, 128, ENC.n_tokens, ENC.d_latent)
    slots = [torch.nonzero(batch.block[0] == k).squeeze(1) for k in range(3)]
    frames = [slice(16 * k, 16 * (k + 1)) for k in range(3)]                     # each frame's latents, in order
    targets = [v.target for v in doc if isinstance(v, documents.Visual)]
    assert all(len(s) == 16 for s in slots) and targets[-1]                     # the last frame is predicted
    assert [bool(batch.lat_target[f].all()) for f in frames] == targets
    assert all(torch.equal(batch.lat_idx[f], s) for f, s in zip(frames, slots))
    mask = dense_mask(batch.doc, batch.block)[0, 0]
    f0, f1, f2 = slots
    assert mask[f1[0]][f0].all() and mask[f1[0]][f1].all()       # the past frame, and its own frame whole
    assert not mask[f1[-1]][f2].any()                            # never the next frame
    action = torch.arange(int(f0[-1]) + 2, int(f1[0]) - 1)        # the text between <EOI> and <BOI>
    assert tok.decode(batch.tokens[0, action].tolist()) == doc[1] and mask[f1[0]][action].all()
    t = latent_times(batch, 16, alpha=1.0)
    assert all(len(set(t[f].tolist())) == 1 for f in frames)     # one t per frame ...
    noised = [float(t[f][0]) for f, target in zip(frames, targets) if target]
    assert len(set(noised)) == len(noised) and all(v < 1 for v in noised)   # ... drawn for each target frame
    assert all(float(t[f][0]) == 1 for f, target in zip(frames, targets) if not target)   # context is clean
    seen = set()
    for seed in range(20):                                       # both kinds of earlier frame occur
        d = documents.video_document('action', np.random.default_rng(seed), 'train', 3)
        seen |= {v.target for v in d[:-1] if isinstance(v, documents.Visual)}
    assert seen == {True, False}


def test_action_clips_of_the_val_split_walk_held_out_maps_and_their_text_parses_back():
    doc = documents.video_document('action', np.random.default_rng(5), 'val', 4)
    rng = np.random.default_rng(5)
    ids = video.map_ids('heldout')
    frames, actions, _ = video.sample_trajectory(rng, ids[int(rng.integers(len(ids)))], 4)
    assert all(np.array_equal(v.image, f) for v, f in zip(doc[::2], frames)) and doc[-1].target
    assert [video.parse_action(a) for a in doc[1::2]] == [tuple(a) for a in actions]


def test_batches_with_video_documents_are_deterministic(tmp_path):
    ds = data.WorldData(tokenizer.Tokenizer(), ENC, 256, 2, 'video=1,action=1,caption2image=1', n_images=64,
                        cache_dir=tmp_path, video_frames=3)
    a, b = ds.get('train', 4), ds.get('train', 4)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.latents, b.latents)
    assert not torch.equal(a.tokens, ds.get('train', 5).tokens)
    with pytest.raises(ValueError, match='fewer video_frames'):
        data.WorldData(tokenizer.Tokenizer(), ENC, 64, 2, 'action=1', cache_dir=tmp_path).get('train', 0)


def tiny_model():
    torch.manual_seed(0)
    return Transfusion(ModelConfig(vocab_size=262, block_size=256, d_model=32, n_layer=2, n_head=4, n_kv_head=2,
                                   d_ff=64, d_latent=ENC.d_latent, n_latent=ENC.n_tokens, attn='sdpa')).eval()


def test_rollouts_with_and_without_the_cache_agree():
    model, tok = tiny_model(), tokenizer.Tokenizer()
    frames = torch.randn(2, 2, ENC.n_tokens, ENC.d_latent)
    acts = [video.format_action(1, -2), [video.format_action(0, 3), video.format_action(-4, 4)],
            video.format_action(2, 2)]
    a = generate.rollout(model, tok, frames, acts, steps=3, use_cache=True)
    b = generate.rollout(model, tok, frames, acts, steps=3, use_cache=False)
    assert a.shape == (2, 2, ENC.n_tokens, ENC.d_latent)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_world_model_scores_compare_with_the_true_motion_and_random_plans():
    model, tok = tiny_model(), tokenizer.Tokenizer()
    res = evaluation.world_model_error(model, tok, ENC, n=2, context=2, horizon=2, steps=2, seed=0, batch=2)
    true = np.concatenate([np.array(w[2][1:], float) for w in evaluation.heldout_walks(2, 4, 0)])
    assert np.isclose(res['rpe_still'], np.linalg.norm(true, axis=1).mean())   # no motion: error = the motion
    assert res['ate_ratio'] == res['ate'] / res['ate_still']
    lat = res['latent_error']      # per predicted frame
    assert set(lat) == {'ar_vs_true', 'ar_vs_input', 'tf_vs_true', 'tf_vs_input', 'still', 'step'}
    assert all(len(v) == 2 and all(x >= 0 for x in v) for v in lat.values())
    # the first predicted frame has the same (true) context either way: forced and rollout agree on it
    assert np.isclose(lat['tf_vs_true'][0], lat['ar_vs_true'][0]) and lat['still'][0] == lat['step'][0]
    assert res['rpe_teacher_forced'] >= 0
    plan = evaluation.planning(model, tok, ENC, n=1, context=2, steps=2, seed=0, population=4, iters=1)
    assert set(plan) == {'cem_position_error', 'random_position_error'}
    assert all(0 <= v <= 2 * 4 * 2 ** 0.5 for v in plan.values())   # a goal is one action away


def test_motion_errors_are_zero_for_the_true_frames_and_the_baseline_for_standing_still():
    walks = evaluation.heldout_walks(6, 5, seed=0)
    enc = rae.PixelEncoder(32, 8).fit(data.image_tensor(np.concatenate([w[1] for w in walks])))
    frames = evaluation.encode_frames(enc, np.stack([w[1] for w in walks]), 'cpu')
    true = [np.array(w[2][3:], dtype=float) for w in walks]   # the one shift after context frame 4
    exact = evaluation.motion_errors(enc, frames[:, 3:4], frames[:, 4:], true)
    assert max(exact['ate']) < 0.5 and max(exact['rpe']) < 0.5
    still = evaluation.motion_errors(enc, frames[:, 3:4], frames[:, 3:4], true)
    np.testing.assert_allclose(still['ate'], [np.linalg.norm(t[0]) for t in true], atol=0.5)


def fake_rollout(step):
    """A stand-in for generate.rollout on frames whose latents are their index (frame j = j everywhere): each
    new frame is the last one + step (1: follows the walk exactly; 0: copies its input)."""
    def roll(model, tok, frames, actions, steps=25, seed=0):
        seq = list(frames.unbind(1))
        for _ in range(len(actions) - (frames.shape[1] - 1)):
            seq.append(seq[-1] + step)
        return torch.stack(seq[frames.shape[1]:], 1)
    return roll


@pytest.mark.parametrize('step', [1, 0])
def test_latent_errors_separate_a_model_that_follows_the_walk_from_one_that_copies_its_input(monkeypatch, step):
    context, horizon = 3, 4
    frames = torch.arange(context + horizon, dtype=torch.float)[None, :, None, None].expand(2, -1, 5, 6)
    acts = ['a'] * (context + horizon - 1)
    monkeypatch.setattr(evaluation, 'rollout', fake_rollout(step))
    pred = evaluation.rollout(None, None, frames[:, :context], acts)
    forced = evaluation.teacher_forced(None, None, frames, acts, context, horizon, 2, 0)
    e = {k: v.mean(0).tolist() for k, v in evaluation.latent_error_terms(frames, pred, forced, context).items()}
    k = np.arange(1, horizon + 1)
    assert e['still'] == list(k ** 2.0) and e['step'] == [1.0] * horizon      # the baselines
    if step == 1:    # right from true frames and from its own: no exposure bias, and it moves
        assert e['tf_vs_true'] == e['ar_vs_true'] == [0.0] * horizon
        assert e['tf_vs_input'] == e['ar_vs_input'] == [1.0] * horizon
    else:            # ignores the action: equal to its input, so as far off as standing still
        assert e['tf_vs_input'] == e['ar_vs_input'] == [0.0] * horizon
        assert e['tf_vs_true'] == e['step'] and e['ar_vs_true'] == e['still']


def clip_and_picture_batch():
    """One row: an action clip (3 frames, the last a target, the others context) and a question/answer picture
    (context): four visual blocks of 16 slots."""
    tok = tokenizer.Tokenizer()
    pics = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    clip = encoded([documents.Visual(p, t) for p, t in zip(pics, (False, False, True))])
    clip.insert(1, video.format_action(1, 2))
    clip.insert(3, video.format_action(-1, 0))
    qa = [documents.Visual(None, False, torch.randn(ENC.n_tokens, ENC.d_latent)), 'q: how many? a: 1']
    return tok, data.pack([[clip, qa]], tok, 256, ENC.n_tokens, ENC.d_latent)


def test_noised_context_frames_of_clips_carry_their_t_into_the_model_and_pictures_stay_clean(monkeypatch):
    tok, batch = clip_and_picture_batch()
    blocks = [slice(16 * k, 16 * (k + 1)) for k in range(4)]   # the clip's frames 0, 1, 2, then the qa picture
    assert batch.lat_clip.tolist() == [True] * 32 + [False] * 32   # the clip's context frames, found on the host
    torch.manual_seed(0)
    t0 = latent_times(batch, 16, 3.0)
    torch.manual_seed(0)
    t = latent_times(batch, 16, 3.0, ctx_noise=0.5)
    for k in (0, 1):                                         # the clip's context frames: one t each, in [0.5, 1)
        assert len(set(t[blocks[k]].tolist())) == 1 and 0.5 <= float(t[blocks[k]][0]) < 1
        assert (t0[blocks[k]] == 1).all()                    # (clean without the knob)
    assert torch.equal(t[blocks[2]], t0[blocks[2]])          # the target frame's t is as it was
    assert (t[blocks[3]] == 1).all()                         # the picture of a question stays clean
    model = Transfusion(ModelConfig(vocab_size=262, block_size=256, d_model=32, n_layer=2, n_head=4, n_kv_head=2,
                                    d_ff=64, d_latent=ENC.d_latent, n_latent=ENC.n_tokens, attn='sdpa',
                                    ctx_noise=0.5))
    seen = {}
    hidden = model.hidden
    monkeypatch.setattr(model, 'hidden', lambda inp, **k: (seen.update(z=inp.z, t=inp.t), hidden(inp, **k))[1])
    x0, ctx = batch.latents.float(), slice(0, 32)
    for mode in ('train', 'eval'):
        getattr(model, mode)()
        model(batch)
        if mode == 'train':   # what the model reads at a context frame: its latents noised to its t
            assert (seen['t'][ctx] < 1).all() and not torch.allclose(seen['z'][ctx], x0[ctx])
        else:                 # held-out losses (and rollouts) read clean true frames
            assert (seen['t'][ctx] == 1).all() and torch.equal(seen['z'][ctx], x0[ctx])
        assert torch.equal(seen['z'][blocks[3]], x0[blocks[3]])


def test_rollout_feeds_generated_frames_back_renoised_with_their_t_and_true_frames_clean(monkeypatch):
    model, tok = tiny_model(), tokenizer.Tokenizer()
    N, d = ENC.n_tokens, ENC.d_latent
    frames = torch.randn(2, 2, N, d)
    acts = [video.format_action(1, -2), video.format_action(0, 3), video.format_action(2, 2),
            video.format_action(-1, 1)]
    windows = []

    def sample_image(model, tok, doc, kv, steps, cfg_scale, generator, uncond=None):   # records each window
        lat = doc.modality[0] == 1
        windows.append((doc.z[:, lat].view(2, -1, N, d), doc.t[0, lat].view(-1, N)))
        return torch.full((2, N, d), 10.0 * len(windows))                    # generated frame h: 10 (h + 1)
    monkeypatch.setattr(generate, 'sample_image', sample_image)
    for renoise, t_fed in ((0.0, 1.0), (0.2, 0.8)):
        windows.clear()
        pred = generate.rollout(model, tok, frames, acts, steps=2, renoise=renoise)
        assert [float(p[0, 0, 0]) for p in pred.unbind(1)] == [10.0, 20.0, 30.0]   # clean predictions returned
        (z1, t1), (z2, t2), (z3, t3) = windows
        assert torch.equal(z1, frames) and (t1 == 1).all()                  # the true frames: clean, t = 1
        assert torch.equal(z2[:, 0], frames[:, 1]) and (t2[0] == 1).all()
        assert (t2[1] == t_fed).all() and (t3 == t_fed).all()              # generated frames: t = 1 - renoise
        if renoise == 0:
            assert (z2[:, 1] == 10).all() and (z3[:, 0] == 10).all() and (z3[:, 1] == 20).all()
        else:    # z = 0.8 x + 0.2 noise, noised once: the same noised frame in every later window
            assert torch.equal(z2[:, 1], z3[:, 0])
            assert (z2[:, 1] - 8.0).std().item() == pytest.approx(0.2, rel=0.15)
            assert (z3[:, 1] - 16.0).mean().abs() < 0.05
    monkeypatch.undo()
    model.cfg.rollout_noise = 0.2          # the model's knob is the default
    a = generate.rollout(model, tok, frames, acts[:3], steps=2, seed=1)
    b = generate.rollout(model, tok, frames, acts[:3], steps=2, seed=1, renoise=0.2)
    c = generate.rollout(model, tok, frames, acts[:3], steps=2, seed=1, renoise=0.0)
    assert torch.equal(a, b) and torch.equal(a[:, 0], c[:, 0]) and not torch.equal(a[:, 1], c[:, 1])


def test_world_model_scores_roll_out_with_the_rollout_noise_asked_for():
    model, tok = tiny_model(), tokenizer.Tokenizer()
    runs = {}
    for noise in (0.0, 0.3):
        model.cfg.rollout_noise = noise
        runs[noise] = evaluation.world_model_error(model, tok, ENC, n=2, context=2, horizon=2, steps=2, seed=0,
                                                   batch=2)
    assert runs[0.3]['rollout_noise'] == 0.3 and runs[0.0]['rollout_noise'] == 0.0
    a, b = runs[0.0]['latent_error'], runs[0.3]['latent_error']
    assert a['ar_vs_true'][0] == b['ar_vs_true'][0] and a['ar_vs_true'][1:] != b['ar_vs_true'][1:]
    assert a['tf_vs_true'] == b['tf_vs_true']     # teacher-forced windows hold true frames only


def test_action_drop_leaves_out_action_texts_in_training_clips_only():
    kept = dropped = 0
    for seed in range(200):
        base = documents.video_document('action', np.random.default_rng(seed), 'train', 5)
        doc = documents.video_document('action', np.random.default_rng(seed), 'train', 5, action_drop=0.3)
        frames = [s for s in doc if isinstance(s, documents.Visual)]
        assert len(frames) == 5 and all(np.array_equal(a.image, b.image) and a.target == b.target
                                        for a, b in zip(frames, [s for s in base if isinstance(s, documents.Visual)]))
        texts = [s for s in doc if isinstance(s, str)]
        assert all(t in base for t in texts)          # the actions kept are the clip's own
        kept, dropped = kept + len(texts), dropped + 4 - len(texts)
    assert 0.25 < dropped / (kept + dropped) < 0.35
    ds = data.WorldData(tokenizer.Tokenizer(), ENC, 256, 2, 'action=1', cache_dir='/nonexistent', action_drop=0.5)
    val = ds.get('val', 0)
    for row in range(2):                               # held-out clips keep every action
        assert all(sum(isinstance(s, str) for s in d) == 4 for d in data.unpack(val, ds.tok, row))


def test_rollout_guides_each_frame_against_its_window_without_the_last_action(monkeypatch):
    model, tok = tiny_model(), tokenizer.Tokenizer()
    torch.nn.init.normal_(model.lat_out.weight, std=0.5)   # (zero-initialised: every branch would predict 0)
    frames = torch.randn(2, 2, ENC.n_tokens, ENC.d_latent)
    acts = [video.format_action(1, -2), video.format_action(0, 3), video.format_action(2, 2)]
    calls = []
    real = generate.sample_image

    def spy(model, tok, doc, kv, steps, cfg_scale, generator, uncond=None):
        calls.append((doc.tokens.clone(), None if uncond is None else uncond.tokens.clone(), cfg_scale))
        return real(model, tok, doc, kv, steps, cfg_scale, generator, uncond)
    monkeypatch.setattr(generate, 'sample_image', spy)
    plain = generate.rollout(model, tok, frames, acts[:2], steps=2)   # one frame: enough to compare
    assert len(calls) == 1 and calls[0][1] is None and calls[0][2] == 1.0
    calls.clear()
    guided = generate.rollout(model, tok, frames, acts, steps=2, action_cfg=3.0)
    assert len(calls) == 2
    for (doc, uncond, s), last in zip(calls, acts[1:]):
        n = len(tok.encode(last))
        assert s == 3.0 and torch.equal(uncond, doc[:, :-n])          # the same window, its last action left out
        assert tok.decode(doc[0, -n:].tolist()) == last
    assert not torch.allclose(plain, guided[:, :1])
    model.cfg.action_cfg = 3.0                                       # the model's knob is the default
    torch.testing.assert_close(generate.rollout(model, tok, frames, acts[:2], steps=2), guided[:, :1])

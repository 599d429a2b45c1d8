"""
A real example that runs offline: scikit-learn's 1,797 handwritten digits (8x8 pictures of 17 grey levels that
ship inside the package) written out as an image_folder, with captions made from their labels.

    pip install scikit-learn                  # for this example only
    python prepare_digits.py                  # -> digits/: 1,797 PNGs of 32x32 and captions.jsonl
    python train.py config/digits.py          # pictures <-> captions on them (README "Your own data")
    python sample.py --ckpt=out-digits/ckpt.pt --mode=t2i --prompt="a handwritten seven"
"""

import json
import os
import sys

import numpy as np
from PIL import Image

from configurator import configure, fail, knobs

# -----------------------------------------------------------------------------
out = 'digits'            # the folder to write
size = 32                 # pictures are upscaled (bilinear) from 8x8 to size x size
# -----------------------------------------------------------------------------
WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
TEMPLATES = ('a handwritten {w}', 'the digit {d}', 'a {w} written by hand', 'handwritten number {d}',
             'a white {w} on black')


def main(argv):
    cfg = configure(knobs(globals()), argv, __doc__)
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        fail("this example needs scikit-learn: pip install scikit-learn")
    digits = load_digits()
    os.makedirs(cfg['out'], exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        grey = np.round(img / 16 * 255).astype(np.uint8)
        name = f"digit_{i:04d}.png"
        Image.fromarray(grey).resize((cfg['size'], cfg['size']), Image.BILINEAR).save(os.path.join(cfg['out'], name))
        caption = TEMPLATES[rng.integers(len(TEMPLATES))].format(w=WORDS[label], d=label)
        lines.append(json.dumps({'file': name, 'caption': caption}))
    with open(os.path.join(cfg['out'], 'captions.jsonl'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print(f"wrote {len(lines)} pictures and captions.jsonl to {cfg['out']}")


if __name__ == '__main__':
    main(sys.argv[1:])

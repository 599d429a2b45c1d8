# Your own pictures, the offline example: scikit-learn's handwritten digits as an image_folder (run
# `python prepare_digits.py` first). The vit encoder is MAE-pretrained, normalised and given its decoder on the
# digits' training pictures; captions <-> pictures only (the world's text and questions have no digits).
out_dir = 'out-digits'
image_folder = 'digits'
mixture = 'caption2image=0.6,image2caption=0.4'
max_iters = 1500
eval_interval = 250

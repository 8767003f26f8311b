# The reference sizes (config/deepseek.py) with DeepSeek-V2/V3 Multi-head Latent Attention instead of latent-token GQA:
# keys and values are cached as a 128-wide latent plus one 32-wide RoPE key per token and layer
# (160 numbers instead of 512). Same data and schedule as config/deepseek.py.
#   python prepare.py config/deepseek_mla.py && python train.py config/deepseek_mla.py
import os

exec(open(os.path.join(os.path.dirname(__file__), 'deepseek.py')).read())   # from any folder
out_dir = 'out-deepseek-mla'
attention = 'mla'

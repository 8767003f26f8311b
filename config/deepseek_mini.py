# The architecture card's model family scaled for a 2-core CPU: same blocks (latent-token GQA with RoPE, 8 experts
# top-2 with loss-free balancing, tied head), smaller everywhere, and its own 8,192-token BPE.
#   python prepare.py config/deepseek_mini.py && python train.py config/deepseek_mini.py
out_dir = 'out-mini'
dataset = 'shakespeare'
data_dir = 'data/shakespeare_8k'
vocab_size = 8192
n_layer = 4
n_embd = 128
n_head = 4
n_kv_head = 2
head_dim = 32
n_latent = 8
n_expert = 8
n_expert_active = 2
expert_hidden = 512
block_size = 128
batch_size = 8
max_iters = 2000    # ~6 minutes on 2 CPU cores; the README's 10,000-step log uses --max_iters=10000
eval_interval = 250
eval_iters = 10
log_interval = 50
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 100
weight_decay = 0.1
balance_rate = 1e-3

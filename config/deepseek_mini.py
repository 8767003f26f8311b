# The architecture card's model family scaled for a 2-core CPU: same blocks (latent-token GQA with RoPE, 8 experts
# top-2 with loss-free balancing, tied head), smaller everywhere, and its own 4,096-token BPE. Trained for a fixed
# small compute budget: Muon for the blocks' matrices, a warmup-stable-decay schedule, no dropout, thin experts,
# a bias update proportional to each expert's load error, DeepSeek-V3's sequence-wise balance loss beside it,
# and 24 sequences a step, since Muon's cost is per step and in proportion to all the experts' weights
# (docs/speedrun.md, docs/balancing.md, docs/moe_vs_dense.md).
#   python prepare.py config/deepseek_mini.py && python train.py config/deepseek_mini.py
out_dir = 'out-mini'
dataset = 'shakespeare'
data_dir = 'data/shakespeare_4k'
vocab_size = 4096
n_layer = 4
n_embd = 128
n_head = 4
n_kv_head = 2
head_dim = 32
n_latent = 8
n_expert = 8
n_expert_active = 2
expert_hidden = 128
expert_dropout = 0.0
router_jitter = 0.0
block_size = 128
batch_size = 24
max_iters = 1150
eval_interval = 250
eval_iters = 5
log_interval = 50
optimizer = 'muon'
learning_rate = 6e-3
lr_schedule = 'wsd'
cooldown_frac = 0.4
min_lr = 0.0
warmup_iters = 40
weight_decay = 0.1
balance_rate = 3e-3
balance_update = 'proportional'   # each bias moves by rate x its load's relative error (docs/balancing.md)
seq_balance_loss = 0.2            # spreads each sequence over the experts, so held-out plays balance too

# The reference configuration of the architecture card: 679.8M parameters, 226.8M active per token,
# on TinyStories (V2, GPT-4 stories: about 2.2 GB of text, downloaded once by prepare.py).
#   python prepare.py config/deepseek.py && python train.py config/deepseek.py
# 10,000 steps of 8 x 1,024 tokens read 81.9M tokens, a fraction of one pass; the 38 bundled plays (1.05M tokens)
# would be read 78 times by a model 650 times their size, which learns them by heart. Offline: --dataset=shakespeare.
# Architecture: every ModelConfig default (49,152 vocab, 768 wide, 24 blocks, 12 q / 4 kv heads of 64,
# 8 latent tokens, 8 experts top-2 of 768 -> 2048 -> 768) is the card's, so nothing is set here.
#
# Sized for 10,000 steps in minutes on one H100/H200 (bf16, torch.compile, fused AdamW):
#   FLOPs per token = 6 * 226.8M active params + causal attention (24 layers, 12 heads, 128 q.k+p.v width,
#   8 + 512.5 keys on average, x6 for forward and backward) = 1.361 + 0.115 = 1.476 GFLOP
#   tokens per step = 8 x 1024 = 8,192  ->  12.1 TFLOP per step, 1.21e17 FLOP for 10,000 steps
#   at 30% MFU of 989 TFLOP/s (297 TFLOP/s): 41 ms per step, ~410 s for the run, plus compile.
#   train.py prints the FLOPs per token at start-up and the MFU in every log line.
# Memory of a step at 8 x 1024 tokens (`python bench.py --only=memory` adds up the tensors):
#   weights, gradients and AdamW state: 16 bytes x 679.8M parameters = 10.1 GiB
#   tensors saved for backward under bf16 autocast: 0.49 GiB per block, 11.9 GiB for all 24 with the
#   embedding and head (the loss runs in chunks, so the 8,192 x 49,152 logits never exist at once)
#   -> about 23 GiB with the temporaries of a layer's backward; at batch 4 about 17 GiB.
# On a CPU it runs too, slowly; try: --device=cpu --batch_size=1 --block_size=64 --max_iters=5 --eval_iters=1
out_dir = 'out-deepseek'
dataset = 'tinystories'
batch_size = 8
block_size = 1024
gradient_accumulation_steps = 1
max_iters = 10000
eval_interval = 500
eval_iters = 20
log_interval = 50
ckpt_interval = 2500    # ckpt.pt holds AdamW's state too: 12 bytes x 679.8M = 8.2 GB per write; ckpt_best.pt 2.7 GB
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 200
weight_decay = 0.1
grad_clip = 1.0

# SARA on Phi-3.5-MoE-instruct (32 layers, 16 experts, top-2), the paper's setting (docs/method.md).
#   torchrun --nproc_per_node 8 train.py configs/phi35.py --init_from=/path/to/Phi-3.5-MoE-instruct \
#            --data_path=/path/to/parallel_sw.jsonl
# Per-GPU memory on 8 x 80 GB, full-parameter fine-tuning of 41.9B params, FSDP2 over 8 ranks:
#   fp32 master weights would need 16 B/param = 78 GiB per GPU: does not fit.
#   We keep bf16 parameters and bf16 gradients (2 + 2 B) with fp32 Adam m and v (4 + 4 B):
#   12 B/param x 41.9e9 / 8 = 58.5 GiB. Plain bf16 weights would silently drop lr=2e-5 updates
#   (a relative update of ~1e-5 is below bf16's 2^-8 resolution), so the optimizer (optim.py
#   AdamWBF16) computes the update in fp32 and writes it back with STOCHASTIC ROUNDING: unbiased,
#   small updates survive in expectation (tests/test_train.py checks this).
#   + all-gathered bf16 block params (transient, 2 blocks in flight: 2 x 2.6 GiB)
#   + activations with activation checkpointing at 2048 tokens (block inputs 32 x 2048 x 4096 x 2 B
#     = 0.5 GiB; one block's recompute ~2-3 GiB; fp32 logits 2048 x 32064 x 4 B = 0.25 GiB)
#   ~ 67 GiB of 80. If that is too tight: cpu_offload=True (FSDP2 CPUOffloadPolicy, slower) or 16 GPUs.
out_dir = "out/phi35_sara"
init_from = ""  # set to the downloaded checkpoint directory
tokenizer_path = ""
data_path = ""
train_langs = ["sw"]
anchor_lang = "en"
max_len = 2048
lambda_js = 1.5
lambda_lb = -1.0  # the model's own router_aux_loss_coef (0.0)
sara_band = (13, 26)  # inclusive, 0-based (docs/method.md)
anchor_mode = "offline"
# Phi-3.5's router multiplies its input by U(0.99, 1.01) noise in training (input_jitter_noise 0.01).
# SARA's distribution is softmax(h W_g) of the paper (docs/method.md), and the anchors come from
# eval mode, without noise: with the jittered logits even identical routing would give JS > 0.
# So the pooled distribution uses the un-jittered input's logits, while the routing itself keeps
# the jitter Phi was trained with. Cost: one more (tokens x hidden x 16) gate matmul per layer.
router_clean_logits = True
epochs = 2
global_batch = 256
micro_batch = 1
lr = 2e-5
warmup_frac = 0.1
weight_decay = 0.01
beta1, beta2 = 0.9, 0.999
grad_clip = 1.0
dtype = "bfloat16"
optimizer_states = "bf16_sr"
parallel = "fsdp"
gradient_checkpointing = True
loss_chunk_size = 4096  # never materialise the fp32 logits (1.2 GiB per 2048 tokens for Qwen3)
val_fraction = 0.02
eval_interval = 50
ckpt_interval = 50
log_interval = 1

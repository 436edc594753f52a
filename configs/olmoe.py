# SARA on OLMoE-1B-7B (allenai/OLMoE-1B-7B-0924, or its -Instruct; 16 layers, 64 experts, top-8, no
# renormalisation of the top-8 weights, qk-norm over the whole q / k projection: families/olmoe.py).
#   torchrun --nproc_per_node 8 train.py configs/olmoe.py --init_from=/path/to/OLMoE-1B-7B-0924-Instruct \
#            --data_path=/path/to/parallel_sw.jsonl
# The architecture comes from the checkpoint's config.json. Its numbers (families/olmoe.py PRESET):
# hidden 2048, 16 layers, 16 heads = 16 kv heads, 64 experts top-8, vocab 50304, 4096 positions,
# rope 1e4, rms_norm_eps 1e-5, router_aux_loss_coef 0.01, clip_qkv null, norm_topk_prob false are
# transformers' OlmoeConfig defaults (documented against allenai/OLMoE-1B-7B-0924); the expert width
# is 1024, not the class default 2048: 1024 gives the released 6.9B total / 1.3B active parameters
# (6.92B / 1.28B here; 2048 would give 13.3B). The 0924 config.json itself was not reachable offline.
# Per-GPU memory on 8 x 80 GB (python memory.py --models olmoe): fp32 optimizer states, see
# docs/architectures.md ("OLMoE"): fits with a wide margin.
out_dir = "out/olmoe_sara"
init_from = ""  # set to the downloaded checkpoint directory
tokenizer_path = ""  # the checkpoint's tokenizer.json
data_path = ""
train_langs = ["sw"]
anchor_lang = "en"
max_len = 2048
lambda_js = 1.5
lambda_lb = -1.0  # the model's own router_aux_loss_coef (0.01)
# NOT from the paper (which has no OLMoE run): Qwen3's band 7-34 of 48 layers scaled to 16 layers.
# The band should sit at the bottom of the measured per-layer divergence curve (docs/method.md):
# measure it for OLMoE (stage1.py) before a real run.
sara_band = (2, 11)
anchor_mode = "offline"
epochs = 2
global_batch = 256
micro_batch = 1
lr = 2e-5
warmup_frac = 0.1
weight_decay = 0.01
beta1, beta2 = 0.9, 0.999
grad_clip = 1.0
dtype = "bfloat16"
optimizer_states = "fp32"
parallel = "fsdp"
gradient_checkpointing = True
loss_chunk_size = 4096
val_fraction = 0.02
eval_interval = 50
ckpt_interval = 50
log_interval = 1

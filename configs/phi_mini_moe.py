# SARA on Phi-mini-MoE-instruct (microsoft; SlimMoE cut of Phi-3.5-MoE: 32 layers, 16 experts of
# width 960, top-2 sparsemixer, 32 heads / 8 kv heads, 4k context, sliding window on every layer;
# families/phimoe.py SLIM_PRESETS says where each number comes from: 7.65B params, 2.36B active).
# The same file serves Phi-tiny-MoE-instruct (16 heads / 4 kv, head_dim 128, experts 448 wide):
# the architecture always comes from the checkpoint's config.json.
#   torchrun --nproc_per_node 8 train.py configs/phi_mini_moe.py --init_from=/path/to/Phi-mini-MoE-instruct \
#            --data_path=/path/to/parallel_sw.jsonl
# Per-GPU memory on 8 x 80 GB (python memory.py --models phi_mini): fp32 optimizer states fit
# (docs/architectures.md, "Phi-mini-MoE and Phi-tiny-MoE").
out_dir = "out/phi_mini_moe_sara"
init_from = ""
tokenizer_path = ""
data_path = ""
train_langs = ["sw"]
anchor_lang = "en"
max_len = 2048  # <= the 2047-token window + 1: at 2048 tokens the window cuts one key of the last query
lambda_js = 1.5
lambda_lb = -1.0  # the model's own router_aux_loss_coef
# NOT from the paper: Phi-3.5-MoE's band (13-26 of 32 layers), the same depth. Measure the per-layer
# divergence curve for this model (stage1.py) before a real run (docs/method.md).
sara_band = (13, 26)
anchor_mode = "offline"
router_clean_logits = True  # as configs/phi35.py: the pooled distribution without the input jitter
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

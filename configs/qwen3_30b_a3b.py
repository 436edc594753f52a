# SARA on Qwen3-30B-A3B (48 layers, 128 experts, top-8), the paper's setting (docs/method.md).
#   torchrun --nproc_per_node 8 train.py configs/qwen3_30b_a3b.py --init_from=/path/to/Qwen3-30B-A3B \
#            --data_path=/path/to/parallel_sw.jsonl
# Per-GPU memory on 8 x 80 GB (FSDP2, fp32 master weights, AdamW): 30.5B params x 16 B / 8
# = 57 GiB for params + grads + Adam m, v; + bf16 all-gathered block params (transient, ~0.6 GiB
# per block) + activations with activation checkpointing at 2048 tokens per micro-batch (~3-5 GiB:
# the saved block inputs are 48 x 2048 x 2048 x 2 B = 0.4 GiB; the largest live tensor is the
# fp32 logits 2048 x 151936 x 4 B = 1.2 GiB). Fits in 80 GB.
out_dir = "out/qwen3_30b_a3b_sara"
init_from = ""  # set to the downloaded checkpoint directory
tokenizer_path = ""  # the checkpoint's tokenizer.json
data_path = ""  # target-language samples with English anchors (data/parallel.py format)
train_langs = ["sw"]  # one target language per run, as in the paper
anchor_lang = "en"
max_len = 2048
lambda_js = 1.5
lambda_lb = -1.0  # the model's own router_aux_loss_coef (0.001)
sara_band = (7, 34)  # inclusive, 0-based (docs/method.md)
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
loss_chunk_size = 4096  # never materialise the fp32 logits (1.2 GiB per 2048 tokens for Qwen3)
val_fraction = 0.02
eval_interval = 50
ckpt_interval = 50
log_interval = 1

# SARA on gpt-oss-20b (24 layers, 32 experts, top-4). NOT one of the paper's models: its settings
# below are the Qwen3 config's, with the band and the memory choices made for this architecture.
#   torchrun --nproc_per_node 8 train.py configs/gpt_oss_20b.py --init_from=/path/to/gpt-oss-20b \
#            --data_path=/path/to/parallel_sw.jsonl
# Architecture (families/gpt_oss.py PRESET, model.gpt_oss_20b_config()), from openai/gpt-oss-20b's
# config.json (huggingface.co/openai/gpt-oss-20b/blob/main/config.json, transformers_version
# 4.55.0.dev0): hidden 2880, 24 layers, 64 query / 8 kv heads of 64, 32 experts of width 2880, top-4,
# vocab 201,088, rope_theta 150000 with YaRN (factor 32, beta_fast 32, beta_slow 1, original 4096,
# truncate false), sliding_window 128 on even layers, swiglu_limit 7.0 (alpha 1.702: transformers'
# default, the config does not write it), rms_norm_eps 1e-5, router_aux_loss_coef 0.9.
# 20.9B parameters (20.915B counted by memory.py), 3.6B active.
# The released weights store the experts in MXFP4; load_hf dequantizes them to bf16 (the dtype of
# the other tensors), and the checkpoints written here are plain bf16.
# Attention sinks need eager attention (model.py): the (T, T + 1) scores of each layer exist in bf16.
# Per-GPU memory on 8 x 80 GB (`python memory.py --models gpt_oss_20b`), fp32 master weights, AdamW,
# checkpointing, 2048 tokens per micro-batch: states 38.9 GiB + root params 2.2 + transients ~10
# = 51.7 GiB (sum of parts; simulated step 51.7): fits. Without checkpointing 76.4 / 75.1: tight.
out_dir = "out/gpt_oss_20b_sara"
init_from = ""  # set to the downloaded checkpoint directory
tokenizer_path = ""  # the checkpoint's tokenizer.json
data_path = ""  # target-language samples with English anchors (data/parallel.py format)
train_langs = ["sw"]
anchor_lang = "en"
max_len = 2048
lambda_js = 1.5
lambda_lb = -1.0  # the model's own router_aux_loss_coef (0.9 in the release's config.json)
# Not from the paper (which has no GPT-OSS run): the middle band at Qwen3's proportions (layers
# 7-34 of 48 -> 4-17 of 24), inclusive, 0-based. Tune it on a validation language.
sara_band = (4, 17)
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
loss_chunk_size = 4096  # never materialise the fp32 logits (1.6 GiB per 2048 tokens at vocab 201,088)
val_fraction = 0.02
eval_interval = 50
ckpt_interval = 50
log_interval = 1

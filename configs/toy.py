# The toy SARA experiment (the defaults of train.py, restated): a 2.8M-parameter MoE on the bundled
# UDHR parallel text, English anchors, five of the paper's target languages. CPU, a few minutes.
out_dir = "out/toy"
init_from = "scratch"
pretrain_iters = 150
train_langs = ["sw", "hi", "bn", "te", "ne"]
anchor_lang = "en"
lambda_js = 1.0
sara_band = (1, 2)  # inclusive: the middle two of four MoE layers
epochs = 8
global_batch = 16
micro_batch = 16
lr = 1e-3

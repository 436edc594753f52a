"""
train.py's settings: one dataclass with the defaults of the toy experiment, and the one place where
every value is checked (before any data or model is loaded).

    s, sources = TrainSettings.from_argv(sys.argv[1:])   # config files + --key=value (configurator.py)
    s.lambda_js, s.sara_band, ...                         # attributes; sources[key] says where a value came from

configs/*.py restate the settings of a real run as plain assignments; `python train.py --help` lists
every setting with its default and the comment written next to it below.
"""
import dataclasses
import math
import os
from dataclasses import dataclass, field

from configurator import ConfigError, at_least, configure, in_range, inline_comments, one_of, validate
from model import MoEConfig

TOY_TOKENIZER = "data/udhr/bpe.tiktoken"  # the toy BPE of a run from scratch (data/udhr/prepare.py)

# settings that were renamed: using the old name is an error that says what to write instead
RENAMED = dict(sara_layers="use sara_band=(start, end), an inclusive pair, or sara_layer_list=[...] for exact layers")
METHODS = ("sara", "live_kl", "shifcon")  # the alignment methods train.py can run (methods/<name>.py; docs/method.md)


@dataclass
class TrainSettings:
    out_dir: str = "out/toy"
    init_from: str = "scratch"  # "scratch" (toy: stage 0 pretraining), a Hugging Face checkpoint dir, or a base.pt
    model_config: dict = field(default_factory=lambda: dict(  # scratch only; a dict given changes the keys it names, the rest stay
        vocab_size=4096, hidden_size=128, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=256, n_experts=8,
        top_k=2, moe_intermediate_size=128, qk_norm=True, norm_topk_prob=True, max_position_embeddings=512,
        router_aux_loss_coef=0.01))
    pretrain_iters: int = 150  # stage 0, scratch only: LM steps on all languages before SARA
    pretrain_lr: float = 3e-3
    pretrain_target_fraction: float = 1.0  # stage 0 keeps this fraction of each target language's items (scarce)
    # data
    data_path: str = "data/udhr/parallel.jsonl"
    tokenizer_path: str = ""  # "" = the checkpoint's own; scratch or a base.pt: data/udhr/bpe.tiktoken (checked against base.pt's record)
    train_langs: list = field(default_factory=lambda: ["sw", "hi", "bn", "te", "ne"])  # target languages (codes as in the data)
    anchor_lang: str = "en"
    val_fraction: float = 0.15
    max_len: int = 256
    system_prompt: str = ""
    # the alignment method (docs/method.md); SARA
    method: str = "sara"  # the alignment component of stage 3 (methods/); lambda_js=0 is plain fine-tuning
    lambda_js: float = 1.0  # lambda_JS; the paper uses 1.5 for both models; 0 = plain fine-tuning
    lambda_lb: float = -1.0  # lambda_LB; -1 = the model's own router_aux_loss_coef
    sara_band: tuple = (1, 2)  # inclusive, 0-based (start, end) band of decoder layers to align
    sara_layer_list: list = field(default_factory=list)  # if given: exactly these decoder layers instead (an ablation)
    anchor_mode: str = "offline"  # "offline" (frozen original model, cached) or "online" (current model, ablation)
    min_anchor_fraction: float = 0.25  # SARA needs anchors: fewer training samples with one is an error
    router_clean_logits: bool = False  # sparsemixer with input jitter (Phi-3.5): pool softmax(h W_g) of the un-jittered input
    # the baselines and controls (docs/baselines.md); the band settings above are theirs too
    live_kl_alpha: float = 0.1  # method=live_kl: alpha of L_CE + 200 * alpha * KL (Bandarkar et al.'s launch value); 0 = plain
    live_kl_freeze: str = "early_layers"  # method=live_kl: "early_layers" (their default), "routers" or "none"
    shifcon_positions: tuple = ()  # method=shifcon: (l_f, l_b) residual positions (0 = embeddings); () = the band's: (first + 1, last + 2)
    shifcon_ce_weight: float = 0.5  # method=shifcon: weight of L_CE (their pipeline's 0.5)
    shifcon_contrastive_weight: float = 2.0  # method=shifcon: weight of the contrastive term (their 2.0); 0 = the shift alone
    shifcon_scale: float = 1.0  # method=shifcon: InfoNCE logits = scale * e g^T (their 1.0)
    shifcon_contrastive_batch: int = 12  # method=shifcon: pairs of one language in each micro-batch's contrastive batch (their 12)
    shifcon_contrastive_max_len: int = 128  # method=shifcon: tokens kept of each contrastive row (theirs: English 100, target 256)
    freeze_routers: bool = False  # control: every router gate weight W_g frozen (any method; with lambda_js=0: plain + frozen)
    anchor_shuffle: bool = False  # control (sara, offline): each training row anchored on another item's anchor
    # optimisation
    epochs: int = 8  # 0: stop after stage 0 (toy) and stage 2
    global_batch: int = 16  # sequences per optimizer step, over all ranks and micro-steps
    micro_batch: int = 16  # sequences per forward on one rank
    lr: float = 1e-3
    warmup_frac: float = 0.1
    min_lr_frac: float = 0.0  # cosine decays to min_lr_frac * lr
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    optimizer_states: str = "fp32"  # "fp32" (fp32 params), or "bf16_sr": bf16 params, fp32 Adam states, stochastic rounding
    seed: int = 1337
    # system
    device: str = "auto"  # "auto", "cpu", "cuda"
    dtype: str = "float32"  # "float32" or "bfloat16" (bf16 autocast with fp32 params unless optimizer_states="bf16_sr")
    parallel: str = "ddp"  # "ddp" or "fsdp" (FSDP2 fully_shard per block) under torchrun
    cpu_offload: bool = False  # FSDP2: keep parameters and optimizer states in host memory
    gradient_checkpointing: bool = False
    loss_chunk_size: int = 0  # > 0: lm_head + CE in chunks of this many tokens, no (T, V) fp32 logits
    compile: bool = False
    peak_tflops: float = 989.0  # the accelerator's dense bf16 peak, for MFU (H100 SXM: 989)
    # bookkeeping
    log_interval: int = 5
    eval_interval: int = 50
    ckpt_interval: int = 50
    export_hf: bool = True  # write out_dir/hf (Hugging Face layout) at the end
    inject_nan_at_iter: int = -1  # testing only: poison the loss at this iteration to exercise the guard

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_argv(cls, argv, doc=None):
        """Config files and --key=value overrides (configurator.configure; --help lists the settings),
        then check() -> (TrainSettings, sources {key: where its value came from})."""
        defaults = cls().to_dict()
        values, sources = configure(argv, defaults, renamed=RENAMED, doc=doc, comments=inline_comments(__file__))
        unknown = sorted(set(values["model_config"]) - {f.name for f in dataclasses.fields(MoEConfig)})
        if unknown:
            raise ConfigError(f"model_config ({sources['model_config']}): {unknown} are not MoEConfig fields; valid: "
                              f"{', '.join(f.name for f in dataclasses.fields(MoEConfig))}")
        # a partial dict changes the keys it names: {'n_layers': 2} alone must not drop hidden_size etc.
        values["model_config"] = {**defaults["model_config"], **values["model_config"]}
        for key in PATH_KEYS:  # the shell leaves "--out_dir=~/x" alone: "~/x" is not a directory named "~"
            values[key] = os.path.expanduser(values[key])
        s = cls(**values)
        s.check(sources)
        return s, sources

    def check(self, sources=None):
        """Every rule a value must meet on its own, all problems reported at once, each naming the key,
        value and where it came from (a ConfigError). Rules that need the data or the model's shape
        (the band's layers, max_len against the context) are checked by train.py when those are known."""
        sources = sources or {}
        values = self.to_dict()
        rules = dict(RULES)
        for f in dataclasses.fields(self):  # one rule for every float: 1e999 parses as inf, and inf is no setting
            if isinstance(values[f.name], float):
                rules[f.name] = _finite_and(RULES.get(f.name))
        validate(values, sources, rules)
        problems = []
        if self.anchor_lang in self.train_langs:  # every row would be its own anchor: JS exactly 0
            problems.append(f"anchor_lang={self.anchor_lang!r} ({sources.get('anchor_lang', 'default')}) is one of "
                            f"train_langs={self.train_langs} ({sources.get('train_langs', 'default')}): a language "
                            "cannot be aligned to itself")
        if self.init_from != "scratch":  # these shape stage 0 and the scratch model only: set, they would be ignored
            ignored = [f"{k} ({sources[k]})" for k in SCRATCH_ONLY if sources.get(k, "default") != "default"]
            if ignored:
                problems.append(f"init_from={self.init_from!r} ({sources.get('init_from', 'default')}): "
                                f"{', '.join(ignored)} apply to init_from='scratch' only; remove them")
        if self.export_hf and self.init_from != "scratch" and \
                os.path.realpath(self.init_from) == os.path.realpath(os.path.join(self.out_dir, "hf")):
            problems.append(f"init_from={self.init_from!r} ({sources.get('init_from', 'default')}) is where this run "
                            f"exports (out_dir={self.out_dir!r} + '/hf'): the export would replace the checkpoint it "
                            "starts from; use another out_dir")
        if problems:
            raise ConfigError("invalid settings:\n  " + "\n  ".join(problems))


PATH_KEYS = ("out_dir", "init_from", "data_path", "tokenizer_path")
SCRATCH_ONLY = ("model_config", "pretrain_iters", "pretrain_lr", "pretrain_target_fraction")


def _finite_and(rule):
    return lambda v: "must be finite" if not math.isfinite(v) else rule(v) if rule else None


def _out_dir(v):
    if not v:
        return "is empty: a directory for checkpoints and metrics"
    if os.path.exists(v) and not os.path.isdir(v):
        return "exists and is a file, not a directory"
    return None


_positive = in_range(0, math.inf, lo_open=True)
_open_unit = in_range(0, 1, hi_open=True)
RULES = dict(
    out_dir=_out_dir,
    seed=in_range(0, 2 ** 63 - 1),  # torch.manual_seed(seed + rank), Generator.manual_seed(seed + epoch) in range
    init_from=lambda v: None if v else "is empty: a checkpoint directory, or 'scratch'",
    data_path=lambda v: None if v else "is empty: a JSONL file of parallel samples",
    pretrain_iters=at_least(0), pretrain_lr=_positive, pretrain_target_fraction=in_range(0, 1, lo_open=True),
    train_langs=lambda v: None if v and all(isinstance(x, str) and x for x in v) else "must be a non-empty list of strings",
    anchor_lang=lambda v: None if v else "is empty",
    val_fraction=_open_unit, max_len=at_least(2), method=one_of(*METHODS),
    lambda_js=in_range(0, math.inf),
    lambda_lb=lambda v: None if v >= 0 or v == -1 else "must be >= 0, or -1 (the model's own)",
    sara_band=lambda v: None if len(v) == 2 and all(type(x) is int for x in v) and 0 <= v[0] <= v[1]
    else "must be an inclusive pair (start, end) of layer indices with 0 <= start <= end",
    sara_layer_list=lambda v: None if all(type(x) is int and x >= 0 for x in v) and len(set(v)) == len(v)
    else "must be distinct layer indices >= 0",
    anchor_mode=one_of("offline", "online"), min_anchor_fraction=in_range(0, 1),
    shifcon_positions=lambda v: None if len(v) == 0 or (len(v) == 2 and all(type(x) is int for x in v) and 0 < v[0] < v[1])
    else "must be () (from the band) or a pair (l_f, l_b) of residual positions with 0 < l_f < l_b",
    shifcon_ce_weight=_positive, shifcon_contrastive_weight=in_range(0, math.inf), shifcon_scale=_positive,
    shifcon_contrastive_batch=at_least(2), shifcon_contrastive_max_len=at_least(2),
    live_kl_alpha=in_range(0, math.inf), live_kl_freeze=one_of("early_layers", "routers", "none"),
    epochs=at_least(0), global_batch=at_least(1), micro_batch=at_least(1), lr=_positive,
    warmup_frac=in_range(0, 1), min_lr_frac=in_range(0, 1), weight_decay=at_least(0),
    beta1=_open_unit, beta2=_open_unit, grad_clip=_positive,
    optimizer_states=one_of("fp32", "bf16_sr"), device=one_of("auto", "cpu", "cuda"),
    dtype=one_of("float32", "bfloat16"), parallel=one_of("ddp", "fsdp"), loss_chunk_size=at_least(0),
    peak_tflops=_positive, log_interval=at_least(1), eval_interval=at_least(1), ckpt_interval=at_least(1))

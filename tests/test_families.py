"""
families/: one module per model family. Each family module is complete (the same names in each), its
config.json defaults and class names are transformers' own (the oracle), an unknown model_type or
architecture is an error naming it and listing the supported ones, config.json values of the wrong
type and switches we do not implement are errors naming the file and the key, and a new family is
picked up by hf_config, tokenizer and bench from its module alone.
"""
import re
import types

import pytest

import families
import hf_config
import tokenizer
from hf_config import CheckpointError, config_from_hf, config_to_hf, hf_tensor_map
from model import MoEConfig, MoETransformer, gpt_oss_20b_config, phi35_moe_config, qwen3_30b_a3b_config

# what every family module must define (docs/architectures.md, "Adding a family")
NAMES = ("MODEL_TYPE", "ARCHITECTURE", "HF_CONFIG_CLASS", "HF_MODEL_CLASS", "EXPERT_NAMES", "HF_DEFAULTS",
         "ROPE_TYPES", "INT_KEYS", "BOOL_KEYS", "NONNEGATIVE_KEYS", "CHAT_FORMAT_NAME", "CHAT_FORMAT",
         "PRESET_NAME", "PRESET", "BENCH", "sliding_window", "problems", "n_experts", "from_hf", "needs", "to_hf")
TINY = dict(vocab_size=64, hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
            intermediate_size=16, n_experts=4, top_k=2, moe_intermediate_size=16)


@pytest.mark.parametrize("model_type", families.FAMILIES)
def test_family_module_is_complete(model_type):
    family = families.FAMILIES[model_type]
    assert [n for n in NAMES if not hasattr(family, n)] == []
    assert family.MODEL_TYPE == model_type
    assert families.by_architecture(family.ARCHITECTURE) is family
    assert tokenizer.CHAT_FORMATS[family.CHAT_FORMAT_NAME] is family.CHAT_FORMAT
    assert tokenizer.MODEL_TYPE_TO_CHAT_FORMAT[model_type] == family.CHAT_FORMAT_NAME


@pytest.mark.parametrize("model_type", families.FAMILIES)
def test_family_defaults_and_classes_are_transformers_own(model_type):
    transformers = pytest.importorskip("transformers")
    family = families.FAMILIES[model_type]
    hf = getattr(transformers, family.HF_CONFIG_CLASS)()
    assert hf.model_type == model_type
    assert transformers.CONFIG_MAPPING[model_type] is type(hf)
    assert getattr(transformers, family.HF_MODEL_CLASS).config_class is type(hf)
    theirs = {k: (hf.rope_parameters["rope_theta"] if k == "rope_theta" else getattr(hf, k))
              for k in family.HF_DEFAULTS}
    assert theirs == family.HF_DEFAULTS


@pytest.mark.parametrize("preset,model_type", [(qwen3_30b_a3b_config, "qwen3_moe"), (phi35_moe_config, "phimoe"),
                                               (gpt_oss_20b_config, "gpt_oss")])
def test_presets_are_their_family(preset, model_type):
    assert families.of_config(preset()) is families.FAMILIES[model_type]
    assert config_to_hf(preset())["model_type"] == model_type


def test_unknown_model_type_and_architecture_are_named_with_the_supported_ones():
    supported = str(sorted(families.FAMILIES))
    with pytest.raises(CheckpointError) as err:
        config_from_hf({"model_type": "mixtral", "num_local_experts": 8})
    assert "'mixtral'" in str(err.value) and supported in str(err.value) and "config.json" in str(err.value)
    with pytest.raises(ValueError, match=r"'mixtral' is not supported \(supported: " + re.escape(supported) + r"\)"):
        families.get("mixtral")
    with pytest.raises(ValueError) as err:
        families.by_architecture("MixtralForCausalLM")
    assert "'MixtralForCausalLM'" in str(err.value)
    assert all(f.ARCHITECTURE in str(err.value) for f in families.FAMILIES.values())
    with pytest.raises(CheckpointError, match=r"^/c/config.json: architecture 'MixtralForCausalLM' is not supported"):
        config_from_hf(_qwen(architectures=["MixtralForCausalLM"]), source="/c/config.json")
    with pytest.raises(CheckpointError, match=r"'PhiMoEForCausalLM' \(phimoe\) but model_type is 'qwen3_moe'"):
        config_from_hf(_qwen(architectures=["PhiMoEForCausalLM"]))
    # transformers' own class name (what its save_pretrained writes) is the family's too
    assert config_from_hf(_phi(architectures=["PhimoeForCausalLM"])) == config_from_hf(_phi())
    with pytest.raises(CheckpointError, match=r"model_type 'mixtral' is not supported \(supported: "):
        hf_tensor_map(MoETransformer(qwen3_30b_a3b_config(**TINY)), "mixtral")


def _qwen(**change):
    return {**config_to_hf(qwen3_30b_a3b_config(**TINY)), **change}


def _phi(**change):
    return {**config_to_hf(phi35_moe_config(**{**TINY, "head_dim": 8, "moe_intermediate_size": 16})), **change}


@pytest.mark.parametrize("make,change,pattern", [
    (_qwen, {"num_hidden_layers": "2"}, r"num_hidden_layers='2' \(expected a positive integer\)"),
    (_qwen, {"num_hidden_layers": 2.0}, r"num_hidden_layers=2.0 \(expected a positive integer\)"),
    (_qwen, {"num_hidden_layers": True}, r"num_hidden_layers=True \(expected a positive integer\)"),
    (_qwen, {"num_key_value_heads": 0}, r"num_key_value_heads=0 \(expected a positive integer\)"),
    (_qwen, {"num_attention_heads": 6, "num_key_value_heads": 4},
     r"num_attention_heads=6 is not a multiple of num_key_value_heads=4"),
    (_phi, {"num_attention_heads": 3, "num_key_value_heads": 1},
     r"hidden_size=32 is not a multiple of num_attention_heads=3"),
    (_qwen, {"head_dim": 7}, r"head dimension 7 is odd"),
    (_qwen, {"head_dim": "8"}, r"head_dim='8' \(expected a positive integer\)"),
    (_qwen, {"rms_norm_eps": "1e-6"}, r"rms_norm_eps='1e-6' \(expected a positive number\)"),
    (_qwen, {"rope_theta": 0}, r"rope_theta=0 \(expected a positive number\)"),
    (_qwen, {"tie_word_embeddings": "false"}, r"tie_word_embeddings='false' \(expected true or false\)"),
    (_qwen, {"norm_topk_prob": 1}, r"norm_topk_prob=1 \(expected true or false\)"),
    (_qwen, {"num_experts": 0}, r"num_experts=0 \(expected a positive integer\)"),
    (_qwen, {"num_experts_per_tok": 5}, r"num_experts_per_tok=5 exceeds the 4 experts"),
    (_qwen, {"mlp_only_layers": "1"}, r"mlp_only_layers='1' \(expected a list"),
    (_qwen, {"router_aux_loss_coef": -1}, r"router_aux_loss_coef=-1 \(expected a number >= 0\)"),
    (_phi, {"router_jitter_noise": "0.01"}, r"router_jitter_noise='0.01' \(expected a number >= 0\)"),
    (_phi, {"lm_head_bias": None, "attention_bias": "yes"}, r"attention_bias='yes' \(expected true or false\)"),
    (_qwen, {"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}},
     r"rope_theta=-1.0 \(expected a positive number\)"),
])
def test_config_values_of_the_wrong_type_name_file_and_key(make, change, pattern):
    with pytest.raises(CheckpointError, match=pattern) as err:
        config_from_hf(make(**change), source="/ckpt/config.json")
    assert str(err.value).startswith("/ckpt/config.json: ")
    with pytest.raises(CheckpointError, match="^config.json: "):  # the default source
        config_from_hf(make(**change))


@pytest.mark.parametrize("make,change,switch", [
    (_qwen, {"attention_dropout": 0.1}, "attention_dropout=0.1"),
    (_phi, {"hidden_dropout": 0.1}, "hidden_dropout=0.1"),
    (_qwen, {"use_sliding_window": True, "sliding_window": 16}, "sliding_window=16"),
    (_qwen, {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    (_qwen, {"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    (_qwen, {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    (_qwen, {"rope_scaling": {"type": "longrope", "short_factor": [1] * 4, "long_factor": [1] * 4}},
     "RoPE type 'longrope' for qwen3_moe"),
    (_phi, {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE type 'yarn' for phimoe"),
    (_phi, {"num_experts_per_tok": 1}, "num_experts_per_tok=1 (phimoe's sparsemixer is top-2 only)"),
])
def test_unimplemented_switches_are_named(make, change, switch):
    with pytest.raises(CheckpointError) as err:
        config_from_hf(make(**change))
    assert switch in str(err.value) and str(err.value).startswith("config.json: ")


def test_the_switches_at_their_harmless_values_load():
    # the released configs write these; at these values they change nothing
    config_from_hf(_qwen(attention_dropout=0.0, use_sliding_window=False, sliding_window=4096, max_window_layers=2))
    config_from_hf(_phi(attention_dropout=0.0, hidden_dropout=0.0, sliding_window=131072))  # = max length


def test_phimoe_implements_its_sliding_window():
    # a window shorter than the context is the model's (tests/test_family_phi_small.py checks it
    # against transformers); Qwen3's use_sliding_window stays an error (above)
    assert config_from_hf(_phi(sliding_window=16)).sliding_window == 16


def test_a_new_family_needs_only_its_module(monkeypatch):
    """A family added to FAMILIES (here a copy of Qwen3-MoE under other names) is read and written by
    hf_config and given its chat format by tokenizer, with no other code naming it."""
    new = types.ModuleType("families.toy_moe")
    new.__dict__.update({n: getattr(families.qwen3_moe, n) for n in NAMES})
    new.MODEL_TYPE, new.ARCHITECTURE, new.EXPERT_NAMES = "toy_moe", "ToyMoeForCausalLM", ("moe", "wg", "wu", "wd")
    new.needs = lambda cfg: {**families.qwen3_moe.needs(cfg), "n_experts == 4": cfg.n_experts == 4}
    monkeypatch.setattr(families, "FAMILIES", {"toy_moe": new, **families.FAMILIES})
    cfg = qwen3_30b_a3b_config(**TINY)
    hf = config_to_hf(cfg)
    assert hf["model_type"] == "toy_moe" and hf["architectures"] == ["ToyMoeForCausalLM"]
    assert config_from_hf(hf) == cfg
    assert families.by_architecture("ToyMoeForCausalLM") is new
    names = hf_tensor_map(MoETransformer(cfg), "toy_moe")
    assert "model.layers.1.moe.experts.3.wd.weight" in names and "model.layers.0.moe.gate.weight" in names
    assert config_to_hf(qwen3_30b_a3b_config(**{**TINY, "n_experts": 6}))["model_type"] == "qwen3_moe"


def test_config_matching_no_family_lists_each_familys_unmet_needs():
    with pytest.raises(CheckpointError) as err:
        config_to_hf(MoEConfig(**TINY))  # topk router, rmsnorm, but no qk_norm: neither
    msg = str(err.value)
    assert "neither qwen3_moe" in msg and "nor phimoe" in msg and "qwen3_moe ['qk_norm']" in msg
    assert hf_config.family_of(phi35_moe_config(**TINY)) is families.phimoe

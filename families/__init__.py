"""
The model families we implement, one module each (families/qwen3_moe.py, phimoe.py, olmoe.py), keyed
by config.json's `model_type`. A family module holds everything family-specific: the config.json
mapping both ways (HF_DEFAULTS, from_hf, to_hf, needs, problems), the on-disk expert names, the
chat format, the architecture names (config.json / vLLM, transformers' classes), the paper-size
preset and bench.py's shapes. hf_config.py, tokenizer.py, model.py and bench*.py read them from here.

Adding a family: one new module with the same names, one line in FAMILIES, and its tests
(docs/architectures.md, "Adding a family").
"""
from families import gpt_oss, olmoe, phimoe, qwen3_moe

FAMILIES = {qwen3_moe.MODEL_TYPE: qwen3_moe, phimoe.MODEL_TYPE: phimoe, olmoe.MODEL_TYPE: olmoe,
            gpt_oss.MODEL_TYPE: gpt_oss}

# MoEConfig switches (field: its "off" value) that only some families' config.json can carry. A family
# lists those it reads and writes in CARRIES (a family without CARRIES carries none, as qwen3_moe).
# Saving a config that sets one as a family that cannot carry it would silently drop it: of_config
# counts it as an unmet need, and hf_config refuses such a key in a config.json it reads.
SWITCHES = {"sliding_window": None, "layer_types": None, "qk_norm_scope": "head", "clip_qkv": None}


def carries(family, switch):
    return switch in getattr(family, "CARRIES", ())


def get(model_type):
    """The family module of a config.json model_type; ValueError naming it and the supported ones."""
    if not isinstance(model_type, str) or model_type not in FAMILIES:  # (a list is unhashable: named, too)
        raise ValueError(f"model_type {model_type!r} is not supported (supported: {sorted(FAMILIES)})")
    return FAMILIES[model_type]


def by_architecture(name):
    """The family whose config.json `architectures` entry (or transformers class) is `name`."""
    for family in FAMILIES.values():
        if name in (family.ARCHITECTURE, family.HF_MODEL_CLASS):
            return family
    known = sorted(n for f in FAMILIES.values() for n in {f.ARCHITECTURE, f.HF_MODEL_CLASS})
    raise ValueError(f"architecture {name!r} is not supported (supported: {known})")


def of_config(cfg):
    """The family a MoEConfig is (the first whose needs() are all met); ValueError listing, per
    family, what it needs and what is unmet."""
    unmet = {}
    for model_type, family in FAMILIES.items():
        needs = family.needs(cfg)
        needs.update({f"{key} == {off!r}": getattr(cfg, key) == off for key, off in SWITCHES.items()
                      if not carries(family, key)})
        if all(needs.values()):
            return family
        unmet[model_type] = (list(needs), [k for k, ok in needs.items() if not ok])
    raise ValueError("MoEConfig is neither " + " nor ".join(f"{t} (needs {', '.join(n)})" for t, (n, _) in unmet.items())
                     + "; unmet: " + ", ".join(f"{t} {u}" for t, (_, u) in unmet.items()))

"""loraplex.peft_format: peft's rules, held to peft itself, and `all-linear` served end to end.

Tables of literal cases; where peft has the rule as a function, the same table is also run
through peft's own function, so a peft upgrade that changes a rule shows up here.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save

from loraplex import peft_format as pf
from loraplex.errors import InvalidArgument, ValidationFailed

Q0 = "model.layers.0.self_attn.q_proj"
LLAMA = [f"model.layers.{i}.{p}" for i in (0, 1) for p in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


# ------------------------------------------------------------------------------ tensor names

@pytest.mark.parametrize(("key", "want"), [
    (f"base_model.model.{Q0}.lora_A.weight", (Q0, "A", "")),
    (f"{Q0}.lora_B.weight", (Q0, "B", "")),
    (f"base_model.model.{Q0}.lora_B.default.weight", (Q0, "B", "default")),
    ("transformer.h.0.attn.c_attn.lora_A.weight", ("transformer.h.0.attn.c_attn", "A", "")),
    (f"base_model.model.{Q0}.lora_magnitude_vector", (Q0, "M", "")),  # DoRA, saved
    (f"base_model.model.{Q0}.lora_magnitude_vector.default.weight", (Q0, "M", "default")),
    ("base_model.model.model.embed_tokens.lora_embedding_A", None),  # embedding LoRA
    (f"base_model.model.{Q0}.lora_A.bias", None),
    ("base_model.model.lm_head.weight", None),
])
def test_parse_key(key, want):
    got = pf.parse_key(key)
    assert (got and (got.module, got.half, got.adapter_name)) == want
    if got is not None and got.half != "M":
        assert got.normalized == f"{want[0]}.lora_{want[1]}.weight"
    elif got is not None:
        assert got.normalized == f"{want[0]}.lora_magnitude_vector"


def test_pair_tensors_reports_strays_and_half_pairs():
    grouped = pf.pair_tensors({
        f"base_model.model.{Q0}.lora_A.weight": 1, f"base_model.model.{Q0}.lora_B.weight": 2,
        "model.layers.1.mlp.up_proj.lora_B.weight": 3, "lm_head.weight": 4})
    assert grouped.pairs == {Q0: (1, 2)}
    assert grouped.incomplete == (("model.layers.1.mlp.up_proj", "A"),)
    assert grouped.unparsed == ("lm_head.weight",)
    assert pf.weight_key(Q0, "A", prefixed=True) == f"base_model.model.{Q0}.lora_A.weight"
    assert not grouped.dora


def test_pair_tensors_keeps_dora_magnitudes_apart():
    up = "model.layers.1.mlp.up_proj"
    grouped = pf.pair_tensors({
        f"{Q0}.lora_A.weight": 1, f"{Q0}.lora_B.weight": 2, f"{Q0}.lora_magnitude_vector": 3,
        f"{up}.lora_magnitude_vector": 4})
    assert grouped.pairs == {Q0: (1, 2)} and grouped.unparsed == ()
    assert grouped.magnitudes == {Q0: 3, up: 4} and grouped.dora
    assert grouped.incomplete == ((up, "A"), (up, "B"))  # a magnitude alone is no adapter


# ------------------------------------------------------------------------------ target modules

# (target_modules, extra LoraConfig fields, module, wrapped by peft?)
TARGET_CASES = [
    (["q_proj", "v_proj"], {}, Q0, True),  # leaf name: dotted suffix
    (["self_attn.q_proj"], {}, Q0, True),  # a longer suffix
    (["proj"], {}, Q0, False),  # not at a dot boundary
    ([Q0], {}, Q0, True),  # the whole path
    ("q_proj", {}, Q0, False),  # a string is a regex over the WHOLE path
    (r".*\.q_proj", {}, Q0, True),
    (r".*layers\.1\..*_proj", {}, Q0, False),
    (["all-linear"], {}, Q0, False),  # the shorthand is only the whole string
    (["q_proj"], {"exclude_modules": ["layers.0.self_attn.q_proj"]}, Q0, False),
    ("all-linear", {"exclude_modules": r".*\.q_proj"}, Q0, False),
    (["q_proj"], {"layers_to_transform": [1]}, Q0, False),
    (["q_proj"], {"layers_to_transform": 0}, Q0, True),
    (["q_proj"], {"layers_to_transform": [0], "layers_pattern": "layers"}, Q0, True),
    (["q_proj"], {"layers_to_transform": [0], "layers_pattern": "h"}, Q0, False),
    ([Q0], {"layers_to_transform": [1]}, Q0, True),  # named exactly: no layer filter
]


def _peft_wraps(targets, extra, module) -> bool:
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists

    got = check_target_module_exists(LoraConfig(target_modules=targets, **extra), module)
    return bool(got) and not isinstance(got, _ExcludedModule)


@pytest.mark.parametrize(("targets", "extra", "module", "want"), TARGET_CASES)
def test_target_matching_is_peft_s(targets, extra, module, want):
    spec = pf.parse_targets(targets, extra.get("exclude_modules"),
                            extra.get("layers_to_transform"), extra.get("layers_pattern"))
    assert spec.matches(module, LLAMA) is want
    if not (isinstance(targets, str) and targets == "all-linear"):  # peft expands it first
        assert _peft_wraps(targets, extra, module) is want


def test_all_linear_is_every_linear_layer_but_the_output_head(base_factory):
    """Our all-linear set equals peft's own expansion, on two architectures."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
    from transformers import AutoModelForCausalLM

    for arch in ("llama", "gpt2"):
        model = AutoModelForCausalLM.from_pretrained(base_factory("micro", arch))
        ours = pf.linear_modules(model)
        theirs = _maybe_include_all_linear_layers(LoraConfig(target_modules="ALL-Linear"), model)
        assert set(ours) == set(theirs.target_modules), arch
        assert "lm_head" not in ours and len(ours) == (14 if arch == "llama" else 8)
        spec = pf.parse_targets("ALL-Linear")
        assert spec.all_linear and spec.select(ours) == list(ours)
    assert pf.leaf_names(LLAMA) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                    "up_proj", "v_proj"]


@pytest.mark.parametrize(("args", "field"), [
    (([],), "target_modules"),
    ((None,), "target_modules"),
    (("q_proj(",), "target_modules"),
    (([""],), "target_modules"),
    ((["q_proj"], "(("), "exclude_modules"),
    ((["q_proj"], None, [-1]), "layers_to_transform"),
    ((["q_proj"], None, [0], 3), "layers_pattern"),
])
def test_bad_target_fields_name_the_field(args, field):
    with pytest.raises(InvalidArgument) as e:
        pf.parse_targets(*args)
    assert e.value.field == field


# ------------------------------------------------------------------------------ rank, alpha, scale

@pytest.mark.parametrize(("patterns", "module", "want"), [
    (["q_proj"], Q0, "q_proj"),
    (["self_attn.q_proj"], Q0, "self_attn.q_proj"),
    (["layers.0.self_attn.q_proj"], Q0, "layers.0.self_attn.q_proj"),
    (["proj"], Q0, None),  # not at a dot boundary
    (["v_proj", r".*\.q_proj", "q_proj"], Q0, r".*\.q_proj"),  # first match wins
    ([r"layers\.1\..*"], Q0, None),
])
def test_pattern_key_is_peft_s(patterns, module, want):
    from peft.utils.other import get_pattern_key

    assert pf.pattern_key(patterns, module) == want
    assert get_pattern_key(patterns, module) == (module if want is None else want)


@pytest.mark.parametrize(("r", "alpha", "rslora", "want"), [
    (8, 16, False, 2.0), (16, 8, True, 2.0), (4, 3, False, 0.75), (1, 8, True, 8.0)])
def test_lora_scale(r, alpha, rslora, want):
    assert pf.lora_scale(r, alpha, rslora) == want


@pytest.mark.parametrize("r", [0, -1, 2.5, True, None])
def test_bad_rank_is_refused_by_field(r):
    with pytest.raises(InvalidArgument) as e:
        pf.LoraScaling(r, 8)
    assert e.value.field == "r"


@pytest.mark.parametrize("rslora", [False, True])
def test_per_module_scales_equal_peft_s_layers(micro_base, rslora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = {"r": 4, "lora_alpha": 8, "use_rslora": rslora, "target_modules": "all-linear",
              "rank_pattern": {"q_proj": 2, r"layers\.1\.mlp\..*": 8},
              "alpha_pattern": {"down_proj": 32, "layers.0.self_attn.v_proj": 5}}
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(micro_base), LoraConfig(**config))
    scaling = pf.LoraScaling.from_config(config)
    seen = 0
    for name, mod in model.named_modules():
        if isinstance(getattr(mod, "scaling", None), dict) and "default" in mod.scaling:
            module = name.removeprefix("base_model.model.")
            assert scaling.rank(module) == mod.r["default"], module
            assert scaling.scale(module) == pytest.approx(mod.scaling["default"], rel=1e-12)
            seen += 1
    assert seen == 14 and scaling.rank(Q0) == 2 and scaling.alpha_of(Q0) == 8


# ------------------------------------------------------------------------------ loading tables

def test_dtype_and_quantization_tables():
    assert pf.compute_dtype("bfloat16") is torch.bfloat16
    assert pf.compute_dtype(torch.float16) is torch.float16
    for bad in ("float64", torch.float64, "fp16"):
        with pytest.raises(InvalidArgument) as e:
            pf.compute_dtype(bad)
        assert e.value.field == "compute_dtype"
    assert pf.bnb_config("none", torch.float32) is None
    nf4 = pf.bnb_config("nf4", torch.float32)
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4"
    assert nf4.bnb_4bit_use_double_quant and nf4.bnb_4bit_compute_dtype is torch.float32
    assert pf.bnb_config("int8", torch.float32).load_in_8bit
    with pytest.raises(InvalidArgument) as e:
        pf.bnb_config("fp4", torch.float32)
    assert e.value.field == "quantization"


# ------------------------------------------------------------------------------ the registry

def _upload(config: dict, tensors: dict[str, torch.Tensor]) -> tuple[bytes, bytes]:
    base = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "bias": "none"}
    return json.dumps(base | config).encode(), save(tensors)


def _pair(module: str, fan_in: int, fan_out: int, r: int = 2) -> dict[str, torch.Tensor]:
    return {f"base_model.model.{module}.lora_A.weight": torch.ones(r, fan_in),
            f"base_model.model.{module}.lora_B.weight": torch.ones(fan_out, r)}


@pytest.mark.parametrize(("config", "modules", "problem"), [
    ({"target_modules": "ALL-LINEAR"}, [Q0, "model.layers.1.mlp.down_proj"], None),
    ({"target_modules": "all-linear"}, ["lm_head"], "not a linear layer of the base"),
    ({"target_modules": ["lm_head"]}, ["lm_head"], "not a linear layer of the base"),
    ({"target_modules": "all-linear", "exclude_modules": ["q_proj"]}, [Q0],
     "not among target_modules"),
    ({"target_modules": ["q_proj"], "layers_to_transform": [1]}, [Q0],
     "not among target_modules"),
    ({"target_modules": ["q_proj"], "rank_pattern": {"q_proj": 2}, "r": 8}, [Q0], None),
])
def test_registry_accepts_what_peft_and_the_runtime_serve(micro_base, config, modules,
                                                          problem):
    from loraplex.fingerprint import fingerprint_base
    from loraplex.registry.settings import RegistrySettings
    from loraplex.registry.validation import validate

    fp = fingerprint_base(micro_base)
    shapes = fp.linear_shapes | {"lm_head": (64, 259)}
    tensors = {k: v for m in modules for k, v in _pair(m, *shapes[m]).items()}
    args = (*_upload(config, tensors), fp, RegistrySettings())
    if problem is None:
        assert validate(*args).target_modules == tuple(pf.leaf_names(modules))
    else:
        with pytest.raises(ValidationFailed) as e:
            validate(*args)
        assert problem in str(e.value)


# ------------------------------------------------------------------------------ all-linear, end to end

@torch.no_grad()
def _peft_greedy(peft_model, prompt: list[int], n: int, eos: int) -> list[int]:
    ids, out = list(prompt), []
    for _ in range(n):
        t = int(peft_model(torch.tensor([ids])).logits[0, -1].argmax())
        if t == eos:
            break
        out.append(t)
        ids.append(t)
    return out


def test_all_linear_adapters_are_served_token_for_token_as_peft(micro_base, tmp_path):
    """An adapter made by peft with target_modules="all-linear" (saved expanded, and again
    with the shorthand kept in its config) registers, and an engine that wraps "all-linear"
    serves both exactly as peft alone computes them."""
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loraplex.basemodel import EOS_ID
    from loraplex.registry import Identity, Registry
    from loraplex.runtime.engine.engine import Engine, EngineConfig, SamplingParams

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(micro_base, dtype=torch.float32).eval()
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                          init_lora_weights=False, lora_dropout=0.0))
    with torch.no_grad():  # a B large enough to move greedy tokens
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(4.0)
    pm.eval().save_pretrained(tmp_path / "expanded")
    shutil.copytree(tmp_path / "expanded", tmp_path / "shorthand")
    cfg_path = tmp_path / "shorthand" / "adapter_config.json"
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | {
        "target_modules": "all-linear"}))
    reg = Registry.open(tmp_path / "reg")
    reg.register_base(Identity.system(), micro_base)
    for name in ("expanded", "shorthand"):
        v = reg.push(Identity("acme"), tmp_path / name, f"acme/{name}", base=micro_base)
        assert len(v.target_modules) == 7
    prompts = [[5, 6, 7], [40, 41, 42, 43, 44]]
    engine = Engine(EngineConfig(base_dir=micro_base, quantization="none", device="cpu",
                                 target_modules="all-linear", max_slots=2, max_rank=8,
                                 max_batch=4), reg).start()
    try:
        streams = {(name, i): engine.submit(engine.admit(
            f"{name}{i}", Identity("acme"), f"acme/{name}", prompt_ids=p,
            sampling=SamplingParams(max_new_tokens=8)))
            for name in ("expanded", "shorthand") for i, p in enumerate(prompts)}
        got = {k: s.wait(60).token_ids for k, s in streams.items()}
    finally:
        engine.shutdown()
    want = [_peft_greedy(pm, p, 8, EOS_ID) for p in prompts]
    with pm.disable_adapter():
        plain = [_peft_greedy(pm, p, 8, EOS_ID) for p in prompts]
    assert want != plain  # the adapter really changes the output
    assert got == {(name, i): want[i] for name, i in got}


def test_trainer_passes_all_linear_to_peft(micro_base):
    from loraplex.trainer.config import TrainConfig
    from loraplex.trainer.model import linear_target_modules, load_base, wrap_lora

    cfg = TrainConfig(base=str(micro_base), data="x.jsonl", name="acme/a",
                      target_modules="ALL-LINEAR", quantization="none", r=8, alpha=16,
                      dropout=0.0)  # the rank the automatic recipe would otherwise choose
    assert cfg.target_modules == "all-linear"
    model, _ = load_base(micro_base, cfg)
    assert linear_target_modules(model) == pf.leaf_names(LLAMA)
    wanted = set(pf.linear_modules(model))
    peft_model = wrap_lora(model, cfg)
    wrapped = {n.removeprefix("base_model.model.").removesuffix(".lora_A")
               for n, _ in peft_model.named_modules() if n.endswith(".lora_A")}
    assert wrapped == wanted == set(LLAMA)

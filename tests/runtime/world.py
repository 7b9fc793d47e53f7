"""Helpers shared by the engine tests (no tests here): real peft adapters in a real registry.

Adapters are made with `get_peft_model(..., init_lora_weights=False)`, so lora_B is random
and every adapter changes the output; the reference for a request is peft with only that
adapter active (or adapters disabled), run alone, greedy, by full forwards without a cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.registry import Identity, Registry

# (name, r, alpha, use_rslora, subset of target leaf names or None = all[, LoraConfig extras,
# e.g. {"use_dora": True}])
SPECS = [
    ("a1", 2, 4, False, None),
    ("a2", 8, 16, True, None),
    ("a3", 4, 3, False, ("q_proj", "v_proj", "c_attn")),
    ("a4", 1, 8, False, None),
    ("a5", 16, 32, False, None),
    ("a6", 3, 6, False, ("mlp",)),
    ("a7", 6, 12, True, None),
    ("a8", 5, 5, False, None),
    ("a9", 12, 8, False, None),
]


@dataclass
class World:
    base_dir: Path
    registry: Registry
    peft_model: object  # PeftModel with every SPECS adapter
    names: list[str]  # adapter names in the peft model, also `acme/<name>` in the registry
    dirs: dict[str, Path]  # adapter name -> its saved peft directory


def _targets(model) -> list[str]:
    from loraplex.runtime.lora.layers import default_target_modules

    return default_target_modules(model)


def load_fp32(base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def make_world(base_dir: Path, root: Path, specs=SPECS, tenant: str = "acme",
               model=None, seed: int = 0) -> World:
    """Push every spec as `<tenant>/<name>` into a fresh registry under `root`."""
    from peft import LoraConfig, get_peft_model

    model = model if model is not None else load_fp32(base_dir)
    targets = _targets(model)
    torch.manual_seed(seed)
    reg = Registry.open(root / "registry")
    reg.register_base(Identity.system(), base_dir)
    peft_model = None
    dirs: dict[str, Path] = {}
    for name, r, alpha, rslora, subset, *extra in specs:
        tm = targets if subset is None else [t for t in targets if any(s in t for s in subset)]
        tm = tm or targets
        cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=tm,
                         init_lora_weights=False, lora_dropout=0.0, **(extra[0] if extra else {}))
        if peft_model is None:
            peft_model = get_peft_model(model, cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
        with torch.no_grad():  # make B large enough that adapters move greedy tokens
            for n, p in peft_model.named_parameters():
                if f"lora_B.{name}." in n:
                    p.mul_(4.0)
                elif f"lora_magnitude_vector.{name}." in n:  # DoRA: a factor != 1 per feature
                    p.mul_(0.5 + torch.rand_like(p))
        out = root / "adapters" / name
        peft_model.save_pretrained(out, selected_adapters=[name])
        adir = out / name if (out / name).is_dir() else out
        cfg_path = adir / "adapter_config.json"
        data = json.loads(cfg_path.read_text())
        data["base_model_name_or_path"] = str(base_dir)
        cfg_path.write_text(json.dumps(data))
        reg.push(Identity(tenant), adir, f"{tenant}/{name}", base=base_dir)
        dirs[name] = adir
    return World(base_dir, reg, peft_model.eval(), [s[0] for s in specs], dirs)


@torch.no_grad()
def reference_greedy(world: World, adapter: str | None, prompt: list[int], n: int,
                     eos: int | None = None) -> list[int]:
    """peft, only `adapter` active (None = adapters disabled), alone, greedy, no cache."""
    pm = world.peft_model
    ids = list(prompt)
    out: list[int] = []

    def step():
        return int(pm(torch.tensor([ids])).logits[0, -1].argmax())

    for _ in range(n):
        if adapter is None:
            with pm.disable_adapter():
                t = step()
        else:
            pm.set_adapter(adapter)
            t = step()
        if eos is not None and t == eos:
            break
        out.append(t)
        ids.append(t)
    return out

"""SVD compression against a dense reference, and merges against peft's add_weighted_adapter.

Dense references (torch.linalg.svd of the materialised ΔW) are what the factored code must
equal; peft itself (loaded adapters + `add_weighted_adapter`) is what the merges must equal.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from loraplex.errors import InvalidArgument
from loraplex.peft_format import PEFT_PREFIX
from loraplex.registry import algebra

A_KEY = "m.layers.{}.q_proj.lora_A.weight"
B_KEY = "m.layers.{}.q_proj.lora_B.weight"


def _adapter(ranks=(6, 6), fan=(40, 30), seed=0, alpha=12.0):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, r in enumerate(ranks):
        tensors[A_KEY.format(i)] = torch.randn(r, fan[0], generator=g)
        tensors[B_KEY.format(i)] = torch.randn(fan[1], r, generator=g)
    cfg = {"peft_type": "LORA", "r": ranks[0], "lora_alpha": alpha,
           "target_modules": ["q_proj"], "rank_pattern": {}, "alpha_pattern": {}}
    return cfg, tensors


def _delta(cfg, tensors):
    """Dense ΔW per module path, with the scale the config's fields give (peft's rule)."""
    return {p: m.scale * m.b.double() @ m.a.double()
            for p, m in algebra.modules_of(cfg, tensors).items()}


def test_factored_svd_equals_dense_svd():
    cfg, ts = _adapter()
    m = algebra.modules_of(cfg, ts)["m.layers.0.q_proj"]
    dense = m.scale * m.b.double() @ m.a.double()  # [out, in]
    u, s, vh = algebra.factored_svd(m.a, m.b, m.scale)
    assert torch.allclose(s, torch.linalg.svdvals(dense)[:6], rtol=1e-10)
    assert torch.allclose(u @ torch.diag(s) @ vh, dense, atol=1e-10)
    assert torch.allclose(u.T @ u, torch.eye(6, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_compress_error_is_the_norm_of_the_discarded_singular_values(k):
    cfg, ts = _adapter()
    d = algebra.compress(cfg, ts, rank=k)
    before, after = _delta(cfg, ts), _delta(d.config, d.tensors)
    for path, dw in before.items():
        s = torch.linalg.svdvals(dw)  # [min(out, in)]
        err = torch.linalg.matrix_norm(dw - after[path])
        assert float(err) == pytest.approx(float(s[k:].norm()), rel=1e-5)
        assert d.modules[path]["rank"] == k
        assert d.modules[path]["energy_kept"] == pytest.approx(
            float((s[:k] ** 2).sum() / (s ** 2).sum()), abs=1e-6)
    assert d.config["r"] == k and d.config["lora_alpha"] == k and not d.config["rank_pattern"]


def test_energy_selection_per_module_and_global():
    spectra = {"x": torch.tensor([3.0, 2.0, 1.0, 0.1]), "y": torch.tensor([0.5, 0.5, 0.5])}
    # x: energies 9, 4, 1, .01 (total 14.01): 9/14.01 = .642, 13/14.01 = .928, 14/14.01 = .999
    assert algebra.ranks_for_energy(spectra, 0.90) == {"x": 2, "y": 3}
    assert algebra.ranks_for_energy(spectra, 0.60) == {"x": 1, "y": 2}
    assert algebra.ranks_for_energy(spectra, 1.0) == {"x": 4, "y": 3}
    # global: pool 9, 4, 1, .25, .25, .25, .01 (total 14.76); 0.9 needs 9 + 4 (13.0 = .881)
    # + 1 (14.0 = .949): x keeps 3, y none of its own but at least 1
    assert algebra.ranks_for_energy(spectra, 0.90, scope="global") == {"x": 3, "y": 1}
    with pytest.raises(InvalidArgument):
        algebra.ranks_for_energy(spectra, 1.5)


def test_energy_compression_writes_rank_and_alpha_patterns_that_keep_the_scale():
    g = torch.Generator().manual_seed(1)
    cfg, ts = _adapter()
    # module 1: nearly rank 2 (plus noise); module 0: full rank 6
    ts[B_KEY.format(1)] = torch.randn(30, 2, generator=g) @ torch.randn(2, 6, generator=g) \
        + 1e-3 * torch.randn(30, 6, generator=g)
    d = algebra.compress(cfg, ts, energy=0.99)
    assert d.modules["m.layers.1.q_proj"]["rank"] == 2
    assert d.modules["m.layers.0.q_proj"]["rank"] > 2
    key = "m\\.layers\\.1\\.q_proj"
    assert d.config["rank_pattern"] == {key: 2} and d.config["alpha_pattern"] == {key: 2}
    before, after = _delta(cfg, ts), _delta(d.config, d.tensors)
    for p in before:  # the kept share of energy really is kept
        kept = 1 - (before[p] - after[p]).norm() ** 2 / before[p].norm() ** 2
        assert float(kept) >= 0.99 - 1e-9


# --------------------------------------------------------------------- against peft
def _save(base, out, seed, r=4, targets=("q_proj", "v_proj"), alpha=None):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                       LoraConfig(r=r, lora_alpha=alpha or 2 * r, target_modules=list(targets),
                                  init_lora_weights=False))
    m.save_pretrained(out)
    return out


def _ours(path):
    cfg = json.loads((path / "adapter_config.json").read_text())
    ts = {k.removeprefix(PEFT_PREFIX): v
          for k, v in load_file(path / "adapter_model.safetensors").items()}
    return cfg, ts


@pytest.fixture(scope="module")
def pair(micro_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("algebra")
    a = _save(micro_base, root / "a", seed=1, targets=("q_proj", "v_proj"))
    b = _save(micro_base, root / "b", seed=2, targets=("q_proj", "o_proj"), alpha=3)
    return micro_base, a, b


def _peft_merge(pair, method, weights, **kw):
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base, a, b = pair
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), a,
                                      adapter_name="a")
    model.load_adapter(b, adapter_name="b")
    model.add_weighted_adapter(["a", "b"], weights, "m", combination_type=method, **kw)
    sd = get_peft_model_state_dict(model, adapter_name="m")
    return {k.removeprefix(PEFT_PREFIX): v for k, v in sd.items()}, model


@pytest.mark.parametrize("method,kw", [("linear", {}), ("cat", {}),
                                       ("ties", {"density": 0.5})])
def test_merge_factors_equal_peft(pair, method, kw):
    want, _ = _peft_merge(pair, method, [0.7, 1.3], **kw)
    d = algebra.merge([_ours(pair[1]), _ours(pair[2])], [0.7, 1.3], method, **kw)
    assert set(d.tensors) == set(want)
    for k, t in want.items():
        assert torch.allclose(d.tensors[k], t, atol=1e-6), k
    # the merged adapter's scale is 1, as peft's (r == lora_alpha)
    assert d.config["r"] == d.config["lora_alpha"] == want[next(iter(want))].shape[0]


def test_svd_merge_equals_peft_delta(pair):
    want, model = _peft_merge(pair, "svd", [0.7, -1.3], svd_rank=3)
    d = algebra.merge([_ours(pair[1]), _ours(pair[2])], [0.7, -1.3], "svd", svd_rank=3)
    assert set(d.tensors) == set(want) and d.config["r"] == 3
    for k in want:
        if k.endswith("lora_A.weight"):
            kb = k.replace("lora_A", "lora_B")
            ours = d.tensors[kb] @ d.tensors[k]  # [out, in]; scale 1
            assert torch.allclose(ours, want[kb] @ want[k], atol=1e-5), k


def test_dare_keeps_peft_deterministic_parts(pair):
    """DARE draws a random mask: compare what does not depend on the draw."""
    ours = [_ours(pair[1]), _ours(pair[2])]
    full = algebra.merge(ours, [0.7, 1.3], "dare_linear", density=1.0)
    lin = algebra.merge(ours, [0.7, 1.3], "linear")
    for k in lin.tensors:  # density 1 keeps everything: dare_linear == linear
        assert torch.allclose(full.tensors[k], lin.tensors[k])
    want, _ = _peft_merge(pair, "dare_linear", [1.0, 0.0], density=0.5)
    d = algebra.merge(ours, [1.0, 0.0], "dare_linear", density=0.5, seed=3)
    again = algebra.merge(ours, [1.0, 0.0], "dare_linear", density=0.5, seed=3)
    for k, t in want.items():
        assert torch.equal(d.tensors[k], again.tensors[k])  # seeded: reproducible
        # weight 1 on adapter a only: every entry is 0 or the same rescaled value as peft's
        both = (d.tensors[k] != 0) & (t != 0)
        assert torch.allclose(d.tensors[k][both], t[both], atol=1e-6)
        if k.startswith("model.layers.0.self_attn.q_proj"):  # a and b both there
            kept = float((d.tensors[k] != 0).float().mean())
            assert 0.35 < kept < 0.65
    with pytest.raises(InvalidArgument):
        algebra.merge(ours, [1.0, 1.0], "dare_ties")  # density is required


def test_merge_refuses_mixed_ranks_for_linear(pair, tmp_path):
    c = _save(pair[0], tmp_path / "c", seed=3, r=8)
    with pytest.raises(InvalidArgument, match="one rank"):
        algebra.merge([_ours(pair[1]), _ours(c)], [1, 1], "linear")
    d = algebra.merge([_ours(pair[1]), _ours(c)], [1, 1], "cat")
    assert d.config["r"] == 12

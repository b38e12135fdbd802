"""K-Adapter: starts as the base, trains only the adapter, stays causal, saves and loads."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ckl_toolkit.training.kadapter import CONFIG_FILE, KAdapterConfig, KAdapterModel, load_adapter


def _base(layers: int = 4, hidden: int = 32, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        initializer_range=0.2,  # an LM head big enough for the 0.1-scaled fusion to move logits soon
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    return ids, mask


def _adapter_model(base: LlamaForCausalLM) -> KAdapterModel:
    torch.manual_seed(1)
    return KAdapterModel(base, KAdapterConfig(adapter_hidden=16, num_heads=2, block_layers=1))


def _train(model: KAdapterModel, steps: int) -> list[float]:
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-2)
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(ids, mask, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_initial_logits_equal_the_base():
    base = _base()
    model = _adapter_model(base)
    ids, mask = _batch()
    expected = base(input_ids=ids, attention_mask=mask).logits
    for mode in (True, False):  # dropout in the adapter must not matter at init either
        model.train(mode)
        assert torch.equal(model(ids, mask).logits, expected)
    assert model.layers == [0, 2, 3]  # [0, n//2, n-1] for n = 4


def test_only_adapter_trains_and_loss_drops():
    base = _base()
    model = _adapter_model(base)
    base_before = {k: v.clone() for k, v in base.state_dict().items()}
    adapter_before = {k: v.clone() for k, v in model.adapter.state_dict().items()}
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.adapter.parameters()}
    assert not any(p.requires_grad for p in base.parameters())

    losses = _train(model, 30)

    assert losses[-1] < 0.9 * losses[0]  # slow by design (fused through LayerNorm · 0.1), but learning
    assert not base.training  # the frozen base runs without dropout even in model.train()
    assert all(p.grad is None for p in base.parameters())
    for k, v in base.state_dict().items():
        assert torch.equal(v, base_before[k]), k
    changed = [k for k, v in model.adapter.state_dict().items() if not torch.equal(v, adapter_before[k])]
    assert len(changed) == len(adapter_before)  # every adapter tensor learned


def test_adapter_is_causal():
    model = _adapter_model(_base())
    _train(model, 3)  # a non-trivial adapter: its output now reaches the logits
    model.eval()
    ids, mask = _batch()
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 64
    a, b = model(ids, mask).logits, model(changed, mask).logits
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 6:], b[:, 6:])
    assert not torch.allclose(a, model.base(input_ids=ids, attention_mask=mask).logits)


def test_save_load_round_trip(tmp_path):
    base = _base()
    model = _adapter_model(base)
    _train(model, 3)
    model.eval()
    ids, mask = _batch()
    expected = model(ids, mask).logits
    model.save_adapter(tmp_path / "kadapter")

    sidecar = json.loads((tmp_path / "kadapter" / CONFIG_FILE).read_text())
    assert sidecar["config"]["layers"] == [0, 2, 3] and sidecar["config"]["dropout"] == 0.1
    loaded = load_adapter(base, tmp_path / "kadapter")
    loaded.eval()
    assert torch.equal(loaded(ids, mask).logits, expected)
    with pytest.raises(ValueError, match="hidden_size"):
        load_adapter(_base(hidden=48), tmp_path / "kadapter")
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        load_adapter(base, tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"layers": [3, 1]}, "layers"), ({"layers": []}, "layers"), ({"dropout": 1.0}, "dropout"),
     ({"adapter_hidden": 30, "num_heads": 4}, "adapter_hidden"), ({"block_layers": 0}, "block_layers")],
)  # fmt: skip
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        KAdapterConfig(**kwargs)


def test_layers_out_of_range_are_refused():
    with pytest.raises(ValueError, match="kadapter.layers"):
        KAdapterModel(_base(layers=2), KAdapterConfig(layers=[0, 2]))

import torch

from ckl_toolkit.core.losses import masked_mean_nll, target_mask, token_nll_from_logits, weighted_loss


def test_weighted_loss_per_sequence_normalisation_then_batch_mean():
    nll = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])
    w = torch.tensor([[1.0, 0.0, 1.0], [0.5, 0.5, 0.9]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    got = weighted_loss(nll, w, mask)
    row0 = (1 * 1 + 3 * 1) / (2 + 1e-6)
    row1 = (0.5 * 4 + 0.5 * 5) / (1.0 + 1e-6)  # the padded position's weight 0.9 must not count
    torch.testing.assert_close(got, torch.tensor((row0 + row1) / 2))


def test_uniform_weights_equal_plain_mean_nll():
    torch.manual_seed(0)
    nll = torch.rand(3, 7)
    mask = torch.ones(3, 7, dtype=torch.bool)
    torch.testing.assert_close(weighted_loss(nll, torch.ones(3, 7), mask), nll.mean(), rtol=1e-5, atol=1e-6)


def test_unnormalised_camels_form_scales_with_weights():
    nll = torch.ones(1, 4)
    mask = torch.ones(1, 4, dtype=torch.bool)
    half = weighted_loss(nll, torch.full((1, 4), 0.5), mask, normalize=False)
    full = weighted_loss(nll, torch.ones(1, 4), mask, normalize=False)
    torch.testing.assert_close(half * 2, full)
    # the normalised form is invariant to a global scale of the weights
    torch.testing.assert_close(
        weighted_loss(nll, torch.full((1, 4), 0.5), mask), torch.tensor(1.0), rtol=1e-5, atol=0
    )


def test_token_nll_masks_padding_and_matches_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    attn = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    nll = token_nll_from_logits(logits, ids, attn)
    assert nll.shape == (2, 4)
    assert torch.all(nll[1, 2:] == 0)
    ref = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
    torch.testing.assert_close(nll[0], ref)
    assert target_mask(attn).tolist() == [[True] * 4, [True, True, False, False]]


def test_masked_mean_nll():
    nll = torch.tensor([[1.0, 2.0, 3.0], [4.0, 6.0, 8.0]])
    mask = torch.tensor([[False, True, True], [True, False, False]])
    torch.testing.assert_close(masked_mean_nll(nll, mask), torch.tensor((2.5 + 4.0) / 2))


# ---------------------------------------------------------------------------------------------
# The chunked loss: the LM head and cross-entropy over a few targets at a time, never the full logits


def _models(tiny_lm_dir):
    """The three target kinds the update trains, each in train mode with its trainable subset."""
    from transformers import AutoModelForCausalLM

    from ckl_toolkit.core.models import LoraSpec, add_lora
    from ckl_toolkit.training.kadapter import KAdapterConfig, KAdapterModel

    def base():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_pretrained(tiny_lm_dir, attn_implementation="eager")

    lora = add_lora(base(), LoraSpec(r=4, alpha=8))
    for name, p in lora.named_parameters():  # B starts at 0: give it values so its gradient path is tested
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    kadapter = KAdapterModel(base(), KAdapterConfig(adapter_hidden=16, dropout=0.0))
    torch.nn.init.normal_(kadapter.adapter.fuse_norm.weight, std=0.5)  # not the identity at init
    return {"full": base().train(), "lora": lora.train(), "kadapter": kadapter.train()}


def _batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 11), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 7:] = 0  # padding
    attn[2, 4:] = 0
    return ids, attn


def test_chunked_token_nll_equals_the_full_logits_path_with_equal_gradients(tiny_lm_dir):
    from ckl_toolkit.core.losses import lm_trunk_and_head, token_nll

    for kind, model in _models(tiny_lm_dir).items():
        assert lm_trunk_and_head(model) is not None, kind  # the chunked path really runs
        ids, attn = _batch(model.get_output_embeddings().out_features if kind != "kadapter" else 250)
        w = torch.rand(ids.size(0), ids.size(1) - 1, generator=torch.Generator().manual_seed(1))
        results = []
        for chunk in (0, 4):  # 0: today's full (B, T, V) logits; 4: 4 targets per chunk (several chunks)
            model.zero_grad(set_to_none=True)
            nll = token_nll(model, ids, attn, chunk_tokens=chunk)
            loss = weighted_loss(nll, w, target_mask(attn))
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results.append((nll.detach(), loss.detach(), grads))
        (nll0, loss0, g0), (nll1, loss1, g1) = results
        assert nll0.shape == nll1.shape == (3, 10) and torch.all(nll1[~target_mask(attn)] == 0), kind
        torch.testing.assert_close(nll1, nll0, rtol=0, atol=1e-6, msg=kind)
        torch.testing.assert_close(loss1, loss0, rtol=0, atol=1e-6, msg=kind)
        assert g0.keys() == g1.keys() and g0, kind
        for name in g0:
            torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-6, msg=f"{kind}: {name}")


def test_chunked_reference_forward_without_grad_equals_full(tiny_lm_dir):
    """RHO-1's reference runs under no_grad: the chunked path must not need autograd."""
    from ckl_toolkit.core.losses import token_nll

    model = _models(tiny_lm_dir)["full"].eval()
    ids, attn = _batch(model.config.vocab_size, seed=3)
    with torch.no_grad():
        full, chunked = token_nll(model, ids, attn), token_nll(model, ids, attn, chunk_tokens=5)
    assert not chunked.requires_grad
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-6)


def test_models_whose_logits_are_not_a_plain_head_take_the_full_path(tiny_lm_dir):
    from ckl_toolkit.core.losses import lm_trunk_and_head

    model = _models(tiny_lm_dir)["full"]
    assert lm_trunk_and_head(model) is not None
    model.config.final_logit_softcapping = 30.0  # e.g. Gemma-2: logits = cap·tanh(head/cap)
    assert lm_trunk_and_head(model) is None

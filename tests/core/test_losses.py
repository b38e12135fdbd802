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

"""One meta-step through an engine moves φ by the exact meta-gradient of the second-order reference."""

import torch
from torch import nn

from ckl_toolkit.metalearn.episodes import EpisodeBatch
from ckl_toolkit.metalearn.metagrad import InnerStepConfig, MetaGradConfig
from ckl_toolkit.metalearn.step import meta_step
from ckl_toolkit.training.engine import PlainEngine
from tests.metalearn.reference_metagrad import exact_fp64_llama, reference_meta_gradient

VOCAB, B, T, TT = 64, 2, 10, 8


class EmbeddingPhi(nn.Module):
    """A tiny φ with TrainAttentionModel's interface: (ids, mask) -> (B, T) weights in (0, 1)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 1, dtype=torch.float64)
        nn.init.normal_(self.emb.weight, 1.0, 1.0, generator=torch.Generator().manual_seed(3))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.emb(ids).squeeze(-1))


def episodes() -> EpisodeBatch:
    g = torch.Generator().manual_seed(1)
    doc_mask = torch.ones(B, T, dtype=torch.long)
    doc_mask[1, 7:] = 0
    task_obj = torch.zeros(B, TT - 1, dtype=torch.bool)
    task_obj[0, 3:5], task_obj[1, 4:7] = True, True
    doc_ids = torch.randint(0, VOCAB, (B, T), generator=g)
    task_ids = torch.randint(0, VOCAB, (B, TT), generator=g)
    doc_obj = torch.zeros(B, T - 1, dtype=torch.bool)
    doc_obj[:, 2:4] = True
    return EpisodeBatch(doc_ids, doc_mask, doc_obj, task_ids, torch.ones(B, TT, dtype=torch.long), task_obj)


def test_meta_step_moves_phi_by_the_reference_meta_gradient():
    base, batch = exact_fp64_llama(vocab=VOCAB), episodes()
    params = {n: p for n, p in base.named_parameters()}
    cfg = MetaGradConfig(inner=InnerStepConfig(optimizer="sgd", lr=0.3), method="jvp", mode="independent")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    phi = EmbeddingPhi()
    start = phi.emb.weight.detach().clone()
    engine = PlainEngine(phi, dict(phi.named_parameters()), torch.optim.SGD(phi.parameters(), lr=1.0), 0.0)

    res = meta_step(engine, base, params, batch, cfg)
    moved = start - phi.emb.weight.detach()  # SGD at lr 1: exactly the gradient φ was given

    phi0 = EmbeddingPhi()  # φ at its start
    doc, task = (batch.doc_ids, batch.doc_mask), (batch.task_ids, batch.task_mask, batch.task_obj)
    ref, ref_loss = reference_meta_gradient(base, params, *doc, phi0(*doc)[:, 1:], *task, cfg=cfg)
    w0 = phi0(*doc)[:, 1:]  # (B, T-1)
    expected = torch.autograd.grad((w0 * ref).sum(), phi0.emb.weight)[0]  # dL/dφ by the chain rule through w
    assert expected.abs().max() > 0
    assert ((moved - expected).abs().max() / expected.abs().max()).item() < 1e-9
    assert abs(res.grad_norm / float(expected.norm()) - 1) < 1e-9
    assert abs(res.outer_loss - ref_loss) < 1e-9 * abs(ref_loss)
    assert torch.equal(res.w, w0.detach()) and not res.w.requires_grad
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # θ left as found


class SurprisePhi(EmbeddingPhi):
    """A tiny φ that also reads the target's per-token loss, as ``ta.surprise`` does."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(-0.5, dtype=torch.float64))

    def forward(self, ids, mask, position_ids=None, target_nll=None):
        s = torch.cat([torch.zeros_like(target_nll[:, :1]), torch.log1p(target_nll)], dim=1)  # (B, T)
        return torch.sigmoid(self.emb(ids).squeeze(-1) + self.a * s)


def test_surprise_meta_step_feeds_theta_loss_and_stays_exact():
    from ckl_toolkit.core.losses import token_nll

    base, batch = exact_fp64_llama(vocab=VOCAB), episodes()
    params = {n: p for n, p in base.named_parameters()}
    cfg = MetaGradConfig(inner=InnerStepConfig(optimizer="sgd", lr=0.3), method="jvp", mode="batched")
    phi = SurprisePhi()
    engine = PlainEngine(phi, dict(phi.named_parameters()), torch.optim.SGD(phi.parameters(), lr=1.0), 0.0)
    start = {n: p.detach().clone() for n, p in phi.named_parameters()}
    meta_step(engine, base, params, batch, cfg, surprise=True)

    phi0 = SurprisePhi()
    doc, task = (batch.doc_ids, batch.doc_mask), (batch.task_ids, batch.task_mask, batch.task_obj)
    with torch.no_grad():
        nll = token_nll(base, *doc)  # θ's own loss on D: φ's extra input
    w0 = phi0(*doc, None, nll)[:, 1:]
    ref, _ = reference_meta_gradient(base, params, *doc, w0.detach().requires_grad_(True), *task, cfg=cfg)
    expected = torch.autograd.grad((w0 * ref).sum(), [phi0.emb.weight, phi0.a])
    assert expected[1].abs() > 0  # the surprise input carries meta-gradient
    current = dict(phi.named_parameters())
    for name, e in zip(("emb.weight", "a"), expected):
        moved = start[name] - current[name].detach()
        assert ((moved - e).abs().max() / e.abs().max()).item() < 1e-9, name

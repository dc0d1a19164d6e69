"""Causality, masks, MoE routing, GLN, history compression, losses: the model's pieces on tiny inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.baselines.sasrec import SASRec, SASRecConfig
from models.eval import history_mask
from models.hstu import HSTU, HSTUConfig, bucketize_time_gaps
from models.losses import dpo_loss, sampled_softmax_loss, semantic_contrastive_loss
from models.ugt.gln import GLNConfig, GroupLayerNorm
from models.ugt.model import UGT, UGTConfig
from models.ugt.moe import MoEConfig, MoEFeedForward
from models.ugt.multiscale import compress_history


def _ugt(data, codes=None, sizes=None) -> UGT:
    cfg = UGTConfig.from_dict({
        "num_items": data.num_items, "d_model": 16, "num_layers": 2, "num_heads": 2, "dqk": 8, "dv": 8,
        "multiscale": {"recent_len": 10, "long_groups": 3, "max_long": 8},
        "moe": {"d_ff": 16, "num_experts": 3, "top_k": 2},
        "embedding": {"item_repr": "id+sid" if codes is not None else "id"},
    })
    return UGT(cfg, data.item_genres, data.item_year_bucket, codes, sizes).eval()


def _models(data):
    torch.manual_seed(0)
    return {
        "sasrec": SASRec(SASRecConfig(num_items=data.num_items, max_len=10, embedding_dim=16, ffn_hidden_dim=16)).eval(),
        "hstu": HSTU(HSTUConfig(num_items=data.num_items, max_len=10, embedding_dim=16, num_blocks=2, num_heads=2,
                                dqk=8, dv=8)).eval(),
        "ugt": _ugt(data),
    }


@pytest.mark.parametrize("name", ["sasrec", "hstu", "ugt"])
def test_changing_a_later_event_never_changes_earlier_outputs(name, tiny_data, tiny_batch):
    model = _models(tiny_data)[name]
    with torch.no_grad():
        before, _ = model(tiny_batch)
        k = 5
        changed = {key: v.clone() for key, v in tiny_batch.items()}
        changed["ids"][:, k:] = torch.where(changed["ids"][:, k:] > 0, (changed["ids"][:, k:] % 29) + 1, 0)
        changed["ratings"][:, k:] = 1
        changed["gaps"][:, k:] = 7
        changed["times"][:, k:] += 10_000  # later events' own times
        after, _ = model(changed)
    # Outputs before k (each predicts the event after it) must be identical; later ones may change.
    assert torch.allclose(before[:, :k], after[:, :k], atol=1e-6)
    assert not torch.allclose(before[:, k:], after[:, k:])


def test_padding_never_leaks(tiny_data, tiny_batch):
    model = _models(tiny_data)["hstu"]
    with torch.no_grad():
        before, _ = model(tiny_batch)
        padded = {k: v.clone() for k, v in tiny_batch.items()}
        pad = padded["ids"] == 0
        padded["times"][pad] = 123456  # garbage in padded slots
        after, _ = model(padded)
    real = ~pad
    assert torch.allclose(before[real], after[real], atol=1e-6)


def test_history_mask_is_the_input_window(tiny_data, tiny_batch):
    inv = history_mask(tiny_batch, tiny_data, tiny_data.num_items, "window", "train")
    for row in range(inv.shape[0]):
        expected = set(tiny_batch["ids"][row].tolist()) | {0}
        assert set(torch.nonzero(inv[row]).flatten().tolist()) == expected
    none = history_mask(tiny_batch, tiny_data, tiny_data.num_items, "none", "train")
    assert torch.nonzero(none).shape[0] == inv.shape[0]  # only padding column 0
    with pytest.raises(ValueError):
        history_mask(tiny_batch, tiny_data, tiny_data.num_items, "some", "train")


def test_hstu_time_buckets():
    dt = torch.tensor([0, 1, 2, 100, -100, 10**9])
    got = bucketize_time_gaps(dt, 128).tolist()
    assert got[:2] == [0, 0] and got[3] == got[4] == int(np.log(100) / 0.301)
    assert got[5] == int(np.log(1e9) / 0.301)


def test_moe_routes_top_k_and_balance_loss():
    torch.manual_seed(0)
    moe = MoEFeedForward(8, MoEConfig(d_ff=8, num_experts=4, top_k=2, dropout=0.0))
    x = torch.randn(3, 5, 8)
    combine, probs, top_i = moe.route(x)
    assert ((combine > 0).sum(-1) == 2).all()
    assert torch.allclose(combine.sum(-1), torch.ones(3, 5))
    assert torch.equal(torch.sort(top_i, -1).values, torch.sort(combine.topk(2, -1).indices, -1).values)
    valid = torch.ones(3, 5, dtype=torch.bool)
    # Uniform router -> f.P summed times E = 1 (the minimum); a collapsed router scores higher.
    with torch.no_grad():
        moe.gate.weight.zero_()
    _, probs, top_i = moe.route(x)
    assert moe.balance_loss(probs, top_i, valid).item() == pytest.approx(1.0)
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[0] = 10.0
    x_pos = x.abs() + 0.1  # gate logit of expert 0 is large for every token
    _, probs, top_i = moe.route(x_pos)
    assert moe.balance_loss(probs, top_i, valid).item() > 1.5
    # Output equals the explicit sum over chosen experts.
    moe.eval()
    y, _ = moe(x, valid)
    combine, _, _ = moe.route(x)
    manual = torch.zeros_like(x)
    for e in range(4):
        h = F.gelu(x @ moe.w1[e] + moe.b1[e]) @ moe.w2[e] + moe.b2[e]
        manual += combine[..., e : e + 1] * h
    assert torch.allclose(y, manual, atol=1e-5)


def test_moe_dense_switch_and_bad_config():
    dense = MoEFeedForward(8, MoEConfig(d_ff=8, dense=True))
    _, aux = dense(torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool))
    assert dense.gate is None and aux.item() == 0.0
    with pytest.raises(ValueError):
        MoEFeedForward(8, MoEConfig(num_experts=2, top_k=3))


def test_group_layer_norm_matches_one_layernorm_per_group():
    torch.manual_seed(0)
    gln = GroupLayerNorm(6, GLNConfig(num_groups=4))
    with torch.no_grad():
        gln.weight.normal_()
        gln.bias.normal_()
    x = torch.randn(2, 7, 6)
    types = torch.randint(0, 4, (2, 7))
    out = gln(x, types)
    for g in range(4):
        mask = types == g
        ref = F.layer_norm(x[mask], (6,), gln.weight[g], gln.bias[g], eps=1e-6)
        assert torch.allclose(out[mask], ref, atol=1e-5)
    shared = GroupLayerNorm(6, GLNConfig(grouped=False))
    assert shared.weight.shape[0] == 1


def test_compress_history_early_coarse_recent_fine():
    group = compress_history(torch.tensor([40, 2, 0]), max_events=40, num_groups=4)
    sizes = torch.bincount(group[0], minlength=4).tolist()
    assert sum(sizes) == 40 and sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    assert (group[0][1:] >= group[0][:-1]).all()  # older events -> lower (older) groups
    assert (group[1, 2:] == -1).all() and (group[1, :2] >= 0).all()
    assert (group[2] == -1).all()


def test_sampled_softmax_full_and_masking():
    torch.manual_seed(0)
    table = F.normalize(torch.randn(6, 4), dim=-1)
    user = F.normalize(torch.randn(2, 3, 4), dim=-1)
    targets = torch.tensor([[1, 2, 0], [5, 0, 0]])
    full = sampled_softmax_loss(user, targets, table, num_negatives=0, temperature=0.5)
    u = user[targets > 0]
    ref = F.cross_entropy(u @ table[1:].T / 0.5, targets[targets > 0] - 1)
    assert full.item() == pytest.approx(ref.item(), rel=1e-5)
    # With one item only the positive could be drawn: every negative is masked, loss ~ 0.
    one = sampled_softmax_loss(user, torch.tensor([[1, 0, 0], [0, 0, 0]]), table[:2], num_negatives=1)
    assert one.item() < 1e-3
    sampled = sampled_softmax_loss(user, targets, table, num_negatives=3, temperature=0.5)
    assert torch.isfinite(sampled)


def test_dpo_loss_sign_and_gradient():
    zero = dpo_loss(torch.tensor([-1.0]), torch.tensor([-1.0]), torch.tensor([-1.0]), torch.tensor([-1.0]))
    assert zero.item() == pytest.approx(np.log(2.0))
    good = dpo_loss(torch.tensor([-0.5]), torch.tensor([-2.0]), torch.tensor([-1.0]), torch.tensor([-1.0]), beta=1.0)
    bad = dpo_loss(torch.tensor([-2.0]), torch.tensor([-0.5]), torch.tensor([-1.0]), torch.tensor([-1.0]), beta=1.0)
    assert good.item() < np.log(2.0) < bad.item()
    chosen = torch.tensor([-1.0], requires_grad=True)
    rejected = torch.tensor([-1.0], requires_grad=True)
    dpo_loss(chosen, rejected, torch.tensor([-1.0]), torch.tensor([-1.0])).backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()  # descent raises chosen, lowers rejected


def test_semantic_contrastive_prefers_matching_ids():
    torch.manual_seed(0)
    sid = F.normalize(torch.randn(8, 16), dim=-1)
    ids = torch.arange(1, 9)
    aligned = semantic_contrastive_loss(sid.clone(), sid, ids)
    shuffled = semantic_contrastive_loss(sid[torch.randperm(8)], sid, ids)
    assert aligned.item() < shuffled.item()


def test_ugt_config_rejects_unknown_keys():
    with pytest.raises(ValueError):
        UGTConfig.from_dict({"num_layerz": 3})
    with pytest.raises(ValueError):
        UGTConfig.from_dict({"moe": {"expertz": 3}})

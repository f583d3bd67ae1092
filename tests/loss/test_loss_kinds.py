"""The registry of loss kinds, the accepted logits layouts, and chunking along tokens."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sed_megatron.loss import LOSS_KINDS, LossConfig, LossKind, chunks, get_kind, register, sft_token_loss
from sed_megatron.loss.kinds import kind_names

from .reference import REFERENCE_KINDS
from .test_loss_parity import VARIANTS

CONFIGS = {"ce": LossConfig(kind="ce"), "dft": LossConfig(kind="dft"), "sed": LossConfig(kind="sed", tau=0.5),
           "gem": LossConfig(kind="gem", gem_beta=0.6),
           "gem/h=logsigmoid": LossConfig(kind="gem", gem_beta=0.6, gem_h="logsigmoid")}


@pytest.mark.parametrize("name", ["ce", "dft", "sed", "gem"])
def test_builtin_kind_is_registered(name):
    kind = get_kind(name)
    assert isinstance(kind, LossKind) and kind.name == name
    assert name in LOSS_KINDS and name in REFERENCE_KINDS  # a kind comes with its float64 reference
    assert name in {kind for kind, _ in VARIANTS.values()}  # and with its parity cases


def test_loss_kinds_is_the_registry():
    assert LOSS_KINDS == kind_names() == ("ce", "dft", "sed", "gem")
    assert set(REFERENCE_KINDS) == set(LOSS_KINDS)


def test_extra_sums_and_reports_per_kind():
    sums = {name: get_kind(name).sum_names(CONFIGS[name]) for name in LOSS_KINDS}
    assert sums == {"ce": (), "dft": (), "sed": (), "gem": ("tempered_sum", "tempered_dot")}
    logsigmoid = LossConfig(kind="gem", gem_h="logsigmoid")
    assert get_kind("gem").sum_names(logsigmoid) == ("tempered_sum", "weighted_sum", "weighted_dot")
    assert {name: get_kind(name).reports for name in LOSS_KINDS} == {"ce": (), "dft": (), "sed": ("penalty",), "gem": ()}


def test_register_refuses_a_second_kind_of_the_same_name_and_unknown_names():
    class AnotherCE(LossKind):
        name = "ce"

    with pytest.raises(ValueError, match="'ce' is already registered"):
        register(AnotherCE)
    with pytest.raises(ValueError, match="unknown loss kind 'xent'"):
        get_kind("xent")
    with pytest.raises(ValueError, match="LossConfig.kind: unknown loss kind 'xent'"):
        LossConfig(kind="xent")


def test_sed_reports_its_penalty_as_a_stat():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 2, 30, generator=gen) * 3
    target = torch.randint(0, 30, (5, 2), generator=gen)
    target[0, 0] = -100
    tau = float(sft_token_loss(logits, target, LossConfig())[1]["topk_mass"].median())  # splits the tokens
    loss, stats = sft_token_loss(logits, target, LossConfig(kind="sed", tau=tau, lam=2.0))
    p = stats["p_target"]
    torch.testing.assert_close(stats["penalty"], 2.0 * stats["mask"] * (p - 0.5) ** 2, atol=1e-7, rtol=0)
    torch.testing.assert_close(stats["penalty"], loss - stats["ce"], atol=1e-6, rtol=0)
    assert 0 < stats["mask"].sum() < 9 and stats["penalty"][0, 0] == 0
    for name in ("ce", "dft", "gem"):
        assert "penalty" not in sft_token_loss(logits, target, CONFIGS[name])[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_both_layouts_give_identical_values_and_gradients(name, dtype):
    """[s, b, V/tp] and [b, s, V/tp] hold the same tokens: per-token results must not depend on the layout."""
    gen = torch.Generator().manual_seed(4)
    s, b, vocab = 9, 3, 37
    logits_sb = (torch.randn(s, b, vocab, generator=gen) * 3).to(dtype)
    target_sb = torch.randint(0, vocab, (s, b), generator=gen)
    target_sb[2, 1] = -100
    results = []
    for logits, target in ((logits_sb, target_sb), (logits_sb.transpose(0, 1).contiguous(), target_sb.t().contiguous())):
        leaf = logits.clone().requires_grad_()
        loss, stats = sft_token_loss(leaf, target, CONFIGS[name], with_entropy=True)
        assert loss.shape == stats["ce"].shape == target.shape
        loss.sum().backward()
        results.append((loss, stats, leaf.grad))
    (loss_sb, stats_sb, grad_sb), (loss_bs, stats_bs, grad_bs) = results
    torch.testing.assert_close(loss_bs.t(), loss_sb, atol=0, rtol=0)
    torch.testing.assert_close(grad_bs.transpose(0, 1), grad_sb, atol=0, rtol=0)
    assert stats_sb.keys() == stats_bs.keys()
    for key in stats_sb:
        torch.testing.assert_close(stats_bs[key].t(), stats_sb[key], atol=0, rtol=0, msg=key)


def test_non_contiguous_logits_match_and_are_left_intact():
    gen = torch.Generator().manual_seed(5)
    logits_sb = torch.randn(6, 2, 20, generator=gen)
    target = torch.randint(0, 20, (2, 6), generator=gen)
    cfg = CONFIGS["gem"]
    view = logits_sb.transpose(0, 1)  # [b, s, V], strided
    assert not view.is_contiguous()
    before = view.clone()
    leaf = view.detach().requires_grad_()
    loss, _ = sft_token_loss(leaf, target, cfg, inplace=True)
    loss.sum().backward()
    dense = before.clone().requires_grad_()
    dense_loss, _ = sft_token_loss(dense, target, cfg)
    dense_loss.sum().backward()
    torch.testing.assert_close(loss, dense_loss, atol=0, rtol=0)
    torch.testing.assert_close(leaf.grad, dense.grad, atol=0, rtol=0)
    assert torch.equal(leaf.detach(), before)  # a non-contiguous input is copied, never overwritten


class LargestAllocations(TorchDispatchMode):
    """Records the size in bytes of every tensor an aten op allocates (outputs sharing no input's storage)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append(t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("shape", [(1, 1024), (1024, 1)])  # [b, s] with b = 1 (the trainer's) and [s, b]
@pytest.mark.parametrize("name,with_entropy", [("gem", False), ("gem", True), ("sed", True), ("gem/h=logsigmoid", True)])
def test_temporaries_are_bounded_by_one_chunk_of_tokens(monkeypatch, shape, name, with_entropy):
    """A [1, 1024, V] shard with a 16-token budget: the GEM and entropy passes allocate one chunk, not the shard.

    Chunking along the first dim (b = 1) would allocate whole-shard temporaries and fail here.
    fp32 + inplace: the one buffer is the caller's logits, so nothing larger than a chunk is
    allocated, forward or backward. Per-token tensors ([n, t] sums, [t, k]) stay below a chunk here.
    """
    vocab, chunk_tokens = 512, 16
    budget = chunk_tokens * vocab
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", budget)
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(*shape, vocab, generator=gen, requires_grad=True)
    target = torch.randint(0, vocab, shape, generator=gen)
    shard_bytes = base.numel() * 4
    for inplace in (True, False):
        logits = base * 1.0  # a non-leaf, as the output layer's logits are
        with LargestAllocations() as probe:
            loss, _ = sft_token_loss(logits, target, CONFIGS[name], inplace=inplace, with_entropy=with_entropy)
            (grad,) = torch.autograd.grad(loss.sum(), logits)
        large = [size for size in probe.sizes if size > budget * 4]
        # inplace=False: the probe sees the one fp32 buffer (a copy), and nothing else that large.
        assert large == ([] if inplace else [shard_bytes]), (inplace, large, budget * 4)
        assert max(probe.sizes) >= chunk_tokens * vocab * 4  # the chunk temporaries are seen


def test_bf16_allocates_only_the_buffer_and_the_gradient(monkeypatch):
    vocab, chunk_tokens = 512, 16
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", chunk_tokens * vocab)
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(1, 1024, vocab, generator=gen).bfloat16().requires_grad_()
    target = torch.randint(0, vocab, (1, 1024), generator=gen)
    logits = base * 1.0
    with LargestAllocations() as probe:
        loss, _ = sft_token_loss(logits, target, CONFIGS["gem"], inplace=True, with_entropy=True)
        (grad,) = torch.autograd.grad(loss.sum(), logits)
    large = sorted(size for size in probe.sizes if size > chunk_tokens * vocab * 4)
    assert large == [base.numel() * 2, base.numel() * 4]  # the bf16 gradient, the fp32 buffer


def test_loss_config_fields_come_from_the_registry():
    """LossConfig's fields are kind and top_k plus every kind's declared parameters, each checked
    by its Param wherever a config is made; it is immutable, hashable, and pickles."""
    import pickle

    from sed_megatron.loss.kinds import declared_params

    assert LossConfig.field_names() == ("kind", "top_k", *declared_params())
    assert {"tau", "lam", "mask", "gem_beta", "gem_h"} <= set(declared_params())
    cfg = LossConfig(kind="sed", tau=0.5)
    assert cfg.replace(tau=0.25).tau == 0.25 and cfg.tau == 0.5 and cfg.gem_beta == 0.7  # another kind's default
    assert cfg == LossConfig(kind="sed", tau=0.5) and hash(cfg) == hash(LossConfig(kind="sed", tau=0.5))
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    with pytest.raises(AttributeError, match="immutable"):
        cfg.tau = 0.3
    with pytest.raises(TypeError, match="unknown field 'beta'"):
        LossConfig(kind="gem", beta=0.5)
    with pytest.raises(ValueError, match=r"LossConfig.mask: 'entropy' is not one of topk_mass, none"):
        LossConfig(kind="sed", tau=0.5, mask="entropy")


def test_a_kind_declaring_a_parameter_another_declares_differently_is_refused():
    from sed_megatron.loss import Param

    class Clash(LossKind):
        name = "clash"
        params = (Param("tau", 0.3, "--clash-tau", "another tau"),)

    with pytest.raises(ValueError, match="declares parameter 'tau', which another kind"):
        register(Clash)
    assert "clash" not in LOSS_KINDS

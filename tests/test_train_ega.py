"""EGA loss: forward = info-NCE, backward = (P_bar - I) / tau, alpha = 0 = info-NCE, amplification only via hardness."""
import math
import socket

import numpy as np

import pytest
import torch
import torch.nn.functional as F

from pipeline.train.ega import EGALoss, content_key, ega_from_scores, hardness

TAU, BETA = 0.05, 0.1


def _rand_scores(b=6, c=15, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.rand(b, c, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_()
    target = torch.randperm(c, generator=g)[:b]
    return s, target


def _analytic_grad(s, target, valid, tau, alpha, beta):
    """(P_bar - I) / (tau * B), written out independently of the implementation."""
    s = s.detach()
    b, c = s.shape
    grad = torch.zeros_like(s)
    for i in range(b):
        cols = [j for j in range(c) if valid[i, j]]
        z = torch.tensor([s[i, j].item() / tau for j in cols], dtype=torch.float64)
        p = torch.softmax(z, 0)
        sp = s[i, target[i]].item()
        extra = 0.0
        for p_j, j in zip(p.tolist(), cols):
            if j != target[i]:
                h = math.exp(min(s[i, j].item() - sp, 0.0) / beta)
                grad[i, j] = p_j * (1 + alpha * h)
                extra += alpha * h * p_j
        grad[i, target[i]] = p[cols.index(target[i])].item() - extra - 1.0  # P_bar_p = P_p - added mass
    return grad / (tau * b)


def _info_nce(s, target, valid, tau):
    """Plain info-NCE written out from logsumexp (no cross_entropy): mean_i [logsumexp_j z_ij - z_i,target]."""
    z = (s / tau).masked_fill(~valid, float("-inf"))
    rows = torch.arange(len(target))
    return (torch.logsumexp(z, dim=1) - z[rows, target]).mean()


def _info_nce_grad(s, target, valid, tau):
    """Its analytic gradient (P - I) / (tau * B): P the softmax over the valid candidates, I the one-hot target."""
    z = (s.detach() / tau).masked_fill(~valid, float("-inf"))
    p = torch.exp(z - torch.logsumexp(z, dim=1, keepdim=True))
    eye = torch.zeros_like(p)
    eye[torch.arange(len(target)), target] = 1.0
    return (p - eye) / (tau * len(target))


@pytest.mark.parametrize("masked", [False, True])
def test_alpha_zero_is_info_nce(masked):
    s, target = _rand_scores()
    valid = torch.ones(s.shape, dtype=torch.bool)
    if masked:
        valid = torch.rand(s.shape, generator=torch.Generator().manual_seed(7)) > 0.3
        valid[torch.arange(len(target)), target] = True
    loss = ega_from_scores(s, target, valid if masked else None, tau=TAU, alpha=0.0, beta=BETA)
    (g,) = torch.autograd.grad(loss, s)
    torch.testing.assert_close(loss, _info_nce(s.detach(), target, valid, TAU), rtol=1e-12, atol=0)
    torch.testing.assert_close(g, _info_nce_grad(s, target, valid, TAU), rtol=1e-10, atol=1e-12)
    assert torch.all(g[~valid] == 0)


def test_module_alpha_zero_is_info_nce_on_the_logits():
    torch.manual_seed(0)
    q, p, n = (F.normalize(torch.randn(*sh, 8, dtype=torch.float64), dim=-1) for sh in [(4,), (4,), (4, 3)])
    q.requires_grad_()
    loss = EGALoss(tau=TAU, alpha=0.0)(q, p, n)
    (g,) = torch.autograd.grad(loss, q)
    docs = torch.cat([p, n.reshape(12, 8)])  # in-batch positives, then every row's hard negatives
    s = q.detach() @ docs.T
    target, valid = torch.arange(4), torch.ones(s.shape, dtype=torch.bool)
    torch.testing.assert_close(loss, _info_nce(s, target, valid, TAU), rtol=1e-12, atol=0)
    # dL/dq_i = sum_j dL/ds_ij * d_j, with dL/ds = (P - I) / (tau * B)
    torch.testing.assert_close(g, _info_nce_grad(s, target, valid, TAU) @ docs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.5, 2.0, 9.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_autograd_equals_amplified_probabilities(alpha, seed):
    s, target = _rand_scores(seed=seed)
    valid = torch.rand(s.shape, generator=torch.Generator().manual_seed(seed + 10)) > 0.2
    valid[torch.arange(len(target)), target] = True
    loss = ega_from_scores(s, target, valid, tau=TAU, alpha=alpha, beta=BETA)
    (g,) = torch.autograd.grad(loss, s)
    torch.testing.assert_close(g, _analytic_grad(s, target, valid, TAU, alpha, BETA), rtol=1e-10, atol=1e-12)
    # the forward value is info-NCE whatever alpha is
    ref = F.cross_entropy((s / TAU).masked_fill(~valid, float("-inf")), target)
    assert loss.item() == ref.item()
    assert torch.all(g[~valid] == 0)


def test_gradient_on_a_negative_grows_only_with_its_hardness():
    # Two queries, each with one negative (column 1) of the same probability 0.25 but a different gap to its
    # positive (column 0): row 0's negative ties its positive (hardness 1), row 1's is tau*log(3) below it.
    s = torch.tensor([[0.3, 0.3, 0.3 + TAU * math.log(2.0)],   # P = .25 pos, .25 neg, .5 filler
                      [0.5, 0.5 - TAU * math.log(3.0), 0.0]],  # P = .75 pos, .25 neg (filler masked)
                     dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[True, True, True], [True, True, False]])
    target = torch.tensor([0, 0])
    p = torch.softmax((s / TAU).masked_fill(~valid, float("-inf")), 1).detach()
    assert p[0, 1].item() == pytest.approx(0.25) and p[1, 1].item() == pytest.approx(0.25)
    grads = {}
    for alpha in (0.0, 1.0):
        (grads[alpha],) = torch.autograd.grad(ega_from_scores(s, target, valid, tau=TAU, alpha=alpha, beta=BETA), s)
    # info-NCE: same probability, same gradient; EGA: the harder negative gets more, by exactly 1 + alpha * h
    assert grads[0.0][0, 1].item() == pytest.approx(grads[0.0][1, 1].item(), rel=1e-12)
    assert grads[1.0][0, 1] > grads[1.0][1, 1]
    h = hardness(s.detach(), target, BETA)[:, 1]
    assert h[0] == 1.0 and 0 < h[1] < 1
    torch.testing.assert_close(grads[1.0][:, 1] / grads[0.0][:, 1], 1 + h)
    # the mass added to the negatives is taken from the positive: each row's gradient still sums to zero, so a
    # shift of all of a query's similarities is not pushed on
    torch.testing.assert_close(grads[1.0][:, 0] - grads[0.0][:, 0], -(grads[1.0][:, 1:] - grads[0.0][:, 1:]).sum(1))
    torch.testing.assert_close(grads[1.0].sum(1), torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)


def test_hardness_is_relative_to_the_positive():
    s = torch.tensor([[0.9, 0.85, 0.2], [0.3, 0.25, 0.6]])
    h = hardness(s, torch.tensor([0, 0]), beta=0.1)
    assert h[0, 0] == 0 and h[1, 0] == 0
    # the same 0.05 gap gives the same hardness at high and low absolute similarity; above the positive it is 1
    assert h[0, 1].item() == pytest.approx(h[1, 1].item()) == pytest.approx(math.exp(-0.5))
    assert h[1, 2] == 1.0 and h[0, 2] < 1e-2


def test_false_negative_keys_and_padding_are_masked():
    torch.manual_seed(1)
    q, p = F.normalize(torch.randn(3, 8), dim=-1), F.normalize(torch.randn(3, 8), dim=-1)
    n = F.normalize(torch.randn(3, 2, 8), dim=-1)
    pos_keys = torch.tensor([10, 11, 12])
    neg_keys = torch.tensor([[11, 20], [21, 22], [23, -1]])  # query 1's positive is query 0's mined negative
    mask = torch.tensor([[True, True], [True, True], [True, False]])
    loss = EGALoss(tau=TAU, alpha=1.0)
    base = loss(q, p, n, mask)
    # query 1's positive (content 11) reappears as a copy in another slot: with keys it is not its negative
    n2 = n.clone()
    n2[0, 0] = p[1]
    with_keys = loss(q, p, n2, mask, pos_keys, neg_keys)
    s = q @ torch.cat([p, n2.reshape(6, 8)]).T / TAU
    valid = torch.ones(3, 9, dtype=torch.bool)
    valid[:, 8] = False
    valid[1, 3] = False
    ref = F.cross_entropy(s.masked_fill(~valid, float("-inf")), torch.arange(3))
    assert with_keys.item() == pytest.approx(ref.item(), rel=1e-6)
    assert base.item() != pytest.approx(with_keys.item())
    # group keys: queries 0 and 2 share a group, so each other's positives are not negatives
    grouped = EGALoss(tau=TAU, alpha=0.0)(q, p, group_keys=torch.tensor([5, -1, 5]))
    s = q @ p.T / TAU
    s[0, 2] = s[2, 0] = float("-inf")
    assert grouped.item() == pytest.approx(F.cross_entropy(s, torch.arange(3)).item(), rel=1e-6)
    assert content_key("0123456789abcdef0123456789abcdef") == int("0123456789abcde", 16) and content_key("") == -1


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank, world, port, q, p, n, conn):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        b = q.shape[0] // world
        sl = slice(rank * b, (rank + 1) * b)
        ql = q[sl].clone().requires_grad_()
        pl = p[sl].clone().requires_grad_()
        loss = EGALoss(tau=TAU, alpha=2.0, gather=True)(ql, pl, n[sl])
        loss.backward()
        conn.send((loss.item(), ql.grad.numpy(), pl.grad.numpy()))
    finally:
        dist.destroy_process_group()
        conn.close()


def test_gather_across_two_gloo_ranks_matches_one_big_batch():
    import multiprocessing as mp
    torch.manual_seed(2)
    q = F.normalize(torch.randn(8, 16, dtype=torch.float64), dim=-1)
    p = F.normalize(torch.randn(8, 16, dtype=torch.float64), dim=-1)
    n = F.normalize(torch.randn(8, 3, 16, dtype=torch.float64), dim=-1)
    ctx = mp.get_context("fork")  # the children inherit the imported modules: no second torch start-up
    port, procs, pipes = _free_port(), [], []
    for rank in range(2):
        parent, child = ctx.Pipe(duplex=False)
        procs.append(ctx.Process(target=_ddp_worker, args=(rank, 2, port, q, p, n, child)))
        pipes.append(parent)
        procs[-1].start()
    result = [pipe.recv() if pipe.poll(120) else pytest.fail("a gloo rank did not answer") for pipe in pipes]
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    qf, pf = q.clone().requires_grad_(), p.clone().requires_grad_()
    full = EGALoss(tau=TAU, alpha=2.0)(qf, pf, n)
    full.backward()
    # each rank: its queries against all 8 positives + 24 negatives; the mean of the two rank losses is the full one
    assert (result[0][0] + result[1][0]) / 2 == pytest.approx(full.item(), rel=1e-12)
    # query gradients are exact (scaled by the world size, as each rank averages over its own half)
    torch.testing.assert_close(torch.from_numpy(np.concatenate([result[0][1], result[1][1]])) / 2, qf.grad)
    # a positive's gradient on its own rank is exactly its own rank's queries' part (remote queries' part stays
    # remote, as in OpenCLIP's local loss): rank 0's positives get d(loss of queries 0-3)/dp
    pr = p.clone().requires_grad_()
    local = ega_from_scores(q[:4] @ torch.cat([pr, n.reshape(24, 16)]).T, torch.arange(4), tau=TAU, alpha=2.0,
                            beta=0.1)
    local.backward()
    torch.testing.assert_close(torch.from_numpy(result[0][2]), pr.grad[:4])


def test_extra_positives_are_positives_not_negatives():
    """filters.relabel: a row's extra positives each count as a positive against the same candidates."""
    g = torch.Generator().manual_seed(3)
    q, pos, neg = (F.normalize(torch.randn(*shape, generator=g), dim=-1) for shape in ((4, 8), (4, 8), (4, 3, 8)))
    loss = EGALoss(tau=0.05, alpha=1.0)
    base = loss(q, pos, neg)
    # an extra positive equal to the positive: the same loss; a padded one (mask False) changes nothing
    assert torch.allclose(loss(q, pos, neg, extra_pos=pos[:, None]), base)
    assert torch.allclose(loss(q, pos, neg, extra_pos=neg[:, :1], extra_mask=torch.zeros(4, 1, dtype=torch.bool)),
                          base)
    # the first mined negative relabelled as an extra positive: the gradient now pulls the query towards it
    q1 = q.clone().requires_grad_(True)
    loss(q1, pos, neg, extra_pos=neg[:, :1]).backward()
    toward = -(q1.grad * neg[:, 0]).sum(dim=1)
    q2 = q.clone().requires_grad_(True)
    loss(q2, pos, neg).backward()
    assert (toward > -(q2.grad * neg[:, 0]).sum(dim=1)).all()

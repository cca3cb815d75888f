"""The pure-PyTorch reference ops against hand-computed cases (SPEC §2-§4)."""
import math

import pytest
import torch
from torch.library import opcheck

import moreau_kernels as mk
from moreau_kernels import reference as ref


@pytest.fixture(autouse=True)
def _reference_backend():
    """These tests pin down the reference math itself; other backends are compared to it elsewhere."""
    with mk.use_backend("reference"):
        yield


def test_philox_known_answers():
    # Random123's published known-answer vectors for Philox4x32-10
    z = torch.zeros(1, dtype=torch.int64)
    assert [int(x) for x in ref.philox4x32(z, z, z, z, 0, 0)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    f = torch.full((1,), 0xFFFFFFFF, dtype=torch.int64)
    out = ref.philox4x32(f, f, f, f, 0xFFFFFFFF, 0xFFFFFFFF)
    assert [int(x) for x in out] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


def test_noise_layout_and_statistics():
    n = ref.normal_noise((1000, 999), seed=7, step=3, index=11)
    assert n.dtype == torch.float32
    assert abs(n.mean().item()) < 0.01 and abs(n.std().item() - 1) < 0.01
    # element e is determined by its own counter: a prefix is the noise of a smaller tensor
    assert torch.equal(ref.normal_noise((10,), 7, 3, 11), n.reshape(-1)[:10])
    # every key component changes the stream
    for key in ((8, 3, 11), (7, 4, 11), (7, 3, 12)):
        assert not torch.equal(ref.normal_noise((16,), *key), n.reshape(-1)[:16])
    # lanes 0/1 are the cos/sin pair of words (x0, x1): r^2 = z0^2 + z1^2 = -2 ln u1
    bits = ref.philox_bits(4, 7, 3, 11)
    u1 = ((int(bits[0, 0]) >> 8) + 1) * 2.0**-24
    z = n.reshape(-1)[:2].double()
    assert math.isclose(float((z * z).sum()), -2 * math.log(u1), rel_tol=1e-5)


def _prox(u_rows, lr=0.5, soft=1.0, mode=mk.MODE_REFERENCE, delta=None, lamb=0.2, acc=None, accumulate=False):
    u = torch.tensor(u_rows, dtype=torch.float32)
    d = torch.zeros_like(u) if delta is None else torch.tensor(delta, dtype=torch.float32)
    g = (d - u) / lr  # so that u = d - lr*g in reference mode
    if mode == mk.MODE_PAPER:
        g = (d - u) / lr - d / lamb  # u = d - lr*(g + d/lamb)
    s = mk.prox_update_(g, d, acc, lr, soft, lamb, mode, accumulate)
    return d, s


def test_prox_reference_three_regimes():
    # lr*soft = 0.5 (zero test), soft = 1.0 (shrink)
    d, s = _prox([[3.0, 3.0, 3.0, 3.0],  # RMS 3 > soft: shrink, coeff 1 - 1/3
                  [0.8, 0.8, 0.8, 0.8],  # 0.5 < RMS 0.8 < 1: coeff 1 - 1/0.8 = -0.25, reflected
                  [0.4, -0.4, 0.4, 0.4],  # RMS 0.4 <= 0.5: zero
                  [3.0, -4.0, 0.0, 0.0]])  # RMS sqrt(25/4) = 2.5: coeff 0.6
    want = torch.tensor([[2.0] * 4, [-0.2] * 4, [0.0] * 4, [1.8, -2.4, 0.0, 0.0]])
    torch.testing.assert_close(d, want)
    torch.testing.assert_close(s, (want * want).sum())


def test_prox_reference_zero_test_is_inclusive_and_1d_is_elementwise():
    d, _ = _prox([0.5, 0.8, -3.0, 0.0])  # 1-D: r_i = |u_i|
    torch.testing.assert_close(d, torch.tensor([0.0, 0.8 * (1 - 1 / 0.8), -3.0 * (1 - 1 / 3.0), 0.0]))


def test_prox_paper_mode_uses_l2_norm_and_tau():
    lr, soft, lamb = 0.5, 2.0, 0.25  # tau = 1
    d, _ = _prox([[3.0, 4.0], [0.6, 0.0]], lr=lr, soft=soft, mode=mk.MODE_PAPER, delta=[[1.0, -1.0], [2.0, 0.0]],
                 lamb=lamb)
    # row 0: ||u|| = 5 -> coeff 0.8; row 1: ||u|| = 0.6 <= tau -> 0
    torch.testing.assert_close(d, torch.tensor([[2.4, 3.2], [0.0, 0.0]]))


def test_prox_accumulates_new_delta():
    acc = torch.full((2, 4), 1.0)
    d, _ = _prox([[3.0] * 4, [0.4] * 4], acc=acc, accumulate=True)
    torch.testing.assert_close(acc, 1.0 + d)


def test_prox_works_on_3d_by_rows_and_low_precision_grads():
    g = torch.randn(4, 5, 6, dtype=torch.bfloat16)
    d = torch.randn(4, 5, 6)
    d2 = d.clone().reshape(4, 30)
    mk.prox_update_(g, d, None, 1e-2, 0.1, 0.2, mk.MODE_REFERENCE, False)
    mk.prox_update_(g.reshape(4, 30), d2, None, 1e-2, 0.1, 0.2, mk.MODE_REFERENCE, False)
    torch.testing.assert_close(d.reshape(4, 30), d2, rtol=0, atol=0)


def test_perturb_matches_published_order_and_keeps_dtype():
    w = torch.randn(5, 123)
    delta = torch.randn(5, 123) * 1e-3
    noise = torch.randn(5, 123)
    out = mk.perturb(w, delta, 0.05, 0, 0, 0, noise=noise)
    assert torch.equal(out, w + noise * torch.abs(0.05 * w) + delta)  # the published expression, bit for bit
    philox = mk.perturb(w, delta, 0.05, 3, 1, 2)
    assert torch.equal(philox, (w + ref.normal_noise(w.shape, 3, 1, 2) * torch.abs(0.05 * w)) + delta)
    wb = w.to(torch.bfloat16)
    outb = mk.perturb(wb, delta, 0.05, 3, 1, 2)
    assert outb.dtype == torch.bfloat16
    torch.testing.assert_close(outb, mk.perturb(wb.float(), delta, 0.05, 3, 1, 2).to(torch.bfloat16), rtol=0, atol=0)


def test_channel_saliency_hand_case():
    w = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    g = torch.tensor([[2.0, 1.0], [-1.0, 0.5]])
    rows, cols = mk.channel_saliency(w, g, False)
    torch.testing.assert_close(rows, torch.tensor([4.0, 5.0]))  # |2|+|-2|, |-3|+|2|
    torch.testing.assert_close(cols, torch.tensor([5.0, 4.0]))
    rows, cols = mk.channel_saliency(w, g, True)
    torch.testing.assert_close(rows, torch.tensor([0.0, 1.0]))  # |2-2|, |-3+2|
    torch.testing.assert_close(cols, torch.tensor([1.0, 0.0]))
    rows, _ = mk.channel_saliency(w, None, False)
    torch.testing.assert_close(rows, torch.tensor([3.0, 7.0]))


def test_multi_forms_equal_single():
    ws = [torch.randn(5, 123), torch.randn(7), torch.randn(3, 4, 5)]
    ds = [torch.randn(w.shape) * 1e-3 for w in ws]
    outs = [torch.empty_like(w) for w in ws]
    mk.perturb_multi(ws, ds, outs, 0.05, 1, 2, [0, 1, 2])
    for i, (w, d, o) in enumerate(zip(ws, ds, outs)):
        assert torch.equal(o, mk.perturb(w, d, 0.05, 1, 2, i))
    gs = [torch.randn(w.shape) for w in ws]
    d1 = [d.clone() for d in ds]
    a1 = [torch.zeros_like(d) for d in ds]
    sums = mk.prox_update_multi_(gs, d1, a1, 2e-4, 5e-6, 0.2, 0, True)
    for g, d, dd, a, s in zip(gs, ds, d1, a1, sums):
        d = d.clone()
        a2 = torch.zeros_like(d)
        torch.testing.assert_close(s, mk.prox_update_(g, d, a2, 2e-4, 5e-6, 0.2, 0, True))
        assert torch.equal(d, dd) and torch.equal(a, a2)


@pytest.mark.parametrize("bad", ["empty", "dtype", "shape", "mode", "seed", "noacc"])
def test_bad_input_is_named(bad):
    g, d = torch.randn(3, 4), torch.zeros(3, 4)
    with pytest.raises((ValueError, TypeError)) as e:
        if bad == "empty":
            mk.prox_update_(torch.empty(0, 4), torch.empty(0, 4), None, 1.0, 1.0, 1.0, 0, False)
        elif bad == "dtype":
            mk.prox_update_(g, d.double(), None, 1.0, 1.0, 1.0, 0, False)
        elif bad == "shape":
            mk.perturb(torch.randn(3, 5), d, 0.05, 0, 0, 0)
        elif bad == "mode":
            mk.prox_update_(g, d, None, 1.0, 1.0, 1.0, 7, False)
        elif bad == "seed":
            mk.perturb(g, d, 0.05, -1, 0, 0)
        else:
            mk.prox_update_(g, d, None, 1.0, 1.0, 1.0, 0, True)
    assert {"empty": "empty", "dtype": "float32", "shape": "shape", "mode": "mode", "seed": "seed",
            "noacc": "acc"}[bad] in str(e.value)


def test_opcheck_reference_ops():
    with mk.use_backend("reference"):
        w, g, d, a = torch.randn(5, 123), torch.randn(5, 123), torch.randn(5, 123) * 1e-3, torch.zeros(5, 123)
        opcheck(torch.ops.moreau.prox_update_.default, (g, d.clone(), a.clone(), 2e-4, 5e-6, 0.2, 0, True))
        opcheck(torch.ops.moreau.prox_update_.default, (g, d.clone(), None, 2e-4, 5e-6, 0.2, 1, False))
        opcheck(torch.ops.moreau.perturb_out.default, (w, d, None, torch.empty_like(w), 0.05, 1, 2, 3))
        opcheck(torch.ops.moreau.channel_saliency.default, (w, g, True))
        opcheck(torch.ops.moreau.philox_normal.default, (w, 1, 2, 3))
        opcheck(torch.ops.moreau.perturb_multi.default, ([w], [d], [torch.empty_like(w)], 0.05, 1, 2, [3]))
        opcheck(torch.ops.moreau.prox_update_multi_.default, ([g], [d.clone()], [a.clone()], 2e-4, 5e-6, 0.2, 0, True))


def test_ops_work_inside_torch_compile():
    def step(g, d, a):
        s = mk.prox_update_(g, d, a, 2e-4, 5e-6, 0.2, 0, True)
        return s * 2

    g, d, a = torch.randn(5, 123), torch.randn(5, 123) * 1e-3, torch.zeros(5, 123)
    d2, a2 = d.clone(), a.clone()
    eager = step(g, d, a)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(g, d2, a2)
    torch.testing.assert_close(eager, compiled)
    assert torch.equal(d, d2) and torch.equal(a, a2)


def test_dispatch_explains_and_refuses_clearly():
    g, d = torch.randn(3, 4), torch.zeros(3, 4)
    reasons = mk.explain("prox_update_", g, d)
    assert reasons["reference"] == []
    assert reasons["cuda"], "a CPU tensor can never run on the cuda backend"
    with pytest.raises(mk.BackendUnavailable, match="cuda"):
        with mk.use_backend("cuda"):
            mk.prox_update_(g, d, None, 1.0, 1.0, 1.0, 0, False)
    with pytest.raises(ValueError, match="unknown backend"):
        mk.set_backend("fastest")

"""The live-tensor tracker agrees with hand counts of the tensors a computation must hold."""
import pytest
import torch

from moreau_pruner.estimate.memtrack import LiveTensorTracker, storage_bytes

F32 = 4


def test_matmul_chain_exact_peak():
    with LiveTensorTracker() as tr:
        a = torch.ones(100, 50)
        b = torch.ones(50, 20)
        c = a @ b  # a, b, c live: the peak
        del a
        d = c @ torch.ones(20, 10)  # b, c, the ones and d; below the peak
        v = d.t()[:3]  # a view: no new storage
        live_now = tr.live_bytes
    assert tr.peak_bytes == (100 * 50 + 50 * 20 + 100 * 20) * F32
    assert live_now == (50 * 20 + 100 * 20 + 100 * 10) * F32  # the temporary ones(20, 10) is freed
    assert tr.baseline_bytes == 0 and tr.peak_op == "forward:mm"
    assert tr.peak_breakdown == {"forward:ones": (100 * 50 + 50 * 20) * F32, "forward:mm": 100 * 20 * F32}
    del v


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32, bias=False), torch.nn.ReLU(),
                               torch.nn.Linear(32, 2, bias=False))


def test_linear_forward_backward_hand_count():
    """Weights as baseline, a pre-existing input, saved activations and gradients, exact bytes."""
    m = _mlp()
    x = torch.randn(4, 8)
    W = (8 * 32 + 32 * 2) * F32
    X, H, OUT, SCALAR = 4 * 8 * F32, 4 * 32 * F32, 4 * 2 * F32, F32
    with LiveTensorTracker(baseline=m) as tr:
        assert tr.baseline_bytes == W
        loss = m(x).sum()
        # forward peak: h = x W1ᵀ and relu(h) coexist; after it only relu(h) is saved (for relu's
        # and the second matmul's backward), the output is freed by sum (which saves nothing)
        fwd_peak, after_fwd = tr.peak_bytes, tr.live_bytes
        assert tr.live_breakdown() == {"baseline": W, "input": X, "forward:relu": H, "forward:sum": SCALAR}
        loss.backward()
    assert fwd_peak == W + X + 2 * H
    assert after_fwd == W + X + H + SCALAR
    assert OUT  # the output [4, 2] never coexists with h: freed inside the chained expression
    # backward peak, at relu's backward: saved relu(h), loss, its seed gradient (ones), grad W2
    # [2, 32], grad of relu(h) [4, 32] and the new grad of h [4, 32]
    assert tr.peak_bytes == W + X + H + SCALAR + SCALAR + 2 * 32 * F32 + H + H
    assert tr.peak_op == "backward:threshold_backward"
    # afterwards: the graph (relu(h)) and the seed gradient are freed; loss and .grad stay
    assert tr.live_bytes == W + X + SCALAR + W
    assert storage_bytes([p.grad for p in m.parameters()]) == W


def test_repeated_forward_backward_and_options():
    """Repeated passes are accepted (the torch mem_tracker refuses them); no baseline / no inputs."""
    m = _mlp()
    x = torch.randn(4, 8)
    peaks = []
    for _ in range(3):
        with LiveTensorTracker(count_inputs=False) as tr:
            for _ in range(3):
                m.zero_grad(set_to_none=True)
                m(x).sum().backward()
        peaks.append(tr.peak_bytes)
    # weights and x are pre-existing and not counted; .grad from the previous pass is freed by
    # zero_grad before the next forward, so every pass peaks at the same value
    W = (8 * 32 + 32 * 2) * F32
    assert peaks[0] == peaks[1] == peaks[2] == 4 * 32 * F32 * 3 + 2 * F32 + 2 * 32 * F32
    with LiveTensorTracker() as tr:  # inputs counted from first use: the weights, then x
        m.zero_grad(set_to_none=True)
        m(x).sum().backward()
    assert tr.peak_bytes == peaks[0] + W + 4 * 8 * F32
    m.zero_grad(set_to_none=True)


def test_in_place_and_param_data_swap_counted_once():
    w = torch.nn.Parameter(torch.zeros(64, 64))
    with LiveTensorTracker(baseline=w) as tr:
        work = torch.empty_like(w)
        work.copy_(w).add_(1.0)
        w.data, clean = work, w.data
        y = (w * 2).sum()
        w.data = clean
        del work, y
    assert tr.baseline_bytes == 64 * 64 * F32
    assert tr.peak_bytes == 3 * 64 * 64 * F32 + F32  # w, the work buffer, w*2, and its sum
    assert tr.live_bytes == 64 * 64 * F32


def test_bad_baseline():
    with pytest.raises(TypeError, match="baseline"):
        LiveTensorTracker(baseline=[3]).__enter__()

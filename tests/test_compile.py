"""torch.compile of the EDM2 network: whole graphs, same numbers as eager.

The network module is plain reference math without hidden caches, so dynamo traces a Precond
forward (and its backward) as one graph. Compiling is slow (tens of seconds on a CPU), so these
tests are marked slow and use a tiny network.
"""

import copy

import pytest
import torch

from torch_utils import misc
from training import networks_edm2 as N

pytestmark = pytest.mark.slow


def tiny_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = N.Precond(
        img_resolution=8,
        img_channels=3,
        label_dim=4,
        model_channels=16,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[4],
        channels_per_head=16,
    )
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(1.0)  # non-zero gains, so that every layer affects the output
    return net


def inputs():
    gen = torch.Generator().manual_seed(1)
    return torch.randn([2, 3, 8, 8], generator=gen), torch.tensor([0.5, 3.0]), torch.eye(4)[[0, 3]]


def test_constant_is_traced_without_graph_break():
    def fn(x):
        return x * misc.const_like(x, [[1.0, 2.0]], shape=[3, 2])

    x = torch.randn(3, 2)
    compiled = torch.compile(fn, fullgraph=True, backend="eager")  # raises on a graph break
    assert torch.equal(compiled(x), x * torch.tensor([[1.0, 2.0]]))


def test_eval_forward_is_one_graph_and_matches_eager():
    net = tiny_net().eval().requires_grad_(False)
    x, sigma, labels = inputs()
    with torch.no_grad():
        explanation = torch._dynamo.explain(net)(x, sigma, labels)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1
        torch._dynamo.reset()
        compiled = torch.compile(net, fullgraph=True)  # inductor
        expected = net(x, sigma, labels)
        torch.testing.assert_close(compiled(x, sigma, labels), expected, rtol=1e-4, atol=1e-4)
        # A weight edited through .data is seen by the compiled graph at once.
        net.unet.out_conv.weight.data.mul_(-1)
        torch.testing.assert_close(compiled(x, sigma, labels), net(x, sigma, labels), rtol=1e-4, atol=1e-4)
        assert (net(x, sigma, labels) - expected).abs().max() > 1e-2


def test_training_forward_and_backward_trace_as_one_graph():
    net = tiny_net().train()
    x, sigma, labels = inputs()
    explanation = torch._dynamo.explain(net)(x, sigma, labels, return_logvar=True)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    eager, traced = copy.deepcopy(net), copy.deepcopy(net)
    compiled = torch.compile(traced, fullgraph=True, backend="aot_eager")
    d_eager, logvar_eager = eager(x, sigma, labels, return_logvar=True)
    d_compiled, logvar_compiled = compiled(x, sigma, labels, return_logvar=True)
    torch.testing.assert_close(d_compiled, d_eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logvar_compiled, logvar_eager, rtol=1e-5, atol=1e-5)


def _train_steps(forward, net, num_steps=4):
    """SGD steps of the EDM2 loss (with dropout) on fixed data; the per-step losses. (SGD: Adam's first
    step turns fp32 rounding noise in near-zero gradient entries into full-size steps.)"""
    from training.training_loop import EDM2Loss

    optimizer = torch.optim.SGD(net.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for step in range(num_steps):
        images, labels = torch.randn([4, 3, 8, 8], generator=gen), torch.eye(4)[[0, 1, 2, 3]]
        torch.manual_seed(100 + step)  # the loss's sigma and noise, and the dropout masks
        optimizer.zero_grad()
        loss = EDM2Loss()(forward, images, labels).sum()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _dropout_net():
    net = tiny_net().train()
    for m in net.modules():
        if hasattr(m, "dropout"):
            m.dropout = 0.1
    return net


def test_training_step_under_compile_matches_eager():
    # Inductor alone gets MPConv's forced weight normalisation wrong (the update of the parameter is
    # lost, or its gradient is); the training loop's compiled network does it eagerly instead.
    from training.training_loop import _compiled_training_net

    eager = _dropout_net()
    traced, initial = copy.deepcopy(eager), copy.deepcopy(eager)
    expected = _train_steps(eager, eager)
    losses = _train_steps(_compiled_training_net(traced, traced), traced)
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=0)
    moved = [(a - b).abs().max() for a, b in zip(eager.parameters(), initial.parameters())]
    assert min(moved) > 1e-3  # every parameter changed, far beyond the tolerance below
    for name, p in traced.named_parameters():
        torch.testing.assert_close(p, dict(eager.named_parameters())[name], rtol=1e-4, atol=1e-5, msg=name)
    assert all(m.training for m in traced.modules())  # layers switched to eval for the call are back in training mode


def test_training_compile_failure_falls_back_to_eager_with_one_line(monkeypatch, capsys):
    from training.training_loop import _compiled_training_net

    eager = _dropout_net()
    traced = copy.deepcopy(eager)
    expected = _train_steps(eager, eager, num_steps=2)
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: None)  # calling it raises a TypeError
    assert _train_steps(_compiled_training_net(traced, traced), traced, num_steps=2) == expected
    assert all(torch.equal(a, b) for a, b in zip(traced.parameters(), eager.parameters()))
    lines = [line for line in capsys.readouterr().out.splitlines() if "torch.compile failed" in line]
    assert len(lines) == 1 and lines[0].startswith("torch.compile failed, running eagerly instead: ")


# ----------------------------------------------------------------------------
# generate_images(compile=True).


def _images(net, **kwargs):
    import generate_images as gi

    return torch.cat(
        [r.images for r in gi.generate_images(net, seeds=[3, 4, 5], num_steps=3, verbose=False, device="cpu", **kwargs)]
    )


def test_compile_failure_falls_back_to_eager_with_one_line(monkeypatch, capsys):
    net = tiny_net().eval()
    expected = _images(net)

    def broken_compile(module, **kwargs):
        def fail(*args, **kwargs):
            raise RuntimeError("no C compiler\nfound anywhere")

        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    images = _images(net, compile=True)
    assert torch.equal(images, expected)
    lines = [line for line in capsys.readouterr().out.splitlines() if "torch.compile failed" in line]
    assert lines == ["torch.compile failed, running eagerly instead: no C compiler found anywhere"]


def test_compiled_sampling_matches_eager_across_batches():
    net = tiny_net().eval()
    expected = _images(net)
    for batch in (3, 2):
        images = _images(net, compile=True, max_batch_size=batch)
        assert (images.int() - expected.int()).abs().max() <= 1  # uint8 rounding of fp32-close outputs
    # The compiled sampler (with inductor's weight freezing) sees weights edited between calls.
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 4:
                p.mul_(torch.rand_like(p) + 0.5)
    edited = _images(net)
    assert (edited.int() - expected.int()).abs().max() > 8
    assert (_images(net, compile=True, max_batch_size=3).int() - edited.int()).abs().max() <= 1


def test_gpu_check_without_gpu_says_so_and_exits_0():
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "No GPU is present" in proc.stdout

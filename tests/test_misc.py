"""Tests for torch_utils.misc: constants, seeding, the infinite sampler and module helpers."""

import inspect

import numpy as np
import pytest
import torch

from torch_utils import misc

# ----------------------------------------------------------------------------
# constant / const_like (called by the embedded source of reference pickles).


def test_constant_and_const_like_signatures():
    assert list(inspect.signature(misc.constant).parameters)[:5] == [
        "value",
        "shape",
        "dtype",
        "device",
        "memory_format",
    ]
    assert list(inspect.signature(misc.const_like).parameters)[:5] == ["ref", "value", "shape", "dtype", "device"]


def test_constant_is_cached_and_correct():
    a = misc.constant([1.0, 2.0], shape=[3, 2], dtype=torch.float16)
    assert a.dtype == torch.float16 and a.shape == (3, 2) and a.device.type == "cpu"
    assert torch.equal(a, torch.tensor([[1.0, 2.0]] * 3, dtype=torch.float16))
    assert misc.constant([1.0, 2.0], shape=(3, 2), dtype=torch.float16) is a
    assert misc.constant([1.0, 2.0], shape=(3, 2), dtype=torch.float32) is not a
    assert misc.constant([1.0, 2.5], shape=(3, 2), dtype=torch.float16) is not a
    b = misc.constant(0.5)
    assert b.dtype == torch.get_default_dtype() and b.shape == () and float(b) == 0.5
    c = misc.constant(np.ones([2, 3, 4, 5]), memory_format=torch.channels_last)
    assert c.is_contiguous(memory_format=torch.channels_last)


def test_const_like_follows_reference():
    ref = torch.zeros(4, dtype=torch.float64)
    x = misc.const_like(ref, 3)
    assert x.dtype == torch.float64 and x.device == ref.device and float(x) == 3
    assert misc.const_like(ref, 3) is x
    y = misc.const_like(ref, [1, 2], dtype=torch.int32, shape=[2, 2])
    assert y.dtype == torch.int32 and y.tolist() == [[1, 2], [1, 2]]


def test_constant_made_in_inference_mode_does_not_leak_into_autograd():
    with torch.inference_mode():
        inside = misc.constant(7.25, dtype=torch.float32)
    outside = misc.constant(7.25, dtype=torch.float32)
    assert outside is not inside
    w = torch.ones(2, requires_grad=True)
    (w * outside).sum().backward()
    assert torch.equal(w.grad, torch.full([2], 7.25))


# ----------------------------------------------------------------------------
# Seeding.


def test_set_random_seed_matches_spec_rule():
    misc.set_random_seed(3, 1, 4096)
    t1, n1 = torch.randn(5), np.random.rand(3)
    seed = hash((3, 1, 4096)) % 2147483648
    torch.manual_seed(seed)
    np.random.seed(seed)
    assert torch.equal(t1, torch.randn(5))
    assert np.array_equal(n1, np.random.rand(3))
    misc.set_random_seed(3, 1, 4097)
    assert not torch.equal(t1, torch.randn(5))


def test_set_random_seed_uses_tuple_hash():
    # hash of a tuple of small ints is fixed in CPython (xxHash-based since 3.8); spot-check that
    # set_random_seed(0) is seeding with hash((0,)) rather than with 0.
    misc.set_random_seed(0)
    a = torch.randn(3)
    torch.manual_seed(0)
    assert not torch.equal(a, torch.randn(3))
    torch.manual_seed(hash((0,)) % (1 << 31))
    assert torch.equal(a, torch.randn(3))


# ----------------------------------------------------------------------------
# InfiniteSampler.


def _reference_indices(n, seed, start, stride, count):
    """The reference's rule written out the slow way."""
    perms = {}  # epoch -> permutation
    out = []
    idx = start
    for _ in range(count):
        epoch = idx // n
        if epoch not in perms:
            perms[epoch] = np.random.RandomState(hash((seed, epoch)) % 2147483648).permutation(n)
        out.append(int(perms[epoch][idx % n]))
        idx += stride
    return out


def _take(sampler, count):
    it = iter(sampler)
    return [next(it) for _ in range(count)]


@pytest.mark.parametrize(
    "rank, num_replicas, start_idx", [(0, 1, 0), (0, 2, 0), (1, 2, 0), (0, 2, 1234), (1, 2, 1234), (2, 3, 77)]
)
def test_infinite_sampler_matches_spec(rank, num_replicas, start_idx):
    dataset = list(range(97))
    sampler = misc.InfiniteSampler(dataset, rank=rank, num_replicas=num_replicas, seed=5, start_idx=start_idx)
    got = _take(sampler, 3000)
    assert got == _reference_indices(97, 5, start_idx + rank, num_replicas, 3000)


def test_infinite_sampler_epochs_are_permutations_and_ranks_interleave():
    n = 50
    single = _take(misc.InfiniteSampler(list(range(n)), seed=1), 3 * n)
    for e in range(3):
        assert sorted(single[e * n : (e + 1) * n]) == list(range(n))
    assert single[:n] != single[n : 2 * n]  # reshuffled per epoch
    r0 = _take(misc.InfiniteSampler(list(range(n)), rank=0, num_replicas=2, seed=1), n)
    r1 = _take(misc.InfiniteSampler(list(range(n)), rank=1, num_replicas=2, seed=1), n)
    assert r0 == single[0::2][:n] and r1 == single[1::2][:n]
    resumed = _take(misc.InfiniteSampler(list(range(n)), seed=1, start_idx=60), 40)
    assert resumed == single[60:100]


def test_infinite_sampler_with_dataloader():
    dataset = torch.arange(10, dtype=torch.float32) * 10
    sampler = misc.InfiniteSampler(dataset, seed=2)
    loader = iter(torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=4))
    batch = next(loader)
    assert batch.tolist() == [10.0 * i for i in _reference_indices(10, 2, 0, 1, 4)]
    with pytest.raises(ValueError):
        misc.InfiniteSampler([], seed=0)


# ----------------------------------------------------------------------------
# Module helpers.


def _small_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 8 * 8, 5),
    )


def test_copy_params_and_buffers():
    src, dst = _small_net(), _small_net()
    with torch.no_grad():
        for t in misc.params_and_buffers(src):
            t.add_(1 + torch.rand_like(t.float()).to(t.dtype))
    dst = dst.double()
    misc.copy_params_and_buffers(src, dst, require_all=True)
    for (name, a), (_, b) in zip(misc.named_params_and_buffers(src), misc.named_params_and_buffers(dst)):
        assert b.dtype == (torch.float64 if a.is_floating_point() else a.dtype), name
        assert torch.equal(a.to(b.dtype), b), name
    bigger = torch.nn.Sequential(*_small_net(), torch.nn.Linear(5, 2))
    misc.copy_params_and_buffers(src, bigger)  # extra tensors are allowed by default
    with pytest.raises(KeyError, match="5.weight"):
        misc.copy_params_and_buffers(src, bigger, require_all=True)


def test_params_and_buffers_order():
    net = _small_net()
    names = [name for name, _ in misc.named_params_and_buffers(net)]
    assert names == [n for n, _ in net.named_parameters()] + [n for n, _ in net.named_buffers()]
    assert len(misc.params_and_buffers(net)) == len(names)


def test_ddp_sync_and_consistency_outside_ddp():
    net = _small_net()
    with misc.ddp_sync(net, sync=False):
        net(torch.randn(2, 3, 8, 8)).sum().backward()
    assert net[0].weight.grad is not None
    misc.check_ddp_consistency(net)  # no process group: nothing to compare


def test_print_module_summary(capsys):
    net = _small_net().eval()
    x = torch.randn(2, 3, 8, 8)
    out = misc.print_module_summary(net, [x])
    assert torch.equal(out, net(x))
    text = capsys.readouterr().out
    lines = [line.split() for line in text.strip().splitlines()]
    assert lines[0] == ["Sequential", "Parameters", "Buffers", "Output", "shape", "Datatype"]
    rows = {line[0]: line for line in lines[2:]}
    n_params = sum(p.numel() for p in net.parameters())
    n_buffers = sum(b.numel() for b in net.buffers())
    assert rows["Total"][1:3] == [str(n_params), str(n_buffers)]
    assert rows["0"][1] == str(3 * 4 * 9 + 4) and rows["0"][3:5] == ["[2,", "4,"]
    assert rows["1"][2] == str(4 + 4 + 1)  # running mean, var, num_batches_tracked
    assert rows["4"][1] == str(256 * 5 + 5) and " ".join(rows["4"][3:5]) == "[2, 5]"
    assert rows["2"][1:3] == ["-", "-"]  # ReLU: no tensors, but a new output
    assert "<top-level>" not in rows  # Sequential returns Linear's output and owns nothing itself


def test_print_module_summary_skips_redundant_rows(capsys):
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Identity())
    x = torch.randn(4, 3)
    misc.print_module_summary(net, [x])
    rows = [line.split()[0] for line in capsys.readouterr().out.strip().splitlines()[2:]]
    assert rows == ["0", "---", "Total"]  # Identity passes Linear's output on
    misc.print_module_summary(net, [x], skip_redundant=False)
    rows = [line.split()[0] for line in capsys.readouterr().out.strip().splitlines()[2:]]
    assert rows == ["0", "1", "<top-level>", "---", "Total"]
    misc.print_module_summary(torch.nn.Sequential(net), [x], max_nesting=1, skip_redundant=False)
    rows = [line.split()[0] for line in capsys.readouterr().out.strip().splitlines()[2:]]
    assert rows == ["0", "<top-level>", "---", "Total"]


# ----------------------------------------------------------------------------
# Helpers of the reference's misc module that user scripts call.


def test_assert_shape():
    x = torch.zeros(2, 3, 4)
    misc.assert_shape(x, [2, 3, 4])
    misc.assert_shape(x, [None, 3, None])  # None matches any size
    with pytest.raises(AssertionError, match="number of dimensions: got 3, expected 2"):
        misc.assert_shape(x, [2, 3])
    with pytest.raises(AssertionError, match="dimension 1: got 3, expected 5"):
        misc.assert_shape(x, [None, 5, 4])


def test_tile_images_places_image_n_at_row_n_div_w():
    n, c, h_img, w_img, w, h = 6, 2, 3, 4, 3, 2
    x = torch.arange(n * c * h_img * w_img).reshape(n, c, h_img, w_img)
    grid = misc.tile_images(x, w, h)
    assert grid.shape == (c, h * h_img, w * w_img)
    for idx in range(n):
        row, col = divmod(idx, w)  # row by row, as the reference lays them out
        assert torch.equal(grid[:, row * h_img : (row + 1) * h_img, col * w_img : (col + 1) * w_img], x[idx])
    with pytest.raises(AssertionError):
        misc.tile_images(x, 4, 2)


def test_suppress_tracer_warnings():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with misc.suppress_tracer_warnings():
            warnings.warn("hidden", torch.jit.TracerWarning, stacklevel=2)
        warnings.warn("shown", UserWarning, stacklevel=2)
    assert [str(w.message) for w in caught] == ["shown"]


def test_profiled_function_records_a_range():
    @misc.profiled_function
    def scaled_sum(x, scale=2):
        return (x * scale).sum()

    assert scaled_sum.__name__ == "scaled_sum"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        assert scaled_sum(torch.ones(3), scale=3).item() == 9
    assert "scaled_sum" in [event.name for event in prof.events()]

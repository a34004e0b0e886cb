"""``traces.gpu_busy``: the union of kernel intervals against the traced span, on synthetic events."""

from __future__ import annotations

from types import SimpleNamespace

from torch.autograd import DeviceType

from pbs_cli.engine import traces


def event(start: float, end: float, cuda: bool, annotation: bool = False):
    return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end), is_user_annotation=annotation,
                           device_type=DeviceType.CUDA if cuda else DeviceType.CPU)


def test_busy_time_is_the_union_of_kernels_without_ranges():
    prof = SimpleNamespace(events=lambda: [
        event(100, 5000, cuda=False),                     # the forward on the host, from t = 100 us
        event(1000, 2000, cuda=True), event(1500, 2500, cuda=True),  # overlapping kernels: 1500 us
        event(4000, 4500, cuda=True),                     # after a 1500 us gap: 500 us
        event(900, 4600, cuda=True, annotation=True),     # a "pbs.attention" range: not a kernel
    ])
    assert traces.gpu_busy(prof) == {"span_ms": (4500 - 100) / 1e3, "busy_ms": 2.0}


def test_no_kernels_no_figure():
    assert traces.gpu_busy(SimpleNamespace(events=lambda: [event(0, 10, cuda=False)])) is None

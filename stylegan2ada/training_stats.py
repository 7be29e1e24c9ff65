"""Collecting training statistics without global state: a collector object is passed to whoever reports."""

import collections

import numpy as np
import torch

from .distributed import all_reduce_sum_


def _moments(values):
    """[3] float64 tensor (count, sum, sum of squares) of the elements of a list of tensors on one device."""
    elems = torch.cat([v.flatten() for v in values]).to(torch.float64)
    count = torch.full([], elems.numel(), dtype=torch.float64, device=elems.device)  # a fill, not a host-to-device copy
    return torch.stack([count, elems.sum(), elems.square().sum()])


class StatsCollector:
    """Accumulates count, sum and sum of squares per name; reduced across processes on demand.

    report() only keeps a detached reference to the values (no arithmetic, no copy): a training iteration neither
    waits for the GPU nor launches a kernel per statistic. collect() reduces them once per tick.
    """

    def __init__(self):
        self._values = collections.OrderedDict()                       # name -> list of detached tensors since collect()

    def report(self, name, value):
        """Add the elements of `value` (tensor or number) to the statistic `name`."""
        value = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value, dtype=torch.float64)
        self._values.setdefault(name, []).append(value)

    def names(self):
        """Names reported so far."""
        return list(self._values)

    def collect(self, all_reduce=True):
        """Return {name: dict(num, mean, std)} and reset; sums across processes when torch.distributed runs."""
        names = sorted(self._values)
        rows = []
        for name in names:
            by_device = collections.defaultdict(list)                  # a statistic may mix devices (numbers on the CPU)
            for value in self._values[name]:
                by_device[value.device].append(value)
            rows.append(sum(_moments(values).cpu() for values in by_device.values()))
        stacked = torch.stack(rows) if rows else torch.zeros([0, 3], dtype=torch.float64)
        if all_reduce and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank must reduce the same names in the same order: gather the union first.
            all_names = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(all_names, names)
            union = sorted(set().union(*all_names))
            row = {n: i for i, n in enumerate(names)}
            table = torch.zeros([len(union), 3], dtype=torch.float64)
            for i, n in enumerate(union):
                if n in row:
                    table[i] = stacked[row[n]]
            all_reduce_sum_(table)
            names, stacked = union, table
        self._values.clear()
        result = {}
        for name, (num, total, total_sq) in zip(names, stacked.tolist()):
            if num == 0:
                continue
            mean = total / num
            var = max(total_sq / num - mean ** 2, 0.0)
            result[name] = dict(num=num, mean=mean, std=float(np.sqrt(var)))
        return result

"""Collecting training statistics without global state: a collector object is passed to whoever reports."""

import collections

import numpy as np
import torch

from .distributed import all_reduce_sum_


class StatsCollector:
    """Accumulates count, sum and sum of squares per name; reduced across processes on demand."""

    def __init__(self):
        self._moments = collections.OrderedDict()                      # name -> float64 tensor [3]

    def report(self, name, value):
        """Add the elements of `value` (tensor or number) to the statistic `name`."""
        elems = torch.as_tensor(value).detach().flatten().to(device='cpu', dtype=torch.float64)
        moments = torch.stack([torch.tensor(float(elems.numel()), dtype=torch.float64), elems.sum(), elems.square().sum()])
        if name in self._moments:
            self._moments[name] += moments
        else:
            self._moments[name] = moments

    def names(self):
        """Names reported so far."""
        return list(self._moments)

    def collect(self, all_reduce=True):
        """Return {name: dict(num, mean, std)} and reset; sums across processes when torch.distributed runs."""
        names = sorted(self._moments)
        stacked = torch.stack([self._moments[n] for n in names]) if names else torch.zeros([0, 3], dtype=torch.float64)
        if all_reduce and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank must reduce the same names in the same order: gather the union first.
            all_names = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(all_names, names)
            union = sorted(set().union(*all_names))
            table = torch.zeros([len(union), 3], dtype=torch.float64)
            for i, n in enumerate(union):
                if n in self._moments:
                    table[i] = self._moments[n]
            all_reduce_sum_(table)
            names, stacked = union, table
        self._moments.clear()
        result = {}
        for name, (num, total, total_sq) in zip(names, stacked.tolist()):
            if num == 0:
                continue
            mean = total / num
            var = max(total_sq / num - mean ** 2, 0.0)
            result[name] = dict(num=num, mean=mean, std=float(np.sqrt(var)))
        return result

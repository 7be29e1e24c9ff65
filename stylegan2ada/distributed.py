"""Process groups for multi-process training: gloo on CPU, nccl on CUDA; spawned locally or under torchrun."""

import os
import tempfile

import torch


def torchrun_env():
    """(rank, world_size, local_rank) when launched by torchrun, else None."""
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        return int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), int(os.environ.get('LOCAL_RANK', 0))
    return None


def backend_for(device_type):
    """nccl for CUDA, gloo otherwise."""
    return 'nccl' if device_type == 'cuda' else 'gloo'


def init_process_group(
    rank,               # rank of this process
    world_size,         # number of processes
    device_type,        # 'cpu' or 'cuda'
    init_file = None,   # shared file for file:// rendezvous; None = use torchrun's env:// variables
):
    """Join the process group (no-op for one process)."""
    if world_size <= 1:
        return
    # torch.distributed.nn binds the default group into its functions' default arguments when first imported, which
    # torch does lazily (creating an optimizer imports torch._dynamo, which imports it). Imported after this call,
    # it keeps the group alive past destroy_process_group, and gloo's worker threads then race the interpreter's exit
    # (SIGABRT, "terminate called without an active exception": 7 of 237 two-process runs on a loaded 2-core VM).
    # Imported before, its defaults are None (the default group at call time).
    import torch.distributed.nn  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
    backend = backend_for(device_type)
    if init_file is None:
        torch.distributed.init_process_group(backend=backend, init_method='env://', rank=rank, world_size=world_size)
    else:
        init_method = f'file://{os.path.abspath(init_file)}'
        torch.distributed.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world_size)


def destroy_process_group():
    """Leave the process group if one was joined."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def collective_device():
    """Where tensors must be for collectives: the current CUDA device under nccl, else the CPU."""
    if torch.distributed.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def all_reduce_sum_(tensor):
    """Sum `tensor` over the processes in place, wherever it lives (nccl reduces CUDA tensors only)."""
    device = collective_device()
    if tensor.device == device:
        torch.distributed.all_reduce(tensor)
    else:
        moved = tensor.to(device)
        torch.distributed.all_reduce(moved)
        tensor.copy_(moved)
    return tensor


def spawn(fn, num_processes, args=()):
    """Run fn(rank, init_file, *args) in num_processes processes (or inline for one)."""
    if num_processes <= 1:
        return fn(0, None, *args)
    with tempfile.TemporaryDirectory() as temp_dir:
        init_file = os.path.join(temp_dir, '.torch_distributed_init')
        torch.multiprocessing.spawn(fn=fn, args=(init_file, *args), nprocs=num_processes)
    return None

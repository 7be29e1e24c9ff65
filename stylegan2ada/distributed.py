"""Process groups for multi-process training: gloo on CPU, nccl on CUDA; spawned locally or under torchrun."""

import contextlib
import os
import signal
import tempfile
import threading

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


def spawn(
    fn,                         # fn(rank, init_file, *args), run in each process
    num_processes,              # number of processes; 1 = run fn inline
    args            = (),       # further arguments of fn
    forward_signals = (),       # signals that, while the processes run, are passed on to them as SIGTERM
):
    """Run fn in num_processes processes (or inline for one); returns the forwarded signals received (a list)."""
    if num_processes <= 1:
        fn(0, None, *args)
        return []
    received = []
    with tempfile.TemporaryDirectory() as temp_dir:
        init_file = os.path.join(temp_dir, '.torch_distributed_init')
        context = torch.multiprocessing.start_processes(fn, args=(init_file, *args), nprocs=num_processes, join=False,
                                                        start_method='spawn')

        def forward(signum, frame):
            # `kill PID` of this process alone must still stop the training processes (at their next agreed check);
            # after a signal to the whole group they get it twice, which changes nothing.
            received.append(signum)
            for pid in context.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)

        main_thread = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.signal(sig, forward) for sig in forward_signals} if main_thread else {}
        try:
            while not context.join():
                pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return received

"""Module-level (picklable) builders that break the measuring process as a sticky CUDA error would, for tests of
the profiler's handling of a broken CUDA context; ``--isolate`` children import them by name."""

ILLEGAL_ADDRESS = "CUDA error: an illegal memory access was encountered"


def _raise_again(device, failed):
    # What torch.cuda.empty_cache() does on a broken context: the sticky error, again, at every call.
    raise RuntimeError(ILLEGAL_ADDRESS)


def sticky_build(candidate, base):
    """On c3a p=16 dense: the build fails with an illegal address, and from then on releasing memory in this
    process raises it again (the profiler's release_memory stands in for torch.cuda.empty_cache, which the CPU
    does not call)."""
    from circtune.measure import profiler
    from circtune.measure.modules import build_module

    if candidate.method == "c3a" and candidate.block_size == 16 and candidate.backend == "dense":
        profiler.release_memory = _raise_again
        raise RuntimeError(ILLEGAL_ADDRESS)
    return build_module(candidate, base)


def device_assert_build(candidate, base):
    """On c3a p=16 dense: a real sticky CUDA error, an out-of-bounds gather (a device-side assert) on the layer's
    device. Only for --isolate children on a GPU: it breaks the CUDA context of the process it runs in."""
    import torch

    from circtune.measure.modules import build_module

    if candidate.method == "c3a" and candidate.block_size == 16 and candidate.backend == "dense":
        device = base.weight.device
        torch.zeros(3, device=device)[torch.tensor([5], device=device)]
        torch.cuda.synchronize(device)
    return build_module(candidate, base)

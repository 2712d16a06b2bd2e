import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _threads():
    """A test that sets torch's thread count (worker helpers do) would change the CPU fingerprint, and so every store
    key, for the tests after it: put it back. (`main()` itself restores it after `--threads`, see test_cli.)"""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """One intra-op thread, for tests of tiny tensors (gradchecks, reference checks): on a busy 2-core machine two
    threads make each small op 10-20x slower (a 60x60 layer's gradcheck: 12 s of CPU against 0.8). The thread count
    is part of the CPU's fingerprint, so not for a test whose runs meet runs made at another count (a child process
    started without it, a module-scoped run folder). ``_threads`` restores the count afterwards."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _cpu_unless_gpu(request, monkeypatch):
    """A test not marked ``gpu`` assumes the CPU wherever it runs: on a GPU machine, a command without --device
    (and "auto" dtypes) would otherwise measure on CUDA in bf16. The default device is the CPU for it (child
    processes inherit it); ``gpu`` tests see the machine's default."""
    if "gpu" not in request.keywords:
        monkeypatch.setenv("CIRCTUNE_DEVICE", "cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

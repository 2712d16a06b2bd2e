"""Device descriptions and fingerprints: the CPU for real, the GPU path through a fake torch.cuda and pynvml."""

import argparse
import json
import re
import sys
import types

import pytest
import torch

from circtune.cli import devices as devices_cli
from circtune.measure import device as dev
from circtune.measure.device import DeviceInfo, describe_device, software_versions

H100_MAX = {1: 1980, 2: 2619}  # NVML_CLOCK_SM, NVML_CLOCK_MEM


class FakeNVML(types.ModuleType):
    """Just enough of pynvml: GPUs keyed by NVML index, each findable by PCI bus id and UUID."""

    NVML_CLOCK_SM = 1
    NVML_CLOCK_MEM = 2

    class NVMLError(Exception):
        pass

    def __init__(self, n_gpus=4):
        super().__init__("pynvml")
        self.gpus = [{"bus": f"00000000:{0x18 + i:02X}:00.0", "uuid": f"GPU-uuid-{i}", "power_mw": 700_000 + 1000 * i,
                      "clock": {1: 1755, 2: 2619}} for i in range(n_gpus)]
        self.init_error = None
        self.shutdowns = 0

    def nvmlInit(self):
        if self.init_error:
            raise self.init_error

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, i):
        if not 0 <= i < len(self.gpus):
            raise self.NVMLError("Invalid Argument")
        return i

    def _find(self, key, value):
        for i, gpu in enumerate(self.gpus):
            if gpu[key] == value:
                return i
        raise self.NVMLError("Not Found")

    def nvmlDeviceGetHandleByPciBusId(self, bus):
        return self._find("bus", bus)

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return self._find("uuid", uuid)

    def nvmlDeviceGetMaxClockInfo(self, h, clock):
        return H100_MAX[clock]

    def nvmlDeviceGetClockInfo(self, h, clock):
        return self.gpus[h]["clock"][clock]

    def nvmlDeviceGetPowerManagementLimit(self, h):
        power = self.gpus[h]["power_mw"]
        if isinstance(power, Exception):
            raise power
        return power

    def nvmlSystemGetDriverVersion(self):
        return b"570.86.15"


def _props(**extra):
    return types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=85_017_624_576, multi_processor_count=132,
                                 major=9, minor=0, **extra)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Two visible CUDA devices; returns (nvml, props) so a test can change either."""
    props = [_props(), _props()]
    monkeypatch.delenv(dev.DEVICE_ENV, raising=False)  # the default device is the (fake) GPU's
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(props))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    nvml = FakeNVML()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    return nvml, props


# --- CPU ------------------------------------------------------------------------------------------------------


def test_cpu_description_has_the_fields():
    info = describe_device("cpu", threads=3)
    assert (info.kind, info.index) == ("cpu", None)
    assert info.name == info.properties["cpu_model"] and info.name
    for key in ("physical_cores", "logical_cpus", "total_memory_mb"):
        assert isinstance(info.properties[key], int) and info.properties[key] > 0, key
    assert info.properties["threads"] == 3
    assert info.properties["machine"]
    assert info.software == software_versions()
    assert re.fullmatch(r"[0-9a-f]{16}", info.fingerprint)


def test_threads_default_to_torch():
    assert describe_device("cpu").properties["threads"] == torch.get_num_threads()


def test_cpu_fingerprint_stable_and_keyed_by_threads():
    a, b = describe_device("cpu", threads=2), describe_device("cpu", threads=2)
    assert a.fingerprint == b.fingerprint and a == b and hash(a) == hash(b)
    assert describe_device("cpu", threads=1).fingerprint != a.fingerprint


def test_round_trip_through_json():
    info = describe_device("cpu", threads=2)
    again = DeviceInfo.from_dict(json.loads(json.dumps(info.to_dict())))
    assert again == info
    d = info.to_dict()
    del d["fingerprint"]
    assert DeviceInfo.from_dict(d).fingerprint == info.fingerprint  # recomputed the same way


def test_cpu_label_is_a_slug():
    label = describe_device("cpu", threads=2).label
    assert re.fullmatch(r"cpu-[a-z0-9-]+-2t", label), label


@pytest.mark.parametrize("name, label", [
    ("NVIDIA H100 80GB HBM3", "h100"),
    ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
    ("NVIDIA H100 PCIe", "h100-pcie"),
    ("NVIDIA GeForce RTX 4090", "rtx-4090"),
])
def test_gpu_labels(name, label):
    assert dev._gpu_label(name) == label


def test_cpu_slug():
    assert dev._cpu_slug("Intel(R) Xeon(R) Platinum 8480+ @ 2.00GHz") == "intel-xeon-platinum-8480"
    assert dev._cpu_slug("AMD EPYC 7763 64-Core Processor") == "amd-epyc-7763"


def test_parse_cpuinfo_counts_physical_cores():
    # 2 sockets x 2 cores x 2 hyperthreads = 8 logical CPUs, 4 physical cores.
    blocks = [f"processor\t: {n}\nmodel name\t: Test CPU 9000\nphysical id\t: {s}\ncore id\t\t: {c}"
              for n, (s, c) in enumerate((s, c) for s in range(2) for c in range(2) for _ in range(2))]
    assert dev._parse_cpuinfo("\n\n".join(blocks) + "\n") == ("Test CPU 9000", 4)
    assert dev._parse_cpuinfo("processor\t: 0\nBogoMIPS\t: 50.00\n") == (None, None)  # ARM-style


@pytest.mark.parametrize("name", ["mps", "xla", "cuda", "cuda:3", "nonsense"])
def test_unavailable_device_is_an_error_naming_it(name, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on the CPU, on a GPU machine too
    with pytest.raises(ValueError, match=re.escape(repr(name))) as e:
        describe_device(name)
    assert "available: " in str(e.value) and "cpu" in str(e.value)


@pytest.mark.parametrize("threads", [0, -1, 1.5, True])
def test_bad_threads(threads):
    with pytest.raises(ValueError, match="threads must be a positive int"):
        describe_device("cpu", threads=threads)


# --- GPU, faked -----------------------------------------------------------------------------------------------


def test_gpu_description(fake_gpu):
    nvml, _ = fake_gpu
    info = describe_device("cuda:1")
    p = info.properties
    assert (info.kind, info.name, info.index) == ("cuda", "NVIDIA H100 80GB HBM3", 1)
    assert p["total_memory_mb"] == 85_017_624_576 // 2**20 and p["sm_count"] == 132
    assert p["compute_capability"] == "9.0"
    assert (p["max_sm_clock_mhz"], p["max_mem_clock_mhz"], p["sm_clock_mhz"]) == (1980, 2619, 1755)
    assert p["driver_version"] == "570.86.15" and p["cuda_version"] == torch.version.cuda
    assert p["nvml"] == "ok" and p["power_limit_w"] == 701.0 and p["nvml_match"] == "index 1 (unverified)"
    assert info.label == "h100"
    assert nvml.shutdowns == 1
    assert describe_device().index == 0 and describe_device("cuda").index == 0
    assert dev.default_device() == torch.device("cuda", 0)
    assert DeviceInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info


def test_gpu_fingerprint_ignores_current_clocks_and_index(fake_gpu):
    nvml, _ = fake_gpu
    before = describe_device("cuda:0")
    for gpu in nvml.gpus:
        gpu["clock"] = {1: 1200, 2: 1593}
    after = describe_device("cuda:0")
    assert after.properties["sm_clock_mhz"] == 1200 and after.fingerprint == before.fingerprint
    nvml.gpus[1]["power_mw"] = nvml.gpus[0]["power_mw"]
    assert describe_device("cuda:1").fingerprint == before.fingerprint  # same model, same settings: same key
    nvml.gpus[0]["power_mw"] = 400_000
    assert describe_device("cuda:0").fingerprint != before.fingerprint


def test_gpu_fingerprint_excludes_software(fake_gpu, monkeypatch):
    before = describe_device("cuda:0")
    monkeypatch.setattr(dev, "software_versions", lambda: {"torch": "9.9", "triton": None, "circtune": "9",
                                                            "python": "3", "cuda": "99"})
    after = describe_device("cuda:0")
    assert after.software["torch"] == "9.9" and after.fingerprint == before.fingerprint


def test_nvml_index_honours_cuda_visible_devices(fake_gpu, monkeypatch):
    nvml, _ = fake_gpu
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    info = describe_device("cuda:1")
    assert info.properties["nvml_match"].startswith("index 3") and info.properties["power_limit_w"] == 703.0


@pytest.mark.parametrize("extra, match, nvml_index", [
    ({"pci_bus_id": 0x1B, "pci_device_id": 0, "pci_domain_id": 0}, "pci_bus_id 00000000:1B:00.0", 3),
    ({"uuid": "uuid-2"}, "uuid GPU-uuid-2", 2),
])
def test_nvml_matched_by_pci_bus_or_uuid(fake_gpu, monkeypatch, extra, match, nvml_index):
    _, props = fake_gpu
    props[0] = _props(**extra)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # disagrees on purpose: the PCI bus id / UUID wins
    p = describe_device("cuda:0").properties
    assert p["nvml_match"] == match and p["power_limit_w"] == 700.0 + nvml_index


def test_nvml_init_failure_is_recorded(fake_gpu):
    nvml, _ = fake_gpu
    nvml.init_error = nvml.NVMLError("Driver Not Loaded")
    info = describe_device("cuda:0")
    p = info.properties
    assert p["nvml"].startswith("unavailable: ") and "Driver Not Loaded" in p["nvml"]
    assert p["sm_count"] == 132 and p["max_sm_clock_mhz"] is None and p["power_limit_w"] is None
    assert re.fullmatch(r"[0-9a-f]{16}", info.fingerprint)


def test_pynvml_missing_is_recorded(fake_gpu, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    assert describe_device("cuda:0").properties["nvml"].startswith("unavailable: pynvml not installed")


def test_one_unsupported_query_keeps_the_rest(fake_gpu):
    nvml, _ = fake_gpu
    nvml.gpus[0]["power_mw"] = nvml.NVMLError("Not Supported")
    p = describe_device("cuda:0").properties
    assert p["nvml"] == "ok" and p["power_limit_w"] is None and p["max_sm_clock_mhz"] == 1980
    assert p["nvml_errors"] == ["power_limit_w: Not Supported"]
    assert nvml.shutdowns == 1


def test_gpu_index_out_of_range(fake_gpu):
    with pytest.raises(ValueError, match=r"'cuda:2' is not available: 2 CUDA device\(s\) visible.*cuda:0, cuda:1"):
        describe_device("cuda:2")


def test_auto_dtype_asks_the_chosen_device_for_native_bf16(fake_gpu, monkeypatch):
    """cuda:0 an H100 (9.0), cuda:1 a T4 (7.5) while cuda:0 is current; torch's own test would say yes to both
    (it counts emulation, and asks the current device)."""
    from circtune.space import resolve_dtype

    _, props = fake_gpu
    props[1] = types.SimpleNamespace(**{**vars(props[1]), "name": "Tesla T4", "major": 7, "minor": 5})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (props[i].major, props[i].minor))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert dev.cuda_capability("cuda:1") == (7, 5) and dev.cuda_capability("cuda") == (9, 0)
    assert resolve_dtype("auto", torch.device("cuda", 1)) == "fp32"
    assert resolve_dtype("auto", torch.device("cuda", 0)) == "bf16"
    assert resolve_dtype("auto", torch.device("cuda")) == "bf16"  # the current device, cuda:0
    props[0] = types.SimpleNamespace(**{**vars(props[0]), "name": "Tesla V100", "major": 7, "minor": 0})
    assert resolve_dtype("auto", torch.device("cuda", 0)) == "fp32"
    assert not dev.bf16_supported("cpu") and resolve_dtype("auto", torch.device("cpu")) == "fp32"
    assert resolve_dtype("bf16", torch.device("cuda", 1)) == "bf16"  # asked for explicitly: the user's call


def _nvidia_smi(monkeypatch, which, stdout="", returncode=0, error=None):
    """The nvidia-smi probe, injected: ``which`` its path (None: not installed), then what it answers."""
    import subprocess

    calls = []

    def run(argv, **kwargs):
        calls.append(argv)
        if error is not None:
            raise error
        return subprocess.CompletedProcess(argv, returncode, stdout, "")

    monkeypatch.delenv(dev.DEVICE_ENV, raising=False)  # no device chosen: auto
    monkeypatch.setattr(dev.shutil, "which", lambda name: which if name == "nvidia-smi" else None)
    monkeypatch.setattr(dev.subprocess, "run", run)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return calls


def test_warns_when_torch_cannot_see_the_gpu_nvidia_smi_lists(monkeypatch):
    import subprocess

    calls = _nvidia_smi(monkeypatch, "/usr/bin/nvidia-smi", "NVIDIA H200\nNVIDIA H200\n")
    warning = dev.unseen_gpu_warning()
    assert calls and calls[0][0] == "/usr/bin/nvidia-smi"
    assert "\n" not in warning and f"torch {torch.__version__}" in warning
    assert "(NVIDIA H200, NVIDIA H200)" in warning and "--device cpu" in warning and "CUDA build" in warning
    for which, out, code, error in ((None, "", 0, None), ("/x/nvidia-smi", "", 0, None),
                                    ("/x/nvidia-smi", "NVIDIA H200\n", 9, None),  # no driver loaded
                                    ("/x/nvidia-smi", "", 0, subprocess.TimeoutExpired("nvidia-smi", 5))):
        _nvidia_smi(monkeypatch, which, out, code, error)
        assert dev.unseen_gpu_warning() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # torch sees it: nothing to say, nothing run
    calls = _nvidia_smi(monkeypatch, "/usr/bin/nvidia-smi", "NVIDIA H200\n")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dev.unseen_gpu_warning() is None and calls == []


def test_profile_without_device_prints_the_warning_once(monkeypatch, tmp_path, capsys):
    from circtune.cli.main import main

    _nvidia_smi(monkeypatch, "/usr/bin/nvidia-smi", "NVIDIA H200\n")
    args = ["profile", "--model", "tiny_models:two_shapes", "--targets", "square", "--tokens", "4", "--warmup", "0",
            "--min-reps", "1", "--max-reps", "1", "--min-time", "0", "--no-peft", "--quiet", "--out",
            str(tmp_path / "out"), "--space", str(tmp_path / "space.toml")]
    (tmp_path / "space.toml").write_text('methods = ["c3a"]\nblock_sizes = [16]\nbackends = ["torch"]\n'
                                         'transforms = ["rfft"]\n')
    assert main(args) == 0
    err = capsys.readouterr().err
    assert err.count("cannot see the GPU that nvidia-smi lists (NVIDIA H200)") == 1
    assert main([*args, "--device", "cpu"]) == 0  # on purpose: no warning
    assert "nvidia-smi" not in capsys.readouterr().err
    monkeypatch.setenv(dev.DEVICE_ENV, "cpu")  # chosen through the environment: on purpose too
    assert main(args) == 0
    assert "nvidia-smi" not in capsys.readouterr().err


def test_the_default_device_can_be_set_in_the_environment(fake_gpu, monkeypatch):
    """Every test not marked gpu runs with CIRCTUNE_DEVICE=cpu (conftest), so that a GPU machine runs the suite as
    the CPU does; here a machine with (fake) GPUs."""
    assert dev.default_device() == torch.device("cuda", 0)
    monkeypatch.setenv(dev.DEVICE_ENV, "cpu")
    assert dev.default_device() == torch.device("cpu") and describe_device().kind == "cpu"
    monkeypatch.setenv(dev.DEVICE_ENV, "cuda:1")
    assert describe_device().index == 1
    monkeypatch.setenv(dev.DEVICE_ENV, "tpu")
    with pytest.raises(ValueError, match=r"CIRCTUNE_DEVICE='tpu' is not a device torch knows"):
        describe_device()


def test_tests_not_marked_gpu_run_on_the_cpu():
    import os

    assert os.environ[dev.DEVICE_ENV] == "cpu" and dev.default_device() == torch.device("cpu")


# --- CLI ------------------------------------------------------------------------------------------------------


def _cli(*argv):
    p = argparse.ArgumentParser()
    devices_cli.add_arguments(p)
    return devices_cli.run(p.parse_args(list(argv)))


def test_cli_text(capsys):
    assert _cli("--device", "cpu", "--threads", "2") == 0
    out = capsys.readouterr().out
    info = describe_device("cpu", threads=2)
    assert out.startswith(f"cpu  {info.name}\n")
    assert re.search(rf"^  fingerprint: +{info.fingerprint}$", out, re.MULTILINE)
    assert re.search(r"^  threads: +2$", out, re.MULTILINE)
    assert "\nsoftware\n" in out and re.search(r"^  torch: +\S+$", out, re.MULTILINE)
    block = out.split("\n\n")[0].splitlines()[1:]
    assert len({len(line) - len(line.split(": ", 1)[1].lstrip()) for line in block}) == 1  # values aligned


def test_cli_lists_gpus_then_cpu_as_json(fake_gpu, capsys):
    assert _cli("--json", "--threads", "1") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["kind"], r["index"]) for r in rows] == [("cuda", 0), ("cuda", 1), ("cpu", None)]
    assert rows[2]["properties"]["threads"] == 1
    assert DeviceInfo.from_dict(rows[0]) == describe_device("cuda:0")


def test_cli_unavailable_device_is_a_usage_error():
    from circtune.errors import UsageError

    with pytest.raises(UsageError, match="'mps'"):
        _cli("--device", "mps")
    with pytest.raises(UsageError, match="--threads must be at least 1"):
        _cli("--threads", "0")

"""The device-aware default preset: on CUDA, an unchosen preset without a GPU kernel becomes `gpu`."""

from pbs_cli.engine import presets


def test_cuda_default_switches_to_gpu_native_profile():
    cpu_cfg, cpu_name = presets.resolve_config(None, device="cpu")
    cuda_cfg, cuda_name = presets.resolve_config(None, device="cuda:0")
    assert cpu_name == presets.DEFAULT_PROFILE
    if cpu_cfg.beyond_published():
        assert cuda_name == presets.GPU_PROFILE and not cuda_cfg.beyond_published()
    else:
        assert cuda_name == cpu_name


def test_explicit_profile_is_kept_on_cuda_and_overrides_apply():
    cfg, name = presets.resolve_config("default", device="cuda")
    assert name == "default"
    cfg, name = presets.resolve_config("default", device="cuda", explicit=False, threshold=0.7)
    assert name == presets.GPU_PROFILE and cfg.threshold == 0.7

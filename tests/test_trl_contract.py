"""The TRL names trl_tip/_trl_compat.py relies on exist in the installed TRL; what the seam replaces, it restores."""

import importlib

import pytest

from trl_tip import _trl_compat


@pytest.mark.parametrize("module_name", _trl_compat._TRAINER_MODULES_BUILDING_VLLM)
def test_trainers_build_their_vllm_backend_from_a_module_name(module_name):
    # `platform_vllm_generation` swaps this name while a trainer is built; if TRL stops reading it, the CPU path is
    # never taken and TRL's own weight push fails on vLLM's CPU build.
    from trl.generation.vllm_generation import VLLMGeneration

    assert importlib.import_module(module_name).VLLMGeneration is VLLMGeneration


def test_vllm_generation_has_the_hooks_the_cpu_path_overrides():
    # `CPUVLLMGeneration` overrides `_init_vllm` and `sync_weights`, and pushes what `_iter_named_params` yields.
    from trl.generation.vllm_generation import VLLMGeneration

    for name in ("_init_vllm", "sync_weights", "_iter_named_params", "generate"):
        assert callable(getattr(VLLMGeneration, name, None)), f"trl's VLLMGeneration has no {name}"


def test_the_swap_is_scoped_to_the_construction(monkeypatch):
    from trl.generation.vllm_generation import VLLMGeneration

    from trl_tip.vllm_cpu import CPUVLLMGeneration

    modules = [importlib.import_module(name) for name in _trl_compat._TRAINER_MODULES_BUILDING_VLLM]

    class Args:
        use_vllm = True

    monkeypatch.setattr(_trl_compat, "vllm_runs_on_cpu", lambda: True)
    with pytest.raises(RuntimeError), _trl_compat.platform_vllm_generation(Args()):
        assert all(module.VLLMGeneration is CPUVLLMGeneration for module in modules)
        raise RuntimeError("a trainer that fails to build")
    assert all(module.VLLMGeneration is VLLMGeneration for module in modules)
    # Without use_vllm, or off vLLM's CPU platform, nothing is replaced.
    Args.use_vllm = False
    with _trl_compat.platform_vllm_generation(Args()):
        assert all(module.VLLMGeneration is VLLMGeneration for module in modules)
    monkeypatch.setattr(_trl_compat, "vllm_runs_on_cpu", lambda: False)
    with _trl_compat.platform_vllm_generation(type("WithVLLM", (), {"use_vllm": True})()):
        assert all(module.VLLMGeneration is VLLMGeneration for module in modules)

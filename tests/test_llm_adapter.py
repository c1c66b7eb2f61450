"""Issue 13 build 2: the gated adapter set up properly and compared fairly (equal LoRA
coverage, keys/values through the layer's input norm, per-head gates with their own
learning rate, depth as a knob, logged gates) and task routing by the question."""

from __future__ import annotations

import pytest

from fed_iotlm.llm.features import FUSED
from fed_iotlm.llm.loading import TINY_MODEL, load_lm
from fed_iotlm.llm.sensor_lm import ConditioningSettings, LoraSettings, SensorLM

NAMES = ["imu", FUSED]


def _cond(kind: str, layers: int = 2, tasks=("state",)) -> ConditioningSettings:
    return ConditioningSettings(
        kind, 2, adapter_layers=layers, names=NAMES, tasks=list(tasks), feature_dim=8
    )


@pytest.mark.parametrize("top_layers", [None, 1])
def test_prefix_and_adapter_get_lora_on_the_same_modules_and_layers(top_layers):
    """One llm.lora.top_layers for every conditioning on a shared base (the first version
    gave the adapter LoRA in its own layers only and prefix in all)."""
    base = load_lm(TINY_MODEL)
    lora = LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj"), top_layers=top_layers)
    coverage = {}
    for kind in ("prefix", "adapter", "names"):
        model = SensorLM(base, lora, _cond(kind, layers=1), adapter_name=kind)
        base.model = model.peft
        coverage[kind] = model.lora_coverage()
    want_layers = [0, 1] if top_layers is None else [1]
    assert coverage["prefix"] == {
        "layers": want_layers,
        "modules": ["q_proj", "v_proj"],
        "adapted": 2 * len(want_layers),
    }
    assert coverage["adapter"] == coverage["prefix"] == coverage["names"]


def test_lora_coverage_refuses_the_old_auto_and_out_of_range_depths():
    lm = load_lm(TINY_MODEL)
    with pytest.raises(ValueError, match=r"llm.lora.top_layers='auto'.*same for every"):
        SensorLM(lm, LoraSettings(top_layers="auto"), _cond("adapter"))
    with pytest.raises(ValueError, match=r"top_layers=3: the LM has 2 decoder layers"):
        SensorLM(lm, LoraSettings(top_layers=3), _cond("prefix"))

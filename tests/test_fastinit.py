"""Building a model without its random initial weights: identical once the checkpoint is loaded."""
from __future__ import annotations

import open_clip
import pytest
import torch

from steadyclip.model._fastinit import not_loaded, skip_parameter_init


@pytest.mark.parametrize("arch", ["ViT-B-32", "RN50"])
def test_skipped_init_then_full_load_equals_a_normal_build(arch: str) -> None:
    torch.manual_seed(0)
    reference = open_clip.create_model(arch)
    state = reference.state_dict()
    with skip_parameter_init() as skipped:
        model = open_clip.create_model(arch)
    assert len(skipped) > 100  # the Linear/attention/embedding fills really were skipped
    assert not_loaded(model, skipped, state.keys()) == []
    model.load_state_dict(state)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    persistent = set(state)
    ref_buffers = dict(reference.named_buffers())
    for name, buf in model.named_buffers():  # non-persistent buffers (the causal mask) are still computed
        if name not in persistent:
            assert torch.equal(buf, ref_buffers[name]), name


def test_a_skipped_parameter_missing_from_the_checkpoint_is_reported() -> None:
    with skip_parameter_init() as skipped:
        model = open_clip.create_model("RN50")
    keys = set(model.state_dict())
    keys.discard("visual.conv1.weight")
    assert not_loaded(model, skipped, keys) == ["visual.conv1.weight"]


def test_random_draws_that_fill_no_parameter_still_happen() -> None:
    with skip_parameter_init() as skipped:
        plain = torch.empty(1000).uniform_(1.0, 2.0)
        param = torch.nn.Parameter(torch.zeros(10))
        torch.nn.init.normal_(param, mean=5.0)
    assert plain.min() >= 1.0 and plain.max() <= 2.0  # a buffer or temporary gets its values
    assert skipped == [param] and torch.equal(param, torch.zeros(10))  # the parameter was left as built

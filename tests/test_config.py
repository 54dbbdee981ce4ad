"""gradprobe.config: ProbeConfig / JacobianOptions, validated once; attach builds one, Probe takes it."""

from __future__ import annotations

import dataclasses
import inspect

import pandas as pd
import pytest
import torch
from nets import make, make_input

import gradprobe
from gradprobe.config import JacobianOptions, ProbeConfig
from gradprobe.jacobian import jacobian_columns


def test_jacobian_options_are_the_knobs_of_jacobian_columns_plus_the_probes_own():
    # Checked here once, instead of reading jacobian_columns' signature at every attach.
    knobs = set(inspect.signature(jacobian_columns).parameters) - {"captures", "probes", "generator"}
    fields = {f.name for f in dataclasses.fields(JacobianOptions)}
    assert fields == knobs | {"seed", "sub_batch", "batch_dim", "paths_sub_batch"}
    defaults = inspect.signature(jacobian_columns).parameters
    assert JacobianOptions().prod is defaults["prod"].default


def test_attach_takes_exactly_the_fields_of_probe_config():
    params = inspect.signature(gradprobe.attach).parameters
    assert list(params) == ["model"] + [f.name for f in dataclasses.fields(ProbeConfig)]
    defaults = {f.name: f.default for f in dataclasses.fields(ProbeConfig) if f.name != "jacobian_options"}
    assert {k: params[k].default for k in defaults} == defaults
    assert params["jacobian_options"].default is None


def test_probe_config_is_frozen_and_converts_a_mapping_of_jacobian_options():
    config = ProbeConfig(jacobian=True, jacobian_options={"sub_batch": 2, "seed": 3})
    assert config.jacobian_options == JacobianOptions(sub_batch=2, seed=3)
    assert ProbeConfig(jacobian_options=None).jacobian_options == JacobianOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.every = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"every": 0}, "every= must be a positive int or a callable"),
        ({"every": True}, "every= must be a positive int"),
        ({"jacobian": -1}, "jacobian= must be a bool or a positive int"),
        ({"paths": 1.5}, "paths= must be a bool or a positive int"),
        ({"probes": 0}, "probes= must be a positive int"),
        ({"channel_dim": "C"}, "channel_dim= must be None"),
        ({"sink_options": {"chunks": 3}}, r"unknown sink_options \['chunks'\]; the options are"),
        ({"jacobian_options": {"power_iters": -1}}, r"jacobian_options\['power_iters'\] must be an int >= 0"),
        ({"jacobian_options": {"prod_spec": "all"}}, "prod_spec'] must be 'each', 'shared' or 'none'"),
        ({"jacobian_options": {"tol": "small"}}, r"jacobian_options\['tol'\] must be a number"),
    ],
)
def test_a_bad_option_is_refused_at_attach_with_what_to_do(options, message, no_leaks, tmp_path):
    net = no_leaks(make("res_mlp"))
    with pytest.raises(ValueError, match=message):
        gradprobe.attach(net, **options)
    with pytest.raises(ValueError, match=message):
        ProbeConfig(**options)


def test_an_unknown_keyword_is_refused_by_name(no_leaks):
    net = no_leaks(make("res_mlp"))
    with pytest.raises(TypeError, match=r"attach\(\) got unexpected keyword argument\(s\) \['evry'\]"):
        gradprobe.attach(net, evry=2)
    with pytest.raises(TypeError, match="jacobian_options= must be a mapping"):
        gradprobe.attach(net, jacobian_options=[("sub_batch", 2)])


def test_a_sink_with_a_bad_option_leaves_no_folder_behind(tmp_path):
    with pytest.raises(ValueError, match="unknown sink_options"):
        gradprobe.attach(make("res_mlp"), sink=tmp_path / "run", sink_options={"chunk": 1})
    assert not (tmp_path / "run").exists()


def test_probe_built_from_a_config_records_what_attach_records():
    base = make("res_mlp")
    x = make_input("res_mlp")
    frames = []
    config = ProbeConfig(jacobian=True, jacobian_options=JacobianOptions(spec=True))
    for build in (
        lambda net: gradprobe.attach(net, every=1, jacobian=True, jacobian_options={"spec": True}),
        lambda net: gradprobe.Probe(net, config),
        lambda net: gradprobe.Probe(net, jacobian=True, jacobian_options={"spec": True}),
    ):
        net = make("res_mlp")
        net.load_state_dict(base.state_dict())
        with build(net) as probe:
            net(x).pow(2).sum().backward()
        frames.append(probe.frame())
    for other in frames[1:]:
        pd.testing.assert_frame_equal(frames[0], other)


def test_probe_refuses_a_config_and_keywords_together():
    with pytest.raises(TypeError, match=r"takes a gradprobe\.ProbeConfig"):
        gradprobe.Probe(make("res_mlp"), ProbeConfig(), every=2)


def test_saved_metadata_holds_every_jacobian_option_the_seed_included(tmp_path):
    net = make("res_mlp")
    with gradprobe.attach(net, jacobian=True, jacobian_options={"seed": 5}) as probe:
        net(make_input("res_mlp")).pow(2).sum().backward()
    assert probe.meta()["jacobian_options"] == dataclasses.asdict(JacobianOptions(seed=5))
    assert probe.config.jacobian_options.seed == 5
    assert torch.is_grad_enabled()

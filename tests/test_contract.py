"""The contract (sqlgpt/contract.py) is the one declaration both loaders
read: its config fields are the architecture's, its components are the
tensor table's, and the C header build_ext.py generates from it says the
same."""
import dataclasses
import importlib.util

from sqlgpt import contract
from sqlgpt.model.arch import ArchConfig, hf_to_gguf, preset, tensor_table

from architectures import ARCHITECTURES, arch_of
from conftest import ROOT

# the checkout's builder, by its path (the installed package has none)
_spec = importlib.util.spec_from_file_location("sqlgpt_builder", ROOT / "build_ext.py")
build_ext = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_ext)


def test_the_config_fields_are_the_architectures():
    stored = {f.name for f in dataclasses.fields(ArchConfig)} - {"preset", "init"}
    assert set(contract.ARCH_FIELDS) == stored


def test_every_tensor_of_every_architecture_is_a_declared_component():
    declared = {c[0] for c in contract.LAYER_COMPONENTS + contract.MODEL_COMPONENTS}
    for name in ARCHITECTURES:
        arch = arch_of(name)
        for spec in tensor_table(arch):
            assert spec.component in declared
            gguf = hf_to_gguf(arch)
            assert spec.hf is None or spec.hf[0] in gguf, spec


def test_the_generated_header_declares_each_component_and_field():
    header = build_ext.contract_header()
    for name, *_ in contract.LAYER_COMPONENTS:
        assert f"offsetof(LayerTensors, {name})" in header
    for name, *_ in contract.MODEL_COMPONENTS:
        assert f"offsetof(ModelTensors, {name})" in header
    for name in contract.ARCH_FIELDS:
        assert f"offsetof(ArchFields, {name})" in header
    assert f"#define SQLGPT_SCHEMA_VERSION {contract.SCHEMA_VERSION}" in header


def test_presence_rules_read_as_the_table_builds():
    arch = preset("llama", num_layers=1, qkv_bias=True)
    names = {s.component for s in tensor_table(arch)}
    assert {"q_b", "k_b", "v_b"} <= names and not {"proj_b", "fc1_b"} & names
    assert contract.holds((("qkv_bias",), ("bias",)), arch)
    assert not contract.holds(((), )[1:], arch)  # () is never

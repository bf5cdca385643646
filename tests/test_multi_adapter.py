"""Several named adapters per model (issue 12, item 2): add / set / delete / combine / mixed batches / save-load.

PEFT 0.21.2 is the oracle wherever it has the same operation: ``add_adapter``, ``set_adapter``,
``delete_adapter``, ``add_weighted_adapter`` ("linear", "cat", "svd") and the ``adapter_names`` forward argument.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model

import rankwise
from rankwise.core.io import adapter_state

TOL = {"atol": 1e-5, "rtol": 1e-5}


def base_net() -> nn.Sequential:
    """16 -> proj -> 24 -> relu -> out -> 12."""
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(proj=nn.Linear(16, 24), act=nn.ReLU(), out=nn.Linear(24, 12))).eval()


def inputs(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 5, 16, generator=torch.Generator().manual_seed(1))


# adapter name -> (rank, alpha, targets, rsLoRA)
SPECS = {"default": (4, 6.0, ["proj", "out"], False), "b": (4, 10.0, ["proj"], False)}


def peft_config(r, alpha, targets, rslora) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, use_rslora=rslora)


def pair(specs=SPECS):
    """The same base with the same named LoRA adapters in PEFT and in rankwise (PEFT's random tensors copied in)."""
    base = base_net()
    names = list(specs)
    theirs = get_peft_model(copy.deepcopy(base), peft_config(*specs[names[0]]), adapter_name=names[0])
    ours = rankwise.add_adapter(copy.deepcopy(base), names[0], lora(*specs[names[0]]))
    for name in names[1:]:
        theirs.add_adapter(name, peft_config(*specs[name]))
        rankwise.add_adapter(ours, name, lora(*specs[name]))
    copy_tensors(theirs, ours, names)
    return base, theirs.eval(), ours.eval()


def lora(r, alpha, targets, rslora) -> rankwise.LoRAConfig:
    return rankwise.LoRAConfig(r=r, alpha=alpha, targets=targets, use_rslora=rslora)


def copy_tensors(theirs, ours, names) -> None:
    with torch.no_grad():
        for path, layer in rankwise.core.inject.wrappers(ours):
            peft_layer = theirs.base_model.model.get_submodule(path)
            for name in names:
                adapter = layer.get_adapter(name)
                if adapter is not None:
                    adapter.lora_A.weight.copy_(peft_layer.lora_A[name].weight)
                    adapter.lora_B.weight.copy_(peft_layer.lora_B[name].weight)


def flags(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters() if p.requires_grad or "lora" in n}


# ----------------------------------------------------------------------------------------------
# add / set / delete against PEFT
# ----------------------------------------------------------------------------------------------


def test_add_set_delete_match_peft_outputs_and_trainable_flags():
    _, theirs, ours = pair()
    x = inputs()
    assert rankwise.adapter_names(ours) == ["default", "b"] and rankwise.active_adapter(ours) == "default"
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    # only the active adapter trains, as in PEFT
    ours_trainable = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    assert ours_trainable == ["out.adapter.lora_A.weight", "out.adapter.lora_B.weight",
                              "proj.adapter.lora_A.weight", "proj.adapter.lora_B.weight"]
    assert rankwise.trainable_parameters(ours) == sum(p.numel() for p in theirs.parameters() if p.requires_grad)

    theirs.set_adapter("b")
    rankwise.set_adapter(ours, "b")
    torch.testing.assert_close(ours(x), theirs(x), **TOL)  # "out" has no "b": it computes the base
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == [
        "proj.extra_adapters.b.lora_A.weight", "proj.extra_adapters.b.lora_B.weight"]
    assert rankwise.trainable_parameters(ours) == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert [name for name, _ in rankwise.adapted_layers(ours)] == ["proj"]

    with pytest.warns(UserWarning, match="'b' was active and is deleted; the active adapter is now 'default'"):
        rankwise.delete_adapter(ours, "b")
    with pytest.warns(UserWarning, match="Setting active adapter to default"):
        theirs.delete_adapter("b")
    assert rankwise.adapter_names(ours) == ["default"] and rankwise.active_adapter(ours) == "default"
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    assert rankwise.trainable_parameters(ours) == sum(p.numel() for p in theirs.parameters() if p.requires_grad)


def test_deleting_the_active_adapter_activates_the_first_remaining_name_in_sorted_order_as_peft():
    specs = {"zeta": (4, 6.0, ["proj"], False), "b": (4, 8.0, ["proj"], False), "alpha": (4, 5.0, ["proj"], False)}
    _, theirs, ours = pair(specs)
    theirs.set_adapter("b")
    rankwise.set_adapter(ours, "b")
    with pytest.warns(UserWarning, match="the active adapter is now 'alpha'"):
        rankwise.delete_adapter(ours, "b")
    with pytest.warns(UserWarning):
        theirs.delete_adapter("b")
    assert rankwise.active_adapter(ours) == theirs.active_adapter == "alpha"
    torch.testing.assert_close(ours(inputs()), theirs(inputs()), **TOL)
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == [
        "proj.extra_adapters.alpha.lora_A.weight", "proj.extra_adapters.alpha.lora_B.weight"]


def test_set_adapter_restores_each_adapters_own_frozen_flags():
    _, _, ours = pair()
    ours.proj.adapter.lora_A.weight.requires_grad_(False)  # a user froze A of "default"
    rankwise.set_adapter(ours, "b")
    rankwise.set_adapter(ours, "default")
    assert not ours.proj.adapter.lora_A.weight.requires_grad and ours.proj.adapter.lora_B.weight.requires_grad


def test_single_default_adapter_keeps_its_state_dict_and_file_keys(tmp_path):
    model = rankwise.adapt(base_net(), rankwise.LoRAConfig(r=2, targets=["proj"]))
    old_keys = {"proj.adapter.lora_A.weight", "proj.adapter.lora_B.weight"}
    assert {k for k in model.state_dict() if ".adapter" in k} == old_keys
    assert not any("extra_adapters" in name for name, _ in model.named_modules())
    rankwise.save(model, tmp_path)
    assert set(load_file(tmp_path / "adapter.safetensors")) == old_keys
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    # a second adapter has keys of its own; the default's do not move, and its file keys read as a single adapter's
    rankwise.add_adapter(model, "b", rankwise.LoRAConfig(r=3, targets=["proj"]))
    assert {k for k in model.state_dict() if "adapter" in k} == old_keys | {
        "proj.extra_adapters.b.lora_A.weight", "proj.extra_adapters.b.lora_B.weight"}
    assert set(adapter_state(model, adapter_name="b")) == old_keys


def test_adapters_of_different_methods_share_a_layer():
    x = inputs()
    model = rankwise.adapt(base_net(), rankwise.LoRAConfig(r=2, targets=["proj"], init_weights=False))
    rankwise.add_adapter(model, "c", rankwise.config("c3a", block_size=4, targets=["proj", "out"]))
    rankwise.add_adapter(model, "d", rankwise.DoRAConfig(r=2, targets="all-linear", init_weights=False))
    assert {name for name, _ in rankwise.core.inject.wrappers(model)} == {"proj", "out"}  # no adapter internals
    with torch.no_grad():
        for adapter in (model.proj.get_adapter("c"), model.out.get_adapter("c")):
            adapter.c3a_kernel.normal_()
        model.proj.get_adapter("d").lora_magnitude_vector.mul_(1.3)
    for name, config in [("c", rankwise.config("c3a", block_size=4, targets=["proj", "out"])),
                         ("d", rankwise.DoRAConfig(r=2, targets="all-linear"))]:
        alone = rankwise.adapt(base_net(), config)  # the same adapter as the model's only one
        for path, layer in rankwise.adapted_layers(alone):
            layer.adapter.load_state_dict(model.get_submodule(path).get_adapter(name).state_dict())
        rankwise.set_adapter(model, name)
        torch.testing.assert_close(model(x), alone(x), **TOL)


# ----------------------------------------------------------------------------------------------
# weighted combination against PEFT
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
def test_add_weighted_adapter_matches_peft(combination):
    _, theirs, ours = pair()
    weights = [0.7, -0.4]
    theirs.add_weighted_adapter(["default", "b"], weights, "mix", combination_type=combination)
    rankwise.add_weighted_adapter(ours, ["default", "b"], weights, "mix", combination=combination)
    assert rankwise.active_adapter(ours) == "default"  # the new adapter starts inactive, as in PEFT
    for path, layer in rankwise.core.inject.wrappers(ours):
        new, peft_layer = layer.get_adapter("mix"), theirs.base_model.model.get_submodule(path)
        assert new.scaling == peft_layer.scaling["mix"] == 1.0
        ours_delta, theirs_delta = new.delta_weight(), peft_layer.get_delta_weight("mix")
        torch.testing.assert_close(ours_delta, theirs_delta, **TOL)
        if combination != "svd":  # the factors themselves (an SVD's are unique only up to signs)
            torch.testing.assert_close(new.lora_A.weight, peft_layer.lora_A["mix"].weight, **TOL)
            torch.testing.assert_close(new.lora_B.weight, peft_layer.lora_B["mix"].weight, **TOL)
        if combination == "cat":  # exact: B A = Σ w_i ΔW_i over the adapters that hold the layer
            expected = sum(w * a.delta_weight() for w, a in zip(weights, (layer.get_adapter("default"),
                                                                           layer.get_adapter("b"))) if a is not None)
            torch.testing.assert_close(ours_delta, expected, **TOL)
    theirs.set_adapter("mix")
    rankwise.set_adapter(ours, "mix")
    torch.testing.assert_close(ours(inputs()), theirs(inputs()), **TOL)


def test_linear_combination_is_peft_task_arithmetic_on_the_factors():
    """A = Σ sign(w s) √|w s| A_i and B = Σ √|w s| B_i, written out here (not Σ w_i ΔW_i: the cross terms stay)."""
    _, _, ours = pair()
    rankwise.add_weighted_adapter(ours, ["default", "b"], [0.7, -0.4], "mix", combination="linear")
    a, b, mix = (ours.proj.get_adapter(n) for n in ("default", "b", "mix"))
    ws_a, ws_b = 0.7 * a.scaling, -0.4 * b.scaling
    expected_A = ws_a ** 0.5 * a.lora_A.weight - (-ws_b) ** 0.5 * b.lora_A.weight
    expected_B = ws_a ** 0.5 * a.lora_B.weight + (-ws_b) ** 0.5 * b.lora_B.weight
    torch.testing.assert_close(mix.lora_A.weight, expected_A, **TOL)
    torch.testing.assert_close(mix.lora_B.weight, expected_B, **TOL)
    assert not torch.allclose(mix.delta_weight(), 0.7 * a.delta_weight() - 0.4 * b.delta_weight(), atol=1e-3)


def test_rslora_combination_scales_by_one_where_peft_scales_by_sqrt_r():
    specs = {"default": (4, 6.0, ["proj"], True), "b": (2, 3.0, ["proj"], True)}
    _, theirs, ours = pair(specs)
    theirs.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type="cat")
    rankwise.add_weighted_adapter(ours, ["default", "b"], [1.0, 1.0], "mix", combination="cat")
    layer, peft_layer = ours.proj, theirs.base_model.model.proj
    torch.testing.assert_close(layer.get_adapter("mix").lora_A.weight, peft_layer.lora_A["mix"].weight, **TOL)
    expected = layer.get_adapter("default").delta_weight() + layer.get_adapter("b").delta_weight()
    torch.testing.assert_close(layer.get_adapter("mix").delta_weight(), expected, **TOL)
    # PEFT keeps use_rslora with alpha = r = 6, so its combined update is √6 times the sum
    torch.testing.assert_close(peft_layer.get_delta_weight("mix"), 6 ** 0.5 * expected, **TOL)


def test_svd_combination_of_any_additive_methods_is_eckart_young():
    model = rankwise.adapt(base_net(), rankwise.LoRAConfig(r=3, targets=["proj"], init_weights=False))
    rankwise.add_adapter(model, "c", rankwise.config("c3a", block_size=8, targets=["proj"]))
    with torch.no_grad():
        model.proj.get_adapter("c").c3a_kernel.normal_()
    delta = 0.5 * model.proj.get_adapter("default").delta_weight() + 2.0 * model.proj.get_adapter("c").delta_weight()
    singular = torch.linalg.svdvals(delta)
    rankwise.add_weighted_adapter(model, ["default", "c"], [0.5, 2.0], "full", combination="svd", svd_rank=16)
    torch.testing.assert_close(model.proj.get_adapter("full").delta_weight(), delta, **TOL)  # exact at full rank
    rankwise.add_weighted_adapter(model, ["default", "c"], [0.5, 2.0], "low", combination="svd", svd_rank=5)
    error = torch.linalg.matrix_norm(model.proj.get_adapter("low").delta_weight() - delta)
    torch.testing.assert_close(error, singular[5:].square().sum().sqrt(), **TOL)  # Eckart–Young
    assert model.proj.get_adapter("low").r == 5


# ----------------------------------------------------------------------------------------------
# mixed-adapter batches
# ----------------------------------------------------------------------------------------------


def test_mixed_batch_matches_peft_and_each_example_alone():
    _, theirs, ours = pair()
    names = ["b", "default", "__base__", "b"]
    x = inputs(len(names))
    with rankwise.adapter_per_example(ours, names):
        mixed = ours(x)
    torch.testing.assert_close(mixed, theirs(x, adapter_names=names), **TOL)
    for i, name in enumerate(names):
        if name == "__base__":
            with rankwise.disable_adapters(ours):
                alone = ours(x[i:i + 1])
        else:
            rankwise.set_adapter(ours, name)
            alone = ours(x[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], alone, **TOL)
    assert all(layer.example_adapters is None for _, layer in rankwise.core.inject.wrappers(ours))


def test_mixed_batch_runs_any_method_and_carries_gradients():
    x = inputs(3)
    model = rankwise.adapt(base_net(), rankwise.LoRAConfig(r=2, targets=["proj", "out"], init_weights=False))
    rankwise.add_adapter(model, "d", rankwise.DoRAConfig(r=2, targets=["proj", "out"], init_weights=False))
    with torch.no_grad():
        model.out.get_adapter("d").lora_magnitude_vector.mul_(1.2)
    with rankwise.adapter_per_example(model, ["d", "default", "d"]):
        mixed = model(x)
    mixed.square().sum().backward()
    assert model.proj.adapter.lora_B.weight.grad.abs().sum() > 0  # "default" is active and trainable
    rankwise.set_adapter(model, "d")
    torch.testing.assert_close(mixed[0:1], model(x[0:1]), **TOL)
    torch.testing.assert_close(mixed[2:3], model(x[2:3]), **TOL)


@pytest.mark.parametrize("names", [["default", "__base__", "__base__", "default"], ["__base__"] * 4, ["default"] * 4])
def test_mixed_batch_runs_base_examples_through_the_original_saved_module_as_peft(names):
    """With modules_to_save, a "__base__" example runs the original module (the base model), the others the trained
    copy, as PEFT's mixed-batch forward; gradients reach the trained copy only through its own examples."""
    base = base_net()
    # modules_to_save "proj" (PEFT matches name endings without a dot boundary: "out" would also hit "lora_dropout")
    config = LoraConfig(r=4, lora_alpha=6, target_modules=["out"], init_lora_weights=False, modules_to_save=["proj"])
    theirs = get_peft_model(copy.deepcopy(base), config).eval()
    ours = rankwise.adapt(copy.deepcopy(base), rankwise.LoRAConfig(r=4, alpha=6, targets=["out"], init_weights=False,
                                                                   modules_to_save=["proj"])).eval()
    copy_tensors(theirs, ours, ["default"])
    with torch.no_grad():
        theirs.base_model.model.proj.modules_to_save["default"].weight.add_(0.5)
        ours.proj.trained_module.weight.add_(0.5)
    x = inputs(4)
    with rankwise.adapter_per_example(ours, names):
        mixed = ours(x)
    torch.testing.assert_close(mixed, theirs(x, adapter_names=names), **TOL)
    for i, name in enumerate(names):
        expected = base(x[i:i + 1]) if name == "__base__" else ours(x[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], expected, **TOL)
    assert mixed.requires_grad == ("default" in names)  # all "__base__": the base model alone, nothing to train
    if mixed.requires_grad:
        mixed.square().sum().backward()
        assert ours.proj.trained_module.weight.grad.abs().sum() > 0
    assert ours.proj.example_adapters is None  # the block restores the saved module too


def test_gpt2_conv1d_mixed_batch_and_svd_combination_match_peft():
    """A transformers model (GPT-2's Conv1D layers, stored transposed): PEFT's ``adapter_names`` forward and its
    SVD combination, which transposes the fan_in_fan_out update."""
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's note that it sets fan_in_fan_out for Conv1D
        theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"],
                                                                init_lora_weights=False, fan_in_fan_out=True))
        theirs.add_adapter("b", LoraConfig(r=3, lora_alpha=3, target_modules=["c_attn"], init_lora_weights=False,
                                           fan_in_fan_out=True))
    ours = rankwise.adapt(copy.deepcopy(base), rankwise.LoRAConfig(r=2, alpha=4, targets=["c_attn", "c_fc"]))
    rankwise.add_adapter(ours, "b", rankwise.LoRAConfig(r=3, alpha=3, targets=["c_attn"]))
    copy_tensors(theirs, ours, ["default", "b"])
    ids = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(2))
    names = ["b", "__base__", "default"]
    with rankwise.adapter_per_example(ours, names):
        mixed = ours(ids).logits
    torch.testing.assert_close(mixed, theirs.eval()(input_ids=ids, adapter_names=names).logits, **TOL)
    theirs.add_weighted_adapter(["default", "b"], [1.0, 0.5], "mix", combination_type="svd", svd_rank=2)
    rankwise.add_weighted_adapter(ours, ["default", "b"], [1.0, 0.5], "mix", combination="svd", svd_rank=2)
    theirs.set_adapter("mix")
    rankwise.set_adapter(ours, "mix")
    torch.testing.assert_close(ours(ids).logits, theirs(input_ids=ids).logits, **TOL)


# ----------------------------------------------------------------------------------------------
# merge / unmerge / unload with several adapters
# ----------------------------------------------------------------------------------------------


def test_merge_merges_the_active_adapter_and_switching_unmerges_it():
    base, theirs, ours = pair()
    x = inputs()
    rankwise.set_adapter(ours, "b")
    expected = ours(x)
    rankwise.merge(ours)
    assert ours.proj.merged and not ours.out.merged  # "out" has no "b"
    torch.testing.assert_close(ours(x), expected, **TOL)
    with pytest.raises(ValueError, match="'b' is merged into the base weights; rankwise.unmerge"):
        rankwise.delete_adapter(ours, "b")
    with pytest.warns(UserWarning, match="'b' is merged; unmerging it before switching to 'default'"):
        rankwise.set_adapter(ours, "default")
    assert not ours.proj.merged
    torch.testing.assert_close(ours.proj.base_layer.weight, base.proj.weight, atol=1e-6, rtol=0)
    # unload(merge=True) merges the active adapter only, as PEFT's merge_and_unload
    rankwise.set_adapter(ours, "b")
    theirs.set_adapter("b")
    plain, peft_plain = rankwise.unload(ours, merge=True), theirs.merge_and_unload()
    for key, value in peft_plain.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[key], value, **TOL)
    assert all(p.requires_grad for p in plain.parameters())  # the original flags come back


def test_disable_adapters_runs_the_base_with_several_adapters():
    base, _, ours = pair()
    x = inputs()
    rankwise.set_adapter(ours, "b")
    rankwise.merge(ours)
    with rankwise.disable_adapters(ours):
        torch.testing.assert_close(ours(x), base(x), **TOL)
    assert ours.proj.merged


# ----------------------------------------------------------------------------------------------
# save / load / PEFT files by name
# ----------------------------------------------------------------------------------------------


def test_save_and_load_each_adapter_by_name(tmp_path):
    base, _, ours = pair()
    x = inputs()
    expected = {}
    for name in ("default", "b"):
        rankwise.set_adapter(ours, name)
        expected[name] = ours(x)
    rankwise.save(ours, tmp_path)  # PEFT's layout: "default" in the directory, the others in subdirectories
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["layers"] == {
        "proj": {"out_features": 24, "in_features": 16}}
    assert set(load_file(tmp_path / "b" / "adapter.safetensors")) == {"proj.adapter.lora_A.weight",
                                                                      "proj.adapter.lora_B.weight"}
    loaded = rankwise.load(copy.deepcopy(base), tmp_path)
    rankwise.load(loaded, tmp_path / "b", adapter_name="b")
    assert rankwise.adapter_names(loaded) == ["default", "b"] and rankwise.active_adapter(loaded) == "default"
    torch.testing.assert_close(loaded(x), expected["default"], **TOL)
    rankwise.set_adapter(loaded, "b")
    torch.testing.assert_close(loaded(x), expected["b"], **TOL)
    # one adapter by name, onto a fresh base under another name
    rankwise.save(ours, tmp_path / "only", adapter_name="b")
    assert sorted(p.name for p in (tmp_path / "only").iterdir()) == ["b"]
    with pytest.raises(FileNotFoundError, match=r"only named adapters in subdirectories \['b'\]; load one with"):
        rankwise.load(copy.deepcopy(base), tmp_path / "only")
    alone = rankwise.load(copy.deepcopy(base), tmp_path / "only" / "b", adapter_name="task")
    assert rankwise.adapter_names(alone) == ["task"]
    torch.testing.assert_close(alone(x), expected["b"], **TOL)


def test_save_into_a_used_directory_removes_the_files_of_adapters_not_saved(tmp_path):
    """audit p18: after delete_adapter, a save into the same directory left the deleted adapter's files, and
    load(base, d) silently gave it back. Only rankwise's own files of adapters not saved go; nothing else."""
    base, _, ours = pair()
    rankwise.add_adapter(ours, "c", rankwise.LoRAConfig(r=2, targets=["out"]))
    rankwise.save(ours, tmp_path)
    # what rankwise did not write as a named adapter of this directory: a PEFT adapter, an adapter saved on its
    # own into a subdirectory (it records "default"), a note
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    rankwise.save(ours, tmp_path / "alone", adapter_name="c")
    rankwise.save(rankwise.adapt(base_net(), rankwise.LoRAConfig(r=2, targets=["out"])), tmp_path / "solo")
    (tmp_path / "notes.txt").write_text("keep")
    (tmp_path / "c" / "notes.txt").write_text("keep")
    with pytest.warns(UserWarning, match="was active"):
        rankwise.delete_adapter(ours, "default")
    rankwise.delete_adapter(ours, "c")
    rankwise.save(ours, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alone", "b", "c", "notes.txt", "peft", "solo"]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["notes.txt"]
    assert (tmp_path / "peft" / "adapter_config.json").is_file() and (tmp_path / "solo" / "adapter_config.json").is_file()
    assert (tmp_path / "alone" / "c" / "adapter_config.json").is_file()
    with pytest.raises(FileNotFoundError, match="holds no adapter of its own"):
        rankwise.load(copy.deepcopy(base), tmp_path)  # not the deleted "default"
    # one adapter by name: written beside what is there, nothing removed (adapters can be saved one at a time)
    rankwise.save(ours, tmp_path / "solo", adapter_name="b")
    assert sorted(p.name for p in (tmp_path / "solo").iterdir()) == ["adapter.safetensors", "adapter_config.json", "b"]


def test_failed_load_of_a_second_adapter_leaves_the_model_as_it_was(tmp_path):
    base, _, ours = pair()
    rankwise.save(ours, tmp_path)
    model = rankwise.adapt(copy.deepcopy(base), rankwise.LoRAConfig(r=2, targets=["proj"]))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bad = rankwise.adapt(nn.Sequential(nn.Linear(16, 24)), rankwise.LoRAConfig(r=4, targets=["0"]))
    rankwise.save(bad, tmp_path / "other")
    with pytest.raises(ValueError, match="layer '0'"):
        rankwise.load(model, tmp_path / "other", adapter_name="x")
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        rankwise.load(model, tmp_path)
    (tmp_path / "b" / "adapter.safetensors").write_bytes(
        (tmp_path / "adapter.safetensors").read_bytes())  # "default"'s tensors: "out" is unexpected for "b"
    with pytest.raises(ValueError, match="unexpected"):
        rankwise.load(model, tmp_path / "b", adapter_name="b")
    assert rankwise.adapter_names(model) == ["default"]
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


def test_import_peft_adapters_by_name_and_export_the_active_one(tmp_path):
    base, theirs, _ = pair()
    x = inputs()
    theirs.save_pretrained(tmp_path / "peft")  # default in the directory, "b" in peft/b
    imported = rankwise.import_peft(copy.deepcopy(base), tmp_path / "peft")
    rankwise.import_peft(imported, tmp_path / "peft" / "b", adapter_name="b")
    for name in ("default", "b"):
        theirs.set_adapter(name)
        rankwise.set_adapter(imported, name)
        torch.testing.assert_close(imported(x), theirs(x), **TOL)
    rankwise.export_peft(imported, tmp_path / "ours_b")  # the active adapter, "b"
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours_b").eval()
    torch.testing.assert_close(reloaded(x), theirs(x), **TOL)


# ----------------------------------------------------------------------------------------------
# bad input: ValueError naming the fix, nothing changed
# ----------------------------------------------------------------------------------------------


def test_bad_names_and_verbs_raise_before_changing_anything():
    _, _, ours = pair()
    lora2 = rankwise.LoRAConfig(r=2, targets=["proj"])
    cases = [
        (lambda: rankwise.set_adapter(ours, "nope"), r"no adapter named 'nope'; its adapters are \['default', 'b'\]"),
        (lambda: rankwise.delete_adapter(ours, "nope"), "no adapter named 'nope'"),
        (lambda: rankwise.save(ours, "/nonexistent/x", adapter_name="nope"), "no adapter named 'nope'"),
        (lambda: rankwise.add_adapter(ours, "b", lora2), "already has an adapter named 'b'"),
        (lambda: rankwise.add_adapter(ours, "a.b", lora2), "letters, digits"),
        (lambda: rankwise.add_adapter(ours, "__base__", lora2), "not '__base__'"),
        (lambda: rankwise.add_adapter(ours, "c", {"r": 2}), "expects a rankwise config"),
        (lambda: rankwise.add_adapter(ours, "c", rankwise.LoRAConfig(r=2, init_weights="pissa")), "PiSSA / OLoRA"),
        (lambda: rankwise.add_adapter(ours, "c", rankwise.LoRAConfig(r=2, modules_to_save=["out"])),
         "modules_to_save is supported for a model's only adapter"),
        (lambda: rankwise.add_adapter(ours, "c", rankwise.LoRAConfig(r=99, targets=["proj"])), "r=99 exceeds"),
        (lambda: rankwise.adapter_per_example(ours, ["b", "typo"]).__enter__(), r"unknown adapter name\(s\) \['typo'\]"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
        assert rankwise.adapter_names(ours) == ["default", "b"] and rankwise.active_adapter(ours) == "default"
    rankwise.delete_adapter(ours, "b")
    with pytest.raises(ValueError, match=r"only adapter; rankwise.unload\(model, merge=False\)"):
        rankwise.delete_adapter(ours, "default")


def test_bad_weighted_combinations_raise_before_adding():
    _, _, ours = pair()
    rankwise.add_adapter(ours, "r2", rankwise.LoRAConfig(r=2, targets=["proj"]))
    rankwise.add_adapter(ours, "dora", rankwise.DoRAConfig(r=4, targets=["proj"]))
    rankwise.add_adapter(ours, "c3a", rankwise.config("c3a", block_size=8, targets=["proj"]))
    rankwise.add_adapter(ours, "bias", rankwise.LoRAConfig(r=4, targets=["proj"], lora_bias=True))
    combine = rankwise.add_weighted_adapter
    cases = [
        (lambda: combine(ours, ["default", "b"], [1.0], "m"), "pass one finite number per adapter"),
        (lambda: combine(ours, ["default", "b"], [1.0, float("nan")], "m"), "finite number"),
        (lambda: combine(ours, ["default", "x"], [1.0, 1.0], "m"), r"unknown adapter name\(s\) \['x'\]"),
        (lambda: combine(ours, ["default", "b"], [1.0, 1.0], "b"), "already has an adapter named 'b'"),
        (lambda: combine(ours, ["default", "b"], [1.0, 1.0], "m", combination="ties"), "not supported"),
        (lambda: combine(ours, ["default", "r2"], [1.0, 1.0], "m", combination="linear"), "adapters of one rank"),
        (lambda: combine(ours, ["default", "c3a"], [1.0, 1.0], "m", combination="cat"), "use combination='svd'"),
        (lambda: combine(ours, ["default", "c3a"], [1.0, 1.0], "m"), "have no rank r; pass svd_rank"),
        (lambda: combine(ours, ["default", "dora"], [1.0, 1.0], "m", combination="svd"),
         "DoRAAdapter on layer 'proj' is not additive"),
        (lambda: combine(ours, ["default", "bias"], [1.0, 1.0], "m", combination="cat"), "trains a bias"),
        (lambda: combine(ours, ["default", "b"], [1.0, 1.0], "m", svd_rank=17), r"svd_rank=17 exceeds min\(out, in\)=16"),
        (lambda: combine(ours, ["default", "b"], [1.0, 1.0], "m", svd_rank=0), "positive integer"),
    ]
    names = rankwise.adapter_names(ours)
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
        assert rankwise.adapter_names(ours) == names


def test_merged_models_refuse_new_adapters_and_mixed_batches():
    _, _, ours = pair()
    rankwise.merge(ours)
    with pytest.raises(ValueError, match=r"merged into the base weights.*rankwise.unmerge\(model\) first"):
        rankwise.add_adapter(ours, "c", rankwise.LoRAConfig(r=2, targets=["proj"]))
    with pytest.raises(ValueError, match=r"rankwise.unmerge\(model\) first"), rankwise.adapter_per_example(ours, ["b"]):
        pass
    rankwise.unmerge(ours)
    with pytest.raises(ValueError, match="batch of 4 examples .* named 2 adapters"), \
            rankwise.adapter_per_example(ours, ["b", "default"]):
        ours(inputs(4))


def test_allocators_refuse_models_with_several_adapters():
    model = rankwise.adapt(base_net(), rankwise.config("adalora", init_r=4, target_r=2, total_step=10, targets=["proj"]))
    assert rankwise.allocator(model) is not None
    rankwise.add_adapter(model, "b", rankwise.LoRAConfig(r=2, targets=["proj"]))
    with pytest.raises(ValueError, match=r"rank allocation \(adalora\) works on a model with one adapter"):
        rankwise.allocator(model)
    assert "adapters: default (adalora, active), b (lora)" in rankwise.summary(model)

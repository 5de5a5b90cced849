"""Model presets, parameter / FLOP arithmetic and safetensors round-trips."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from hdee.config import ModelConfig
from hdee.model import llama_config, load_model, save_model
from hdee.shapes import (
    Architecture,
    ModelShape,
    matmul_parameters,
    model_shapes,
    parameter_counts,
    training_flops_per_token,
)


def test_presets_differ_only_in_ffn() -> None:
    close = model_shapes(ModelConfig(preset="small-close"))
    assert {k: v.intermediate_size for k, v in close.items()} == {"S": 2304, "M": 3072, "L": 3840}
    assert {(s.hidden_size, s.num_layers, s.num_heads) for s in close.values()} == {(768, 12, 12)}
    tiny = model_shapes(ModelConfig(preset="tiny"))
    ffn = {k: v.intermediate_size for k, v in tiny.items()}
    # The paper's 0.75 / 1 / 1.25 ratio.
    assert ffn["S"] / ffn["M"] == 0.75 and ffn["L"] / ffn["M"] == 1.25


def test_explicit_fields_override_preset() -> None:
    shapes = model_shapes(
        ModelConfig(preset="tiny", hidden_size=32, num_kv_heads=2, ffn_sizes={"XL": 256})
    )
    assert list(shapes) == ["XL"]  # explicit ffn_sizes replace the preset's, not merge
    assert shapes["XL"].hidden_size == 32 and shapes["XL"].num_kv_heads == 2
    assert shapes["XL"].num_layers == 2
    with pytest.raises(ValueError, match="needs explicit"):
        model_shapes(ModelConfig(preset="none", hidden_size=64))
    with pytest.raises(ValueError, match="divisible"):
        model_shapes(ModelConfig(preset="tiny", hidden_size=66))


def test_vocab_comes_from_the_caller() -> None:
    shape = model_shapes(ModelConfig())["M"]
    assert llama_config(shape, 777, 32).vocab_size == 777
    assert llama_config(shape, 777, 32).max_position_embeddings == 32
    with pytest.raises(ValueError):
        llama_config(shape, 0, 32)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_parameter_counts_match_real_model(tie: bool, kv_heads: int) -> None:
    shape = ModelShape("M", 64, 2, 4, kv_heads, 128, tie_embeddings=tie)
    cfg = llama_config(shape, 300, 32)
    model = LlamaForCausalLM(cfg)
    total, non_embedding = parameter_counts(cfg)
    assert total == sum(p.numel() for p in model.parameters())
    blocks = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    head = 0 if tie else model.lm_head.weight.numel()
    assert non_embedding == blocks - head


def test_parameter_counts_small_close_on_meta_device() -> None:
    shape = model_shapes(ModelConfig(preset="small-close"))["M"]
    cfg = llama_config(shape, 8192, 1024)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    assert parameter_counts(cfg)[0] == sum(p.numel() for p in model.parameters())


def test_training_flops_formula() -> None:
    cfg = llama_config(ModelShape("M", 64, 2, 4, 4, 128), vocab_size=100, seq_len=32)
    total, non_embedding = parameter_counts(cfg)
    # Untied: total = blocks + embedding + head; the embedding lookup does no matmul.
    assert matmul_parameters(cfg) == total - 100 * 64
    assert training_flops_per_token(cfg, 32) == 6 * (total - 100 * 64) + 12 * 2 * 64 * 32
    tied = llama_config(ModelShape("M", 64, 2, 4, 4, 128, tie_embeddings=True), 100, 32)
    # Tied: the shared matrix still does the LM-head matmul.
    assert matmul_parameters(tied) == parameter_counts(tied)[0]


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_architecture_counts_equal_the_llama_configs(tie: bool, kv_heads: int) -> None:
    # The planner counts from `Architecture` (no transformers); training from the LlamaConfig.
    shape = ModelShape("M", 64, 3, 4, kv_heads, 96, tie_embeddings=tie)
    architecture = Architecture.of(shape, vocab_size=300)
    config = llama_config(shape, 300, 32)
    assert parameter_counts(architecture) == parameter_counts(config)
    assert training_flops_per_token(architecture, 32) == training_flops_per_token(config, 32)


def _tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    shape = model_shapes(ModelConfig())["M"]
    return LlamaForCausalLM(llama_config(shape, 100, 32)).eval()


def test_hf_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    model = _tiny_model()
    save_model(model, tmp_path / "m")
    assert (tmp_path / "m" / "config.json").is_file()
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".m.*"))  # temporary directory renamed away
    inputs = torch.randint(0, 100, (2, 16))
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "m", use_safetensors=True).eval()
    ours = load_model(tmp_path / "m").eval()
    with torch.no_grad():
        expected = model(inputs).logits
        assert torch.equal(reloaded(inputs).logits, expected)
        assert torch.equal(ours(inputs).logits, expected)
    # Saving again replaces the directory as a whole.
    other = _tiny_model(seed=1)
    save_model(other, tmp_path / "m")
    weights = load_model(tmp_path / "m").model.embed_tokens.weight
    assert torch.equal(weights, other.model.embed_tokens.weight)


def test_corrupt_or_missing_files_name_the_file(tmp_path: Path) -> None:
    save_model(_tiny_model(), tmp_path / "good")
    weights = tmp_path / "bad" / "model.safetensors"
    shutil.copytree(tmp_path / "good", tmp_path / "bad")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(tmp_path / "bad")
    weights.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(tmp_path / "bad")
    weights.unlink()
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(tmp_path / "bad")
    (tmp_path / "good" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path / "good")
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path: Path) -> None:
    save_model(_tiny_model(), tmp_path / "m")
    small = model_shapes(ModelConfig())["S"]
    llama_config(small, 100, 32).save_pretrained(tmp_path / "m")  # config of another size
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(tmp_path / "m")


def test_parameter_counts_with_biases_and_an_explicit_head_dim_match_a_real_model() -> None:
    """The branches hdee's presets never take (attention and MLP biases, a head_dim other than
    hidden / heads, grouped-query attention), counted against a real model."""
    from transformers import LlamaConfig

    for attention_bias, mlp_bias in [(True, False), (False, True), (True, True)]:
        cfg = LlamaConfig(
            vocab_size=50,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,  # not 32 / 4
            intermediate_size=48,
            attention_bias=attention_bias,
            mlp_bias=mlp_bias,
        )
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        total, non_embedding = parameter_counts(cfg)
        assert total == sum(p.numel() for p in model.parameters())
        embeddings = model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
        assert non_embedding == total - embeddings
    shape = ModelShape("M", 64, 2, 4, 2, 96)
    architecture = Architecture.of(shape, vocab_size=300)
    assert architecture.num_key_value_heads == 2
    counts = parameter_counts(architecture)
    assert all(isinstance(count, int) for count in counts)  # never a float head_dim
    assert counts == parameter_counts(llama_config(shape, 300, 32))


def test_shapes_keep_every_setting_and_name_what_is_wrong() -> None:
    shapes = model_shapes(ModelConfig(preset="tiny", rope_theta=5e5, tie_embeddings=True))
    assert [shape.name for shape in shapes.values()] == list(shapes) == ["S", "M", "L"]
    assert all(s.rope_theta == 5e5 and s.tie_embeddings for s in shapes.values())
    with pytest.raises(ValueError, match="needs explicit hidden_size, num_layers, num_heads"):
        model_shapes(ModelConfig(preset="none", ffn_sizes={"M": 8}))
    with pytest.raises(ValueError, match="^model: num_heads 4 is not divisible by num_kv_heads 3$"):
        model_shapes(ModelConfig(preset="tiny", num_kv_heads=3))
    with pytest.raises(ValueError, match="^model: ffn_sizes is empty$"):
        model_shapes(ModelConfig(preset="tiny", ffn_sizes={}))

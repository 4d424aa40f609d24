"""Checkpoint I/O: sharded round trip, clear errors, meta-device build mapped onto the released layout."""

import json

import pytest
import torch
from torch import nn

from vargpt.config import official_config, tiny_config
from vargpt.errors import CheckpointError
from vargpt.models.vlm import build_vlm
from vargpt.weights import (
    INDEX_FILE,
    SINGLE_FILE,
    load_into,
    load_state_dict_files,
    parse_size,
    released_to_vlm_keys,
    save_state_dict,
    select_prefix,
    vlm_to_released_keys,
)


def _state(n: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {f"vae_local.layer{i}.weight": torch.randn(16, 16, generator=g) for i in range(n)}
    sd["vargpt_gen.mask"] = torch.arange(10)  # integer buffer
    return sd


def test_sharded_round_trip(tmp_path):
    sd = _state()
    files = save_state_dict(tmp_path, sd, max_shard_size=3 * 16 * 16 * 4)  # 3 matrices per shard
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors", INDEX_FILE]
    assert set(files) == {tmp_path / n for n in names}
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(sd)
    loaded = load_state_dict_files(tmp_path)
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert set(load_state_dict_files(tmp_path, prefixes=("vargpt_gen.",))) == {"vargpt_gen.mask"}
    # Re-saving as one file replaces the shards and the index; no temporary files are left.
    save_state_dict(tmp_path, sd)
    assert sorted(p.name for p in tmp_path.iterdir()) == [SINGLE_FILE]
    assert torch.equal(load_state_dict_files(tmp_path)["vae_local.layer3.weight"], sd["vae_local.layer3.weight"])


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path):
    sd = _state()
    save_state_dict(tmp_path, sd, max_shard_size=3 * 16 * 16 * 4)
    (tmp_path / "config.json").write_text("{}")
    before = sorted(p.name for p in tmp_path.iterdir())
    broken = {**sd, "vae_local.layer5.weight": torch.empty(16, 16, device="meta")}  # fails in the 2nd shard
    with pytest.raises(CheckpointError, match="meta device"):
        save_state_dict(tmp_path, broken, max_shard_size=1000)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary or partial files
    assert torch.equal(load_state_dict_files(tmp_path)["vae_local.layer0.weight"], sd["vae_local.layer0.weight"])


def test_save_handles_shared_and_strided_tensors(tmp_path):
    w = torch.randn(4, 4)
    save_state_dict(tmp_path, {"a": w, "b": w, "c": w.t()})
    loaded = load_state_dict_files(tmp_path)
    assert torch.equal(loaded["b"], w) and torch.equal(loaded["c"], w.t())


def test_missing_shard_names_the_file(tmp_path):
    save_state_dict(tmp_path, _state(), max_shard_size=1000)  # one matrix per shard, 7 shards
    (tmp_path / "model-00002-of-00007.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00007.safetensors.*missing"):
        load_state_dict_files(tmp_path)


def test_unreadable_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_state_dict_files(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_state_dict_files(tmp_path)
    (tmp_path / SINGLE_FILE).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_state_dict_files(tmp_path)


def test_load_into_errors_name_the_keys():
    module = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    good = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"0\.weight \(3, 5\) vs model \(3, 4\)"):
        load_into(module, {**good, "0.weight": torch.zeros(3, 5)})
    with pytest.raises(CheckpointError, match=r"missing 1: 1\.bias"):
        load_into(module, {k: v for k, v in good.items() if k != "1.bias"})
    with pytest.raises(CheckpointError, match=r"unexpected 1: extra\.weight"):
        load_into(module, {**good, "extra.weight": torch.zeros(1)})
    report = load_into(module, {**good, "extra.weight": torch.zeros(1)}, strict=False)
    assert report.unexpected_keys == ["extra.weight"]


def test_load_into_meta_assigns_without_copy_and_keeps_dtype():
    cfg = tiny_config()
    vlm = build_vlm(cfg, device="meta", dtype=torch.bfloat16)
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in vlm.parameters())
    sd = {k: torch.zeros(v.shape, dtype=torch.bfloat16) for k, v in vlm.state_dict().items()}
    load_into(vlm, sd)
    emb = vlm.model.language_model.embed_tokens.weight
    assert emb.data_ptr() == sd["model.language_model.embed_tokens.weight"].data_ptr()  # assigned, not copied
    assert vlm.model.language_model.rotary_emb.inv_freq.dtype == torch.float32  # rotary tables stay fp32
    # float32 weights into a bf16-built model are cast to the built dtype
    vlm32 = build_vlm(cfg, device="meta", dtype=torch.bfloat16)
    load_into(vlm32, {k: v.float() for k, v in sd.items()})
    assert vlm32.lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(CheckpointError, match="got no weights"):
        load_into(build_vlm(cfg, device="meta"), {"lm_head.weight": torch.zeros(1024, 128)}, strict=False)


# Shapes from reference-facts.md sections 2.1 / 2.2.
RELEASED_SHAPES = {
    "visual.patch_embed.proj.weight": (1280, 3, 2, 14, 14),
    "visual.blocks.31.attn.qkv.weight": (3840, 1280),
    "visual.blocks.0.mlp.fc1.weight": (5120, 1280),
    "visual.blocks.0.mlp.fc2.weight": (1280, 5120),
    "visual.merger.ln_q.weight": (1280,),
    "visual.merger.mlp.0.weight": (5120, 5120),
    "visual.merger.mlp.2.weight": (3584, 5120),
    "visual.merger.mlp.2.bias": (3584,),
    "model.embed_tokens.weight": (152064, 3584),
    "model.layers.27.self_attn.q_proj.bias": (3584,),
    "model.layers.0.self_attn.k_proj.weight": (512, 3584),
    "model.layers.0.self_attn.v_proj.bias": (512,),
    "model.layers.0.self_attn.o_proj.weight": (3584, 3584),
    "model.layers.0.mlp.gate_proj.weight": (18944, 3584),
    "model.layers.0.mlp.down_proj.weight": (3584, 18944),
    "model.layers.0.post_attention_layernorm.weight": (3584,),
    "model.norm.weight": (3584,),
    "lm_head.weight": (152064, 3584),
}


def test_official_vlm_on_meta_matches_released_layout():
    vlm = build_vlm(official_config(), device="meta")
    assert all(p.is_meta for p in vlm.parameters())  # nothing allocated
    released = vlm_to_released_keys(vlm.state_dict())
    assert set(released_to_vlm_keys(released)) == set(vlm.state_dict())
    assert "model.layers.0.self_attn.o_proj.bias" not in released
    for key, shape in RELEASED_SHAPES.items():
        assert tuple(released[key].shape) == shape, key
    counts = {p: sum(v.numel() for v in select_prefix(released, p + ".").values())
              for p in ("visual", "model", "lm_head")}
    assert {p: round(n / 1e6, 1) for p, n in counts.items()} == {"visual": 675.8, "model": 7070.6, "lm_head": 545.0}
    assert sum(1 for k in released if k.startswith("visual.blocks.")) == 32 * 12
    assert sum(1 for k in released if k.startswith("model.layers.")) == 28 * 12


def test_parse_size():
    assert parse_size(123) == 123
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500 MB") == 500 * 10**6
    with pytest.raises(CheckpointError, match="not understood"):
        parse_size("lots")

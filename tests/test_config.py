import json

import pytest

from vargpt.config import VARGPTConfig, get_preset, official_config, tiny_config
from vargpt.errors import ConfigError


@pytest.mark.parametrize("preset", ["official", "tiny"])
def test_json_round_trip(tmp_path, preset):
    cfg = get_preset(preset)
    cfg.to_json(tmp_path / "config.json")
    assert VARGPTConfig.from_json(tmp_path / "config.json") == cfg


def test_official_values_match_release():
    c = official_config()
    assert (c.llm.hidden_size, c.llm.num_hidden_layers, c.llm.num_key_value_heads) == (3584, 28, 4)
    assert (c.decoder.depth, c.decoder.embed_dim, c.decoder.ffn_hidden) == (32, 2048, 8192)
    assert c.vae.stride == 16 and c.vae.codebook_dim == 32
    assert c.tokens.image_gen_start == 151657 and c.compat.published_uncond_branch


def test_bad_field_is_named(tmp_path):
    d = tiny_config().to_dict()
    d["decoder"]["num_heads"] = 3
    with pytest.raises(ConfigError, match=r"decoder\.embed_dim"):
        VARGPTConfig.from_dict(d)
    d = tiny_config().to_dict()
    d["vae"]["codebook_dimm"] = 3
    with pytest.raises(ConfigError, match="codebook_dimm"):
        VARGPTConfig.from_dict(d)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        VARGPTConfig.from_json(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("huge")


def test_fixture_config_reads_released_layout(fixture_config, fixtures_dir):
    hf = json.loads((fixtures_dir / "tiny_config.json").read_text())["hf_config"]
    assert fixture_config.llm.hidden_size == hf["hidden_size"] == 64
    assert fixture_config.tokens.image_gen_pad == 266
    assert fixture_config.decoder.embed_dim == fixture_config.decoder.text_channels == 128

"""The embedded default's build pieces: model.vae (VAE weights from `vargpt train vae`) and the tiny tokenizer."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from vargpt.config import VAEConfig, tiny_config
from vargpt.data.scene import COLOURS, SHAPES, SIZES
from vargpt.errors import ConfigError
from vargpt.models.vae import BSQVAE
from vargpt.processing import BPETokenizer, load_tokenizer, special_tokens
from vargpt.training.checkpoint import save_model_dir
from vargpt.training.embedded import shapesworld_texts, train_tiny_tokenizer
from vargpt.training.recipe import recipe_from_dict
from vargpt.training.trainer import build_model, build_processor
from vargpt.training.vae import vae_model_config


def _recipe(**model):
    return recipe_from_dict({"name": "t", "model": {"preset": "tiny", **model}, "trainable": "generation",
                             "data": {"sources": [{"path": "unused", "format": "shapesworld"}]}})


def _save_vae(out, cfg: VAEConfig) -> BSQVAE:
    torch.manual_seed(1)
    vae = BSQVAE(cfg)
    save_model_dir(out / "model", vae.state_dict(), vae_model_config(cfg, "tiny", (64, 128)))
    return vae


def test_model_vae_loads_a_trained_vae(tmp_path):
    vae = _save_vae(tmp_path / "vae", tiny_config().vae)
    model = build_model(_recipe(vae=str(tmp_path / "vae")))  # the run directory (its model/ is used)
    got = model.vae.state_dict()
    assert all(torch.equal(got[k], v) for k, v in vae.state_dict().items())
    key = next(iter(got))
    assert not torch.equal(build_model(_recipe()).vae.state_dict()[key], got[key])  # without model.vae: fresh
    build_model(_recipe(vae=str(tmp_path / "vae" / "model")))  # the model directory itself


def test_model_vae_mismatch_and_missing_are_config_errors(tmp_path):
    _save_vae(tmp_path / "vae", dataclasses.replace(tiny_config().vae, base_ch=64))
    with pytest.raises(ConfigError, match=r"model\.vae.*'base_ch': 64.*config\.vae.*'base_ch': 32"):
        build_model(_recipe(vae=str(tmp_path / "vae")))
    with pytest.raises(ConfigError, match="model.vae.*no such directory"):
        build_model(_recipe(vae=str(tmp_path / "nothing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="model.vae.*cannot load"):
        build_model(_recipe(vae=str(tmp_path / "empty")))


def test_tiny_tokenizer_is_deterministic_and_round_trips(tmp_path):
    tokens = tiny_config().tokens
    a = train_tiny_tokenizer(tmp_path / "a", n=200)
    b = train_tiny_tokenizer(tmp_path / "b", n=200)
    assert a.read_bytes() == b.read_bytes()
    tok = load_tokenizer(tmp_path / "a", tokens)  # checks every special id against tiny_config().tokens
    assert all(tok.tokenizer.token_to_id(s) == i for s, i in special_tokens(tokens).items())
    assert tok.vocab_size == tiny_config().llm.vocab_size
    texts = shapesworld_texts(400)  # records beyond the 200 it was trained on, every split and task
    assert len(texts) > 1000
    for text in texts:
        ids = tok.encode(text)
        assert max(ids) < min(special_tokens(tokens).values()) and tok.decode(ids) == text
    chat = "<|im_start|>user\nIs there a red triangle?<|im_end|>"
    assert tok.encode(chat)[0] == tokens.im_start and tok.decode(tok.encode(chat)) == chat
    assert len(tok.encode(texts[-1])) < len(texts[-1].encode()) / 3  # whole words, not bytes


def test_recipe_tokenizer_reaches_the_processor(tmp_path):
    train_tiny_tokenizer(tmp_path / "tok", n=50)
    recipe = _recipe(tokenizer=str(tmp_path / "tok"))
    processor = build_processor(build_model(recipe), recipe)
    assert isinstance(processor.tokenizer, BPETokenizer)


def test_vision_token_labels_follow_the_object_boxes():
    from vargpt.data.scene import Obj, Scene
    from vargpt.training.vision import token_labels

    scene = Scene((Obj("triangle", "blue", "large", 0.5, 0.5), Obj("cross", "red", "small", 0.17, 0.83)), "white")
    lab = token_labels([scene], 8)
    shape = lab["shape"].view(8, 8)
    assert shape[4, 4] == 1 + SHAPES.index("triangle") and shape[3, 3] == shape[4, 3]  # 0.27 box: centres 3..4
    assert shape[6, 1] == 1 + SHAPES.index("cross") and lab["colour"].view(8, 8)[6, 1] == 1 + list(COLOURS).index("red")
    assert shape[0, 7] == 0 and lab["size"].view(8, 8)[4, 4] == 1 + list(SIZES).index("large")
    assert int((shape > 0).sum()) == 4 + 1  # 2x2 token centres inside the large box, 1 inside the small one


def test_vision_pretraining_trains_the_tower_and_writes_a_loadable_model(tmp_path):
    from vargpt.models.vargpt import VARGPT
    from vargpt.training.vision import VisionPretrainConfig, pretrain_vision

    recipe = tmp_path / "und.yaml"
    recipe.write_text("name: und\nstage: sft_understanding\nmodel: {preset: tiny, config_overrides: {vision: "
                      "{patch_size: 4}}}\ndata: {sources: [{path: unused, format: shapesworld}], image_size: 64}\n"
                      "trainable: [visual, model, lm_head]\n")
    out = pretrain_vision(VisionPretrainConfig(recipe=str(recipe), out=str(tmp_path / "vis"), steps=3, batch_size=4,
                                               eval_every=1, progress=False))
    model = VARGPT.from_pretrained(out)
    assert model.config.vision.patch_size == 4
    torch.manual_seed(0)
    fresh = build_model(recipe_from_dict({
        "name": "u", "model": {"preset": "tiny", "config_overrides": {"vision": {"patch_size": 4}}}, "trainable": "all",
        "data": {"sources": [{"path": "x", "format": "shapesworld"}]}}))
    trained, init = model.state_dict(), fresh.state_dict()
    assert any(not torch.equal(trained[k], init[k]) for k in trained if k.startswith("visual."))
    assert all(torch.equal(trained[k], init[k]) for k in trained if k.startswith("model.layers.0."))  # LLM untouched
    rows = (tmp_path / "vis" / "log.csv").read_text().splitlines()
    assert rows[0].split(",")[:3] == ["step", "loss", "elapsed_s"] and len(rows) == 4


def test_vision_pretraining_does_not_depend_on_the_rest_of_the_model(tmp_path):
    """The tower's training follows the seed and the vision config alone: a recipe with another VAE (whose weights
    the model draws before the heads'; a wider VAE once changed every later stage of the tiny chain) trains the
    same tower."""
    from vargpt.training.vision import VisionPretrainConfig, pretrain_vision

    towers = []
    for mlp in (0, 1024):
        recipe = tmp_path / f"und{mlp}.yaml"
        vae = {"arch": "patch", "patch_size": 8, "base_ch": 64, "codebook_dim": 64, "patch_mlp_ch": mlp}
        recipe.write_text(json.dumps({  # JSON is YAML
            "name": "und", "stage": "sft_understanding", "trainable": ["visual", "model", "lm_head"],
            "model": {"preset": "tiny", "config_overrides": {"vision": {"patch_size": 4}, "vae": vae}},
            "data": {"sources": [{"path": "unused", "format": "shapesworld"}], "image_size": 64}}))
        out = pretrain_vision(VisionPretrainConfig(recipe=str(recipe), out=str(tmp_path / f"vis{mlp}"), steps=2,
                                                   batch_size=2, eval_every=1, progress=False))
        towers.append({k: v for k, v in load_file(out / "model.safetensors").items() if k.startswith("visual.")})
    assert towers[0].keys() == towers[1].keys() and len(towers[0]) > 0
    assert all(torch.equal(towers[0][k], towers[1][k]) for k in towers[0])

"""Records: both formats, paths, skipping bad images, mixing, bucketing, collation."""

import json
import random

import pytest
import torch
from PIL import Image

from vargpt.config import tiny_config
from vargpt.data.records import Collator, MixtureBatchSampler, RecordDataset, gen_image_tensor, read_records
from vargpt.data.shapesworld import write_dataset
from vargpt.errors import InputError
from vargpt.processing import IGNORE_INDEX, ByteTokenizer, VARGPTProcessor

CFG = tiny_config()


def _processor():
    return VARGPTProcessor(ByteTokenizer(CFG.tokens), CFG)


def _dataset(records, **kw):
    return RecordDataset(records, _processor(), image_size=64, stride=CFG.vae.stride, **kw)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    (root / "img").mkdir()
    for i, c in enumerate(["red", "blue", "green", "white"]):
        Image.new("RGB", (80, 64), c).save(root / "img" / f"{i}.png")
    rows = [
        {"conversations": [{"from": "human", "value": "<image>What colour?"}, {"from": "gpt", "value": "Red."}],
         "images": ["img/0.png"], "system": "Be brief."},
        {"messages": [{"role": "user", "content": "Draw blue."}, {"role": "assistant", "content": "Ok <image_gen>"}],
         "images": ["img/1.png"]},
        {"conversations": [{"from": "human", "value": "Draw green."}],
         "chosen": {"from": "gpt", "value": "<image_gen>"}, "rejected": {"from": "gpt", "value": "<image_gen>"},
         "images": ["img/2.png", "img/3.png"]},
        {"messages": [{"role": "user", "content": "<image>\nMake it red."},
                      {"role": "assistant", "content": "The output image is: <image_gen>"}],
         "images": ["img/3.png", "img/0.png"], "id": "edit-1"},
    ]
    path = root / "data.json"
    path.write_text(json.dumps(rows))
    return path


def test_released_sharegpt_format(released):
    recs = read_records(released, "released")
    assert [r.task for r in recs] == ["chat", "t2i", "dpo", "edit"]
    assert recs[0].messages[0] == {"role": "system", "content": "Be brief."}
    assert recs[0].messages[1]["role"] == "user" and recs[0].messages[2]["role"] == "assistant"
    assert recs[0].images[0] == released.parent / "img" / "0.png"
    assert recs[2].is_pair and recs[2].chosen["role"] == "assistant" and recs[3].id == "edit-1"


def test_samples_and_collation(released):
    recs = read_records(released, "released")
    ds = _dataset([recs[0], recs[1], recs[3]])
    batch = Collator(ds.processor)([ds[0], ds[1], ds[2]])
    t = CFG.tokens
    assert batch["input_ids"].shape[0] == 3 and batch["labels"].shape == batch["input_ids"].shape
    assert batch["gen_pixel_values"].shape == (2, 3, 64, 64)  # t2i target + edit target
    assert batch["pixel_values"].shape[0] > 0 and batch["image_grid_thw"].shape == (2, 3)  # 2 understanding images
    row = batch["input_ids"][1]
    assert (row == t.image_gen_pad).sum() == CFG.image_gen_token_num
    lab = batch["labels"][1]
    assert (lab[: (row == t.im_start).nonzero()[-1]] == IGNORE_INDEX).all()  # prompt not supervised
    assert (batch["attention_mask"].sum(1) < batch["input_ids"].shape[1]).any()  # right padding happened
    assert batch["skipped"] == [] and batch["tasks"] == ["chat", "t2i", "edit"]


def test_preference_pairs(released):
    recs = read_records(released, "released")
    ds = _dataset([recs[2]], pairs=True)
    batch = Collator(ds.processor)([ds[0]])
    assert batch["n_pairs"] == 1 and batch["input_ids"].shape[0] == 2
    chosen, rejected = batch["gen_pixel_values"]
    assert torch.allclose(chosen[1], torch.full((64, 64), 2 * 128 / 255 - 1), atol=1e-6)  # green (0, 128, 0)
    assert torch.allclose(rejected, torch.ones(3, 64, 64))  # white
    with pytest.raises(InputError, match="preference"):
        _dataset([recs[1]], pairs=True)[0]


def test_shapesworld_source_and_bad_images_are_skipped_and_counted(tmp_path, caplog):
    write_dataset(tmp_path, n=6, size=64, tasks=("t2i", "caption"), progress=False)
    recs = read_records(tmp_path, "shapesworld")
    assert len(recs) == 6 and recs[0].task == "t2i" and recs[0].images[0].is_file()
    recs[1].images[0].unlink()  # missing
    recs[2].images[0].write_bytes(b"\x89PNG\r\n\x1a\n broken")  # corrupt
    ds = _dataset(recs)
    items = [ds[i] for i in range(6)]
    assert items[1]["skipped"] == [recs[1].id, recs[2].id] and items[1]["id"] == recs[3].id  # next good one
    assert items[2]["skipped"] == [recs[2].id] and items[2]["id"] == recs[3].id
    assert all(it["skipped"] == [] for i, it in enumerate(items) if i not in (1, 2))
    batch = Collator(ds.processor)(items)
    assert sorted(batch["skipped"]) == sorted([recs[1].id, recs[2].id, recs[2].id])
    assert "skipping record" in caplog.text


def test_malformed_record_names_the_line(tmp_path):
    (tmp_path / "records.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"images": []}\n')
    with pytest.raises(InputError, match=r"records.jsonl:2"):
        read_records(tmp_path)
    with pytest.raises(InputError, match="no such records file"):
        read_records(tmp_path / "nope.jsonl")


def test_mixture_weights_determinism_and_sharding():
    s = MixtureBatchSampler([10, 6], [2.0, 0.5], [0] * 16, batch_size=2, seed=3)
    flat = [i for b in s.epoch_batches(0) for i, _ in b]
    assert len(flat) == 23 // 2 * 2  # 20 + 3 draws, full batches only
    assert sum(i < 10 for i in flat) in (20, 19, 18) and len({i for i in flat if i < 10}) == 10
    assert s.epoch_batches(0) == MixtureBatchSampler([10, 6], [2.0, 0.5], [0] * 16, batch_size=2,
                                                     seed=3).epoch_batches(0)
    assert s.epoch_batches(1) != s.epoch_batches(0)
    r0, r1 = s.rank_batches(0, 0, 2), s.rank_batches(0, 1, 2)
    assert len(r0) == len(r1) and r0[0] == s.epoch_batches(0)[0] and r1[0] == s.epoch_batches(0)[1]
    assert s.rank_batches(0, 1, 2, start=4) == r1[2:]


def test_bucketing_keeps_one_resolution_per_batch():
    keys = [(64, 64) if i % 3 else (48, 80) for i in range(30)]
    s = MixtureBatchSampler([30], [1.0], keys, batch_size=4, seed=0)
    for b in s.epoch_batches(0):
        assert len({keys[i] for i, _ in b}) == 1


def test_gen_image_tensor_transforms():
    img = Image.new("RGB", (100, 80), (255, 0, 0))
    x = gen_image_tensor(img, (64, 64), "resize")
    assert x.shape == (3, 64, 64) and x[0].min() == 1.0 and x[1].max() == -1.0
    a = gen_image_tensor(img, (64, 64), "released", random.Random(1))
    b = gen_image_tensor(img, (64, 64), "released", random.Random(1))
    assert a.shape == (3, 64, 64) and torch.equal(a, b)


def test_keep_aspect_targets_use_the_nearest_template(released):
    recs = read_records(released, "released")
    ds = _dataset([recs[1]], keep_aspect=True)  # an 80 x 64 (w x h) image: template h/w = 0.8
    assert ds.bucket_key(0) == (64, 80)
    s = ds[0]["sample"]
    assert s["gen_pixel_values"].shape == (1, 3, 64, 80)
    assert (s["input_ids"] == CFG.tokens.image_gen_pad).sum() == 128  # 114 tokens padded to 128


def _write(path, *rows):
    path.write_bytes(b"\n".join(r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows) + b"\n")
    return path


def _t2i(image):
    return {"messages": [{"role": "user", "content": "Draw."}, {"role": "assistant", "content": "<image_gen>"}],
            "images": [image]}


@pytest.mark.parametrize("bad", ["../outside.png", "images/../../outside.png", "/etc/passwd"])
def test_image_paths_that_leave_the_data_root_name_file_and_line(tmp_path, bad):
    root = tmp_path / "data"
    root.mkdir()
    _write(root / "records.jsonl", _t2i("images/a.png"), _t2i(bad))
    with pytest.raises(InputError, match=rf"records.jsonl:2: image path '{bad}' leaves the data root"):
        read_records(root)


def test_paths_inside_the_root_are_fine_however_written(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    _write(root / "records.jsonl", _t2i("images/../images/a.png"), _t2i(str(root / "images" / "b.png")))
    assert [r.images[0].name for r in read_records(root)] == ["a.png", "b.png"]
    _write(root / "records.jsonl", _t2i("../shared/c.png"))  # a wider data root, named on purpose
    assert read_records(root, root=tmp_path)[0].images[0] == root / "../shared/c.png"


def test_a_symlink_out_of_the_data_root_is_skipped_and_counted(tmp_path, caplog):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(tmp_path / "secret.png")
    Image.new("RGB", (64, 64), "blue").save(root / "images" / "ok.png")
    (root / "images" / "link.png").symlink_to(tmp_path / "secret.png")
    _write(root / "records.jsonl", {**_t2i("images/link.png"), "id": "evil"}, {**_t2i("images/ok.png"), "id": "ok"})
    ds = _dataset(read_records(root))
    item = ds[0]
    assert item["id"] == "ok" and item["skipped"] == ["evil"]
    assert "symlink out of the data root" in caplog.text


def test_non_utf8_and_malformed_json_name_file_and_line(tmp_path):
    good = json.dumps(_t2i("a.png")).encode()
    path = _write(tmp_path / "r.jsonl", good, good, b'{"messages": "caf\xe9"}')
    with pytest.raises(InputError, match=r"r.jsonl:3: not UTF-8 text \(byte 0xe9 at column 18\)"):
        read_records(path)
    _write(path, b"\xef\xbb\xbf" + good, good)  # a byte-order mark is fine
    assert len(read_records(path)) == 2
    _write(path, good, b'{"messages": [}')
    with pytest.raises(InputError, match=r"r.jsonl:2: not valid JSON"):
        read_records(path)
    listing = tmp_path / "r.json"
    listing.write_text("[\n" + good.decode() + ",\n{oops}\n]")
    with pytest.raises(InputError, match=r"r.json:3: not valid JSON"):
        read_records(listing)

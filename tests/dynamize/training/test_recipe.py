"""Every shipped recipe validates; bad recipes and overrides name the bad key; ranges come from one table; the
default recipe of a run fits its model, data and input size."""
from dataclasses import fields

import pytest

from dynamize import ranges
from dynamize.errors import DynamizeError
from dynamize.training.recipe import RECIPE_DIR, Recipe, RecipeError, default_recipe, given_keys, load_recipe


@pytest.mark.parametrize("path", sorted(RECIPE_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path.stem)
    assert 0 < recipe.budget <= 1 and recipe.epochs >= 1


def test_recipes_shipped():
    assert {"fashion-mnist-resnet18", "imagenet-resnet50"} <= {p.stem for p in RECIPE_DIR.glob("*.yaml")}


def test_overrides_are_typed():
    r = load_recipe("fashion-mnist-resnet18", ["epochs=7", "lr_gates=1e-2", "data_dir=/x", "calib_size="])
    assert (r.epochs, r.lr_gates, r.data_dir, r.calib_size) == (7, 0.01, "/x", None)


@pytest.mark.parametrize("override, key", [(["epochs=abc"], "epochs"), (["nope=1"], "nope"),
                                           (["budget=1.5"], "budget"), (["lr_gates=-1"], "lr_gates"),
                                           (["gates=all"], "gates"), (["epochs"], "key=value"),
                                           (["opt=adamx"], "opt"), (["sched=linear"], "sched"),
                                           (["calib_size=0"], "calib_size"), (["img_size=100000"], "img_size")])
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(DynamizeError, match=key):
        load_recipe("fashion-mnist-resnet18", override)


def test_an_option_and_an_override_of_the_same_key_must_agree():
    with pytest.raises(RecipeError, match="--budget 0.5 and --set budget=0.3 disagree"):
        load_recipe("fashion-mnist-resnet18", ["budget=0.3"], budget=0.5)
    assert load_recipe("fashion-mnist-resnet18", ["budget=0.50"], budget=0.5).budget == 0.5


def test_every_numeric_recipe_key_has_a_range():
    numeric = {f.name for f in fields(Recipe)
               if {int, float} & set(getattr(f.type, "__args__", (f.type,)))}
    assert numeric and numeric <= set(ranges.RANGES)


@pytest.mark.parametrize("key", sorted(ranges.RANGES))
def test_range_edges(key):
    r = ranges.RANGES[key]
    inside = r.low if not r.low_open else (r.low + r.high) / 2
    assert ranges.check(key, r.kind(inside)) == r.kind(inside)
    outside = [float("nan"), float("inf"), "1", None, True, r.high + 1 if not r.high_open else r.high,
               r.low - 1 if not r.low_open else r.low]
    if r.kind is int:
        outside.append(r.low + 0.5)
    for value in outside:
        with pytest.raises(ranges.RangeError, match=key):
            ranges.check(key, value)


def test_bad_recipe_files(tmp_path):
    (tmp_path / "bad.yaml").write_text("epochs: [1, 2]\n")
    (tmp_path / "broken.yaml").write_text("epochs: : :\n")
    (tmp_path / "zero.yaml").write_text("img_size: 0\n")
    with pytest.raises(RecipeError, match="epochs"):
        load_recipe(str(tmp_path / "bad.yaml"))
    with pytest.raises(RecipeError, match="YAML"):
        load_recipe(str(tmp_path / "broken.yaml"))
    with pytest.raises(ranges.RangeError, match="img_size"):
        load_recipe(str(tmp_path / "zero.yaml"))
    with pytest.raises(RecipeError, match="no recipe named"):
        load_recipe("no-such-recipe")
    with pytest.raises(RecipeError, match="not a plain name"):
        load_recipe("../../etc/passwd")


def test_given_keys_are_what_the_user_set(tmp_path):
    (tmp_path / "r.yaml").write_text("epochs: 2\nseed: 1\n")
    assert given_keys(None, ["budget=0.3"], data="x", data_dir=None) == {"budget", "data"}
    assert given_keys(str(tmp_path / "r.yaml"), ["lr_gates=1"]) == {"epochs", "seed", "lr_gates"}


def test_default_recipe_fits_model_data_and_size(tmp_path):
    for name, text in {"small-resnet": "model: resnet18\ndata: fashion-mnist\nimg_size: 32\n",
                       "big-resnet": "model: resnet50\ndata: /data/imagenet\nimg_size: 224\n",
                       "small-mobile": "model: mobilenetv2_100\ndata: fashion-mnist\nimg_size: 32\n"}.items():
        (tmp_path / f"{name}.yaml").write_text(text)

    def pick(*args):
        return default_recipe(*args, folder=tmp_path).stem

    assert pick("resnet50", 224) == "big-resnet"
    assert pick("resnet101", 32) == "small-resnet"
    assert pick("mobilenetv2_140", 32) == "small-mobile"
    assert pick("efficientnet_b0", 32) == "small-mobile"  # timm builds both in its efficientnet module
    assert pick("resnet50", 224, "fashion-mnist") == "small-resnet"  # the data set decides first
    assert pick("test_resnet", 32) == "small-resnet"
    assert default_recipe("resnet50", 224).stem == "imagenet-resnet50"
    assert default_recipe("resnet18", 32).stem == "fashion-mnist-resnet18"


def test_mobile_nets_get_the_mobile_recipe_and_other_nets_do_not():
    for arch in ("mobilenetv2_100", "mobilenetv3_large_100", "efficientnet_b0"):
        assert default_recipe(arch, 64, "fashion-mnist").stem == "fashion-mnist-mobilenet"
    for arch in ("resnet18", "regnety_002", "convnext_atto"):
        assert default_recipe(arch, 64, "fashion-mnist").stem == "fashion-mnist-resnet18"

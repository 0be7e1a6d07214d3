"""Every shipped recipe validates; bad recipes and overrides name the bad key."""
import pytest

from dynamize.training.recipe import RECIPE_DIR, RecipeError, check_budget, load_recipe


@pytest.mark.parametrize("path", sorted(RECIPE_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path.stem)
    assert 0 < recipe.budget <= 1 and recipe.epochs >= 1


def test_recipes_shipped():
    assert {"fashion-mnist-resnet18", "imagenet-resnet50"} <= {p.stem for p in RECIPE_DIR.glob("*.yaml")}


def test_overrides_are_typed():
    r = load_recipe("fashion-mnist-resnet18", ["epochs=7", "lr_gates=1e-2", "data_dir=/x"])
    assert (r.epochs, r.lr_gates, r.data_dir) == (7, 0.01, "/x")


@pytest.mark.parametrize("override, key", [(["epochs=abc"], "epochs"), (["nope=1"], "nope"),
                                           (["budget=1.5"], "budget"), (["lr_gates=-1"], "lr_gates"),
                                           (["gates=all"], "gates"), (["epochs"], "key=value")])
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(RecipeError, match=key):
        load_recipe("fashion-mnist-resnet18", override)


def test_bad_recipe_files(tmp_path):
    (tmp_path / "bad.yaml").write_text("epochs: [1, 2]\n")
    (tmp_path / "broken.yaml").write_text("epochs: : :\n")
    with pytest.raises(RecipeError, match="epochs"):
        load_recipe(str(tmp_path / "bad.yaml"))
    with pytest.raises(RecipeError, match="YAML"):
        load_recipe(str(tmp_path / "broken.yaml"))
    with pytest.raises(RecipeError, match="no recipe named"):
        load_recipe("no-such-recipe")
    with pytest.raises(RecipeError, match="not a plain name"):
        load_recipe("../../etc/passwd")


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "nan", "abc", "inf"])
def test_bad_budgets(value):
    with pytest.raises(RecipeError):
        check_budget(value)

import pytest

from detox_sft.config import RecipeError, load_recipe, recipe_names


def test_shipped_recipes_load():
    assert {"offline", "tutorial"} <= set(recipe_names())
    tutorial = load_recipe("tutorial")
    assert tutorial.training.base_model == "facebook/opt-350m"
    assert tutorial.rephrase.mask_threshold == 1.2
    offline = load_recipe("offline")
    assert offline.training.base_model.startswith("zoo:")
    assert offline.profile == "offline"


def test_recipe_by_path_and_override(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("profile: offline\nrephrase:\n  mask_threshold: 1.5\n")
    recipe = load_recipe(path, run_dir=str(tmp_path / "r"))
    assert recipe.name == "mine"
    assert recipe.rephrase.mask_threshold == 1.5
    assert recipe.run_path == tmp_path / "r"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("profile: offline\nrephrase:\n  engine: fast\n", "rephrase.engine"),
        ("profile: offline\nrephrase:\n  mask_threshold: -1\n", "rephrase.mask_threshold"),
        ("profile: offline\nevaluation:\n  top_p: 1.5\n", "evaluation.top_p"),
        ("profile: offline\ndata:\n  num_eval_prompts: 0\n", "data.num_eval_prompts"),
        ("profile: offline\ntraining:\n  lr: 1\n", "training.lr"),
        ("profile: gpu\n", "profile"),
        ("name: x\n", "profile"),
        ("profile: offline\nexport:\n  dtype: int3\n", "export.dtype"),
    ],
)
def test_bad_value_names_field_and_fix(tmp_path, text, field):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(err.value).startswith(field)
    assert "Fix:" in str(err.value)


def test_unknown_recipe_lists_the_real_ones():
    with pytest.raises(RecipeError, match="offline"):
        load_recipe("no-such-recipe")


def test_section_override_merges_and_none_keeps():
    recipe = load_recipe("offline", serving={"url": "http://x:8080", "grpc_target": None}, run_dir=None)
    assert recipe.serving.url == "http://x:8080"
    assert recipe.serving.token_env == "MODEL_TOKEN"  # untouched fields keep the recipe's values
    assert recipe.run_path.name == "offline"

import pytest

from detox_sft.config import RecipeError, load_recipe, recipe_fields, recipe_names


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
        ("profile: offline\ntraining:\n  sft:\n    learning_rate: fast\n", "training.sft.learning_rate"),
        ("profile: offline\ntraining:\n  sft:\n    max_seq_length: 64\n", "training.sft.max_seq_length"),
        ("profile: offline\ntraining:\n  lora:\n    r: big\n", "training.lora.r"),
        ("profile: offline\ntraining:\n  lora:\n    bias: some\n", "training.lora.bias"),
        ("profile: offline\nserving:\n  timeout: soon\n", "serving.timeout"),
        ("profile: offline\nseed: x\n", "seed"),
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


def test_sft_and_lora_are_checked_against_the_library_classes(tmp_path):
    """training.sft / training.lora: names and types from trl.SFTConfig / peft.LoraConfig, when the recipe loads."""
    path = tmp_path / "r.yaml"
    path.write_text("profile: offline\ntraining:\n  sft:\n    learning_rate: fast\n")
    with pytest.raises(RecipeError, match=r"^training.sft.learning_rate: got 'fast', expected a float\. Fix:"):
        load_recipe(path)
    path.write_text("profile: offline\ntraining:\n  sft:\n    learning_rate: 1e-4\n")  # YAML 1.1 reads a string
    with pytest.raises(RecipeError, match="write it with a dot and a signed exponent, such as 1.0e-4"):
        load_recipe(path)
    path.write_text("profile: offline\ntraining:\n  sft:\n    evaluation_strategy: epoch\n")
    with pytest.raises(RecipeError, match="use training.sft.eval_strategy, the closest trl.SFTConfig field"):
        load_recipe(path)
    path.write_text(
        "profile: offline\ntraining:\n  sft: {learning_rate: 1.0e-4, lr_scheduler_type: cosine, report_to: [none]}\n"
        "  lora: {r: 4, target_modules: all-linear, layers_to_transform: [0, 1], bias: none}\n"
    )
    recipe = load_recipe(path)
    assert recipe.training.sft["lr_scheduler_type"] == "cosine" and recipe.training.lora["r"] == 4


def test_dotted_overrides_read_each_text_by_its_field_type(tmp_path):
    recipe = load_recipe(
        "offline",
        dotted={
            "seed": "3",
            "run_dir": str(tmp_path / "r"),
            "evaluation.num_samples": "2",
            "evaluation.top_p": "1",
            "serving.url": "",  # empty, as in YAML: null
            "data.num_train_samples": "null",
            "rephrase.expert_weights": "-1,2.5",
            "rephrase.combine_original": "false",
            "training.sft.learning_rate": "1e-4",
            "training.lora.target_modules": "[q_proj, v_proj]",
        },
    )
    assert (recipe.seed, recipe.evaluation.num_samples, recipe.data.num_train_samples) == (3, 2, None)
    assert recipe.rephrase.expert_weights == [-1, 2.5] and recipe.rephrase.combine_original is False
    assert recipe.training.sft["learning_rate"] == 1e-4
    assert recipe.training.sft["num_train_epochs"] == 3  # the recipe's other sft keys are kept
    assert recipe.training.lora["target_modules"] == ["q_proj", "v_proj"] and recipe.training.lora["r"] == 16
    assert recipe.run_path == tmp_path / "r" and recipe.serving.url is None


@pytest.mark.parametrize(
    ("key", "text", "message"),
    [
        ("training.sft.learning_rate", "fast", "--training.sft.learning_rate: got 'fast', expected a float. Fix:"),
        ("evaluation.num_samples", "2.5", "--evaluation.num_samples: got '2.5', expected an integer. Fix:"),
        ("evaluation.num_sample", "2", "Fix: did you mean --evaluation.num_samples?"),
        ("training.sft.max_seq_length", "64", "did you mean --training.sft.max_length?"),
    ],
)
def test_dotted_override_errors_name_the_flag_and_the_fix(key, text, message):
    with pytest.raises(RecipeError) as err:
        load_recipe("offline", dotted={key: text})
    assert message in str(err.value)


def test_recipe_fields_walk_the_dataclasses_with_docstring_help():
    fields = recipe_fields()
    assert {"seed", "run_dir", "rephrase.engine", "evaluation.num_samples", "training.device"} <= set(fields)
    assert "training.sft" not in fields and "training" not in fields  # library kwargs and sections are not flags
    assert all(f.help for f in fields.values()), [name for name, f in fields.items() if not f.help]
    assert fields["evaluation.num_samples"].annotation is int
    assert fields["evaluation.num_samples"].help == ("sampled continuations per prompt (k). (int, defaults to 25)")

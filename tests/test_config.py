import pytest

from detox_sft.config import RECIPES_DIR, RecipeError, load_recipe, recipe_names, recipe_parser


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
    with pytest.raises(RecipeError, match=r"^training.sft.learning_rate: expected float, got fast\. Fix:"):
        load_recipe(path)
    path.write_text("profile: offline\ntraining:\n  sft:\n    learning_rate: 1e-4\n")  # YAML 1.1 reads a string
    assert load_recipe(path).training.sft["learning_rate"] == 1e-4  # read by SFTConfig's annotation: a float
    path.write_text("profile: offline\ntraining:\n  sft:\n    evaluation_strategy: epoch\n")
    with pytest.raises(RecipeError, match="use training.sft.eval_strategy, the closest trl.SFTConfig field"):
        load_recipe(path)
    path.write_text(
        "profile: offline\ntraining:\n  sft: {learning_rate: 1.0e-4, lr_scheduler_type: cosine, report_to: [none]}\n"
        "  lora: {r: 4, target_modules: all-linear, layers_to_transform: [0, 1], bias: none}\n"
    )
    recipe = load_recipe(path)
    assert recipe.training.sft == {"learning_rate": 1e-4, "lr_scheduler_type": "cosine", "report_to": ["none"]}
    assert recipe.training.lora["r"] == 4 and recipe.training.lora["layers_to_transform"] == [0, 1]


def test_the_sft_defaults_are_written_where_they_are_declared():
    """What the experiment fixes (checkpoints every 50 steps, the last 2 kept, ...) is a value of TrainingConfig's
    default and of the example recipe, not a default hidden in the training code."""
    from detox_sft.config import TrainingConfig

    fixed = {"eval_strategy": "epoch", "save_strategy": "steps", "save_steps": 50, "save_total_limit": 2}
    fixed |= {"report_to": "none", "logging_first_step": True, "ddp_find_unused_parameters": False}
    for sft in (TrainingConfig().sft, load_recipe("examples/my_recipe.yaml").training.sft):
        assert {key: sft.get(key) for key in fixed} == fixed


def test_dotted_overrides_read_each_text_by_its_field_type(tmp_path):
    recipe = load_recipe(
        "offline",
        dotted={
            "seed": "3",
            "run_dir": str(tmp_path / "r"),
            "evaluation.num_samples": "2",
            "evaluation.top_p": "1",
            "serving.url": "null",
            "data.num_train_samples": "null",
            "rephrase.expert_weights": "[-1, 2.5]",
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


def test_flags_override_as_on_the_command_line(tmp_path):
    args = ["--training.sft.learning_rate", "1e-4", "--training.lora.r=8", "--seed", "3", "--run_dir", str(tmp_path)]
    args += [
        "--training.lora.target_modules",
        "null",
        "--data.train_dataset",
        "x.jsonl",
        "--evaluation.num_samples",
        "5",
    ]
    recipe = load_recipe("offline", args)
    assert (recipe.training.sft["learning_rate"], recipe.training.lora["r"], recipe.seed) == (1e-4, 8, 3)
    assert recipe.training.lora["target_modules"] is None and recipe.data.train_dataset == "x.jsonl"
    assert recipe.run_path == tmp_path and recipe.evaluation.num_samples == 5


@pytest.mark.parametrize(
    ("key", "text", "message"),
    [
        ("training.sft.learning_rate", "fast", "training.sft.learning_rate: expected float, got fast. Fix:"),
        ("evaluation.num_samples", "2.5", "evaluation.num_samples: expected int, got 2.5. Fix:"),
        ("evaluation.num_sample", "2", "Fix: did you mean evaluation.num_samples?"),
        ("training.sft.max_seq_length", "64", "use training.sft.max_length, the closest"),
    ],
)
def test_dotted_override_errors_name_the_flag_and_the_fix(key, text, message):
    with pytest.raises(RecipeError) as err:
        load_recipe("offline", dotted={key: text})
    assert message in str(err.value)


def test_the_parser_has_a_documented_flag_per_field():
    """jsonargparse builds the flags from the dataclasses: the type from the annotation, the help from the docstring."""
    actions = {flag: a for a in recipe_parser()._actions for flag in a.option_strings}
    assert {"--seed", "--run_dir", "--rephrase.engine", "--evaluation.num_samples", "--training.device"} <= set(actions)
    assert actions["--evaluation.num_samples"].help.startswith("sampled continuations per prompt (k).")
    fields = [
        a
        for a in recipe_parser()._actions
        if a.option_strings and "CONFIG" not in str(a.metavar) and a.help != "==SUPPRESS=="
    ]
    assert all(a.help for a in fields), [a.option_strings for a in fields if not a.help]


def test_trl_text_values_that_yaml_reads_as_booleans_stay_text(tmp_path):
    """TRL's eval_strategy "no" (quoted in YAML, bare on the command line) reaches SFTConfig as the text "no"."""
    import yaml

    values = yaml.safe_load((RECIPES_DIR / "offline.yaml").read_text())
    values["training"]["sft"]["eval_strategy"] = "no"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(values))
    assert load_recipe(path).training.sft["eval_strategy"] == "no"
    flags = load_recipe("offline", ["--training.sft.eval_strategy", "no", "--training.lora.target_modules", "null"])
    assert flags.training.sft["eval_strategy"] == "no"
    assert flags.training.lora["target_modules"] is None
    assert flags.training.sft["save_steps"] == 50  # the recipe's other values kept under a flag

"""
The docs site builds, its generated sections match the code, and every command, accelerate config and recipe it
shows is one the scripts accept.
"""

import ast
import importlib.util
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml


ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
ACCELERATE_CONFIGS = ROOT / "examples" / "accelerate_configs"
RECIPES = ROOT / "recipes"

# Recipe -> the example script that reads it with `--config` (one line per recipe).
RECIPE_EXAMPLES = {
    "tip_qwen3-8b_to_qwen3-4b.yaml": "tip_distill.py",
    "opsdc_qwen3-8b.yaml": "opsdc.py",
    "bridge_qwen3-1.7b.yaml": "bridge.py",
    "paced_qwen3-8b_to_qwen3-1.7b.yaml": "paced_distill.py",
    "ace_qwen2.5-math-7b.yaml": "ace_grpo.py",
}

# The papers' settings each recipe must carry.
PAPER_SETTINGS = {
    "paced_qwen3-8b_to_qwen3-1.7b.yaml": {
        "model_name_or_path": "Qwen/Qwen3-1.7B",
        "teacher_model_name_or_path": "Qwen/Qwen3-8B",
        "paced_alpha": 1.0,
        "paced_beta": 1.0,
        "pass_rate_rollouts": 8,
        "rollout_source": "teacher",
        "kl_schedule": "forward",
    },
    "ace_qwen2.5-math-7b.yaml": {
        "model_name_or_path": "Qwen/Qwen2.5-Math-7B",
        "dataset_name": "open-r1/DAPO-Math-17k-Processed",
        "ace_transform": "softplus",
        "ace_confidence": "sum",
    },
    "tip_qwen3-8b_to_qwen3-4b.yaml": {
        "model_name_or_path": "Qwen/Qwen3-4B",
        "teacher_model_name_or_path": "Qwen/Qwen3-8B",
        "dataset_name": "open-r1/DAPO-Math-17k-Processed",
        "token_selection": "soft_or",
        "token_ratio": 0.5,
        "learning_rate": 1e-6,
        "lr_scheduler_type": "cosine",
        "temperature": 1.0,
        "top_p": 1.0,
        "max_completion_length": 8192,
    },
    "opsdc_qwen3-8b.yaml": {
        "model_name_or_path": "Qwen/Qwen3-8B",
        "learning_rate": 1e-6,
        "lr_scheduler_type": "constant",
        "weight_decay": 0.01,
        "max_grad_norm": 1.0,
        "bf16": True,
        "teacher_refresh_steps": 50,
        "concise_instruction": "v2",
        "beta": 1.0,
        "temperature": 1.0,
        # The paper's data, prompt length, normalisation and reported horizon (step 99).
        "dataset_name": "open-r1/DAPO-Math-17k-Processed",
        "max_prompt_tokens": 1024,
        "loss_normalization": "rollout",
        "max_steps": 100,
    },
    # The bridge paper: Qwen3-8B teacher improved by GRPO, Qwen3-1.7B student; teacher GRPO -> forward-KL warm-up -> OPD on
    # every token.
    "bridge_qwen3-1.7b.yaml": {
        "model_name_or_path": "Qwen/Qwen3-1.7B",
        "teacher_model_name_or_path": "Qwen/Qwen3-8B",
        "stages": "teacher_rl,warmup,opd",
        "token_selection": "all",
        "ace_alpha": 0.0,
    },
}

# The accelerate configs that the docs and recipes name.
ACCELERATE_CONFIG_NAMES = ["single_gpu.yaml", "multi_gpu.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml",
                           "fsdp2.yaml"]


def _load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_EXAMPLES = {}


def _example(script: str):
    if script not in _EXAMPLES:
        _EXAMPLES[script] = _load_module(ROOT / "examples" / script, f"_docs_example_{Path(script).stem}")
    return _EXAMPLES[script]


def _generator():
    return _load_module(DOCS / "generate.py", "_docs_generate")


# --- commands shown in the docs -------------------------------------------------------------------------------

_FENCE = re.compile(r"```(?:bash|sh|shell)\n(.*?)```", re.DOTALL)


def _bash_blocks(path: Path) -> list[str]:
    """The fenced bash blocks of a Markdown file, or of a Python module's docstring."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".py":
        text = ast.get_docstring(ast.parse(text)) or ""
    return [match.group(1) for match in _FENCE.finditer(text)]


def _commands():
    """
    Every `accelerate launch`, `python <script>.py` (examples and benchmarks), `trl vllm-serve` and `trl-tip` command
    of the docs, README and examples.
    """
    sources = sorted(DOCS.glob("*.md")) + [ROOT / "README.md"] + sorted((ROOT / "examples").glob("*.py"))
    commands = []
    for path in sources:
        found = 0
        for block in _bash_blocks(path):
            for line in block.replace("\\\n", " ").splitlines():
                tokens = shlex.split(line, comments=True)
                while tokens and re.match(r"^[A-Za-z_]\w*=", tokens[0]):  # environment assignments
                    tokens.pop(0)
                if tokens[:2] in (["accelerate", "launch"], ["trl", "vllm-serve"]) or tokens[:1] == ["trl-tip"] or (
                    tokens[:1] in (["python"], ["python3"]) and len(tokens) > 1 and tokens[1].endswith(".py")
                ):
                    found += 1
                    commands.append(pytest.param(tokens, id=f"{path.relative_to(ROOT)}#{found}"))
    return commands


COMMANDS = _commands()


def _split_accelerate(tokens):
    """`accelerate launch [launch options] script [script args]` -> (launch options, script, script args)."""
    from accelerate.commands.launch import launch_command_parser

    actions = launch_command_parser()._option_string_actions
    launch_args, index = [], 2
    while index < len(tokens) and tokens[index].startswith("-"):
        name = tokens[index].split("=", 1)[0]
        assert name in actions, f"`accelerate launch` has no option {name}"
        takes_value = actions[name].nargs != 0 and "=" not in tokens[index]
        launch_args += tokens[index:index + 1 + takes_value]
        index += 1 + takes_value
    return launch_args, tokens[index], tokens[index + 1:]


def _parse_example(script: str, args: list[str]):
    """Parse `args` with the example's own parser into its dataclasses (their validation included)."""
    import torch

    parser = _example(script).make_parser()
    for token in args:
        if token.startswith("--"):
            name = token.split("=", 1)[0]
            assert name == "--config" or name in parser._option_string_actions, f"{script} accepts no {name}"
    # TRL defaults to bf16, and transformers refuses bf16 without a GPU: parse as on a GPU machine, minus bf16.
    extra = [] if torch.cuda.is_available() else ["--bf16", "false"]
    try:
        return parser.parse_args_and_config(args + extra)
    except SystemExit as error:
        raise AssertionError(f"{script} rejects {shlex.join(args)} (exit {error.code})") from None


def test_the_docs_show_commands_for_every_accelerate_config_and_recipe():
    shown_configs, shown_recipes = set(), set()
    for param in COMMANDS:
        tokens = param.values[0]
        for option, value in zip(tokens, tokens[1:]):
            if option == "--config_file":
                shown_configs.add(Path(value).name)
            if option == "--config":
                shown_recipes.add(Path(value).name)
    assert set(ACCELERATE_CONFIG_NAMES) <= shown_configs
    assert set(RECIPE_EXAMPLES) <= shown_recipes


@pytest.mark.parametrize("tokens", COMMANDS)
def test_documented_command_parses(tokens, monkeypatch):
    monkeypatch.chdir(ROOT)
    if tokens[0] == "trl-tip":
        from trl_tip.cli import build_parser

        try:
            build_parser().parse_args(tokens[1:])
        except SystemExit as error:
            raise AssertionError(f"`trl-tip` rejects {shlex.join(tokens[1:])} (exit {error.code})") from None
        return
    if tokens[:2] == ["trl", "vllm-serve"]:
        from trl.scripts.vllm_serve import make_parser

        actions = make_parser()._option_string_actions
        for token in tokens[2:]:
            if token.startswith("--"):
                assert token.split("=", 1)[0] in actions, f"`trl vllm-serve` has no option {token}"
        return
    if tokens[0] == "accelerate":
        launch_args, script, args = _split_accelerate(tokens)
        for option, value in zip(launch_args, launch_args[1:]):
            if option == "--config_file":
                assert (ROOT / value).is_file(), f"{value} does not exist"
    else:
        script, args = tokens[1], tokens[2:]
    if script.startswith("benchmarks/") and tokens[0] != "accelerate":
        # Benchmark scripts take plain argparse options (their own `make_parser`), not the examples' dataclasses.
        assert (ROOT / script).is_file(), f"{script} does not exist"
        parser = _load_module(ROOT / script, f"_docs_benchmark_{Path(script).stem}").make_parser()
        try:
            parser.parse_args(args)
        except SystemExit as error:
            raise AssertionError(f"{script} rejects {shlex.join(args)} (exit {error.code})") from None
        return
    assert script.startswith("examples/") and (ROOT / script).is_file(), f"{script} is not an example script"
    for option, value in zip(args, args[1:]):
        if option == "--config":
            assert (ROOT / value).is_file(), f"{value} does not exist"
    _parse_example(Path(script).name, args)


# --- accelerate configs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ACCELERATE_CONFIG_NAMES)
def test_accelerate_config_is_what_accelerate_reads(name):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    path = ACCELERATE_CONFIGS / name
    config = yaml.safe_load(path.read_text())
    for key in ("compute_environment", "distributed_type", "num_processes", "num_machines", "mixed_precision",
                "machine_rank", "main_training_function", "use_cpu"):
        assert key in config, f"{name} lacks {key}"
    assert config["compute_environment"] == "LOCAL_MACHINE" and config["use_cpu"] is False
    # Accelerate's own loader rejects unknown top-level keys and unknown distributed types.
    ClusterConfig.from_yaml_file(str(path))

    # `accelerate launch` turns the nested keys into its own options: each must be one.
    launch_options = {action.dest for action in launch_command_parser()._actions}
    for key in config.get("deepspeed_config", {}):
        assert key in launch_options, f"{name}: unknown deepspeed_config key {key}"
    for key in config.get("fsdp_config", {}):
        assert (key if key.startswith("fsdp") else f"fsdp_{key}") in launch_options, f"{name}: unknown key {key}"

    expected = {
        "single_gpu.yaml": ("NO", None),
        "multi_gpu.yaml": ("MULTI_GPU", None),
        "deepspeed_zero2.yaml": ("DEEPSPEED", 2),
        "deepspeed_zero3.yaml": ("DEEPSPEED", 3),
        "fsdp2.yaml": ("FSDP", 2),
    }[name]
    assert config["distributed_type"] == expected[0]
    if expected[0] == "DEEPSPEED":
        assert config["deepspeed_config"]["zero_stage"] == expected[1]
        # Pinned here it would have to equal every run's --gradient_accumulation_steps; left out, DeepSpeed takes it.
        assert "gradient_accumulation_steps" not in config["deepspeed_config"]
    if expected[0] == "FSDP":
        assert config["fsdp_config"]["fsdp_version"] == expected[1]
    assert config["num_processes"] == (1 if name == "single_gpu.yaml" else 8)


# --- recipes -------------------------------------------------------------------------------------------------


def test_every_recipe_is_mapped_to_its_example():
    assert sorted(path.name for path in RECIPES.glob("*.yaml")) == sorted(RECIPE_EXAMPLES)


@pytest.mark.parametrize("recipe", sorted(RECIPE_EXAMPLES))
def test_recipe_keys_are_fields_of_the_example(recipe, monkeypatch):
    import dataclasses

    monkeypatch.chdir(ROOT)
    script = RECIPE_EXAMPLES[recipe]
    settings = yaml.safe_load((RECIPES / recipe).read_text())
    parser = _example(script).make_parser()
    fields = {field.name for cls in parser.dataclass_types for field in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - fields)
    assert not unknown, f"{recipe}: {unknown} are not arguments of examples/{script}"

    # The whole recipe parses and validates with the example's dataclasses.
    parsed = _parse_example(script, ["--config", f"recipes/{recipe}"])
    values = {field.name: getattr(obj, field.name) for obj in parsed for field in dataclasses.fields(obj)}
    for key, value in PAPER_SETTINGS[recipe].items():
        assert settings.get(key) == value, f"{recipe}: {key} is {settings.get(key)!r}, the paper has {value!r}"
        if key != "bf16":  # turned off for the parse on a machine without a GPU
            assert values[key] == value, f"{recipe}: {key} parses to {values[key]!r}, not {value!r}"


def test_opsdc_recipe_has_the_papers_global_batch_on_its_accelerate_config():
    settings = yaml.safe_load((RECIPES / "opsdc_qwen3-8b.yaml").read_text())
    header = (RECIPES / "opsdc_qwen3-8b.yaml").read_text()
    config_name = re.search(r"accelerate_configs/(\S+\.yaml)", header).group(1)
    processes = yaml.safe_load((ACCELERATE_CONFIGS / config_name).read_text())["num_processes"]
    assert settings["per_device_train_batch_size"] * settings["gradient_accumulation_steps"] * processes == 32


# --- generated sections and the site --------------------------------------------------------------------------


def test_generated_sections_are_up_to_date():
    stale = _generator().stale_pages()
    assert not stale, f"{[str(p.relative_to(ROOT)) for p in stale]} out of date: run `python docs/generate.py`"


def test_opsdc_built_in_setting_is_rendered_from_its_measurements():
    # docs/opsdc.md and docs/results.md quote the grid and the built-in run of benchmarks/opsdc_lab_setting.py, from its
    # committed JSON.
    import json

    setting = _load_module(ROOT / "benchmarks" / "opsdc_lab_setting.py", "_docs_opsdc_lab_setting")
    results = json.loads(setting.RESULTS.read_text())
    start, end = "<!-- opsdc-lab-setting:start -->\n", "<!-- opsdc-lab-setting:end -->"
    for page in ("opsdc.md", "results.md"):  # OPSDC's page and the results page show the same grid
        text = (DOCS / page).read_text(encoding="utf-8")
        assert text.split(start, 1)[1].split(end, 1)[0] == setting.section(results), (
            f"docs/{page} is out of date: run `python benchmarks/opsdc_lab_setting.py render --write docs/{page}`"
        )
    # The built-in run that was measured is the example as it ships.
    example = _example("opsdc.py")
    chosen = next(run for run in results["runs"] if run["name"] == results["choice"]["name"])
    defaults = example.BUILTIN_DEFAULTS
    assert (defaults["learning_rate"], defaults.get("concise_instruction", "v2")) == (
        chosen["learning_rate"], chosen["instruction"])
    for key in ("max_steps", "per_device_train_batch_size", "teacher_refresh_steps", "seed"):
        assert defaults[key] == results["grid"][key]
    settings = results["builtin"]["results"]["settings"]
    assert settings["learning_rate"] == defaults["learning_rate"] and settings["max_steps"] == defaults["max_steps"]


def test_config_tables_list_every_added_field_with_its_help():
    import dataclasses

    generate = _generator()
    for name, cls in generate.config_classes().items():
        page = (DOCS / generate.CONFIG_PAGES[name]).read_text()
        table = page.split(f"<!-- config-table:{name}:start -->")[1].split(f"<!-- config-table:{name}:end -->")[0]
        parent = next(base for base in cls.__mro__[1:] if not base.__module__.startswith("trl_tip"))
        parent_fields = {field.name for field in dataclasses.fields(parent)}
        added = [field for field in dataclasses.fields(cls) if field.name not in parent_fields]
        assert added, name
        for field in added:
            assert f"| `{field.name}` |" in table, f"{name}.{field.name} missing from its table"
            assert " ".join(field.metadata["help"].split()).replace("|", "\\|") in table


def test_generator_refuses_a_config_without_a_page(monkeypatch):
    generate = _generator()
    pages = dict(generate.CONFIG_PAGES)
    missing = pages.pop("TipDistillConfig")
    monkeypatch.setattr(generate, "CONFIG_PAGES", pages)
    with pytest.raises(generate.DocsError, match="add a line to CONFIG_PAGES"):
        generate.render_pages()
    assert missing == "tip_distill.md"


def test_api_reference_covers_the_public_api():
    import trl_tip

    page = (DOCS / "api.md").read_text()
    for name in trl_tip.__all__:
        assert f"\n### {name}\n" in page, f"{name} is missing from docs/api.md"


# --- the README and the Makefile --------------------------------------------------------------------------------


def test_readme_sets_up_with_two_commands_and_installs_from_the_clone():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.split("\n## ", 2)[1]  # the first section: what a newcomer runs
    commands = [line.split("#")[0].strip() for block in _FENCE.findall(start) for line in block.splitlines()]
    assert [command for command in commands if command] == ["make demo", "make test"]
    # The package is not on PyPI: every install command names the clone (or a wheel built from it).
    for block in _FENCE.findall(readme):
        for line in block.splitlines():
            if line.startswith("pip install"):
                assert line.split()[2].strip("'\"").startswith((".", "dist/")), line


def test_make_demo_takes_the_torch_the_test_extra_pins():
    makefile = (ROOT / "Makefile").read_text()
    demo_torch = re.search(r"^TORCH \?= (\S+)$", makefile, re.MULTILINE).group(1)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert demo_torch in project["optional-dependencies"]["dev"]


def test_mkdocs_builds_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.fail("mkdocs is not installed: `pip install -e '.[dev]'` installs it (the tests build the docs)")
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                             str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]

    def pages(entries):
        for entry in entries:
            for value in entry.values():
                yield from pages(value) if isinstance(value, list) else [value]

    for page in pages(nav):
        assert (site / f"{page[:-3]}.html").is_file(), f"{page} was not built"
    api = (site / "api.html").read_text()
    assert 'id="tipdistilltrainer"' in api and "<table>" in api

"""Every command's config: the default YAMLs are the config classes' defaults, `--print-config` prints what the
command would run (and it round-trips), each flag is an alias of one config key, and a wrong key or value is one line
on stderr with exit 2."""

import subprocess
import sys

import pytest
import yaml

from aloe_jax.cli import ChatConfig, ServeConfig, build_parser, main
from aloe_jax.core.config import load_config
from aloe_jax.eval.config import CompareConfig, EvalConfig
from aloe_jax.quickstart import QuickstartConfig
from aloe_jax.train.config import ExportConfig, TrainConfig
from aloe_jax.rl.config import RLConfig
from data_pipeline.config import DatagenConfig, ExportTreesConfig

# (packaged config, class, the keys where the file deliberately differs from the class defaults)
DEFAULT_CONFIGS = [
    ("datagen", DatagenConfig, {}),
    ("eval", EvalConfig, {}),
    ("sft", TrainConfig, {}),
    ("dpo", TrainConfig, {"objective": "dpo", "output_dir": "runs/dpo-smollm2"}),  # what makes it the DPO config
]


@pytest.mark.parametrize("name, cls, differences", DEFAULT_CONFIGS, ids=[c[0] for c in DEFAULT_CONFIGS])
def test_default_yaml_is_the_class_defaults(name, cls, differences):
    assert load_config(cls, name) == cls(**differences)


# (command line with every alias of the command, class, --config it defaults to, the KEY=VALUE overrides it means)
ALIASED = [
    (["chat", "hi", "--model", "m", "--dtype", "bfloat16", "--max-tokens", "7", "--temperature", "0.5", "--seed", "3",
      "--system", "be brief"], ChatConfig, None,
     ["message=hi", "model.path=m", "model.dtype=bfloat16", "model.generation.max_tokens=7",
      "model.generation.temperature=0.5", "model.generation.seed=3", "model.system_prompt=be brief"]),
    (["chat", "hi", "--max-new-tokens", "9"], ChatConfig, None, ["message=hi", "model.generation.max_tokens=9"]),
    (["serve", "--model", "m", "--dtype", "bfloat16", "--host", "0.0.0.0", "--port", "0", "--served-name", "s",
      "--max-batch", "4", "--max-context", "512", "--api-key-env", "KEY", "--log-level", "debug",
      "--kv-dtype", "bfloat16"], ServeConfig, None,
     ["model.path=m", "model.dtype=bfloat16", "host=0.0.0.0", "port=0", "served_name=s", "max_batch=4",
      "max_context=512", "api_key_env=KEY", "log_level=debug", "kv_dtype=bfloat16"]),
    (["personas", "--kind", "personality", "--aloe-data", "/d"], DatagenConfig, "datagen",
     ["personas.kind=personality", "aloe_data=/d"]),
    (["trees", "--aloe-data", "/d", "trees.turns=2"], DatagenConfig, "datagen", ["aloe_data=/d", "trees.turns=2"]),
    (["contamination", "--train-profile", "a", "--eval-profile", "b", "--train-personality", "c",
      "--eval-personality", "d", "--out", "r.jsonl", "--aloe-data", "/d"], DatagenConfig, "datagen",
     ["contamination.train_profile=a", "contamination.eval_profile=b", "contamination.train_personality=c",
      "contamination.eval_personality=d", "contamination.output=r.jsonl", "aloe_data=/d"]),
    (["export-trees", "a.jsonl", "b.jsonl", "--eval", "c.jsonl", "--out", "o", "--format", "tfds"], ExportTreesConfig,
     None, ["train=[a.jsonl, b.jsonl]", "eval=[c.jsonl]", "output_dir=o", "format=tfds"]),
    (["eval", "--model", "m", "--dtype", "bfloat16", "--out", "o", "--simulator", "openai:gpt@http://h/v1", "--judge",
      "j", "--cases", "3", "--turns", "2", "--seed", "1", "--aloe-data", "/d", "--quiet"], EvalConfig, "eval",
     ["model.path=m", "model.dtype=bfloat16", "output_dir=o", "simulator.backend.kind=openai",
      "simulator.backend.model=gpt", "simulator.backend.base_url=http://h/v1", "judge.backend.kind=jax",
      "judge.backend.model=j", "cases=3", "turns=2", "seed=1", "aloe_data=/d", "progress_bar=false"]),
    (["eval-report", "runs/x", "--bootstrap", "50", "--seed", "2"], EvalConfig, "eval",
     ["output_dir=runs/x", "bootstrap_resamples=50", "seed=2"]),
    (["eval-report", "seed=2"], EvalConfig, "eval", ["seed=2"]),  # an override where the positional would be
    (["eval-compare", "a", "b", "--out", "o", "--bootstrap", "5", "--seed", "1"], CompareConfig, None,
     ["runs=[a, b]", "output_dir=o", "bootstrap_resamples=5", "seed=1"]),
    (["sft", "--model", "m", "--dtype", "float32", "--out", "o"], TrainConfig, "sft",
     ["model.path=m", "model.dtype=float32", "output_dir=o"]),
    (["dpo", "--model", "runs/sft", "--dtype", "float32", "--out", "o", "optim.lr=2e-5"], TrainConfig, "dpo",
     ["model.path=runs/sft", "model.dtype=float32", "output_dir=o", "optim.lr=2e-5"]),
    (["rl", "--model", "runs/sft", "--dtype", "float32", "--out", "o", "--iterations", "3", "--judge",
      "openai:gpt@http://h/v1", "--simulator", "s", "--aloe-data", "/d", "rollout.group_size=8"], RLConfig, "rl",
     ["model.path=runs/sft", "model.dtype=float32", "output_dir=o", "iterations=3", "judge.backend.kind=openai",
      "judge.backend.model=gpt", "judge.backend.base_url=http://h/v1", "simulator.backend.kind=jax",
      "simulator.backend.model=s", "rollout.aloe_data=/d", "rollout.group_size=8"]),
    (["export", "runs/sft", "hf", "--dtype", "bfloat16", "--adapter"], ExportConfig, None,
     ["model.path=runs/sft", "output_dir=hf", "model.dtype=bfloat16", "adapter=true"]),
    (["quickstart", "--out", "o", "--aloe-data", "/d", "--cases", "1", "--turns", "2", "--conversations", "3",
      "--train-steps", "4"], QuickstartConfig, None,
     ["output_dir=o", "aloe_data=/d", "cases=1", "turns=2", "conversations=3", "train_steps=4"]),
    (["compile", "--model", "m", "--topology", "v5p-8"], TrainConfig, "sft", ["model.path=m"]),
    (["compile", "--config", "eval", "--model", "m"], EvalConfig, "eval", ["model.path=m"]),
]


@pytest.mark.parametrize("argv, cls, config, overrides", ALIASED, ids=[" ".join(a[0][:2]) for a in ALIASED])
def test_print_config_is_what_the_aliases_mean_and_round_trips(capsys, argv, cls, config, overrides):
    assert main([*argv, "--print-config"]) == 0
    printed = capsys.readouterr().out
    expected = load_config(cls, config, overrides)
    if argv[0] in ("sft", "dpo"):
        expected.objective = argv[0]
    assert cls.model_validate(yaml.safe_load(printed)) == expected


@pytest.mark.parametrize("command", ["chat", "serve", "personas", "trees", "export-trees", "contamination", "eval",
                                     "eval-report", "eval-compare", "sft", "dpo", "rl", "export", "quickstart", "compile"])
def test_every_command_prints_its_default_config(capsys, command):
    assert main([command, "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)


def test_a_deprecated_flag_still_works_and_says_so(capsys):
    assert main(["chat", "hi", "--max-new-tokens", "9", "--print-config"]) == 0
    captured = capsys.readouterr()
    assert yaml.safe_load(captured.out)["model"]["generation"]["max_tokens"] == 9
    assert "--max-new-tokens is deprecated, use --max-tokens" in captured.err


def test_every_alias_is_tested():
    """A flag added to a command later must get a line in ALIASED."""
    commands = build_parser()._subparsers._group_actions[0].choices
    tested = {(argv[0], token) for argv, *_ in ALIASED for token in argv}
    for name, parser in commands.items():
        for alias in parser.get_default("config_aliases") or ():
            if not alias.positional:
                assert (name, alias.flag) in tested, f"{name} {alias.flag}"


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "m", "model.path=n", "--print-config"], "--model m and 'model.path=n' both set model.path"),
    (["eval", "--judge", "j", "judge.backend.model=k"], "both set judge.backend.model"),
    (["eval-report", "runs/x", "output_dir=y"], "RUN and 'output_dir=y' both set output_dir"),
    (["eval", "aloe_source=/d"], "aloe_source is now spelled aloe_data (aloe_data=/d)"),
    (["sft", "model=m"], "model is now spelled model.path (model.path=m)"),
    (["sft", "compute_dtype=float32"], "compute_dtype is now spelled model.dtype"),
    (["eval", "model.model=m"], "model.model is now spelled model.path"),
    (["eval", "cases=abc"], "cases: Input should be a valid integer"),
    (["sft", "optim.lrr=1"], "did you mean optim.lr?"),
    (["chat", "--print-config", "--config", "nope"], "not the name of a packaged config"),
    (["sft", "--config", "dpo"], "is a dpo config; run `aloe-jax dpo`"),
    (["dpo", "objective=sft"], "objective=sft contradicts the command"),
    (["compile"], "--topology NAME"),
])
def test_a_wrong_flag_or_override_is_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_a_wrong_override_has_no_traceback_and_loads_nothing_heavy():
    probe = ("import sys\nfrom aloe_jax.cli import main\ncode = main(sys.argv[1:])\n"
             "assert 'jax' not in sys.modules, 'jax was imported'\nsys.exit(code)")
    wrong = subprocess.run([sys.executable, "-c", probe, "eval", "judge.history_turns=-1"], capture_output=True,
                           text=True, timeout=120)
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert wrong.stderr.count("\n") == 1 and "judge.history_turns" in wrong.stderr, wrong.stderr
    printed = subprocess.run([sys.executable, "-c", probe, "eval", "--print-config"], capture_output=True, text=True,
                             timeout=120)
    assert printed.returncode == 0 and EvalConfig.model_validate(yaml.safe_load(printed.stdout)), printed.stderr

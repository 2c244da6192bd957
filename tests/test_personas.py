"""Persona pool growth: parsing, the near-duplicate filter in the loop, stopping rules, append-as-you-go and resume."""

import json

import pytest

from aloe_jax.core.errors import DataError
from aloe_jax.llm.base import ChatResult
from aloe_jax.llm.roles import Role
from aloe_jax.llm.usage import UsageMeter
from aloe_jax.core import jsonl_log
from data_pipeline import personas, prompts
from data_pipeline.config import DatagenConfig

SEEDS = [
    "You are a 34-year-old nurse in Lisbon who works night shifts, rents a small flat and keeps two cats.",
    "You are a retired carpenter from rural Manitoba who builds canoes and volunteers at the fire hall.",
    "You are a 19-year-old computer science student in Seoul who plays competitive chess online every night.",
]
NEW = [
    "You are a marine biologist in Cape Town who dives with sharks and writes a blog about kelp forests.",
    "You are a pastry chef in Lyon who opens the bakery at 4 am and coaches a youth football team on Sundays.",
    "You are a long-haul truck driver from Texas who listens to history podcasts and collects vintage radios.",
    "You are a Kenyan primary school teacher who runs marathons and grows tomatoes on the school grounds.",
]


class ScriptedGenerator:
    """A ChatBackend whose replies come from a list, one reply per call, recording every conversation it saw."""

    name = "scripted:generator"

    def __init__(self, replies):
        self.replies, self.seen = list(replies), []

    def chat(self, conversations, params):
        self.seen.extend(conversations)
        return [ChatResult(self.replies.pop(0) if self.replies else "", "stop", 10, 10) for _ in conversations]

    def score_options(self, conversations, options):
        return None


@pytest.fixture(scope="module")
def encoder():
    from data_pipeline.embeddings import SentenceEncoder

    return SentenceEncoder()


def _cfg(tmp_path, **personas_cfg):
    base = dict(kind="profile", output=str(tmp_path / "pool.jsonl"), examples_per_prompt=2, candidates_per_prompt=3,
                prompts_per_round=1, min_words=5, threshold={"profile": 0.6, "personality": 0.6})
    return DatagenConfig.model_validate({"seed": 3, "personas": {**base, **personas_cfg}})


def test_parse_persona_list_strips_markers_and_debris():
    text = ('Here are new profiles:\n- You are a baker in Oslo who loves skiing.\n2. "You are a pilot from Lima who '
            'paints."\n\n* ok\n(3) You are a farmer in Iowa with four children.')
    assert prompts.parse_persona_list(text, min_words=5) == [
        "You are a baker in Oslo who loves skiing.", "You are a pilot from Lima who paints.",
        "You are a farmer in Iowa with four children."]


def test_generator_prompt_shows_pool_examples(tmp_path, encoder):
    cfg = _cfg(tmp_path, target_size=4)
    backend = ScriptedGenerator(["- " + NEW[0]])
    personas.grow_pool(cfg, Role("persona_generator", backend), encoder, seeds=SEEDS, show_progress=False)
    request = backend.seen[0][-1]["content"]
    shown = [line[2:] for line in request.splitlines() if line.startswith("- ")]
    assert len(shown) == 2 and set(shown) <= set(SEEDS)
    assert "3 new entries" in request


def test_grow_pool_rejects_near_duplicates_and_resumes(tmp_path, encoder):
    cfg = _cfg(tmp_path, target_size=6)
    round1 = "\n".join(["- " + SEEDS[0],  # copy of a pool entry
                        "- " + NEW[0],
                        "- " + NEW[0].replace("sharks", "sharks often"),  # near-copy of an accepted candidate
                        "- tiny"])  # under min_words
    meter = UsageMeter()
    report = personas.grow_pool(cfg, Role("persona_generator", ScriptedGenerator([round1, "- " + NEW[1]]),
                                          meter=meter), encoder, seeds=SEEDS, show_progress=False)
    pool = jsonl_log.read_complete(cfg.personas.output)
    assert pool == SEEDS + [NEW[0], NEW[1]]
    assert (report.rounds, report.candidates, report.accepted) == (3, 4, 2)  # "tiny" is not a candidate
    assert report.stop_reason == "no new entries"  # the third call got an empty reply
    assert meter.by_role["persona_generator"].calls == 3

    # A crash mid-append leaves a torn line; the resumed run drops it and continues from the 5 complete entries.
    with open(cfg.personas.output, "a") as f:
        f.write('"You are a torn')
    report = personas.grow_pool(cfg, Role("persona_generator", ScriptedGenerator(["- " + NEW[2], "- " + NEW[3]])),
                                encoder, seeds=["ignored: the pool file already exists"], show_progress=False)
    lines = open(cfg.personas.output).read().splitlines()
    assert [json.loads(x) for x in lines] == SEEDS + NEW[:3]
    assert report.start_size == 5 and report.final_size == 6 and report.stop_reason == "target"


def test_threshold_is_what_decides(tmp_path, encoder):
    # The same close paraphrase is rejected at the paper's 0.6 and kept under a looser threshold.
    near = NEW[0].replace("writes a blog", "keeps a blog")
    sims = encoder.encode([NEW[0]]) @ encoder.encode([near]).T
    assert 0.6 < float(sims[0, 0]) < 0.999
    for threshold, expected in ((0.6, [NEW[0]]), (0.999, [NEW[0], near])):
        cfg = _cfg(tmp_path / str(threshold), target_size=10, threshold={"profile": threshold, "personality": 0.6})
        personas.grow_pool(cfg, Role("g", ScriptedGenerator(["- " + NEW[0] + "\n- " + near])), encoder,
                           seeds=SEEDS, show_progress=False)
        assert jsonl_log.read_complete(cfg.personas.output)[len(SEEDS):] == expected


def test_gcs_output_is_uploaded(tmp_path, encoder, gcs_emulator, monkeypatch):
    from aloe_jax.core import storage

    monkeypatch.setenv("ALOE_JAX_CACHE", str(tmp_path / "cache"))
    cfg = _cfg(tmp_path, target_size=4, output=f"{gcs_emulator}/pools/{{kind}}.jsonl")
    personas.grow_pool(cfg, Role("g", ScriptedGenerator(["- " + NEW[0]])), encoder, seeds=SEEDS, show_progress=False)
    assert personas.read_pool_file(f"{gcs_emulator}/pools/profile.jsonl") == SEEDS + [NEW[0]]
    assert storage.exists(f"{gcs_emulator}/pools/profile.jsonl")


def test_bad_threshold_is_a_config_error():
    from aloe_jax.core.config import build_config
    from aloe_jax.core.errors import ConfigError

    with pytest.raises(ConfigError, match="threshold"):
        build_config(DatagenConfig, {"personas": {"threshold": {"profile": 1.5}}})


def test_append_log_keeps_foreign_files_intact(tmp_path):
    # A file with two JSON values on one line (like ALOE's own profile.jsonl) is refused, never truncated.
    foreign = tmp_path / "aloe_like.jsonl"
    foreign.write_text('"one"\n"two" "three"\n"four"\n')
    with pytest.raises(DataError, match="line 2 is not one JSON value"):
        jsonl_log.read_complete(str(foreign))
    assert foreign.read_text() == '"one"\n"two" "three"\n"four"\n'
    # A whole last record that only lacks its newline is kept, and the next append starts on its own line.
    unterminated = tmp_path / "unterminated.jsonl"
    unterminated.write_text('"one"\n"two"')
    assert jsonl_log.read_complete(str(unterminated)) == ["one", "two"]
    jsonl_log.append(str(unterminated), ["three"])
    assert jsonl_log.read_complete(str(unterminated)) == ["one", "two", "three"]

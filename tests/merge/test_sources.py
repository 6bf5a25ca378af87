"""Bad input (btx_megatron.merge.sources / options): one message naming the source and the
field, and nothing partial left on disk."""

from __future__ import annotations

import shutil

import pytest

from tests.merge.merge_fixtures import TINY, iter_dir as _iter, make_branch, merge


def _refused(tmp_path, match, **kw):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        merge(out, **kw)
    assert not out.exists()
    assert not list(tmp_path.glob(".staging-*"))


def test_bad_architecture(work, tmp_path):
    argv = [a if a != "96" else "128" for a in TINY]
    other = make_branch(tmp_path / "wide", seed=7, argv=argv)
    _refused(tmp_path, r"--branch wide=.*ffn_hidden_size=128.*--branch math=.*ffn_hidden_size=96",
             branches=work["branches"][:1] + [("wide", other)])


def test_bad_moe_source(work, tmp_path):
    _refused(tmp_path, r"--branch moe=.*already an MoE checkpoint \(num_experts=3\)",
             branches=work["branches"][:1] + [("moe", work["merged"])])


def test_bad_truncated_and_missing_distcp(work, tmp_path):
    name, path = work["branches"][1]
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    f = next(_iter(broken).glob("*.distcp"))
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size - 100)
    _refused(tmp_path, rf"--branch code=.*{f.name} is truncated \({size - 100} bytes",
             branches=[work["branches"][0], ("code", broken)])
    f.unlink()
    _refused(tmp_path, rf"--branch code=.*{f.name} is missing", branches=[work["branches"][0], ("code", broken)])


def test_bad_not_a_checkpoint(work, tmp_path):
    (tmp_path / "empty").mkdir()
    _refused(tmp_path, r"--branch x=.*is not a btx-megatron checkpoint",
             branches=work["branches"][:1] + [("x", tmp_path / "empty")])


def test_bad_same_branch_twice(work, tmp_path):
    name, path = work["branches"][0]
    _refused(tmp_path, r"--branch again=.*same checkpoint as --branch math=", branches=[(name, path), ("again", path)])
    shutil.copytree(path, tmp_path / "copy")
    _refused(tmp_path, r"--branch copy=.*same content .* as --branch math=",
             branches=[(name, path), ("copy", tmp_path / "copy")])


def test_output_exists_needs_overwrite_and_replaces_only_a_merge(work, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        merge(out, work["branches"][:2])
    # --overwrite replaces an earlier merge only, never a directory some other tool (or a user) wrote.
    with pytest.raises(ValueError, match="not an output of this tool; --overwrite replaces only"):
        merge(out, work["branches"][:2], overwrite=True)
    assert (out / "keep.txt").exists()
    (out / "keep.txt").unlink()
    out.rmdir()
    merge(out, work["branches"][:2])
    first = (_iter(out) / "btx_checkpoint.json").read_text()
    merge(out, work["branches"][1:], overwrite=True)
    assert (_iter(out) / "btx_checkpoint.json").read_text() != first
    assert not list(tmp_path.glob(".staging-*")) and not list(tmp_path.glob(".trash-*"))


def test_output_inside_a_source_is_refused(work, tmp_path):
    name, path = work["branches"][0]
    with pytest.raises(ValueError, match="lies inside the source"):
        merge(path / "merged", work["branches"][:2])
    assert not (path / "merged").exists() and not list(path.glob(".staging-*"))

"""torch_dist tensor IO of the merge (btx_megatron.checkpoint.dcp_reader, dcp_writer): the reader fills any box of a
global tensor exactly as PyTorch's DCP reader does (Megatron's per-layer chunks, whole-tensor
chunks, records it cannot address directly), and what the writer writes is read back by
PyTorch's DCP reader and by ``torch.load`` record by record."""

from __future__ import annotations

import io

import pytest
import torch

from tests.merge.merge_fixtures import cast_checkpoint, iter_dir, make_branch, read_dcp


@pytest.fixture(scope="module")
def branch(tmp_path_factory):
    """A tiny dense checkpoint saved by the trainer (Megatron's per-layer chunks)."""
    return make_branch(tmp_path_factory.mktemp("storage") / "math", seed=1)


def _reader(ckpt_dir):
    from btx_megatron.checkpoint.verify import verify_files
    from btx_megatron.checkpoint.dcp_reader import CheckpointReader

    return CheckpointReader(ckpt_dir, verify_files(ckpt_dir, "test"), "test")


def _check_boxes(ckpt_dir) -> int:
    """Every tensor whole, layer by layer, and an off-grid box; returns the records read by torch.load."""
    reader, want = _reader(ckpt_dir), read_dcp(ckpt_dir)
    try:
        for key, full in want.items():
            shape, dtype = reader.tensors[key]
            got = torch.empty(shape, dtype=dtype)
            reader.read(key, (0,) * len(shape), got)
            assert torch.equal(got, full), key
            if len(shape) >= 2:
                for layer in range(shape[0]):
                    one = torch.empty((1, *shape[1:]), dtype=dtype)
                    reader.read(key, (layer,) + (0,) * (len(shape) - 1), one)
                    assert torch.equal(one[0], full[layer]), (key, layer)
                # A box that cuts every axis (and, for fc1, spans the gate/up chunk boundary).
                box = tuple(max(1, s - 2) for s in shape)
                start = (0,) + (1,) * (len(shape) - 1)
                part = torch.empty(box, dtype=dtype)
                reader.read(key, start, part)
                assert torch.equal(part, full[tuple(slice(o, o + b) for o, b in zip(start, box))]), key
        return sum(r.data_offset is None for r in reader._records.values())
    finally:
        reader.close()


def test_reader_matches_pytorch_on_megatron_and_whole_tensor_chunks(branch, tmp_path):
    path = branch
    assert _check_boxes(iter_dir(path)) == 0  # Megatron's chunks (fc1 as gate and up) read directly
    whole = cast_checkpoint(path, tmp_path / "bf16", torch.bfloat16)  # one chunk per key, all layers
    assert _check_boxes(iter_dir(whole)) == 0


def test_reader_falls_back_to_torch_load_for_strided_records(tmp_path):
    import torch.distributed.checkpoint as dcp

    base = torch.arange(6 * 5 * 4, dtype=torch.float32).reshape(6, 5, 4)
    state = {"decoder.layers.x.weight": base.transpose(1, 2), "embedding.word_embeddings.weight": base[0]}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp_path)), no_dist=True)
    reader = _reader(tmp_path)
    one = torch.empty(1, 4, 5)
    reader.read("decoder.layers.x.weight", (2, 0, 0), one)
    assert torch.equal(one[0], base[2].t())
    emb = torch.empty(5, 4)
    reader.read("embedding.word_embeddings.weight", (0, 0), emb)
    assert torch.equal(emb, base[0])
    # The transposed record went through torch.load, the contiguous one was read in place.
    assert sorted(r.data_offset is None for r in reader._records.values()) == [False, True]
    reader.close()


def test_writer_output_reads_back_with_pytorch(tmp_path):
    from btx_megatron.checkpoint.dcp_writer import (COMMON_STATE_KEY, DistcpWriter, common_state_bytes, torch_save_framing,
                                               write_metadata)

    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(3, 5, generator=g).to(torch.bfloat16) for _ in range(4)]
    emb = torch.randn(7, 5, generator=g)
    empty = torch.empty(0, 5)
    chunks = []
    for rank, items in enumerate([[(0, layers[0]), (2, layers[2])], [(1, layers[1]), (3, layers[3])]]):
        writer = DistcpWriter(tmp_path, rank, max_pending_bytes=64)  # tiny budget: the queue blocks
        if rank == 0:
            writer.add_bytes(COMMON_STATE_KEY, common_state_bytes({"iteration": 0}))
            writer.add_tensor("embedding.word_embeddings.weight", (0, 0), emb, (7, 5))
            writer.add_tensor("empty", (0, 0), empty, (0, 5))
        for layer, t in items:
            writer.add_tensor("decoder.layers.w", (layer, 0, 0), t.unsqueeze(0), (4, 3, 5))
        chunks += writer.close()
    write_metadata(tmp_path, chunks)
    got = read_dcp(tmp_path, ["decoder.layers.w", "embedding.word_embeddings.weight", "empty"])
    assert torch.equal(got["decoder.layers.w"], torch.stack(layers))
    assert torch.equal(got["embedding.word_embeddings.weight"], emb) and got["empty"].shape == (0, 5)
    # Each record is a torch.save record that torch.load reads on its own (how DCP reads it).
    for c in chunks:
        blob = (tmp_path / c.relative_path).read_bytes()[c.offset:c.offset + c.length]
        loaded = torch.load(io.BytesIO(blob), weights_only=True)
        if c.offsets is None:
            assert loaded == [{"iteration": 0}]
        else:
            assert tuple(loaded.shape) == c.sizes
    head, start, tail = torch_save_framing(emb)
    assert len(head) == start and start % 64 == 0  # PyTorch aligns record data to 64 bytes
    buf = io.BytesIO()
    torch.save(emb, buf)
    assert len(head) + emb.numel() * 4 + len(tail) == len(buf.getvalue())


def test_writer_syncs_to_disk_while_writing(tmp_path, monkeypatch):
    """Every ``sync_every`` bytes the flusher thread fdatasyncs the file (write-back overlaps the
    rest of the work); close() still fsyncs the tail, and the records are intact."""
    import os
    import threading
    import time

    from btx_megatron.checkpoint import dcp_writer

    synced = []
    real = os.fdatasync

    def record(fd):
        synced.append((threading.current_thread().name, os.fstat(fd).st_size))
        real(fd)

    monkeypatch.setattr(dcp_writer.os, "fdatasync", record)
    tensors = [torch.full((256,), float(i)) for i in range(8)]  # 1 KiB each, plus framing
    writer = dcp_writer.DistcpWriter(tmp_path, 0, sync_every=2048)
    for i, t in enumerate(tensors[:3]):  # > 2048 bytes
        writer.add_tensor("w", (i, 0), t.unsqueeze(0), (8, 256))
    deadline = time.monotonic() + 30
    while not synced and time.monotonic() < deadline:  # the flusher syncs with the writer still open
        time.sleep(0.01)
    for i, t in enumerate(tensors[3:], 3):
        writer.add_tensor("w", (i, 0), t.unsqueeze(0), (8, 256))
    chunks = writer.close()
    assert synced and all(name == "distcp-flusher" for name, _ in synced)
    assert 2048 <= synced[0][1] < sum(c.length for c in chunks)
    dcp_writer.write_metadata(tmp_path, chunks)
    assert torch.equal(read_dcp(tmp_path, ["w"])["w"], torch.stack(tensors))

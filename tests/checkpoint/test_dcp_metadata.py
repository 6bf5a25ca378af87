"""checkpoint.dcp_metadata reads and writes PyTorch DCP's ``.metadata`` without importing
torch.distributed.checkpoint, and agrees with PyTorch's own classes in both directions."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import torch

from btx_megatron.checkpoint import dcp_metadata as ours
from btx_megatron.checkpoint.verify import dcp_metadata
from tests.conftest import ROOT


def _flat(md) -> dict:
    """Every field the tools use, from either kind of object, as plain data."""
    state = {}
    for key, value in md.state_dict_metadata.items():
        if type(value).__name__ == "TensorStorageMetadata":
            p = value.properties
            state[key] = ("tensor", str(p.dtype), str(p.layout), p.requires_grad, str(p.memory_format), p.pin_memory,
                          tuple(value.size), [(tuple(c.offsets), tuple(c.sizes)) for c in value.chunks])
        else:
            state[key] = (type(value).__name__,)
    storage = {(i.fqn, None if i.offset is None else tuple(i.offset)):
               (s.relative_path, s.offset, s.length, s.transform_descriptors) for i, s in md.storage_data.items()}
    meta = md.storage_meta
    return {"state": state, "storage": storage, "version": md.version,
            "storage_meta": None if meta is None else (meta.checkpoint_id, meta.save_id, meta.modules)}


def _example(m, storage_info):
    """The same metadata built from ``m`` (this project's module or DCP's)."""
    return m.Metadata(
        state_dict_metadata={
            "w": m.TensorStorageMetadata(m.TensorProperties(dtype=torch.bfloat16), torch.Size([4, 6]),
                                         [m.ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([2, 6])),
                                          m.ChunkStorageMetadata(torch.Size([2, 0]), torch.Size([2, 6]))]),
            "img": m.TensorStorageMetadata(m.TensorProperties(dtype=torch.float32, memory_format=torch.channels_last,
                                                              requires_grad=True),
                                           torch.Size([1, 2, 2, 2]), [m.ChunkStorageMetadata(torch.Size([0, 0, 0, 0]),
                                                                                             torch.Size([1, 2, 2, 2]))]),
            "extra": m.BytesStorageMetadata()},
        storage_data={m.MetadataIndex("w", (0, 0), index=0): storage_info("__0_0.distcp", 0, 24),
                      m.MetadataIndex("w", (2, 0)): storage_info("__1_0.distcp", 0, 24, ["zstd"]),
                      m.MetadataIndex("img", (0, 0, 0, 0)): storage_info("__0_0.distcp", 24, 32),
                      m.MetadataIndex("extra"): storage_info("__0_0.distcp", 56, 10)},
        version="1.0.0", storage_meta=m.StorageMeta(checkpoint_id="ckpt", save_id="abc"))


def test_written_metadata_is_dcps_own_and_dcps_reads_back_as_ours():
    import torch.distributed.checkpoint.metadata as dcp
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    mine, theirs = _example(ours, ours.StorageInfo), _example(dcp, _StorageInfo)
    # Ours, pickled, loads as PyTorch's classes, equal to the same metadata built by PyTorch.
    loaded = pickle.loads(ours.dumps(mine))
    assert type(loaded) is dcp.Metadata and type(loaded.state_dict_metadata["w"]) is dcp.TensorStorageMetadata
    assert all(type(i) is dcp.MetadataIndex and type(s) is _StorageInfo for i, s in loaded.storage_data.items())
    assert loaded == theirs
    assert loaded.state_dict_metadata["img"].properties.memory_format == torch.channels_last
    # PyTorch's pickle loads as ours, equal to ours; and the index hint stays out of equality.
    back = ours.loads(pickle.dumps(theirs))
    assert type(back) is ours.Metadata and back == mine
    assert _flat(back) == _flat(theirs) and back.storage_data[ours.MetadataIndex("w", (0, 0))].length == 24


def test_a_dcp_saved_checkpoint_reads_the_same_without_importing_dcp(tmp_path):
    import torch.distributed.checkpoint as dcp

    state = {"a": torch.arange(12, dtype=torch.float32).view(3, 4), "b": torch.ones(5, dtype=torch.bfloat16),
             "step": 7, "note": {"x": [1, 2]}}
    dcp.save(state, checkpoint_id=str(tmp_path), no_dist=True)
    metadata = dcp.FileSystemReader(str(tmp_path)).read_metadata()
    # Megatron-Core's save planner also stores its plans (SavePlan, WriteItem, ...) in planner_data.
    from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType

    metadata.planner_data = {"plans": [SavePlan([WriteItem(index=next(iter(metadata.storage_data)),
                                                           type=WriteItemType.TENSOR)])]}
    metadata.storage_meta = None
    (tmp_path / ".metadata").write_bytes(pickle.dumps(metadata))
    reference = _flat(metadata)
    assert reference["state"]["a"][6] == (3, 4)
    # In a fresh interpreter (this one has imported DCP): the same fields, and DCP never imported.
    code = (
        "import json, sys\n"
        "from btx_megatron.checkpoint.verify import dcp_metadata\n"
        "from tests.checkpoint.test_dcp_metadata import _flat\n"
        f"flat = _flat(dcp_metadata({str(tmp_path)!r}))\n"
        "print(json.dumps({'dcp_imported': 'torch.distributed.checkpoint' in sys.modules,\n"
        "                  'flat': repr(flat)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["dcp_imported"] is False
    assert result["flat"] == repr(reference)
    # And in this process, through the same call.
    assert _flat(dcp_metadata(tmp_path)) == reference

"""Training side: datasets over the mined shards, the EGA loss, a hard-batch sampler and a reference trainer.

The names below load on first use, so `hardneg mine` (whose CLI registers the train subcommands) does not pay
torch's import when it never needs torch (a small job with a warm cache)."""
from importlib import import_module

_WHERE = {**{name: "pipeline.train.dataset" for name in ("IterableShardDataset", "ShardDataset", "ShardStats",
                                                         "collate_rows", "list_shards")},
          **{name: "pipeline.train.ega" for name in ("EGALoss", "content_key", "ega_from_scores", "gather_with_grad",
                                                     "hardness")},
          "HardBatchSampler": "pipeline.train.sampler"}

__all__ = ["EGALoss", "HardBatchSampler", "IterableShardDataset", "ShardDataset", "ShardStats", "collate_rows",
           "content_key", "ega_from_scores", "gather_with_grad", "hardness", "list_shards"]


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pipeline.train' has no attribute {name!r}")
